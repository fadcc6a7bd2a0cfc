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
  (``dmd_fake_score``), DMD restricted to high-noise batches (``dmd_input_t_min``), the
  student sampler's stochasticity ``sampler_gamma`` (TCD; 1 = the reference's LCM sampling), and
  target replay (``target_reuse``: a teacher solve trains R steps; the digits preset uses 4), and
  a consistency share in the Eq. (2) target (``consistency``: the student's own x0 from the
  teacher's solve one 4-step-sampler step lower, or ``consistency_skip`` grid points lower, as
  LCM's target), and DMD2's backward simulation (``backward_simulation``: x_t the state the
  student's own sampler reaches at t, the target solved from it).
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Literal

import torch

from ..checkpoint import pack_tree, unpack_tree
from ..config import field
from ..core.solvers import cat_cond, cfg_model, dpmpp_2m
from ..core.timesteps import PI_KINDS, grid_probabilities, mode_indices, phase_at, sample_grid_index
from ..losses import denoising_loss, discriminator_loss, distillation_loss, dmd_loss, generator_adv_loss
from ..models.denoiser import Denoiser
from ..models.discriminator import DiscriminatorHead
from ..models.adapters import base_copy
from ..models.student import StudentDenoiser, lcm_move, make_student_backbone
from ..sample import teacher_timesteps
from ..train import TrainConfig
from . import base
from .base import StudentConfig, StudentMethod, scaled_count, unwrap as _unwrap


def _flash_train_defaults() -> TrainConfig:
    return TrainConfig(steps=20000, batch_size=4, checkpoint_every=1000, sample_every=1000)


@dataclass
class FlashConfig(StudentConfig):
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
    dmd_guidance: list[float] = field([], "CFG range [min, max] of DMD's real score, w ~ U per sample ([]: the "
                                             "target's guidance_min..guidance_max, as the reference code)")
    first_guidance: list[float] = field([], "CFG range [min, max] of the teacher's targets solved from the first grid "
                                             "point (t = grid[0], where every sampler's first call sits); []: "
                                             "guidance_min..guidance_max")
    guidance_interval: list[int] = field([], "timesteps [lo, hi] where the teacher's CFG applies in the Eq. (2) "
                                                  "solve (w = 1, the cond call alone, elsewhere); []: everywhere (the paper)")
    dmd_guidance_interval: list[int] = field([], "timesteps [lo, hi] of t'' where DMD's real score is guided; []: everywhere")
    dmd_input_t_min: int = field(0, "DMD acts only on batches whose student input timestep t is >= this "
                                     "(999: only the pure-noise, one-step regime; 0: every batch)")
    dmd_fake_score: Literal["student", "trained"] = field(
        "student", "DMD fake score: the student itself, no grad (reference code), or a LoRA of the teacher "
        "trained by denoising the student's samples (DMD2's two-time-scale rule)")
    fake_lr: float = field(0.0, "AdamW learning rate of the trained fake score (0: the student's lr)")
    feature_block: int = field(-1, "transformer teachers: block whose image tokens feed the discriminator (-1: middle)")
    disc_lr: float = field(1e-5, "AdamW learning rate of the discriminator head")
    two_step_modes: list[int] = field([0, 2], "the two modes (0-3, as in mode_weights) the 2-step sampler starts from")
    two_step_shift: int = field(0, "K-grid points the 2-step sampler's second call sits above its mode, towards "
                                   "noise (0: the mode itself; 1: its neighbour, which pi(t) also trains)")
    four_step_timesteps: list[int] = field([], "the 4-step sampler's timesteps, points of the K-grid from high to low "
                                               "([]: the four modes, 999, 749, 499 and 249 at K = 16)")
    target_reuse: int = field(1, "optimizer steps per teacher solve: 1 solves the Eq. (2) target afresh at every step "
                                 "(the paper); R > 1 solves at every R-th step and trains the steps between on batches "
                                 "replayed from the last replay_batches solved ones")
    replay_batches: int = field(16, "solved batches kept for replay when target_reuse > 1")
    consistency: float = field(0.0, "share c of a consistency target in Eq. (2): the student's own x0 (no grad) at "
                                    "the teacher solve's state consistency_skip grid points lower, mixed as "
                                    "(1 - c) * solve + c * that (0: the paper)")
    consistency_skip: int = field(0, "grid points from t down to the consistency target's state (0: K/4, one "
                                     "step of the 4-step sampler; 1: LCM's one-link chain on the K-grid); "
                                     "batches with no grid point that far below keep the solve")
    backward_simulation: float = field(0.0, "share of solved batches below the first grid point whose x_t is the student's "
                                            "own state (DMD2's backward simulation: its backward_simulation_steps-step "
                                            "sampler from pure noise, no grad, its calls above t, then moved to t) instead "
                                            "of the noised real sample; the teacher's Eq. (2) target is solved from that "
                                            "state (0: the paper)")
    backward_simulation_steps: int = field(4, "the student sampler (2 or 4 steps) that backward_simulation runs")
    train: TrainConfig = dc_field(default_factory=_flash_train_defaults, metadata={"help": "training loop"})

    def budget_overrides(self, factor: float) -> dict:
        return {**super().budget_overrides(factor), "phase_steps": [scaled_count(n, factor, 0) for n in self.phase_steps]}

    def validate(self):
        super().validate()
        if not 4 <= self.K <= 1000:  # checked before anything is sized by K
            raise ValueError(f"K must be a multiple of 4 in [4, 1000] (points on the teacher's 1000 timesteps), got {self.K}")
        mode_indices(self.K)
        if self.pi not in PI_KINDS:
            raise ValueError(f"unknown pi {self.pi!r}; expected one of {list(PI_KINDS)}")
        if self.pi_std <= 0:
            raise ValueError(f"pi_std must be > 0, got {self.pi_std}")
        if any(n < 0 for n in self.phase_steps):
            raise ValueError(f"phase_steps must be step counts >= 0, got {self.phase_steps}")
        phases = f"one per phase: phase_steps {self.phase_steps} makes {len(self.phase_steps) + 1}"
        if len(self.mode_weights) != len(self.phase_steps) + 1:
            raise ValueError(f"mode_weights needs {len(self.phase_steps) + 1} rows ({phases}), got {len(self.mode_weights)}")
        for name in ("lambda_adv", "lambda_dmd"):
            if len(getattr(self, name)) != len(self.phase_steps) + 1:
                raise ValueError(f"{name} needs {len(self.phase_steps) + 1} values ({phases}), got {getattr(self, name)}")
        for w in self.mode_weights:
            grid_probabilities(self.K, "flash", w, self.pi_std)
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 <= guidance_min <= guidance_max, got {self.guidance_min}, {self.guidance_max}")
        for name in ("dmd_guidance", "first_guidance"):
            g = getattr(self, name)
            if g and (len(g) != 2 or not 0 <= g[0] <= g[1]):
                raise ValueError(f"{name} must be [] or [min, max] with 0 <= min <= max, got {g}")
        for name in ("guidance_interval", "dmd_guidance_interval"):
            g = getattr(self, name)
            if g and (len(g) != 2 or not 0 <= g[0] <= g[1] <= 999):
                raise ValueError(f"{name} must be [] or timesteps [lo, hi] with 0 <= lo <= hi <= 999, got {g}")
        if not 0 <= self.dmd_t_min <= self.dmd_t_max:
            raise ValueError(f"need 0 <= dmd_t_min <= dmd_t_max, got {self.dmd_t_min}, {self.dmd_t_max}")
        m = self.two_step_modes
        if len(m) != 2 or not 0 <= m[0] < m[1] <= 3:
            raise ValueError(f"two_step_modes must be two increasing mode indices in 0..3, got {m}")
        gap = (m[1] - m[0]) * (self.K // 4)
        if not 0 <= self.two_step_shift < gap:
            raise ValueError(f"two_step_shift must be in [0, {gap}) grid points (below the first call's mode at "
                             f"K = {self.K}, two_step_modes {m}), got {self.two_step_shift}")
        base.check_table("four_step_timesteps", 4, self.four_step_timesteps)
        if self.disc_lr <= 0:
            raise ValueError(f"disc_lr must be > 0, got {self.disc_lr}")
        if self.target_reuse < 1 or self.replay_batches < 1:
            raise ValueError(f"target_reuse and replay_batches must be >= 1, got {self.target_reuse}, {self.replay_batches}")
        if not 0 <= self.consistency <= 1:
            raise ValueError(f"consistency must be a share in [0, 1], got {self.consistency}")
        if not 0 <= self.backward_simulation <= 1:
            raise ValueError(f"backward_simulation must be a share in [0, 1], got {self.backward_simulation}")
        if self.backward_simulation_steps not in (2, 4):
            raise ValueError(f"backward_simulation_steps must be 2 or 4 (a student sampler), got {self.backward_simulation_steps}")
        if not 0 <= self.consistency_skip < self.K:
            raise ValueError(f"consistency_skip must be in [0, K) grid points (0: K/4), got {self.consistency_skip} "
                             f"with K = {self.K}")


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
    # adherence. The adversarial term is off, for adherence: at this preset's budget it takes the
    # 2-step FD from 9.7 to 7.9 (the teacher's 8.0) and the adherence from 0.968 to 0.952 (two seeds),
    # the same fidelity/adherence trade as a lower DMD weight (docs/quality.md section 10);
    # if turned on, t' in {10, 250} is where the teacher's 8x8 features separate real from fake.
    # The one-step map from pure noise is what limits the student (it needs many updates at t = 999),
    # and the teacher's solve is ~70% of a step, so each solve trains 4 steps (target_reuse = 4,
    # replayed from the last 16 solved batches) and the later phases weight the t = 999 mode more:
    # 1,020 steps on 255 solves score like 1,360 fresh steps at about 40% of their time (two seeds;
    # 1-step FD 24.6 -> 20.7, 2-step adherence 0.958 -> 0.968, 2- and 4-step FD unchanged).
    # The 2-step sampler's second call is one grid point above the last mode (t = 311 next to 249),
    # where pi(t) also trains the student: +0.4 points of adherence, pixel FD 1% lower, FD 1% higher
    # (three seeds; later calls trade FD for adherence, docs/quality.md section 16).
    "digits": {
        "K": 16, "lora_rank": 5, "lr": 2e-3, "disc_lr": 2e-3, "guidance_min": 1.0, "guidance_max": 2.0,
        "two_step_modes": [0, 3], "two_step_shift": 1, "sampler_gamma": 0.0, "use_adv": False, "adv_timesteps": [10, 250],
        "target_reuse": 4, "phase_steps": [150, 300, 300],
        "mode_weights": [[0.0, 0.0, 0.5, 0.5], [0.1, 0.3, 0.3, 0.3], [0.4, 0.2, 0.2, 0.2], [0.55, 0.15, 0.15, 0.15]],
        "train": {"steps": 1020, "batch_size": 16, "checkpoint_every": 200, "sample_every": 200, "ema_decay": 0.99},
    },
}
# The digits preset at 4x the steps (1,475 s on one core beside another run; the last point of docs/quality.md's convergence curve).
PRESETS["digits-long"] = {**PRESETS["digits"], "phase_steps": [600, 1200, 1200],
                          "train": {**PRESETS["digits"]["train"], "steps": 4080, "checkpoint_every": 500, "sample_every": 1000}}


# The digits preset on the built-in conditional teachers (inpaint, sr, sketch): the 4-step sampler's
# last call sits at t = 124 (K = 16 grid point 14) instead of the last mode, 249. On those tasks'
# students (two seeds of inpaint and sr, one of sketch, and a held-out evaluation seed set) FD,
# pixel FD and the task's context metric are better (inpaint unmasked error 0.00056 -> 0.00035, sr
# low-res consistency 0.00067-0.00070 -> 0.00049-0.00051) at 0.2-0.8 points of adherence; on the
# text-to-image task the same move costs adherence for no FD, so it keeps the modes
# (docs/conditional.md, "The 4-step sampler's last call").
TASK_LAYERS = {"digits": {task: {"four_step_timesteps": [999, 749, 499, 124]} for task in ("inpaint", "sr", "sketch")}}


def build_config(teacher, preset: str = "auto", *layers: dict) -> tuple[FlashConfig, str]:
    """FlashConfig from a preset (``auto``: ``digits`` for the built-in teacher, else the pipeline's
    family; on a built-in conditional teacher the digits preset adds its task's layer,
    ``TASK_LAYERS``) with ``layers`` (config file, --set, flags) merged on top in order; returns
    (config, preset used)."""
    from ..models.model import ModelNotFound
    from ..models.pipelines import teacher_family, teacher_task

    layers_of_preset = TASK_LAYERS.get(teacher_family(teacher) if preset == "auto" else preset, {})
    try:
        task_layer = layers_of_preset.get(teacher_task(teacher), {}) if layers_of_preset else {}
    except ModelNotFound:  # a stand-in path (the benchmark's cache key is teacher-free): no task to add
        task_layer = {}
    return base.build_config(FlashConfig, PRESETS, teacher, preset, task_layer, *layers)


class FlashDistillation(StudentMethod):
    name = "flash"
    label = "Flash Diffusion"
    title = "Flash Diffusion (Chadebec et al. 2024)"
    config_class = FlashConfig

    def prepare(self) -> None:
        c = self.config
        # the K-grid: trailing spacing on VP schedules, the shifted flow-matching grid on SD3
        self.grid = teacher_timesteps(self.schedule, c.K)
        self.mode_timesteps = self.grid[mode_indices(c.K)]
        self.grid_size = c.K
        self.teacher.denoiser.feature_block = c.feature_block
        self.replay: list[dict] = []  # solved batches, newest last (target_reuse > 1)
        base.check_on_grid("four_step_timesteps", c.four_step_timesteps, self.grid, "K")

    def extra_models(self) -> dict:
        c = self.config
        with torch.no_grad():  # the discriminator head's input shape, from one dry pass
            feats = self.teacher.denoiser.encoder_features(
                torch.zeros(1, *self.teacher.image_shape), self.grid[:1].float(), self.blank_uncond(1))
        self.disc = DiscriminatorHead(feats.shape[1], feats.shape[-1])
        # DMD2's fake score: the teacher plus a LoRA that learns to denoise the student's samples;
        # a copy of the backbone of its own (the one option that costs a second UNet)
        self.fake = (make_student_backbone(base_copy(self.teacher.denoiser.backbone), False, c.lora_rank, c.lora_alpha or None,
                                           self.lora_targets) if self.trains_fake_score else None)
        return {"disc": self.disc, **({"fake": self.fake} if self.fake is not None else {})}

    # --- loop protocol -------------------------------------------------------------------
    @property
    def trains_fake_score(self) -> bool:
        return self.config.use_dmd and self.config.dmd_fake_score == "trained"

    def optimizer_settings(self, name: str) -> dict:
        c = self.config
        lr = {"student": c.student_lr, "disc": c.disc_lr, "fake": c.fake_lr or c.lr}[name]
        return {"lr": lr, "betas": tuple(self.config.adam_betas), "weight_decay": 0.0}

    def phase(self, step: int) -> int:
        return phase_at(step, self.config.phase_steps)

    def probabilities(self, step: int) -> torch.Tensor:
        c = self.config
        return grid_probabilities(c.K, c.pi, c.mode_weights[self.phase(step)], c.pi_std)

    @torch.no_grad()
    def teacher_target(self, x_t: torch.Tensor, index: int, cond: dict, uncond: dict, w: torch.Tensor,
                       keep: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Eq. (2) target: DPM-Solver++(2M) with CFG from grid[index] down to x0 on the K-grid.
        With ``keep`` (a grid index below ``index``), also the solve's state at grid[keep]."""
        model = cfg_model(self.teacher.denoiser, cond, uncond, w, interval=self.config.guidance_interval or None)
        if keep is None:
            return dpmpp_2m(model, x_t, self.grid[index:], self.schedule)
        kept = {}
        target = dpmpp_2m(model, x_t, self.grid[index:], self.schedule,
                          callback=lambda i, x: kept.update(x=x) if i == keep - index else None)
        return target, kept["x"]

    def _guidance(self, b: int, generator, dmd: bool = False, first: bool = False) -> torch.Tensor:
        """w ~ U[guidance_min, guidance_max] per sample; DMD's real score draws from ``dmd_guidance``
        and targets solved from the first grid point (``first``) from ``first_guidance`` when set
        (the same number of draws either way, so runs differ only in the range)."""
        c = self.config
        lo, hi = c.guidance_min, c.guidance_max
        if dmd and c.dmd_guidance:
            lo, hi = c.dmd_guidance
        elif first and c.first_guidance:
            lo, hi = c.first_guidance
        return (lo + (hi - lo) * torch.rand(b, generator=generator)).to(self.device)

    # --- target replay (target_reuse > 1): the teacher's solve is most of a step's cost ----
    @torch.no_grad()
    def simulated_state(self, student, shape: tuple, t: torch.Tensor, cond: dict, generator: torch.Generator) -> torch.Tensor:
        """Backward simulation (DMD2, Yin et al. 2024, sec. 4.5): the state x_t the student's own
        ``backward_simulation_steps``-step sampler reaches at ``t`` from pure noise: its calls at the
        sampler's timesteps above t, each followed by the sampler's move, the last one to t."""
        c = self.config
        calls = [v for v in self.sampling()["timesteps"][str(c.backward_simulation_steps)] if v > float(t[0])]
        x = torch.randn(shape, generator=generator).to(self.device)
        denoise = StudentDenoiser(student, self.schedule)
        for i, s in enumerate(calls):
            t_i = torch.full_like(t, float(s))
            t_next = torch.full_like(t, float(calls[i + 1])) if i + 1 < len(calls) else t
            z = torch.randn(shape, generator=generator).to(self.device)
            x = lcm_move(x, denoise(x, t_i, cond), t_i, t_next, self.schedule, z, c.sampler_gamma)
        return x

    def _solved_batch(self, batch: dict, step: int, generator: torch.Generator, student) -> dict:
        """Eq. (3): one grid index per batch; Eq. (2): the teacher's target from the noised real
        sample, or with ``backward_simulation`` from the ``student``'s own state at t. With
        target_reuse > 1, every R-th step solves a fresh batch and keeps it; the steps between
        replay one of the kept batches, drawn uniformly."""
        c, sch, dev = self.config, self.schedule, self.device
        if c.target_reuse > 1 and step % c.target_reuse and self.replay:
            return self.replay[int(torch.randint(len(self.replay), (1,), generator=generator))]
        x0, cond, uncond = self.inputs(batch, generator)  # latents for VAE teachers
        index = int(sample_grid_index(self.probabilities(step), 1, generator))
        t = self.grid[index].float().expand(x0.shape[0]).to(dev)
        x_t = sch.add_noise(x0, torch.randn(x0.shape, generator=generator).to(dev), t)
        if c.backward_simulation > 0 and index > 0 and float(torch.rand((), generator=generator)) < c.backward_simulation:
            x_t = self.simulated_state(student, x0.shape, t, cond, generator)
        w = self._guidance(x0.shape[0], generator, first=index == 0)
        solved = {"x0": x0, "x_t": x_t, "t": t, "cond": cond, "uncond": uncond}
        keep = index + (c.consistency_skip or c.K // 4)  # default: one step of the 4-step sampler below t
        if c.consistency > 0 and keep < c.K:
            solved["target"], solved["x_next"] = self.teacher_target(x_t, index, cond, uncond, w, keep=keep)
            solved["t_next"] = self.grid[keep].float().expand(x0.shape[0]).to(dev).contiguous()
        else:
            solved["target"] = self.teacher_target(x_t, index, cond, uncond, w)
        if c.target_reuse > 1:
            solved["t"] = t.contiguous()  # laid out as a checkpoint restores it
            self.replay = (self.replay + [solved])[-c.replay_batches:]
        return solved

    def rank_state_tensors(self) -> dict:
        """The replay buffer (this process's batches), so that a resumed run replays the same ones."""
        return pack_tree(self.replay) if self.replay else {}

    def load_rank_state_tensors(self, tensors: dict) -> None:
        self.replay = unpack_tree(tensors) if tensors else []

    def step(self, batch: dict, step: int, models: dict, generator: torch.Generator):
        c, sch, dev = self.config, self.schedule, self.device
        solved = self._solved_batch(batch, step, generator, _unwrap(models["student"]))
        x0, x_t, t, target, cond, uncond = (solved[k] for k in ("x0", "x_t", "t", "target", "cond", "uncond"))
        b = x0.shape[0]
        phase = self.phase(step)

        if "x_next" in solved:
            # Consistency: the student's own x0 from the teacher's state consistency_skip grid points
            # lower (no grad; recomputed when a batch is replayed, as the student has moved).
            with torch.no_grad():
                x0_next = StudentDenoiser(_unwrap(models["student"]), sch)(solved["x_next"], solved["t_next"], cond)
            target = torch.lerp(target, x0_next, c.consistency)
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
                x0_real = cfg_model(self.teacher.denoiser, cond, uncond, self._guidance(b, generator, dmd=True),
                                    interval=c.dmd_guidance_interval or None)(noisy, t_dmd)
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
        m = self._timesteps(self.mode_timesteps)
        first, second = (mode_indices(self.config.K)[i] for i in self.config.two_step_modes)
        two = self._timesteps(self.grid[[first, second - self.config.two_step_shift]])
        four = self._timesteps(self.config.four_step_timesteps) if self.config.four_step_timesteps else m
        return {"timesteps": {"1": m[:1], "2": two, "4": four}, "sampler": "lcm_multistep",
                "gamma": self.config.sampler_gamma, "guidance": None, "boundary": {"sigma_data": 0.5, "timestep_scaling": 10.0}}

    def scheduler_config(self) -> dict:
        sched = super().scheduler_config()
        return {**sched, "timestep_spacing": "trailing"} if self.schedule.kind == "vp" else sched


Method = FlashDistillation
