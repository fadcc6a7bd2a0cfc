"""Teachers from diffusers pipeline folders: SD1.5/SD2, SDXL, PixArt-alpha/sigma and SD3.

``load_pipeline_teacher(path)`` reads a local pipeline folder (``model_index.json``) with diffusers
and returns the same :class:`~flashdistill.models.loading.Model` as the built-in teacher:

- the denoiser adapter over the UNet or transformer, with the prediction type of the folder's
  scheduler (epsilon, v_prediction, or flow matching for SD3);
- a conditioner that calls the pipeline's own ``encode_prompt`` (CLIP for SD1.5/2; CLIP-L + CLIP-G
  with pooled embeddings and ``add_time_ids`` for SDXL; T5 with its attention mask for PixArt;
  CLIP-L, CLIP-G and optional T5 for SD3) and caches embeddings per prompt; its ``uncond`` is the
  pipeline's negative branch for the empty prompt (zeros for SDXL's
  ``force_zeros_for_empty_prompt``);
- the VAE, with its scaling and shift factors: ``encode(images)`` to latents, ``decode(latents)``;
- for the conditional pipelines (``PIPELINE_TASKS``), the task: ``StableDiffusionInpaintPipeline``
  (inpaint: the 9-channel UNet), ``StableDiffusionUpscalePipeline`` (sr: the noised low-res image
  joins the latents, its noise level is the class label), ``StableDiffusionAdapterPipeline`` and
  ``StableDiffusionXLAdapterPipeline`` (sketch: its T2I-Adapter) and
  ``StableDiffusion[XL]ControlNetPipeline`` (sketch: its ControlNet and the UNet as one
  :class:`~flashdistill.models.controlled.ControlledUNet` backbone, whose UNet takes the LoRA).

Nothing is downloaded: every component must be in the folder.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .denoiser import Denoiser
from .model import Model, is_pipeline_folder, read_meta, schedule_from_config

FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionUpscalePipeline": "sd",
    "StableDiffusionAdapterPipeline": "sd",
    "StableDiffusionXLAdapterPipeline": "sdxl",
    "StableDiffusionControlNetPipeline": "sd",
    "StableDiffusionXLControlNetPipeline": "sdxl",
}
# pipelines of a conditional task (flashdistill.tasks): the condition joins every UNet call
PIPELINE_TASKS = {"StableDiffusionInpaintPipeline": "inpaint", "StableDiffusionUpscalePipeline": "sr",
                  "StableDiffusionAdapterPipeline": "sketch", "StableDiffusionXLAdapterPipeline": "sketch",
                  "StableDiffusionControlNetPipeline": "sketch", "StableDiffusionXLControlNetPipeline": "sketch"}
# what a conditional pipeline's UNet takes besides the latents (channels, per latent channel count)
EXTRA_CHANNELS = {"inpaint": lambda c: (1 + c, f"1 mask + {c} masked-image latent"),
                  "sr": lambda c: (3, "3 low-res RGB")}

# Default LoRA targets per family (module-name suffixes; absent ones are skipped).
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
LORA_TARGETS = {
    "digits": UNET_TARGETS,
    "sd": UNET_TARGETS,
    "sdxl": UNET_TARGETS,
    # transformers (notes): attention, plus the output projection, the FF layers and the adaptive-norm linears
    "pixart": ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "ff.net.0.proj", "ff.net.2", "adaln_single.linear"],
    "sd3": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
            "norm1_context.linear"],
}


def teacher_family(path: str | Path) -> str:
    """``digits`` for the built-in teacher, else the diffusers pipeline folder's family."""
    path = Path(path)
    if is_pipeline_folder(path):
        return pipeline_family(path)

    meta = read_meta(path)
    if meta.get("kind") != "teacher":
        raise ValueError(f"{str(path)!r} holds a {meta.get('kind')!r}, not a teacher")
    return meta.get("family", "digits")


def teacher_task(path: str | Path) -> str | None:
    """A built-in teacher's task (``t2i``, ``inpaint``, ``sr`` or ``sketch``); None for a diffusers
    pipeline folder (its task comes from its class, not from a preset)."""
    path = Path(path)
    return None if is_pipeline_folder(path) else read_meta(path).get("task") or "t2i"


def pipeline_family(path: str | Path) -> str:
    index = json.loads((Path(path) / "model_index.json").read_text())
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{str(path)!r}: unsupported pipeline class {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


class PipelineVAE:
    """``encode``: images in [-1, 1] -> (latent - shift) * scale; ``decode``: the inverse, clamped."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.from_moments(*self.moments(images), generator)

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution for ``images``: (mean, std), in the VAE's dtype (what
        ``--cache-latents`` stores)."""
        dist = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def from_moments(self, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A latent sample, scaled: what diffusers' ``latent_dist.sample(generator)`` computes from
        the same moments, then ``(z - shift) * scale``, float32."""
        from diffusers.utils.torch_utils import randn_tensor

        z = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return ((z - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.device, self.vae.dtype) / self.scale + self.shift
        return self.vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)

    def to(self, device):
        self.vae.to(device)
        return self


class PipelineConditioner:
    """Per-family prompt encoding through the pipeline's ``encode_prompt``, cached per prompt."""

    def __init__(self, pipe, family: str, height: int, width: int, max_sequence_length: int | None = None):
        self.pipe, self.family = pipe, family
        self.max_sequence_length = max_sequence_length
        self.height, self.width = height, width
        self.device = torch.device("cpu")
        self._cache: dict[str, dict] = {}
        self.time_ids = None
        if family == "sdxl":
            proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else None
            self.time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), torch.float32,
                                                   text_encoder_projection_dim=proj)[0]

    def to(self, device) -> "PipelineConditioner":
        """Run the text encoders on ``device`` (the cache stays on the CPU)."""
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self.pipe, name, None) is not None:
                getattr(self.pipe, name).to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> list[dict]:
        p, f, dev = self.pipe, self.family, self.device
        if f == "sd":
            emb, _ = p.encode_prompt(prompts, dev, 1, False)
            return [{"encoder_hidden_states": e} for e in emb]
        if f == "sdxl":
            emb, _, pooled, _ = p.encode_prompt(prompts, device=dev, do_classifier_free_guidance=False)
            return [{"encoder_hidden_states": e, "text_embeds": q} for e, q in zip(emb, pooled)]
        if f == "pixart":
            kw = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
            emb, mask, _, _ = p.encode_prompt(prompts, do_classifier_free_guidance=False, device=dev, **kw)
            return [{"encoder_hidden_states": e, "encoder_attention_mask": m} for e, m in zip(emb, mask)]
        kw = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        emb, _, pooled, _ = p.encode_prompt(prompts, prompts, prompts, device=dev, do_classifier_free_guidance=False, **kw)
        return [{"encoder_hidden_states": e, "pooled_projections": q} for e, q in zip(emb, pooled)]

    def _stack(self, items: list[dict]) -> dict:
        out = {k: torch.stack([it[k] for it in items]).float() for k in items[0]}
        if self.family == "sdxl":
            b = len(items)
            return {"encoder_hidden_states": out["encoder_hidden_states"],
                    "added_cond_kwargs": {"text_embeds": out["text_embeds"], "time_ids": self.time_ids.expand(b, -1)}}
        if self.family == "pixart":
            b = len(items)
            out["encoder_attention_mask"] = out["encoder_attention_mask"].long()
            out["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            if self.pipe.transformer.config.sample_size == 128:  # PixArt-alpha 1024: size conditioning
                out["added_cond_kwargs"] = {"resolution": torch.tensor([[self.height, self.width]] * b, dtype=torch.float32),
                                            "aspect_ratio": torch.tensor([[self.height / self.width]] * b)}
        return out

    def encode_one(self, prompt: str) -> dict:
        """One prompt's embeddings (flat, float32 on the CPU; what the cache holds per prompt)."""
        return {k: v.cpu() for k, v in self._encode([prompt])[0].items()}

    def stack(self, items: list[dict]) -> dict:
        """Per-prompt embeddings (``encode_one``'s, e.g. from ``--cache-latents``) as the backbone's
        batched keyword arguments."""
        return self._stack(items)

    def cond(self, prompts: list[str]) -> dict:
        # One prompt per encoder call, so an embedding is a function of its prompt alone, not of
        # the prompts that were missing from the cache at the same time (see TextEncoder.encode).
        for q in dict.fromkeys(prompts):
            if q not in self._cache:
                self._cache[q] = self.encode_one(q)
        return self._stack([self._cache[q] for q in prompts])

    def uncond(self, n: int) -> dict:
        if self.family == "sdxl" and self.pipe.config.get("force_zeros_for_empty_prompt", True):
            c = self.cond([""] * n)
            return {"encoder_hidden_states": torch.zeros_like(c["encoder_hidden_states"]),
                    "added_cond_kwargs": {"text_embeds": torch.zeros_like(c["added_cond_kwargs"]["text_embeds"]),
                                          "time_ids": c["added_cond_kwargs"]["time_ids"]}}
        return self.cond([""] * n)


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import DiffusionPipeline

    family = pipeline_family(path)
    index = json.loads((Path(path) / "model_index.json").read_text())
    # components saved as absent (e.g. SD3 without T5, SD without a safety checker) stay absent
    kwargs = {k: None for k, v in index.items() if not k.startswith("_") and v in ([None, None], None)}
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load the diffusers pipeline in {str(path)!r} offline: {e}") from e
    return pipe, family


def load_pipeline_teacher(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    path = Path(path)
    pipe, family = load_pipeline(path, dtype)
    backbone = pipe.unet if family in ("sd", "sdxl") else pipe.transformer
    backbone.eval().requires_grad_(False)
    schedule = schedule_from_config(dict(pipe.scheduler.config))
    if schedule.kind == "flow" and family != "sd3":
        raise ValueError(f"{family} teachers with a flow-matching scheduler are not supported")
    latent = backbone.config.sample_size
    channels = pipe.vae.config.latent_channels
    task = PIPELINE_TASKS.get(type(pipe).__name__, "t2i")
    extra, what = EXTRA_CHANNELS[task](channels) if task in EXTRA_CHANNELS else (0, "")
    if backbone.config.in_channels != channels + extra:
        raise ValueError(f"{str(path)!r}: a {type(pipe).__name__} backbone takes {channels + extra} input channels "
                         f"({channels} latent{' + ' + what if what else ''}), this one {backbone.config.in_channels}")
    size = latent * pipe.vae_scale_factor
    conditioner = PipelineConditioner(pipe, family, size, size)
    meta = {"kind": "teacher", "family": family, "image_shape": [channels, latent, latent],
            "image_size": size, "default_guidance": {"sd": 7.5, "sdxl": 5.0, "pixart": 4.5, "sd3": 7.0}[family],
            "pipeline": type(pipe).__name__, "task": task}
    if task == "sr":  # the upscaler: x vae_scale_factor, its low-res noise schedule checked against ours
        _check_low_res_scheduler(path, pipe.low_res_scheduler)
        # default_noise_level: StableDiffusionUpscalePipeline.__call__'s own default, so samples match a stock call
        meta.update(sr_factor=pipe.vae_scale_factor, max_noise_level=int(pipe.config.max_noise_level), default_guidance=9.0,
                    default_noise_level=20)
    adapter = getattr(pipe, "adapter", None)  # a T2I-Adapter pipeline's adapter, at the pipeline's default scale 1
    if adapter is not None:
        adapter.eval().requires_grad_(False)
        meta["adapter_scale"] = 1.0
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:  # the frozen ControlNet and the UNet as one backbone, residuals recomputed per call
        from .controlled import ControlledUNet

        if not hasattr(controlnet.config, "conditioning_channels"):
            raise ValueError(f"{str(path)!r}: only a single ControlNetModel is supported, not {type(controlnet).__name__}")
        backbone = ControlledUNet(backbone, controlnet.eval().requires_grad_(False))
        meta["conditioning"] = "controlnet"
    return Model(Denoiser(backbone, schedule), conditioner, meta, path, vae=PipelineVAE(pipe.vae), adapter=adapter).to(device)


def _check_low_res_scheduler(path, scheduler) -> None:
    """The upscaler's low-res noise augmentation is :func:`flashdistill.tasks.low_res_schedule`
    (DDPMScheduler, linear betas 1e-4..0.02 over 1,000 steps, as the released x4 upscaler); a folder
    with another one is refused rather than noised differently from its pipeline."""
    from ..tasks import low_res_schedule

    ours = low_res_schedule().to_diffusers_config()
    theirs = dict(scheduler.config)
    differ = {k: (theirs.get(k), v) for k, v in ours.items() if k in ("num_train_timesteps", "beta_start", "beta_end",
                                                                        "beta_schedule") and theirs.get(k) != v}
    if differ:
        raise ValueError(f"{str(path)!r}: the upscaler's low_res_scheduler differs from the supported one "
                         f"(setting: (folder, supported)): {differ}")
