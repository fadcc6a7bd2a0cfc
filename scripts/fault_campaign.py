"""kill -9 campaign: train-teacher and distill on the built-in digits task, each killed with SIGKILL
at a seeded random logged step, then resumed with --resume, and compared with an unbroken run.

    .venv/bin/python scripts/fault_campaign.py --runs 20 --out runs/fault-campaign

For every run it records: the step it was killed at, the checkpoint it resumed from (lost work =
the difference, at most one checkpoint interval), whether every checkpoint left on disk verifies
against its recorded checksums, whether the resumed run finished, and whether its final weights
are bit-identical to the unbroken run's. Writes OUT/campaign.json and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashdistill import checkpoint as ckpt

CLI = [sys.executable, "-m", "flashdistill.cli"]


def _final_weights(run: Path, kind: str) -> dict:
    if kind == "teacher":
        return load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    return load_file(str(run / "student" / "student_lora.safetensors"))


def _command(kind: str, out: Path, teacher: Path | None, steps: int, every: int) -> list[str]:
    common = ["--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={every}", "--set", "train.log_every=1",
              "--set", "train.sample_every=0", "--set", "train.keep_checkpoints=3"]
    if kind == "teacher":
        return CLI + ["train-teacher", "--dataset", "digits", "--out", str(out)] + common
    phases = [steps // 4, steps // 4, steps // 4]
    return CLI + ["distill", "--teacher", str(teacher), "--out", str(out), "--set", f"phase_steps={phases}"] + common


def _logged_step(run: Path) -> int:
    log = run / "log.jsonl"
    if not log.is_file():
        return 0
    lines = log.read_text().splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def one_run(kind: str, out: Path, teacher: Path | None, steps: int, every: int, kill_at: int, env: dict) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(_command(kind, out, teacher, steps, every), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    killed_at = None
    while proc.poll() is None:
        s = _logged_step(out)
        if s >= kill_at:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed_at = s
            break
        time.sleep(0.02)
    if killed_at is None:
        return {"kill_at": kill_at, "killed": False}
    root = out / "checkpoints"
    left = sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    corrupt_left = [str(p.name) for p in left if ckpt.verify(p)]
    res = subprocess.run(_command(kind, out, teacher, steps, every) + ["--resume"], env=env, capture_output=True, text=True)
    m = re.search(r"resumed from \S*step_(\d+) at step (\d+)", res.stdout)
    resumed_from = int(m.group(2)) if m else 0
    return {"kill_at": kill_at, "killed": True, "killed_at_logged_step": killed_at, "resumed_from": resumed_from,
            "lost_steps": killed_at - resumed_from, "checkpoints_left": [p.name for p in left],
            "corrupt_checkpoints_left": corrupt_left, "corrupt_warning_on_resume": "corrupt" in res.stdout,
            "finished": res.returncode == 0, "stderr_tail": res.stderr[-300:] if res.returncode else ""}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="kill -9 runs per command (default 20)")
    ap.add_argument("--steps", type=int, default=40, help="training steps of each run (default 40)")
    ap.add_argument("--every", type=int, default=5, help="checkpoint interval (default 5)")
    ap.add_argument("--teacher", default="runs/teacher", help="digits teacher for the distill runs")
    ap.add_argument("--out", default="runs/fault-campaign")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", nargs="+", default=["teacher", "distill"], choices=["teacher", "distill"])
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rng = random.Random(args.seed)
    result = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "checkpoint_every": args.every,
              "torch": torch.__version__, "machine": os.uname().machine, "cpus": os.cpu_count(), "kinds": {}}
    for kind in args.kinds:
        teacher = Path(args.teacher) if kind == "distill" else None
        ref = out / f"{kind}-unbroken"
        shutil.rmtree(ref, ignore_errors=True)
        t0 = time.time()
        subprocess.run(_command(kind, ref, teacher, args.steps, args.every), env=env, check=True, capture_output=True)
        reference = _final_weights(ref, kind)
        runs = []
        for i in range(args.runs):
            kill_at = rng.randint(1, args.steps - 1)
            r = one_run(kind, out / f"{kind}-run", teacher, args.steps, args.every, kill_at, env)
            if r.get("finished"):
                w = _final_weights(out / f"{kind}-run", kind)
                r["equal_to_unbroken"] = w.keys() == reference.keys() and all(torch.equal(w[k], reference[k]) for k in w)
            runs.append(r)
            print(f"{kind} run {i + 1}/{args.runs}: {json.dumps({k: v for k, v in r.items() if k != 'stderr_tail'})}",
                  flush=True)
        killed = [r for r in runs if r.get("killed")]
        summary = {
            "runs": len(runs), "killed": len(killed),
            "resumable_and_finished": sum(r["finished"] for r in killed),
            "equal_to_unbroken": sum(bool(r.get("equal_to_unbroken")) for r in killed),
            "max_lost_steps": max((r["lost_steps"] for r in killed), default=None),
            "corrupt_checkpoints_left": sum(len(r["corrupt_checkpoints_left"]) for r in killed),
            "corrupt_loaded": 0 if all(not r["corrupt_checkpoints_left"] or r["corrupt_warning_on_resume"] for r in killed)
            else "see runs",
            "seconds": round(time.time() - t0, 1),
        }
        result["kinds"][kind] = {"summary": summary, "runs": runs}
        print(f"{kind}: {json.dumps(summary)}", flush=True)
    (out / "campaign.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'campaign.json'}")


if __name__ == "__main__":
    main()
