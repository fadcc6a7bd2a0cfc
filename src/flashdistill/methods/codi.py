"""CoDi: conditional diffusion distillation (Mei et al., CVPR 2024). From a plain text-to-image
teacher, learn a conditional task (``task``: inpaint, sr, sketch) and few-step sampling at once.

- Conditional adaptation (Eq. 12): a conditional encoder copied from the teacher's encoder and mid
  block, joined to the frozen UNet's skip connections through zero-initialised convolutions (a
  diffusers ``ControlNetModel.from_unet``, as the public code does), so at step 0 the adapted model
  is the teacher.
- Conditional consistency (Eq. 13-15): with one t per batch on the N-point grid and s = t - T/N,
  ``z_t = a_t x + s_t eps``; the ODE step of the *adapted* model with its EMA weights and the true
  noise, ``zhat_s = a_s xhat(z_t, t, c) + s_s eps`` (Eq. 14); then
  ``L = d_eps(F_eps^-(zhat_s, s, c), F_eps(z_t, t, c)) + beta * d_x(x, F_x(z_t, t, c))`` (Eq. 15), where F
  are LCM boundary-scaled predictions and ^- marks the EMA target.
- CoDi trains the adapter and the UNet (here a LoRA of it, or ``full``); PE-CoDi (``pe``) only the adapter.

Where the public JAX code departs from the paper, a flag chooses and the default follows the paper:
``ode_eps`` (true: Eq. 14; model: the code's default DDIM step with the model's eps),
``consistency`` (eps: Eq. 15's noise space; x: the code's default), ``ode_weights`` (ema: the adapted
model's EMA; initial: the weights at initialisation, which the code's closure keeps), ``t_per``
(batch: one t per batch, the paper's Sec. 5.2 finding; sample: the code's).
Sampling: the boundary-scaled x at each of the LCM grid's timesteps with the deterministic DDIM move
in between (the public pipeline's update), no CFG.

On SD1.5/2 and SDXL pipeline teachers the condition image stays at the pixels' size and the
ControlNet's conditioning embedding downsamples it to the latents (one stride-2 layer per factor 2
of the VAE, as diffusers' default embedding does for 8x); the student exports as the family's
ControlNet pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Literal

import torch

from ..config import field
from ..core.schedules import append_dims, lcm_boundary_scalings, x0_to_eps
from ..core.solvers import ddim_move
from ..core.timesteps import next_on_grid, skipping_grid
from ..models.controlled import CONTROLNET_DIR, ControlledUNet, controlnet_for
from ..models.denoiser import Denoiser
from ..models.student import save_student
from ..tasks import CONTROL, article, get_task, preview_condition
from ..train import TrainConfig
from . import base
from .base import UNET_ALL_TARGETS, EMATarget, GridSampler, GridSamplerConfig, StudentMethod, unwrap



def _codi_train_defaults() -> TrainConfig:
    return TrainConfig(steps=20000, batch_size=4, checkpoint_every=1000, sample_every=1000)


@dataclass
class CoDiConfig(GridSamplerConfig):
    task: Literal["inpaint", "sr", "sketch"] = field("sr", "the conditional task to learn (its condition from the batch's images)")
    pe: bool = field(False, "PE-CoDi: train only the conditional encoder (the UNet stays the teacher's)")
    N: int = field(50, "points of the timestep grid; s = t - T // N")
    beta: float = field(1.0, "weight of the signal-space guidance d_x(x, F_x) (Eq. 15)")
    guidance_weight: Literal["none", "min_snr", "alpha2"] = field(
        "none", "per-t weight of the signal-space guidance: none (Eq. 15), min(1, SNR(t)) or alpha_bar(t); the "
                "last two fade it out at high noise, where its optimum is the condition's mean image")
    target_ema: float = field(0.999, "EMA decay of the target weights theta- (the public code's default)")
    ode_eps: Literal["true", "model"] = field("true", "noise of the ODE step: the true eps (Eq. 14, paper) or the "
                                                      "model's eps_hat (a DDIM step, the public code's default)")
    consistency: Literal["eps", "x"] = field("eps", "consistency space: noise (Eq. 15, paper) or x (the code's default)")
    ode_weights: Literal["ema", "initial"] = field("ema", "weights of the adapted model in the ODE step: its EMA "
                                                         "(paper) or those at initialisation (the code's closure)")
    t_per: Literal["batch", "sample"] = field("batch", "one t per batch (paper, Sec. 5.2) or per sample (the code)")
    train: TrainConfig = dc_field(default_factory=_codi_train_defaults, metadata={"help": "training loop"})

    def validate(self):
        super().validate()
        if not 2 <= self.N <= 1000:
            raise ValueError(f"N must be in [2, 1000], got {self.N}")
        if not 0.0 <= self.target_ema < 1.0:
            raise ValueError(f"target_ema must be in [0, 1), got {self.target_ema}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


CONTROLNET_PIPELINES = {"sd": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}

PRESETS = {
    "sd": {"lr": 1e-5},
    "sdxl": {"lr": 1e-5},
    # The built-in teacher: EMA 0.99 (the notes' toy settings: 0.99-0.995 for a run of a few thousand
    # steps); the student samples with the deterministic move (sampler_gamma 0). lr 2e-3, not the notes'
    # adapter lr 2e-4..5e-4: at the preset's 600 steps 2e-3 takes the 4-step FD from 4.10 / 4.46 to
    # 3.27 / 3.83 (sketch, two seeds), 3.90 / 4.55 to 3.24 / 3.15 (inpaint), 4.89 / 5.20 to 3.91 / 5.17
    # (sr), and PE-CoDi's sr from 7.64 to 5.42, with every 2-step student, pixel FD and task metric
    # better, at 0.001-0.005 less per-condition diversity and a worse 1-step sr student
    # (docs/conditional.md, "The learning rate").
    # beta = 16, not the paper's 1 (its Eq. 15 weighs the two terms equally; the SD latents it was set on
    # are 4x64x64, these 1x8x8 pixels): the signal-space term is what teaches the condition, and at 600
    # steps 16x of it takes the 4-step FD from 7.76 to 4.08 (inpaint), 7.64 to 4.77 (sr) and 5.61 to
    # 4.15 (sketch), with each task's own metric better too, at about 20% less per-condition diversity
    # and a worse 1-step sketch student (docs/conditional.md, "The signal-space weight").
    # The samplers' timesteps: the student trains at every point of the N-grid, and it samples best with
    # an early large drop and its last calls low, [999, 199] and [999, 399, 199, 99], not LCMScheduler's
    # even picks [999, 499] and [999, 759, 499, 259]: 4-step FD 3.24 / 3.15 -> 1.89 / 2.29 (inpaint, two
    # seeds), 3.91 / 5.17 -> 2.73 / 3.40 (sr), 3.27 / 3.83 -> 2.15 / 2.51 (sketch), pixel FD and
    # per-condition diversity towards the teacher's on every one, at 0.4-1.4 points of adherence (above the
    # teacher's, or within 0.2 point) and a worse sr low-res consistency (docs/conditional.md, "The sampler's
    # timesteps").
    "digits": {"lora_rank": 8, "lr": 2e-3, "target_ema": 0.99, "sampler_gamma": 0.0, "beta": 16.0,
               "two_step_timesteps": [999, 199], "four_step_timesteps": [999, 399, 199, 99],
               "train": {"steps": 600, "batch_size": 32, "checkpoint_every": 200, "sample_every": 200, "ema_decay": 0.99}},
}
# 4x the steps (about 11 min on 2 CPU cores): CoDi learns its condition from scratch, and the budget is
# its limit here (docs/conditional.md: at beta = 1, 4-step FD 7.82 -> 3.28 on inpaint, 5.74 -> 3.82 on
# sketch; at beta = 16, 4.08 -> 1.93 on inpaint, 4.15 -> 2.80 on sketch, 4.77 -> 2.32 on sr, at a
# quarter to a half of the teacher's per-condition diversity).
# It keeps lr 5e-4: at 2,400 steps 2e-3 gives a worse 4-step FD (inpaint 1.93 -> 2.06, sr 2.32 -> 2.56)
# and only the 1-step student and sr's distortion metrics gain (docs/conditional.md, "Smaller batches").
# It samples at LCMScheduler's picks: its longer-trained students score a worse 4-step FD at the digits
# preset's timesteps (inpaint 1.93 -> 2.43, sr 2.32 -> 2.69), though with more per-condition diversity.
PRESETS["digits-long"] = {**PRESETS["digits"], "lr": 5e-4, "two_step_timesteps": [], "four_step_timesteps": [],
                          "train": {**PRESETS["digits"]["train"], "steps": 2400, "checkpoint_every": 600, "sample_every": 600}}


def build_config(teacher, preset: str = "auto", *layers: dict) -> tuple[CoDiConfig, str]:
    return base.build_config(CoDiConfig, PRESETS, teacher, preset, *layers)


class CoDiDistillation(GridSampler, EMATarget, StudentMethod):
    name = "codi"
    label = "CoDi"
    title = "Conditional Diffusion Distillation (CoDi, Mei et al. 2024)"
    config_class = CoDiConfig

    def prepare(self) -> None:
        c = self.config
        if self.teacher.task.keys:
            raise ValueError(f"CoDi learns the condition itself: pass a text-to-image teacher, not "
                             f"{article(self.teacher.task.name)} {self.teacher.task.name!r} one")
        if self.schedule.kind != "vp" or self.family not in ("digits", "sd", "sdxl"):
            raise ValueError(f"CoDi is implemented for VP UNet teachers (the built-in digits teachers, SD1.5/2 and SDXL "
                             f"pipelines), not {self.family}: its conditional encoder is a ControlNet of the UNet")
        self.task = get_task(c.task)
        # the condition image the ControlNet takes, at the pixels' size: its channels (RGB images on
        # pipelines) and how far its conditioning embedding must downsample to the latents
        blank = self.task.make(-torch.ones(1, *self.teacher.pixel_shape), torch.Generator().manual_seed(0), train=False)
        self.control_channels = self.task.control(blank).shape[1]
        self.downscale = self.teacher.pixel_shape[-1] // self.teacher.image_shape[-1]
        self.grid = skipping_grid(self.schedule, c.N)
        self.grid_size = c.N
        self.check_sampler_timesteps()

    def default_targets(self) -> list[str]:
        return UNET_ALL_TARGETS

    def make_student(self) -> torch.nn.Module:
        """The adapted model: the conditional encoder (from the teacher's base weights, before any
        LoRA goes in) steering the UNet, which carries a LoRA (CoDi), is trained whole (``full``), or
        stays the teacher's (PE-CoDi)."""
        teacher_unet = self.teacher.denoiser.backbone
        controlnet = controlnet_for(teacher_unet, self.control_channels, self.downscale).float().requires_grad_(True)
        unet = teacher_unet if self.config.pe else super().make_student()
        return ControlledUNet(unet, controlnet)

    def extra_models(self) -> dict:
        self.initial = self.trainable_weights()  # ode_weights = initial: the public code's ODE step
        self.target_weights = {n: v.clone() for n, v in self.initial.items()}  # theta-
        return {}

    @property
    def target_decay(self) -> float:
        return self.config.target_ema

    def setup(self, device) -> None:
        super().setup(device)
        self.initial = {n: v.to(device) for n, v in self.initial.items()}
        self.target_to(device)

    # --- the step --------------------------------------------------------------------------
    def scaled(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(F_x, F_eps): the LCM boundary scalings applied to the x0 prediction and to the eps it
        implies, ``c_skip(t) x_t + c_out(t) {x0, eps}`` (the public code's definitions)."""
        a, s = (append_dims(f(t.double()), x_t.ndim) for f in (self.schedule.alpha, self.schedule.sigma))
        eps = x0_to_eps(x0, x_t, a, s)
        c_skip, c_out = (append_dims(v, x_t.ndim).float() for v in lcm_boundary_scalings(t))
        return c_skip * x_t + c_out * x0, c_skip * x_t + c_out * eps

    def ode_step(self, student, z_t, t, s, noise, cond) -> torch.Tensor:
        """Eq. 14: ``zhat_s = a_s xhat(z_t, t, c) + s_s eps`` with the adapted model (its EMA, or
        its initial weights) and the true noise; ``ode_eps = model``: the DDIM move with the eps the
        model implies (the public code's default)."""
        c, sch = self.config, self.schedule
        with torch.no_grad(), self.frozen_student(self.target_weights if c.ode_weights == "ema" else self.initial):
            x_hat = Denoiser(unwrap(student), sch)(z_t, t, cond)
        return sch.add_noise(x_hat, noise, s) if c.ode_eps == "true" else ddim_move(z_t, x_hat, t, s, sch)

    def guidance_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The per-sample weight of the signal-space term at ``t`` (``guidance_weight``)."""
        if self.config.guidance_weight == "none":
            return torch.ones_like(t)
        abar = (self.schedule.alpha(t) ** 2).float()
        return abar if self.config.guidance_weight == "alpha2" else (abar / (1 - abar)).clamp(max=1.0)

    def loss(self, fx, feps, fx_target, feps_target, x0, t=None) -> tuple[torch.Tensor, dict]:
        """Eq. 15: consistency in noise space (or x space) plus beta times the signal-space guidance
        (weighted per sample at ``t`` by ``guidance_weight``)."""
        c = self.config
        consistency = ((feps - feps_target) ** 2 if c.consistency == "eps" else (fx - fx_target) ** 2).mean()
        guide = (fx - x0) ** 2
        if t is not None and c.guidance_weight != "none":
            guide = guide * append_dims(self.guidance_weight(t), guide.ndim)
        guide = guide.mean()
        return consistency + c.beta * guide, {"consistency": consistency.detach(), "guidance": guide.detach()}

    def step(self, batch: dict, step: int, models: dict, generator: torch.Generator):
        c, sch, dev = self.config, self.schedule, self.device
        student = models["student"]
        self.update_target(student, step)
        x0, text, _ = self.inputs(batch, generator)
        b = x0.shape[0]
        condition = self.task.make(batch["image"], generator)
        cond = {**text, CONTROL: self.task.control(condition).to(dev)}
        index = torch.randint(0, c.N, (1 if c.t_per == "batch" else b,), generator=generator).expand(b)
        t = self.grid[index].float().to(dev)
        s = next_on_grid(self.grid, index, 1).float().to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        z_t = sch.add_noise(x0, noise, t)
        z_s = self.ode_step(student, z_t, t, s, noise, cond)
        with torch.no_grad(), self.frozen_student(self.target_weights):
            fx_target, feps_target = self.scaled(z_s, Denoiser(unwrap(student), sch)(z_s, s, cond), s)
        fx, feps = self.scaled(z_t, Denoiser(student, sch)(z_t, t, cond), t)
        loss, logs = self.loss(fx, feps, fx_target, feps_target, x0, t)
        return [("student", loss)], {**logs, "loss": loss.detach(), "t": t.mean()}

    # --- outputs -------------------------------------------------------------------------
    def sampling(self) -> dict:
        return {"timesteps": self.grid_timesteps(), "sampler": "lcm_multistep", "gamma": self.config.sampler_gamma, "guidance": None,
                "boundary": {"sigma_data": 0.5, "timestep_scaling": 10.0}}

    def preview_cond(self, prompts: list[str]) -> tuple[dict, list[torch.Tensor]]:
        condition = preview_condition(self.task, len(prompts), self.teacher.pixel_shape)
        shown = self.task.show(condition)  # with the images' channels (RGB on pipelines)
        return ({**self.teacher.cond(prompts), CONTROL: self.task.control(condition).to(self.device)},
                [shown.expand(-1, self.teacher.pixel_shape[0], -1, -1)])

    def run_meta(self, sampling: dict, scheduler_config: dict, **extra) -> dict:
        meta = super().run_meta(sampling, scheduler_config, task=self.task.name, conditioning="controlnet", **extra)
        if "pipeline" in meta:  # a pipeline teacher: the student is its ControlNet pipeline
            meta["pipeline"] = CONTROLNET_PIPELINES[self.family]
        return {**meta, "lora": None} if self.config.pe else meta

    def finalize(self, out_dir, models: dict) -> None:
        out = Path(out_dir)
        student = unwrap(models["student"])
        save_student(out, student.unet, self.run_meta(self.sampling(), self.scheduler_config()))
        student.controlnet.save_pretrained(out / CONTROLNET_DIR, safe_serialization=True)


Method = CoDiDistillation
