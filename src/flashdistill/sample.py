"""Generation with per-sample seeds: image i starts from ``randn(seed_i)``, so it does not depend
on the batch size or on which other images are generated. Teachers sample with a training-free
solver and CFG; students (see :mod:`flashdistill.models.student`) with their own few-step sampler."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .core.solvers import cfg_model, get_sampler


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def teacher_timesteps(schedule, steps: int, spacing: str = "trailing") -> torch.Tensor:
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if schedule.kind == "flow":
        return schedule.timesteps(steps)
    return schedule.timesteps(steps, spacing)


@torch.no_grad()
def sample_teacher(model, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                   sampler: str = "dpmpp_2m", spacing: str = "trailing", batch_size: int = 256,
                   progress: bool = False, condition: dict | None = None,
                   guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Teacher samples in [-1, 1] (not clamped), float32 (N, C, H, W). ``condition``: a conditional
    teacher's spatial condition, one item per prompt, in both CFG branches. ``guidance_interval``:
    CFG only at timesteps in [lo, hi] (:func:`~flashdistill.core.solvers.cfg_model`)."""
    from .tasks import index

    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    solve = get_sampler(sampler)
    ts = teacher_timesteps(model.schedule, steps, spacing)
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc=f"teacher {sampler} {steps} steps", leave=False):
        p, s = prompts[i: i + batch_size], seeds[i: i + batch_size]
        x = seeded_noise(model.image_shape, s).to(model.device)
        spatial = model.spatial(index(condition, slice(i, i + batch_size)), len(p), torch.Generator().manual_seed(int(s[0]) + 7919))
        m = cfg_model(model.denoiser, model.cond(p, spatial), model.uncond(len(p), spatial), guidance,
                      interval=guidance_interval)
        out.append(solve(m, x, ts, model.schedule).cpu())
    return torch.cat(out)


def stage_model(model, steps: int):
    """Runs that keep one student per step count (SDXL-Lightning's stages, ``meta["stages"]``):
    the stage that samples with ``steps``, loaded once and kept on ``model``; other models as is."""
    stages = model.meta.get("stages")
    if not stages or str(steps) not in stages or str(steps) in (model.sampling or {}).get("timesteps", {}):
        return model
    cache = model.__dict__.setdefault("_stage_models", {})
    if steps not in cache:
        from .models.loading import load_model

        cache[steps] = load_model(Path(model.path) / stages[str(steps)], device=model.device, teacher=model.meta["teacher"])
    return cache[steps]


@torch.no_grad()
def sample(model, prompts: list[str], seeds: list[int], steps: int, guidance: float | None = None,
           sampler: str | None = None, batch_size: int = 256, progress: bool = False,
           decode: bool = True, condition: dict | None = None,
           guidance_interval: tuple[float, float] | None = None) -> torch.Tensor:
    """Samples from a teacher (solver + CFG at ``guidance``, only at timesteps in
    ``guidance_interval`` = (lo, hi) when given) or a student run (its own few-step
    sampler, no CFG; a full LCM student with a w-embedding is told ``guidance`` instead); images in [-1, 1] (latent models: decoded by the VAE unless ``decode=False``). Conditional models
    (inpaint, sr, sketch) take ``condition``, a dict of tensors with one item per prompt (see
    :mod:`flashdistill.tasks`)."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if model.meta.get("kind") == "student":
        from .models.student import sample_student

        model = stage_model(model, steps)
        ignored = []
        if guidance is not None and not model.sampling.get("w_embedding"):
            ignored.append(f"guidance {guidance:g} ignored: this student runs no CFG (its guidance was distilled "
                           f"in); only teachers and w-embedded full LCM students take a guidance scale")
        if sampler is not None:
            ignored.append(f"sampler {sampler!r} ignored: a student samples with its own few-step sampler")
        if guidance_interval is not None:
            ignored.append(f"guidance interval {list(guidance_interval)} ignored: this student runs no CFG")
        if ignored:
            warnings.warn("; ".join(ignored), UserWarning, stacklevel=2)
        x = sample_student(model, prompts, seeds, steps, batch_size=batch_size, condition=condition, guidance=guidance)
    else:
        x = sample_teacher(model, prompts, seeds, steps, model.default_guidance if guidance is None else guidance,
                           sampler or "dpmpp_2m", batch_size=batch_size, progress=progress, condition=condition,
                           guidance_interval=guidance_interval)
    return model.decode(x.to(model.device)).cpu() if decode else x
