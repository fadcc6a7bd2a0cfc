"""``flashdistill benchmark --preset composition``: a style LoRA stacked on the Flash student with
no training (Flash Diffusion's "existing LoRAs"; issue 13).

The digits teacher, its Flash student (the digits preset) and a stroke-thickening style LoRA trained
on the teacher (``train-teacher --base TEACHER --style thick --lora``) are trained, or reused from
``--cache``. Rows, all on the same evaluation prompts and seeds (``scoring.eval_prompts``) and all
scored against the *thickened* test split (FD, pixel FD, histogram), with ``fd_unstyled`` (FD to
the plain test split), ``ink`` (mean pixel value) and adherence beside:

- the teacher with the style LoRA, DPM-Solver++ with CFG at 32 steps (the reference) and at 1, 2
  and 4 steps (2, 4 and 8 NFE: the training-free solver at equal cost);
- the Flash student with the style LoRA stacked at scale 1, at 1, 2 and 4 steps, and with the
  style's mid block (the 4x4 bottleneck, where the digit's layout is set) at half strength
  (``--extra-lora-scale mid=0.5``, chosen on a second set of sample seeds: docs/conditional.md);
  and the latter on every call but the student's first (``--extra-lora-interval 0 998``), at 2
  and 4 steps (at 1 step it would be the student alone);
- the teacher and the Flash student without the style (how far the style moves the metrics).

Targets (issue 13): the stacked 4-step student's FD within 1.25x of teacher + style at 32 steps, and
its adherence within 2 points (checked for both stackings).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

STYLE = "thick"
TEACHER_STEPS = 32
SOLVER_STEPS = (1, 2, 4)
STUDENT_STEPS = (1, 2, 4)
MID_HALF = {"mid": 0.5}  # the style LoRA's mid block at half strength, every other block at 1
SECOND_CALL_ON = (0, 998)  # the style on every call of the student but its first (t = 999)
# name -> (scale, timestep interval or None, step counts)
STACKINGS = {"flash + style": (1.0, None, STUDENT_STEPS), "flash + style (mid 0.5)": (MID_HALF, None, STUDENT_STEPS),
             "flash + style (mid 0.5, from the 2nd call)": (MID_HALF, SECOND_CALL_ON, (2, 4))}


def style_overrides(base_dir: Path) -> dict:
    return {"base": str(base_dir), "style": STYLE, "lora": True}


def targets(rows: list[dict], method: str = "flash + style") -> dict:
    ref = next(r for r in rows if r["method"] == "teacher + style" and r["steps"] == TEACHER_STEPS)
    four = next(r for r in rows if r["method"] == method and r["steps"] == 4)
    solver = next(r for r in rows if r["method"] == "teacher + style" and r["steps"] == 2)  # 4 NFE
    return {"fd_ratio_4step": four["fd"] / ref["fd"], "fd_within_1.25x": four["fd"] <= 1.25 * ref["fd"],
            "adherence_gap_points": 100 * (four["adherence"] - ref["adherence"]),
            "adherence_within_2_points": abs(four["adherence"] - ref["adherence"]) <= 0.02,
            "beats_solver_at_4_nfe_on_fd": four["fd"] < solver["fd"]}


def report(result: dict) -> str:
    lines = [f"# LoRA composition: a '{STYLE}' style LoRA stacked on the Flash student ({result['date']})", "",
             f"{result['num_samples']} samples per row; FD, pixel FD and hist against the {STYLE} test split "
             f"(its floor, real {STYLE} train vs test digits: {result['fd_floor']:.2f}); wall "
             f"{result['wall_seconds'] / 60:.1f} min.", "",
             "| model | steps | NFE | FD ↓ | pixel FD ↓ | FD to plain digits | ink | adherence ↑ | MSE to teacher + style ↓ |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['fd']:.2f} | {r['pixel_fd']:.3f} | "
                     f"{r['fd_unstyled']:.2f} | {r['ink']:.3f} | {r['adherence']:.3f} | {r['teacher_mse']:.4f} |")
    lines += ["", "| target | measured | met? |", "| --- | --- | --- |"]
    for method in STACKINGS:
        t = result["targets_by_stacking"][method]
        lines += [f"| {method}: 4-step FD <= 1.25x teacher + style 32 steps | {t['fd_ratio_4step']:.2f}x | "
                  f"{'yes' if t['fd_within_1.25x'] else 'no'} |",
                  f"| {method}: adherence within 2 points | {t['adherence_gap_points']:+.1f} points | "
                  f"{'yes' if t['adherence_within_2_points'] else 'no'} |"]
    return "\n".join(lines) + "\n"


def run_composition(out, cache="runs/cache", num_samples: int | None = None, progress: bool = True) -> dict:
    from .api import score_digits, teacher_reference
    from .benchmark import (_ensure_trained, _key, _machine, _versions, base_teacher, ensure_flash, flash_key,
                            teacher_config, teacher_key)
    from .conditional_benchmark import write_grid
    from .data.digits import get_dataset
    from .methods.dsm import TeacherTraining
    from .models.loading import load_model
    from .sample import sample
    from .scoring import eval_prompts, fd_floor, pixel_fd_floor

    t0 = time.time()
    num_samples = num_samples or 1000
    out, cache = Path(out), Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = base_teacher(cache, progress)
    style_cfg = teacher_config(style_overrides(base_dir))
    style_dir = cache / f"style-{STYLE}-{_key(teacher_key(None), teacher_key(style_overrides(Path('base'))))}"
    style_seconds = _ensure_trained(style_dir, "style LoRA", style_cfg, lambda: TeacherTraining(style_cfg),
                                    get_dataset("digits"), progress)
    flash_dir = cache / f"flash-{flash_key(None)}"
    ensure_flash(base_dir, flash_dir, None, progress)

    models = {"teacher + style": load_model(base_dir, extra_loras=[(style_dir, 1.0)]),
              **{name: load_model(flash_dir, extra_loras=[(style_dir, scale, interval)])
                 for name, (scale, interval, _) in STACKINGS.items()},
              "teacher (no style)": load_model(base_dir), "flash (no style)": load_model(flash_dir)}
    w = models["teacher + style"].default_guidance
    reference = teacher_reference(models["teacher + style"], num_samples)
    jobs = [("teacher + style", [TEACHER_STEPS, *SOLVER_STEPS]), *((name, list(steps)) for name, (_, _, steps) in STACKINGS.items()),
            ("teacher (no style)", [TEACHER_STEPS]), ("flash (no style)", [4])]
    rows = []
    for name, steps in tqdm(jobs, desc="rows", disable=not progress):
        model = models[name]
        student = name.startswith("flash")
        for r in score_digits(model, num_samples, steps, reference=reference, style=STYLE):
            rows.append({"method": name, "nfe": r["steps"] * (1 if student else 2), "guidance": None if student else w,
                         **({"style_scale": STACKINGS[name][0], "style_interval": STACKINGS[name][1]}
                            if name in STACKINGS else {}),
                         **({"train_seconds": style_seconds} if name == "teacher + style" else {}), **r})

    prompts, _, seeds = eval_prompts(10)  # one of each digit
    strips = [(f"teacher + style, {TEACHER_STEPS} steps", sample(models["teacher + style"], prompts, seeds, TEACHER_STEPS)),
              (f"teacher, {TEACHER_STEPS} steps", sample(models["teacher (no style)"], prompts, seeds, TEACHER_STEPS)),
              ("dpmpp_2m + style, 2 steps (4 NFE)", sample(models["teacher + style"], prompts, seeds, 2))]
    strips += [(f"{name}, {n} step{'s' * (n > 1)}", sample(models[name], prompts, seeds, n))
               for name, (_, _, steps) in STACKINGS.items() for n in steps]
    strips.append(("flash, 4 steps", sample(models["flash (no style)"], prompts, seeds, 4)))
    result = {"preset": "composition", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "num_samples": num_samples, "style": STYLE, "fd_floor": fd_floor(num_samples, STYLE),
              "pixel_fd_floor": pixel_fd_floor(num_samples, STYLE), "teacher": str(base_dir), "style_lora": str(style_dir),
              "flash": str(flash_dir), "rows": rows, "targets": targets(rows),
              "targets_by_stacking": {name: targets(rows, name) for name in STACKINGS}, "versions": _versions(),
              "machine": _machine(), "wall_seconds": time.time() - t0}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_grid({STYLE: strips}, out / "grid.png")
    (out / "report.md").write_text(report(result))
    print(report(result))
    return result
