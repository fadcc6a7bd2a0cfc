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

A *LoRA folder* (``train-teacher --base DIR --lora``, e.g. a style) holds diffusers' LoRA file
``pytorch_lora_weights.safetensors`` and ``flashdistill.json`` (kind "lora", its base teacher).
:func:`apply_lora` stacks it, or any diffusers / kohya LoRA file, on a loaded model by fusing it in
(``--extra-lora``); loading the folder itself gives its base teacher with the LoRA.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .denoiser import Denoiser, X0Denoiser
from .model import LORA_WEIGHTS, META_FILE, Model, ModelNotFound, is_pipeline_folder, read_meta, schedule_from_config  # noqa: F401
from .pipelines import load_pipeline_teacher
from .adapters import forget_layout, lora_layers, lora_metadata, lora_root
from .student import FULL_DIR, LORA_FILE, StudentDenoiser, fuse_lora, make_student_backbone
from .text import TextEncoder


ADAPTER_DIR = "adapter"
# the diffusers pipeline class whose LoRA loader reads a family's LoRA files, and the prefix of its backbone's keys
LORA_LOADERS = {"digits": ("StableDiffusionPipeline", "unet"), "sd": ("StableDiffusionPipeline", "unet"),
                "sdxl": ("StableDiffusionXLPipeline", "unet"), "sd3": ("StableDiffusion3Pipeline", "transformer")}


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


def load_model(path: str | Path, device="cpu", teacher: str | Path | None = None,
               extra_loras: list[tuple] = ()) -> Model:
    """A teacher folder (built-in or diffusers pipeline), a distillation run folder or a LoRA folder
    (its base teacher with the LoRA); ``teacher`` overrides the teacher folder a run (or the base a
    LoRA) recorded (a run copied to another machine). ``extra_loras``: (LoRA folder or file, scale)
    pairs fused into the model, in order, or (LoRA, scale, (lo, hi)) triples: that LoRA applies only
    at timesteps in [lo, hi] (:func:`apply_lora`; one such LoRA per model, stacked after the others)."""
    model = _load(Path(path), device, teacher)
    entries = [tuple(e) for e in extra_loras]
    if sum(len(e) > 2 and e[2] is not None for e in entries) > 1:
        raise ValueError("one extra LoRA per model can be limited to a timestep interval; got several")
    for source, scale, *interval in sorted(entries, key=lambda e: len(e) > 2 and e[2] is not None):
        apply_lora(model, source, scale, interval[0] if interval else None)
    return model.to(device)


def lora_interval(interval) -> tuple[float, float]:
    """A timestep interval [lo, hi], checked: two numbers, 0 <= lo <= hi."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"a LoRA's timestep interval is two numbers [lo, hi], got {interval!r}") from None
    if not 0 <= lo <= hi:
        raise ValueError(f"a LoRA's timestep interval [lo, hi] needs 0 <= lo <= hi, got [{lo:g}, {hi:g}]")
    return lo, hi


def scope_lora(backbone: torch.nn.Module, interval: tuple[float, float]) -> None:
    """Switch the unfused LoRA layers of ``backbone`` on at the calls whose timestep is in
    ``interval`` and off at the others (a forward pre-hook reading the backbone's ``timestep``):
    diffusers' ``set_adapters`` weight of that LoRA set to its scale or 0 before each step. A call
    mixing timesteps inside and outside the interval is refused."""
    layers, (lo, hi) = lora_layers(backbone), interval

    def switch(_module, args, kwargs):
        t = torch.as_tensor(kwargs.get("timestep", args[1] if len(args) > 1 else None)).flatten()
        inside = (t >= lo) & (t <= hi)
        if bool(inside.any()) != bool(inside.all()):
            raise ValueError(f"a LoRA limited to timesteps [{lo:g}, {hi:g}] needs one timestep per call, or all "
                             f"on one side; got {t.tolist()}")
        for m in layers:  # peft's flag, as adapter_scope sets it (no requires_grad side effects)
            m.__dict__["_disable_adapters"] = not bool(inside.all())

    backbone.register_forward_pre_hook(switch, with_kwargs=True)


def _load(path: Path, device, teacher) -> Model:
    if is_pipeline_folder(path):
        return load_teacher(path, device)
    meta = read_meta(path)
    kind = meta.get("kind")
    if kind == "teacher":
        return load_teacher(path, device)
    if kind == "student":
        return load_student(path, device, teacher=teacher)
    if kind == "lora":
        model = load_teacher(recorded_folder(path, meta, "base", teacher), device)
        return apply_lora(model, path, 1.0)
    raise ModelNotFound(f"{str(path)!r}: unknown model kind {kind!r} in {META_FILE}")


def recorded_folder(path: Path, meta: dict, key: str, override: str | Path | None = None) -> Path:
    """The folder a run (or LoRA) recorded under ``key`` (its teacher, its base): ``override`` if
    given, else the absolute path it recorded, else the same folder relative to the run (a run
    moved together with its teacher, ``<key>_relative``)."""
    if override is not None:
        if not Path(override).exists():
            raise ModelNotFound(f"{key} folder {str(override)!r} does not exist")
        return Path(override)
    recorded = Path(meta[key])
    if recorded.exists():
        return recorded
    relative = Path(path) / meta.get(f"{key}_relative", "\0")
    if meta.get(f"{key}_relative") and relative.exists():
        return relative.resolve()
    raise ModelNotFound(f"the {key} of {str(path)!r} is not at {str(recorded)!r}"
                        + (f" nor at {str(relative)!r} (relative to it)" if meta.get(f"{key}_relative") else "")
                        + "; pass --teacher DIR with that folder")


def run_teacher(path: Path, meta: dict, override: str | Path | None = None) -> Path:
    """The teacher folder of a run (:func:`recorded_folder` of its ``teacher``)."""
    return recorded_folder(path, meta, "teacher", override)


def save_lora(out: Path, backbone, meta: dict) -> None:
    """A LoRA trained on the teacher ``meta["base"]``: diffusers' LoRA file (written by
    ``StableDiffusionPipeline.save_lora_weights`` with its rank and alpha as adapter metadata, so
    ``pipe.load_lora_weights`` and ``UNet2DConditionModel.load_lora_adapter`` read it as is) and
    ``flashdistill.json`` (kind "lora")."""
    import os

    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    targets = sorted(backbone.peft_config["default"].target_modules)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(backbone).items()}
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, weight_name=LORA_WEIGHTS,
                                              unet_lora_adapter_metadata=lora_metadata(meta["rank"], meta["alpha"], targets))
    meta = {**meta, "targets": targets, "base_relative": os.path.relpath(Path(meta["base"]).resolve(), out.resolve())}
    (out / META_FILE).write_text(json.dumps({"kind": "lora", **meta}, indent=2))


BLOCK_SCALE_KEYS = "'default', 'down', 'mid', 'up', 'down.<i>' or 'up.<i>'"
_LORA_B_MARKERS = (".lora_B.", ".lora.up.", ".lora_up.")  # diffusers/peft and older diffusers names of the B side


def lora_scale(scale) -> float | dict[str, float]:
    """A LoRA's strength, checked: a number, or per-block scales ``{"mid": 0.5, ...}`` (keys
    ``default``, ``down``, ``mid``, ``up``, ``down.<i>``, ``up.<i>``; see :func:`scale_lora_blocks`)."""
    import numbers

    def number(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"a LoRA scale must be a number or a dict of block scales, not {value!r}")
        return float(value)

    if not isinstance(scale, dict):
        return number(scale)
    for key in scale:
        if not (key in ("default", "down", "mid", "up") or
                (key.split(".")[0] in ("down", "up") and key.count(".") == 1 and key.split(".")[1].isdigit())):
            raise ValueError(f"unknown LoRA block {key!r}; expected {BLOCK_SCALE_KEYS}")
    return {key: number(value) for key, value in scale.items()}


def _lora_block(key: str) -> tuple[str, str] | None:
    """The UNet block a LoRA key sits in, as (``down``/``mid``/``up``, its index or "")."""
    import re

    m = re.search(r"(?:^|\.)(down_blocks|up_blocks|mid_block)(?:\.(\d+))?\.", key)
    return None if m is None else ({"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}[m.group(1)], m.group(2) or "")


def scale_lora_blocks(state: dict, scales: dict[str, float]) -> dict:
    """A UNet LoRA state dict with each block's LoRA scaled: every B-side tensor (``lora_B``,
    ``lora.up``) under ``down_blocks.<i>``, ``mid_block`` or ``up_blocks.<i>`` times the most
    specific of ``scales``' ``down.<i>`` / ``down`` (likewise ``up``), ``mid``, else ``default`` (1).
    Every LoRA layer of a block is scaled, its resnets included; diffusers' ``set_adapters`` block
    dict scales only the blocks' attentions. Layers outside the blocks (conv_in, time embedding)
    take ``default``. The result loads in diffusers as any LoRA (``load_lora_weights``)."""
    def b_side(key: str) -> bool:
        return any(marker in key for marker in _LORA_B_MARKERS)

    scales = lora_scale(scales)
    if not any(b_side(k) for k in state):
        raise ValueError("per-block scales need a LoRA with lora_B / lora.up weights; this one has none")
    used, out, blocks = set(), {}, set()
    for key, value in state.items():
        block = _lora_block(key)
        found = "default"
        if block is not None:
            part, index = block
            blocks.add(f"{part}.{index}" if index else part)
            found = next((k for k in (f"{part}.{index}", part) if k in scales), "default")
        used.add(found)
        s = scales.get(found, 1.0)
        out[key] = value * s if s != 1.0 and b_side(key) else value
    missing = sorted(set(scales) - used - {"default"})
    if missing:
        raise ValueError(f"LoRA block(s) {missing} hold no weights of this LoRA; its UNet blocks are {sorted(blocks)}")
    return out


def apply_lora(model: Model, source: str | Path, scale: float | dict = 1.0,
               interval: tuple[float, float] | None = None) -> Model:
    """Stack a LoRA on ``model`` without training: read with the family's diffusers LoRA loader
    (``lora_state_dict``: diffusers, peft and kohya files), loaded with the backbone's own
    ``load_lora_adapter``, fused at ``scale`` and unloaded, the same weights as diffusers'
    ``set_adapters([..., name], [..., scale])`` over the model's own LoRA; ``scale`` may be per
    UNet block (``{"mid": 0.5}``: :func:`scale_lora_blocks`). ``source``: a LoRA folder
    of ours, a folder with ``pytorch_lora_weights.safetensors`` or a ``.safetensors`` file. A LoRA
    folder with a ``style`` makes the model's digits metrics score against that style.

    ``interval`` (lo, hi): the LoRA applies only at the calls whose timestep is in [lo, hi]; it stays
    an unfused adapter, switched per call (:func:`scope_lora`), and nothing can be stacked after it.
    In diffusers: the same adapter's ``set_adapters`` weight set to ``scale`` or 0 before each step
    (``callback_on_step_end``)."""
    import diffusers

    source = Path(source)
    if not source.exists():
        raise ModelNotFound(f"LoRA {str(source)!r} does not exist")
    own = read_meta(source) if (source / META_FILE).is_file() else {}
    if own and own.get("kind") != "lora":
        raise ValueError(f"{str(source)!r} holds a {own.get('kind')!r}, not a LoRA")
    if own and own.get("dataset") != model.meta.get("dataset"):
        raise ValueError(f"LoRA {str(source)!r} was trained on a {own.get('dataset')!r} teacher; this model is a "
                         f"{model.meta.get('dataset') or model.meta.get('family')!r} one")
    family = model.meta.get("family", "digits")
    backbone = lora_root(model.denoiser.backbone)  # a ControlNet teacher's UNet
    if family not in LORA_LOADERS or not hasattr(backbone, "load_lora_adapter"):
        raise ValueError(f"extra LoRAs stack on UNet and SD3 teachers and their students (diffusers has a LoRA "
                         f"loader for those), not on this {family} {type(backbone).__name__} model")
    if lora_layers(backbone):
        raise ValueError("this model carries an unfused LoRA (a training student, or an extra LoRA limited to a "
                         "timestep interval); stack other LoRAs before it")
    interval = None if interval is None else lora_interval(interval)
    folder, weight_name = (source.parent, source.name) if source.is_file() else (source, LORA_WEIGHTS)
    if not (folder / weight_name).is_file():
        raise ModelNotFound(f"no LoRA weights at {str(folder / weight_name)!r}")
    cls_name, prefix = LORA_LOADERS[family]
    loaded = getattr(diffusers, cls_name).lora_state_dict(str(folder), weight_name=weight_name, local_files_only=True,
                                                          return_lora_metadata=True)
    state, alphas, metadata = loaded if len(loaded) == 3 else (loaded[0], None, loaded[1])
    scale = lora_scale(scale)
    if isinstance(scale, dict):
        if prefix != "unet":
            raise ValueError(f"per-block LoRA scales apply to UNet blocks (down/mid/up); this {family} model's "
                             f"backbone is a {type(backbone).__name__}: give one number")
        try:
            state = scale_lora_blocks(state, scale)
        except ValueError as e:
            raise ValueError(f"LoRA {str(source)!r}: {e}") from e
    name = f"extra_{len(model.meta.get('extra_loras', []))}"
    try:
        backbone.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, adapter_name=name, metadata=metadata,
                                   low_cpu_mem_usage=False)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"LoRA {str(source)!r} does not fit this model's {type(backbone).__name__}: {e}") from e
    if not lora_layers(backbone):
        raise ValueError(f"LoRA {str(source)!r} holds no {prefix} weights for this model")
    if interval is None:
        backbone.fuse_lora(lora_scale=1.0 if isinstance(scale, dict) else scale, adapter_names=[name])
        backbone.unload_lora()
    else:  # kept as an adapter at its scale, switched per call
        if not isinstance(scale, dict):
            backbone.set_adapters([name], weights=[scale])
        scope_lora(backbone, interval)
    forget_layout(backbone)
    backbone.eval().requires_grad_(False)
    entry = {"path": str(source), "scale": scale, **({"interval": list(interval)} if interval else {})}
    model.meta = {**model.meta, "extra_loras": [*model.meta.get("extra_loras", []), entry]}
    if own.get("style"):
        model.meta["style"] = own["style"]
    return model


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
        result = set_peft_model_state_dict(lora_root(backbone), load_file(str(path / "student" / LORA_FILE)))
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
