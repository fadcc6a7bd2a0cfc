"""Losses as small functions over tensors. Each returns ``(loss, diagnostics)`` where the loss is a
scalar and the diagnostics are detached scalars; weighting and logging belong to the caller."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DISTILL_LOSSES = ("mse", "l1", "huber")
GAN_LOSSES = ("lsgan", "hinge", "wgan")


def distillation_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse", huber_delta: float = 1.0):
    """Eq. (2): distance between the student's one-step x0 and the teacher's multi-step x0."""
    target = target.detach()
    if kind == "mse":
        loss = F.mse_loss(pred, target)
    elif kind == "l1":
        loss = F.l1_loss(pred, target)
    elif kind == "huber":
        loss = F.huber_loss(pred, target, delta=huber_delta)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}; expected one of {list(DISTILL_LOSSES)}")
    return loss, {"distill": loss.detach()}


def denoising_loss(pred: torch.Tensor, target: torch.Tensor):
    """The teacher's own objective (MSE on the native output: eps, v or flow velocity); here it
    trains DMD2's fake score on the student's samples."""
    loss = F.mse_loss(pred.float(), target.detach().float())
    return loss, {"fake_dsm": loss.detach()}


def generator_adv_loss(fake_logits: torch.Tensor, kind: str = "lsgan"):
    """Eq. (4), student side. LSGAN: 1/2 E[(D(fake) - 1)^2]; hinge and WGAN: -E[D(fake)]."""
    if kind == "lsgan":
        loss = 0.5 * ((fake_logits - 1) ** 2).mean()
    elif kind in ("hinge", "wgan"):
        loss = -fake_logits.mean()
    else:
        raise ValueError(f"unknown GAN loss {kind!r}; expected one of {list(GAN_LOSSES)}")
    return loss, {"adv_g": loss.detach(), "d_fake_for_g": fake_logits.detach().mean()}


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "lsgan"):
    """Eq. (4), discriminator side. LSGAN: 1/2 (E[(D(real) - 1)^2] + E[D(fake)^2]);
    hinge: E[relu(1 - D(real))] + E[relu(1 + D(fake))]; WGAN (no penalty): E[D(fake)] - E[D(real)]."""
    if kind == "lsgan":
        loss = 0.5 * (((real_logits - 1) ** 2).mean() + (fake_logits**2).mean())
    elif kind == "hinge":
        loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    elif kind == "wgan":
        loss = fake_logits.mean() - real_logits.mean()
    else:
        raise ValueError(f"unknown GAN loss {kind!r}; expected one of {list(GAN_LOSSES)}")
    acc = 0.5 * ((real_logits > 0.5 if kind == "lsgan" else real_logits > 0).float().mean()
                 + (fake_logits < 0.5 if kind == "lsgan" else fake_logits < 0).float().mean())
    return loss, {"adv_d": loss.detach(), "d_real": real_logits.detach().mean(),
                  "d_fake": fake_logits.detach().mean(), "d_accuracy": acc.detach()}


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, eps: float = 1e-5):
    """Eq. (5), distribution matching (Yin et al. 2023): the KL gradient direction
    ``x0_fake - x0_real`` (student-minus-teacher denoising of the re-noised student sample),
    normalised per sample by ``1 / (mean|x - x0_real| + eps)`` and applied as
    ``MSE(x, stopgrad(x - grad))``, whose gradient with respect to x is ∝ grad."""
    x0_real, x0_fake = x0_real.detach().float(), x0_fake.detach().float()
    dims = tuple(range(1, x.ndim))
    norm = (x.detach().float() - x0_real).abs().mean(dim=dims, keepdim=True) + eps
    grad = (x0_fake - x0_real) / norm
    loss = F.mse_loss(x.float(), (x.detach().float() - grad))
    return loss, {"dmd": loss.detach(), "dmd_grad_norm": grad.flatten(1).norm(dim=1).mean()}


CONSISTENCY_LOSSES = ("l2", "huber")


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.001):
    """LCM's distance d(F_theta, F_theta-) between the online prediction and the stop-gradient
    target: ``l2`` is the mean squared error; ``huber`` the element-wise pseudo-Huber
    ``mean(sqrt((pred - target)^2 + c^2) - c)`` (Song & Dhariwal 2023; diffusers' LCM scripts)."""
    diff = pred.float() - target.detach().float()
    if kind == "l2":
        loss = (diff**2).mean()
    elif kind == "huber":
        if huber_c <= 0:
            raise ValueError(f"huber_c must be > 0, got {huber_c}")
        loss = (torch.sqrt(diff**2 + huber_c**2) - huber_c).mean()
    else:
        raise ValueError(f"unknown consistency loss {kind!r}; expected one of {list(CONSISTENCY_LOSSES)}")
    return loss, {"consistency": loss.detach()}


def ns_gan_generator_loss(fake_logits: torch.Tensor):
    """Non-saturating GAN, generator side (SDXL-Lightning Eq. 21): ``-log sigmoid(D(fake))``,
    written as ``softplus(-D(fake))``."""
    loss = F.softplus(-fake_logits.float()).mean()
    return loss, {"adv_g": loss.detach(), "d_fake_for_g": fake_logits.detach().float().mean()}


def ns_gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor):
    """Non-saturating GAN, discriminator side (Eq. 20): ``-log sigmoid(D(real)) - log(1 -
    sigmoid(D(fake)))`` = ``softplus(-D(real)) + softplus(D(fake))``."""
    real, fake = real_logits.float(), fake_logits.float()
    loss = F.softplus(-real).mean() + F.softplus(fake).mean()
    acc = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
    return loss, {"adv_d": loss.detach(), "d_real": real.detach().mean(), "d_fake": fake.detach().mean(),
                  "d_accuracy": acc.detach()}
