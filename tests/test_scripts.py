"""The scripts in scripts/: convergence.py trains the digits preset's budgets, scaled."""
import importlib.util
from pathlib import Path

from flashdistill.methods.flash import PRESETS


def _script(name: str = "convergence"):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_points_scale_the_digits_preset_steps_and_phases_together():
    pts = _script().points([0.25, 1, 4], {1: [0, 1]})
    base = PRESETS["digits"]
    assert [(p["variant"], p["steps"], p["seed"]) for p in pts] == [
        (v, s, seed) for v in ("flash", "distill") for s, seeds in ((255, [0]), (1020, [0, 1]), (4080, [0])) for seed in seeds]
    one = next(p for p in pts if p["scale"] == 1)
    assert one["steps"] == base["train"]["steps"] and one["phase_steps"] == base["phase_steps"]
    # 4x is the digits-long preset's budget
    four = next(p for p in pts if p["scale"] == 4)
    long = PRESETS["digits-long"]
    assert four["steps"] == long["train"]["steps"] and four["phase_steps"] == long["phase_steps"]
    assert len({p["name"] for p in pts}) == len(pts)
