"""The digits teacher sampled with guidance in a limited interval (Kynkäänniemi et al. 2024;
docs/quality.md section 20). DPM-Solver++ at 32 steps, w applied only at lo <= t <= hi and w = 1
(the cond call alone) elsewhere, scored like `flashdistill evaluate`: FD, pixel FD and adherence
on the evaluation prompts.

    .venv/bin/python scripts/guidance_interval.py --teacher runs/teacher --guidance 1.5 2:100:500 --seed-set 0 1 2

Each `--guidance` item is `w` (everywhere) or `w:lo:hi`.
"""
from __future__ import annotations

import argparse

import torch

from flashdistill.api import load
from flashdistill.sample import sample_teacher
from flashdistill.scoring import eval_prompts, score, seed_set_args


def guidance_item(text: str) -> tuple[float, tuple[float, float] | None]:
    parts = text.split(":")
    try:
        if len(parts) == 1:
            return float(parts[0]), None
        if len(parts) == 3:
            return float(parts[0]), (float(parts[1]), float(parts[2]))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected w or w:lo:hi (numbers), got {text!r}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the built-in digits teacher (text-to-image) folder")
    ap.add_argument("--guidance", type=guidance_item, nargs="+", default=[(1.5, None), (2.0, (100.0, 500.0))],
                    help="w (everywhere) or w:lo:hi (default: 1.5 2:100:500)")
    ap.add_argument("--seed-set", type=int, nargs="+", default=[0], help="evaluation seed sets (default 0)")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args(argv)
    model = load(args.teacher).model
    if model.meta.get("kind") == "student" or model.task.keys:
        ap.error(f"{args.teacher} is not a text-to-image teacher")
    for k in args.seed_set:
        prompts, labels, seeds = eval_prompts(args.num_samples, seed=seed_set_args(k)["seed"])
        for w, interval in args.guidance:
            with torch.no_grad():
                images = sample_teacher(model, prompts, seeds, args.steps, w, guidance_interval=interval)
            r = score(images, labels)
            where = "everywhere" if interval is None else f"at {interval[0]:g} <= t <= {interval[1]:g}"
            print(f"set {k}  w = {w:g} {where}: FD {r['fd']:.2f}  pixel FD {r['pixel_fd']:.3f}  "
                  f"adherence {r['adherence']:.3f}", flush=True)


if __name__ == "__main__":
    main()
