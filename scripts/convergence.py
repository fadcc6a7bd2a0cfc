"""Convergence curve (issue 11): Flash's digits preset and distillation alone (the same preset with
``use_dmd=false``) at 1/4, 1/2, 1, 2 and 4 times the preset's budget (steps and phases scaled
together), each scored by ``flashdistill evaluate`` at 1, 2 and 4 steps on 1,000 samples, against
its training wall time (the loop's own clock, the last ``time`` of its ``log.jsonl``).

Runs go two at a time, one core each (``OMP_NUM_THREADS=1``), the condition every figure of
docs/quality.md sections 8 and 9 was measured in. A point already done in ``--out`` (its
``NAME/student`` and ``NAME.json``) is not run again, and an interrupted one continues from its last
checkpoint (``distill --resume``), so an interrupted curve resumes. (A resumed run's clock restarts:
its ``train_seconds`` then undercounts.)
Writes ``curve.json`` and ``curve.png`` in ``--out`` and prints a table.

    .venv/bin/python scripts/convergence.py --teacher runs/teacher --out runs/curve
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

VARIANTS = {"flash": [], "distill": ["--set", "use_dmd=false"]}


def points(scales: list[float], seeds: dict[float, list[int]]) -> list[dict]:
    from flashdistill.methods.flash import PRESETS

    base = PRESETS["digits"]
    out = []
    for variant in VARIANTS:
        for scale in scales:
            steps = round(base["train"]["steps"] * scale)
            phases = [round(p * scale) for p in base["phase_steps"]]
            for seed in seeds.get(scale, [0]):
                out.append({"variant": variant, "scale": scale, "steps": steps, "phase_steps": phases, "seed": seed,
                            "name": f"{variant}-{steps}-s{seed}"})
    return out


def run_point(p: dict, teacher: str, out: Path) -> None:
    run, scores = out / p["name"], out / f"{p['name']}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exe = Path(sys.executable).parent / "flashdistill"
    with open(out / f"{p['name']}.log", "a") as log:
        if not (run / "student").is_dir():
            subprocess.run([str(exe), "distill", "--teacher", teacher, "--out", str(run), "--quiet",
                            *(["--resume"] if run.is_dir() else []),
                            "--set", f"train.steps={p['steps']}", "--set", f"phase_steps={p['phase_steps']}",
                            "--set", f"train.seed={p['seed']}", "--set", "train.sample_every=0", *VARIANTS[p["variant"]]],
                           env=env, stdout=log, stderr=log, check=True)
        if not scores.is_file():
            subprocess.run([str(exe), "evaluate", "--model", str(run), "--steps", "1", "2", "4",
                            "--num-samples", "1000", "--out", str(scores)], env=env, stdout=log, stderr=log, check=True)


def collect(p: dict, out: Path) -> dict:
    last = (out / p["name"] / "log.jsonl").read_text().strip().splitlines()[-1]
    rows = json.loads((out / f"{p['name']}.json").read_text())["rows"]
    return {**p, "train_seconds": json.loads(last)["time"],
            **{f"{k}_{r['steps']}": r[k] for r in rows for k in ("fd", "pixel_fd", "adherence")}}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=120)
    for ax, steps in zip(axes, (1, 2, 4)):
        for i, variant in enumerate(VARIANTS):
            rs = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["train_seconds"])
            ax.plot([r["train_seconds"] / 60 for r in rs], [r[f"fd_{steps}"] for r in rs], "o-", color=f"C{i}",
                    label="Flash (digits preset)" if variant == "flash" else "distillation alone (no DMD)")
        ax.set_xscale("log")
        ax.set_title(f"{steps} step{'s' if steps > 1 else ''}")
        ax.set_xlabel("training wall time (min, one core)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("FD (flashdistill evaluate)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--teacher", default="runs/teacher", help="the built-in digits teacher folder")
    ap.add_argument("--out", default="runs/curve", help="folder for the runs, their scores, curve.json and curve.png")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1, 2, 4],
                    help="budgets, as multiples of the digits preset's 1,020 steps")
    ap.add_argument("--two-seeds", type=float, nargs="*", default=[1],
                    help="scales trained with seeds 0 and 1 (the others: seed 0)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one core each")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = points(args.scales, {s: [0, 1] for s in args.two_seeds})
    # longest first, so the two cores finish together
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda p: run_point(p, args.teacher, out), sorted(todo, key=lambda p: -p["steps"])))
    results = [collect(p, out) for p in todo]
    (out / "curve.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "curve.png")
    print("| run | steps | seed | train s | FD 1 / 2 / 4 steps | pixel FD 1 / 2 / 4 | adherence 1 / 2 / 4 |")
    print("| --- | ---: | ---: | ---: | --- | --- | --- |")
    for r in results:
        trio = lambda k: " / ".join(f"{r[f'{k}_{s}']:{'.2f' if k == 'fd' else '.3f'}}" for s in (1, 2, 4))  # noqa: E731
        print(f"| {r['variant']} | {r['steps']} | {r['seed']} | {r['train_seconds']:.0f} | {trio('fd')} | "
              f"{trio('pixel_fd')} | {trio('adherence')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
