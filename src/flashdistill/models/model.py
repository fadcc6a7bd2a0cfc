"""The model type every loader returns, and the folder conventions it rests on (the bottom of
:mod:`flashdistill.models`: it imports no loader; :mod:`.loading`, :mod:`.pipelines` and
:mod:`.student` build on it)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.schedules import FlowSchedule, VPSchedule
from ..tasks import get_task
from .denoiser import Denoiser

META_FILE = "flashdistill.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (save_lora_weights' default)


class ModelNotFound(FileNotFoundError):
    pass


def schedule_from_config(config: dict):
    if "shift" in config and "beta_start" not in config:
        return FlowSchedule.from_diffusers_config(config)
    return VPSchedule.from_diffusers_config(config)


def is_pipeline_folder(path) -> bool:
    """A diffusers pipeline folder (``model_index.json``), not one of ours (``flashdistill.json``)."""
    path = Path(path)
    return (path / "model_index.json").is_file() and not (path / META_FILE).is_file()


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to(v, device) for v in x]
    return x


@dataclass
class Model:
    """A loaded model: ``denoiser(x_t, t, cond) -> x0`` plus what it needs around it.

    ``conditioner`` has ``cond(prompts) -> dict`` and ``uncond(n) -> dict`` (the backbone's keyword
    arguments besides x_t and t); ``vae`` (latent models only) has ``encode(images, generator)`` and
    ``decode(latents)``. ``image_shape`` is the shape the denoiser works on (latents for VAE models).
    Conditional models (``meta["task"]``: inpaint, sr, sketch; see :mod:`flashdistill.tasks`) take
    a spatial condition beside the prompts, identical in both CFG branches; ``adapter`` is a sketch
    model's frozen T2I-Adapter.
    """

    denoiser: Denoiser
    conditioner: object
    meta: dict
    path: Path
    sampling: dict = field(default_factory=dict)  # student runs: timesteps and sampler settings
    vae: object | None = None
    adapter: torch.nn.Module | None = None

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def default_guidance(self) -> float:
        """The CFG scale a teacher samples with when none is given (its folder says; else 5.0)."""
        return float(self.meta.get("default_guidance", 5.0))

    @property
    def default_noise_level(self) -> int:
        """The sr task's low-res noise level when none is given: 20 for a StableDiffusionUpscalePipeline
        (its ``__call__`` default, which its model card passes), else 0."""
        return int(self.meta.get("default_noise_level", 0))

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["image_shape"])

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The shape of an image (and of a spatial condition's tensors): ``image_shape`` without a
        VAE, else RGB at the pipeline's image size."""
        if self.vae is None:
            return self.image_shape
        size = int(self.meta["image_size"])
        return (3, size, size)

    @property
    def task(self):
        """The model's :class:`~flashdistill.tasks.Task` (text-to-image unless its folder names one)."""
        return get_task(self.meta.get("task"), self.meta.get("sr_factor"))

    @torch.no_grad()
    def spatial(self, condition: dict | None, n: int, generator: torch.Generator | None = None) -> dict:
        """The backbone's keyword arguments for a spatial condition of ``n`` samples (checked
        against the task; {} for text-to-image). Computed once per batch and shared by every call."""
        task = self.task
        condition = task.check(condition, n)
        if not condition:
            return {}
        condition = _to(condition, self.device)
        if self.meta.get("conditioning") == "controlnet":  # CoDi: the condition image goes to the ControlNet
            from ..tasks import CONTROL

            return {CONTROL: task.control(condition)}
        scale = float(self.meta.get("adapter_scale", 1.0))
        return task.kwargs(condition, self.adapter, scale, generator, encode=None if self.vae is None else self.encode)

    def show(self, condition: dict) -> torch.Tensor:
        """The condition drawn as images in [-1, 1] with this model's channels (a grid's first row)."""
        shown = self.task.show(condition)
        return shown.expand(-1, self.pixel_shape[0], -1, -1) if shown.shape[1] == 1 else shown

    def cond(self, prompts: list[str], spatial: dict | None = None) -> dict:
        """The prompts' conditioning, joined by ``spatial`` (from :meth:`spatial`)."""
        return {**_to(self.conditioner.cond(list(prompts)), self.device), **(spatial or {})}

    def cond_from(self, embeddings: list[dict]) -> dict:
        """Batched conditioning from per-prompt embeddings (a latent cache's), no text encoder."""
        return _to(self.conditioner.stack(list(embeddings)), self.device)

    def uncond(self, n: int, spatial: dict | None = None) -> dict:
        """The unconditional branch of CFG for ``n`` samples, as the model's pipeline defines it;
        the spatial condition stays (CFG guides the prompt only)."""
        return {**_to(self.conditioner.uncond(n), self.device), **(spatial or {})}

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> what the denoiser works on (identity without a VAE)."""
        return images if self.vae is None else self.vae.encode(images, generator)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The denoiser's space -> images in [-1, 1] (identity without a VAE)."""
        return x if self.vae is None else self.vae.decode(x)

    def to(self, device) -> "Model":
        self.denoiser.to(device)
        if self.vae is not None:
            self.vae.to(device)
        if self.adapter is not None:
            self.adapter.to(device)
        if hasattr(self.conditioner, "to") and not isinstance(self.conditioner, torch.nn.Module):
            self.conditioner.to(device)  # pipeline text encoders (the built-in MiniLM stays on the CPU)
        return self


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"model folder {str(path)!r} does not exist")
    if not (path / META_FILE).is_file():
        raise ModelNotFound(
            f"{str(path)!r} is not a model folder (no {META_FILE} or model_index.json); expected a "
            "diffusers pipeline folder, a teacher written by 'flashdistill train-teacher' or a run "
            "written by 'flashdistill distill'"
        )
    return json.loads((path / META_FILE).read_text())
