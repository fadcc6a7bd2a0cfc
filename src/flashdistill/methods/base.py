"""What every distillation method shares, so that each method file holds only its own config,
presets and training step (the loop protocol is in :mod:`flashdistill.train`):

- :class:`StudentConfig`: the fields common to every method (teacher, LoRA or full student, lr,
  sampler, previews, the training loop); a method's config subclasses it;
- :class:`StudentMethod`: loads the teacher, builds the student (a LoRA of the teacher's backbone
  or a full copy), previews at 1/2/4 steps with the student's own sampler, and writes the run
  folder (``flashdistill.json``, the student's weights, a diffusers scheduler config);
- :func:`build_config`: a method's preset for the teacher's family, with the user's layers on top.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Literal

import torch

from ..config import field
from ..models.adapters import lora_root, swapped_weights
from ..models.pipelines import LORA_TARGETS, teacher_family
from ..models.student import LORA_FILE, StudentDenoiser, count_params, lcm_multistep, make_student_backbone, save_student
from ..sample import seeded_noise
from ..tasks import preview_condition
from ..train import TrainConfig

# LCM-LoRA's targets (diffusers' train_lcm_distill_lora_sd_wds.py): every conv and linear layer of
# the UNet except conv_in, conv_out and the shared time-embedding MLP. SDXL-Lightning copies them.
UNET_ALL_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _default_train() -> TrainConfig:
    return TrainConfig(steps=20000, batch_size=4, checkpoint_every=1000, sample_every=1000)


def student_lr(lr: float, full_lr: float, full: bool) -> float:
    """The student's learning rate: ``full_lr`` for a full student when set (> 0), else ``lr``."""
    return full_lr if full and full_lr > 0 else lr


@dataclass
class StudentConfig:
    teacher: str = field("", "teacher folder (set by --teacher)")
    full: bool = field(False, "train the whole student instead of a LoRA")
    lora_rank: int = field(64, "LoRA rank")
    lora_alpha: float = field(0.0, "LoRA alpha (0: equal to the rank)")
    lora_targets: list[str] = field([], "module names that get a LoRA ([]: the method's default for the family, see the README)")
    init_weights: str = field("", "start the LoRA from another run's instead of zero (the teacher): its folder or its "
                                  "student/student_lora.safetensors; same rank and targets. The run starts at step 0 "
                                  "with fresh optimizer state (--resume continues a run instead)")
    dtype: Literal["fp32", "bf16", "fp16"] = field(
        "fp32", "dtype of the frozen weights (teacher backbone, text encoders, VAE); trainable weights (LoRA, "
                "full student, discriminators) stay float32. bf16/fp16 halve the teacher's memory (for GPUs)")
    lr: float = field(1e-5, "AdamW learning rate of the student")
    full_lr: float = field(0.0, "AdamW learning rate of a full student (full=true; 0: lr). A full student moves every "
                                "weight and wants a smaller one than a LoRA (diffusers' LCM scripts: 1e-6 full, 1e-4 LoRA)")
    adam_betas: list[float] = field([0.9, 0.999], "AdamW betas")
    sampler_gamma: float = field(1.0, "stochasticity of the student's multistep sampler (TCD's gamma, diffusers' "
                                      "TCDScheduler eta): 1 = LCM re-noising, 0 = deterministic DDIM move")
    preview_prompts: list[str] = field([], "prompts of the preview grids (default: the dataset's)")
    train: TrainConfig = dc_field(default_factory=_default_train, metadata={"help": "training loop"})

    def budget_overrides(self, factor: float) -> dict:
        """Overrides that scale this run's training budget by ``factor``: every count of steps (the
        loop's steps, checkpoint and preview intervals, and a method's own schedule lengths, which a
        method config adds), so that the scaled run follows the same schedule in ``factor`` times the
        steps. The ``methods`` benchmark sizes each method to Flash's wall time with it."""
        t = self.train
        return {"train": {"steps": scaled_count(t.steps, factor), "checkpoint_every": scaled_count(t.checkpoint_every, factor),
                          "sample_every": scaled_count(t.sample_every, factor) if t.sample_every else 0}}

    @property
    def student_lr(self) -> float:
        return student_lr(self.lr, self.full_lr, self.full)

    def validate(self):
        if self.full_lr < 0:
            raise ValueError(f"full_lr must be >= 0 (0: lr), got {self.full_lr}")
        if not 0.0 <= self.sampler_gamma <= 1.0:
            raise ValueError(f"sampler_gamma must be in [0, 1] (0: deterministic DDIM move, 1: LCM re-noising), got {self.sampler_gamma}")
        if self.lora_rank <= 0 or self.lr <= 0:
            raise ValueError(f"lora_rank and lr must be > 0, got {self.lora_rank}, {self.lr}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")


@dataclass
class GridSamplerConfig(StudentConfig):
    """A student trained at every point of an N-point skipping grid (LCM, SPLAM, CoDi): its 2- and
    4-step samplers may sit at any of those points, not only where LCMScheduler would put them."""
    two_step_timesteps: list[int] = field([], "the 2-step sampler's timesteps, points of the N-grid from high to low "
                                              "([]: LCMScheduler's pick, 999 and 499 at N = 50)")
    four_step_timesteps: list[int] = field([], "the 4-step sampler's timesteps, points of the N-grid from high to low "
                                               "([]: LCMScheduler's pick, 999, 759, 499 and 259 at N = 50)")

    def sampler_tables(self) -> dict[int, list[int]]:
        """The chosen timesteps per step count ([] where LCMScheduler picks)."""
        return {n: getattr(self, key) for n, key in _TABLE_KEYS.items()}

    def validate(self):
        super().validate()
        for n, ts in self.sampler_tables().items():
            check_table(_TABLE_KEYS[n], n, ts)


_TABLE_KEYS = {2: "two_step_timesteps", 4: "four_step_timesteps"}


def check_table(key: str, n: int, ts: list[int]) -> None:
    """A sampler table key's value: [] (the method's own pick) or ``n`` timesteps >= 0, high to low."""
    if ts and (len(ts) != n or any(a <= b for a, b in zip(ts, ts[1:])) or ts[-1] < 0):
        raise ValueError(f"{key} must be [] or {n} timesteps >= 0 from high to low, got {ts}")


def check_on_grid(key: str, ts: list[int], grid, name: str = "N") -> None:
    """Every timestep of a sampler table on the ``grid`` the student trains at (``name``: N or K)."""
    points = [int(t) for t in grid]
    off = [t for t in ts if t not in points]
    if off:
        raise ValueError(f"{key}: {off} not on the {name} = {len(points)} grid the student trains at "
                         f"({', '.join(map(str, points[:3]))}, ..., {points[-1]})")


class GridSampler:
    """Sampling of a :class:`GridSamplerConfig` student: ``self.grid`` holds the N points it trains
    at (set in ``prepare``), where its chosen sampler timesteps must lie."""

    def check_sampler_timesteps(self) -> None:
        for n, ts in self.config.sampler_tables().items():
            check_on_grid(_TABLE_KEYS[n], ts, self.grid)

    def grid_timesteps(self) -> dict[str, list]:
        """The sampling table's timesteps at 1, 2 and 4 steps: the config's choice, else LCMScheduler's."""
        from ..core.timesteps import lcm_inference_timesteps

        chosen = self.config.sampler_tables()
        return {str(n): self._timesteps(chosen.get(n) or lcm_inference_timesteps(self.grid, n))
                for n in (1, 2, 4) if n <= len(self.grid)}


def scaled_count(n: int, factor: float, minimum: int = 1) -> int:
    """A count of steps ``n`` scaled by ``factor``, rounded, at least ``minimum``."""
    return max(minimum, round(n * factor))


def build_config(cls, presets: dict, teacher, preset: str = "auto", *layers: dict):
    """``cls`` from ``presets[preset]`` (``auto``: ``digits`` for the built-in teacher, else the
    pipeline's family: ``sd``, ``sdxl``, ``pixart`` or ``sd3``) with ``layers`` (config file, --set,
    flags) merged on top in order; returns (config, preset used)."""
    from ..config import from_dict, merge

    if preset == "auto":
        preset = teacher_family(teacher)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {cls.__name__}; expected 'auto' or one of {sorted(presets)}")
    data = merge(presets[preset], {"teacher": str(teacher)})
    for layer in layers:
        data = merge(data, layer or {})
    return from_dict(cls, data), preset


def unwrap(m):
    """The module inside a DDP wrapper (or the module itself)."""
    return getattr(m, "module", m)


class EMATarget:
    """A consistency target theta-: an EMA of the student's trainable weights, run on the live
    module (:meth:`StudentMethod.frozen_student`) and carried by checkpoints (the loop's
    ``state_tensors`` protocol). LCM and CoDi mix it in; ``target_decay`` is the EMA's mu."""

    target_weights: dict | None = None
    _target_step: int | None = None

    @property
    def target_decay(self) -> float:
        raise NotImplementedError

    def state_tensors(self) -> dict:
        return dict(self.target_weights or {})

    def load_state_tensors(self, tensors: dict) -> None:
        if self.target_weights is None:
            return
        with torch.no_grad():
            for n, v in tensors.items():
                self.target_weights[n].copy_(v)

    def target_to(self, device) -> None:
        if self.target_weights is not None:
            self.target_weights = {n: v.to(device) for n, v in self.target_weights.items()}

    @torch.no_grad()
    def update_target(self, student, step: int) -> None:
        """theta- <- mu theta- + (1 - mu) theta, once per optimizer step (before its first
        micro-batch, with the weights the previous step left)."""
        if self.target_weights is None or self._target_step == step:
            return
        if step > 0:
            live = dict(unwrap(student).named_parameters())
            for n, p in self.target_weights.items():
                p.lerp_(live[n].detach(), 1 - self.target_decay)
        self._target_step = step


class StudentMethod:
    """Base of the distillation methods. Subclasses set ``name`` and ``title`` and define ``step``,
    ``sampling`` (the timesteps per step count) and ``grid_size`` (the scheduler's
    ``original_inference_steps``); they may add models in ``extra_models`` and override
    ``default_targets``."""

    name = "student"
    label = "distilled"  # short name (model card heading)
    title = "distilled"  # what it is, with its paper

    def __init__(self, config: StudentConfig):
        if not config.teacher:
            raise ValueError(f"{type(config).__name__}.teacher is empty: pass --teacher DIR")
        from ..models.loading import load_teacher

        self.config = config
        self.teacher = load_teacher(config.teacher, dtype=DTYPES[config.dtype])
        self.schedule = self.teacher.schedule
        self.family = self.teacher.meta.get("family", "digits")
        if self.schedule.kind == "flow" and config.sampler_gamma != 1.0:
            raise ValueError(f"sampler_gamma {config.sampler_gamma} needs a VP teacher: diffusers has no TCD-style "
                             "scheduler for flow matching, so an export could not sample like the run; use 1.0")
        self.prepare()
        c = config
        self.lora_targets = list(c.lora_targets) or self.default_targets()
        self.total = count_params(self.teacher.denoiser.backbone)[1]  # the teacher's parameter count
        with torch.random.fork_rng(devices=[]):  # initialisation is a function of the config's seed
            torch.manual_seed(c.train.seed)
            self.student = self.make_student()
            if c.init_weights:
                self._load_init_weights(c.init_weights)
            if not c.full:  # one module: the teacher is the student's backbone with its LoRA off
                self.teacher.denoiser.lora = False
            self.extra = self.extra_models()
        self.trainable = count_params(self.student)[0]

    def _load_init_weights(self, source: str) -> None:
        """``init_weights``: another run's LoRA into this student (a warm start, e.g. Flash from an
        LCM student); refuses a LoRA of another rank or other targets, naming the difference."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.config.full:
            raise ValueError(f"init_weights={source!r} loads a LoRA, but full=true trains the whole student")
        path = Path(source)
        path = path / "student" / LORA_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"init_weights={source!r}: no {path.name} there; expected a run folder or its "
                                    f"student/{LORA_FILE}")
        state, own = load_file(str(path)), get_peft_model_state_dict(lora_root(self.student))
        if state.keys() != own.keys():
            raise ValueError(f"init_weights={source!r} is a LoRA on other layers than this student's "
                             f"(lora_targets {self.lora_targets}): only there {sorted(state.keys() - own.keys())[:3]}, "
                             f"only here {sorted(own.keys() - state.keys())[:3]}")
        bad = [k for k in own if own[k].shape != state[k].shape]
        if bad:
            raise ValueError(f"init_weights={source!r} has another LoRA rank: {bad[0]} is {tuple(state[bad[0]].shape)}, "
                             f"this student's (lora_rank={self.config.lora_rank}) {tuple(own[bad[0]].shape)}")
        set_peft_model_state_dict(lora_root(self.student), state)

    # --- hooks for subclasses ----------------------------------------------------------
    def prepare(self) -> None:
        """After the teacher is loaded, before the models are built: grids, and a one-line
        ValueError when the method does not apply to this teacher."""

    def default_targets(self) -> list[str]:
        return LORA_TARGETS[self.family]

    def make_student(self) -> torch.nn.Module:
        """A LoRA injected into the teacher's backbone (shared) or, with ``full``, a copy."""
        c = self.config
        return make_student_backbone(self.teacher.denoiser.backbone, c.full, c.lora_rank, c.lora_alpha or None,
                                     self.lora_targets)

    def extra_models(self) -> dict:
        """Trainable models besides the student (discriminators, fake scores), built under the
        config's seed."""
        return {}

    def trainable_weights(self, student=None) -> dict[str, torch.Tensor]:
        """A detached copy of the student's trainable weights: a frozen weight set (an EMA target,
        a finished stage) that :meth:`frozen_student` runs on the live module."""
        return {n: p.detach().clone() for n, p in unwrap(student or self.student).named_parameters() if p.requires_grad}

    def frozen_student(self, weights: dict):
        """The context in which the student module holds ``weights`` (no-grad calls only)."""
        return swapped_weights(unwrap(self.student), weights)

    def student_denoiser(self, backbone) -> StudentDenoiser:
        """The student's x0 at gamma = 1 / inference (what ``save_student`` writes)."""
        return StudentDenoiser(backbone, self.schedule)

    # --- loop protocol -------------------------------------------------------------------
    def inputs(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict, dict]:
        """A batch as (x0 in the denoiser's space, cond, uncond): images through the teacher's VAE,
        or, from a latent cache (``--cache-latents``), a fresh sample of the cached latent
        distribution with the same generator draws and the cached text embeddings. Conditional
        teachers: the spatial condition (made from the batch's images as the teacher was trained:
        random masks, noise-augmented low-res, stroke maps) joins cond and uncond alike, so every
        teacher, student, DMD and discriminator call sees it."""
        dev = self.device
        if "latent_mean" in batch:
            x0 = self.teacher.vae.from_moments(batch["latent_mean"].to(dev), batch["latent_std"].to(dev), generator)
            cond = self.teacher.cond_from(batch["text"])
            return x0.to(dev), cond, self.teacher.uncond(x0.shape[0])
        x0 = self.teacher.encode(batch["image"].to(dev).float(), generator)
        spatial = self.teacher.spatial(self.teacher.task.make(batch["image"], generator), x0.shape[0], generator)
        return x0.to(dev), self.teacher.cond(batch["prompt"], spatial), self.teacher.uncond(x0.shape[0], spatial)

    def models(self) -> dict:
        return {"student": self.student, **self.extra}

    def compile_targets(self) -> list[torch.nn.Module]:
        """What ``train.compile`` compiles: the teacher's backbone and the student's (one module
        for a LoRA student); discriminator heads and other small extras stay eager."""
        return [self.teacher.denoiser.backbone, self.student]

    def optimizer_settings(self, name: str) -> dict:
        return {"lr": self.config.student_lr, "betas": tuple(self.config.adam_betas), "weight_decay": 0.0}

    def setup(self, device) -> None:
        self.device = device
        self.teacher.to(device)

    # --- outputs -------------------------------------------------------------------------
    def preview_prompts(self) -> list[str]:
        if self.config.preview_prompts:
            return self.config.preview_prompts
        if self.teacher.meta.get("dataset") == "digits":
            from ..data.digits import prompt_for

            return [prompt_for(d) for d in range(10)]
        return ["a photo of a cat", "a red car on a street", "a bowl of fruit", "a mountain lake at sunset"]

    def blank_uncond(self, n: int = 1) -> dict:
        """An unconditional cond for ``n`` samples, with the spatial condition of a blank image for
        conditional teachers: what dry passes (shapes of discriminator heads) run on."""
        task = self.teacher.task
        if not task.keys:
            return self.teacher.uncond(n)
        blank = -torch.ones(n, *self.teacher.pixel_shape)
        return self.teacher.uncond(n, self.teacher.spatial(task.make(blank, torch.Generator().manual_seed(0), train=False), n))

    def preview_cond(self, prompts: list[str]) -> tuple[dict, list[torch.Tensor]]:
        """The preview prompts' cond and, for conditional teachers, the first row of the grid: the
        conditions (of the first test digit of each class, in the prompts' order)."""
        task = self.teacher.task
        if not task.keys:
            return self.teacher.cond(prompts), []
        condition = preview_condition(task, len(prompts), self.teacher.pixel_shape)
        spatial = self.teacher.spatial(condition, len(prompts), torch.Generator().manual_seed(0))
        return self.teacher.cond(prompts, spatial), [self.teacher.show(condition)]

    @torch.no_grad()
    def preview(self, models: dict, generator: torch.Generator):
        """Rows: the student at each of its step counts (conditional teachers: the conditions
        first); columns: the preview prompts; fixed seeds."""
        student = self.student_denoiser(models["student"])
        was = models["student"].training
        models["student"].eval()
        prompts = self.preview_prompts()
        cond, rows = self.preview_cond(prompts)
        for n, ts in self.sampling()["timesteps"].items():
            noises = [seeded_noise(self.teacher.image_shape, [1000 * k + i for i in range(len(prompts))]).to(self.device)
                      for k in range(int(n))]
            x0 = lcm_multistep(student, noises[0], torch.tensor(ts, dtype=torch.float64), cond, self.schedule, noises[1:],
                               gamma=self.config.sampler_gamma)
            rows.append(self.teacher.decode(x0).cpu())
        models["student"].train(was)
        return torch.cat(rows), len(prompts)

    def _timesteps(self, values) -> list:
        cast = int if self.schedule.kind == "vp" else (lambda v: round(float(v), 4))
        return [cast(v) for v in values]

    def scheduler_config(self) -> dict:
        """The diffusers config of the student's few-step scheduler: LCMScheduler (gamma = 1) or
        TCDScheduler (gamma < 1; called with eta = gamma) on VP teachers; FlowMatchLCMScheduler
        with shift 1 on flow teachers (the student's timesteps are already shifted)."""
        if self.schedule.kind == "vp":
            return {"_class_name": "LCMScheduler" if self.config.sampler_gamma == 1.0 else "TCDScheduler",
                    **self.schedule.to_diffusers_config(), "original_inference_steps": self.origin_steps()}
        return {"_class_name": "FlowMatchLCMScheduler", "num_train_timesteps": self.schedule.num_train_timesteps, "shift": 1.0}

    def origin_steps(self) -> int:
        """The exported scheduler's ``original_inference_steps``: the method's grid size when
        ``set_timesteps(n)`` on it picks the student's own timesteps for every step count, else the
        smallest grid on which it does (Flash's mode timesteps, 999/749/499/249: 4), else the grid
        size. Pipelines that cannot pass ``timesteps=`` (``StableDiffusionUpscalePipeline``) and
        tools that only set a step count then sample where the student was trained."""
        from ..core.timesteps import lcm_inference_timesteps, skipping_grid

        table = self.sampling()["timesteps"]

        def fits(n_grid: int) -> bool:
            grid = skipping_grid(self.schedule, n_grid)
            return all(int(n) <= n_grid and [int(v) for v in lcm_inference_timesteps(grid, int(n))] == [int(v) for v in ts]
                       for n, ts in table.items())

        for n_grid in (self.grid_size, *range(1, self.schedule.num_train_timesteps + 1)):
            if fits(n_grid):
                return n_grid
        return self.grid_size

    def run_meta(self, sampling: dict, scheduler_config: dict, **extra) -> dict:
        """The ``flashdistill.json`` of a student written by this run."""
        from ..config import to_dict

        c = self.config
        return {
            "method": self.name, "teacher": str(Path(c.teacher).resolve()), "full": c.full,
            "lora": None if c.full else {"rank": c.lora_rank, "alpha": c.lora_alpha or c.lora_rank, "targets": self.lora_targets},
            "family": self.family, **({"pipeline": self.teacher.meta["pipeline"]} if "pipeline" in self.teacher.meta else {}),
            "trainable_params": self.trainable, "teacher_params": self.total,
            "sampling": sampling, "scheduler_config": scheduler_config, "config": to_dict(c), **extra,
        }

    def finalize(self, out_dir, models: dict) -> None:
        save_student(Path(out_dir), unwrap(models["student"]), self.run_meta(self.sampling(), self.scheduler_config()))
