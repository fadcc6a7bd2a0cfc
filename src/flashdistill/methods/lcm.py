"""Latent Consistency Distillation (LCM, Luo et al. 2023) and LCM-LoRA (Luo et al. 2023b): the
student learns to map every point of the teacher's guided PF-ODE trajectory to the same x0,

    L = d( F_theta(x_{t_{n+k}}, t_{n+k}),  F_theta-(xhat_{t_n}, t_n) )

where ``xhat_{t_n}`` is one guided DDIM step of size k of the teacher from the noised real sample
``x_{t_{n+k}}`` (the skipping-step solver on the N-point grid, k = T // N), ``F`` is the student's
boundary-scaled x0 (c_skip / c_out, identity at t = 0) and ``theta-`` is the student itself without
gradient (LCM-LoRA) or an EMA of it (the full LCM).

Conventions, decided once: the teacher's CFG scale ``guidance`` is diffusers' g (1 = no
guidance); LCM's w is g - 1 (``core.solvers.guidance_from_lcm_w``). The grid, the inference
timesteps and the exported scheduler are LCMScheduler's (``original_inference_steps = N``).

Departures, on purpose: a fixed w (the LCM-LoRA authors' choice, luosiallen/latent-consistency-model
#40; diffusers' LoRA script samples w in [5, 15] without telling the student); the full variant has
an EMA target but no w-embedding yet; ``teacher_steps`` > 1 (several DDIM sub-steps per skip,
SPLAM's multiple estimation) is an option, 1 is LCM.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field as dc_field
from typing import Literal

import torch

from ..config import field
from ..core.solvers import cfg_model, ddim_move
from ..core.timesteps import lcm_inference_timesteps, next_on_grid, skipping_grid
from ..losses import consistency_loss
from ..models.student import StudentDenoiser
from ..train import TrainConfig
from . import base
from .base import UNET_ALL_TARGETS, EMATarget, StudentConfig, StudentMethod, unwrap


def _lcm_train_defaults() -> TrainConfig:
    return TrainConfig(steps=4000, batch_size=12, checkpoint_every=1000, sample_every=1000)


@dataclass
class LCMConfig(StudentConfig):
    N: int = field(50, "points of the skipping-step grid (LCMScheduler's original_inference_steps); skip k = T // N")
    guidance: float = field(8.5, "teacher CFG scale g inside the ODE step (diffusers form, 1 = none; LCM's w = g - 1)")
    teacher_steps: int = field(1, "teacher DDIM sub-steps per skip (SPLAM's multiple estimation k / k_phi; 1 = LCM)")
    loss: Literal["l2", "huber"] = field("huber", "consistency distance: l2, or pseudo-Huber (diffusers' LCM README)")
    huber_c: float = field(0.001, "pseudo-Huber c")
    target_ema: float = field(-1.0, "EMA decay of the target network theta- (-1: 0.95 for full students, none for a "
                                    "LoRA; 0: the student itself without gradient, as LCM-LoRA)")
    lr: float = field(1e-4, "AdamW learning rate of the student (diffusers' LCM-LoRA README: 1e-4)")
    train: TrainConfig = dc_field(default_factory=_lcm_train_defaults, metadata={"help": "training loop"})

    def validate(self):
        super().validate()
        if not 1 <= self.N <= 1000:
            raise ValueError(f"N must be in [1, 1000], got {self.N}")
        if not 1 <= self.teacher_steps < self.N:
            raise ValueError(f"teacher_steps must be in [1, N), got {self.teacher_steps} with N = {self.N}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0 (1 = no guidance), got {self.guidance}")
        if self.target_ema != -1.0 and not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must be -1 (auto) or in [0, 1), got {self.target_ema}")

    @property
    def ema(self) -> float:
        return (0.95 if self.full else 0.0) if self.target_ema == -1.0 else self.target_ema


PRESETS = {
    "sd": {},
    "sdxl": {"lr": 1e-4},
    "pixart": {},
    "sd3": {},
    # The built-in teacher: its own CFG (1.5); rank 8 on all conv and linear layers; lr 10x SD's
    # (notes: a 0.9M UNet at batch 16 learns faster); the same 340 steps as Flash's digits preset.
    "digits": {"lora_rank": 8, "lr": 1e-3, "guidance": 1.5,
               "train": {"steps": 340, "batch_size": 16, "checkpoint_every": 100, "sample_every": 100, "ema_decay": 0.99}},
}


def build_config(teacher, preset: str = "auto", *layers: dict) -> tuple[LCMConfig, str]:
    return base.build_config(LCMConfig, PRESETS, teacher, preset, *layers)


class LCMDistillation(EMATarget, StudentMethod):
    name = "lcm"
    label = "LCM-LoRA"
    title = "Latent Consistency Distillation (LCM / LCM-LoRA, Luo et al. 2023)"
    config_class = LCMConfig

    def prepare(self) -> None:
        self.grid = skipping_grid(self.schedule, self.config.N)
        self.grid_size = self.config.N

    def default_targets(self) -> list[str]:
        return UNET_ALL_TARGETS if self.family in ("digits", "sd", "sdxl") else super().default_targets()

    def extra_models(self) -> dict:
        if self.config.ema > 0:  # theta-: the student's trainable weights, moved by EMA before each step
            self.target_weights = self.trainable_weights()
        return {}

    @property
    def target_decay(self) -> float:
        return self.config.ema

    def setup(self, device) -> None:
        super().setup(device)
        self.target_to(device)

    # --- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_solve(self, x_t: torch.Tensor, index: torch.Tensor, cond: dict, uncond: dict) -> torch.Tensor:
        """``teacher_steps`` guided DDIM moves along the grid from ``grid[index]`` (per sample);
        samples that reach the grid's end stay at t = 0."""
        model = cfg_model(self.teacher.denoiser, cond, uncond, self.config.guidance)
        x = x_t
        for j in range(self.config.teacher_steps):
            t = next_on_grid(self.grid, index, j).float().to(x.device)
            t_n = next_on_grid(self.grid, index, j + 1).float().to(x.device)
            active = t > t_n
            if not bool(active.any()):
                break
            moved = ddim_move(x, model(x, t), t, t_n, self.schedule)
            x = torch.where(active.view(-1, *[1] * (x.ndim - 1)), moved, x)
        return x

    def target(self, models: dict, x_next: torch.Tensor, t_next: torch.Tensor, cond: dict) -> torch.Tensor:
        """F_theta-(xhat_{t_n}, t_n): the EMA target, or the student itself without gradient."""
        net = unwrap(models["student"])
        with torch.no_grad(), (self.frozen_student(self.target_weights) if self.target_weights is not None else nullcontext()):
            return StudentDenoiser(net, self.schedule)(x_next, t_next, cond)

    def online(self, models: dict, x_t, x_next, t, t_next, cond: dict, generator) -> tuple[torch.Tensor, dict]:
        """F_theta(x_{t_{n+k}}, t_{n+k}), with gradient."""
        return StudentDenoiser(models["student"], self.schedule)(x_t, t, cond), {}

    def step(self, batch: dict, step: int, models: dict, generator: torch.Generator):
        c, sch, dev = self.config, self.schedule, self.device
        self.update_target(models["student"], step)
        x0, cond, uncond = self.inputs(batch, generator)  # latents for VAE teachers
        b = x0.shape[0]
        index = torch.randint(0, c.N, (b,), generator=generator)  # per sample, as LCM
        t = self.grid[index].float().to(dev)
        t_next = next_on_grid(self.grid, index, c.teacher_steps).float().to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        x_t = sch.add_noise(x0, noise, t)
        x_next = self.teacher_solve(x_t, index, cond, uncond)
        target = self.target(models, x_next, t_next, cond)
        pred, logs = self.online(models, x_t, x_next, t, t_next, cond, generator)
        loss, loss_logs = consistency_loss(pred, target, c.loss, c.huber_c)
        return [("student", loss)], {**logs, **loss_logs, "loss": loss.detach(), "t": t.mean()}

    # --- outputs -------------------------------------------------------------------------
    def sampling(self) -> dict:
        ts = {str(n): self._timesteps(lcm_inference_timesteps(self.grid, n)) for n in (1, 2, 4) if n <= self.config.N}
        return {"timesteps": ts, "sampler": "lcm_multistep", "gamma": self.config.sampler_gamma, "guidance": None,
                "boundary": {"sigma_data": 0.5, "timestep_scaling": 10.0}}


Method = LCMDistillation
