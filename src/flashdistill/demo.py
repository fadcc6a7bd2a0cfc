"""The end-to-end demo on the built-in digits task: teacher and Flash distillation (each trained,
resumed if unfinished, or reused if finished), then FD / adherence / teacher MSE of the student at 1, 2 and 4 steps against
the teacher's 32-step samples and DPM-Solver++ on the teacher at the same NFE (network
evaluations per sample; a CFG step costs 2)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .benchmark import ensure_flash, ensure_teacher
from .data.digits import prompt_for
from .scoring import eval_prompts, fd_floor, pixel_fd_floor, score
from .models.loading import load_model
from .sample import sample
from .train import save_image_grid


def comparison_rows(teacher, student, num_samples: int, guidance: float, progress: bool = True) -> list[dict]:
    """Teacher at 32 steps; DPM-Solver++ with and without CFG; the student; same prompts and seeds."""
    prompts, labels, seeds = eval_prompts(num_samples)
    reference = sample(teacher, prompts, seeds, 32, guidance=guidance, progress=progress)
    rows = [{"method": "teacher dpmpp_2m", "steps": 32, "nfe": 64, "guidance": guidance, **score(reference, labels, reference)}]
    for steps in (1, 2, 4):
        for w, nfe in ((guidance, 2 * steps), (1.0, steps)):
            images = sample(teacher, prompts, seeds, steps, guidance=w)
            rows.append({"method": "teacher dpmpp_2m", "steps": steps, "nfe": nfe, "guidance": w, **score(images, labels, reference)})
    if student is not None:
        for steps in (1, 2, 4):
            images = sample(student, prompts, seeds, steps)
            rows.append({"method": "flash student", "steps": steps, "nfe": steps, "guidance": None, **score(images, labels, reference)})
    return rows


def demo_grid(teacher, student, guidance: float, path: Path) -> None:
    prompts = [prompt_for(d) for d in range(10)]
    seeds = list(range(10))
    rows = [sample(teacher, prompts, seeds, 32, guidance=guidance)]
    rows += [sample(teacher, prompts, seeds, s, guidance=guidance) for s in (1, 2, 4)]
    rows += [sample(student, prompts, seeds, s) for s in (1, 2, 4)]
    save_image_grid(torch.cat(rows), path, nrow=10, scale=6)


def format_table(rows: list[dict], floor: float, floor_all: float, num_samples: int) -> str:
    lines = [f"FD floor (real train digits vs test digits): {floor:.3f} at {num_samples} samples "
             f"(all train digits: {floor_all:.3f}); pixel FD floor {pixel_fd_floor(num_samples):.3f}",
             f"{'method':<18}{'steps':>6}{'NFE':>5}{'w':>6}{'FD':>9}{'pixel FD':>10}{'hist':>8}{'adherence':>11}{'teacher_mse':>13}"]
    for r in rows:
        w = "-" if r["guidance"] is None else f"{r['guidance']:g}"
        lines.append(f"{r['method']:<18}{r['steps']:>6}{r['nfe']:>5}{w:>6}{r['fd']:>9.3f}{r['pixel_fd']:>10.3f}{r['hist']:>8.4f}{r['adherence']:>11.3f}{r['teacher_mse']:>13.4f}")
    return "\n".join(lines)


def run_demo(out: str | Path, num_samples: int = 1000, progress: bool = True) -> dict:
    t0 = time.time()
    out = Path(out)
    teacher_seconds = ensure_teacher(out / "teacher", progress=progress)
    flash_seconds = ensure_flash(out / "teacher", out / "flash", progress=progress)
    teacher, student = load_model(out / "teacher"), load_model(out / "flash")
    guidance = teacher.default_guidance
    rows = comparison_rows(teacher, student, num_samples, guidance, progress)
    demo_grid(teacher, student, guidance, out / "grid.png")
    floor = fd_floor(num_samples)
    result = {"fd_floor": floor, "fd_floor_all_train": fd_floor(), "teacher_train_seconds": teacher_seconds, "flash_train_seconds": flash_seconds,
              "trainable_params": student.meta["trainable_params"], "teacher_params": student.meta["teacher_params"],
              "num_samples": num_samples, "rows": rows, "total_seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(format_table(rows, floor, result["fd_floor_all_train"], num_samples))
    print(f"grid: {out / 'grid.png'} (rows: teacher 32 steps; DPM-Solver++ 1, 2, 4 steps with CFG; student 1, 2, 4 steps)")
    print(f"results: {out / 'results.json'}; total time {result['total_seconds']:.0f} s")
    return result
