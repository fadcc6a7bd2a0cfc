"""SDXL-Lightning (Lin et al. 2024): progressive adversarial distillation. Stage 0 regresses the
student's one step onto ``teacher_steps / stages[0]`` guided DDIM moves of the teacher (MSE,
Eq. 16); each later stage halves the step count, its teacher being the previous stage's student
(no CFG), and trains the student adversarially (non-saturating GAN, Eqs. 18-21) against a
discriminator made of a trainable copy of the teacher's encoder and mid block run on the candidate
``x'`` and on ``x_t`` (Eq. 22), with a head of 4x4 stride-2 convolutions, GroupNorm and SiLU.

    move(x_t, u, t, t') = alpha_t' x(x_t, u, t) + sigma_t' eps(x_t, u, t)      (Eq. 5; core.solvers.ddim_move)

What the paper specifies and this file does: the discriminator is re-initialised at every stage
(``disc_reset = "stage"``; by default also for each stage's unconditional phase, "relax mode
coverage", where D' sees x' only, Eq. 23); pure
noise at t = T (Eq. 24, ``lightning_forward``); the 1- and 2-step students train at t in
{250, 500, 750, 1000}; targets that land on t = 0 are re-noised at t* in {10, 250, 500, 750}
before the discriminator, weighted 1:1:1:1 and later 5:1:1:1 (Eqs. 25-26); the 1-step student
predicts x0 (Eqs. 27-29: ``convert_steps`` of regression onto the eps-teacher's x0 first); in the
unconditional phase of the 1- and 2-step stages D' takes its real samples from the skip-level
teacher, the student two stages up run over the same span (Sec. 3.4, ``skip_level_steps = 2``).
Every stage's student is kept: one run yields an n-step model per stage, and ``sample``,
``evaluate`` and ``export`` pick the stage whose step count is asked for. Sampling is Euler / DDIM
on trailing timesteps without CFG; the export is an ``EulerDiscreteScheduler`` (trailing;
``prediction_type="sample"`` for the 1-step stage).

Unspecified by the paper (no training code was released), chosen here and documented: the
iterations per stage (``stage_steps``), the split between conditional and unconditional phases
(``uncond_fraction``), the point where the t* weights switch (``late_fraction``). Departures: the
unconditional discriminator D' reuses the conditional head with the x_t features zeroed (one head,
so every parameter receives a gradient under DDP) and, by default (``disc_reset = "phase"``), is
re-initialised at its phase's start, where the paper only says "at each stage"; the
student stays a LoRA through every stage (the paper merges it and trains the whole UNet last);
the ``digits`` preset re-noises at t* in {10, 40, 100, 150}, the paper's {10, 250, 500, 750} scaled
to 8x8 images, where t* >= 250 leaves the discriminator little to see.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..config import field
from ..core.schedules import append_dims, lightning_forward
from ..core.solvers import cat_cond, cfg_model, ddim_move
from ..core.timesteps import phase_at
from ..losses import distillation_loss, ns_gan_discriminator_loss, ns_gan_generator_loss
from ..models.adapters import encoder_copy
from ..models.denoiser import Denoiser, X0Denoiser
from ..models.discriminator import DiscriminatorHead
from ..sample import teacher_timesteps
from ..train import TrainConfig
from . import base
from .base import UNET_ALL_TARGETS, StudentConfig, StudentMethod, scaled_count, unwrap

CLEAN = -1.0  # a move's end at the clean sample (alpha = 1, sigma = 0), past the schedule's t = 0


def _lightning_train_defaults() -> TrainConfig:
    return TrainConfig(steps=4000, batch_size=8, checkpoint_every=500, sample_every=500)


@dataclass
class LightningConfig(StudentConfig):
    teacher_steps: int = field(32, "the teacher's DDIM steps, with CFG, that stage 0 regresses onto (paper: 128)")
    stages: list[int] = field([8, 4, 2, 1], "student step count of each stage: stage 0 by MSE, then adversarial "
                                            "stages, each half the previous (paper: 32, 8, 4, 2, 1)")
    stage_steps: list[int] = field([1000, 1000, 1000, 1000], "training steps of each stage (the paper does not say)")
    guidance: float = field(6.0, "teacher CFG scale of stage 0 (diffusers form; paper: 6); later stages use none")
    uncond_fraction: float = field(0.34, "final share of each adversarial stage trained against the "
                                         "unconditional discriminator D' (without x_t)")
    disc_timesteps: list[int] = field([10, 250, 500, 750], "t* at which targets that end at t = 0 are re-noised for the discriminator")
    disc_weights: list[float] = field([1.0, 1.0, 1.0, 1.0], "weights of disc_timesteps at the start of a stage")
    disc_weights_late: list[float] = field([5.0, 1.0, 1.0, 1.0], "weights of disc_timesteps after late_fraction of a stage")
    late_fraction: float = field(0.5, "share of a stage after which disc_weights_late apply")
    skip_level_steps: int = field(2, "students with this many steps or fewer take their unconditional phase's real "
                                     "samples from the skip-level teacher, the student two stages up, run over the "
                                     "same span (paper Sec. 3.4: the 1- and 2-step models); 0: the previous stage's "
                                     "student throughout")
    disc_reset: Literal["phase", "stage"] = field("phase", "re-initialise the discriminator (and its optimizer state) at each "
                                                           "stage's start and its unconditional phase's ('phase'), or at each "
                                                           "stage's start only ('stage', the paper's words)")
    multi_t_steps: int = field(2, "students with this many steps or fewer train at t in multi_t_timesteps")
    multi_t_timesteps: list[int] = field([999, 749, 499, 249], "training timesteps of the 1- and 2-step students (paper: 250..1000)")
    x0_one_step: bool = field(True, "the 1-step student predicts x0 (paper Sec. 3.7.3)")
    convert_steps: int = field(100, "steps of regression onto the eps-teacher's x0 before the 1-step stage's adversarial "
                                    "training (at mse_lr, as stage 0)")
    lr: float = field(1e-6, "AdamW learning rate of the student in the adversarial stages (paper, LoRA: 1e-6)")
    mse_lr: float = field(1e-5, "learning rate of stage 0 (paper: 1e-5)")
    disc_lr: float = field(1e-6, "learning rate of the discriminator (paper: as the student's)")
    adam_betas: list[float] = field([0.0, 0.99], "AdamW betas of the adversarial stages (paper: 0, 0.99; stage 0 uses 0.9, 0.999)")
    train: TrainConfig = dc_field(default_factory=_lightning_train_defaults, metadata={"help": "training loop"})

    def budget_overrides(self, factor: float) -> dict:
        """Each stage's steps scaled (the loop's steps are their sum), and ``convert_steps`` with them."""
        out = super().budget_overrides(factor)
        stages = [scaled_count(n, factor) for n in self.stage_steps]
        out["train"]["steps"] = sum(stages)
        return {**out, "stage_steps": stages,
                "convert_steps": min(scaled_count(self.convert_steps, factor), stages[-1] - 1)}

    def validate(self):
        super().validate()
        s = self.stages
        if not s or any(n < 1 for n in s) or any(a != 2 * b for a, b in zip(s, s[1:])):
            raise ValueError(f"stages must be step counts, each half the previous, got {s}")
        if self.teacher_steps % s[0]:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of stages[0] ({s[0]})")
        if len(self.stage_steps) != len(s) or any(n < 1 for n in self.stage_steps):
            raise ValueError(f"stage_steps needs one positive count per stage ({len(s)}), got {self.stage_steps}")
        if sum(self.stage_steps) != self.train.steps:
            raise ValueError(f"train.steps ({self.train.steps}) must equal sum(stage_steps) = {sum(self.stage_steps)}")
        if not 0.0 <= self.uncond_fraction < 1.0 or not 0.0 <= self.late_fraction <= 1.0:
            raise ValueError(f"uncond_fraction must be in [0, 1) and late_fraction in [0, 1], got {self.uncond_fraction}, {self.late_fraction}")
        if not (len(self.disc_timesteps) == len(self.disc_weights) == len(self.disc_weights_late)) \
                or min(self.disc_weights + self.disc_weights_late) < 0:
            raise ValueError("disc_timesteps, disc_weights and disc_weights_late need the same length and weights >= 0")
        if self.x0_one_step and s[-1] == 1 and self.convert_steps >= self.stage_steps[-1]:
            raise ValueError(f"convert_steps ({self.convert_steps}) must be below the 1-step stage's {self.stage_steps[-1]} steps")
        if self.train.ema_decay > 0:
            raise ValueError("train.ema_decay must be 0 for lightning: an EMA would average students of different stages")
        if self.skip_level_steps < 0:
            raise ValueError(f"skip_level_steps must be >= 0, got {self.skip_level_steps}")
        if self.mse_lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"mse_lr and disc_lr must be > 0, got {self.mse_lr}, {self.disc_lr}")


PRESETS = {
    "sd": {},
    "sdxl": {},
    "pixart": {},
    "sd3": {},
    # The built-in teacher: 32 DDIM steps at its own CFG -> 8 by MSE, then 8 -> 4 -> 2 -> 1
    # adversarially; rates scaled up for a 0.9M UNet and minutes of CPU.
    # The discriminator at 1e-3 (1e-4 left the x0 conversion untrained too: 1-step FD 230), 540
    # steps: about Flash's digits wall time on 2 CPU cores (docs/methods.md). Re-noising at t* in
    # {10, 40, 100, 150}: on 8x8 digits a fresh discriminator finds little at the paper's 500 and 750
    # (held-out accuracy 0.58 / 0.53 against 0.93 at 10, diagnostics --what lightning); two seeds
    # improve at 1, 2 and 4 steps (docs/methods.md).
    "digits": {"guidance": 1.5, "lora_rank": 8, "mse_lr": 2e-3, "lr": 1e-4, "disc_lr": 1e-3,
               "disc_timesteps": [10, 40, 100, 150],
               "stage_steps": [160, 110, 110, 160], "convert_steps": 50,
               "train": {"steps": 540, "batch_size": 16, "checkpoint_every": 100, "sample_every": 0}},
}


def build_config(teacher, preset: str = "auto", *layers: dict) -> tuple[LightningConfig, str]:
    return base.build_config(LightningConfig, PRESETS, teacher, preset, *layers)


class LightningDiscriminator(nn.Module):
    """A trainable copy of the teacher's down blocks and mid block (its up path removed) and a head
    on the channel concatenation of ``d(x', t', c)`` and ``d(x_t, t, c)``; the unconditional D'
    passes zeros for the second half."""

    def __init__(self, teacher_backbone: nn.Module, schedule, cond_one: dict, image_shape):
        super().__init__()
        if getattr(teacher_backbone, "mid_block", None) is None:
            raise ValueError(f"Lightning's discriminator copies a UNet encoder and mid block; {type(teacher_backbone).__name__} has none")
        # the forward stops after the mid block: the copy has no decoder (a ControlNet pair's copy
        # keeps its ControlNet, part of the encoder)
        backbone = encoder_copy(teacher_backbone).float()  # trainable: float32 whatever the teacher's dtype
        self.encoder = Denoiser(backbone.train(), schedule)
        with torch.no_grad():  # the head's input size, from one dry pass
            feats = self.encoder.encoder_features(torch.zeros(1, *image_shape), torch.zeros(1), cond_one)
        self.head = DiscriminatorHead(2 * feats.shape[1], feats.shape[-1])

    def forward(self, x, t, cond: dict, context: tuple | None = None) -> torch.Tensor:
        """Logits for the candidates ``x`` at ``t``. ``context = (x_t, t_in, cond_t)`` (conditional
        D) is encoded once and paired with every group of ``len(x_t)`` candidates; ``None`` is D'."""
        f = self.encoder.encoder_features(x, t, cond)
        if context is None:
            g = torch.zeros_like(f)
        else:
            x_t, t_in, cond_t = context
            g = self.encoder.encoder_features(x_t, t_in, cond_t).repeat(len(x) // len(x_t), 1, 1, 1)
        return self.head(torch.cat([f, g], dim=1))


def advance(t: torch.Tensor, span: float) -> torch.Tensor:
    """The timestep ``span`` training steps below ``t`` on the trailing grids
    (``round(t + 1 - span) - 1``: 999 - 125 = 874, the 8-step grid's second point, and every point
    of the 32-step grid in between), or ``CLEAN`` below 0 (the paper clamps t - ns to 0)."""
    nxt = torch.round(t.double() + 1 - span) - 1
    return torch.where(nxt < 0, torch.full_like(nxt, CLEAN), nxt)


def move_to(x_t, x0, t, t_next, schedule):
    """``ddim_move`` to ``t_next``; samples whose ``t_next`` is ``CLEAN`` land on x0."""
    clean = t_next < 0
    moved = ddim_move(x_t, x0, t, t_next.clamp_min(0), schedule)
    return torch.where(append_dims(clean, x_t.ndim), x0.to(moved.dtype), moved)


class LightningDistillation(StudentMethod):
    name = "lightning"
    label = "SDXL-Lightning"
    title = "SDXL-Lightning, progressive adversarial distillation (Lin et al. 2024)"
    config_class = LightningConfig

    def prepare(self) -> None:
        if self.schedule.kind != "vp":
            raise ValueError("Lightning's move, schedule fix and x0 conversion are written for VP schedules; "
                             "this flow-matching teacher would need their flow form")
        c = self.config
        self.grid_size = c.teacher_steps
        self.T = self.schedule.num_train_timesteps
        self.finished: dict[int, dict] = {}  # stage step count -> trainable weights at the stage's end
        self.current_stage = 0

    def default_targets(self) -> list[str]:
        return UNET_ALL_TARGETS if self.family in ("digits", "sd", "sdxl") else super().default_targets()

    def extra_models(self) -> dict:
        self.disc = LightningDiscriminator(self.teacher.denoiser.backbone, self.schedule, self.blank_uncond(1),
                                           self.teacher.image_shape)
        self.disc_init = {k: v.detach().clone() for k, v in self.disc.state_dict().items()}
        return {"disc": self.disc}

    # --- stages ---------------------------------------------------------------------------
    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage index, step within the stage)."""
        steps = self.config.stage_steps
        k = min(phase_at(step, steps), len(steps) - 1)
        return k, step - sum(steps[:k])

    def uncond_phase(self, k: int, local: int) -> bool:
        return k > 0 and local >= round((1 - self.config.uncond_fraction) * self.config.stage_steps[k])

    def converting(self, k: int, local: int) -> bool:
        return self.predicts_x0(k) and local < self.config.convert_steps

    def predicts_x0(self, k: int) -> bool:
        return self.config.x0_one_step and self.config.stages[k] == 1

    def at_step(self, step: int, models: dict) -> dict:
        """Loop hook, once per optimizer step before its micro-batches: at a stage's first step,
        snapshot the previous stage's student (the new teacher); at a stage's and at its
        unconditional phase's first step (``disc_reset = "phase"``; at the stage's only with
        ``"stage"``), re-initialise the discriminator and clear its optimizer state. Returns per-model optimizer settings for this step."""
        c = self.config
        k, local = self.stage_at(step)
        self.current_stage = k
        if local == 0 and k > 0:
            self.finished[c.stages[k - 1]] = self.trainable_weights(models["student"])
        phase_change = c.disc_reset == "phase" and self.uncond_phase(k, local) and not self.uncond_phase(k, local - 1)
        reset = k > 0 and (local == 0 or phase_change)
        if reset:
            unwrap(models["disc"]).load_state_dict(self.disc_init)
        regression = k == 0 or self.converting(k, local)  # MSE objectives: stage 0 and the x0 conversion
        betas = (0.9, 0.999) if regression else tuple(c.adam_betas)
        return {"student": {"lr": c.mse_lr if regression else c.student_lr, "betas": betas, "reset": False},
                "disc": {"lr": c.disc_lr, "betas": tuple(c.adam_betas), "reset": reset}}

    def state_tensors(self) -> dict:
        return {f"stage{n}.{name}": v for n, w in self.finished.items() for name, v in w.items()}

    def load_state_tensors(self, tensors: dict) -> None:
        self.finished = {}
        for key, v in tensors.items():
            n, name = key.split(".", 1)
            self.finished.setdefault(int(n[len("stage"):]), {})[name] = v

    # --- the step --------------------------------------------------------------------------
    def stage_denoiser(self, net, k: int) -> Denoiser:
        """Stage k's student as a denoiser: x0 output for the 1-step stage, else the native one."""
        return (X0Denoiser if self.predicts_x0(k) else Denoiser)(net, self.schedule)

    def train_timesteps(self, k: int) -> torch.Tensor:
        n = self.config.stages[k]
        if n <= self.config.multi_t_steps:
            return torch.tensor(self.config.multi_t_timesteps, dtype=torch.float64)
        return teacher_timesteps(self.schedule, n).double()

    def skip_level(self, k: int, local: int) -> bool:
        """Whether stage k's step ``local`` takes its real samples from the student two stages up
        (Sec. 3.4's skip-level teacher, in the unconditional phase of the small-step stages)."""
        c = self.config
        return k >= 2 and c.stages[k] <= c.skip_level_steps and self.uncond_phase(k, local)

    @torch.no_grad()
    def teacher_target(self, k: int, x_t, t, cond, uncond, level: int = 1) -> torch.Tensor:
        """Stage 0: ``teacher_steps / stages[0]`` guided DDIM moves of size T / teacher_steps; stage k:
        ``stages[k - level] / stages[k]`` moves of the student of stage k - level (size
        T / stages[k - level]; two moves of the previous stage's student at ``level = 1``, four of
        the skip-level one at 2), no CFG; positions below 0 end at the clean sample."""
        c = self.config
        if k == 0:
            model, n_from = cfg_model(self.teacher.denoiser, cond, uncond, c.guidance), c.teacher_steps
            scope = nullcontext()
        else:  # that stage's weights on the student's module
            src = k - level
            model = (lambda x, tt: self.stage_denoiser(unwrap(self.student), src)(x, tt, cond))
            n_from, scope = c.stages[src], self.frozen_student(self.finished[c.stages[src]])
        size = self.T / n_from
        x, cur = x_t, t
        with scope:
            for j in range(1, n_from // c.stages[k] + 1):
                nxt = advance(t, size * j)
                done = cur < 0
                moved = move_to(x, model(x, cur.clamp_min(0).float()), cur.clamp_min(0), nxt, self.schedule)
                x = torch.where(append_dims(done, x.ndim), x, moved)
                cur = torch.where(done, cur, nxt)
        return x

    def _disc_t(self, local: int, k: int, b: int, generator) -> torch.Tensor:
        c = self.config
        w = c.disc_weights_late if local >= c.late_fraction * c.stage_steps[k] else c.disc_weights
        idx = torch.multinomial(torch.tensor(w, dtype=torch.float64), b, replacement=True, generator=generator)
        return torch.tensor(c.disc_timesteps, dtype=torch.float64)[idx]

    def step(self, batch: dict, step: int, models: dict, generator: torch.Generator):
        c, sch, dev = self.config, self.schedule, self.device
        k, local = self.stage_at(step)
        x0, cond, uncond = self.inputs(batch, generator)  # latents for VAE teachers
        b = x0.shape[0]
        ts = self.train_timesteps(k)
        t = ts[torch.randint(len(ts), (b,), generator=generator)].to(dev)
        t_end = advance(t, self.T / c.stages[k])
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        x_t = lightning_forward(sch, x0, noise, t)
        logs = {"stage": torch.tensor(float(k)), "t": t.mean().float()}

        if self.converting(k, local):  # Eqs. 27-29: the 1-step student learns to output x0
            with torch.no_grad(), self.frozen_student(self.finished[self.config.stages[k - 1]]):
                ref = Denoiser(unwrap(models["student"]), sch)(x_t, t.float(), cond)
            out = X0Denoiser(models["student"], sch)(x_t, t.float(), cond)
            loss, l_logs = distillation_loss(out, ref, "mse")
            return [("student", loss)], {**logs, "convert": l_logs["distill"], "loss": loss.detach()}

        target = self.teacher_target(k, x_t, t, cond, uncond, 2 if self.skip_level(k, local) else 1)
        pred = move_to(x_t, self.stage_denoiser(models["student"], k)(x_t, t.float(), cond), t, t_end, sch)
        if k == 0:  # Eq. 16
            loss, l_logs = distillation_loss(pred, target, "mse")
            return [("student", loss)], {**logs, "mse": l_logs["distill"], "loss": loss.detach()}

        # Eqs. 17-23: candidates at t_end, or re-noised at t* when they end at the clean sample
        t_d = t_end.clone()
        clean = t_end < 0
        if bool(clean.any()):
            t_star = self._disc_t(local, k, b, generator).to(dev)
            n_star = torch.randn(x0.shape, generator=generator).to(dev)
            renoise = append_dims(clean, x0.ndim)
            target = torch.where(renoise, sch.add_noise(target, n_star, t_star), target)
            pred = torch.where(renoise, sch.add_noise(pred, n_star, t_star), pred)
            t_d = torch.where(clean, t_star, t_end)
        uncond_phase = self.uncond_phase(k, local)
        context = None if uncond_phase else (x_t, t.float(), cond)
        disc = models["disc"]
        # the student's step calls the unwrapped discriminator: its gradient reaches the student only
        g_loss, g_logs = ns_gan_generator_loss(unwrap(disc)(pred, t_d.float(), cond, context))
        logits = disc(torch.cat([target, pred.detach()]), torch.cat([t_d, t_d]).float(), cat_cond(cond, cond), context)
        d_loss, d_logs = ns_gan_discriminator_loss(*logits.chunk(2))
        logs.update({**g_logs, **d_logs, "uncond_d": torch.tensor(float(uncond_phase)), "loss": g_loss.detach()})
        return [("student", g_loss), ("disc", d_loss)], logs

    # --- outputs -------------------------------------------------------------------------
    def sampling_for(self, k: int) -> dict:
        n = self.config.stages[k]
        ts = [int(v) for v in teacher_timesteps(self.schedule, n)]
        return {"timesteps": {str(n): ts}, "sampler": "lcm_multistep", "gamma": 0.0, "guidance": None,
                "boundary": None, "prediction": "sample" if self.predicts_x0(k) else "native"}

    def sampling(self) -> dict:
        return self.sampling_for(len(self.config.stages) - 1)

    def student_denoiser(self, backbone):
        return self.stage_denoiser(backbone, len(self.config.stages) - 1)

    def scheduler_config_for(self, k: int) -> dict:
        return {"_class_name": "EulerDiscreteScheduler", **self.schedule.to_diffusers_config(),
                "timestep_spacing": "trailing",
                "prediction_type": "sample" if self.predicts_x0(k) else self.schedule.prediction_type}

    def scheduler_config(self) -> dict:
        return self.scheduler_config_for(len(self.config.stages) - 1)

    @torch.no_grad()
    def preview(self, models: dict, generator: torch.Generator):
        """One row: the current stage's student at its own step count (each stage's previews
        show that stage)."""
        from ..models.student import lcm_multistep
        from ..sample import seeded_noise

        k = self.current_stage
        prompts = self.preview_prompts()
        ts = torch.tensor(next(iter(self.sampling_for(k)["timesteps"].values())), dtype=torch.float64)
        noises = [seeded_noise(self.teacher.image_shape, [1000 * j + i for i in range(len(prompts))]).to(self.device)
                  for j in range(len(ts))]
        cond, shown = self.preview_cond(prompts)
        x0 = lcm_multistep(self.stage_denoiser(models["student"], k), noises[0], ts, cond,
                           self.schedule, noises[1:], gamma=0.0)
        return torch.cat([*shown, self.teacher.decode(x0).cpu()]), len(prompts)

    def finalize(self, out_dir, models: dict) -> None:
        """RUN/stages/<n>/ holds the student of every stage (each a complete student folder); RUN
        itself is the last stage, and its flashdistill.json maps step counts to stage folders."""
        from ..models.student import save_student

        c = self.config
        out = Path(out_dir)
        student = unwrap(models["student"])
        last = self.current_stage  # the last stage trained (all of them, unless a run was cut short)
        self.finished[c.stages[last]] = self.trainable_weights(student)
        params = dict(student.named_parameters())

        def write(k: int, folder: Path, **extra) -> None:
            with torch.no_grad():
                for name, v in self.finished[c.stages[k]].items():
                    params[name].copy_(v)
            save_student(folder, student, self.run_meta(self.sampling_for(k), self.scheduler_config_for(k), stage=k, **extra))

        for k, n in enumerate(c.stages[: last + 1]):
            write(k, out / "stages" / str(n))
        write(last, out, stages={str(n): f"stages/{n}" for n in c.stages[: last + 1]})


Method = LightningDistillation
