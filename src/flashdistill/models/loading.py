"""Model folders on disk.

A *teacher folder* is a diffusers-format folder: ``unet/`` (``save_pretrained``, safetensors),
``scheduler/scheduler_config.json`` and ``flashdistill.json``, a small file naming the text
encoder, the dataset and the image shape. :func:`load_model` reads it into a :class:`Model`
(denoiser adapter + text encoder); run folders written by distillation are read by the same
function and resolve to their teacher plus the trained student weights.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.schedules import FlowSchedule, VPSchedule
from .denoiser import Denoiser
from .text import TextEncoder

META_FILE = "flashdistill.json"


class ModelNotFound(FileNotFoundError):
    pass


def schedule_from_config(config: dict):
    if "shift" in config and "beta_start" not in config:
        return FlowSchedule.from_diffusers_config(config)
    return VPSchedule.from_diffusers_config(config)


@dataclass
class Model:
    """A loaded model: ``denoiser(x_t, t, cond) -> x0`` plus what it needs around it."""

    denoiser: Denoiser
    text: TextEncoder
    meta: dict
    path: Path
    sampling: dict = field(default_factory=dict)  # student runs: timesteps and sampler settings

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def default_guidance(self) -> float:
        """The CFG scale a teacher samples with when none is given (its folder says; else 5.0)."""
        return float(self.meta.get("default_guidance", 5.0))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["image_shape"])

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def cond(self, prompts: list[str]) -> dict:
        return {"encoder_hidden_states": self.text.encode(list(prompts)).to(self.device)}

    def to(self, device) -> "Model":
        self.denoiser.to(device)
        return self


def save_teacher(out: Path, unet, schedule, meta: dict) -> None:
    from diffusers import DPMSolverMultistepScheduler

    out = Path(out)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    DPMSolverMultistepScheduler(**schedule.to_diffusers_config()).save_pretrained(out / "scheduler")
    (out / META_FILE).write_text(json.dumps({"kind": "teacher", **meta}, indent=2))


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"model folder {str(path)!r} does not exist")
    if not (path / META_FILE).is_file():
        raise ModelNotFound(
            f"{str(path)!r} is not a flashdistill model folder (no {META_FILE}); expected a teacher "
            "written by 'flashdistill train-teacher' or a run written by 'flashdistill distill'"
        )
    return json.loads((path / META_FILE).read_text())


def load_teacher(path: str | Path, device="cpu") -> Model:
    from diffusers import UNet2DConditionModel

    path = Path(path)
    meta = read_meta(path)
    if meta.get("kind") != "teacher":
        raise ModelNotFound(f"{str(path)!r} holds a {meta.get('kind')!r}, not a teacher")
    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval().requires_grad_(False)
    sched_cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    denoiser = Denoiser(unet, schedule_from_config(sched_cfg))
    text = TextEncoder(meta["text_encoder"], meta["max_length"])
    return Model(denoiser, text, meta, path).to(device)


def load_model(path: str | Path, device="cpu") -> Model:
    """A teacher folder or a distillation run folder, by what its ``flashdistill.json`` says."""
    meta = read_meta(Path(path))
    kind = meta.get("kind")
    if kind == "teacher":
        return load_teacher(path, device)
    if kind == "student":
        from .student import load_student

        return load_student(path, device)
    raise ModelNotFound(f"{str(path)!r}: unknown model kind {kind!r} in {META_FILE}")
