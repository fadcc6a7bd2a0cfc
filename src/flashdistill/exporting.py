"""``flashdistill export --model RUN --out DIR``: a distilled student as files diffusers loads as is.

- LoRA students of UNet and SD3 teachers: ``pytorch_lora_weights.safetensors`` written by the
  teacher pipeline's own ``save_lora_weights`` (with the LoRA's rank and alpha as adapter
  metadata), so ``pipe.load_lora_weights(DIR)`` takes it. PixArt pipelines have no LoRA loader in
  diffusers: their LoRA is fused and written as a full ``transformer/`` folder instead. Full
  students: ``unet/`` or ``transformer/`` (``save_pretrained``).
- ``scheduler/scheduler_config.json``: ``LCMScheduler`` (VP teachers) or ``FlowMatchLCMScheduler``
  with ``shift = 1`` (SD3: the student's sigmas are already shifted), and
  ``flashdistill_sampling.json`` with the student's timesteps per step count, which the pipeline
  call passes as ``timesteps=`` (``sigmas=`` for SD3).
- ``README.md``: a model card with the teacher, the method, the settings, the metrics and a usage
  snippet.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .models.model import LORA_WEIGHTS

FORMATS = ("diffusers", "kohya")
KOHYA_FAMILIES = {"sd": "SD1.5 / SD2", "sdxl": "SDXL"}
PIPELINE_CLASSES = {"digits": "StableDiffusionPipeline", "sd": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}
LORA_FILE = LORA_WEIGHTS  # diffusers' default LoRA file name


def _lora_state(path: Path, meta: dict):
    """The student's LoRA as a peft state dict (module paths relative to the backbone) and its config."""
    from safetensors.torch import load_file

    from .models.adapters import lora_metadata
    from .models.student import LORA_FILE as STUDENT_LORA

    lora = meta["lora"]
    state = load_file(str(path / "student" / STUDENT_LORA))
    return state, lora_metadata(lora["rank"], lora["alpha"], lora["targets"])


def export(run: str | Path, out: str | Path, metrics: dict | None = None, teacher: str | Path | None = None,
           sampling: dict | None = None) -> Path:
    """``sampling``: the sampling table to write instead of the run's (``export --timesteps``: a
    loaded student's :attr:`sampling` after :func:`~flashdistill.models.student.with_timesteps`)."""
    from .models.loading import load_model, read_meta
    from .models.student import scheduler_class

    run, out = Path(run), Path(out)
    meta = read_meta(run)
    if meta.get("kind") != "student":
        raise ValueError(f"{str(run)!r} holds a {meta.get('kind')!r}, not a distilled student run")
    if sampling is not None and meta.get("stages"):
        raise ValueError(f"--timesteps: {str(run)!r} keeps one student per step count ({sorted(meta['stages'], key=int)}), "
                         "each exported with its own timesteps; export a stage folder (RUN/stages/N) to choose them")
    if sampling is not None:
        chosen = sorted((k for k, v in sampling["timesteps"].items() if v != meta["sampling"]["timesteps"].get(k)), key=int)
        table = dict(sorted(sampling["timesteps"].items(), key=lambda kv: int(kv[0])))
        meta = {**meta, "sampling": {**sampling, "timesteps": table, "chosen_at_export": chosen}}
    family = meta.get("family", "digits")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {str(out)!r} exists and is not empty; choose a new one")
    if meta.get("stages"):  # one student per step count (SDXL-Lightning): one export each
        out.mkdir(parents=True, exist_ok=True)
        from .methods import method_module

        lines = [f"# {method_module(meta['method']).Method.label} students of `{Path(meta['teacher']).name}`", "",
                 "One student per step count; each folder is a complete export (weights, scheduler, model card):", ""]
        for n, rel in sorted(meta["stages"].items(), key=lambda kv: -int(kv[0])):
            rows = None if not metrics else {**metrics, "rows": [r for r in metrics["rows"] if str(r["steps"]) == n]}
            export(run / rel, out / f"{n}-step", rows, teacher)
            lines.append(f"- `{n}-step/`: the {n}-step student")
        (out / "README.md").write_text("\n".join(lines) + "\n")
        return out
    out.mkdir(parents=True, exist_ok=True)
    backbone_dir = "transformer" if family in ("pixart", "sd3") else "unet"

    if meta["full"]:
        shutil.copytree(run / "student" / "unet", out / backbone_dir)
        weights = f"{backbone_dir}/"
    elif meta.get("lora") is None:  # PE-CoDi: the teacher's UNet as it is
        weights = None
    elif family == "pixart":
        model = load_model(run, teacher=teacher)  # fused
        model.denoiser.backbone.save_pretrained(out / backbone_dir, safe_serialization=True)
        weights = f"{backbone_dir}/ (LoRA fused: diffusers has no PixArt LoRA loader)"
    else:
        import diffusers

        state, metadata = _lora_state(run, meta)
        cls = getattr(diffusers, PIPELINE_CLASSES[family])
        key = "transformer" if family == "sd3" else "unet"
        cls.save_lora_weights(out, **{f"{key}_lora_layers": state, f"{key}_lora_adapter_metadata": metadata},
                              weight_name=LORA_FILE)
        weights = LORA_FILE
    files = [] if weights is None else [weights]
    if meta.get("conditioning") == "controlnet":  # CoDi: its conditional encoder, a diffusers ControlNetModel
        from .models.controlled import CONTROLNET_DIR

        shutil.copytree(run / CONTROLNET_DIR, out / CONTROLNET_DIR)
        files.append(f"{CONTROLNET_DIR}/ (ControlNetModel.from_pretrained; the condition image goes in as controlnet_cond)")
    config = meta["scheduler_config"]
    scheduler_class(config).from_config(config).save_pretrained(out / "scheduler")
    (out / "flashdistill_sampling.json").write_text(json.dumps(meta["sampling"], indent=2))
    (out / "README.md").write_text(model_card(meta, family, files, metrics))
    return out


NO_TIMESTEPS_ARG = {"StableDiffusionUpscalePipeline"}  # its __call__ only calls scheduler.set_timesteps(n)


def _scheduler_picks(meta: dict) -> dict:
    """Per step count of the student, the timesteps its exported LCM/TCD scheduler's
    ``set_timesteps(n)`` picks (no ``timesteps=`` given)."""
    from .core.schedules import VPSchedule
    from .core.timesteps import lcm_inference_timesteps, skipping_grid

    config = meta["scheduler_config"]
    grid = skipping_grid(VPSchedule(num_train_timesteps=int(config.get("num_train_timesteps", 1000))),
                         int(config["original_inference_steps"]))
    return {k: [int(v) for v in lcm_inference_timesteps(grid, int(k))] if int(k) <= len(grid) else None
            for k in meta["sampling"]["timesteps"]}


def _listed(items: list[str], last: str = "and") -> str:
    """Step counts as words: "1", "1 and 2", "1, 2 and 4" (``last``: the final conjunction)."""
    return f" {last} ".join(filter(None, [", ".join(items[:-1]), items[-1] if items else ""]))


def _metrics_table(metrics: dict | None) -> str:
    if not metrics or not metrics.get("rows"):
        return ("No metrics were recorded with this export. Score the student with `flashdistill evaluate "
                "--model RUN --steps 1 2 4` (digits), or with FID / CLIP on your prompts for real models.")
    lines = ["| steps | NFE | FD ↓ | adherence ↑ | teacher MSE ↓ |", "|---:|---:|---:|---:|---:|"]
    for r in metrics["rows"]:
        mse = "–" if r.get("teacher_mse") is None else f"{r['teacher_mse']:.4f}"
        lines.append(f"| {r['steps']} | {r['nfe']} | {r['fd']:.2f} | {r['adherence']:.3f} | {mse} |")
    note = metrics.get("note", "")
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def model_card(meta: dict, family: str, files: list[str], metrics: dict | None) -> str:
    cfg = meta.get("config", {})
    from .methods import method_module

    method = meta.get("method", "flash")
    cls = method_module(method).Method
    short, long, tag = cls.label, cls.title, cls.label.lower().replace(" ", "-")
    ts = meta["sampling"]["timesteps"]
    counts = _listed(list(ts), "or")  # "1, 2 or 4"; "8"
    flow = family == "sd3"
    steps_arg = "sigmas" if flow else "timesteps"
    values = {k: ([round(v / 1000, 6) for v in t] if flow else t) for k, t in ts.items()}
    pipe_cls = meta.get("pipeline") or PIPELINE_CLASSES.get(family, "PixArtAlphaPipeline")
    inputs = {"StableDiffusionInpaintPipeline": ", image=init_image, mask_image=mask_image",
              "StableDiffusionUpscalePipeline": ", image=low_res_image, noise_level=20",
              "StableDiffusionAdapterPipeline": ", image=sketch",
              "StableDiffusionXLAdapterPipeline": ", image=sketch",
              "StableDiffusionControlNetPipeline": ", image=control_image",
              "StableDiffusionXLControlNetPipeline": ", image=control_image"}.get(pipe_cls, "")
    # pipelines whose __call__ takes no timesteps=: their scheduler's set_timesteps(n) picks them
    picked = _scheduler_picks(meta) if pipe_cls in NO_TIMESTEPS_ARG else None
    sched_cls = meta["scheduler_config"].get("_class_name", "LCMScheduler")
    if family == "pixart" or meta["full"]:
        sub = "transformer" if family in ("pixart", "sd3") else "unet"
        model_cls = {"transformer": "PixArtTransformer2DModel" if family == "pixart" else "SD3Transformer2DModel",
                     "unet": "UNet2DConditionModel"}[sub]
        load = (f"from diffusers import {model_cls}\n"
                f"pipe.{sub} = {model_cls}.from_pretrained(\"EXPORT_DIR\", subfolder=\"{sub}\")")
    elif meta.get("lora") is None:  # PE-CoDi: the teacher's UNet as it is
        load = "# the UNet stays the teacher's (PE-CoDi): no LoRA to load"
    elif pipe_cls == "StableDiffusionAdapterPipeline":  # no LoRA loader mixin: the UNet's own
        load = 'pipe.unet.load_lora_adapter("EXPORT_DIR", weight_name="pytorch_lora_weights.safetensors", prefix="unet")'
    else:
        load = 'pipe.load_lora_weights("EXPORT_DIR")'
    lora = meta.get("lora")
    if meta["full"]:
        student = "full fine-tune"
    elif lora is None:
        student = "the teacher's UNet unchanged, steered by a trained ControlNet (PE-CoDi)"
    else:
        student = "LoRA rank {}, alpha {}, on {}".format(lora["rank"], lora["alpha"], ", ".join(lora["targets"]))
    train = cfg.get("train", {})
    settings = [f"- teacher: `{meta['teacher']}` ({family})",
                f"- student: {student}; "
                f"{meta['trainable_params']:,} trainable of the teacher's {meta['teacher_params']:,} parameters"]
    if method == "flash":
        settings += [
            f"- K = {cfg.get('K')}, pi = {cfg.get('pi')}, teacher guidance w ~ U[{cfg.get('guidance_min')}, {cfg.get('guidance_max')}]",
            f"- losses: distillation {cfg.get('distill_loss')}, adversarial {cfg.get('gan_loss') if cfg.get('use_adv') else 'off'}"
            f" (lambda {cfg.get('lambda_adv')}), DMD {'on' if cfg.get('use_dmd') else 'off'} (lambda {cfg.get('lambda_dmd')})"]
    else:
        from .methods.base import StudentConfig

        shared = {f for f in StudentConfig.__dataclass_fields__}
        settings += [f"- {k} = {json.dumps(v)}" for k, v in cfg.items() if k not in shared]
    from .methods.base import student_lr

    lr = student_lr(cfg.get("lr"), cfg.get("full_lr", 0.0), meta["full"])
    settings.append(f"- training: {train.get('steps')} steps, batch {train.get('batch_size')}, lr {lr}")
    gamma = meta["sampling"].get("gamma", 1.0)
    eta_arg = f", eta={gamma:g}" if sched_cls == "TCDScheduler" else ""
    from .tasks import get_task

    given = " ".join(f"--{k} {k.upper()}.png" for k in get_task(meta.get("task")).inputs)
    told = meta["sampling"].get("w_embedding")  # full LCM: the UNet embeds the scale; the pipeline runs no CFG
    scale, guidance_note = 1.0, "Guidance off."
    if told:
        scale, (lo, hi) = told["guidance"], told["range"]
        given += f" --guidance {scale:g}" if family == "digits" else ""
        guidance_note = (f"The UNet is told the CFG scale (LCM's w-embedding, `time_cond_proj_dim = {told['dim']}`): pass "
                         f"any `guidance_scale` in [{lo:g}, {hi:g}] (trained range; default {scale:g}), which the "
                         "pipeline embeds instead of running CFG (one network evaluation per step).")
    digits_usage = f"flashdistill sample --model RUN --prompt \"a handwritten digit seven\" --steps 2 {given} --out grid.png"
    make_pipe = f'pipe = {pipe_cls}.from_pretrained("TEACHER_DIR")'
    if meta.get("conditioning") == "controlnet":  # CoDi: the teacher's folder with the trained ControlNet
        make_pipe = (f'controlnet = ControlNetModel.from_pretrained("EXPORT_DIR", subfolder="controlnet")\n'
                     f'pipe = {pipe_cls}.from_pretrained("TEACHER_DIR", controlnet=controlnet)')
        sched_cls_import = f"ControlNetModel, {sched_cls}"
    else:
        sched_cls_import = sched_cls
    usage = digits_usage.replace("  ", " ") if family == "digits" else f"""import torch
from diffusers import {pipe_cls}, {sched_cls_import}

{make_pipe}
{load}
pipe.scheduler = {sched_cls}.from_pretrained("EXPORT_DIR", subfolder="scheduler")
image = pipe("a photo of a cat"{inputs}, num_inference_steps=2, {'' if picked else f"{steps_arg}={values.get('2')}, "}guidance_scale={float(scale)!r}{eta_arg}).images[0]"""
    steps_note = f"Pass the student's own {steps_arg} for the step count you want. {guidance_note}"
    chosen = meta["sampling"].get("chosen_at_export")
    if chosen:
        steps_note += (f" The {steps_arg} at {_listed(chosen)} steps were chosen at export (`flashdistill export "
                       f"--timesteps`), not those its run recorded.")
    if picked:
        same = [k for k in values if picked[k] == values[k]]
        steps_note = (f"`{pipe_cls}` takes no `timesteps=`: the exported scheduler picks them from the step count "
                      f"(`original_inference_steps = {meta['scheduler_config'].get('original_inference_steps')}`), "
                      f"which gives the student's own timesteps at {_listed(same) or 'no'} steps"
                      + ("" if len(same) == len(values) else
                         f" and the nearest it can elsewhere ({'; '.join(f'{k} steps: {picked[k]}' for k in values if k not in same)})")
                      + f". {guidance_note}")
    lang = "bash" if family == "digits" else "python"
    return f"""---
library_name: diffusers
tags: [{tag}, distillation, few-step, flashdistill]
---
# {short} student of `{Path(meta['teacher']).name}`

A {'LoRA' if not meta['full'] else 'full'} student distilled with {long} by
flashdistill. It generates in {counts} steps without classifier-free guidance (one network
evaluation per step).

## Files
""" + "".join(f"- `{f}`\n" for f in files) + f"""- `scheduler/`: `{sched_cls}` config
- `flashdistill_sampling.json`: the student's timesteps per step count

## Sampling
{steps_note} Between steps the sampler moves with stochasticity gamma = {gamma:g} (1: LCM re-noising; 0: deterministic DDIM move;
`{sched_cls}`{f", called with eta={gamma:g}" if sched_cls == "TCDScheduler" else ""}):

| steps | {steps_arg} |
|---:|---|
""" + "\n".join(f"| {k} | `{v}` |" for k, v in values.items()) + f"""

```{lang}
{usage}
```

## Settings
""" + "\n".join(settings) + f"""

## Metrics
{_metrics_table(metrics)}
"""


def export_kohya(run: str | Path, out: str | Path, teacher: str | Path | None = None) -> Path:
    """One single-file LoRA in kohya's naming (``lora_unet_..._to_q.lora_down.weight`` with an
    ``alpha`` per module), the format ComfyUI, AUTOMATIC1111 and Forge load, plus ``README.md``
    with the sampler, steps and CFG to use. The conversion is diffusers'
    ``convert_state_dict_to_kohya``; it writes each module's alpha as its rank, so the LoRA's own
    alpha is written back over it (the scale alpha / rank must survive the conversion)."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from .models.loading import read_meta

    run, out = Path(run), Path(out)
    meta = read_meta(run)
    if meta.get("kind") != "student":
        raise ValueError(f"{str(run)!r} holds a {meta.get('kind')!r}, not a distilled student run")
    family = meta.get("family", "digits")
    if meta.get("stages"):
        raise ValueError(f"{str(run)!r} keeps one student per step count ({sorted(meta['stages'], key=int)}); export "
                         "one of its stage folders (RUN/stages/N) with --format kohya")
    if family not in KOHYA_FAMILIES:
        why = ("the built-in digits teacher (MiniLM text encoder, 8x8 pixels) has no counterpart in those tools"
               if family == "digits" else
               f"ComfyUI / A1111 / Forge load kohya LoRAs of SD1.5/2 and SDXL UNets, not {family} transformers")
        raise ValueError(f"--format kohya: {why}; use --format diffusers")
    if meta["full"]:
        raise ValueError("--format kohya writes LoRAs; this is a full student: use --format diffusers (its unet/ folder)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {str(out)!r} exists and is not empty; choose a new one")
    state, _ = _lora_state(run, meta)
    alpha = float(meta["lora"]["alpha"])
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state.items()})
    for k in [k for k in kohya if k.endswith(".alpha")]:
        kohya[k] = torch.tensor(alpha)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{Path(meta['teacher']).name}-{meta.get('method', 'flash')}-lora.safetensors"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out / name),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(meta["lora"]["rank"]),
                        "ss_network_alpha": str(alpha), "flashdistill_method": meta.get("method", "flash")})
    (out / "README.md").write_text(kohya_note(meta, family, name))
    return out


def kohya_note(meta: dict, family: str, name: str) -> str:
    """How to sample the kohya LoRA in ComfyUI / A1111 / Forge: those tools take a sampler name, a
    step count and CFG, not a list of timesteps, so the note says what comes closest."""
    from .methods import method_module

    cls = method_module(meta.get("method", "flash")).Method
    ts = meta["sampling"]["timesteps"]
    counts = ", ".join(ts)
    table = "\n".join(f"| {k} | `{v}` |" for k, v in ts.items())
    return f"""# {cls.label} LoRA of `{Path(meta['teacher']).name}` ({KOHYA_FAMILIES[family]}), kohya format

`{name}`: load it as a LoRA (ComfyUI: LoraLoader, strength 1.0; AUTOMATIC1111 / Forge: put it in
`models/Lora` and add `<lora:{Path(name).stem}:1>` to the prompt) on the teacher's checkpoint.

- Sampler: **LCM** (ComfyUI `lcm`, A1111/Forge `LCM`), scheduler `sgm_uniform` (ComfyUI) or
  the default; **CFG 1** (the student is distilled with guidance: more CFG burns the image).
- Steps: {counts}. The student was trained at these timesteps (out of 1000), which diffusers takes
  as `timesteps=`; other tools space the steps themselves, which comes close but is not identical:

| steps | timesteps |
|---:|---|
{table}

For exact sampling use the diffusers export (`flashdistill export --format diffusers`).
"""
