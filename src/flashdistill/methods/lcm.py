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

The two variants:

- **LCM-LoRA** (a LoRA student, the default): a fixed w, no EMA target (the LoRA authors' choice,
  luosiallen/latent-consistency-model #40; diffusers' LoRA script samples w in [5, 15] without
  telling the student, which then learns an average guidance);
- **full LCM** (``full=true``): an EMA target theta- (mu = 0.95) and the **w-embedding**: the
  teacher's scale is drawn per sample, g ~ U[``guidance_range``], and the student is told it, as
  diffusers' ``time_cond_proj_dim``: ``timestep_cond = get_guidance_scale_embedding(g - 1)`` through
  ``time_embedding.cond_proj`` into the time embedding. Departure, on purpose: the projection
  starts at zero (diffusers' script leaves it randomly initialised, so its student starts away
  from the teacher; notes, LCM pitfall 3). ``guidance`` is then the scale the student samples with
  by default, and any scale in the range can be asked for at sampling; the exported UNet carries
  ``time_cond_proj_dim``, so diffusers' SD/SDXL pipelines embed ``guidance_scale`` themselves
  (and skip CFG).

``teacher_steps`` > 1 (several DDIM sub-steps per skip, SPLAM's multiple estimation) is an option,
1 is LCM.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field as dc_field
from typing import Literal

import torch

from ..config import field
from ..core.solvers import cfg_model, ddim_move
from ..core.timesteps import next_on_grid, skipping_grid
from ..losses import consistency_loss
from ..models.student import StudentDenoiser, add_condition_projection, guidance_embedding, w_condition
from ..train import TrainConfig
from . import base
from .base import UNET_ALL_TARGETS, EMATarget, GridSampler, GridSamplerConfig, StudentMethod, unwrap


def _lcm_train_defaults() -> TrainConfig:
    return TrainConfig(steps=4000, batch_size=12, checkpoint_every=1000, sample_every=1000)


@dataclass
class LCMConfig(GridSamplerConfig):
    N: int = field(50, "points of the skipping-step grid (LCMScheduler's original_inference_steps); skip k = T // N")
    guidance: float = field(8.5, "teacher CFG scale g inside the ODE step (diffusers form, 1 = none; LCM's w = g - 1); "
                                 "with w_mode=embedded, the scale the student samples with by default")
    teacher_steps: int = field(1, "teacher DDIM sub-steps per skip (SPLAM's multiple estimation k / k_phi; 1 = LCM)")
    loss: Literal["l2", "huber"] = field("huber", "consistency distance: l2, or pseudo-Huber (diffusers' LCM README)")
    huber_c: float = field(0.001, "pseudo-Huber c")
    target_ema: float = field(-1.0, "EMA decay of the target network theta- (-1: 0.95 for full students, none for a "
                                    "LoRA; 0: the student itself without gradient, as LCM-LoRA)")
    lr: float = field(1e-4, "AdamW learning rate of the student (diffusers' LCM-LoRA README: 1e-4)")
    w_mode: Literal["auto", "fixed", "embedded"] = field(
        "auto", "the teacher's CFG scale: fixed (guidance, distilled in, as LCM-LoRA) or embedded (LCM's "
                "w-embedding: drawn per sample from guidance_range and told to the student, which samples at any "
                "scale in it, guidance by default). auto: embedded for full students (the full LCM), else fixed")
    w_embedding_dim: int = field(256, "size of the w-embedding (diffusers' time_cond_proj_dim; LCM: 256)")
    guidance_range: list[float] = field([6.0, 16.0], "with the w-embedding: the teacher's CFG scales g ~ U[lo, hi] "
                                                     "(diffusers form; LCM's w in [5, 15])")
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
        if self.w_mode == "embedded" and not self.full:
            raise ValueError("w_mode=embedded needs full=true: the w-embedding is a new layer of the UNet "
                             "(time_cond_proj_dim), which a LoRA file does not carry")
        if self.w_embedding_dim < 4 or self.w_embedding_dim % 2:
            raise ValueError(f"w_embedding_dim must be an even number >= 4, got {self.w_embedding_dim}")
        lo_hi = self.guidance_range
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"guidance_range must be [lo, hi] with 0 <= lo <= hi, got {lo_hi}")

    @property
    def ema(self) -> float:
        return (0.95 if self.full else 0.0) if self.target_ema == -1.0 else self.target_ema


PRESETS = {
    # full_lr: diffusers' LCM README trains the full SD1.5 and SDXL students at 1e-6 (the LoRA at 1e-4)
    "sd": {"full_lr": 1e-6},
    "sdxl": {"lr": 1e-4, "full_lr": 1e-6},
    "pixart": {},
    "sd3": {},
    # The built-in teacher: its own CFG (1.5); rank 8 on all conv and linear layers; lr 10x SD's
    # (notes: a 0.9M UNet at batch 16 learns faster); the same 340 steps as Flash's digits preset.
    # guidance_range (the w-embedding of full students): the teacher's useful scales (notes: g in
    # [1, 3], LCM's w in [0, 2]) around its own 1.5. full_lr: the LoRA's 1e-3 on a full student gives
    # FD 42.5 / 19.9 / 12.5 at 1 / 2 / 4 steps against 38.0 / 15.8 / 9.5 at 2e-4 (fixed w, 340 steps)
    "digits": {"lora_rank": 8, "lr": 1e-3, "full_lr": 2e-4, "guidance": 1.5, "guidance_range": [1.0, 3.0],
               "train": {"steps": 340, "batch_size": 16, "checkpoint_every": 100, "sample_every": 100, "ema_decay": 0.99}},
}


def build_config(teacher, preset: str = "auto", *layers: dict) -> tuple[LCMConfig, str]:
    return base.build_config(LCMConfig, PRESETS, teacher, preset, *layers)


class LCMDistillation(GridSampler, EMATarget, StudentMethod):
    name = "lcm"
    label = "LCM-LoRA"
    title = "Latent Consistency Distillation (LCM / LCM-LoRA, Luo et al. 2023)"
    config_class = LCMConfig

    def prepare(self) -> None:
        self.grid = skipping_grid(self.schedule, self.config.N)
        self.grid_size = self.config.N
        self.check_sampler_timesteps()
        self.w_embed = self.uses_w_embedding()
        lo, hi = self.config.guidance_range
        if self.w_embed and not lo <= self.config.guidance <= hi:
            raise ValueError(f"guidance {self.config.guidance:g} (the scale the student samples with by default) "
                             f"must lie in guidance_range [{lo:g}, {hi:g}]")

    def uses_w_embedding(self) -> bool:
        """``w_mode`` resolved (True: embedded): embedded for full students (auto) on backbones where diffusers' pipeline
        embeds guidance_scale itself (a UNet time embedding; not the x4 upscaler, whose __call__
        passes no timestep_cond); a one-line ValueError where ``embedded`` cannot apply."""
        c = self.config
        why = None
        if self.family in ("pixart", "sd3"):
            why = f"{self.family} transformers have no UNet time embedding (time_cond_proj_dim)"
        elif self.teacher.meta.get("pipeline") == "StableDiffusionUpscalePipeline":
            why = "StableDiffusionUpscalePipeline passes no timestep_cond, so an export could not be told the scale"
        if c.w_mode == "embedded" and why:
            raise ValueError(f"w_mode=embedded: {why}; use w_mode=fixed (a fixed scale)")
        return why is None and (c.w_mode == "embedded" or (c.w_mode == "auto" and c.full))

    def make_student(self) -> torch.nn.Module:
        student = super().make_student()
        if self.w_embed:  # a zero projection: the student starts equal to the teacher at every w
            add_condition_projection(student, self.config.w_embedding_dim)
            student.register_to_config(time_cond_proj_dim=self.config.w_embedding_dim)  # kept by save/from_pretrained
        return student

    def draw_guidance(self, n: int, generator: torch.Generator) -> tuple[float | torch.Tensor, dict]:
        """The teacher's CFG scale for a batch and what the student is told of it: the fixed
        ``guidance`` and nothing, or, with the w-embedding, g ~ U[guidance_range] per sample (B,)
        and its ``timestep_cond``."""
        c = self.config
        if not self.w_embed:
            return c.guidance, {}
        lo, hi = c.guidance_range
        g = (lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)).float()  # the teacher's and the told
        return g.to(self.device), {"timestep_cond": guidance_embedding(g, c.w_embedding_dim).to(self.device)}

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
    def teacher_solve(self, x_t: torch.Tensor, index: torch.Tensor, cond: dict, uncond: dict,
                      guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """``teacher_steps`` guided DDIM moves along the grid from ``grid[index]`` (per sample), at
        CFG scale ``guidance`` (a float or per sample (B,); default the config's); samples that
        reach the grid's end stay at t = 0."""
        model = cfg_model(self.teacher.denoiser, cond, uncond, self.config.guidance if guidance is None else guidance)
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
        g, told = self.draw_guidance(b, generator)
        x_next = self.teacher_solve(x_t, index, cond, uncond, g)
        cond = {**cond, **told}  # the student's (and its target's) cond: the w-embedding joins
        target = self.target(models, x_next, t_next, cond)
        pred, logs = self.online(models, x_t, x_next, t, t_next, cond, generator)
        loss, loss_logs = consistency_loss(pred, target, c.loss, c.huber_c)
        if self.w_embed:
            logs["guidance"] = g.mean()
        return [("student", loss)], {**logs, **loss_logs, "loss": loss.detach(), "t": t.mean()}

    # --- outputs -------------------------------------------------------------------------
    def preview_cond(self, prompts: list[str]) -> tuple[dict, list[torch.Tensor]]:
        cond, rows = super().preview_cond(prompts)
        return {**cond, **w_condition(self.sampling(), len(prompts), device=self.device)}, rows

    def sampling(self) -> dict:
        c = self.config
        told = {"w_embedding": {"dim": c.w_embedding_dim, "guidance": c.guidance, "range": list(c.guidance_range)}} \
            if self.w_embed else {}
        return {"timesteps": self.grid_timesteps(), "sampler": "lcm_multistep", "gamma": c.sampler_gamma, "guidance": None,
                "boundary": {"sigma_data": 0.5, "timestep_scaling": 10.0}, **told}


Method = LCMDistillation
