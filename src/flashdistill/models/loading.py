"""Model folders on disk.

A *teacher folder* is either

- the built-in teacher's diffusers-format folder: ``unet/`` (``save_pretrained``, safetensors),
  ``scheduler/scheduler_config.json`` and ``flashdistill.json``, a small file naming the text
  encoder, the dataset and the image shape; or
- a diffusers pipeline folder (``model_index.json``: SD1.5/2, SDXL, PixArt-alpha/sigma, SD3), read
  by :mod:`flashdistill.models.pipelines`.

:func:`load_model` reads either into a :class:`Model` (denoiser adapter + conditioner, and a VAE
for latent models); run folders written by distillation are read by the same function and resolve
to their teacher plus the trained student weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .denoiser import Denoiser, X0Denoiser
from .model import META_FILE, Model, ModelNotFound, is_pipeline_folder, read_meta, schedule_from_config  # noqa: F401
from .pipelines import load_pipeline_teacher
from .student import FULL_DIR, LORA_FILE, StudentDenoiser, fuse_lora, make_student_backbone
from .text import TextEncoder


ADAPTER_DIR = "adapter"


def save_teacher(out: Path, unet, schedule, meta: dict, adapter=None) -> None:
    """``adapter``: a sketch teacher's T2I-Adapter, written to ``adapter/`` beside ``unet/``."""
    from diffusers import DPMSolverMultistepScheduler

    out = Path(out)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if adapter is not None:
        adapter.save_pretrained(out / ADAPTER_DIR, safe_serialization=True)
    DPMSolverMultistepScheduler(**schedule.to_diffusers_config()).save_pretrained(out / "scheduler")
    (out / META_FILE).write_text(json.dumps({"kind": "teacher", **meta}, indent=2))


def load_teacher(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> Model:
    """A teacher folder as a :class:`Model`, its weights loaded straight in ``dtype`` (no float32
    copy on the way: the peak memory of a bf16 teacher is its bf16 size)."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if is_pipeline_folder(path):
        return load_pipeline_teacher(path, device, dtype)
    meta = read_meta(path)
    if meta.get("kind") != "teacher":
        raise ModelNotFound(f"{str(path)!r} holds a {meta.get('kind')!r}, not a teacher")
    unet = UNet2DConditionModel.from_pretrained(path / "unet", dtype=dtype).eval().requires_grad_(False)
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    denoiser = Denoiser(unet, schedule_from_config(sched_cfg))
    text = TextEncoder(meta["text_encoder"], meta["max_length"])
    adapter = None
    if (path / ADAPTER_DIR).is_dir():
        from diffusers import T2IAdapter

        adapter = T2IAdapter.from_pretrained(path / ADAPTER_DIR, dtype=dtype).eval().requires_grad_(False)
    return Model(denoiser, text, meta, path, adapter=adapter).to(device)


def load_model(path: str | Path, device="cpu", teacher: str | Path | None = None) -> Model:
    """A teacher folder (built-in or diffusers pipeline) or a distillation run folder; ``teacher``
    overrides the teacher folder a run recorded (a run copied to another machine)."""
    if is_pipeline_folder(path):
        return load_teacher(path, device)
    meta = read_meta(Path(path))
    kind = meta.get("kind")
    if kind == "teacher":
        return load_teacher(path, device)
    if kind == "student":
        return load_student(path, device, teacher=teacher)
    raise ModelNotFound(f"{str(path)!r}: unknown model kind {kind!r} in {META_FILE}")


def run_teacher(path: Path, meta: dict, override: str | Path | None = None) -> Path:
    """The teacher folder of a run: ``override`` if given, else the absolute path it recorded, else
    the same folder relative to the run (a run moved together with its teacher)."""
    if override is not None:
        if not Path(override).exists():
            raise ModelNotFound(f"teacher folder {str(override)!r} does not exist")
        return Path(override)
    recorded = Path(meta["teacher"])
    if recorded.exists():
        return recorded
    relative = Path(path) / meta.get("teacher_relative", "\0")
    if meta.get("teacher_relative") and relative.exists():
        return relative.resolve()
    raise ModelNotFound(f"the teacher of run {str(path)!r} is not at {str(recorded)!r}"
                        + (f" nor at {str(relative)!r} (relative to the run)" if meta.get("teacher_relative") else "")
                        + "; pass --teacher DIR with the teacher folder")


def load_student(path, device="cpu", fuse: bool = True, teacher: str | Path | None = None):
    """A student run folder as a :class:`Model`. With ``fuse`` (inference) the LoRA is merged into
    the base weights and its layers removed, as diffusers' ``fuse_lora`` + ``unload_lora``: same
    outputs, no per-layer LoRA overhead (about 30% of a forward on the digits UNet)."""
    path = Path(path)
    meta = read_meta(path)
    teacher_dir = run_teacher(path, meta, teacher)
    meta = {**meta, "teacher": str(teacher_dir)}
    teacher = load_teacher(teacher_dir, device="cpu")
    if meta["full"]:
        backbone = type(teacher.denoiser.backbone).from_pretrained(path / "student" / FULL_DIR)
    elif meta.get("lora") is None:  # PE-CoDi: the teacher's UNet, steered by its ControlNet
        backbone = teacher.denoiser.backbone
    else:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        lora = meta["lora"]
        backbone = make_student_backbone(teacher.denoiser.backbone, False, lora["rank"], lora["alpha"], lora["targets"])
        result = set_peft_model_state_dict(backbone, load_file(str(path / "student" / LORA_FILE)))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"LoRA weights do not match the student: unexpected {result.unexpected_keys[:5]}")
        if fuse:
            fuse_lora(backbone)
    if meta.get("conditioning") == "controlnet":  # CoDi: the UNet and its trained ControlNet, one backbone
        from diffusers import ControlNetModel

        from .controlled import CONTROLNET_DIR, ControlledUNet

        backbone = ControlledUNet(backbone, ControlNetModel.from_pretrained(path / CONTROLNET_DIR))
    backbone.eval().requires_grad_(False)
    sampling = meta["sampling"]
    if sampling.get("prediction") == "sample":  # the backbone outputs x0 (Lightning's 1-step stage)
        denoiser = X0Denoiser(backbone, teacher.schedule)
    elif "boundary" in sampling and sampling["boundary"] is None:  # no consistency boundary (Lightning)
        denoiser = Denoiser(backbone, teacher.schedule)
    else:
        denoiser = StudentDenoiser(backbone, teacher.schedule)
    return Model(denoiser, teacher.conditioner, {**teacher.meta, **meta, "kind": "student"}, path,
                 sampling=meta["sampling"], vae=teacher.vae, adapter=teacher.adapter).to(device)
