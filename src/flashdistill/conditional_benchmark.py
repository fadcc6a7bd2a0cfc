"""``flashdistill benchmark --preset conditional``: Flash Diffusion on the built-in conditional
teachers (inpaint, sr, sketch; :mod:`flashdistill.tasks`), against the teacher and the
training-free solver at equal NFE, with the nearest-neighbour retrieval yardstick.

For each task: the conditional teacher (trained, or reused from ``--cache``) at 32 steps of
DPM-Solver++ with CFG (its default w; 64 NFE), DPM-Solver++ with CFG at 1, 2 and 4 steps (2, 4 and 8
NFE), the Flash student (the digits preset, distilled from that teacher) at 1, 2 and 4 steps, CoDi
and PE-CoDi (their digits preset, learning the task from the text-to-image teacher) at 1, 2 and 4
steps, and retrieval. Every row is scored on the same conditions, prompts and seeds (``scoring.eval_set``):
FD, pixel FD, adherence, teacher MSE against the 32-step teacher, the task's consistency metrics
and the per-condition diversity. The sketch task's adapter steers the cached text-to-image teacher.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tasks import get_task

TASK_NAMES = ("inpaint", "sr", "sketch")
SOLVER_STEPS = (1, 2, 4)
STUDENT_STEPS = (1, 2, 4)
TEACHER_STEPS = 32
GRID_ITEMS = 10


def _teacher_overrides(task: str, base_dir: Path) -> dict:
    return {"task": task, **({"base": str(base_dir)} if task == "sketch" else {})}


CODI = {"codi student": {}, "pe-codi student": {"pe": True}}


BASE_JOB = "text-to-image teacher"


def task_runs(task: str, base_dir: Path, cache: Path) -> dict:
    """The cache folders of one task's runs: its teacher, its Flash student and the CoDi students,
    with the training jobs that fill them (:func:`~flashdistill.benchmark.train_jobs`)."""
    from .benchmark import TrainJob, ensure_flash, ensure_student, ensure_teacher, flash_key, method_key, teacher_key

    overrides = _teacher_overrides(task, base_dir)
    teacher_dir = cache / f"teacher-{teacher_key(overrides)}"
    flash_dir = cache / f"flash-{flash_key(overrides)}"
    on_base = (BASE_JOB,)  # the sketch adapter and CoDi train on the text-to-image teacher
    jobs = [TrainJob(f"{task} teacher", ensure_teacher, (teacher_dir, overrides), teacher_dir,
                     after=on_base if task == "sketch" else ()),
            TrainJob(f"{task} flash", ensure_flash, (teacher_dir, flash_dir, None), flash_dir, after=(f"{task} teacher",))]
    codi = {}
    for name, over in CODI.items():
        over = {**over, "task": task}
        codi[name] = cache / f"codi-{method_key('codi', None, over)}"
        jobs.append(TrainJob(f"{task} {name}", ensure_student, ("codi", base_dir, codi[name], over), codi[name], after=on_base))
    return {"teacher": teacher_dir, "flash": flash_dir, "codi": codi, "jobs": jobs}


def run_task(task: str, base_dir: Path, cache: Path, num_samples: int, progress: bool) -> tuple[list[dict], list]:
    """Rows of one task and the grid strips (label, images) of its first ``GRID_ITEMS`` conditions,
    from its runs in ``cache`` (:func:`run_conditional` trains them first)."""
    from .api import TEACHER_STEPS as REFERENCE_STEPS, score_digits, teacher_reference
    from .benchmark import _recorded_seconds
    from .models.loading import load_model
    from .sample import sample
    from .scoring import eval_set, retrieval_row

    spec = get_task(task)
    runs = task_runs(task, base_dir, cache)
    teacher_dir, flash_dir = runs["teacher"], runs["flash"]
    teacher_seconds, flash_seconds = _recorded_seconds(teacher_dir), _recorded_seconds(flash_dir)
    codi = {name: (d, _recorded_seconds(d)) for name, d in runs["codi"].items()}
    teacher, student = load_model(teacher_dir), load_model(flash_dir)
    w = teacher.default_guidance
    reference = teacher_reference(teacher, num_samples)

    rows = []
    for r in score_digits(teacher, num_samples, [TEACHER_STEPS, *SOLVER_STEPS], reference=reference, progress=progress,
                          samples={REFERENCE_STEPS: reference}):  # the reference is the 32-step row's samples
        method = "teacher dpmpp_2m" if r["steps"] == TEACHER_STEPS else "dpmpp_2m (training-free)"
        rows.append({"method": method, "nfe": 2 * r["steps"], "guidance": w, "train_seconds": teacher_seconds, **r})
    for r in score_digits(student, num_samples, list(STUDENT_STEPS), reference=reference, progress=progress):
        rows.append({"method": "flash student", "nfe": r["steps"], "guidance": None, "train_seconds": flash_seconds,
                     "trainable_params": student.meta["trainable_params"], **r})
    codi_models = {name: load_model(d) for name, (d, _) in codi.items()}
    for name, model in codi_models.items():
        for r in score_digits(model, num_samples, list(STUDENT_STEPS), reference=reference, progress=progress):
            rows.append({"method": name, "nfe": r["steps"], "guidance": None, "train_seconds": codi[name][1],
                         "trainable_params": model.meta["trainable_params"], **r})
    rows.append({"method": "nearest-neighbour retrieval", "steps": 0, "nfe": 0, "guidance": None,
                 **retrieval_row(spec, num_samples)})

    prompts, _, seeds, condition, truth = eval_set(GRID_ITEMS, spec)
    strips = [("condition", spec.show(condition)), ("ground truth", truth)]
    strips.append((f"teacher, {TEACHER_STEPS} steps ({2 * TEACHER_STEPS} NFE)",
                   sample(teacher, prompts, seeds, TEACHER_STEPS, guidance=w, condition=condition)))
    strips.append(("dpmpp_2m, 2 steps (4 NFE)", sample(teacher, prompts, seeds, 2, guidance=w, condition=condition)))
    strips += [(f"flash, {n} step{'s' * (n > 1)} ({n} NFE)", sample(student, prompts, seeds, n, condition=condition))
               for n in STUDENT_STEPS]
    strips += [(f"{name.split()[0]}, 4 steps (4 NFE)", sample(model, prompts, seeds, 4, condition=condition))
               for name, model in codi_models.items()]
    from .data.digits import load_digits

    strips.append(("retrieval", spec.retrieve(condition, load_digits("train").images)))
    return rows, strips


def write_grid(strips_by_task: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    size, gap = 32, 2
    labels = [f"{task}: {label}" for task, strips in strips_by_task.items() for label, _ in strips]
    label_w = 8 + 6 * max(len(s) for s in labels)
    n_rows = len(labels) + len(strips_by_task) - 1
    img = Image.new("L", (label_w + GRID_ITEMS * (size + gap), n_rows * (size + gap)), 255)
    draw = ImageDraw.Draw(img)
    y = 0
    for task, strips in strips_by_task.items():
        for label, x in strips:
            draw.text((4, y + size // 2 - 5), f"{task}: {label}", fill=0)
            for j in range(GRID_ITEMS):
                tile = ((x[j, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
                img.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (label_w + j * (size + gap), y))
            y += size + gap
        y += size + gap  # a blank row between tasks
    img.save(path)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["tasks"]), figsize=(4.2 * len(result["tasks"]), 3.8), dpi=110, squeeze=False)
    axes = axes[0]
    for ax, task in zip(axes, result["tasks"]):
        rows = [r for r in result["rows"] if r["task"] == task]
        for method, style in (("dpmpp_2m (training-free)", dict(ls="--", marker=".")), ("flash student", dict(lw=2.5, marker="o")),
                              ("codi student", dict(lw=1.8, marker="s")), ("pe-codi student", dict(lw=1.2, marker="^"))):
            pts = sorted((r["nfe"], r["fd"]) for r in rows if r["method"] == method)
            if not pts:
                continue
            ax.plot(*zip(*pts), label=method, **style)
        teacher = next(r for r in rows if r["method"] == "teacher dpmpp_2m")
        ax.axhline(teacher["fd"], color="k", ls="--", lw=1, label=f"teacher 32 steps ({teacher['fd']:.2f})")
        nn = next(r for r in rows if r["method"] == "nearest-neighbour retrieval")
        ax.axhline(nn["fd"], color="gray", ls=":", lw=1, label=f"retrieval ({nn['fd']:.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(task)
        ax.set_xlabel("NFE per image (a CFG step counts 2)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("FD to test digits (lower is better)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


STUDENTS = ("flash student", "codi student", "pe-codi student")


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric in ("adherence", "psnr", "stroke_f1") else a < b


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets per task and student method at 4 steps, each with its figures: FD within
    1.25x of the 32-step teacher; better than DPM-Solver++ at 4 NFE on every metric; the task's own
    consistency metric within 10% of the teacher's."""
    out = []
    for task in TASK_NAMES:
        tr = [r for r in rows if r["task"] == task]
        if not tr:
            continue
        names = get_task(task).metric_names
        teacher = next(r for r in tr if r["method"] == "teacher dpmpp_2m")
        solver4 = next(r for r in tr if r["method"] == "dpmpp_2m (training-free)" and r["nfe"] == 4)
        for method in STUDENTS:
            row = next((r for r in tr if r["method"] == method and r["steps"] == 4), None)
            if row is None:
                continue
            better = {m: _better(m, row[m], solver4[m]) for m in ("fd", "pixel_fd", "adherence", *names)}
            main = names[0]  # the task's own consistency metric
            sign = -1 if main in ("psnr", "stroke_f1") else 1
            gap = sign * (row[main] - teacher[main]) / max(abs(teacher[main]), 1e-12)
            out.append({"task": task, "method": method, "fd_ratio_4step": row["fd"] / teacher["fd"],
                        "fd_within_1.25x": row["fd"] <= 1.25 * teacher["fd"], "beats_solver_at_4_nfe": better,
                        "consistency_metric": main, "consistency_gap_vs_teacher": gap,
                        "consistency_within_10pct": gap <= 0.10})
    return out


def report(result: dict) -> str:
    from .benchmark import _fmt

    lines = [f"# Conditional benchmark ({result['date']})", "",
             f"{result['num_samples']} samples per row (conditions from the test digits), teacher w = "
             f"{result['teacher_guidance']:g}; {result['wall_seconds'] / 60:.1f} min in all"
             + (f", of which {result['train_wall_seconds'] / 60:.1f} min training, {result['jobs']} run(s) at a time "
                "(a row's train seconds are its own run's, on its share of the cores)"
                if result.get("jobs") else "") + ".", ""]
    for task in result["tasks"]:
        names = get_task(task).metric_names
        lines += [f"## {task}", "",
                  "| method | steps | NFE | FD | pixel FD | adherence | " + " | ".join(names) + " | diversity | teacher MSE |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
        for r in (r for r in result["rows"] if r["task"] == task):
            lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['fd']:.2f} | {r['pixel_fd']:.3f} | "
                         f"{r['adherence']:.3f} | " + " | ".join(f"{r[m]:.4f}" for m in names)
                         + f" | {r['diversity']:.3f} | {_fmt(r.get('teacher_mse'), '.4f')} |")
        lines.append("")
    lines += ["## Targets (students at 4 steps)", "", "| task | student | FD / teacher FD | <= 1.25x | beats DPM-Solver++ "
              "at 4 NFE on | consistency gap to the teacher | within 10% |", "| --- | --- | ---: | --- | --- | ---: | --- |"]
    for t in result["targets"]:
        wins = ", ".join(k for k, v in t["beats_solver_at_4_nfe"].items() if v)
        losses = ", ".join(k for k, v in t["beats_solver_at_4_nfe"].items() if not v)
        lines.append(f"| {t['task']} | {t['method'].split()[0]} | {t['fd_ratio_4step']:.2f} | {'yes' if t['fd_within_1.25x'] else 'no'} | "
                     f"{wins}{' (not: ' + losses + ')' if losses else ''} | {t['consistency_metric']} "
                     f"{100 * t['consistency_gap_vs_teacher']:+.1f}% | {'yes' if t['consistency_within_10pct'] else 'no'} |")
    return "\n".join(lines) + "\n"


def run_conditional(out, cache="runs/cache", num_samples: int | None = None, progress: bool = True,
                    tasks=TASK_NAMES, jobs: int = 1) -> dict:
    """``jobs``: training processes side by side (0: :func:`~flashdistill.benchmark.default_jobs`);
    every run of every task is trained first, then scored here."""
    from .benchmark import TrainJob, _machine, _versions, base_teacher_dir, default_jobs, ensure_teacher, train_jobs

    t0 = time.time()
    num_samples = num_samples or 1000
    jobs = jobs or default_jobs()
    out, cache = Path(out), Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = base_teacher_dir(cache)
    base_job = TrainJob(BASE_JOB, ensure_teacher, (base_dir, None), base_dir)
    train_jobs([base_job, *(j for task in tasks for j in task_runs(task, base_dir, cache)["jobs"])], jobs, progress)
    train_seconds = time.time() - t0
    rows, strips = [], {}
    for task in tqdm(tasks, desc="tasks", disable=not progress):
        r, s = run_task(task, base_dir, cache, num_samples, progress)
        rows += r
        strips[task] = s
    from .models.loading import load_model

    result = {"preset": "conditional", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "num_samples": num_samples, "tasks": list(tasks), "rows": rows,
              "teacher_guidance": load_model(base_dir).default_guidance, "targets": targets(rows),
              "versions": _versions(), "machine": _machine(), "jobs": jobs,
              "train_wall_seconds": train_seconds, "wall_seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_grid(strips, out / "grid.png")
    plot(result, out / "quality_vs_nfe.png")
    (out / "report.md").write_text(report(result))
    print(report(result))
    return result
