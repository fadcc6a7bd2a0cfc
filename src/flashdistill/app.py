"""``flashdistill app``: a local Gradio page that shows a student beside its teacher.

A prompt, a seed, the student's step count and a compare switch (conditional models: their
condition images, uploaded, and the sr noise level). The student's image comes first;
with compare on, the teacher then samples the same prompt and seed at its full steps (32 steps of
DPM-Solver++ with CFG) and both latencies are shown. Below: the run's metrics table and its
quality-vs-NFE plot, read from a ``results.json`` / ``quality_vs_nfe.png`` beside the run (``demo``
and ``benchmark`` write them), or scored on demand for digits runs.

Gradio is an optional extra (``pip install 'flashdistill[app]'``); the image pixels are exactly
those of ``flashdistill sample`` with the same seed (``Loaded.generate``), upscaled with nearest
neighbours for display.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .api import TEACHER_STEPS

DISPLAY_SIZE = 256  # small images (digits: 8x8) are shown nearest-upscaled to about this size
ELEM = {"prompt": "prompt", "seed": "seed", "steps": "steps", "compare": "compare", "generate": "generate",
        "student": "student-image", "teacher": "teacher-image", "latency": "latency", "metrics": "metrics"}


def _require_gradio():
    try:
        import gradio as gr
    except ImportError:
        raise ValueError("flashdistill app needs Gradio: pip install 'flashdistill[app]'") from None
    return gr


def display_scale(size: int) -> int:
    return max(1, DISPLAY_SIZE // max(1, size))


def find_results(run: Path) -> tuple[dict | None, Path | None]:
    """The metrics (results.json) and plot (quality_vs_nfe.png) of a run: in the run folder, or in
    its parent (``flashdistill demo`` writes them beside OUT/flash)."""
    for folder in (run, run.parent):
        results = folder / "results.json"
        if results.is_file():
            plot = folder / "quality_vs_nfe.png"
            return json.loads(results.read_text()), plot if plot.is_file() else None
    return None, None


def metrics_rows(results: dict | None) -> list[list]:
    if not results:
        return []
    rows = []
    for r in results.get("rows", []):
        rows.append([r.get("method", ""), r.get("steps"), r.get("nfe", r.get("steps")),
                     *(None if r.get(k) is None else round(float(r[k]), 4) for k in ("fd", "pixel_fd", "adherence", "teacher_mse"))])
    return rows


METRIC_HEADERS = ["method", "steps", "NFE", "FD", "pixel FD", "adherence", "teacher MSE"]


def score_run(student, teacher, num_samples: int = 200) -> tuple[dict, Path]:
    """Digits runs without stored metrics: the student at its step counts and DPM-Solver++ on the
    teacher at the same NFE, against the teacher's 32-step samples; writes the plot next to the run."""
    from .api import score_digits, teacher_reference
    from .scoring import eval_prompts, score

    reference = teacher_reference(teacher.model, num_samples)  # TEACHER_STEPS at the teacher's CFG
    rows = [{"method": "teacher dpmpp_2m", "steps": TEACHER_STEPS, "nfe": 2 * TEACHER_STEPS,
             **score(reference, eval_prompts(num_samples)[1], reference)}]
    rows += [{"method": "student", "nfe": r["steps"], **r}
             for r in score_digits(student.model, num_samples, student.step_counts, reference=reference)]
    half = [n // 2 for n in student.step_counts if n > 1 and n % 2 == 0]  # the teacher at the same NFE
    rows += [{"method": "teacher dpmpp_2m", "nfe": 2 * r["steps"], **r}
             for r in score_digits(teacher.model, num_samples, half, reference=reference)]
    plot = plot_rows(rows, Path(student.path) / "app_quality_vs_nfe.png")
    return {"rows": rows, "num_samples": num_samples}, plot


def plot_rows(rows: list[dict], path: Path) -> Path:
    """FD against NFE, one line per method (and CFG scale), log2 NFE axis; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict = {}
    for r in rows:
        label = r.get("method", "?") + ("" if r.get("guidance") is None else f", w={r['guidance']:g}")
        lines.setdefault(label, []).append((r.get("nfe", r.get("steps")), r["fd"]))
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for label, pts in lines.items():
        ax.plot(*zip(*sorted(pts)), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("NFE (network evaluations per image)")
    ax.set_ylabel("FD (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def actions(student, ref, scale: int):
    """The page's two actions as plain functions (the Gradio wiring calls them; tests call them
    directly). ``student`` may be None (a teacher alone, shown as ``ref``). Conditional models take
    their condition images (``inputs(student or ref)``, PIL images in that order) and, for sr, the
    low-res noise level; a teacher of another task (CoDi's text-to-image teacher) samples without."""
    shown = student or ref
    names = inputs(shown)

    def condition(model, noise_level, images):
        if not names or model.task != shown.task:
            return None
        missing = [k for k, v in zip(names, images) if v is None]
        if missing:
            raise ValueError(f"upload the {' and the '.join(missing)} first (this is a {shown.task} model)")
        return model.condition(**dict(zip(names, images)), noise_level=int(noise_level or 0), n=1)

    def run_student(prompt, seed, steps, noise_level=0, *images):
        if not prompt or not prompt.strip():
            raise ValueError("type a prompt first")
        cond = condition(shown, noise_level, images)
        t0 = time.perf_counter()
        image = shown.generate([prompt], steps=int(steps) if student else TEACHER_STEPS, seed=int(seed), scale=scale,
                               condition=cond)[0]
        ms = 1000 * (time.perf_counter() - t0)
        return image, ms, f"**student**: {int(steps)} step(s), {ms:.0f} ms" if student else f"**teacher**: {ms:.0f} ms"

    def run_teacher(prompt, seed, compare, student_ms, text, noise_level=0, *images):
        if not compare or student is None:
            return None, text
        cond = condition(ref, noise_level, images)
        t0 = time.perf_counter()
        image = ref.generate([prompt], steps=TEACHER_STEPS, seed=int(seed), scale=scale, condition=cond)[0]
        ms = 1000 * (time.perf_counter() - t0)
        w = ref.model.default_guidance
        alone = "" if cond is not None or not names else f" ({ref.task}: without the condition)"
        return image, (f"{text} · **teacher**{alone}: {TEACHER_STEPS} steps DPM-Solver++, CFG {w:g} "
                       f"({2 * TEACHER_STEPS} NFE), {ms:.0f} ms ({ms / max(student_ms, 1e-3):.1f}x the student's time)")

    return run_student, run_teacher


def inputs(model) -> list[str]:
    """The condition images a model takes (``image``, ``mask``, ``sketch``), in the page's order."""
    return list(model.model.task.inputs)


def build_app(model, teacher=None):
    """The Gradio Blocks for ``model`` (a run or teacher folder) and its ``teacher`` (default: the
    folder the run recorded)."""
    gr = _require_gradio()
    from . import api

    student = api.load(model, teacher=teacher)
    if student.is_student:
        ref = api.load(teacher if teacher is not None else student.meta["teacher"])
    else:
        ref, student = student, None
    shown = student or ref
    scale = display_scale(int(shown.meta.get("image_size") or shown.model.image_shape[-1]))
    counts = student.step_counts if student else [TEACHER_STEPS]
    name = Path(student.path if student else ref.path).name
    results, plot = find_results(Path(student.path)) if student else (None, None)
    if results and plot is None and results.get("rows") and "fd" in results["rows"][0]:
        plot = plot_rows(results["rows"], Path(student.path) / "app_quality_vs_nfe.png")

    plain_student, plain_teacher = actions(student, ref, scale)

    def gradio_errors(fn):
        def wrapped(*args):
            try:
                return fn(*args)
            except ValueError as e:
                raise gr.Error(str(e)) from None
        return wrapped

    run_student, run_teacher = gradio_errors(plain_student), gradio_errors(plain_teacher)

    def rescore():
        if student is None or student.meta.get("dataset") != "digits":
            raise gr.Error("on-demand scoring is for digits runs; score real models with flashdistill evaluate")
        data, path = score_run(student, ref)
        return metrics_rows(data), str(path)

    with gr.Blocks(title=f"flashdistill: {name}") as page:
        gr.Markdown(f"# {name}\n" + (f"A {student.meta.get('method', 'flash')} student of `{Path(ref.path).name}`: "
                                     f"{', '.join(map(str, counts))} step(s), no CFG. Same prompt and seed as the teacher."
                                     if student else "A teacher (no student to compare)."))
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value="", placeholder="a handwritten digit seven", elem_id=ELEM["prompt"], scale=3)
            seed = gr.Number(label="seed", value=0, precision=0, minimum=0, elem_id=ELEM["seed"])
            steps = gr.Radio([str(c) for c in counts], value=str(student.default_steps if student else TEACHER_STEPS),
                             label="student steps", elem_id=ELEM["steps"])
            compare = gr.Checkbox(value=student is not None, label=f"compare with the teacher ({TEACHER_STEPS} steps)",
                                  elem_id=ELEM["compare"], interactive=student is not None)
        names = inputs(shown)
        with gr.Row(visible=bool(names)):
            uploads = [gr.Image(label={"image": "low-res image" if shown.task == "sr" else "image",
                                       "mask": "mask (white = repaint)", "sketch": "sketch (white = stroke)"}[k],
                                type="pil", sources=["upload", "clipboard"], elem_id=f"cond-{k}", height=160)
                       for k in names]
            noise = gr.Slider(0, int(shown.model.meta.get("max_noise_level", 350)), step=1, label="low-res noise level",
                              value=shown.model.default_noise_level, visible=shown.task == "sr",
                              elem_id="noise-level")
        button = gr.Button("Generate", variant="primary", elem_id=ELEM["generate"])
        with gr.Row():
            out_student = gr.Image(label="student" if student else "teacher", type="pil", format="png",
                                   elem_id=ELEM["student"], height=DISPLAY_SIZE)
            out_teacher = gr.Image(label=f"teacher, {TEACHER_STEPS} steps", type="pil", format="png",
                                   elem_id=ELEM["teacher"], height=DISPLAY_SIZE)
        latency = gr.Markdown("", elem_id=ELEM["latency"])
        student_ms = gr.State(0.0)
        with gr.Accordion("metrics", open=True):
            table = gr.Dataframe(value=metrics_rows(results), headers=METRIC_HEADERS, interactive=False,
                                 elem_id=ELEM["metrics"])
            chart = gr.Image(value=str(plot) if plot else None, label="quality vs NFE", type="filepath")
            if student is not None and student.meta.get("dataset") == "digits":
                gr.Button("score this run now (digits, 200 samples per row)").click(rescore, None, [table, chart])
        button.click(run_student, [prompt, seed, steps, noise, *uploads], [out_student, student_ms, latency]).then(
            run_teacher, [prompt, seed, compare, student_ms, latency, noise, *uploads], [out_teacher, latency])
    return page


def launch(model, teacher=None, port: int = 7860, host: str = "127.0.0.1", block: bool = True):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves this machine
    page = build_app(model, teacher)
    print(f"flashdistill app: http://{host}:{port} (Ctrl+C stops it)", flush=True)
    page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True)
    return page
