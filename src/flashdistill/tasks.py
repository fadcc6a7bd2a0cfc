"""Conditional tasks of the built-in digits teachers: what the spatial condition is, how it reaches
the backbone, and how a task's own consistency is measured.

A *condition* is a dict of batched tensors in image space, made from ground-truth images for
training and evaluation (:meth:`Task.make`) or given by a user (``sample --image/--mask/--sketch``).
:meth:`Task.kwargs` turns it into the backbone's keyword arguments, which join the prompt's in the
``cond`` dict of :class:`~flashdistill.models.denoiser.Denoiser` and are identical in both CFG
branches (guidance acts on the prompt only, as in diffusers' inpaint, upscale and adapter
pipelines):

- ``inpaint``: ``concat = [mask, masked image]`` joined to x_t along channels after it (diffusers'
  9-channel inpainting UNet: ``[x_t, mask, masked_image_latents]``); mask 1 = repaint, masked pixels
  set to 0 (mid grey in [-1, 1]) as diffusers' ``image * (mask < 0.5)``;
- ``sr``: x2 from 4x4 (2x2 average pooling); ``concat = nearest-upsampled low-res`` and
  ``class_labels = noise_level``: the low-res is noise-augmented at ``noise_level`` with linear betas
  1e-4..0.02 over 1,000 steps, as the x4 upscaler's ``low_res_scheduler`` does. On a latent model
  (``StableDiffusionUpscalePipeline``, x``vae_scale_factor``) the noised low-res RGB image itself, at
  the latents' size, is ``concat``, noised at every level, 0 included, as that pipeline does;
- ``sketch``: a binarised stroke map (pixel > mid grey; Sobel edges carry no information on 8x8
  digits) through a frozen diffusers ``T2IAdapter``, whose features go in as
  ``down_intrablock_additional_residuals`` (computed once, cloned at every call by the denoiser,
  because the UNet pops from that list).

This module imports no model code: the adapter module is passed in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("t2i", "inpaint", "sr", "sketch")
RESIDUALS = "down_intrablock_additional_residuals"
CONCAT = "concat"
CONTROL = "controlnet_cond"  # CoDi: the condition image of a ControlNet


def _to01(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(-1, 1) + 1) / 2


class Task:
    """Text-to-image: no spatial condition."""

    name = "t2i"
    extra_channels = 0  # channels of ``concat``
    class_embeds = 0  # size of the backbone's class embedding (sr: noise levels)
    keys: tuple[str, ...] = ()  # the condition's tensors
    inputs: tuple[str, ...] = ()  # what a user gives (sample --image / --mask / --sketch)
    metric_names: tuple[str, ...] = ()

    def make(self, images: torch.Tensor, generator: torch.Generator, train: bool = True) -> dict:
        return {}

    def kwargs(self, condition: dict, adapter=None, scale: float = 1.0, generator: torch.Generator | None = None,
               encode=None) -> dict:
        """The backbone's keyword arguments for ``condition`` (image space). ``encode(images,
        generator)``: a latent model's VAE encoder, for tasks whose condition enters as latents."""
        return {}

    def control(self, condition: dict) -> torch.Tensor:
        """The condition as one image for a ControlNet (CoDi's conditional encoder), (N, C, H, W)."""
        raise ValueError("a text-to-image task has no condition image")

    def show(self, condition: dict) -> torch.Tensor:
        """The condition drawn as (N, 1, H, W) images in [-1, 1] (a grid's first row)."""
        raise ValueError("a text-to-image model has no condition to show")

    def metrics(self, images: torch.Tensor, condition: dict, truth: torch.Tensor) -> dict:
        return {}

    def retrieve(self, condition: dict, pool: torch.Tensor) -> torch.Tensor:
        raise ValueError("nearest-neighbour retrieval needs a conditional task")

    def check(self, condition: dict | None, n: int) -> dict:
        """``condition`` for ``n`` samples, or a ValueError naming what is missing or extra."""
        if not self.keys:
            if condition:
                raise ValueError(f"this is a text-to-image model; it takes no condition (got {sorted(condition)})")
            return {}
        if not condition or set(condition) != set(self.keys):
            raise ValueError(f"this is {article(self.name)} {self.name!r} model: it needs the condition {list(self.keys)}, got "
                             f"{sorted(condition or {})} (sample {' '.join(f'--{k} FILE' for k in self.inputs)})")
        for k, v in condition.items():
            if v.shape[0] != n:
                raise ValueError(f"condition {k!r} holds {v.shape[0]} items for {n} prompts")
        return condition


def _boxes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 1, size, size) masks, each one box at a random place (1 = repaint), of sides between a
    quarter and five eighths of the image (2 to 5 px on 8x8 digits)."""
    low = max(1, round(size / 4))
    high = max(low, round(5 * size / 8))
    hw = torch.randint(low, high + 1, (n, 2), generator=generator)
    y0 = (torch.rand(n, generator=generator) * (size - hw[:, 0] + 1)).long()
    x0 = (torch.rand(n, generator=generator) * (size - hw[:, 1] + 1)).long()
    r = torch.arange(size)
    rows = (r[None] >= y0[:, None]) & (r[None] < (y0 + hw[:, 0])[:, None])
    cols = (r[None] >= x0[:, None]) & (r[None] < (x0 + hw[:, 1])[:, None])
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]


class Inpaint(Task):
    name = "inpaint"
    extra_channels = 2
    keys = ("mask", "image")
    inputs = ("image", "mask")
    metric_names = ("unmasked_mse", "masked_mse")
    full_mask_p = 0.1  # training: the whole image masked (plain generation), as diffusers' mask_full_image

    def make(self, images, generator, train=True):
        n, size = images.shape[0], images.shape[-1]
        mask = _boxes(n, size, generator)
        if train:
            full = torch.rand(n, generator=generator) < self.full_mask_p
            mask[full] = 1.0
        return {"mask": mask, "image": images.float()}

    def kwargs(self, condition, adapter=None, scale=1.0, generator=None, encode=None):
        """Pixel models: ``[mask, masked image]``. Latent models (diffusers' 9-channel inpainting
        UNet, as ``StableDiffusionInpaintPipeline.prepare_mask_latents``): the masked image through
        the VAE (sampled with ``generator``) and the mask resized to the latents (nearest)."""
        mask = (condition["mask"] > 0.5).float()
        masked = condition["image"].float() * (1 - mask)
        if encode is None:
            return {CONCAT: torch.cat([mask, masked], 1)}
        latents = encode(masked, generator)
        mask = F.interpolate(mask, size=tuple(latents.shape[-2:])).to(latents)
        return {CONCAT: torch.cat([mask, latents], 1)}

    def control(self, condition):
        return self.kwargs(condition)[CONCAT]

    def show(self, condition):
        mask = (condition["mask"] > 0.5).float()
        return condition["image"].float() * (1 - mask) - mask  # the repaint region black

    def metrics(self, images, condition, truth):
        """MSE in [0, 1] of the raw output against the truth, outside (must be kept) and inside the mask."""
        mask = (condition["mask"] > 0.5).float().to(images.device)
        err = (_to01(images) - _to01(truth.to(images.device))) ** 2
        keep = (1 - mask).sum((1, 2, 3)).clamp(min=1)
        fill = mask.sum((1, 2, 3)).clamp(min=1)
        return {"unmasked_mse": float(((err * (1 - mask)).sum((1, 2, 3)) / keep).mean()),
                "masked_mse": float(((err * mask).sum((1, 2, 3)) / fill).mean())}

    def retrieve(self, condition, pool):
        """The pool image closest on the kept pixels, pasted into the repaint region."""
        mask = (condition["mask"] > 0.5).float()
        keep = (1 - mask).flatten(1)
        x = condition["image"].float().flatten(1)
        p = pool.float().flatten(1)
        # sum_j keep_j (x_j - p_j)^2 without the (N, M, D) tensor
        d = (keep * x * x).sum(1, keepdim=True) - 2 * (keep * x) @ p.T + keep @ (p * p).T
        best = pool[d.argmin(1)].float()
        return condition["image"].float() * (1 - mask) + best * mask


def low_res_schedule():
    """diffusers' x4 upscaler noise-augments its low-res input with DDPMScheduler(linear, 1e-4..0.02)."""
    from .core.schedules import VPSchedule

    return VPSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


class SuperResolution(Task):
    name = "sr"
    extra_channels = 1
    class_embeds = 1000  # as diffusers' upscaler UNet (num_class_embeds=1000, class_labels = noise_level)
    keys = ("low_res", "noise_level")
    inputs = ("image",)
    metric_names = ("consistency", "psnr")
    max_noise_level = 250  # training: half the batch at 0, the rest U{1..max}
    noise_p = 0.5

    def __init__(self, factor: int = 2):
        self.factor = int(factor)

    def make(self, images, generator, train=True):
        n = images.shape[0]
        low = F.avg_pool2d(images.float(), self.factor)
        level = torch.zeros(n, dtype=torch.long)
        if train:
            on = torch.rand(n, generator=generator) < self.noise_p
            level = torch.where(on, torch.randint(1, self.max_noise_level + 1, (n,), generator=generator), level)
        return {"low_res": low, "noise_level": level}

    def kwargs(self, condition, adapter=None, scale=1.0, generator=None, encode=None):
        """Pixel models: the nearest-upsampled low-res, noised where the level is > 0. Latent models
        (``StableDiffusionUpscalePipeline``): the low-res as it is (its size is the latents'),
        always noised (the pipeline's ``low_res_scheduler.add_noise``, one draw from ``generator``)."""
        low = condition["low_res"].float()
        level = condition["noise_level"].long().to(low.device)
        if encode is not None:
            noise = torch.randn(low.shape, generator=generator).to(low.device)
            return {CONCAT: low_res_schedule().add_noise(low, noise, level.clamp(0, 999).float()), "class_labels": level}
        if bool((level > 0).any()):
            noise = torch.randn(low.shape, generator=generator).to(low.device)
            noised = low_res_schedule().add_noise(low, noise, level.clamp(0, 999).float())
            low = torch.where(level.view(-1, 1, 1, 1) > 0, noised, low)
        return {CONCAT: F.interpolate(low, scale_factor=self.factor, mode="nearest"), "class_labels": level}

    def control(self, condition):
        """The clean low-res, nearest-upsampled (CoDi's SR takes no noise level)."""
        return self.show(condition)

    def show(self, condition):
        return F.interpolate(condition["low_res"].float(), scale_factor=self.factor, mode="nearest")

    def metrics(self, images, condition, truth):
        """Consistency: MSE in [0, 1] of the downsampled output against the clean low-res; PSNR (dB)
        against the ground truth."""
        out = _to01(images)
        low = _to01(condition["low_res"].to(images.device))
        cons = float(((F.avg_pool2d(out, self.factor) - low) ** 2).flatten(1).mean(1).mean())
        mse = ((out - _to01(truth.to(images.device))) ** 2).flatten(1).mean(1).clamp(min=1e-10)
        return {"consistency": cons, "psnr": float((10 * torch.log10(1 / mse)).mean())}

    def retrieve(self, condition, pool):
        low = condition["low_res"].float().flatten(1)
        p = F.avg_pool2d(pool.float(), self.factor).flatten(1)
        return pool[torch.cdist(low, p).argmin(1)].float()


def strokes(images: torch.Tensor) -> torch.Tensor:
    """The binarised stroke map (1 where a pixel is brighter than mid grey; RGB: its channel mean),
    (N, 1, H, W) float."""
    return (images.float().mean(1, keepdim=True) > 0).float()


class Sketch(Task):
    name = "sketch"
    keys = ("sketch",)
    inputs = ("sketch",)
    metric_names = ("stroke_f1",)

    def make(self, images, generator, train=True):
        return {"sketch": strokes(images)}

    def kwargs(self, condition, adapter=None, scale=1.0, generator=None, encode=None):
        """The adapter's features times ``scale`` (``StableDiffusionAdapterPipeline``'s
        ``adapter_conditioning_scale``), one per UNet down block."""
        if adapter is None:
            raise ValueError("a sketch model needs its T2I-Adapter (adapter/ in the teacher folder)")
        feats = adapter(condition["sketch"].float().to(next(adapter.parameters()).dtype))
        return {RESIDUALS: [f * scale for f in feats]}

    def control(self, condition):
        return condition["sketch"].float()

    def show(self, condition):
        return condition["sketch"].float() * 2 - 1

    def metrics(self, images, condition, truth):
        """Stroke F1 between the output's stroke map and the sketch, per sample, averaged."""
        a = strokes(images).flatten(1)
        b = condition["sketch"].float().to(images.device).flatten(1)
        tp = (a * b).sum(1)
        f1 = 2 * tp / (a.sum(1) + b.sum(1)).clamp(min=1)
        return {"stroke_f1": float(f1.mean())}

    def retrieve(self, condition, pool):
        s = condition["sketch"].float().flatten(1)
        p = strokes(pool).flatten(1)
        return pool[torch.cdist(s, p, p=1).argmin(1)].float()


_TASKS = {"t2i": Task(), "inpaint": Inpaint(), "sr": SuperResolution(), "sketch": Sketch()}


TASK_METRICS = tuple(m for t in _TASKS.values() for m in t.metric_names)


def get_task(name: str | None, factor: int | None = None) -> Task:
    """A task by name (``None``: text-to-image); unknown names raise a ValueError listing the valid ones.
    ``factor``: sr's upscaling factor (2 for the built-in teachers; an upscale pipeline's VAE factor)."""
    name = name or "t2i"
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASKS)}")
    if name == "sr" and factor not in (None, _TASKS["sr"].factor):
        return SuperResolution(factor)
    return _TASKS[name]


def preview_condition(task: Task, n: int = 10, shape: tuple[int, ...] = (1, 8, 8)) -> dict:
    """The condition of the first test digit of each class, cycled to ``n`` items (fixed seed):
    what every preview grid of a conditional model shows. Models of other image ``shape``s (real
    pipelines) get the condition of a mid-grey image."""
    from .data.digits import first_of_each_class

    images, _ = first_of_each_class("test")
    if tuple(shape) != tuple(images.shape[1:]):
        images = torch.zeros(1, *shape)
    return task.make(images[torch.arange(n) % len(images)], torch.Generator().manual_seed(0), train=False)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def index(condition: dict | None, sl) -> dict | None:
    """The condition of a slice of the batch."""
    return None if condition is None else {k: v[sl] for k, v in condition.items()}
