"""Flash Diffusion (Chadebec et al. 2024): one-step distillation of a teacher's multi-step CFG
denoising of noised real samples, with a latent adversarial loss on the frozen teacher's encoder
and a distribution-matching (DMD) loss; the student is a LoRA, its timesteps drawn from a
phase-scheduled mixture on a K-point grid.

    L = L_distil (Eq. 2) + lambda_adv(phase) * L_adv (Eq. 4) + lambda_DMD(phase) * L_DMD (Eq. 5)

Departures from the public reference code (see shared/METHOD_NOTES.md), on purpose:
- re-noising for the adversarial and DMD terms uses the training schedule's own alphas at the
  sampled t' / t'' (the reference collapses every off-grid timestep to the last grid point);
- the teacher's multi-step target is solved once per batch and shared by both optimizer steps,
  and the teacher's features of the student sample are computed once (the discriminator step
  reuses them detached);
- cond and uncond branches of every CFG call run as one batched forward;
- the discriminator head's GroupNorm keeps >= 16 values per group (see models/discriminator.py);
- options the reference lacks, off by default: a DMD2-style trained fake score
  (``dmd_fake_score``), DMD restricted to high-noise batches (``dmd_input_t_min``), and the
  student sampler's stochasticity ``sampler_gamma`` (TCD; 1 = the reference's LCM sampling).
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Literal

import torch

from ..config import field
from ..core.solvers import cat_cond, cfg_model, dpmpp_2m
from ..core.timesteps import PI_KINDS, grid_probabilities, mode_indices, phase_at, sample_grid_index
from ..losses import denoising_loss, discriminator_loss, distillation_loss, dmd_loss, generator_adv_loss
from ..models.denoiser import Denoiser
from ..models.discriminator import DiscriminatorHead
from ..models.loading import load_teacher
from ..models.pipelines import LORA_TARGETS, teacher_family
from ..models.student import StudentDenoiser, count_params, lcm_multistep, make_student_backbone, save_student
from ..sample import seeded_noise, teacher_timesteps
from ..train import TrainConfig


def _flash_train_defaults() -> TrainConfig:
    return TrainConfig(steps=20000, batch_size=4, checkpoint_every=1000, sample_every=1000)


@dataclass
class FlashConfig:
    teacher: str = field("", "teacher folder (set by --teacher)")
    K: int = field(32, "points of the teacher grid (trailing spacing); Eq. 3")
    pi: Literal["flash", "uniform", "gaussian", "sharp"] = field("flash", "timestep distribution (ablations: uniform, gaussian, sharp)")
    pi_std: float = field(0.5, "std of each mode in grid-index units (reference: 0.5; paper text: 0.707)")
    phase_steps: list[int] = field([2500, 2500, 2500], "length of phases 0..2 in steps; phase 3 then holds")
    mode_weights: list[list[float]] = field(
        [[0.0, 0.0, 0.5, 0.5], [0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25], [0.4, 0.2, 0.2, 0.2]],
        "per phase, weights of the modes at t = grid[0], grid[K/4], grid[K/2], grid[3K/4]")
    guidance_min: float = field(3.0, "teacher CFG scale w ~ U[min, max], one draw per sample")
    guidance_max: float = field(13.0, "upper end of the teacher CFG range")
    distill_loss: Literal["mse", "l1", "huber"] = field("mse", "distillation distance (Eq. 2)")
    use_adv: bool = field(True, "use the adversarial loss (Eq. 4)")
    use_dmd: bool = field(True, "use the DMD loss (Eq. 5)")
    gan_loss: Literal["lsgan", "hinge", "wgan"] = field("lsgan", "GAN objective")
    adv_timesteps: list[int] = field([10, 250, 500, 750], "re-noising timesteps t' of the adversarial loss")
    lambda_adv: list[float] = field([0.0, 0.1, 0.2, 0.3], "adversarial weight per phase")
    lambda_dmd: list[float] = field([0.0, 0.3, 0.5, 0.7], "DMD weight per phase")
    dmd_t_min: int = field(0, "DMD re-noising t'' ~ U{min..max}")
    dmd_t_max: int = field(999, "upper end of t''")
    dmd_input_t_min: int = field(0, "DMD acts only on batches whose student input timestep t is >= this "
                                     "(999: only the pure-noise, one-step regime; 0: every batch)")
    dmd_fake_score: Literal["student", "trained"] = field(
        "student", "DMD fake score: the student itself, no grad (reference code), or a LoRA of the teacher "
        "trained by denoising the student's samples (DMD2's two-time-scale rule)")
    fake_lr: float = field(0.0, "AdamW learning rate of the trained fake score (0: the student's lr)")
    full: bool = field(False, "train the whole student instead of a LoRA")
    lora_rank: int = field(64, "LoRA rank")
    lora_alpha: float = field(0.0, "LoRA alpha (0: equal to the rank)")
    lora_targets: list[str] = field([], "module names that get a LoRA ([]: the family's default, see the README)")
    feature_block: int = field(-1, "transformer teachers: block whose image tokens feed the discriminator (-1: middle)")
    lr: float = field(1e-5, "AdamW learning rate of the student")
    disc_lr: float = field(1e-5, "AdamW learning rate of the discriminator head")
    adam_betas: list[float] = field([0.9, 0.999], "AdamW betas (student and discriminator)")
    two_step_modes: list[int] = field([0, 2], "the two modes (0-3, as in mode_weights) the 2-step sampler starts from")
    sampler_gamma: float = field(1.0, "stochasticity of the student's multistep sampler (TCD's gamma, diffusers' "
                                      "TCDScheduler eta): 1 = LCM re-noising, 0 = deterministic DDIM move")
    preview_prompts: list[str] = field([], "prompts of the preview grids (default: the dataset's)")
    train: TrainConfig = dc_field(default_factory=_flash_train_defaults, metadata={"help": "training loop"})

    def validate(self):
        mode_indices(self.K)
        if self.pi not in PI_KINDS:
            raise ValueError(f"unknown pi {self.pi!r}; expected one of {list(PI_KINDS)}")
        if len(self.mode_weights) != len(self.phase_steps) + 1:
            raise ValueError(f"mode_weights needs {len(self.phase_steps) + 1} rows (one per phase), got {len(self.mode_weights)}")
        for name in ("lambda_adv", "lambda_dmd"):
            if len(getattr(self, name)) != len(self.phase_steps) + 1:
                raise ValueError(f"{name} needs {len(self.phase_steps) + 1} values (one per phase), got {getattr(self, name)}")
        for w in self.mode_weights:
            grid_probabilities(self.K, "flash", w, self.pi_std)
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 <= guidance_min <= guidance_max, got {self.guidance_min}, {self.guidance_max}")
        if not 0 <= self.dmd_t_min <= self.dmd_t_max:
            raise ValueError(f"need 0 <= dmd_t_min <= dmd_t_max, got {self.dmd_t_min}, {self.dmd_t_max}")
        m = self.two_step_modes
        if len(m) != 2 or not 0 <= m[0] < m[1] <= 3:
            raise ValueError(f"two_step_modes must be two increasing mode indices in 0..3, got {m}")
        if not 0.0 <= self.sampler_gamma <= 1.0:
            raise ValueError(f"sampler_gamma must be in [0, 1] (0: deterministic DDIM move, 1: LCM re-noising), got {self.sampler_gamma}")
        if self.lora_rank <= 0 or self.lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"lora_rank, lr and disc_lr must be > 0, got {self.lora_rank}, {self.lr}, {self.disc_lr}")


# Per-teacher defaults layered under a user's config file and --set (notes: SD1.5 values are the
# dataclass defaults). The built-in digits teacher is tiny, so its budget is minutes, not days.
PRESETS = {
    "sd": {},
    "sdxl": {},
    # Notes (reference code): PixArt uses K = 16, w in [2, 9], 5,000-batch phases, lighter adversarial weights.
    "pixart": {"K": 16, "guidance_min": 2.0, "guidance_max": 9.0, "phase_steps": [5000, 5000, 5000],
               "lambda_adv": [0.0, 0.05, 0.1, 0.2]},
    "sd3": {"guidance_min": 7.0, "guidance_max": 13.0, "lambda_adv": [0.0, 0.1, 0.3, 0.5]},
    # Tuned on the built-in teacher for a <= 5 minute CPU run (docs/quality.md has every figure): K = 16
    # halves the teacher solve (the reference uses 16 for PixArt); rank 5 keeps LoRA <= 5%. The
    # reference keeps no EMA; here an EMA of the student's LoRA (in 340 steps its warm-up
    # (1 + t) / (10 + t) sets the decay, about 0.97 at the end) cut the 1- and 2-step FD by 3.7 and
    # 1.2 against the raw final weights of the same run. The sampler moves deterministically between
    # steps (sampler_gamma = 0, TCD's DDIM move) instead of LCM's re-noising: on the same students
    # 2-step FD 14.5 -> 9.3 and pixel FD 0.357 -> 0.229, 4-step FD 14.7 -> 7.9, at ~4 points of
    # adherence. The adversarial term is off: with DMD on, two seeds with and without it score within
    # seed noise (2-step FD 9.7 vs 9.8, adherence 0.949 vs 0.958) and it costs a teacher encoder pass;
    # if turned on, t' in {10, 250} is where the teacher's 8x8 features separate real from fake.
    "digits": {
        "K": 16, "lora_rank": 5, "lr": 2e-3, "disc_lr": 2e-3, "guidance_min": 1.0, "guidance_max": 2.0,
        "two_step_modes": [0, 3], "sampler_gamma": 0.0, "use_adv": False, "adv_timesteps": [10, 250],
        "phase_steps": [50, 100, 100],
        "train": {"steps": 340, "batch_size": 16, "checkpoint_every": 100, "sample_every": 100, "ema_decay": 0.99},
    },
}
# The digits preset at 4x the steps (about 10 min on 2 CPU cores; docs/quality.md's convergence curve).
PRESETS["digits-long"] = {**PRESETS["digits"], "phase_steps": [200, 400, 400],
                          "train": {**PRESETS["digits"]["train"], "steps": 1360, "checkpoint_every": 400, "sample_every": 400}}


def build_config(teacher, preset: str = "auto", *layers: dict) -> tuple[FlashConfig, str]:
    """FlashConfig from a preset (``auto``: ``digits`` for the built-in teacher, else the pipeline's
    family: ``sd``, ``sdxl``, ``pixart`` or ``sd3``) with ``layers`` (config file, --set, flags)
    merged on top in order; returns (config, preset used)."""
    from ..config import from_dict, merge

    if preset == "auto":
        preset = teacher_family(teacher)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected 'auto' or one of {sorted(PRESETS)}")
    data = merge(PRESETS[preset], {"teacher": str(teacher)})
    for layer in layers:
        data = merge(data, layer or {})
    return from_dict(FlashConfig, data), preset


def _unwrap(m):
    return getattr(m, "module", m)


class FlashDistillation:
    def __init__(self, config: FlashConfig):
        if not config.teacher:
            raise ValueError("FlashConfig.teacher is empty: pass --teacher DIR")
        self.config = config
        self.teacher = load_teacher(config.teacher)
        self.schedule = self.teacher.schedule
        self.family = self.teacher.meta.get("family", "digits")
        if self.schedule.kind == "flow" and config.sampler_gamma != 1.0:
            raise ValueError(f"sampler_gamma {config.sampler_gamma} needs a VP teacher: diffusers has no TCD-style "
                             "scheduler for flow matching, so an export could not sample like the run; use 1.0")
        # the K-grid: trailing spacing on VP schedules, the shifted flow-matching grid on SD3
        self.grid = teacher_timesteps(self.schedule, config.K)
        self.mode_timesteps = self.grid[mode_indices(config.K)]
        c = config
        self.lora_targets = list(c.lora_targets) or LORA_TARGETS[self.family]
        self.teacher.denoiser.feature_block = c.feature_block
        with torch.no_grad():  # the discriminator head's input shape, from one dry pass
            feats = self.teacher.denoiser.encoder_features(
                torch.zeros(1, *self.teacher.image_shape), self.grid[:1].float(), self.teacher.uncond(1))
        with torch.random.fork_rng(devices=[]):  # initialisation is a function of the config's seed
            torch.manual_seed(c.train.seed)
            self.student = make_student_backbone(self.teacher.denoiser.backbone, c.full, c.lora_rank, c.lora_alpha or None, self.lora_targets)
            self.disc = DiscriminatorHead(feats.shape[1], feats.shape[-1])
            # DMD2's fake score: the teacher plus a LoRA that learns to denoise the student's samples
            self.fake = (make_student_backbone(self.teacher.denoiser.backbone, False, c.lora_rank, c.lora_alpha or None,
                                               self.lora_targets) if self.trains_fake_score else None)
        self.trainable = count_params(self.student)[0]
        self.total = count_params(self.teacher.denoiser.backbone)[1]  # the teacher's parameter count

    # --- loop protocol -------------------------------------------------------------------
    @property
    def trains_fake_score(self) -> bool:
        return self.config.use_dmd and self.config.dmd_fake_score == "trained"

    def models(self) -> dict:
        models = {"student": self.student, "disc": self.disc}
        if self.fake is not None:
            models["fake"] = self.fake
        return models

    def optimizer_settings(self, name: str) -> dict:
        c = self.config
        lr = {"student": c.lr, "disc": c.disc_lr, "fake": c.fake_lr or c.lr}[name]
        return {"lr": lr, "betas": tuple(self.config.adam_betas), "weight_decay": 0.0}

    def setup(self, device) -> None:
        self.device = device
        self.teacher.to(device)

    def phase(self, step: int) -> int:
        return phase_at(step, self.config.phase_steps)

    def probabilities(self, step: int) -> torch.Tensor:
        c = self.config
        return grid_probabilities(c.K, c.pi, c.mode_weights[self.phase(step)], c.pi_std)

    @torch.no_grad()
    def teacher_target(self, x_t: torch.Tensor, index: int, cond: dict, uncond: dict, w: torch.Tensor) -> torch.Tensor:
        """Eq. (2) target: DPM-Solver++(2M) with CFG from grid[index] down to x0 on the K-grid."""
        model = cfg_model(self.teacher.denoiser, cond, uncond, w)
        return dpmpp_2m(model, x_t, self.grid[index:], self.schedule)

    def _guidance(self, b: int, generator) -> torch.Tensor:
        c = self.config
        return (c.guidance_min + (c.guidance_max - c.guidance_min) * torch.rand(b, generator=generator)).to(self.device)

    def step(self, batch: dict, step: int, models: dict, generator: torch.Generator):
        c, sch, dev = self.config, self.schedule, self.device
        x0 = self.teacher.encode(batch["image"].to(dev).float(), generator).to(dev)  # latents for VAE teachers
        b = x0.shape[0]
        phase = self.phase(step)
        cond, uncond = self.teacher.cond(batch["prompt"]), self.teacher.uncond(b)

        # Eq. (3): one grid index per batch; Eq. (2): teacher target from the noised real sample.
        index = int(sample_grid_index(self.probabilities(step), 1, generator))
        t = self.grid[index].float().expand(b).to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        x_t = sch.add_noise(x0, noise, t)
        target = self.teacher_target(x_t, index, cond, uncond, self._guidance(b, generator))

        student = StudentDenoiser(models["student"], sch)
        x0_student = student(x_t, t, cond)
        loss, logs = distillation_loss(x0_student, target, c.distill_loss)
        logs.update({"phase": torch.tensor(float(phase)), "t": t[0].detach()})

        losses = []
        lam_adv, lam_dmd = c.lambda_adv[phase], c.lambda_dmd[phase]
        if c.use_adv:
            # Eq. (4): real and student samples re-noised with the same noise at t' (schedule alphas).
            t_adv = torch.tensor(c.adv_timesteps, dtype=torch.float32)[
                torch.randint(len(c.adv_timesteps), (b,), generator=generator)].to(dev)
            n_adv = torch.randn(x0.shape, generator=generator).to(dev)
            noisy = torch.cat([sch.add_noise(x0, n_adv, t_adv), sch.add_noise(x0_student, n_adv, t_adv)])
            # One frozen-teacher encoder pass for both; gradient reaches the student only when used.
            with torch.set_grad_enabled(lam_adv > 0):
                feats = self.teacher.denoiser.encoder_features(
                    noisy, torch.cat([t_adv, t_adv]), cat_cond(cond, cond))
            feat_real, feat_fake = feats.chunk(2)
            if lam_adv > 0:
                # The generator step calls the unwrapped head: its gradient goes to the student only.
                g_adv, g_logs = generator_adv_loss(_unwrap(models["disc"])(feat_fake), c.gan_loss)
                logs.update(g_logs)
                loss = loss + lam_adv * g_adv
            d_loss, d_logs = discriminator_loss(models["disc"](feat_real.detach()), models["disc"](feat_fake.detach()), c.gan_loss)
            logs.update(d_logs)
        if c.use_dmd and lam_dmd > 0 and float(t[0]) >= c.dmd_input_t_min:
            # Eq. (5): re-noise the student sample at t'' ~ U; teacher (CFG, fresh w) = real score;
            # fake score: the student itself (no grad), or the trained fake-score LoRA.
            t_dmd = torch.randint(c.dmd_t_min, c.dmd_t_max + 1, (b,), generator=generator).float().to(dev)
            n_dmd = torch.randn(x0.shape, generator=generator).to(dev)
            noisy = sch.add_noise(x0_student.detach(), n_dmd, t_dmd)
            with torch.no_grad():
                x0_real = cfg_model(self.teacher.denoiser, cond, uncond, self._guidance(b, generator))(noisy, t_dmd)
                if self.trains_fake_score:
                    x0_fake = Denoiser(_unwrap(models["fake"]), sch)(noisy, t_dmd, cond)
                else:
                    x0_fake = StudentDenoiser(_unwrap(models["student"]), sch)(noisy, t_dmd, cond)
            l_dmd, dmd_logs = dmd_loss(x0_student, x0_real, x0_fake)
            logs.update(dmd_logs)
            loss = loss + lam_dmd * l_dmd
        losses.append(("student", loss))
        if c.use_adv:
            losses.append(("disc", d_loss))
        if self.trains_fake_score:
            # DMD2: the fake score follows the student's current output distribution by denoising
            # it (the teacher's own objective, at t_f ~ U over the whole schedule), every step.
            t_f = torch.randint(0, sch.num_train_timesteps, (b,), generator=generator).float().to(dev)
            n_f = torch.randn(x0.shape, generator=generator).to(dev)
            x_f = sch.add_noise(x0_student.detach(), n_f, t_f)
            f_loss, f_logs = denoising_loss(Denoiser(models["fake"], sch).predict(x_f, t_f, cond),
                                            sch.from_x0(x0_student.detach(), x_f, t_f))
            logs.update(f_logs)
            losses.append(("fake", f_loss))
        logs["loss"] = loss.detach()
        return losses, logs

    # --- outputs -------------------------------------------------------------------------
    def sampling(self) -> dict:
        cast = int if self.schedule.kind == "vp" else (lambda v: round(float(v), 4))
        m = [cast(v) for v in self.mode_timesteps]
        two = [m[i] for i in self.config.two_step_modes]
        return {"timesteps": {"1": m[:1], "2": two, "4": m}, "sampler": "lcm_multistep",
                "gamma": self.config.sampler_gamma, "guidance": None, "boundary": {"sigma_data": 0.5, "timestep_scaling": 10.0}}

    def preview_prompts(self) -> list[str]:
        if self.config.preview_prompts:
            return self.config.preview_prompts
        if self.teacher.meta.get("dataset") == "digits":
            from ..data.digits import prompt_for

            return [prompt_for(d) for d in range(10)]
        return ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at sunset"]

    @torch.no_grad()
    def preview(self, models: dict, generator: torch.Generator):
        """Rows: the student at 1, 2 and 4 steps; columns: the preview prompts; fixed seeds."""
        student = StudentDenoiser(models["student"], self.schedule)
        was = models["student"].training
        models["student"].eval()
        prompts = self.preview_prompts()
        cond = self.teacher.cond(prompts)
        rows = []
        for n, ts in self.sampling()["timesteps"].items():
            noises = [seeded_noise(self.teacher.image_shape, [1000 * k + i for i in range(len(prompts))]).to(self.device)
                      for k in range(int(n))]
            x0 = lcm_multistep(student, noises[0], torch.tensor(ts, dtype=torch.float64), cond, self.schedule, noises[1:],
                               gamma=self.config.sampler_gamma)
            rows.append(self.teacher.decode(x0).cpu())
        models["student"].train(was)
        return torch.cat(rows), len(prompts)

    def finalize(self, out_dir, models: dict) -> None:
        from ..config import to_dict

        c = self.config
        if self.schedule.kind == "vp":
            # gamma < 1: diffusers' TCDScheduler (called with eta = gamma) takes the same path
            sched = {"_class_name": "LCMScheduler" if c.sampler_gamma == 1.0 else "TCDScheduler",
                     **self.schedule.to_diffusers_config(), "timestep_spacing": "trailing", "original_inference_steps": c.K}
        else:  # flow: student timesteps are already shifted, so the exported scheduler must not shift again
            sched = {"_class_name": "FlowMatchLCMScheduler", "num_train_timesteps": self.schedule.num_train_timesteps,
                     "shift": 1.0}
        meta = {
            "method": "flash", "teacher": str(Path(c.teacher).resolve()), "full": c.full,
            "lora": None if c.full else {"rank": c.lora_rank, "alpha": c.lora_alpha or c.lora_rank, "targets": self.lora_targets},
            "family": self.family,
            "trainable_params": self.trainable, "teacher_params": self.total,
            "sampling": self.sampling(), "scheduler_config": sched, "config": to_dict(c),
        }
        save_student(Path(out_dir), _unwrap(models["student"]), meta)
