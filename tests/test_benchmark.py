"""The benchmark on a reduced preset (tiny models, few samples): schema, finiteness, caching.
No quality threshold is asserted: these models are trained for 2 steps."""
import json
import math

import pytest

from flashdistill import benchmark
from flashdistill.benchmark import Preset, run_benchmark

TINY_TEACHER = {"channels": [8, 16], "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2}}
TINY_FLASH = {"K": 8, "lora_rank": 2, "phase_steps": [1, 1, 1],
              "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "sample_every": 0}}
ROW_KEYS = {"method", "steps", "nfe", "guidance", "fd", "adherence", "teacher_mse", "images_per_second",
            "train_seconds", "trainable_params"}


def tiny(**over) -> Preset:
    base = dict(num_samples=20, solvers=("ddim", "unipc"), solver_steps=(1, 2), student_steps=(1, 2),
                speed_batch=4, speed_repeats=1, teacher=TINY_TEACHER, flash=TINY_FLASH)
    return Preset(**{**base, **over})


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_schema_files_and_cache(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    result = run_benchmark(tiny(guidance_sweep=(1.0,)), out, cache=cache, progress=False)
    for name in ("results.json", "report.md", "grid.png", "quality_vs_nfe.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == result["rows"]
    for key in ("fd_floor", "teacher_train_seconds", "versions", "wall_seconds", "teacher_best_fd",
                "speedup_2step_student_vs_teacher_32", "machine", "num_samples"):
        assert key in saved, key
    assert saved["versions"]["torch"] and saved["machine"]["torch_threads"] >= 1
    assert _finite(saved["teacher_train_seconds"]) and _finite(saved["speedup_2step_student_vs_teacher_32"])
    rows = saved["rows"]
    assert all(set(r) >= ROW_KEYS for r in rows)
    for r in rows:
        assert all(_finite(r[k]) for k in ("fd", "adherence", "teacher_mse", "images_per_second")), r
    got = {(r["method"], r["steps"], r["guidance"]) for r in rows}
    w = saved["teacher_guidance"]
    expected = {("teacher dpmpp_2m", 32, w), ("teacher dpmpp_2m", 32, 1.0)}
    expected |= {(f"{s} (training-free)", n, w) for s in ("ddim", "unipc") for n in (1, 2)}
    expected |= {("flash student", n, None) for n in (1, 2)}
    assert got == expected and len(rows) == len(expected)
    for r in rows:
        if r["method"] == "flash student":
            assert r["nfe"] == r["steps"] and r["guidance"] is None
            assert r["trainable_params"] > 0 and _finite(r["train_seconds"])
        else:
            assert r["nfe"] == (r["steps"] if r["guidance"] == 1.0 else 2 * r["steps"])
            assert r["train_seconds"] is None and r["trainable_params"] is None
    reference = [r for r in rows if r["method"] == "teacher dpmpp_2m" and r["guidance"] == w][0]
    assert reference["teacher_mse"] == 0.0
    report = (out / "report.md").read_text()
    assert "| flash student | 2 | 2 |" in report and "unipc (training-free)" in report

    # a second run reuses both trained models (their recorded training time included)
    capsys.readouterr()
    again = run_benchmark(tiny(), tmp_path / "out2", cache=cache, progress=False)
    printed = capsys.readouterr().out
    assert "reusing the teacher" in printed and "reusing the flash run" in printed
    assert again["teacher_train_seconds"] == saved["teacher_train_seconds"]
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["flash", "teacher"]
    assert "warning" not in printed

    # a reused run whose saved config differs from the current one is named with the keys that differ
    teacher_dir = next(cache.glob("teacher-*"))
    saved_cfg = json.loads((teacher_dir / "config.json").read_text())
    saved_cfg["lr"], saved_cfg["train"]["seed"] = 0.5, 7
    (teacher_dir / "config.json").write_text(json.dumps(saved_cfg))
    benchmark.ensure_teacher(teacher_dir, TINY_TEACHER, progress=False)
    assert (f"warning: the teacher in {teacher_dir} was trained with a different config (lr, train.seed); "
            f"delete {teacher_dir} to train it again") in capsys.readouterr().out


def test_cache_keys_follow_resolved_configs():
    """Keys hash the resolved config: a changed preset default or override is a new entry, an
    override equal to the default is the same entry, and a Flash key follows its teacher's."""
    from flashdistill.methods.flash import PRESETS as FLASH_PRESETS

    ema = FLASH_PRESETS["digits"]["train"]["ema_decay"]
    assert benchmark.flash_key(None, {"train": {"ema_decay": ema}}) == benchmark.flash_key(None, None)
    assert benchmark.flash_key(None, {"train": {"ema_decay": ema / 2}}) != benchmark.flash_key(None, None)
    assert benchmark.flash_key(TINY_TEACHER, TINY_FLASH) != benchmark.flash_key(None, TINY_FLASH)
    assert benchmark.teacher_key({"lr": 2e-3}) == benchmark.teacher_key(None)
    assert benchmark.teacher_key({"lr": 1e-3}) != benchmark.teacher_key(None)


def test_cache_keys_follow_source_and_version(monkeypatch, tmp_path):
    """Changed code that defines the model or the method, or a new package version, is a new
    entry: a stale run is never reused."""
    import flashdistill

    teacher, flash = benchmark.teacher_key(None), benchmark.flash_key(None, None)
    monkeypatch.setattr(flashdistill, "__version__", "9.9.9")
    assert benchmark.teacher_key(None) != teacher and benchmark.flash_key(None, None) != flash
    monkeypatch.undo()
    assert benchmark.teacher_key(None) == teacher
    # an edited method file changes the Flash key and not the teacher's; an edited comment or
    # docstring changes nothing
    real = benchmark.Path.read_text

    def edit(change):
        def read_text(self, *args, **kwargs):
            text = real(self, *args, **kwargs)
            return change(text) if self.name == "flash.py" else text
        monkeypatch.setattr(benchmark.Path, "read_text", read_text)

    edit(lambda text: text + "\n# a new comment\n")
    assert benchmark.flash_key(None, None) == flash
    doc = '"""Flash Diffusion'
    assert doc in real(benchmark.Path(flashdistill.__file__).parent / "methods" / "flash.py")
    edit(lambda text: text.replace(doc, '"""Rewritten docstring. Flash Diffusion', 1))
    assert benchmark.flash_key(None, None) == flash
    edit(lambda text: text + "\nEDITED = 1\n")
    assert benchmark.flash_key(None, None) != flash and benchmark.teacher_key(None) == teacher
    monkeypatch.undo()
    assert benchmark.flash_key(None, None) == flash
    for name in benchmark.FLASH_SOURCES:  # every listed file exists
        assert (benchmark.Path(flashdistill.__file__).parent / name).is_file(), name


def test_ablations_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "ABLATIONS", [
        ("loss terms", [("distil", {"use_adv": False, "use_dmd": False}, (27.12, 29.85)),
                        ("all", {}, (22.64, 30.61))]),
        ("K", [("8", {}, None), ("16", {"K": 16}, (22.64, 30.61))]),
    ])
    out = tmp_path / "out"
    result = run_benchmark(tiny(solvers=(), student_steps=(2,), ablations=True, ablation_seeds=(0, 1)), out,
                           cache=tmp_path / "cache", progress=False)
    for name in ("results.json", "report.md", "grid.png", "ablations.png"):
        assert (out / name).is_file(), name
    groups = json.loads((out / "results.json").read_text())["ablations"]
    assert [g["group"] for g in groups] == ["loss terms", "K"]
    assert groups[0]["ranking_agrees"] in (True, False) and groups[1]["ranking_agrees"] is None
    for g in groups:
        for e in g["variants"]:
            assert [r["seed"] for r in e["rows"]] == [0, 1] and all(r["steps"] == 2 for r in e["rows"])
            # a variant's figures are the mean of its seeds' rows
            assert e["fd_per_seed"] == [r["fd"] for r in e["rows"]] and e["fd"] == pytest.approx(sum(e["fd_per_seed"]) / 2)
            assert e["pixel_fd"] == pytest.approx(sum(r["pixel_fd"] for r in e["rows"]) / 2)
            assert _finite(e["fd"]) and _finite(e["adherence"])
            assert e["rows"][0]["run"] != e["rows"][1]["run"]  # each seed is its own run
    # the baseline ("all" and "8" are the same config) trains once per seed: 3 x 2 runs, not 4 x 2
    assert len([p for p in (tmp_path / "cache").iterdir() if p.name.startswith("flash-")]) == 6
    report_text = (out / "report.md").read_text()
    assert "paper FID" in report_text and "pixel FD" in report_text
    assert len(result["rows"]) == 1 + 6  # the teacher reference, then one row per distinct run
    assert all(r["images_per_second"] > 0 for r in result["rows"])


def test_unknown_preset_and_bad_samples(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'fast'.*quick"):
        run_benchmark("fast", tmp_path)
    with pytest.raises(ValueError, match="num_samples must be >= 10"):
        run_benchmark("quick", tmp_path, num_samples=3)


def test_methods_schema_seeds_and_summary(tmp_path):
    tiny_m = {"N": 10, "lora_rank": 2, "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "sample_every": 0}}
    tiny_l = {"lora_rank": 2, "teacher_steps": 4, "stages": [2, 1], "stage_steps": [1, 2], "convert_steps": 1,
              "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 3}}
    preset = tiny(solvers=("dpmpp_2m",), nocfg_solver_steps=(1,), method_seeds=(0, 1), seeds_per_method={"lightning": (0,)},
                  methods={"flash": TINY_FLASH, "lcm": tiny_m, "splam": {**tiny_m, "gamma_dim": 8}, "lightning": tiny_l})
    result = run_benchmark(preset, tmp_path / "out", cache=tmp_path / "cache", progress=False)
    students = [r for r in result["rows"] if r["method"].endswith("student")]
    assert {(r["method"], r["steps"], r["seed"]) for r in students} == {
        (f"{m} student", s, seed) for m in ("flash", "lcm", "splam") for s in (1, 2) for seed in (0, 1)} | {
        ("lightning student", s, 0) for s in (1, 2)}
    assert len({r["run"] for r in students}) == 7  # one cached run per method and seed
    summary = result["methods"]
    assert len(summary) == 8
    for e in summary:
        n = 1 if e["method"] == "lightning" else 2
        assert len(e["fd"]) == n and e["fd_mean"] == pytest.approx(sum(e["fd"]) / n) and e["fd_spread"] >= 0
        assert _finite(e["best_solver_fd_same_nfe"]) and e["paper"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Methods at equal training wall time" in report and "| lcm | 2 |" in report
    assert (tmp_path / "out" / "quality_vs_nfe.png").is_file()


def test_equal_time_sizes_each_method_to_flash_probe(tmp_path):
    """With ``equal_time``, Flash and each named method train a probe at ``probe_fraction`` of their
    budget, and the method's run gets its steps scaled by Flash's probe seconds over its own."""
    tiny_m = {"N": 10, "lora_rank": 2, "train": {"steps": 6, "batch_size": 2, "checkpoint_every": 6, "sample_every": 0}}
    flash = {**TINY_FLASH, "phase_steps": [2, 2, 2], "train": {**TINY_FLASH["train"], "steps": 8, "checkpoint_every": 4}}
    preset = tiny(solvers=("ddim",), solver_steps=(1,), student_steps=(1,), method_seeds=(0,),
                  methods={"flash": flash, "lcm": tiny_m}, equal_time=("lcm",), probe_fraction=0.5)
    cache = tmp_path / "cache"
    result = run_benchmark(preset, tmp_path / "out", cache=cache, progress=False)
    budget = result["equal_time"]
    secs = budget["probe_seconds"]
    assert set(secs) == {"flash", "lcm"} and all(v > 0 for v in secs.values())
    factor = secs["flash"] / secs["lcm"]
    assert budget["factors"] == {"lcm": pytest.approx(factor)}
    probes = sorted(p.name.split("-")[1] + p.name[-2:] for p in cache.iterdir() if p.name.startswith("probe-"))
    assert probes == ["flash-a", "flash-b", "lcm-a", "lcm-b"]  # two identical copies of each
    for probe in (p for p in cache.iterdir() if p.name.startswith("probe-")):  # half of each budget, scaled alike
        cfg = json.loads((probe / "flashdistill.json").read_text())["config"]
        flash_probe = probe.name.startswith("probe-flash")
        assert cfg["train"]["steps"] == (4 if flash_probe else 3) and cfg["train"]["seed"] == 0
        assert not flash_probe or cfg["phase_steps"] == [1, 1, 1]
    for m in ("flash", "lcm"):  # per log interval, the faster copy
        copies = sorted(p for p in cache.iterdir() if p.name.startswith(f"probe-{m}-"))
        assert secs[m] == pytest.approx(benchmark.probe_seconds(copies))
        assert secs[m] <= min(budget["probe_copy_seconds"][m]) + 1e-9
    lcm = [r for r in result["rows"] if r["method"] == "lcm student"][0]
    assert lcm["train_steps"] == max(1, round(6 * factor))
    flash_row = [r for r in result["rows"] if r["method"] == "flash student"][0]
    assert flash_row["train_steps"] == 8  # the reference keeps its budget
    summary = {e["method"]: e for e in result["methods"]}
    assert summary["lcm"]["train_seconds_vs_flash"] == pytest.approx(lcm["train_seconds"] / flash_row["train_seconds"])
    assert "Budgets sized by probes at 0.5" in (tmp_path / "out" / "report.md").read_text()
    again = run_benchmark(preset, tmp_path / "out2", cache=cache, progress=False)  # probes and runs reused
    assert again["equal_time"] == budget
    assert {r["run"] for r in again["rows"] if "run" in r} == {r["run"] for r in result["rows"] if "run" in r}


def test_probe_seconds_takes_the_faster_copy_per_log_interval(tmp_path):
    for name, times in (("a", [1.0, 3.0, 4.0]), ("b", [2.0, 2.5, 4.5])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps({"step": 10 * (i + 1), "time": t}) + "\n"
                                                           for i, t in enumerate(times)))
    # intervals a: 1, 2, 1; b: 2, 0.5, 2 -> 1 + 0.5 + 1
    assert benchmark.probe_seconds([tmp_path / "a", tmp_path / "b"]) == pytest.approx(2.5)
    (tmp_path / "b" / "log.jsonl").write_text(json.dumps({"step": 10, "time": 1.0}) + "\n")
    with pytest.raises(ValueError, match="different step counts"):
        benchmark.probe_seconds([tmp_path / "a", tmp_path / "b"])


def test_budget_overrides_scale_every_schedule_length(tmp_path):
    from flashdistill.benchmark import FLASH_FRESH_340, method_config
    from flashdistill.config import merge

    flash = method_config("flash", tmp_path, FLASH_FRESH_340)
    over = flash.budget_overrides(0.2)
    assert over == {"train": {"steps": 68, "checkpoint_every": 20, "sample_every": 20}, "phase_steps": [10, 20, 20]}
    method_config("flash", tmp_path, merge(FLASH_FRESH_340, over))  # a valid config
    light = method_config("lightning", tmp_path)
    for factor in (0.2, 0.37, 1.6):
        over = light.budget_overrides(factor)
        scaled = method_config("lightning", tmp_path, over)  # validates: steps = sum(stage_steps), convert < last
        assert scaled.train.steps == sum(scaled.stage_steps)
        assert scaled.stage_steps == [max(1, round(n * factor)) for n in light.stage_steps]
        assert scaled.convert_steps == min(max(1, round(light.convert_steps * factor)), scaled.stage_steps[-1] - 1)
    lcm = method_config("lcm", tmp_path)
    assert lcm.budget_overrides(2.0)["train"]["steps"] == 2 * lcm.train.steps


def _job(path, after=(), fail=False, sleep=0.0, interrupt=False, progress=True):
    """A training job for train_jobs: checks its dependencies' files exist, then writes its own with
    the torch thread count it ran with and whether its progress bars were on."""
    import time
    import torch
    from pathlib import Path

    if fail:
        raise ValueError("this run is broken")
    if interrupt:
        from flashdistill.train import TrainingInterrupted

        raise TrainingInterrupted(5, 15)
    time.sleep(sleep)
    assert all(Path(a).is_file() for a in after), f"{path} started before {after} finished"
    Path(path).write_text(json.dumps({"threads": torch.get_num_threads(), "progress": progress}))


def _check_job(teacher, folder, progress=True):
    """Like ensure_student: reads ``teacher``, fills ``folder`` (records which process did)."""
    import os

    assert (teacher / "flashdistill.json").is_file()
    (folder / "checked").write_text(str(os.getpid()))


@pytest.mark.parametrize("workers", [1, 2])
def test_train_jobs_respects_dependencies_threads_and_failures(tmp_path, workers):
    import torch
    from flashdistill.benchmark import TrainJob, train_jobs

    a, b, c = (tmp_path / n for n in "abc")
    jobs = [TrainJob("b", _job, (b, (a,)), after=("a",)), TrainJob("a", _job, (a,)), TrainJob("c", _job, (c,))]
    train_jobs(jobs, workers, progress=True)
    got = [json.loads(p.read_text()) for p in (a, b, c)]
    if workers == 1:  # here, in this process
        assert got == [{"threads": torch.get_num_threads(), "progress": True}] * 3
    else:  # spawned workers, each with its share of the threads, bars off
        assert got == [{"threads": max(1, torch.get_num_threads() // 2), "progress": False}] * 3
    with pytest.raises(RuntimeError if workers > 1 else ValueError,
                       match="training y failed: ValueError: this run is broken" if workers > 1 else "broken"):
        train_jobs([TrainJob("x", _job, (tmp_path / "x",)), TrainJob("y", _job, (tmp_path / "y", (), True))],
                   workers, progress=False)
    if workers > 1:  # a failure stops the run beside it at once, and starts nothing new
        import multiprocessing

        with pytest.raises(RuntimeError, match="training bad failed"):
            train_jobs([TrainJob("slow", _job, (tmp_path / "slow", (), False, 120.0)),
                        TrainJob("bad", _job, (tmp_path / "bad", (), True)),
                        TrainJob("later", _job, (tmp_path / "later",))], workers, progress=False)
        assert multiprocessing.active_children() == []
        assert not (tmp_path / "slow").exists() and not (tmp_path / "later").exists()
    # a run already in the cache (its out folder finished) is only checked, here, not in a process of
    # its own; one reading a finished teacher but not finished itself is trained in its own process
    import os

    teacher, done, fresh = tmp_path / "teacher", tmp_path / "done", tmp_path / "fresh"
    for d in (teacher, done, fresh):
        d.mkdir()
    for d in (teacher, done):
        (d / "flashdistill.json").write_text("{}")
    train_jobs([TrainJob("done", _check_job, (teacher, done), done),
                TrainJob("fresh", _check_job, (teacher, fresh), fresh, after=("done",))], workers, progress=False)
    assert (done / "checked").read_text() == str(os.getpid())
    assert ((fresh / "checked").read_text() == str(os.getpid())) == (workers == 1)
    # a run stopped by a signal (checkpoint saved) stops the benchmark as an interrupt, not a failure
    from flashdistill.train import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="signal 15 at step 5"):
        train_jobs([TrainJob("i", _job, (tmp_path / "i", (), False, 0.0, True))], workers, progress=False)
    with pytest.raises(ValueError, match="cycle"):
        train_jobs([TrainJob("p", _job, (tmp_path / "p",), after=("q",)),
                    TrainJob("q", _job, (tmp_path / "q",), after=("p",))], workers, progress=False)
    with pytest.raises(ValueError, match="unknown dependencies"):
        train_jobs([TrainJob("p", _job, (tmp_path / "p",), after=("z",))], workers, progress=False)


def test_ablation_runs_are_the_cache_keys_each_once_slowest_first():
    from flashdistill.config import merge

    preset = benchmark.PRESETS["ablations"]
    runs = benchmark.ablation_runs(preset)
    wanted = {benchmark.flash_key(preset.teacher, merge(benchmark.ablation_overrides(preset, variant), {"train": {"seed": seed}}))
              for seed in preset.ablation_seeds for _, variants in benchmark.ABLATIONS for _, variant, _ in variants}
    assert set(runs) == wanted
    # 13 distinct configs (the baseline is shared by five groups) times the seeds
    assert len(runs) == 13 * len(preset.ablation_seeds)
    grids = [over.get("K", 16) for over in runs.values()]
    assert grids == sorted(grids, reverse=True) and grids[0] == 64
