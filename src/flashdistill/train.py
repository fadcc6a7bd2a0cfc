"""The one training loop: accelerate, devices and precision, data order, checkpoints and resume,
signals, logging and progress. Methods (``flashdistill.methods.*``) only compute losses.

A method object provides:
- ``config``: its typed config, with a ``train`` field of type :class:`TrainConfig`;
- ``models() -> dict[str, nn.Module]``: the trainable models, each with its own AdamW;
- ``optimizer_settings(name) -> dict``: AdamW keyword arguments for that model;
- ``setup(device)``: move frozen parts (teacher, text encoder) to the device;
- ``step(batch, step, models, generator) -> (losses, logs)``: ``losses`` is an ordered list of
  ``(model_name, loss)``; each loss is back-propagated into that model's parameters only, and
  that model's optimizer steps. ``models`` are the prepared (possibly DDP-wrapped) models;
- ``preview(models, generator) -> (images, nrow)``: a sample grid in [-1, 1];
- ``finalize(out_dir, models)``: write the final artifacts (a teacher folder, a student...);
- optionally ``at_step(step, models) -> {model_name: {"lr": ..., "betas": ..., "reset": bool}}``,
  called once per optimizer step before its micro-batches: per-model optimizer settings for that
  step (progressive stages), ``reset`` clearing that model's optimizer state (a re-initialised
  discriminator);
- optionally ``state_tensors() -> dict[str, Tensor]`` and ``load_state_tensors(tensors)``: state
  that is not a trained model but must survive a resume (an EMA target network), saved with
  every checkpoint as ``method.safetensors``;
- optionally ``rank_state_tensors()`` and ``load_rank_state_tensors(tensors)``: the same for state
  that differs between processes (a replay buffer of this process's batches), saved by every
  process as ``method_rank<r>.safetensors``.
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from . import checkpoint as ckpt
from .config import field, to_dict


@dataclass
class TrainConfig:
    steps: int = field(1000, "optimizer steps to train for")
    batch_size: int = field(64, "samples per process per micro-batch")
    grad_accum: int = field(1, "micro-batches accumulated per optimizer step")
    seed: int = field(0, "seed for data order, noise and initialisation")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field("auto", "'auto' uses bf16 on GPUs that support it, fp32 on CPU")
    max_grad_norm: float = field(1.0, "gradient clipping norm (0 disables)")
    checkpoint_every: int = field(500, "steps between checkpoints (a final one is always written)")
    keep_checkpoints: int = field(2, "how many checkpoints to keep")
    sample_every: int = field(0, "steps between preview grids written to RUN/samples (0: only at the end)")
    log_every: int = field(10, "steps between lines in RUN/log.jsonl")
    compile: bool = field(False, "torch.compile (inductor, static shapes) the no-grad calls of the teacher's and the "
                                 "student's backbone (teacher solve, CFG scores, DMD fake score); calls with gradients stay "
                                 "eager. Float rounding ~1e-6 apart; on the digits teacher 1.34x the samples/s of a Flash step "
                                 "with a fresh teacher solve after about a minute of compilation (docs/quality.md section 11); "
                                 "previews and export run eager")
    gradient_checkpointing: bool = field(False, "recompute the trainable backbones' activations during backward "
                                                "(diffusers' enable_gradient_checkpointing): less memory, more compute")
    ema_decay: float = field(0.0, "EMA of the trainable weights (0: off; step t uses min(decay, (1+t)/(10+t))); the final model and the last preview use it")
    on_nonfinite: Literal["stop", "skip"] = field(
        "stop", "a NaN or Inf loss term: 'stop' names the term and the step and keeps the last good checkpoint; "
        "'skip' drops that step's update and counts it in the log")

    def validate(self):
        for k in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, k) <= 0:
                raise ValueError(f"train.{k} must be > 0, got {getattr(self, k)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.sample_every < 0:
            raise ValueError(f"train.sample_every must be >= 0, got {self.sample_every}")


class EMA:
    """Exponential moving average of a model's trainable weights, with the usual warm-up
    ``decay_t = min(decay, (1 + t) / (10 + t))``."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))


class NonFiniteLoss(RuntimeError):
    """A loss term was NaN or Inf (``train.on_nonfinite = stop``); nothing from that step was saved."""

    def __init__(self, step: int, terms: list[str]):
        super().__init__(f"non-finite loss at step {step}: {', '.join(repr(t) for t in terms)}; the last good "
                         "checkpoint is kept (resume with --resume, or set train.on_nonfinite=skip)")
        self.step, self.terms = step, terms


def _nonfinite_terms(losses, logs: dict) -> list[str]:
    """Names of the loss terms (optimised losses and logged diagnostics) that are NaN or Inf."""
    bad = [f"{name} (optimised)" for name, loss in losses if not bool(torch.isfinite(loss.detach()).all())]
    bad += [k for k, v in logs.items() if not math.isfinite(float(v))]
    return bad


class TrainingInterrupted(Exception):
    """Raised after a clean save when SIGINT/SIGTERM stopped training."""

    def __init__(self, step: int, signum: int, resume: str = "resume with --resume"):
        super().__init__(f"interrupted by signal {signum} at step {step}; checkpoint saved, {resume}")
        self.step, self.signum = step, signum


def _has_accelerator() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def resolve_precision(mode: str) -> str:
    if mode != "auto":
        return mode
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class DeterministicBatches:
    """Global sample order is a fresh seeded permutation per epoch; each process takes its slice.

    Position is a pure function of (step, micro-batch), so a resumed run sees the same data as an
    unbroken one without saving any loader state.
    """

    def __init__(self, dataset, batch_size: int, grad_accum: int, seed: int, rank: int, world: int):
        self.dataset, self.bs, self.accum = dataset, batch_size, grad_accum
        self.seed, self.rank, self.world = seed, rank, world
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.dataset), generator=g), epoch
        return self._perm

    def get(self, step: int, micro: int) -> dict:
        n = len(self.dataset)
        start = ((step * self.accum + micro) * self.world + self.rank) * self.bs
        idx = [int(self._perm_for((start + j) // n)[(start + j) % n]) for j in range(self.bs)]
        items = [self.dataset[i] for i in idx]
        return {k: torch.stack([it[k] for it in items]) if torch.is_tensor(items[0][k]) else [it[k] for it in items] for k in items[0]}


def _proc_status_gb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return None


def peak_memory_gb(device) -> float:
    """Peak memory of this process, GB: allocated CUDA memory on a GPU, else the resident set's
    high-water mark (Linux ``VmHWM``, which :func:`reset_peak_memory` resets; elsewhere
    ``ru_maxrss``, since the process started; everything the process holds, libraries included)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    hwm = _proc_status_gb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def reset_peak_memory(device) -> dict:
    """Start a new peak (so the training peak is not the loading transient); returns what the
    process holds now and its peak so far, GB."""
    now = {"load_peak_gb": round(peak_memory_gb(device), 3)}
    if torch.device(device).type == "cuda":
        now["at_start_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 3)
        torch.cuda.reset_peak_memory_stats(device)
        return now
    now["at_start_gb"] = round(_proc_status_gb("VmRSS") or 0.0, 3)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass
    return now


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """diffusers' gradient checkpointing on the outermost diffusers models inside ``model`` (the
    student backbone, a discriminator's encoder copy; each switches its own sub-models); returns how
    many were switched on."""
    found: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(f + ".") or f == "" for f in found):
            continue
        if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()
            found.append(name)
    return len(found)


def compile_models(modules, device) -> list[torch.nn.Module]:
    """:func:`~flashdistill.models.denoiser.compile_forward` on each distinct module (``train.compile``);
    returns them. On CPU inductor builds C++, so a missing compiler is named here rather than at
    the first step."""
    import shutil

    from .models.denoiser import compile_forward

    if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise ValueError("train.compile=true needs a C++ compiler on CPU (inductor builds its kernels with g++ or "
                         "clang++; e.g. apt install g++), or set train.compile=false")
    distinct = list({id(m): m for m in modules}.values())
    for m in distinct:
        compile_forward(m)
    return distinct


def save_image_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 1):
    """Images in [-1, 1] (N, C, H, W) -> one PNG grid, nearest-upscaled ``scale`` times; returns
    the grid as a PIL image."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 1) + 1, nrow * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def _record_rank_checksums(acc, models: dict, path: Path) -> None:
    """Gather a float64 checksum of every model's trainable weights from every process into
    ``ranks.json``: equal values mean the processes ended with identical weights (DDP in sync)."""
    sums = {}
    for n, m in models.items():
        params = [p.detach().double() for p in m.parameters() if p.requires_grad]
        local = torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)]).to(acc.device)
        sums[n] = acc.gather(local[None]).cpu().tolist()
    if acc.is_main_process:
        path.write_text(json.dumps({"processes": acc.num_processes, "checksums": sums}, indent=2))


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config as flat scalars for a tracker's hyperparameters (lists as text)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def train(method, dataset, out_dir: str | Path, resume: bool = False, progress: bool = True,
          report_to: str = "none") -> dict:
    """Run ``method`` on ``dataset`` under accelerate; returns a summary dict. ``report_to``
    (tensorboard, wandb or none) also sends the log lines, learning rates and preview grids to
    that accelerate tracker."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .models.denoiser import uncompile_forward

    cfg = method.config.train
    out = Path(out_dir)
    # cpu=True on machines without an accelerator: with it, a torchrun-style launch (accelerate
    # launch --multi_gpu --num_processes N) becomes MULTI_CPU over gloo instead of N lone processes.
    tracking = {}
    if report_to != "none":
        from accelerate.utils import ProjectConfiguration

        tracking = {"log_with": report_to,
                    "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard"))}
    acc = Accelerator(mixed_precision=resolve_precision(cfg.mixed_precision), cpu=not _has_accelerator(), **tracking)
    if tracking:
        acc.init_trackers("flashdistill", config=_flat(to_dict(method.config)),
                          init_kwargs={"wandb": {"name": out.name, "dir": str(out)}})
    acc.print(f"accelerate: {acc.num_processes} process(es), {acc.distributed_type.value}, device {acc.device}, "
              f"precision {acc.mixed_precision}")
    set_seed(cfg.seed, device_specific=False)  # identical init on every process
    ckpt_root = out / "checkpoints"
    if acc.is_main_process:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(method.config), indent=2))
    acc.wait_for_everyone()

    method.setup(acc.device)
    names = list(method.models())
    raw_models = [method.models()[n] for n in names]
    if cfg.gradient_checkpointing and not sum(enable_gradient_checkpointing(m) for m in raw_models):
        raise ValueError("train.gradient_checkpointing: none of the trainable models is a diffusers model that supports it")
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], **method.optimizer_settings(n))
            for n, m in zip(names, raw_models)]
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    compiled = compile_models(method.compile_targets() if hasattr(method, "compile_targets") else raw_models,
                              acc.device) if cfg.compile else []
    prepared = acc.prepare(*raw_models, *opts)
    models = dict(zip(names, prepared[: len(names)]))
    optims = dict(zip(names, prepared[len(names):]))
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + acc.process_index)
    emas = {n: EMA(acc.unwrap_model(models[n]), cfg.ema_decay) for n in names} if cfg.ema_decay > 0 else {}

    start = 0
    if resume:
        found, problems = ckpt.latest_valid(ckpt_root)
        for line in problems:
            acc.print(f"warning: {line}")
        if found is None:
            acc.print(f"resume: no checkpoint in {ckpt_root} yet, starting from step 0")
        else:
            for n in names:
                ckpt.load_trainable(acc.unwrap_model(models[n]), ckpt.load_file_tensors(found / f"{n}.safetensors"))
                ckpt.load_optimizer(optims[n].optimizer, found / f"{n}.optim")
                if n in emas:
                    emas[n].shadow = {k: v.to(acc.device) for k, v in ckpt.load_file_tensors(found / f"{n}.ema.safetensors").items()}
            if hasattr(method, "state_tensors"):
                method.load_state_tensors({k: v.to(acc.device) for k, v in ckpt.load_file_tensors(found / "method.safetensors").items()})
            if hasattr(method, "load_rank_state_tensors"):
                own = found / f"method_rank{acc.process_index}.safetensors"
                method.load_rank_state_tensors({k: v.to(acc.device) for k, v in ckpt.load_file_tensors(own).items()}
                                               if own.exists() else {})
            ckpt.load_rng(generator, found / f"rng_rank{acc.process_index}.safetensors")
            state = json.loads((found / "state.json").read_text())
            start = state["step"]
            acc.print(f"resumed from {found} at step {start}")
            if state.get("total_steps", cfg.steps) != cfg.steps:
                acc.print(f"warning: the checkpoint was written by a run of {state['total_steps']} steps and this one has "
                          f"{cfg.steps}; step-dependent schedules (learning rate, phases) differ from an unbroken run")

    def save(step: int) -> None:
        stage = ckpt.staging_dir(ckpt_root, step)
        if acc.is_main_process:
            stage.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            for n in names:
                ckpt.save_file_tensors(ckpt.trainable_state(acc.unwrap_model(models[n])), stage / f"{n}.safetensors")
                ckpt.save_optimizer(optims[n].optimizer, stage / f"{n}.optim")
                if n in emas:
                    ckpt.save_file_tensors({k: v.cpu().contiguous() for k, v in emas[n].shadow.items()}, stage / f"{n}.ema.safetensors")
            if hasattr(method, "state_tensors"):
                ckpt.save_file_tensors({k: v.detach().cpu().contiguous() for k, v in method.state_tensors().items()},
                                       stage / "method.safetensors")
            (stage / "state.json").write_text(json.dumps({"step": step, "total_steps": cfg.steps}))
        ckpt.save_rng(generator, stage / f"rng_rank{acc.process_index}.safetensors")
        if hasattr(method, "rank_state_tensors"):
            ckpt.save_file_tensors({k: v.detach().cpu().contiguous() for k, v in method.rank_state_tensors().items()},
                                   stage / f"method_rank{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.write_checksums(stage)
            ckpt.commit(ckpt_root, step, cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def preview(step: int) -> None:
        import numpy as np

        if acc.is_main_process:
            with torch.compiler.set_stance("force_eager"):  # sampling shapes would each cost a compilation
                images, nrow = method.preview({n: acc.unwrap_model(m) for n, m in models.items()}, torch.Generator().manual_seed(0))
            grid = save_image_grid(images, out / "samples" / f"step_{step:08d}.png", nrow, scale=4)
            image = np.asarray(grid.convert("RGB")) if acc.trackers else None  # HWC uint8
            for tracker in acc.trackers:  # tensorboard: a batch of NHWC images; wandb: a list
                if tracker.name == "tensorboard":
                    tracker.log_images({"preview": image[None]}, step=step, dataformats="NHWC")
                else:
                    tracker.log_images({"preview": [image]}, step=step)

    stop = {"signum": 0}

    def on_signal(signum, _frame):
        stop["signum"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    batches = DeterministicBatches(dataset, cfg.batch_size, cfg.grad_accum, cfg.seed, acc.process_index, acc.num_processes)
    log_path = out / "log.jsonl"
    bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and acc.is_main_process), desc="train", dynamic_ncols=True)
    t0, step = time.time(), start
    memory = {"measure": "cuda max_memory_allocated" if acc.device.type == "cuda" else "peak resident set (VmHWM)",
              **reset_peak_memory(acc.device)}
    try:
        for n in names:
            models[n].train()
        while step < cfg.steps:
            logs: dict = {}
            skipped = False
            if hasattr(method, "at_step"):
                for n, settings in method.at_step(step, models).items():
                    if settings.get("reset"):
                        optims[n].optimizer.state.clear()
                    for group in optims[n].param_groups:
                        group["initial_lr"] = settings.get("lr", group["initial_lr"])
                        if "betas" in settings:
                            group["betas"] = tuple(settings["betas"])
            for micro in range(cfg.grad_accum):
                batch = batches.get(step, micro)
                with acc.autocast():
                    losses, step_logs = method.step(batch, step, models, generator)
                bad = _nonfinite_terms(losses, step_logs)
                if bad:
                    if cfg.on_nonfinite == "stop":
                        raise NonFiniteLoss(step + 1, bad)
                    skipped = True
                    break
                for n, loss in losses:
                    params = [p for p in models[n].parameters() if p.requires_grad]
                    acc.backward(loss / cfg.grad_accum, inputs=params)
                for k, v in step_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
            if skipped:  # train.on_nonfinite = skip: no update from this step, counted in the log
                for opt in optims.values():
                    opt.zero_grad(set_to_none=True)
                logs = {"skipped_nonfinite": 1}
                losses = []
            factor = method.lr_factor(step) if hasattr(method, "lr_factor") else 1.0
            for n in dict.fromkeys(n for n, _ in losses):  # in the order the method returned them
                for group in optims[n].param_groups:
                    group["lr"] = group["initial_lr"] * factor
                if cfg.max_grad_norm > 0:
                    logs[f"grad_norm/{n}"] = float(acc.clip_grad_norm_(models[n].parameters(), cfg.max_grad_norm))
                optims[n].step()
                if n in emas:
                    emas[n].update(acc.unwrap_model(models[n]), step)
                optims[n].zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if not k.startswith("grad_norm")}, refresh=False)
            if acc.is_main_process and (step % cfg.log_every == 0 or step == cfg.steps):
                line = {"step": step, "time": round(time.time() - t0, 3), **logs, "peak_mem_gb": round(peak_memory_gb(acc.device), 3)}
                with log_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                if tracking:
                    acc.log({**{k: v for k, v in line.items() if k != "step"},
                             **{f"lr/{n}": opt.param_groups[0]["lr"] for n, opt in optims.items()}}, step=step)
            flag = torch.tensor([float(stop["signum"])], device=acc.device)
            if acc.num_processes > 1:
                flag = acc.reduce(flag, reduction="max")
            if flag.item() > 0:
                save(step)
                raise TrainingInterrupted(step, int(flag.item()))
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save(step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                preview(step)
        save(step)
        if acc.is_main_process:  # before previews and export: the training peak
            (out / "memory.json").write_text(json.dumps({**memory, "train_peak_gb": round(peak_memory_gb(acc.device), 3),
                                                         "steps": step - start}, indent=2))
        for n, ema in emas.items():  # from here on the models hold their EMA weights
            ema.copy_to(acc.unwrap_model(models[n]))
        for m in compiled:  # what follows (previews, export) and whoever holds the models next run eager
            uncompile_forward(m)
        preview(step)
        _record_rank_checksums(acc, models, out / "ranks.json")
        if acc.is_main_process:
            method.finalize(out, {n: acc.unwrap_model(m) for n, m in models.items()})
        acc.wait_for_everyone()
    finally:
        for m in compiled:
            uncompile_forward(m)
        bar.close()
        if tracking:
            acc.end_training()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return {"steps": step, "seconds": time.time() - t0, "processes": acc.num_processes}
