"""Fill the benchmark cache with the `ablations` preset's training runs, several at a time.

`flashdistill benchmark --preset ablations` trains its runs (13 variants x 2 seeds) one after
another. On a machine with more cores than one run uses well, this script trains them in
``--workers`` processes of one thread each (``OMP_NUM_THREADS=1``), each taking every n-th run
(the slowest, K = 64 and 32, first), with the benchmark's own cache keys and training function, so
that the benchmark afterwards only scores them:

    .venv/bin/python scripts/ablation_cache.py --cache runs/cache --workers 2
    .venv/bin/flashdistill benchmark --preset ablations --out runs/bench-ablations --cache runs/cache

A run already in the cache is not trained again; an interrupted one continues from its checkpoint
(the same resume as the benchmark's). The teacher is trained first, by one process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def jobs(preset) -> list[tuple[str, int, str, dict]]:
    """(variant label, seed, cache key, overrides) of every distinct run, slowest first."""
    from flashdistill import benchmark as b
    from flashdistill.config import merge

    out, seen = [], set()
    for seed in preset.ablation_seeds:
        for _group, variants in b.ABLATIONS:
            for label, variant, _paper in variants:
                over = merge(b.ablation_overrides(preset, variant), {"train": {"seed": seed}})
                key = b.flash_key(preset.teacher, over)
                if key not in seen:
                    seen.add(key)
                    out.append((label, seed, key, over))
    return sorted(out, key=lambda j: -j[3].get("K", 16))


def work(index: int, workers: int, cache: Path, preset_name: str) -> None:
    import torch
    from flashdistill import benchmark as b

    torch.set_num_threads(1)
    preset = b.PRESETS[preset_name]
    teacher_dir = cache / f"teacher-{b.teacher_key(preset.teacher)}"
    for label, seed, key, over in jobs(preset)[index::workers]:
        print(f"worker {index}: {label}, seed {seed} -> {cache / f'flash-{key}'}", flush=True)
        seconds = b.ensure_flash(teacher_dir, cache / f"flash-{key}", over, False)
        print(f"worker {index}: {label}, seed {seed} done ({seconds:.0f} s of training)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="runs/cache", help="the benchmark's --cache folder (default: runs/cache)")
    ap.add_argument("--workers", type=int, default=2, help="training processes, one thread each (default: 2)")
    ap.add_argument("--preset", default="ablations", help="benchmark preset whose ablation runs to train (default: ablations)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one worker's share
    args = ap.parse_args(argv)
    from flashdistill import benchmark as b

    if args.preset not in b.PRESETS or not b.PRESETS[args.preset].ablations:
        ap.error(f"--preset {args.preset!r} has no ablations; expected one of "
                 f"{[k for k, p in b.PRESETS.items() if p.ablations]}")
    if args.workers < 1:
        ap.error(f"--workers must be at least 1, got {args.workers}")
    cache = Path(args.cache)
    if args.worker is not None:
        work(args.worker, args.workers, cache, args.preset)
        return 0
    preset = b.PRESETS[args.preset]
    b.ensure_teacher(cache / f"teacher-{b.teacher_key(preset.teacher)}", preset.teacher, True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, "--cache", str(cache), "--workers", str(args.workers),
                               "--preset", args.preset, "--worker", str(i)], env=env) for i in range(args.workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # runs keep their checkpoints; a rerun continues them
        for p in procs:
            p.terminate()
        raise
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
