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


def _load_method_config(cls, args, extra: dict):
    from .config import load_config, merge

    cfg = load_config(cls, args.config, args.set)
    if extra:
        from .config import from_dict, to_dict

        cfg = from_dict(cls, merge(to_dict(cfg), extra))
    return cfg


def cmd_train_teacher(args) -> None:
    from .config import to_dict
    from .data.digits import get_dataset
    from .methods.dsm import TeacherConfig, TeacherTraining
    from .train import train

    extra = {"dataset": args.dataset} if args.dataset else {}
    train_extra = {k: v for k, v in {"steps": args.steps, "seed": args.seed}.items() if v is not None}
    if train_extra:
        extra["train"] = train_extra
    cfg = _load_method_config(TeacherConfig, args, extra)
    print(json.dumps(to_dict(cfg), indent=2))
    if args.dry_run:
        return
    dataset = get_dataset(cfg.dataset, "train")
    method = TeacherTraining(cfg)
    n = sum(p.numel() for p in method.unet.parameters())
    print(f"teacher UNet: {n / 1e6:.2f}M parameters; training {cfg.train.steps} steps -> {args.out}")
    summary = train(method, dataset, args.out, resume=args.resume)
    print(f"teacher written to {args.out} ({summary['seconds']:.0f} s)")


def cmd_sample(args) -> None:
    import numpy as np

    from .models.loading import load_model
    from .sample import sample
    from .train import save_image_grid

    model = load_model(args.model, teacher=args.teacher)
    prompts = [args.prompt] * args.num_images
    seeds = [args.seed + i for i in range(args.num_images)]
    images = sample(model, prompts, seeds, args.steps, guidance=args.guidance, sampler=args.sampler)
    save_image_grid(images, Path(args.out), nrow=min(8, args.num_images), scale=max(1, 64 // images.shape[-1]))
    print(f"wrote {args.out}")
    if args.npz:
        np.savez(args.npz, images=images.float().clamp(-1, 1).numpy().astype(np.float32), prompts=np.array(prompts))
        print(f"wrote {args.npz}")


def evaluate_model(model, num_samples: int, steps_list: list[int], guidance: float | None, sampler: str | None,
                   reference=None) -> list[dict]:
    from .evaluate import eval_prompts, score
    from .sample import sample

    prompts, labels, seeds = eval_prompts(num_samples)
    rows = []
    for steps in steps_list:
        images = sample(model, prompts, seeds, steps, guidance=guidance, sampler=sampler)
        rows.append({"steps": steps, **score(images, labels, reference)})
    return rows


def cmd_evaluate_real(args, model) -> None:
    from .metrics import (PROTOCOLS, MetricUnavailable, clip_scorer, evaluate_real, inception_extractor,
                          read_prompts, reference_features)

    if not args.prompts:
        raise ValueError("this model is not a digits model: pass --prompts FILE (COCO captions JSON or one prompt "
                         "per line), and --reference DIR for FID")
    n = PROTOCOLS[args.protocol] if args.protocol else args.num_samples
    prompts = read_prompts(args.prompts, n if args.protocol else None)[:n]
    try:
        extractor = inception_extractor(args.inception_weights) if args.reference else None
        scorer = clip_scorer(args.clip_model) if args.clip_model or not args.reference else None
    except MetricUnavailable as e:
        raise ValueError(str(e)) from None
    reference = reference_features(args.reference, extractor) if args.reference else None
    rows = evaluate_real(model, prompts, args.steps, args.guidance, reference, extractor, scorer)
    for r in rows:
        fid = "-" if r["fid"] is None else f"{r['fid']:.2f}"
        clip = "-" if r["clip_score"] is None else f"{r['clip_score']:.2f}"
        print(f"steps {r['steps']:>3}  FID {fid}  CLIP {clip}  ({r['num_samples']} prompts)")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": str(args.model), "protocol": args.protocol, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


def _moved_teacher(run, teacher):
    """evaluate's --teacher (the reference) also stands in for a run's teacher, but only when the
    run's recorded teacher folder is gone: it never swaps the base of a loadable run."""
    from .models.loading import read_meta
    from .models.model import is_pipeline_folder

    if teacher is None or is_pipeline_folder(run):
        return None
    meta = read_meta(Path(run))
    return teacher if meta.get("kind") == "student" and not Path(meta["teacher"]).exists() else None


def cmd_evaluate(args) -> None:
    from .evaluate import eval_prompts, fd_floor, pixel_fd_floor
    from .models.loading import load_model
    from .sample import sample

    model = load_model(args.model, teacher=_moved_teacher(args.model, args.teacher))
    if model.meta.get("dataset") != "digits":
        return cmd_evaluate_real(args, model)
    ignored = [flag for flag, value in (("--prompts", args.prompts), ("--protocol", args.protocol),
                                        ("--reference", args.reference), ("--inception-weights", args.inception_weights),
                                        ("--clip-model", args.clip_model)) if value]
    if ignored:
        raise ValueError(f"{args.model} is a digits model, scored on the built-in digits metrics; "
                         f"{', '.join(ignored)} only apply to real models: drop them")
    reference = None
    if args.teacher:
        teacher = load_model(args.teacher)
        prompts, _, seeds = eval_prompts(args.num_samples)
        reference = sample(teacher, prompts, seeds, 32, guidance=args.teacher_guidance)
    rows = evaluate_model(model, args.num_samples, args.steps, args.guidance, args.sampler, reference)
    print(f"FD floor (real train digits vs test digits): {fd_floor(args.num_samples):.3f} at {args.num_samples} "
          f"samples (all train digits: {fd_floor():.3f}); pixel FD floor {pixel_fd_floor(args.num_samples):.4f}")
    for r in rows:
        mse = "" if r["teacher_mse"] is None else f"  teacher_mse {r['teacher_mse']:.4f}"
        print(f"steps {r['steps']:>3}  FD {r['fd']:.3f}  pixel FD {r['pixel_fd']:.4f}  hist {r['hist']:.4f}  "
              f"adherence {r['adherence']:.3f}{mse}")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": str(args.model), "num_samples": args.num_samples,
                                              "fd_floor": fd_floor(args.num_samples),
                                              "pixel_fd_floor": pixel_fd_floor(args.num_samples), "rows": rows}, indent=2))
        print(f"wrote {args.out}")


def _is_main_process() -> bool:
    """Rank 0 under torchrun/accelerate launch (set before accelerate starts), else True."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _cached(dataset, teacher, args):
    """Build (or finish) the latent cache on the main process first, with the teacher's VAE and
    text encoders on the accelerator; every process then reads it."""
    from accelerate import PartialState

    from .data.cache import CachedLatents, build_cache

    state = PartialState()
    teacher.to(state.device)
    with state.main_process_first():
        build_cache(dataset, teacher, args.cache_latents, args.data, progress=state.is_main_process)
    return CachedLatents(args.cache_latents)


def cmd_distill(args) -> None:
    from .config import parse_overrides, read_config_file, to_dict
    from .data.digits import get_dataset
    from .methods import method_module
    from .train import train

    module = method_module(args.method)
    flags = {"full": True} if args.full else {}
    if args.dtype:
        flags["dtype"] = args.dtype
    cfg, preset = module.build_config(args.teacher, args.preset, read_config_file(args.config), parse_overrides(args.set), flags)
    say = print if _is_main_process() else (lambda *a, **k: None)
    say(f"method: {args.method}; preset: {preset}")
    say(json.dumps(to_dict(cfg), indent=2))
    if args.dry_run:
        return
    method = module.Method(cfg)
    if args.data:
        from .data.images import load_image_dataset

        size = method.teacher.meta.get("image_size")
        if size is None:
            raise ValueError("--data needs a latent (VAE) teacher; the built-in teacher trains on its own dataset")
        dataset = load_image_dataset(args.data, size, args.caption_column)
        say(f"data: {len(dataset):,} captioned images from {args.data}, at {size}x{size}")
        if args.cache_latents:
            dataset = _cached(dataset, method.teacher, args)
            say(f"cache: latents and text embeddings in {args.cache_latents}")
    elif args.cache_latents:
        raise ValueError("--cache-latents caches a --data dataset through the teacher's VAE; pass --data PATH")
    elif method.teacher.meta.get("dataset"):
        dataset = get_dataset(method.teacher.meta["dataset"], "train")
    else:
        raise ValueError(f"the teacher {args.teacher!r} has no built-in dataset: pass --data PATH "
                         "(image folder with metadata.jsonl, datasets folder, or webdataset .tar shards)")
    share = 100 * method.trainable / method.total
    extra = "".join(f"; {name}: {sum(p.numel() for p in m.parameters() if p.requires_grad):,}"
                    for name, m in method.models().items() if name != "student")
    say(f"student: {method.trainable:,} trainable parameters, {share:.2f}% of the teacher's {method.total:,}"
        f" ({'full' if cfg.full else f'LoRA rank {cfg.lora_rank}'}){extra}")
    summary = train(method, dataset, args.out, resume=args.resume)
    say(f"student written to {args.out} ({summary['seconds']:.0f} s, {summary['processes']} process(es))")


def cmd_export(args) -> None:
    from .evaluate import eval_prompts
    from .export import export
    from .models.loading import load_model, read_meta
    from .sample import sample

    metrics = None
    student = load_model(args.model, teacher=args.teacher) if read_meta(args.model).get("kind") == "student" and args.num_samples else None
    if student is not None and student.meta.get("dataset") == "digits":  # metrics for the model card
        teacher = load_model(student.meta["teacher"])
        prompts, _, seeds = eval_prompts(args.num_samples)
        reference = sample(teacher, prompts, seeds, 32)
        rows = evaluate_model(student, args.num_samples, [1, 2, 4], None, None, reference)
        metrics = {"rows": [{**r, "nfe": r["steps"]} for r in rows],
                   "note": f"Digits task, {args.num_samples} samples per row (see the flashdistill README for the "
                           f"metrics); teacher MSE against the teacher's 32-step output at w = {teacher.default_guidance:g}."}
    out = export(args.model, args.out, metrics, teacher=args.teacher)
    print(f"exported to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, num_samples=args.num_samples)


def cmd_benchmark(args) -> None:
    from .benchmark import run_benchmark

    run_benchmark(args.preset, args.out, cache=args.cache, num_samples=args.num_samples)


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS, method_module
    from .methods.dsm import TeacherConfig

    ap = argparse.ArgumentParser(
        prog="flashdistill",
        description="Distil a multi-step diffusion teacher into a 1-4 step student (Flash Diffusion).",
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train-teacher", help="train the built-in SD-style teacher from scratch",
                       description="Train an SD-style UNet2DConditionModel teacher on a built-in dataset, "
                                   "conditioned on MiniLM text embeddings, and save it as a diffusers-format folder.",
                       epilog=_config_help(TeacherConfig), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=None, help="built-in dataset (default: digits)")
    p.add_argument("--out", required=True, help="output folder (the teacher, checkpoints, log, previews)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default 950)")
    p.add_argument("--seed", type=seed_int, default=None, help="seed (default 0)")
    _add_run_options(p)
    p.set_defaults(func=cmd_train_teacher)

    presets = sorted({name for m in METHODS for name in method_module(m).PRESETS})
    p = sub.add_parser("distill", help="distil a teacher into a few-step student (Flash, LCM, SPLAM, SDXL-Lightning)",
                       description="Distil a teacher folder into a LoRA (or --full) student with --method: flash "
                                   "(Flash Diffusion, the default), lcm (LCM / LCM-LoRA), splam (SPLAM) or lightning (SDXL-Lightning). "
                                   "Runs under accelerate: 'accelerate launch --num_processes N -m flashdistill.cli distill ...' "
                                   "(on a CPU-only machine add --multi_gpu; accelerate's --cpu starts a single process). "
                                   "Config precedence: preset < --config file < --set.",
                       epilog=_method_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="teacher folder (e.g. from train-teacher)")
    p.add_argument("--method", choices=list(METHODS), default="flash", help="distillation method (default flash)")
    p.add_argument("--out", required=True, help="run folder (student, checkpoints, log, previews, config)")
    p.add_argument("--preset", choices=["auto", *presets], default="auto",
                   help="per-teacher defaults of the method (auto: 'digits' for the built-in teacher, else the pipeline's "
                        "family; flash: 'sd' is the paper's SD1.5 setting, 'digits-long' the digits preset at 4x the steps; "
                        "splam: 'sd2' is the paper's SD2.1 setting)")
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

    p = sub.add_parser("export", help="write a student as files diffusers loads as is",
                       description="Export a distillation run: pytorch_lora_weights.safetensors for "
                                   "pipe.load_lora_weights (SD1.5/2, SDXL, SD3; PixArt and full students: the "
                                   "fused/full backbone folder), scheduler/ (LCMScheduler or FlowMatchLCMScheduler), "
                                   "flashdistill_sampling.json (the student's timesteps) and a model card README.md.")
    p.add_argument("--model", required=True, help="distillation run folder")
    p.add_argument("--out", required=True, help="new or empty output folder")
    p.add_argument("--teacher", default=None, help="the run's teacher folder, if it is no longer where the run "
                                                   "recorded it (nor at the same place relative to the run)")
    p.add_argument("--num-samples", type=non_negative_int, default=500,
                   help="digits students: samples per row of the model card's metrics (0: none; default 500)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="generate a PNG grid (and optionally an .npz) from a teacher or a student",
                       description="Generate images. Image i uses seed S+i, so it does not depend on --num-images.")
    p.add_argument("--model", required=True, help="teacher folder or distillation run folder")
    p.add_argument("--teacher", default=None, help="runs: the teacher folder, if it is no longer where the run "
                                                   "recorded it (nor at the same place relative to the run)")
    p.add_argument("--prompt", required=True, help="text prompt, e.g. 'a handwritten digit seven'")
    p.add_argument("--steps", type=positive_int, default=32, help="sampling steps (students: 1, 2 or 4)")
    p.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale for teachers (default: the teacher's)")
    p.add_argument("--sampler", choices=["dpmpp_2m", "ddim", "euler", "unipc"], default=None, help="teacher solver (default dpmpp_2m)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the first image")
    p.add_argument("--num-images", type=positive_int, default=16, help="number of images")
    p.add_argument("--out", required=True, help="PNG grid to write (upscaled 8x for viewing)")
    p.add_argument("--npz", default=None, help="also save raw samples: images float32 (N,C,H,W) in [-1,1], prompts")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="FD, adherence and teacher MSE on the built-in digits task",
                       description="Score a teacher or student on the digits task (see the README for the metrics).")
    p.add_argument("--model", required=True, help="teacher folder or distillation run folder")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[32], help="step counts to evaluate")
    p.add_argument("--guidance", type=guidance_scale, default=None, help="CFG scale for teachers")
    p.add_argument("--sampler", choices=["dpmpp_2m", "ddim", "euler", "unipc"], default=None, help="teacher solver")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="generated samples per row")
    p.add_argument("--teacher", default=None, help="teacher folder for teacher_mse (its 32-step output); also the "
                                                   "run's teacher when the folder the run recorded is gone")
    p.add_argument("--teacher-guidance", type=guidance_scale, default=None, help="CFG scale of the reference")
    g = p.add_argument_group("real models (FID with Inception, CLIP score; nothing is downloaded)")
    g.add_argument("--prompts", default=None, help="COCO captions JSON or a text file with one prompt per line")
    g.add_argument("--protocol", choices=["coco2017-5k", "coco2014-30k", "coco2014-10k"], default=None,
                   help="paper protocols: the first caption of the first N images by id (N = 5k / 30k / 10k)")
    g.add_argument("--reference", default=None, help="folder of reference images for FID (e.g. COCO val images)")
    g.add_argument("--inception-weights", default=None, help="local FID Inception weights (torch-fidelity's "
                                                             "pt_inception-2015-12-05; default: torch hub cache)")
    g.add_argument("--clip-model", default=None, help="local transformers CLIP folder for the CLIP score")
    g.add_argument("--out", default=None, help="write the rows as JSON here")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("demo", help="the whole story on the built-in digits task, end to end",
                       description="Train the digits teacher (or reuse OUT/teacher), distil it with Flash into "
                                   "OUT/flash, and print FD / adherence / teacher MSE at 1, 2, 4 steps against the "
                                   "teacher and DPM-Solver++ at the same NFE; writes OUT/results.json and OUT/grid.png.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--num-samples", type=positive_int, default=1000, help="samples per metric row")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("benchmark", help="quality vs NFE, speed and cost; the paper's ablations at toy scale",
                       description="Benchmark on the built-in digits task. 'quick' (about 12 min on 2 CPU cores "
                                   "from scratch): the teacher at 32 steps, DDIM / Euler / DPM-Solver++ / UniPC on "
                                   "the teacher at 1, 2, 4, 8 steps, the Flash student at 1, 2, 4 steps. 'full': 2000 "
                                   "samples per row, the teacher at 50 steps and a guidance sweep. 'ablations': 13 "
                                   "equal-budget Flash runs (loss terms, pi(t), distillation loss, GAN loss, K) at "
                                   "2 steps beside the paper's Fig. 4 numbers (about 35 min). 'methods': Flash, LCM-LoRA and SPLAM "
                                   "from the same teacher at about equal training wall time, two seeds each, at 1, 2, 4 steps "
                                   "beside DPM-Solver++ and UniPC (about 20 min). Writes OUT/results.json, "
                                   "OUT/report.md, OUT/grid.png and OUT/quality_vs_nfe.png (ablations: "
                                   "OUT/ablations.png). Trained models are cached in --cache and reused.")
    p.add_argument("--preset", choices=["quick", "full", "ablations", "methods"], default="quick", help="what to run (default quick)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache", default="runs/cache", help="folder of trained teachers and students, reused across "
                                                         "runs and presets (default runs/cache)")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="samples per row (default: quick 500, full 2000, ablations 500)")
    p.set_defaults(func=cmd_benchmark)
    return ap


def _add_run_options(p) -> None:
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
