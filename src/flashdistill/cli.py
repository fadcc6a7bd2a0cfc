"""``flashdistill`` command line."""
from __future__ import annotations

import argparse
import errno
import json
import sys
import time
from pathlib import Path

EPILOG_SET = "Config keys for --set (key (default): meaning):\n  "


def _int_in(low: int, high: int | None, what: str):
    """An argparse type: an integer in [low, high) (high None: no bound), named ``what`` in errors."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low or (high is not None and v >= high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = _int_in(1, None, "a positive integer")
non_negative_int = _int_in(0, None, "an integer >= 0")
seed_int = _int_in(0, 2**63, "a seed in [0, 2**63)")  # what torch generators and NumPy accept


def guidance_scale(text: str) -> float:
    """A CFG scale in diffusers' form: a finite number >= 0 (1: no guidance, 0: unconditional)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


timestep_arg = guidance_scale  # a timestep of the teacher's schedule: the same check, a finite number >= 0


def _add_guidance_interval(p) -> None:
    p.add_argument("--guidance-interval", type=timestep_arg, nargs=2, default=None, metavar=("LO", "HI"),
                   help="teachers: apply CFG only at timesteps in [LO, HI] and the conditional prediction alone "
                        "elsewhere (Kynkaanniemi et al. 2024; fewer network calls). On the digits teacher "
                        "'--guidance 2 --guidance-interval 100 500' scores better FD than w = 1.5 everywhere at the "
                        "same adherence (docs/quality.md section 20). Students run no CFG and ignore it")


def _interval(flag: str, pair, example: str):
    """A LO HI timestep flag's value as a (lo, hi) tuple, None when absent; LO > HI is refused."""
    if pair is None:
        return None
    lo, hi = pair
    if lo > hi:
        raise ValueError(f"{flag} {lo:g} {hi:g}: expected LO <= HI (timesteps, e.g. {example})")
    return lo, hi


def _guidance_interval(args):
    """--guidance-interval LO HI as a (lo, hi) tuple, None when absent."""
    return _interval("--guidance-interval", args.guidance_interval, "100 500")


def lora_scale_arg(text: str) -> float | dict[str, float]:
    """--extra-lora-scale: ``S`` (the whole LoRA), or per UNet block ``[S,]BLOCK=S[,BLOCK=S...]``,
    BLOCK one of down, mid, up, down.<i>, up.<i> (a leading bare S: every other layer)."""
    import math

    from .models.loading import BLOCK_SCALE_KEYS, lora_scale

    def number(part: str) -> float:
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or BLOCK=number ({BLOCK_SCALE_KEYS}), "
                                             f"got {part!r} in {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite scale, got {part!r} in {text!r}")
        return v

    parts = [p.strip() for p in text.split(",")]
    if len(parts) == 1 and "=" not in parts[0]:
        return number(parts[0])
    out = {}
    for i, part in enumerate(parts):
        key, value = part.split("=", 1) if "=" in part else ("default" if i == 0 else part, part)
        if key.strip() in out:
            raise argparse.ArgumentTypeError(f"block {key.strip()!r} given twice in {text!r}")
        out[key.strip()] = number(value.strip())
    try:
        return lora_scale(out)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (in {text!r})") from None


def _config_help(cls) -> str:
    from .config import describe

    return EPILOG_SET + "\n  ".join(describe(cls))


def _method_help() -> str:
    """Config keys: those every method shares, then, per method, its own keys and the shared ones
    whose default it changes."""
    from .config import describe
    from .methods import METHODS, method_module
    from .methods.base import StudentConfig
    from .train import TrainConfig

    common = [line for line in describe(StudentConfig) if not line.startswith("train.")] + describe(TrainConfig, "train.")
    text = EPILOG_SET + "\n  ".join(common)
    for m in METHODS:
        method = method_module(m).Method
        own = [line for line in describe(method.config_class) if line not in common]
        text += f"\n\n--method {m}: {method.title}\n  " + "\n  ".join(own)
    return text


def _summary(what: str, where, summary: dict) -> None:
    print(f"{what} written to {where} ({summary['seconds']:.0f} s, {summary['processes']} process(es)); "
          f"log: {where}/log.jsonl, previews: {where}/samples")


def cmd_train_teacher(args) -> None:
    from . import api
    from .config import parse_overrides

    keys = {k: v for k, v in {"steps": args.steps, "seed": args.seed, "task": args.task, "base": args.base,
                              "style": args.style, "lora": args.lora or None}.items() if v is not None}
    run = api.train_teacher(args.out, dataset=args.dataset, config=args.config, overrides=parse_overrides(args.set),
                            resume=args.resume, dry_run=args.dry_run, progress=not args.quiet,
                            report_to=args.report_to, **keys)
    if not args.dry_run and api.is_main_process():
        _summary("LoRA" if run.config.get("lora") else "teacher", args.out, run.summary)


def cmd_distill(args) -> None:
    from . import api
    from .config import parse_overrides

    run = api.distill(args.teacher, args.out, method=args.method, preset=args.preset, config=args.config,
                      overrides=parse_overrides(args.set), full=args.full, dtype=args.dtype, data=args.data,
                      caption_column=args.caption_column, cache_latents=args.cache_latents, resume=args.resume,
                      dry_run=args.dry_run, progress=not args.quiet, report_to=args.report_to)
    if not args.dry_run and api.is_main_process():
        _summary("student", args.out, run.summary)


def cmd_sample(args) -> None:
    import numpy as np
    import torch

    from . import api
    from .train import save_image_grid

    steps = _sample_steps(args.steps, args.timesteps)
    model = api.load(args.model, teacher=args.teacher, extra_loras=_extra_loras(args), timesteps=args.timesteps)
    prompts = [args.prompt] * args.num_images
    condition = model.condition(args.image, args.mask, args.sketch, args.noise_level, len(prompts))
    images = model.generate_tensor(prompts, steps, seed=args.seed, guidance=args.guidance, sampler=args.sampler,
                                   condition=condition, guidance_interval=_guidance_interval(args))
    if condition is not None:  # the condition first, as the model saw it
        images = torch.cat([model.model.show(condition)[:1], images])
    save_image_grid(images, Path(args.out), nrow=min(8, len(images)), scale=max(1, 64 // images.shape[-1]))
    print(f"wrote {args.out}")
    if args.npz:
        np.savez(args.npz, images=images.float().clamp(-1, 1).numpy().astype(np.float32), prompts=np.array(prompts))
        print(f"wrote {args.npz}")


def _extra_loras(args) -> list[tuple]:
    """--extra-lora A --extra-lora B [--extra-lora-scale a [--extra-lora-scale b]] -> [(A, a), (B, b)]
    (a missing scale is 1.0); an --extra-lora-interval LO HI makes the first LoRA's entry (A, a, (LO, HI))."""
    loras, scales = args.extra_lora or [], args.extra_lora_scale or []
    if len(scales) > len(loras):
        raise ValueError(f"{len(scales)} --extra-lora-scale value(s) for {len(loras)} --extra-lora: give one "
                         "scale per LoRA, in the same order")
    out = [(lora, scales[i] if i < len(scales) else 1.0) for i, lora in enumerate(loras)]
    interval = _interval("--extra-lora-interval", args.extra_lora_interval, "0 998")
    if interval is not None:
        if not out:
            raise ValueError(f"--extra-lora-interval {interval[0]:g} {interval[1]:g} limits an --extra-lora, and none is given")
        out[0] = (*out[0], interval)
    return out


def _add_timesteps(p) -> None:
    p.add_argument("--timesteps", type=non_negative_int, nargs="+", action="append", default=None, metavar="T",
                   help="students: sample at these timesteps, from high to low (e.g. 999 749 499 124), in place of "
                        "the run's own table at len(T) steps; repeat for other step counts; any timestep of the "
                        "schedule, not only those the student trained at (its flashdistill.json lists its own)")


def _sample_steps(steps, timesteps):
    """sample's step count: --steps, else the length of the one --timesteps (each must be a table
    of some step count; with several, --steps picks one)."""
    if not timesteps:
        return steps
    counts = [len(ts) for ts in timesteps]
    if steps is None and len(counts) == 1:
        return counts[0]
    if steps not in counts:
        given = "; ".join(" ".join(map(str, ts)) for ts in timesteps)
        raise ValueError(f"--timesteps gives tables of {', '.join(map(str, counts))} step(s) ({given}), but --steps is "
                         f"{steps}: {'drop --steps or make it one of those' if steps else 'pass --steps to pick one'}")
    return steps


def _add_extra_lora(p) -> None:
    g = p.add_argument_group("stacking LoRAs (no training): fused into the model, as diffusers' set_adapters")
    g.add_argument("--extra-lora", action="append", default=None, metavar="DIR_OR_FILE",
                   help="a LoRA to stack on the model: a LoRA folder from 'train-teacher --lora' (e.g. a style), a "
                        "folder with pytorch_lora_weights.safetensors, or a diffusers / kohya .safetensors file; repeat "
                        "for several")
    g.add_argument("--extra-lora-scale", action="append", type=lora_scale_arg, default=None, metavar="S",
                   help="the strength of each --extra-lora, in order (default 1.0); per UNet block as "
                        "'[S,]BLOCK=S,...' with BLOCK down, mid, up, down.<i> or up.<i>, e.g. 'mid=0.5' (every LoRA "
                        "layer of the block, resnets too; a leading S: the other layers)")
    g.add_argument("--extra-lora-interval", type=timestep_arg, nargs=2, default=None, metavar=("LO", "HI"),
                   help="apply the first --extra-lora only at the calls whose timestep is in [LO, HI] (kept unfused "
                        "and switched per call, as diffusers' set_adapters weight changed per step). '0 998' leaves "
                        "a student's first call (t = 999) to the student alone: with '--extra-lora-scale mid=0.5' "
                        "the digits style LoRA then scores 4-step FD 1.10-1.18x the styled teacher's at 1.5-1.8 "
                        "points less adherence (docs/conditional.md, 'LoRA composition'); at 2 steps the style "
                        "comes too late")


def cmd_evaluate(args) -> None:
    from . import api
    from .scoring import fd_floor, pixel_fd_floor
    from .tasks import TASK_METRICS

    rows = api.evaluate(args.model, args.steps, args.num_samples, teacher=args.teacher, guidance=args.guidance,
                        sampler=args.sampler, teacher_guidance=args.teacher_guidance, prompts=args.prompts,
                        protocol=args.protocol, reference=args.reference, inception_weights=args.inception_weights,
                        clip_model=args.clip_model, extra_loras=_extra_loras(args), progress=not args.quiet,
                        seed_set=args.seed_set, timesteps=args.timesteps,
                        guidance_interval=_guidance_interval(args))
    if rows and "fid" in rows[0]:
        for r in rows:
            fid = "-" if r["fid"] is None else f"{r['fid']:.2f}"
            clip = "-" if r["clip_score"] is None else f"{r['clip_score']:.2f}"
            extra = "".join(f"  {k} {r[k]:.4f}" for k in TASK_METRICS if k in r)  # conditional pipelines
            print(f"steps {r['steps']:>3}  FID {fid}  CLIP {clip}{extra}  ({r['num_samples']} prompts)")
        result = {"model": str(args.model), "protocol": args.protocol, "rows": rows}
    else:
        for ts in args.timesteps or []:
            print(f"student sampled at {' '.join(map(str, ts))} ({len(ts)} steps, --timesteps)")
        style = rows[0].get("style", "none") if rows else "none"
        styled = "" if style == "none" else f" (both in style {style!r}, the model's LoRA)"
        print(f"FD floor (real train digits vs test digits{styled}): {fd_floor(args.num_samples, style):.3f} at "
              f"{args.num_samples} samples (all train digits: {fd_floor(None, style):.3f}); pixel FD floor "
              f"{pixel_fd_floor(args.num_samples, style):.4f}")
        for r in rows:
            mse = "" if r["teacher_mse"] is None else f"  teacher_mse {r['teacher_mse']:.4f}"
            extra = "".join(f"  {k} {r[k]:.4f}" for k in (*TASK_METRICS, "diversity", "fd_unstyled", "ink") if k in r)
            print(f"steps {r['steps']:>3}  FD {r['fd']:.3f}  pixel FD {r['pixel_fd']:.4f}  hist {r['hist']:.4f}  "
                  f"adherence {r['adherence']:.3f}{mse}{extra}")
        result = {"model": str(args.model), "num_samples": args.num_samples, "fd_floor": fd_floor(args.num_samples, style),
                  "pixel_fd_floor": pixel_fd_floor(args.num_samples, style), "seed_set": args.seed_set, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


def cmd_export(args) -> None:
    from . import api

    out = api.export(args.model, args.out, format=args.format, teacher=args.teacher, num_samples=args.num_samples,
                     progress=not args.quiet, timesteps=args.timesteps)
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def cmd_app(args) -> None:
    from .app import launch

    launch(args.model, teacher=args.teacher, port=args.port, host=args.host)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, num_samples=args.num_samples, progress=not args.quiet)


def cmd_benchmark(args) -> None:
    from .train import TrainingInterrupted

    try:
        _run_benchmark(args)
    except TrainingInterrupted as e:  # the benchmark's runs resume from its cache on a plain rerun
        raise TrainingInterrupted(e.step, e.signum, "run the same command again to resume") from None


def _run_benchmark(args) -> None:
    if args.preset == "composition":
        from .composition_benchmark import run_composition

        run_composition(args.out, cache=args.cache, num_samples=args.num_samples, progress=not args.quiet)
        return
    if args.preset == "conditional":
        from .conditional_benchmark import run_conditional

        run_conditional(args.out, cache=args.cache, num_samples=args.num_samples, progress=not args.quiet, jobs=args.jobs)
        return
    from .benchmark import run_benchmark

    run_benchmark(args.preset, args.out, cache=args.cache, num_samples=args.num_samples, progress=not args.quiet,
                  jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS, method_module
    from .methods.dsm import TeacherConfig

    ap = argparse.ArgumentParser(
        prog="flashdistill",
        description="Distil a multi-step diffusion teacher into a 1-4 step student (Flash Diffusion).",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train-teacher", help="train the built-in SD-style teacher (or a conditional one, or a LoRA on it)",
                       description="Train an SD-style UNet2DConditionModel teacher on a built-in dataset, "
                                   "conditioned on MiniLM text embeddings, and save it as a diffusers-format folder; "
                                   "--task makes a conditional teacher, --base DIR [--style S] [--lora] fine-tunes "
                                   "one (with --lora: a LoRA folder that sample/evaluate --extra-lora stack).",
                       epilog=_config_help(TeacherConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="built-in dataset (default: digits)")
    p.add_argument("--task", choices=["t2i", "inpaint", "sr", "sketch"], default=None,
                   help="t2i (default): text-to-image; inpaint: box masks; sr: x2 super-resolution from 4x4; "
                        "sketch: a T2I-Adapter on stroke maps over the frozen teacher --base")
    p.add_argument("--base", default=None, help="--task sketch: the text-to-image teacher folder the adapter steers; "
                                                "t2i: a teacher to fine-tune (with --lora: the frozen base of a LoRA)")
    p.add_argument("--style", choices=["none", "thick"], default=None,
                   help="transform of the training images (thick: stroke thickening); with --base and --lora it makes "
                        "a style LoRA, which 'sample/evaluate --extra-lora' stack on the base's students")
    p.add_argument("--lora", action="store_true", help="train a LoRA on the frozen --base teacher instead of every weight")
    p.add_argument("--out", required=True, help="output folder (the teacher, checkpoints, log, previews)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default 950)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed (default 0)")
    _add_run_options(p)
    p.set_defaults(func=cmd_train_teacher)

    presets = sorted({name for m in METHODS for name in method_module(m).PRESETS})
    p = sub.add_parser("distill", help="distil a teacher into a few-step student (Flash, LCM, SPLAM, SDXL-Lightning, CoDi)",
                       description="Distil a teacher folder into a LoRA (or --full) student with --method: flash "
                                   "(Flash Diffusion, the default), lcm (LCM / LCM-LoRA), splam (SPLAM), lightning (SDXL-Lightning) or codi (CoDi: a conditional student "
                                   "from a text-to-image teacher, --set task=inpaint|sr|sketch). "
                                   "Runs under accelerate: 'accelerate launch --num_processes N -m flashdistill.cli distill ...' "
                                   "(on a CPU-only machine add --multi_gpu; accelerate's --cpu starts a single process). "
                                   "Config precedence: preset < --config file < --set.",
                       epilog=_method_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher folder (e.g. from train-teacher)")
    p.add_argument("--method", choices=list(METHODS), default="flash", help="distillation method (default flash)")
    p.add_argument("--out", required=True, help="run folder (student, checkpoints, log, previews, config)")
    p.add_argument("--preset", choices=["auto", *presets], default="auto",
                   help="per-teacher defaults of the method (auto: 'digits' for the built-in teacher, else the pipeline's "
                        "family; flash: 'sd' is the paper's SD1.5 setting; flash and codi: 'digits-long' the digits preset at "
                        "4x the steps; splam: 'sd2' is the paper's SD2.1 setting)")
    p.add_argument("--full", action="store_true", help="train the whole student instead of a LoRA")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the frozen teacher, text encoders and VAE (config key 'dtype', default fp32); "
                        "trainable weights stay float32")
    p.add_argument("--data", default=None, help="captioned images for real teachers: an image folder with metadata.jsonl "
                                                "(file_name, text), a Hugging Face datasets folder (save_to_disk), or "
                                                "webdataset .tar shards (a file, a folder or a glob)")
    p.add_argument("--caption-column", default=None, help="caption field of --data (default: text, then caption)")
    p.add_argument("--cache-latents", default=None, metavar="DIR",
                   help="encode --data once with the teacher's VAE and text encoders into DIR (resumable), then "
                        "train from it: a cached run draws the same latents as an uncached one")
    _add_run_options(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="write a student as files diffusers (or ComfyUI / A1111) load as is",
                       description="Export a distillation run. --format diffusers (default): "
                                   "pytorch_lora_weights.safetensors for pipe.load_lora_weights (SD1.5/2, SDXL, SD3; "
                                   "PixArt and full students: the fused/full backbone folder), scheduler/ (LCMScheduler "
                                   "or FlowMatchLCMScheduler), flashdistill_sampling.json (the student's timesteps) and "
                                   "a model card README.md. --format kohya: one single-file LoRA (kohya naming) that "
                                   "ComfyUI, AUTOMATIC1111 and Forge load, for LoRA students of SD1.5/2 and SDXL "
                                   "teachers, with a note of the sampler, steps and CFG to use.")
    p.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers", help="file layout (default diffusers)")
    p.add_argument("--model", required=True, help="distillation run folder")
    p.add_argument("--out", required=True, help="new or empty output folder")
    p.add_argument("--teacher", default=None, help="the run's teacher folder, if it is no longer where the run "
                                                   "recorded it (nor at the same place relative to the run)")
    p.add_argument("--num-samples", type=non_negative_int, default=500,
                   help="digits students: samples per row of the model card's metrics (0: none; default 500)")
    p.add_argument("--timesteps", type=non_negative_int, nargs="+", action="append", default=None, metavar="T",
                   help="--format diffusers: the export samples at these timesteps, from high to low, at len(T) steps "
                        "instead of the run's table (flashdistill_sampling.json, the model card and its metrics say "
                        "so); repeat for other step counts; e.g. tables chosen with 'evaluate --timesteps'")
    _add_quiet(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("app", help="a local web page: the student beside its teacher, same prompt and seed",
                       description="Serve a Gradio page (pip install 'flashdistill[app]'): a prompt, a seed, the "
                                   "student's step count and a compare switch that runs the teacher at its full steps "
                                   "beside the student, with both latencies; the run's metrics and quality-vs-NFE plot "
                                   "when it has them (RUN/results.json, RUN/quality_vs_nfe.png).")
    p.add_argument("--model", required=True, help="distillation run folder (or a teacher folder)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the one the run recorded)")
    p.add_argument("--port", type=_int_in(1, 65536, "a port in [1, 65535]"), default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("sample", help="generate a PNG grid (and optionally an .npz) from a teacher or a student",
                       description="Generate images. Image i uses seed S+i, so it does not depend on --num-images.")
    p.add_argument("--model", required=True, help="teacher folder or distillation run folder")
    p.add_argument("--teacher", default=None, help="runs: the teacher folder, if it is no longer where the run "
                                                   "recorded it (nor at the same place relative to the run)")
    p.add_argument("--prompt", required=True, help="text prompt, e.g. 'a handwritten digit seven'")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (default: 32 for teachers, 2 for students, whose runs list the step counts "
                        "they sample with, usually 1, 2 and 4)")
    _add_timesteps(p)
    p.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale for teachers (default: the teacher's), and the scale a full LCM student with a "
                   "w-embedding is told (default: its own; students without one run no CFG and ignore it, with a warning)")
    p.add_argument("--sampler", choices=["dpmpp_2m", "ddim", "euler", "unipc"], default=None, help="teacher solver (default dpmpp_2m)")
    _add_guidance_interval(p)
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the first image")
    p.add_argument("--num-images", type=positive_int, default=16, help="number of images")
    p.add_argument("--out", required=True, help="PNG grid to write (upscaled 8x for viewing)")
    p.add_argument("--npz", default=None, help="also save raw samples: images float32 (N,C,H,W) in [-1,1], prompts")
    g = p.add_argument_group("conditional models (inpaint, sr, sketch teachers and their students); the grid "
                             "starts with the condition")
    g.add_argument("--image", default=None, help="inpaint: the image to repaint; sr: the low-resolution image "
                                                 "(any size: resized to half the model's)")
    g.add_argument("--mask", default=None, help="inpaint: the mask image, white = repaint")
    g.add_argument("--sketch", default=None, help="sketch: the stroke map, white = stroke")
    g.add_argument("--noise-level", type=_int_in(0, 999, "an integer in [0, 999]"), default=None,
                   help="sr: noise augmentation of the low-res (class label); default the model's: 20 for a "
                        "StableDiffusionUpscalePipeline (diffusers' default), 0 for the digits sr task")
    _add_extra_lora(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="FD, adherence and teacher MSE on the built-in digits task",
                       description="Score a teacher or student on the digits task (metrics: docs/metrics.md).")
    p.add_argument("--model", required=True, help="teacher folder or distillation run folder")
    p.add_argument("--steps", type=positive_int, nargs="+", default=None,
                   help="step counts to evaluate (default: 32 for teachers; for students the length of --timesteps, "
                        "else their step counts, usually 1 2 4)")
    _add_timesteps(p)
    p.add_argument("--guidance", type=guidance_scale, default=None,
                   help="CFG scale for teachers, and the scale a full LCM student with a w-embedding is told")
    p.add_argument("--sampler", choices=["dpmpp_2m", "ddim", "euler", "unipc"], default=None, help="teacher solver")
    _add_guidance_interval(p)
    p.add_argument("--num-samples", type=positive_int, default=1000, help="generated samples per row")
    p.add_argument("--teacher", default=None, help="teacher folder for teacher_mse (its 32-step output); also the "
                                                   "run's teacher when the folder the run recorded is gone")
    p.add_argument("--teacher-guidance", type=guidance_scale, default=None, help="CFG scale of the reference")
    p.add_argument("--seed-set", type=non_negative_int, default=0,
                   help="digits models: score on another set of sample seeds (and, for conditional tasks, other "
                        "random condition parts such as inpainting's boxes), on the same test digits and prompts; 0 "
                        "(default) is the set every documented figure uses, 1, 2, ... check a choice made on it")
    _add_quiet(p)
    g = p.add_argument_group("real models (FID with Inception, CLIP score; nothing is downloaded)")
    g.add_argument("--prompts", default=None, help="COCO captions JSON or a text file with one prompt per line")
    g.add_argument("--protocol", choices=["coco2017-5k", "coco2014-30k", "coco2014-10k"], default=None,
                   help="paper protocols: the first caption of the first N images by id (N = 5k / 30k / 10k)")
    g.add_argument("--reference", default=None, help="folder of reference images for FID (e.g. COCO val images); "
                                                     "conditional pipelines also make sample i's condition (mask, "
                                                     "low-res, stroke map) from image i and score their task metrics")
    g.add_argument("--inception-weights", default=None, help="local FID Inception weights (torch-fidelity's "
                                                             "pt_inception-2015-12-05; default: torch hub cache)")
    g.add_argument("--clip-model", default=None, help="local transformers CLIP folder for the CLIP score")
    g.add_argument("--out", default=None, help="write the rows as JSON here")
    _add_extra_lora(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("demo", help="the whole story on the built-in digits task, end to end",
                       description="Train the digits teacher (or reuse OUT/teacher), distil it with Flash into "
                                   "OUT/flash, and print FD / adherence / teacher MSE at 1, 2, 4 steps against the "
                                   "teacher and DPM-Solver++ at the same NFE; writes OUT/results.json and OUT/grid.png.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="samples per metric row")
    _add_quiet(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("benchmark", help="quality vs NFE, speed and cost; the paper's ablations at toy scale",
                       description="Benchmark on the built-in digits task. 'quick' (about 12 min on 2 CPU cores "
                                   "from scratch): the teacher at 32 steps, DDIM / Euler / DPM-Solver++ / UniPC on "
                                   "the teacher at 1, 2, 4, 8 steps, the Flash student at 1, 2, 4 steps. 'full': 2000 "
                                   "samples per row, the teacher at 50 steps and a guidance sweep. 'ablations': 13 "
                                   "equal-budget Flash runs (loss terms, pi(t), distillation loss, GAN loss, K) at "
                                   "2 steps beside the paper's Fig. 4 numbers (about 35 min). 'methods': Flash, LCM-LoRA, SPLAM and "
                                   "SDXL-Lightning from the same teacher at equal training wall time (LCM, SPLAM and Lightning "
                                   "sized to Flash's seconds on this machine by probes at a fifth of each budget), "
                                   "three seeds each (two for SPLAM), at 1, 2, 4 steps beside DPM-Solver++ and UniPC (19.8 min with "
                                   "the teacher cached on the 2-core machine measured last). Writes OUT/results.json, "
                                   "OUT/report.md, OUT/grid.png and OUT/quality_vs_nfe.png (ablations: "
                                   "OUT/ablations.png). Trained models are cached in --cache and reused.")
    p.add_argument("--preset", choices=["quick", "full", "ablations", "methods", "conditional", "composition"],
                   default="quick", help="what to run (default quick; conditional: Flash on the inpaint, sr and sketch "
                                         "teachers; composition: a style LoRA stacked on the Flash student)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache", default="runs/cache", help="folder of trained teachers and students, reused across "
                                                         "runs and presets (default runs/cache)")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="samples per row (default: quick 500, full 2000, ablations 500)")
    p.add_argument("--jobs", type=non_negative_int, default=0,
                   help="training runs side by side (the methods, ablations and conditional presets), each in its own "
                        "process with its share of the cores (default 0: one per core, at most 2, on CPU; 1 with a GPU)")
    _add_quiet(p)
    p.set_defaults(func=cmd_benchmark)
    return ap


def _add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or chatter (the summary line and "
                                                        "errors still print; RUN/log.jsonl is unchanged)")


def _add_run_options(p) -> None:
    from .api import REPORT_TO

    p.add_argument("--report-to", choices=list(REPORT_TO), default="none",
                   help="also log losses, diagnostics, learning rates and preview grids to an experiment tracker "
                        "through accelerate (tensorboard: event files under OUT/tensorboard; wandb: set WANDB_MODE=offline "
                        "to log without a network); default none")
    _add_quiet(p)
    p.add_argument("--config", default=None, help="YAML file with config keys (see below)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")


def main(argv=None) -> int:
    from .config import ConfigError
    from .models.loading import ModelNotFound
    from .train import NonFiniteLoss, TrainingInterrupted

    parser = build_parser()
    for a in sys.argv[1:] if argv is None else argv:  # argparse drops a literal '--' value and runs without it
        if a.startswith("--") and a.endswith("=--"):
            parser.error(f"argument {a[:-3]}: expected a value, got '--'")
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        args.func(args)
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except NonFiniteLoss as e:
        print(f"flashdistill {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, ModelNotFound, ValueError, FileNotFoundError) as e:
        print(f"flashdistill {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"flashdistill {args.command}: error: disk full ({e}); the previous checkpoint is intact, free space "
              "and resume with --resume", file=sys.stderr)
        return 1
    if getattr(args, "verbose_time", True):
        print(f"[{args.command} done in {time.time() - t0:.1f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
