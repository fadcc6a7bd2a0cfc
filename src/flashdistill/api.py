"""The Python API; the ``flashdistill`` command line is a thin layer over it (one code path).

>>> import flashdistill as fd
>>> run = fd.distill(teacher="runs/demo/teacher", out="runs/x", method="flash", steps=510)
>>> student = fd.load(run)
>>> images = student.generate(["a handwritten digit seven"], steps=2, seed=0)   # PIL images
>>> rows = fd.evaluate(run, steps=[1, 2, 4])
>>> fd.export(run, "exported/", format="diffusers")

Config keys are the ones ``--set`` takes: keyword arguments name a key of the method's config
(``lr=1e-4``, ``K=16``) or of its ``train`` section (``steps=510``, ``batch_size=32``); nested or
dotted keys go in ``overrides={"train.lr_warmup": 10}``. Precedence: preset < ``config`` file <
``overrides`` < keyword arguments.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

REPORT_TO = ("none", "tensorboard", "wandb")
TEACHER_STEPS = 32  # a teacher's "full" sampling: the reference of teacher MSE, the default of generate()


@dataclass
class Run:
    """A finished (or dry-run) training: its folder, resolved config and summary. Usable wherever a
    path is (``os.fspath(run)``, ``fd.load(run)``)."""

    path: Path
    config: dict
    summary: dict = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def seconds(self) -> float | None:
        return self.summary.get("seconds")

    def load(self, **kwargs) -> "Loaded":
        return load(self.path, **kwargs)


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (set before accelerate starts), else True."""
    return os.environ.get("RANK", "0") == "0"


def _say(progress: bool):
    """print on the main process unless ``progress`` is off."""
    return print if progress and is_main_process() else (lambda *a, **k: None)


def _key_layer(config_class, keys: dict) -> dict:
    """Keyword arguments -> a config layer: a key of the method's config as is, a key of its
    ``train`` section (and not of the method's) under ``train``; dotted keys nest. Unknown keys are
    left for the config to reject, naming them."""
    from .config import set_dotted
    from .train import TrainConfig

    own, train_keys = set(config_class.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    layer: dict = {}
    for k, v in keys.items():
        set_dotted(layer, f"train.{k}" if k not in own and k in train_keys else k, v)
    return layer


def _nested(overrides) -> dict:
    """``{"train.lr": 1}`` or ``["train.lr=1"]`` -> a nested config layer."""
    from .config import parse_overrides, set_dotted

    if isinstance(overrides, (list, tuple)):
        return parse_overrides(list(overrides))
    layer: dict = {}
    for k, v in (overrides or {}).items():
        set_dotted(layer, str(k), v)
    return layer


def _config_layer(config) -> dict:
    from .config import read_config_file

    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    return read_config_file(str(config))


def _check_report_to(report_to: str) -> str:
    if report_to not in REPORT_TO:
        raise ValueError(f"report_to must be one of {list(REPORT_TO)}, got {report_to!r}")
    return report_to


def train_teacher(out, dataset: str | None = None, config=None, overrides=None, resume: bool = False,
                  dry_run: bool = False, progress: bool = True, report_to: str = "none", **keys) -> Run:
    """Train the built-in SD-style teacher into the folder ``out`` (``dataset``: default the config's,
    ``digits``)."""
    from .config import from_dict, merge, to_dict
    from .data.digits import get_dataset
    from .methods.dsm import TeacherConfig, TeacherTraining
    from .train import train

    _check_report_to(report_to)
    layer = merge(merge(merge(_config_layer(config), {"dataset": dataset} if dataset else {}), _nested(overrides)),
                  _key_layer(TeacherConfig, keys))
    cfg = from_dict(TeacherConfig, layer)
    say = _say(progress)
    say(json.dumps(to_dict(cfg), indent=2))
    if dry_run:
        return Run(Path(out), to_dict(cfg))
    data = get_dataset(cfg.dataset, "train")
    method = TeacherTraining(cfg)
    n = sum(p.numel() for p in method.unet.parameters())
    say(f"teacher UNet: {n / 1e6:.2f}M parameters; training {cfg.train.steps} steps -> {out}")
    summary = train(method, data, out, resume=resume, progress=progress, report_to=report_to)
    return Run(Path(out), to_dict(cfg), summary)


def _cached(dataset, teacher, cache_dir, data, progress: bool):
    """Build (or finish) the latent cache on the main process first, with the teacher's VAE and
    text encoders on the accelerator; every process then reads it."""
    from accelerate import PartialState

    from .data.cache import CachedLatents, build_cache

    state = PartialState()
    teacher.to(state.device)
    with state.main_process_first():
        build_cache(dataset, teacher, cache_dir, data, progress=progress and state.is_main_process)
    return CachedLatents(cache_dir)


def distill(teacher, out, method: str = "flash", preset: str = "auto", config=None, overrides=None,
            full: bool = False, dtype: str | None = None, data=None, caption_column: str | None = None,
            cache_latents=None, resume: bool = False, dry_run: bool = False, progress: bool = True,
            report_to: str = "none", **keys) -> Run:
    """Distil the teacher folder ``teacher`` into a few-step student in the run folder ``out``
    (``flashdistill distill``). ``method``: flash, lcm, splam or lightning. Runs under accelerate
    like the CLI (``accelerate launch`` a script that calls this)."""
    from .config import to_dict
    from .data.digits import get_dataset
    from .methods import method_module
    from .train import train

    _check_report_to(report_to)
    module = method_module(method)
    flags = {"full": True} if full else {}
    if dtype:
        flags["dtype"] = dtype
    layers = (_config_layer(config), _nested(overrides), _key_layer(module.Method.config_class, keys), flags)
    cfg, used = module.build_config(os.fspath(teacher), preset, *layers)
    say = _say(progress)
    say(f"method: {method}; preset: {used}")
    say(json.dumps(to_dict(cfg), indent=2))
    if dry_run:
        return Run(Path(out), to_dict(cfg))
    m = module.Method(cfg)
    if data:
        from .data.images import load_image_dataset

        size = m.teacher.meta.get("image_size")
        if size is None:
            raise ValueError("data needs a latent (VAE) teacher; the built-in teacher trains on its own dataset")
        dataset = load_image_dataset(os.fspath(data), size, caption_column)
        say(f"data: {len(dataset):,} captioned images from {data}, at {size}x{size}")
        task = getattr(m, "task", None) or m.teacher.task  # CoDi learns a task its teacher does not have
        if cache_latents and task.keys:
            raise ValueError(f"--cache-latents keeps latents, not images, and this {task.name} "
                             f"{'run' if task is not m.teacher.task else 'teacher'} makes its condition from each "
                             "batch's images: drop --cache-latents")
        if cache_latents:
            dataset = _cached(dataset, m.teacher, os.fspath(cache_latents), os.fspath(data), progress)
            say(f"cache: latents and text embeddings in {cache_latents}")
    elif cache_latents:
        raise ValueError("--cache-latents caches a --data dataset through the teacher's VAE; pass --data PATH")
    elif m.teacher.meta.get("dataset"):
        dataset = get_dataset(m.teacher.meta["dataset"], "train")
    else:
        raise ValueError(f"the teacher {os.fspath(teacher)!r} has no built-in dataset: pass --data PATH "
                         "(image folder with metadata.jsonl, datasets folder, or webdataset .tar shards)")
    share = 100 * m.trainable / m.total
    extra = "".join(f"; {name}: {sum(p.numel() for p in mod.parameters() if p.requires_grad):,}"
                    for name, mod in m.models().items() if name != "student")
    say(f"student: {m.trainable:,} trainable parameters, {share:.2f}% of the teacher's {m.total:,}"
        f" ({'full' if cfg.full else f'LoRA rank {cfg.lora_rank}'}){extra}")
    summary = train(m, dataset, out, resume=resume, progress=progress, report_to=report_to)
    return Run(Path(out), to_dict(cfg), summary)


def _pil(images, scale: int = 1) -> list:
    """Images in [-1, 1] (N, C, H, W) -> PIL images (greyscale for one channel), rounded as the
    PNG grids of ``flashdistill sample`` are; ``scale``: nearest-neighbour upscaling."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to("cpu").byte().permute(0, 2, 3, 1).numpy()
    out = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in x]
    return [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in out] if scale > 1 else out


class Loaded:
    """A teacher or a student, ready to generate (``fd.load``). ``model`` is the internal
    :class:`~flashdistill.models.model.Model` the CLI and the metrics use."""

    def __init__(self, model):
        self.model = model

    @property
    def path(self) -> Path:
        return Path(self.model.path)

    @property
    def meta(self) -> dict:
        return self.model.meta

    @property
    def is_student(self) -> bool:
        return self.model.meta.get("kind") == "student"

    @property
    def step_counts(self) -> list[int]:
        """The step counts a student samples with (its own timesteps); teachers: any."""
        if not self.is_student:
            return []
        counts = set(int(k) for k in self.model.sampling.get("timesteps", {}))
        counts |= set(int(k) for k in self.model.meta.get("stages", {}) or {})
        return sorted(counts)

    @property
    def default_steps(self) -> int:
        counts = self.step_counts
        return (2 if 2 in counts else counts[0]) if counts else TEACHER_STEPS

    @property
    def task(self) -> str:
        """``t2i``, or the conditional task: ``inpaint``, ``sr`` or ``sketch``."""
        return self.model.task.name

    def condition(self, image=None, mask=None, sketch=None, noise_level: int | None = None, n: int = 1) -> dict | None:
        """A conditional model's condition from images (PIL images, or paths of image files; any
        size, resized; converted to grey, except an RGB pipeline's inpainting image), repeated ``n`` times: inpaint takes ``image`` and
        ``mask`` (white = repaint), sr the low-resolution ``image`` (and ``noise_level``, the
        low-res noise augmentation, 0..999; default the model's: 20 for a StableDiffusionUpscalePipeline
        as diffusers, 0 for the digits sr task), sketch a stroke map ``sketch`` (white = stroke)."""
        return condition_from_images(self.model, image, mask, sketch, noise_level, n)

    def generate_tensor(self, prompts, steps: int | None = None, seed: int = 0, guidance: float | None = None,
                        sampler: str | None = None, condition: dict | None = None,
                        guidance_interval: tuple[float, float] | None = None):
        """Images in [-1, 1], float32 (N, C, H, W); image i uses seed ``seed + i`` (as ``sample``).
        Conditional models take ``condition`` (see :meth:`condition`), one item per prompt. Teachers
        guide only at timesteps in ``guidance_interval`` = (lo, hi) when it is given."""
        from .sample import sample

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty: pass a prompt or a list of prompts")
        seeds = [int(seed) + i for i in range(len(prompts))]
        return sample(self.model, prompts, seeds, steps or self.default_steps, guidance=guidance, sampler=sampler,
                      condition=condition, guidance_interval=guidance_interval)

    def generate(self, prompts, steps: int | None = None, seed: int = 0, guidance: float | None = None,
                 sampler: str | None = None, scale: int = 1, condition: dict | None = None,
                 guidance_interval: tuple[float, float] | None = None) -> list:
        """PIL images, one per prompt (a string is one prompt). Students sample with their own
        few-step sampler and no CFG (``steps`` default 2; a full LCM student with a w-embedding is
        told ``guidance`` instead, within its trained range, default its own); teachers with
        ``sampler`` and CFG ``guidance`` (default 32 steps of DPM-Solver++ at the teacher's scale),
        applied only at timesteps in ``guidance_interval`` = (lo, hi) when it is given."""
        return _pil(self.generate_tensor(prompts, steps, seed, guidance, sampler, condition, guidance_interval), scale)

    def pipeline_kwargs(self, steps: int) -> dict:
        """Keyword arguments of the diffusers pipeline call that sample this student with ``steps``
        steps: its own timesteps (``sigmas`` for SD3; none for the upscaler, whose exported scheduler
        picks them from the step count), guidance off (a full LCM student with a w-embedding: its
        own scale, which the pipeline embeds instead of running CFG)."""
        from .exporting import NO_TIMESTEPS_ARG
        from .models.student import student_timesteps

        ts = student_timesteps(self._stage(steps).sampling, steps)
        told = self._stage(steps).sampling.get("w_embedding")
        kw = {"num_inference_steps": steps, "guidance_scale": float(told["guidance"]) if told else 1.0}
        if self.meta.get("family") == "sd3":
            kw["sigmas"] = (ts / 1000).tolist()
        elif self.meta.get("pipeline") not in NO_TIMESTEPS_ARG:  # the upscaler: its scheduler picks them
            kw["timesteps"] = ts.long().tolist()
        elif ts.tolist() != self.meta["sampling"]["timesteps"].get(str(steps)):
            raise ValueError(f"{self.meta['pipeline']} takes no timesteps=, so the stock pipeline cannot sample at "
                             f"the chosen {ts.long().tolist()}; its scheduler picks them from the step count")
        if self.meta.get("family") == "pixart":
            kw["use_resolution_binning"] = False
        return kw

    def _stage(self, steps: int | None):
        from .sample import stage_model

        return stage_model(self.model, steps) if steps else self.model

    def pipeline(self, steps: int | None = None):
        """The stock diffusers pipeline of a pipeline teacher (SD1.5/2, SDXL, PixArt, SD3) with this
        student fused in and its few-step scheduler set; call it with ``**pipeline_kwargs(steps)``.
        Runs with one student per step count (SDXL-Lightning) need ``steps``."""
        from .models.student import scheduler_class

        family = self.meta.get("family", "digits")
        pipe = getattr(self.model.conditioner, "pipe", None)
        if pipe is None:
            raise ValueError(f"{str(self.path)!r} is a {family} model, not a diffusers pipeline (the built-in digits "
                             "teacher pairs its UNet with a MiniLM text encoder): use .generate()")
        if self.meta.get("stages") and steps is None:
            raise ValueError(f"{str(self.path)!r} keeps one student per step count {self.step_counts}: pass steps")
        if not self.is_student:
            return pipe
        model = self._stage(steps)
        from .models.adapters import lora_root

        backbone = model.denoiser.backbone
        if self.meta.get("conditioning") == "controlnet":  # CoDi: the teacher's pipeline as its ControlNet pipeline
            import diffusers

            pipe = getattr(diffusers, self.meta["pipeline"]).from_pipe(pipe, controlnet=backbone.controlnet)
        setattr(pipe, "transformer" if family in ("pixart", "sd3") else "unet", lora_root(backbone))
        config = model.meta["scheduler_config"]
        pipe.scheduler = scheduler_class(config).from_config(config)
        return pipe


def _read_image(image, size: int, what: str, channels: int = 1):
    """An image file or PIL image as a (1, channels, size, size) tensor in [0, 1] (box-resampled;
    1 channel: grey, 3: RGB)."""
    import numpy as np
    import torch
    from PIL import Image

    if image is None:
        raise ValueError(f"missing {what}")
    if not isinstance(image, Image.Image):
        if not Path(os.fspath(image)).is_file():
            raise ValueError(f"{what} {str(image)!r} is not a file")
        try:
            image = Image.open(os.fspath(image))
            image.load()
        except Exception as e:
            raise ValueError(f"{what} {str(image)!r} is not a readable image: {e}") from None
    pixels = np.asarray(image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BOX),
                        dtype=np.float32) / 255.0
    return torch.from_numpy(pixels.reshape(size, size, channels)).permute(2, 0, 1)[None]


def condition_from_images(model, image=None, mask=None, sketch=None, noise_level: int | None = None,
                          n: int = 1) -> dict | None:
    """The condition of a conditional model from user images (see :meth:`Loaded.condition`);
    None for text-to-image models, which take no image."""
    import torch

    task = model.task.name
    channels, size = model.pixel_shape[0], model.pixel_shape[-1]
    given = {k for k, v in (("image", image), ("mask", mask), ("sketch", sketch)) if v is not None}
    wanted = set(model.task.inputs)
    if given != wanted:
        need = ", ".join(f"--{k}" for k in sorted(wanted)) or "no image"
        from .tasks import article

        raise ValueError(f"{str(model.path)!r} is {article(task)} {task!r} model: it takes {need}, got "
                         f"{', '.join(f'--{k}' for k in sorted(given)) or 'none'}")
    top = int(model.meta.get("max_noise_level", 999))  # an upscale pipeline's own limit (350 for the x4 upscaler)
    noise_level = model.default_noise_level if noise_level is None else noise_level
    if not 0 <= int(noise_level) <= top:
        raise ValueError(f"noise_level must be in [0, {top}], got {noise_level}")
    if task == "t2i":
        return None
    rep = lambda x: x.expand(n, *x.shape[1:]).clone()  # noqa: E731
    if task == "inpaint":
        return {"image": rep(_read_image(image, size, "--image", channels) * 2 - 1),
                "mask": rep((_read_image(mask, size, "--mask") > 0.5).float())}
    if task == "sr":
        low = _read_image(image, size // model.task.factor, "--image", channels) * 2 - 1
        return {"low_res": rep(low), "noise_level": torch.full((n,), int(noise_level), dtype=torch.long)}
    return {"sketch": rep((_read_image(sketch, size, "--sketch") > 0.5).float())}


def load(path, teacher=None, device: str = "cpu", extra_loras=(), timesteps=None) -> Loaded:
    """A teacher folder (built-in or diffusers pipeline), a distillation run or a LoRA folder;
    ``teacher``: the run's teacher folder when it is no longer where the run recorded it;
    ``extra_loras``: (LoRA, scale) pairs stacked on the model (a style LoRA on a student); a scale
    is a number or per-UNet-block scales, ``{"mid": 0.5}`` (:func:`~flashdistill.models.loading.scale_lora_blocks`);
    a (LoRA, scale, (lo, hi)) triple applies that LoRA only at the calls whose timestep is in [lo, hi]
    (one per model; e.g. (0, 998): every call of a student but its first, at t = 999).
    ``timesteps``: a student samples at these (high to low) at ``len(timesteps)`` steps, in place
    of its run's table, or at several such lists, one per step count
    (:func:`~flashdistill.models.student.with_timesteps`); also in :meth:`Loaded.pipeline_kwargs`."""
    return Loaded(_load_model(path, teacher, device, extra_loras, timesteps))


def _load_model(path, teacher=None, device: str = "cpu", extra_loras=(), timesteps=None):
    from .models.loading import load_model
    from .models.student import with_timesteps

    model = load_model(os.fspath(path), device=device, teacher=None if teacher is None else os.fspath(teacher),
                       extra_loras=[(os.fspath(p), *rest) for p, *rest in extra_loras])
    return model if timesteps is None else with_timesteps(model, timesteps)


def _moved_teacher(run, teacher):
    """evaluate's ``teacher`` (the reference) also stands in for a run's teacher, but only when the
    run's recorded teacher folder is gone: it never swaps the base of a loadable run."""
    from .models.loading import read_meta
    from .models.model import is_pipeline_folder

    if teacher is None or is_pipeline_folder(run):
        return None
    meta = read_meta(Path(run))
    return teacher if meta.get("kind") == "student" and not Path(meta["teacher"]).exists() else None


def _eval_inputs(model, num_samples: int, seed_set: int = 0):
    """Prompts, labels, seeds, condition and true images of the digits evaluation (condition and
    truth None for text-to-image models); ``seed_set``: :func:`~flashdistill.scoring.seed_set_args`."""
    from .scoring import eval_prompts, eval_set, seed_set_args

    chosen = seed_set_args(seed_set)
    if model.task.keys:
        return eval_set(num_samples, model.task, **chosen)
    return (*eval_prompts(num_samples, chosen["seed"]), None, None)


def teacher_reference(teacher, num_samples: int, guidance: float | None = None, progress: bool = False,
                      seed_set: int = 0):
    """The teacher's 32-step samples on the digits evaluation prompts and seeds (and conditions):
    what teacher MSE is measured against."""
    from .sample import sample

    prompts, _, seeds, condition, _ = _eval_inputs(teacher, num_samples, seed_set)
    return sample(teacher, prompts, seeds, TEACHER_STEPS, guidance=guidance, progress=progress, condition=condition)


def score_digits(model, num_samples: int, steps: list[int], guidance: float | None = None, sampler: str | None = None,
                 reference=None, progress: bool = False, style: str | None = None, samples: dict | None = None,
                 seed_set: int = 0, guidance_interval: tuple[float, float] | None = None) -> list[dict]:
    """FD, pixel FD, histogram distance, adherence (and teacher MSE against ``reference``) of
    ``model`` on the digits prompts, one row per step count; conditional models also get their
    task's consistency metrics and the per-condition diversity (docs/metrics.md). ``style``: score
    against that style's test split (default: the style of the model's LoRA, if any). ``samples``:
    step count -> images already sampled on these prompts, seeds and settings (such as the
    ``reference`` itself at 32 steps), scored instead of sampled again. ``seed_set``: other sample
    seeds and condition draws on the same test digits (0: the usual ones)."""
    from tqdm.auto import tqdm

    from .scoring import diversity, diversity_set, score, seed_set_args
    from .sample import sample

    task = model.task
    prompts, labels, seeds, condition, truth = _eval_inputs(model, num_samples, seed_set)
    if task.keys:
        d_prompts, d_seeds, d_condition = diversity_set(task, **seed_set_args(seed_set))
    rows = []
    for n in tqdm(steps, desc="evaluate", disable=not progress, unit="row"):
        images = (samples or {}).get(n)
        if images is None:
            images = sample(model, prompts, seeds, n, guidance=guidance, sampler=sampler, condition=condition,
                            guidance_interval=guidance_interval)
        row = {"steps": n, **score(images, labels, reference, style=style or model.meta.get("style", "none"))}
        if task.keys:
            spread = sample(model, d_prompts, d_seeds, n, guidance=guidance, sampler=sampler, condition=d_condition,
                            guidance_interval=guidance_interval)
            row.update({"task": task.name, **task.metrics(images, condition, truth), "diversity": diversity(spread)})
        rows.append(row)
    return rows


def evaluate(model, steps=None, num_samples: int = 1000, teacher=None, guidance: float | None = None,
             sampler: str | None = None, teacher_guidance: float | None = None, prompts=None, protocol=None,
             reference=None, inception_weights=None, clip_model=None, extra_loras=(),
             progress: bool = False, seed_set: int = 0, timesteps=None,
             guidance_interval: tuple[float, float] | None = None) -> list[dict]:
    """Score a teacher or a run, one row (a dict) per step count.

    Digits models: FD, pixel FD, histogram distance and adherence on ``num_samples`` digits prompts
    (and ``teacher_mse`` against ``teacher``'s 32-step output). Real models: FID against the
    ``reference`` image folder and CLIP score on ``prompts`` (local weights only). ``extra_loras``:
    (LoRA, scale) pairs, or (LoRA, scale, (lo, hi)) triples, stacked on the model (:func:`load`); a style LoRA's digits rows are scored against that
    style's test set (``fd``, ``pixel_fd``, ``hist``), with ``fd_unstyled`` and ``ink`` beside.
    ``seed_set``: digits models only, a second (third, ...) set of sample seeds and condition draws
    on the same test digits, to check a choice made on the usual set (0). ``steps``: default 32
    for teachers, a student's own step counts. ``timesteps``: a student samples at these (high to
    low) at ``len(timesteps)`` steps, or at several such lists, one per step count; each student
    row carries the ``timesteps`` it sampled at. ``guidance_interval``: teachers apply CFG only at
    timesteps in (lo, hi) (Kynkäänniemi et al. 2024); ``teacher``'s reference keeps full guidance."""
    from .models.student import student_timesteps, timestep_tables

    path = os.fspath(model)
    teacher = None if teacher is None else os.fspath(teacher)
    m = _load_model(path, _moved_teacher(path, teacher), extra_loras=extra_loras, timesteps=timesteps)
    tables = timestep_tables(timesteps) if timesteps else []
    if steps is None:
        steps = (sorted(len(ts) for ts in tables) if tables else Loaded(m).step_counts) or [TEACHER_STEPS]
    steps = [steps] if isinstance(steps, int) else list(steps)
    for ts in tables:
        if len(ts) not in steps:
            raise ValueError(f"--timesteps gives {len(ts)} timestep(s) ({' '.join(map(str, ts))}), so {len(ts)} steps, "
                             f"but --steps is {' '.join(map(str, steps))}: drop --steps or include {len(ts)}")
    rows = _evaluate(m, path, steps, num_samples, teacher, guidance, sampler, teacher_guidance, prompts, protocol,
                     reference, inception_weights, clip_model, progress, seed_set, guidance_interval)
    if m.meta.get("kind") == "student":
        table = m.sampling.get("timesteps", {})
        for r in rows:
            if str(r["steps"]) in table:  # (a Lightning stage's own table is in its folder)
                r["timesteps"] = [int(t) for t in student_timesteps(m.sampling, r["steps"])]
    return rows


def _evaluate(m, path, steps, num_samples, teacher, guidance, sampler, teacher_guidance, prompts, protocol, reference,
              inception_weights, clip_model, progress, seed_set, guidance_interval=None) -> list[dict]:
    from .models.loading import load_model

    if m.meta.get("dataset") != "digits":
        if seed_set:
            raise ValueError(f"--seed-set {seed_set}: seed sets are the built-in digits evaluation's; {path} is "
                             "scored on --prompts / --reference")
        return _evaluate_real(m, steps, num_samples, guidance, prompts, protocol, reference, inception_weights, clip_model,
                              progress, guidance_interval)
    ignored = [name for name, value in (("--prompts", prompts), ("--protocol", protocol), ("--reference", reference),
                                        ("--inception-weights", inception_weights), ("--clip-model", clip_model)) if value]
    if ignored:
        raise ValueError(f"{path} is a digits model, scored on the built-in digits metrics; "
                         f"{', '.join(ignored)} only apply to real models: drop them")
    ref = teacher_reference(load_model(teacher), num_samples, teacher_guidance, progress, seed_set) if teacher else None
    return score_digits(m, num_samples, steps, guidance, sampler, ref, progress, seed_set=seed_set,
                        guidance_interval=guidance_interval)


def _evaluate_real(model, steps, num_samples, guidance, prompts, protocol, reference, inception_weights, clip_model,
                   progress: bool = False, guidance_interval=None):
    from .metrics import (PROTOCOLS, MetricUnavailable, clip_scorer, evaluate_real, inception_extractor,
                          read_prompts, reference_features, reference_files)

    if not prompts:
        raise ValueError("this model is not a digits model: pass --prompts FILE (COCO captions JSON or one prompt "
                         "per line), and --reference DIR for FID")
    if model.task.keys and not reference:
        raise ValueError(f"{str(model.path)!r} is a conditional ({model.task.name}) model: pass --reference DIR, whose "
                         "images give the conditions (sample i: image i) as well as FID's reference")
    n = PROTOCOLS[protocol] if protocol else num_samples
    texts = read_prompts(os.fspath(prompts), n if protocol else None)[:n]
    try:
        extractor = inception_extractor(inception_weights) if reference else None
        scorer = clip_scorer(clip_model) if clip_model or not reference else None
    except MetricUnavailable as e:
        raise ValueError(str(e)) from None
    feats = reference_features(os.fspath(reference), extractor) if reference else None
    files = reference_files(os.fspath(reference)) if model.task.keys else None
    return evaluate_real(model, texts, steps, guidance, feats, extractor, scorer, progress=progress,
                         condition_files=files, guidance_interval=guidance_interval)


def export(run, out, format: str = "diffusers", teacher=None, num_samples: int = 500, progress: bool = False,
           timesteps=None) -> Path:
    """Write a run as files other tools load: ``diffusers`` (``pipe.load_lora_weights``, a scheduler
    config and a model card; digits runs get metrics from ``num_samples`` samples per row) or
    ``kohya`` (one ``.safetensors`` LoRA for ComfyUI / A1111 / Forge, SD1.5 and SDXL teachers).
    ``timesteps``: the diffusers export samples at these (high to low) at ``len(timesteps)`` steps
    (or several such lists, one per step count) instead of the run's table (written to ``flashdistill_sampling.json``, the model card and its
    metrics)."""
    from .exporting import FORMATS, export as export_diffusers, export_kohya
    from .models.loading import load_model, read_meta
    from .models.student import timestep_tables

    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    run, teacher = os.fspath(run), None if teacher is None else os.fspath(teacher)
    if format == "kohya":
        if timesteps:
            raise ValueError("--timesteps: ComfyUI / A1111 / Forge take a step count, not timesteps; use --format "
                             "diffusers, whose pipelines take timesteps=")
        return export_kohya(run, out, teacher=teacher)
    metrics = None
    student = _load_model(run, teacher, timesteps=timesteps) if timesteps else None  # the chosen tables
    if read_meta(Path(run)).get("kind") == "student" and num_samples:
        student = student or load_model(run, teacher=teacher)
        if student.meta.get("dataset") == "digits":  # metrics for the model card
            t = load_model(student.meta["teacher"])
            # (CoDi's teacher is text-to-image: no same-condition reference to compare with)
            ref = teacher_reference(t, num_samples, progress=progress) if t.task.name == student.task.name else None
            counts = sorted({1, 2, 4} | {len(ts) for ts in timestep_tables(timesteps or [])})
            rows = score_digits(student, num_samples, counts, reference=ref, progress=progress)
            mse = (f"teacher MSE against the teacher's 32-step output at w = {t.default_guidance:g}" if ref is not None
                   else "no teacher MSE (the teacher is text-to-image, the student conditional)")
            metrics = {"rows": [{**r, "nfe": r["steps"]} for r in rows],
                       "note": f"Digits task, {num_samples} samples per row (see the flashdistill README for the "
                               f"metrics); {mse}."}
    return export_diffusers(run, out, metrics, teacher=teacher, sampling=student.sampling if timesteps else None)
