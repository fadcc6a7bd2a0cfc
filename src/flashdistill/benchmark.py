"""``flashdistill benchmark``: quality against NFE, speed and cost on the built-in digits task,
and the paper's ablations (Fig. 4c-4g) at toy scale, side by side in one run.

Presets:

- ``quick``: the teacher at 32 steps; DDIM, Euler, DPM-Solver++(2M) and UniPC on the teacher (CFG
  at its default w) at 1, 2, 4 and 8 steps; the Flash student at 1, 2 and 4 steps.
- ``full``: more samples, the teacher at 50 steps too, and a teacher guidance sweep (cf. Fig. 5).
- ``ablations``: equal-budget Flash runs, FD and adherence at 2 steps, the paper's numbers beside.
- ``methods``: Flash, LCM-LoRA, SPLAM and SDXL-Lightning distilled from the same teacher at equal
  training wall time (each sized to Flash's seconds on this machine by probes), three training
  seeds each (two for SPLAM), at 1, 2 and 4 steps beside the training-free solvers, with the
  papers' own numbers for context.

Trained models are cached under ``--cache`` (default ``runs/cache``), keyed by a hash of their
config: a second run, or another preset, reuses them; an interrupted training resumes. NFE counts
network evaluations per sample (a CFG step costs 2). Speed: images per second of each row's
sampler, timed in this process after a warm-up, at one batch size, best of a few repeats.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.digits import get_dataset, prompt_for
from .scoring import eval_prompts, fd_floor, pixel_fd_floor, score
from .models.loading import load_model
from .sample import sample

SOLVERS = ("ddim", "euler", "dpmpp_2m", "unipc")
TIMING_FILE = "benchmark_timing.json"


@dataclass(frozen=True)
class Preset:
    num_samples: int = 500  # per row; every row of a table uses the same prompts and seeds
    teacher_steps: tuple[int, ...] = (32,)
    solvers: tuple[str, ...] = SOLVERS
    solver_steps: tuple[int, ...] = (1, 2, 4, 8)
    nocfg_solver_steps: tuple[int, ...] = ()  # solver rows without CFG (w = 1: NFE = steps), e.g. NFE 1
    student_steps: tuple[int, ...] = (1, 2, 4)
    guidance_sweep: tuple[float, ...] = ()
    ablations: bool = False
    ablation_flash: dict = field(default_factory=dict)  # budget of each ablation run (over the digits preset)
    ablation_seeds: tuple[int, ...] = (0,)  # training seeds of each ablation variant (its figures are their mean)
    speed_batch: int = 64
    speed_repeats: int = 3
    teacher: dict = field(default_factory=dict)  # overrides of TeacherConfig
    flash: dict = field(default_factory=dict)  # overrides of the Flash "digits" preset
    methods: dict = field(default_factory=dict)  # method -> overrides of its "digits" preset (the methods preset)
    method_seeds: tuple[int, ...] = (0,)  # training seeds of each method run
    seeds_per_method: dict = field(default_factory=dict)  # method -> its own seeds (overrides method_seeds)
    # Methods whose training budget is sized to Flash's wall time on this machine: each method and
    # Flash train a probe at ``probe_fraction`` of their preset's steps (same schedule, scaled), and
    # each method's steps are scaled by Flash's probe seconds over its own (see :func:`equal_time_budgets`).
    equal_time: tuple[str, ...] = ()
    probe_fraction: float = 0.2


# Flash's digits preset before target replay (2026-12-02): 340 steps, each on a fresh teacher solve.
# The methods preset was sized against this budget and keeps it.
FLASH_FRESH_340 = {"target_reuse": 1, "phase_steps": [50, 100, 100],
                   "mode_weights": [[0.0, 0.0, 0.5, 0.5], [0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25], [0.4, 0.2, 0.2, 0.2]],
                   "train": {"steps": 340, "checkpoint_every": 100, "sample_every": 100}}

PRESETS = {
    "quick": Preset(),
    "full": Preset(num_samples=2000, teacher_steps=(32, 50), guidance_sweep=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0)),
    # Half the digits preset's budget per run (510 steps, phases halved, the preset's target replay and
    # mode weights), two training seeds per variant: 26 runs in about 40 min on 2 cores. The baseline
    # is the paper's full method, so the adversarial term is on here (the digits preset turns it off;
    # docs/quality.md says why).
    "ablations": Preset(solvers=(), student_steps=(2,), ablations=True, ablation_seeds=(0, 1),
                        ablation_flash={"use_adv": True, "phase_steps": [75, 150, 150], "train": {"steps": 510}}),
    # Equal training wall time: the budget is Flash's 340 fresh-target steps (FLASH_FRESH_340); LCM,
    # SPLAM and Lightning start from their own digits presets and are sized to Flash's seconds on the
    # machine that runs the benchmark, by probes at a fifth of each budget (equal_time). Fixed step
    # counts sized on one machine gave LCM 80% and SPLAM 68% of Flash's time on another (2026-12-05).
    # Lightning gets three seeds (its 1-step stability is a claim to check), and so do Flash and LCM
    # (two seeds left "Flash beats LCM at 2 steps" a tie on 2026-12-05). DPM-Solver++ and UniPC
    # stand for the training-free solvers, with CFG and without.
    "methods": Preset(solvers=("dpmpp_2m", "unipc"), solver_steps=(1, 2, 4), nocfg_solver_steps=(1, 2, 4),
                      method_seeds=(0, 1), seeds_per_method={"flash": (0, 1, 2), "lcm": (0, 1, 2), "lightning": (0, 1, 2)},
                      methods={"flash": FLASH_FRESH_340, "lcm": {}, "splam": {}, "lightning": {}},
                      equal_time=("lcm", "splam", "lightning")),
}

# The papers' own figures for each method (notes/peer-methods.md), for context only: other
# teachers, datasets and metrics. FID at 1 / 2 / 4 steps (None: not reported).
PAPER_NUMBERS = {
    "flash": "Flash SD1.5 LoRA: COCO-2014 30k FID 12.27 / 12.41 at 2 / 4 NFE; COCO-2017 5k 22.6 at 2 NFE (Fig. 4a, 4b)",
    "lcm": "LCM-LoRA SD1.5, COCO-2014 30k FID 77.90 / 24.28 / 23.62 at 1 / 2 / 4 steps (Flash Table, from DMD)",
    "lightning": "SDXL-Lightning (full), COCO val 10k FID 22.61 / 23.11 / 22.30 at 1 / 2 / 4 steps (SDXL at 32 steps: 18.49; paper Table 2)",
    "splam": "SPLAM SD1.5 w = 3, COCO-2014 30k FID 12.31 / 10.06 at 2 / 4 steps (LCM: 14.29 / 10.68; teacher 8.03)",
}

# Fig. 4c-4g of the paper: SD1.5 teacher, 20k iterations, COCO-2017 5k, 2 NFE: (FID, CLIP).
# Our digits preset uses K = 16 (the paper's default is 32), so our baseline run is K = 16.
ABLATIONS = [
    ("loss terms (Fig. 4c)", [
        ("distil", {"use_adv": False, "use_dmd": False}, (27.12, 29.85)),
        ("distil + DMD", {"use_adv": False}, (26.88, 30.45)),
        ("distil + adv", {"use_dmd": False}, (23.41, 30.14)),
        ("distil + DMD + adv", {}, (22.64, 30.61)),
    ]),
    ("pi(t) (Fig. 4d)", [
        ("uniform", {"pi": "uniform"}, (24.25, 30.11)),
        ("gaussian", {"pi": "gaussian"}, (35.89, 28.15)),
        ("sharp", {"pi": "sharp"}, (23.35, 30.58)),
        ("ours", {}, (22.64, 30.61)),
    ]),
    ("distillation loss (Fig. 4e; the paper compares LPIPS 24.89 / 30.56)", [
        ("MSE", {}, (22.64, 30.61)),
        ("L1", {"distill_loss": "l1"}, None),
        ("Huber", {"distill_loss": "huber"}, None),
    ]),
    ("GAN loss (Fig. 4f)", [
        ("hinge", {"gan_loss": "hinge"}, (25.02, 30.17)),
        ("WGAN", {"gan_loss": "wgan"}, (24.58, 30.36)),
        ("LSGAN", {}, (22.64, 30.61)),
    ]),
    ("K (Fig. 4g)", [
        ("16", {}, (23.35, 30.11)),
        ("32", {"K": 32}, (22.64, 30.61)),
        ("64", {"K": 64}, (22.87, 30.58)),
    ]),
]


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def teacher_config(overrides: dict | None = None):
    from .config import from_dict
    from .methods.dsm import TeacherConfig

    return from_dict(TeacherConfig, overrides or {})


def method_config(method: str, teacher: Path, overrides: dict | None = None):
    from .methods import method_module

    return method_module(method).build_config(teacher, "digits", overrides)[0]


def flash_config(teacher: Path, overrides: dict | None = None):
    return method_config("flash", teacher, overrides)


# The source files that define what a cached teacher / Flash run is: a change to any of them (or to
# the package version) is a new cache entry, so edited code trains anew instead of reusing a stale run.
TEACHER_SOURCES = ("methods/dsm.py", "models/unet.py", "models/text.py", "models/denoiser.py", "core/schedules.py",
                   "core/solvers.py", "data/digits.py", "train.py", "checkpoint.py", "config.py", "models/model.py",
                   "models/loading.py", "tasks.py", "styles.py")
STUDENT_SOURCES = TEACHER_SOURCES + ("methods/base.py", "losses.py", "core/timesteps.py", "models/student.py",
                                     "models/discriminator.py", "models/pipelines.py", "sample.py")
FLASH_SOURCES = STUDENT_SOURCES + ("methods/flash.py",)
METHOD_SOURCES = {"flash": FLASH_SOURCES, "lcm": STUDENT_SOURCES + ("methods/lcm.py",),
                  "splam": STUDENT_SOURCES + ("methods/lcm.py", "methods/splam.py"),
                  "lightning": STUDENT_SOURCES + ("methods/lightning.py",),
                  "codi": STUDENT_SOURCES + ("methods/codi.py", "models/controlled.py")}


def code_of(source: str) -> str:
    """What a Python source does, without what only explains it: its syntax tree with docstrings
    dropped (comments, blank lines and line numbers are not in the tree), so that editing a comment
    or a docstring keeps a cache entry and any change to the code makes a new one."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body \
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def source_hash(files: tuple[str, ...]) -> str:
    """sha256 over the package version and the code (:func:`code_of`) of the named source files of
    this package."""
    from . import __version__

    root = Path(__file__).parent
    h = hashlib.sha256(__version__.encode())
    for name in files:
        h.update(name.encode() + b"\0" + code_of((root / name).read_text()).encode())
    return h.hexdigest()[:12]


def teacher_key(overrides: dict | None = None) -> str:
    """Cache key of a teacher: a hash of its resolved config, the package version and the source
    that defines it, so a changed default or changed code is a new entry."""
    from .config import to_dict

    return _key(to_dict(teacher_config(overrides)), source_hash(TEACHER_SOURCES))


def method_key(method: str, teacher_overrides: dict | None, overrides: dict | None = None) -> str:
    """Cache key of a distillation run: the teacher's key, the method and the run's resolved config
    (its teacher path, which names the cache folder, left out)."""
    from .config import to_dict

    cfg = to_dict(method_config(method, Path("."), overrides))
    cfg.pop("teacher")
    return _key(method, teacher_key(teacher_overrides), cfg, source_hash(METHOD_SOURCES[method]))


def flash_key(teacher_overrides: dict | None, overrides: dict | None = None) -> str:
    return method_key("flash", teacher_overrides, overrides)


def _config_changes(path: Path, config) -> list[str]:
    """Keys whose value in ``path/config.json`` differs from ``config`` (dotted, sorted); the paths
    of the teacher or base a run was trained on are not compared (the cache key names them)."""
    from .config import to_dict

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    saved = flat(json.loads((path / "config.json").read_text())) if (path / "config.json").is_file() else {}
    wanted = flat(json.loads(json.dumps(to_dict(config))))
    return sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k) and k not in ("teacher", "base"))


def _ensure_trained(path: Path, what: str, config, build, dataset, progress: bool) -> float | None:
    """Train ``build()`` (a method on ``config``) into ``path`` unless a finished model is there (an
    unfinished run resumes); returns the training seconds recorded when it finished (None if
    unrecorded). A finished model trained with another config is reused with a warning that names
    the keys that differ."""
    from .train import train

    path = Path(path)
    if (path / "flashdistill.json").is_file():
        print(f"reusing the {what} in {path}")
        changed = _config_changes(path, config)
        if changed:
            print(f"warning: the {what} in {path} was trained with a different config ({', '.join(changed)}); "
                  f"delete {path} to train it again with the current one")
    else:
        summary = train(build(), dataset, path, resume=True, progress=progress)
        (path / TIMING_FILE).write_text(json.dumps({"train_seconds": summary["seconds"]}))
    return _recorded_seconds(path)


def ensure_teacher(path: Path, overrides: dict | None = None, progress: bool = True) -> float | None:
    """The built-in teacher (TeacherConfig + ``overrides``) in ``path``, trained if needed."""
    from .methods.dsm import TeacherTraining

    cfg = teacher_config(overrides)
    return _ensure_trained(path, "teacher", cfg, lambda: TeacherTraining(cfg), get_dataset(cfg.dataset), progress)


def base_teacher_dir(cache: Path) -> Path:
    """Where the default digits teacher, the base of the conditional and composition presets, is
    cached in ``cache``."""
    return Path(cache) / f"teacher-{teacher_key(None)}"


def base_teacher(cache: Path, progress: bool = True) -> Path:
    """The default digits teacher in the cache folder ``cache`` (trained if needed)."""
    path = base_teacher_dir(cache)
    ensure_teacher(path, None, progress)
    return path


def ensure_student(method: str, teacher: Path, path: Path, overrides: dict | None = None,
                   progress: bool = True) -> float | None:
    """A ``method`` student of ``teacher`` (its digits preset + ``overrides``) in ``path``, trained
    if needed."""
    from .methods import method_module

    cfg = method_config(method, teacher, overrides)

    def build():
        m = method_module(method).Method(cfg)
        print(f"{method} student: {m.trainable:,} trainable parameters, "
              f"{100 * m.trainable / m.total:.2f}% of the teacher's {m.total:,}")
        return m

    return _ensure_trained(path, f"{method} run", cfg, build, get_dataset("digits"), progress)


def ensure_flash(teacher: Path, path: Path, overrides: dict | None = None, progress: bool = True) -> float | None:
    """A Flash student of ``teacher`` (digits preset + ``overrides``) in ``path``, trained if needed."""
    return ensure_student("flash", teacher, path, overrides, progress)


@dataclass(frozen=True)
class TrainJob:
    """One cache entry to train: ``fn(*args, progress=...)`` (a module-level ``ensure_*`` function, so
    that it can run in another process), started once the jobs named in ``after`` have finished."""

    name: str
    fn: object
    args: tuple
    out: Path | None = None  # the run folder it fills
    after: tuple[str, ...] = ()

    @property
    def cached(self) -> bool:
        """Whether ``out`` already holds a finished run: then the job is only checked, here,
        without a process of its own."""
        return self.out is not None and (Path(self.out) / "flashdistill.json").is_file()


def default_jobs() -> int:
    """Training processes side by side for ``--jobs 0``: one per CPU core, at most 2, on CPU (a
    batch-16 digits run uses one core well and a second one poorly); 1 when a GPU would be shared."""
    import os

    if torch.cuda.is_available():
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _run_job(fn, args: tuple, threads: int, conn) -> None:
    """A training job's process: ``fn(*args)`` on ``threads`` threads, progress bars off. What
    stopped it, if anything, goes back through ``conn``: ``("interrupted", step, signum)`` after a
    signal (its checkpoint saved), or ``("error", message)``."""
    from .train import TrainingInterrupted

    torch.set_num_threads(threads)
    try:
        fn(*args, progress=False)
    except TrainingInterrupted as e:
        conn.send(("interrupted", e.step, e.signum))
        raise SystemExit(130)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it by name
        conn.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1)
    conn.send(None)


def train_jobs(jobs: list[TrainJob], workers: int = 1, progress: bool = True) -> None:
    """Train every job, ``workers`` at a time, each in its own spawned process with
    ``torch.get_num_threads() // workers`` threads and its progress bars off; ``workers = 1``
    trains them here, in order. A failed job stops the others and is raised with its name. On an
    interrupt (Ctrl-C, SIGTERM) the running jobs are sent SIGTERM, so that each saves a checkpoint
    and stops (the next call resumes them), and no new job starts."""
    import multiprocessing
    import multiprocessing.connection

    from .train import TrainingInterrupted

    names = [j.name for j in jobs]
    unknown = sorted({a for j in jobs for a in j.after} - set(names))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"bad training jobs: unknown dependencies {unknown} or repeated names in {names}")
    if workers <= 1:
        done: set[str] = set()
        while len(done) < len(jobs):
            ready = [j for j in jobs if j.name not in done and set(j.after) <= done]
            if not ready:
                raise ValueError(f"training jobs depend on each other in a cycle: {sorted(set(names) - done)}")
            ready[0].fn(*ready[0].args, progress=progress)
            done.add(ready[0].name)
        return
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, torch.get_num_threads() // workers)
    fresh = sum(not j.cached for j in jobs)
    print(f"training {fresh} run(s), {workers} at a time, {threads} thread(s) each"
          + (f" ({len(jobs) - fresh} more in the cache)" if fresh < len(jobs) else ""))
    pending, running, done = list(jobs), {}, set()
    bar = tqdm(total=len(jobs), desc="training runs", disable=not progress)
    try:
        while pending or running:
            for j in [j for j in pending if set(j.after) <= done and j.cached]:
                pending.remove(j)
                j.fn(*j.args, progress=False)  # "reusing ...", and a warning if its config changed
                done.add(j.name)
                bar.update()
            for j in [j for j in pending if set(j.after) <= done][: workers - len(running)]:
                pending.remove(j)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_run_job, args=(j.fn, j.args, threads, send), name=j.name)
                proc.start()
                send.close()
                running[j.name] = (proc, recv)
            if not running:
                if pending:
                    raise ValueError(f"training jobs depend on each other in a cycle: {sorted(j.name for j in pending)}")
                break
            multiprocessing.connection.wait([p.sentinel for p, _ in running.values()])
            for name, (proc, recv) in list(running.items()):
                if proc.is_alive():
                    continue
                proc.join()
                outcome = recv.recv() if recv.poll() else ("error", f"its process exited with code {proc.exitcode}")
                del running[name]
                if outcome is not None and outcome[0] == "interrupted":
                    raise TrainingInterrupted(*outcome[1:])
                if outcome is not None or proc.exitcode != 0:
                    raise RuntimeError(f"training {name} failed: {outcome[1] if outcome else proc.exitcode}")
                done.add(name)
                bar.update()
    finally:
        for proc, _ in running.values():  # an error or an interrupt: the others checkpoint and stop
            if proc.is_alive():
                proc.terminate()
        for proc, _ in running.values():
            proc.join()
        bar.close()


def _recorded_seconds(path: Path) -> float | None:
    f = path / TIMING_FILE
    return json.loads(f.read_text())["train_seconds"] if f.is_file() else None


def images_per_second(generators: list, batch: int, repeats: int, progress: bool = False) -> list[float]:
    """Images per second of each ``generate(n)`` in ``generators``: one warm-up call each, then
    ``repeats`` rounds that time every generator once in turn (round-robin, so that a slow spell of
    a shared machine hits all rows alike); each row keeps its best round."""
    for generate in generators:
        generate(batch)
    best = [float("inf")] * len(generators)
    for _ in tqdm(range(max(1, repeats)), desc="speed rounds", disable=not progress):
        for i, generate in enumerate(generators):
            t0 = time.perf_counter()
            generate(batch)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [batch / b for b in best]


class Bench:
    """Scores rows against one set of prompts, seeds and the teacher's 32-step reference."""

    def __init__(self, teacher, preset: Preset, progress: bool = True):
        self.teacher, self.preset, self.progress = teacher, preset, progress
        self.prompts, self.labels, self.seeds = eval_prompts(preset.num_samples)
        self.guidance = teacher.default_guidance
        self.reference = sample(teacher, self.prompts, self.seeds, 32, guidance=self.guidance)

        self.samplers: list = []  # per row, ``(prompts, seeds) -> images``: speed rounds and the grid

    def row(self, model, method: str, steps: int, guidance: float | None, sampler: str | None = None,
            extra: dict | None = None) -> dict:
        def run(prompts, seeds):
            return sample(model, prompts, seeds, steps, guidance=guidance, sampler=sampler)

        student = guidance is None
        is_reference = model is self.teacher and steps == 32 and guidance == self.guidance and sampler == "dpmpp_2m"
        images = self.reference if is_reference else run(self.prompts, self.seeds)
        self.samplers.append(run)
        return {
            "method": method, "steps": steps, "nfe": steps if student else (steps if guidance == 1.0 else 2 * steps),
            "guidance": guidance, **score(images, self.labels, self.reference), "images_per_second": None,
            "train_seconds": None, "trainable_params": None, **(extra or {}),
        }

    def measure_speeds(self, rows: list[dict]) -> None:
        """Fill ``images_per_second`` of ``rows`` (made by :meth:`row`, in order), all in one phase."""
        generators = [lambda n, run=run: run(self.prompts[:n], self.seeds[:n]) for run in self.samplers]
        speeds = images_per_second(generators, self.preset.speed_batch, self.preset.speed_repeats, self.progress)
        for r, v in zip(rows, speeds):
            r["images_per_second"] = v


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("flashdistill", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _machine() -> dict:
    import os

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cpu"}


def run_benchmark(preset: str | Preset, out: str | Path, cache: str | Path = "runs/cache",
                  num_samples: int | None = None, progress: bool = True, jobs: int = 1) -> dict:
    """``jobs``: training runs side by side, each in its own process (0: :func:`default_jobs`); the
    ``methods`` and ``ablations`` presets train all their runs first, then score them here."""
    t0 = time.time()
    jobs = jobs or default_jobs()
    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if num_samples is not None:
        if num_samples < 10:
            raise ValueError(f"num_samples must be >= 10 (one per digit at least), got {num_samples}")
        preset = dataclasses.replace(preset, num_samples=num_samples)
    out, cache = Path(out), Path(cache)
    out.mkdir(parents=True, exist_ok=True)

    teacher_dir = cache / f"teacher-{teacher_key(preset.teacher)}"
    teacher_seconds = ensure_teacher(teacher_dir, preset.teacher, progress)
    teacher = load_model(teacher_dir)
    print(f"scoring {preset.num_samples} samples per row against the teacher's 32-step reference")
    bench = Bench(teacher, preset, progress)
    w = bench.guidance
    teacher_rows = [("teacher dpmpp_2m", s, w, "dpmpp_2m") for s in preset.teacher_steps]
    teacher_rows += [("teacher dpmpp_2m", 32, g, "dpmpp_2m") for g in preset.guidance_sweep if g != w]
    teacher_rows += [(f"{solver} (training-free)", s, w, solver) for solver in preset.solvers for s in preset.solver_steps]
    teacher_rows += [(f"{solver} (training-free)", s, 1.0, solver) for solver in preset.solvers
                     for s in preset.nocfg_solver_steps]
    rows = [bench.row(teacher, *r) for r in tqdm(teacher_rows, desc="teacher rows", disable=not progress)]
    result = {"preset": name, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "num_samples": preset.num_samples, "fd_floor": fd_floor(preset.num_samples), "pixel_fd_floor": pixel_fd_floor(preset.num_samples),
              "fd_floor_all_train": fd_floor(), "teacher": str(teacher_dir),
              "teacher_train_seconds": teacher_seconds, "teacher_guidance": w,
              "teacher_params": sum(p.numel() for p in teacher.denoiser.parameters())}

    if preset.ablations:
        result["ablations"] = run_ablations(bench, teacher_dir, cache, preset, progress, jobs)
        # one row per distinct run (variants with the same config share a run and its row)
        rows += list({id(r): r for g in result["ablations"] for e in g["variants"] for r in e["rows"]}.values())
    elif preset.methods:
        method_rows, budget = run_methods(bench, teacher_dir, cache, preset, progress, jobs)
        rows += method_rows
        if budget:
            result["equal_time"] = budget
    else:
        flash_dir = cache / f"flash-{flash_key(preset.teacher, preset.flash)}"
        flash_seconds = ensure_flash(teacher_dir, flash_dir, preset.flash, progress)
        student = load_model(flash_dir)
        extra = {"train_seconds": flash_seconds, "trainable_params": student.meta["trainable_params"]}
        rows += [bench.row(student, "flash student", s, None, extra=extra)
                 for s in tqdm(preset.student_steps, desc="student rows", disable=not progress)]
    bench.measure_speeds(rows)
    if preset.methods:
        result["methods"] = method_summary(rows, preset)
    result["rows"] = rows
    result["speed"] = {"batch": preset.speed_batch, "rounds": preset.speed_repeats,
                       "method": "warm-up call per row, then round-robin rounds over all rows; best round per row"}
    result["teacher_best_fd"] = min(r["fd"] for r in rows if r["method"] == "teacher dpmpp_2m" and r["steps"] >= 32)
    result["speedup_2step_student_vs_teacher_32"] = _speedup(rows, w)
    result["versions"], result["machine"] = _versions(), _machine()
    result["jobs"] = jobs
    result["wall_seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_grid(bench, rows, out / "grid.png")
    if not preset.ablations:
        plot_quality_vs_nfe(result, out / "quality_vs_nfe.png")
    else:
        plot_ablations(result, out / "ablations.png")
    (out / "report.md").write_text(report(result))
    print(report(result))
    return result


def _block_seconds(run: Path) -> list[float]:
    """A finished run's training-loop seconds per log interval (``train.log_every`` steps), from its
    log.jsonl: checkpoints and previews inside the loop included; model building and the final
    export left out."""
    times = [json.loads(line)["time"] for line in (run / "log.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip([0.0, *times], times)]


def probe_seconds(copies: list[Path]) -> float:
    """The training-loop seconds of one probe trained as identical copies side by side: per log
    interval, the fastest copy's seconds, summed. The shared 2-core machines here slow down by up to
    half in spells of tens of seconds, often one core at a time (2026-12-05: one LCM run's 10-step
    intervals took 1.8 s or 2.6 s in turns, its neighbour's spells at other times), sometimes both:
    the minimum over copies that run the same computation at once drops the first kind and keeps the
    cost of running beside a neighbour; a spell on both cores still lengthens the probe."""
    blocks = [_block_seconds(run) for run in copies]
    if len({len(b) for b in blocks}) != 1:
        raise ValueError(f"probe copies logged different step counts: {[str(r) for r in copies]}")
    return sum(min(col) for col in zip(*blocks))


PROBE_COPIES = ("a", "b")


def equal_time_budgets(teacher_dir: Path, cache: Path, preset: Preset, progress: bool, jobs: int = 1) -> tuple[dict, dict]:
    """Each ``preset.equal_time`` method's overrides, with its budget scaled to Flash's wall time
    here, and the record of how. Flash and each method train a probe: seed 0 at ``probe_fraction``
    of their budget, every schedule length scaled alike (so costs that change along a run, Flash's
    DMD from its second phase or Lightning's stages, are in it in the same proportions), as two
    identical copies side by side (one method's pair after another's, cached like any run), timed by
    :func:`probe_seconds`. A method's steps are then scaled by ``t_flash / t_method``."""
    from .config import merge

    if "flash" not in preset.methods:
        raise ValueError("equal_time sizes methods to Flash's wall time: the preset's methods need 'flash'")
    probes = {}
    for method in ("flash", *preset.equal_time):
        over = merge(preset.methods[method], {"train": {"seed": 0}})
        probe = merge(over, method_config(method, teacher_dir, over).budget_overrides(preset.probe_fraction))
        key = method_key(method, preset.teacher, probe)
        probes[method] = (probe, [cache / f"probe-{method}-{key}-{c}" for c in PROBE_COPIES])
    print(f"sizing {', '.join(preset.equal_time)} to Flash's training wall time: probes at "
          f"{preset.probe_fraction:g} of each budget, {len(PROBE_COPIES)} copies side by side")
    jobs_list, before = [], ()
    for method, (over, runs) in probes.items():  # each method's copies after the method before
        names = tuple(f"{method} probe {c}" for c in PROBE_COPIES)
        jobs_list += [TrainJob(n, ensure_student, (method, teacher_dir, run, over), run, after=before)
                      for n, run in zip(names, runs)]
        before = names
    train_jobs(jobs_list, jobs, progress)
    seconds = {m: probe_seconds(runs) for m, (_, runs) in probes.items()}
    methods, record = dict(preset.methods), {"reference": "flash", "probe_fraction": preset.probe_fraction,
                                             "probe_seconds": seconds, "factors": {},
                                             "probe_copy_seconds": {m: [sum(_block_seconds(r)) for r in runs]
                                                                    for m, (_, runs) in probes.items()}}
    for method in preset.equal_time:
        factor = seconds["flash"] / seconds[method]
        cfg = method_config(method, teacher_dir, preset.methods[method])
        methods[method] = merge(preset.methods[method], cfg.budget_overrides(factor))
        record["factors"][method] = factor
        print(f"  {method}: probe {seconds[method]:.1f} s against Flash's {seconds['flash']:.1f} s -> "
              f"{cfg.train.steps} x {factor:.2f} = {methods[method]['train']['steps']} steps")
    return methods, record


def run_methods(bench: Bench, teacher_dir: Path, cache: Path, preset: Preset, progress: bool, jobs: int = 1) -> tuple[list[dict], dict | None]:
    """Every method of the preset, once per training seed (trained ``jobs`` at a time), scored at
    the preset's student steps; with ``equal_time``, the budgets sized first (and their record
    returned)."""
    from .config import merge

    methods, budget = (equal_time_budgets(teacher_dir, cache, preset, progress, jobs) if preset.equal_time
                       else (preset.methods, None))
    runs = []
    for method, overrides in methods.items():
        for seed in preset.seeds_per_method.get(method, preset.method_seeds):
            over = merge(overrides, {"train": {"seed": seed}})
            runs.append((method, seed, over, cache / f"{method}-{method_key(method, preset.teacher, over)}"))
    train_jobs([TrainJob(f"{method} seed {seed}", ensure_student, (method, teacher_dir, run, over), run)
                for method, seed, over, run in runs], jobs, progress)
    rows = []
    for method, seed, over, run in runs:
        student = load_model(run)
        extra = {"train_seconds": _recorded_seconds(run), "trainable_params": student.meta["trainable_params"], "seed": seed,
                 "train_steps": student.meta["config"]["train"]["steps"], "run": str(run)}
        rows += [bench.row(student, f"{method} student", s, None, extra=extra) for s in preset.student_steps]
    return rows, budget


def method_summary(rows: list[dict], preset: Preset) -> list[dict]:
    """Per method and step count: mean and spread over the training seeds, the best training-free
    solver at the same NFE, and the paper's own figures for context."""
    out = []

    def mean_seconds(method):
        secs = {r["seed"]: r["train_seconds"] for r in rows if r["method"] == f"{method} student" and r["train_seconds"]}
        return sum(secs.values()) / len(secs) if secs else None

    flash_seconds = mean_seconds("flash")
    for method in preset.methods:
        own = mean_seconds(method)
        for steps in preset.student_steps:
            rs = [r for r in rows if r["method"] == f"{method} student" and r["steps"] == steps]
            solvers = [r for r in rows if r["method"].endswith("(training-free)") and r["nfe"] == steps]
            fds = [r["fd"] for r in rs]
            out.append({"method": method, "steps": steps, "nfe": steps, "seeds": [r["seed"] for r in rs],
                        "fd": fds, "fd_mean": sum(fds) / len(fds), "fd_spread": max(fds) - min(fds),
                        "pixel_fd_mean": sum(r["pixel_fd"] for r in rs) / len(rs),
                        "adherence_mean": sum(r["adherence"] for r in rs) / len(rs),
                        "train_seconds": [r["train_seconds"] for r in rs], "train_steps": rs[0]["train_steps"],
                        "train_seconds_vs_flash": own / flash_seconds if own and flash_seconds else None,
                        "trainable_params": rs[0]["trainable_params"],
                        "images_per_second": sum(r["images_per_second"] or 0 for r in rs) / len(rs),
                        "best_solver_fd_same_nfe": min((r["fd"] for r in solvers), default=None),
                        "paper": PAPER_NUMBERS.get(method)})
    return out


def _speedup(rows: list[dict], w: float) -> float | None:
    student = [r for r in rows if r["method"] == "flash student" and r["steps"] == 2][:1]
    teacher = [r for r in rows if r["method"] == "teacher dpmpp_2m" and r["steps"] == 32 and r["guidance"] == w]
    if not student or not teacher:
        return None
    return student[0]["images_per_second"] / teacher[0]["images_per_second"]


def ablation_overrides(preset: Preset, variant: dict) -> dict:
    from .config import merge

    return merge(merge(preset.flash, preset.ablation_flash), variant)


def ablation_runs(preset: Preset) -> dict:
    """Cache key -> overrides of every distinct ablation run (variants sharing a config share a run),
    the slowest (largest K) first, so that runs trained side by side finish together."""
    from .config import merge

    runs = {}
    for _, variants in ABLATIONS:
        for _, variant, _ in variants:
            for seed in preset.ablation_seeds:
                overrides = merge(ablation_overrides(preset, variant), {"train": {"seed": seed}})
                runs.setdefault(flash_key(preset.teacher, overrides), overrides)
    return dict(sorted(runs.items(), key=lambda kv: -kv[1].get("K", 16)))


def run_ablations(bench: Bench, teacher_dir: Path, cache: Path, preset: Preset, progress: bool, jobs: int = 1) -> list[dict]:
    """Each variant: one Flash run (cached by config) per training seed at the same budget, scored at
    2 steps; a variant's figures are the mean over its seeds (per-seed FDs kept). Every distinct run
    is trained first, ``jobs`` at a time."""
    from .config import merge

    train_jobs([TrainJob(f"flash {key[:8]}", ensure_flash, (teacher_dir, cache / f"flash-{key}", over), cache / f"flash-{key}")
                for key, over in ablation_runs(preset).items()], jobs, progress)
    groups, done = [], {}
    total = sum(len(v) for _, v in ABLATIONS) * len(preset.ablation_seeds)
    bar = tqdm(total=total, desc="ablations", disable=not progress)
    for group, variants in ABLATIONS:
        entries = []
        for label, variant, paper in variants:
            rows = []
            for seed in preset.ablation_seeds:
                overrides = merge(ablation_overrides(preset, variant), {"train": {"seed": seed}})
                key = flash_key(preset.teacher, overrides)
                if key not in done:
                    run = cache / f"flash-{key}"
                    student = load_model(run)
                    extra = {"train_seconds": _recorded_seconds(run), "trainable_params": student.meta["trainable_params"],
                             "run": str(run), "seed": seed}
                    done[key] = bench.row(student, "flash student", 2, None, extra={**extra, "variants": []})
                done[key]["variants"].append(f"{group.split(' (')[0]}: {label}")
                rows.append(done[key])
                bar.update()
            mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
            entries.append({"variant": label, "overrides": variant, "rows": rows, "seeds": list(preset.ablation_seeds),
                            "fd": mean("fd"), "fd_per_seed": [r["fd"] for r in rows], "pixel_fd": mean("pixel_fd"),
                            "adherence": mean("adherence"), "train_seconds": [r["train_seconds"] for r in rows],
                            "paper_fid": paper[0] if paper else None, "paper_clip": paper[1] if paper else None})
        groups.append({"group": group, "variants": entries, "ranking_agrees": _ranking_agrees(entries)})
    bar.close()
    return groups


def _ranking_agrees(entries: list[dict]) -> bool | None:
    """Whether our FD orders the variants the paper's FID orders (variants with a paper number)."""
    both = [e for e in entries if e["paper_fid"] is not None]
    if len(both) < 2:
        return None
    ours = sorted(range(len(both)), key=lambda i: both[i]["fd"])
    paper = sorted(range(len(both)), key=lambda i: both[i]["paper_fid"])
    return ours == paper


def write_grid(bench: Bench, rows: list[dict], path: Path) -> None:
    """Same 10 prompts (digits 0-9) and seeds in every row; one labelled row per table row, each
    made by that row's own sampler."""
    from PIL import Image, ImageDraw

    prompts, seeds = [prompt_for(d) for d in range(10)], list(range(10))
    strips = [run(prompts, seeds) for run in bench.samplers]
    labels = [" = ".join(r["variants"]) + f" (seed {r['seed']})" if r.get("variants") else
              f"{r['method']}, {r['steps']} step{'s' * (r['steps'] != 1)} ({r['nfe']} NFE)" + ("" if r["guidance"] is None else f", w={r['guidance']:g}")
              for r in rows]
    size = 8 * 4
    label_w = 8 + 6 * max(len(s) for s in labels)  # PIL's default bitmap font: about 6 px per character
    img = Image.new("L", (label_w + 10 * (size + 2), len(strips) * (size + 2)), 255)
    draw = ImageDraw.Draw(img)
    for i, (x, label) in enumerate(zip(strips, labels)):
        y = i * (size + 2)
        draw.text((4, y + size // 2 - 5), label, fill=0)
        for j in range(10):
            tile = ((x[j, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
            img.paste(Image.fromarray(tile).resize((size, size), Image.NEAREST), (label_w + j * (size + 2), y))
    img.save(path)


def plot_quality_vs_nfe(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    methods = []
    for r in result["rows"]:
        if r["method"] not in methods and not (r["method"].startswith("teacher") and r["steps"] >= 32):
            methods.append(r["method"])
    for m in methods:
        by_nfe: dict = {}
        for r in result["rows"]:
            if r["method"] == m:
                by_nfe.setdefault(r["nfe"], []).append(r["fd"])
        # students: mean over training seeds; a solver: its best row at that NFE (with or without CFG)
        pts = sorted((n, sum(v) / len(v) if m.endswith("student") else min(v)) for n, v in by_nfe.items())
        style = dict(lw=2.5, marker="o") if m.endswith("student") else dict(lw=1.2, marker=".", ls="--")
        ax.plot(*zip(*pts), label=m + (" (mean of seeds)" if m.endswith("student") and any(len(v) > 1 for v in by_nfe.values())
                                        else " (best at each NFE)" if not m.endswith("student") else ""), **style)
    ax.axhline(result["teacher_best_fd"], ls="--", color="k", lw=1, label=f"teacher best ({result['teacher_best_fd']:.2f})")
    ax.axhline(result["fd_floor"], ls=":", color="gray", lw=1, label=f"data floor ({result['fd_floor']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE per image (a CFG step counts 2)")
    ax.set_ylabel("FD to test digits (lower is better)")
    ax.set_title(f"digits, {result['num_samples']} samples per point")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ablations(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["ablations"]
    fig, axes = plt.subplots(1, len(groups), figsize=(3 * len(groups), 3.2), dpi=120, sharey=True)
    for ax, g in zip(axes, groups):
        names = [e["variant"] for e in g["variants"]]
        ax.bar(names, [e["fd"] for e in g["variants"]], color="C0", label="mean over seeds")
        for i, e in enumerate(g["variants"]):  # each training seed's own figure
            ax.plot([i] * len(e["fd_per_seed"]), e["fd_per_seed"], "k.", ms=4, label="one seed" if i == 0 else None)
        ax.set_title(g["group"].split(" (")[0], fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    axes[0].set_ylabel("FD at 2 steps")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"# flashdistill benchmark: preset `{result['preset']}`", "",
             f"{result['date']}; {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch threads; "
             f"wall time {result['wall_seconds'] / 60:.1f} min. "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
             f"FD floor (real train digits vs test digits, {result['num_samples']} samples): "
             f"**{result['fd_floor']:.2f}** (whole train split: "
             f"{result['fd_floor_all_train']:.2f}); pixel FD floor {_fmt(result.get('pixel_fd_floor'), '.3f')}; teacher best FD: "
             f"**{result['teacher_best_fd']:.2f}**; {result['num_samples']} samples per row; teacher trained "
             f"in {_fmt(result['teacher_train_seconds'], '.0f')} s; CFG scale w = {result['teacher_guidance']:g}.", ""]
    speed = result["speedup_2step_student_vs_teacher_32"]
    if speed is not None:
        lines += [f"Speed: the 2-step student makes **{speed:.1f}×** the images per second of the 32-step CFG "
                  f"teacher, same run (target ≥ 25×, ideal 32×).", ""]
    lines += ["| method | steps | NFE | w | FD ↓ | pixel FD ↓ | hist ↓ | adherence ↑ | teacher MSE ↓ | images/s | train s | trainable params |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r.get("variants"):
            continue
        seed = f" (seed {r['seed']})" if "seed" in r else ""
        lines.append(f"| {r['method']}{seed} | {r['steps']} | {r['nfe']} | {_fmt(r['guidance'], 'g')} | {r['fd']:.2f} | "
                     f"{_fmt(r.get('pixel_fd'), '.3f')} | {_fmt(r.get('hist'), '.4f')} | {r['adherence']:.3f} | {r['teacher_mse']:.4f} | {r['images_per_second']:.0f} | "
                     f"{_fmt(r['train_seconds'], '.0f')} | {_fmt(r['trainable_params'], ',')} |")
    if result.get("methods"):
        lines += ["", "### Methods at equal training wall time (mean over training seeds)", "",
                  "| method | steps | FD ↓ mean (per seed) | best solver FD at same NFE | pixel FD ↓ | adherence ↑ | "
                  "images/s | train s (per seed) | train steps | trainable params | the paper's own figures |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for e in result["methods"]:
            per = ", ".join(f"{v:.2f}" for v in e["fd"])
            secs = ", ".join(_fmt(v, ".0f") for v in e["train_seconds"])
            lines.append(f"| {e['method']} | {e['steps']} | {e['fd_mean']:.2f} ({per}) | {_fmt(e['best_solver_fd_same_nfe'], '.2f')} | "
                         f"{e['pixel_fd_mean']:.3f} | {e['adherence_mean']:.3f} | {e['images_per_second']:.0f} | {secs} | "
                         f"{e['train_steps']} | {e['trainable_params']:,} | {e['paper'] if e['steps'] == 2 else ''} |")
        shares = ", ".join(f"{e['method']} {e['train_seconds_vs_flash']:.0%}" for e in result["methods"]
                           if e["steps"] == result["methods"][0]["steps"] and e["train_seconds_vs_flash"] is not None)
        lines += ["", f"Training wall time against Flash's (mean over seeds): {shares}."]
        if result.get("equal_time"):
            b = result["equal_time"]
            lines[-1] += (f" Budgets sized by probes at {b['probe_fraction']:g} of each preset's steps (probe seconds: "
                          + ", ".join(f"{m} {v:.1f}" for m, v in b["probe_seconds"].items()) + "; step factors: "
                          + ", ".join(f"{m} {v:.2f}" for m, v in b["factors"].items()) + ").")
    for g in result.get("ablations", []):
        agrees = {True: "same order as the paper", False: "**order differs from the paper**", None: "no paper order"}
        lines += ["", f"### {g['group']} — {agrees[g['ranking_agrees']]}", "",
                  "| variant | FD ↓ (ours, 2 steps; mean (per seed)) | pixel FD ↓ | adherence ↑ | paper FID ↓ | paper CLIP ↑ | train s (per seed) |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for e in g["variants"]:
            per = ", ".join(f"{v:.2f}" for v in e["fd_per_seed"])
            secs = ", ".join(_fmt(v, ".0f") for v in e["train_seconds"])
            lines.append(f"| {e['variant']} | {e['fd']:.2f} ({per}) | {_fmt(e['pixel_fd'], '.3f')} | {e['adherence']:.3f} | "
                         f"{_fmt(e['paper_fid'], '.2f')} | {_fmt(e['paper_clip'], '.2f')} | {secs} |")
    return "\n".join(lines) + "\n"
