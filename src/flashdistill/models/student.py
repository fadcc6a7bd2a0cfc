"""Students: a copy of the teacher backbone with a LoRA (peft, through diffusers' adapter API) or
fully trainable, whose output is the LCM boundary-scaled x0 (Luo et al. 2023):

    x0_student = c_skip(t) * x_t + c_out(t) * x0_pred(x_t, t)

with c_skip/c_out from :func:`flashdistill.core.schedules.lcm_boundary_scalings` (VP schedules;
flow schedules use x0 = x_t - sigma * v unscaled). Sampling is LCM-style multistep: denoise at
each of the student's timesteps and re-noise the x0 to the next one with fresh noise.

A run folder holds ``flashdistill.json`` (kind "student": teacher path, LoRA settings, sampling
timesteps), ``student/`` weights in safetensors and ``scheduler/`` (an LCMScheduler config).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..core.schedules import append_dims, lcm_boundary_scalings, x0_to_eps
from .adapters import forget_layout, lora_layers, lora_root
from .denoiser import Denoiser

LORA_FILE = "student_lora.safetensors"
FULL_DIR = "unet"


class StudentDenoiser(Denoiser):
    """``Denoiser`` whose x0 carries the LCM boundary condition (identity at t = 0)."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        x0 = super().forward(x_t, t, cond)
        if self.schedule.kind == "flow":
            return x0
        c_skip, c_out = lcm_boundary_scalings(t)
        c_skip, c_out = append_dims(c_skip, x0.ndim).float(), append_dims(c_out, x0.ndim).float()
        return c_skip * x_t.float() + c_out * x0


def make_student_backbone(teacher_backbone: nn.Module, full: bool, rank: int, alpha: float | None,
                          targets: list[str]) -> nn.Module:
    """The trainable student on the teacher's backbone.

    - LoRA (``full=False``): a LoRA of ``rank`` on ``targets`` injected *into* ``teacher_backbone``
      in place, which becomes the shared module of teacher and student: the student runs it with
      the adapters on, the teacher (``Denoiser(..., lora=False)``) with them off. Costs the LoRA's
      weights only. Pass :func:`~flashdistill.models.adapters.base_copy` of the backbone for a
      separate one.
    - ``full``: a float32 copy with every weight trainable (it must be a copy).

    LoRA weights are float32 whatever the frozen weights' dtype (diffusers' ``cast_training_params``).
    """
    root = lora_root(teacher_backbone)
    if full:
        if root is not teacher_backbone:
            raise ValueError(f"--full is not supported on a {type(teacher_backbone).__name__} teacher (a ControlNet "
                             "steering a UNet): train a LoRA student")
        return copy.deepcopy(teacher_backbone).float().train().requires_grad_(True)
    from peft import LoraConfig, inject_adapter_in_model

    student = teacher_backbone.requires_grad_(False)
    if lora_layers(student):
        raise ValueError("this backbone already carries a LoRA; pass base_copy(backbone) for a second student")
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n, _ in root.named_modules())]
    if not present:
        raise ValueError(f"none of the LoRA target modules {targets} exist in the backbone")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=present)
    # what diffusers' add_adapter does, for backbones without the PEFT mixin too (PixArt)
    inject_adapter_in_model(config, root, adapter_name="default")
    forget_layout(root)
    forget_layout(student)
    for p in student.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return student.train()


def fourier_features(v: torch.Tensor, dim: int, scale: float = 1000.0, zero_at_origin: bool = True,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """LCM's guidance embedding (diffusers' ``get_guidance_scale_embedding``, the same operations in
    the same order): frequencies ``exp(-log(10000) j / (dim/2 - 1))`` of ``scale * v``, as
    ``[sin, cos]``, computed in ``dtype``. With ``zero_at_origin`` the cosines are shifted to
    ``cos - 1``, so ``v = 0`` embeds to exactly zero (SPLAM's gamma = 1 then adds nothing and the
    branch can be dropped), float32 (B, dim)."""
    if dim < 4 or dim % 2:
        raise ValueError(f"embedding dim must be an even number >= 4, got {dim}")
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0, dtype=dtype)) / (half - 1)))
    arg = (v.to(dtype) * scale)[:, None] * freqs.to(v.device)[None]
    return torch.cat([arg.sin(), arg.cos() - (1.0 if zero_at_origin else 0.0)], dim=1).float()


def guidance_embedding(guidance: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's w-embedding of diffusers' CFG scale ``guidance`` (g, per sample (B,); LCM's w = g - 1):
    what diffusers' pipelines pass as ``timestep_cond`` to a UNet with ``time_cond_proj_dim``
    (``get_guidance_scale_embedding(torch.tensor(guidance_scale - 1))``: w in double precision, then
    float32), bit for bit, so an exported student gives the same numbers in the stock pipeline."""
    w = (torch.as_tensor(guidance, dtype=torch.float64) - 1).reshape(-1).float()
    return fourier_features(w, dim, scale=1000.0, zero_at_origin=False, dtype=torch.float32)


def w_condition(sampling: dict, n: int, guidance: float | None = None, device=None) -> dict:
    """The backbone's ``timestep_cond`` for a student with LCM's w-embedding (``sampling["w_embedding"]``)
    at diffusers' CFG scale ``guidance`` (default: the one the student was exported with), {} for a
    student without one (its guidance was distilled in at one scale)."""
    spec = (sampling or {}).get("w_embedding")
    if not spec:
        return {}
    g = float(spec["guidance"] if guidance is None else guidance)
    lo, hi = spec["range"]
    if not lo <= g <= hi:
        raise ValueError(f"guidance {g:g} is outside the range this student's w-embedding was trained on, "
                         f"[{lo:g}, {hi:g}] (diffusers' guidance_scale)")
    return {"timestep_cond": guidance_embedding(torch.full((n,), g, dtype=torch.float64), int(spec["dim"])).to(device)}


class _Float32Linear(nn.Linear):
    """A trainable float32 layer inside a backbone whose frozen weights may be bf16/fp16: computes
    in float32 and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def add_condition_projection(backbone: nn.Module, dim: int) -> nn.Module:
    """Give a UNet a zero-initialised, trainable ``time_embedding.cond_proj`` (diffusers'
    ``time_cond_proj_dim``): ``timestep_cond`` of shape (B, dim) is projected and added to the
    timestep features. Zero-initialised, the student starts equal to the teacher."""
    emb = getattr(backbone, "time_embedding", None)
    if emb is None or not hasattr(emb, "linear_1"):
        raise ValueError(f"{type(backbone).__name__} has no UNet time embedding to condition (time_embedding.cond_proj)")
    emb.cond_proj = _Float32Linear(dim, emb.linear_1.in_features, bias=False).to(emb.linear_1.weight.device)
    nn.init.zeros_(emb.cond_proj.weight)
    emb.cond_proj.requires_grad_(True)
    forget_layout(backbone)
    return backbone


def fuse_lora(backbone: nn.Module) -> nn.Module:
    """Merge every LoRA into its base layer and put the base layer back in its place (as diffusers'
    ``fuse_lora`` + ``unload_lora``, for any backbone): same outputs, plain modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent) if parent else backbone, child, module.get_base_layer())
    root = lora_root(backbone)
    if "peft_config" in root.__dict__:  # no adapter left (a LoRA stacked later starts clean)
        del root.peft_config
    forget_layout(root)
    forget_layout(backbone)
    return backbone


def count_params(module: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, total


def scheduler_class(config: dict):
    """The diffusers class of a student's few-step scheduler config (LCM, or flow-matching LCM)."""
    import diffusers

    return getattr(diffusers, config.get("_class_name", "LCMScheduler"))


def save_student(out: Path, backbone: nn.Module, meta: dict) -> None:
    from safetensors.torch import save_file

    import os

    out = Path(out)
    (out / "student").mkdir(parents=True, exist_ok=True)
    # the teacher relative to the run too, so that a run moved together with its teacher still loads
    meta = {**meta, "teacher_relative": os.path.relpath(Path(meta["teacher"]).resolve(), out.resolve())}
    if meta["full"]:
        backbone.save_pretrained(out / "student" / FULL_DIR, safe_serialization=True)
    elif meta.get("lora") is not None:  # (PE-CoDi keeps the teacher's UNet: no weights of its own)
        from peft.utils import get_peft_model_state_dict

        state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(lora_root(backbone)).items()}
        save_file(state, str(out / "student" / LORA_FILE))
    scheduler_class(meta["scheduler_config"]).from_config(meta["scheduler_config"]).save_pretrained(out / "scheduler")
    (out / "flashdistill.json").write_text(json.dumps({"kind": "student", **meta}, indent=2))


def lcm_move(x: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, schedule, z: torch.Tensor,
             gamma: float = 1.0) -> torch.Tensor:
    """One move of the few-step student sampler (:func:`lcm_multistep`) from ``x`` at ``t`` to
    ``t_next`` given the student's ``x0``; ``z`` is the fresh noise (unused at ``gamma = 0``)."""
    if gamma == 1.0:
        return schedule.add_noise(x0, z.to(x0), t_next)
    a_i, s_i = (append_dims(f(t.double()), x.ndim) for f in (schedule.alpha, schedule.sigma))
    eps = x0_to_eps(x0.double(), x.double(), a_i, s_i)
    s = torch.floor((1.0 - gamma) * t_next.double())
    x = schedule.add_noise(x0.double(), eps, s)  # the DDIM move to s
    if gamma > 0.0:  # forward noise from s to t_next: x_n = (a_n / a_s) x_s + sqrt(s_n^2 - (a_n s_s / a_s)^2) z
        a_s, s_s = (append_dims(f(s), x.ndim) for f in (schedule.alpha, schedule.sigma))
        a_n, s_n = (append_dims(f(t_next.double()), x.ndim) for f in (schedule.alpha, schedule.sigma))
        ratio = a_n / a_s
        x = ratio * x + (s_n**2 - (ratio * s_s) ** 2).clamp_min(0).sqrt() * z.double()
    return x.to(x0.dtype)


@torch.no_grad()
def lcm_multistep(denoiser, x: torch.Tensor, timesteps: torch.Tensor, cond: dict, schedule,
                  noises: list[torch.Tensor] | None = None, gamma: float = 1.0) -> torch.Tensor:
    """Few-step student sampling: x0 = f(x, t_i), then a move to t_{i+1} whose stochasticity is
    ``gamma`` (TCD, Zheng et al. 2024, the ``eta`` of diffusers' TCDScheduler):

    - ``gamma = 1``: LCM (Luo et al. 2023, Alg. 1), x = add_noise(x0, z, t_{i+1}) with fresh z;
    - ``gamma = 0``: the deterministic DDIM move, x = alpha_{i+1} x0 + sigma_{i+1} eps_hat, with
      eps_hat = (x - alpha_i x0) / sigma_i the noise the student's x0 implies;
    - in between: the DDIM move to s = floor((1 - gamma) t_{i+1}), then forward noise from s to
      t_{i+1} with fresh z.

    ``noises[i]`` is the fresh noise for step i+1 (per-sample seeded by the caller)."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1] (0: deterministic DDIM move, 1: LCM re-noising), got {gamma}")
    x0 = x
    for i, t in enumerate(timesteps):
        b = x.shape[0]
        t_i = t.float().expand(b).to(x.device)
        x0 = denoiser(x, t_i, cond)
        if i + 1 == len(timesteps):
            break
        t_next = timesteps[i + 1].expand(b).to(x.device)
        x = lcm_move(x, x0, t_i, t_next, schedule, noises[i] if noises is not None else torch.randn_like(x0), gamma)
    return x0


def student_timesteps(sampling: dict, steps: int) -> torch.Tensor:
    table = sampling["timesteps"]
    if str(steps) not in table:
        raise ValueError(f"this student samples with {sorted(int(k) for k in table)} steps, got {steps} (or pass "
                         f"{steps} timesteps of your choosing, high to low, with --timesteps)")
    return torch.tensor(table[str(steps)], dtype=torch.float64)


def timestep_tables(timesteps) -> list[list[int]]:
    """``timesteps`` as a list of tables: one list of timesteps, several (one per step count), or a
    {step count: timesteps} dict."""
    if isinstance(timesteps, dict):
        wrong = {k: v for k, v in timesteps.items() if int(k) != len(v)}
        if wrong:
            raise ValueError(f"timesteps: each step count needs that many timesteps, got {wrong}")
        timesteps = list(timesteps.values())
    timesteps = list(timesteps)
    if timesteps and not isinstance(timesteps[0], (list, tuple)):
        timesteps = [timesteps]
    tables = [[int(t) for t in ts] for ts in timesteps]
    counts = [len(ts) for ts in tables]
    if len(set(counts)) != len(counts):
        raise ValueError(f"--timesteps: two tables of {max(counts, key=counts.count)} timesteps ({tables}); give one per "
                         "step count")
    return tables


def with_timesteps(model, timesteps) -> object:
    """``model`` (a student) sampling with ``timesteps`` (high to low) at ``len(timesteps)`` steps
    instead of its own table's entry, or with several such tables (:func:`timestep_tables`); the
    other step counts keep theirs. Any timestep of the schedule is accepted; those the student
    trained at are in its run's ``flashdistill.json``."""
    if model.meta.get("kind") != "student":
        raise ValueError(f"--timesteps: {model.path} is a teacher, which samples with --sampler and --steps; "
                         "timesteps are for distilled students")
    table, stages = dict(model.sampling.get("timesteps", {})), model.meta.get("stages") or {}
    top = model.schedule.num_train_timesteps - (model.schedule.kind == "vp")
    for ts in timestep_tables(timesteps):
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] > top:
            raise ValueError(f"--timesteps must be integers from high to low in [0, {top}], got {ts}")
        n = len(ts)
        if str(n) in stages and str(n) not in table:
            raise ValueError(f"--timesteps {' '.join(map(str, ts))}: this run's {n}-step student is a stage of its "
                             f"own ({stages[str(n)]}), trained for its timesteps; it samples at those only")
        table[str(n)] = ts
    model.sampling = {**model.sampling, "timesteps": table}
    return model


@torch.no_grad()
def sample_student(model, prompts: list[str], seeds: list[int], steps: int, batch_size: int = 256,
                   condition: dict | None = None, guidance: float | None = None) -> torch.Tensor:
    """Per-sample seeded: sample i's initial and re-noising noise all come from seed_i's generator.
    ``condition``: a conditional model's spatial condition, one item per prompt. ``guidance``: the
    CFG scale a student with a w-embedding (full LCM) is told (default: its own); students without
    one ignore it (no CFG at sampling)."""
    from ..tasks import index

    ts = student_timesteps(model.sampling, steps)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i: i + batch_size], seeds[i: i + batch_size]
        spatial = model.spatial(index(condition, slice(i, i + batch_size)), len(p), torch.Generator().manual_seed(int(s[0]) + 7919))
        gens = [torch.Generator().manual_seed(int(k)) for k in s]
        draws = [torch.stack([torch.randn(model.image_shape, generator=g) for g in gens]) for _ in range(len(ts))]
        x = draws[0].to(model.device)
        cond = {**model.cond(p, spatial), **w_condition(model.sampling, len(p), guidance, model.device)}
        out.append(lcm_multistep(model.denoiser, x, ts, cond, model.schedule, draws[1:],
                                 gamma=model.sampling.get("gamma", 1.0)).cpu())
    return torch.cat(out)
