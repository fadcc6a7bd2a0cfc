import json
import re

import numpy as np
import pytest
from PIL import Image

from flashdistill.cli import main


def _exit(argv, capsys):
    """Run ``main`` expecting argparse to exit; returns (code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def _run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------- help


def test_top_level_help(capsys):
    code, out, _ = _exit(["--help"], capsys)
    assert code == 0
    for cmd in ("train-teacher", "sample", "evaluate"):
        assert cmd in out


def test_no_command_is_an_error(capsys):
    code, _, err = _exit([], capsys)
    assert code == 2 and "required" in err


@pytest.mark.parametrize("cmd, options", [
    ("train-teacher", ["--dataset", "--out", "--steps", "--seed", "--config", "--set", "--resume", "--dry-run",
                       "train.batch_size", "train.checkpoint_every", "prompt_dropout", "channels"]),
    ("sample", ["--model", "--prompt", "--steps", "--guidance", "--sampler", "--seed", "--num-images", "--out", "--npz"]),
    ("evaluate", ["--model", "--steps", "--guidance", "--sampler", "--num-samples", "--teacher", "--teacher-guidance"]),
])
def test_subcommand_help(cmd, options, capsys):
    code, out, _ = _exit([cmd, "--help"], capsys)
    assert code == 0
    for opt in options:
        assert opt in out, opt


# ---------------------------------------------------------------------------------- bad inputs


def _clean_error(err, *needles):
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def test_unknown_dataset(tmp_path, capsys):
    out_dir = tmp_path / "X"
    rc, _, err = _run(["train-teacher", "--dataset", "nope", "--out", str(out_dir), "--dry-run"], capsys)
    assert rc == 2
    _clean_error(err, "'nope'", "train-teacher: error")
    assert not out_dir.exists()


def test_sample_missing_model(tmp_path, capsys):
    missing = tmp_path / "no_such_teacher"
    rc, _, err = _run(["sample", "--model", str(missing), "--prompt", "7", "--out", str(tmp_path / "g.png")], capsys)
    assert rc == 2
    _clean_error(err, str(missing), "does not exist")
    assert not (tmp_path / "g.png").exists()


def test_model_folder_without_meta(tmp_path, capsys):
    rc, _, err = _run(["evaluate", "--model", str(tmp_path)], capsys)
    assert rc == 2
    _clean_error(err, str(tmp_path), "flashdistill.json")


@pytest.mark.parametrize("argv", [
    ["train-teacher", "--out", "X", "--steps", "0"],
    ["train-teacher", "--out", "X", "--steps", "-1"],
    ["sample", "--model", "M", "--prompt", "p", "--out", "g.png", "--steps", "0"],
    ["sample", "--model", "M", "--prompt", "p", "--out", "g.png", "--steps", "-1"],
    ["sample", "--model", "M", "--prompt", "p", "--out", "g.png", "--num-images", "0"],
    ["evaluate", "--model", "M", "--steps", "4", "0"],
])
def test_non_positive_integers_rejected(argv, capsys):
    code, _, err = _exit(argv, capsys)
    assert code == 2
    _clean_error(err, "expected a positive integer")


@pytest.mark.parametrize("value, message", [("abc", "expected a number, got 'abc'"), ("nan", "expected a finite number"),
                                            ("inf", "expected a finite number")])
def test_bad_guidance(value, message, capsys):
    code, _, err = _exit(["sample", "--model", "M", "--prompt", "p", "--out", "g.png", "--guidance", value], capsys)
    assert code == 2
    _clean_error(err, message)


def test_bad_sampler(capsys):
    code, _, err = _exit(["sample", "--model", "M", "--prompt", "p", "--out", "g.png", "--sampler", "heun"], capsys)
    assert code == 2 and "invalid choice" in err


@pytest.mark.parametrize("pairs, needle", [
    (["train.nope=1"], "train.nope"),
    (["bogus=1"], "bogus"),
    (["train.steps=abc"], "train.steps: got 'abc'"),
    (["train.steps"], "key=value"),
    (["beta_schedule=cosine"], "'cosine'"),
])
def test_bad_set(pairs, needle, tmp_path, capsys):
    argv = ["train-teacher", "--out", str(tmp_path / "X"), "--dry-run"]
    for p in pairs:
        argv += ["--set", p]
    rc, out, err = _run(argv, capsys)
    assert rc == 2 and out == ""
    _clean_error(err, needle)


def test_set_scalar_for_section(tmp_path, capsys):
    rc, _, err = _run(["train-teacher", "--out", str(tmp_path / "X"), "--dry-run", "--set", "train=5"], capsys)
    assert rc == 2
    _clean_error(err, "train")


def test_missing_config_file(tmp_path, capsys):
    rc, _, err = _run(["train-teacher", "--out", str(tmp_path / "X"), "--dry-run",
                       "--config", str(tmp_path / "nope.yaml")], capsys)
    assert rc == 2
    _clean_error(err, "nope.yaml", "does not exist")


# ------------------------------------------------------------------------------------ dry runs


def test_dry_run_prints_resolved_config(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("channels: [16, 32]\nlr: 0.01\ntrain:\n  log_every: 3\n")
    rc, out, err = _run(["train-teacher", "--out", str(tmp_path / "X"), "--dry-run", "--config", str(cfg_file),
                         "--steps", "5", "--seed", "3", "--set", "prompt_dropout=0.2"], capsys)
    assert rc == 0
    cfg = json.loads(out)
    assert cfg["channels"] == [16, 32] and cfg["lr"] == 0.01 and cfg["prompt_dropout"] == 0.2
    assert cfg["train"]["steps"] == 5 and cfg["train"]["seed"] == 3 and cfg["train"]["log_every"] == 3
    assert not (tmp_path / "X").exists()


def test_dry_run_defaults(tmp_path, capsys):
    rc, out, _ = _run(["train-teacher", "--out", str(tmp_path / "X"), "--dry-run"], capsys)
    assert rc == 0
    cfg = json.loads(out)
    assert cfg["dataset"] == "digits" and cfg["train"]["steps"] == 950


def test_dry_run_set_one_train_key_keeps_teacher_defaults(tmp_path, capsys):
    rc, out, _ = _run(["train-teacher", "--out", str(tmp_path / "X"), "--dry-run", "--set", "train.batch_size=8"], capsys)
    assert rc == 0
    cfg = json.loads(out)
    assert cfg["train"]["batch_size"] == 8 and cfg["train"]["steps"] == 950


# ------------------------------------------------------------------------- with a tiny teacher


def _sample(teacher, tmp_path, capsys, name, *extra, prompt="the number 7"):
    png, npz = tmp_path / f"{name}.png", tmp_path / f"{name}.npz"
    rc, out, err = _run(["sample", "--model", str(teacher), "--prompt", prompt, "--out", str(png),
                         "--npz", str(npz), *extra], capsys)
    assert rc == 0, err
    assert f"wrote {png}" in out and f"wrote {npz}" in out
    with np.load(npz) as z:
        return png, z["images"], z["prompts"]


def test_sample_writes_png_and_npz(tiny_teacher, tmp_path, capsys):
    png, images, prompts = _sample(tiny_teacher, tmp_path, capsys, "g",
                                   "--steps", "3", "--num-images", "3", "--seed", "5")
    assert images.dtype == np.float32 and images.shape == (3, 1, 8, 8)
    assert np.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert prompts.shape == (3,) and prompts.tolist() == ["the number 7"] * 3
    assert not np.allclose(images[0], images[1])  # different seeds, different images
    with Image.open(png) as im:
        assert im.size == ((3 * 9 + 1) * 8, (1 * 9 + 1) * 8)  # 3 tiles in a row, 8x upscaled
        assert len(np.unique(np.asarray(im))) > 2

    # image i uses seed S + i, whatever --num-images is
    _, single, _ = _sample(tiny_teacher, tmp_path, capsys, "one", "--steps", "3", "--num-images", "1", "--seed", "6")
    assert single.shape == (1, 1, 8, 8)
    # (up to float rounding: the UNet's kernels differ with the batch size, and CFG amplifies that)
    np.testing.assert_allclose(single[0], images[1], atol=2e-4)
    assert np.abs(single[0] - images[0]).max() > 0.1 and np.abs(single[0] - images[2]).max() > 0.1


def test_sample_guidance_changes_output(tiny_teacher, tmp_path, capsys):
    common = ["--steps", "3", "--num-images", "2", "--seed", "0"]
    _, g1, _ = _sample(tiny_teacher, tmp_path, capsys, "g1", *common, "--guidance", "1")
    _, g8, _ = _sample(tiny_teacher, tmp_path, capsys, "g8", *common, "--guidance", "8")
    assert np.abs(g1 - g8).max() > 1e-3
    _, other, _ = _sample(tiny_teacher, tmp_path, capsys, "p", *common, "--guidance", "1", prompt="the number 2")
    assert np.abs(g1 - other).max() > 1e-4  # the prompt conditions the output


def test_sample_default_guidance_is_the_teachers(tiny_teacher, tmp_path, capsys):
    meta = json.loads((tiny_teacher / "flashdistill.json").read_text())
    common = ["--steps", "3", "--num-images", "2", "--seed", "0"]
    _, default, _ = _sample(tiny_teacher, tmp_path, capsys, "d", *common)
    _, explicit, _ = _sample(tiny_teacher, tmp_path, capsys, "e", *common, "--guidance", str(meta["default_guidance"]))
    np.testing.assert_allclose(default, explicit, atol=1e-6)


def test_sample_and_evaluate_guidance_interval(tiny_teacher, tmp_path, capsys):
    """--guidance-interval LO HI reaches the teacher's sampler (sample_teacher's interval itself is
    tested in test_flash.py): sample gives sample_teacher's images, evaluate the scores of the same
    images; a reversed or negative interval is refused naming the flag."""
    from flashdistill.models.loading import load_model
    from flashdistill.sample import sample_teacher

    _, part, _ = _sample(tiny_teacher, tmp_path, capsys, "part", "--steps", "3", "--num-images", "2", "--seed", "0",
                         "--guidance", "4", "--guidance-interval", "0", "500")
    direct = sample_teacher(load_model(tiny_teacher), ["the number 7"] * 2, [0, 1], 3, 4.0, guidance_interval=(0, 500))
    np.testing.assert_allclose(part, direct.clamp(-1, 1).numpy(), atol=1e-6)

    def fd(*extra):
        rc, out, err = _run(["evaluate", "--model", str(tiny_teacher), "--steps", "3", "--num-samples", "10", *extra],
                            capsys)
        assert rc == 0, err
        return float(re.search(r"steps +3 +FD (\S+)", out).group(1))

    # an interval holding no timestep is w = 1; one holding them all is plain CFG
    assert fd("--guidance", "4", "--guidance-interval", "1000", "2000") == fd("--guidance", "1")
    assert fd("--guidance", "4", "--guidance-interval", "0", "999") == fd("--guidance", "4") != fd("--guidance", "1")
    rc, _, err = _run(["sample", "--model", str(tiny_teacher), "--prompt", "the number 7", "--out",
                       str(tmp_path / "bad.png"), "--guidance-interval", "500", "100"], capsys)
    assert rc != 0 and "--guidance-interval 500 100: expected LO <= HI" in err and "Traceback" not in err
    code, _, err = _exit(["evaluate", "--model", str(tiny_teacher), "--guidance-interval", "-1", "5"], capsys)
    assert code == 2 and "--guidance-interval" in err


def test_evaluate_refuses_real_model_flags_on_a_digits_model(tiny_teacher, capsys, tmp_path):
    """A flag that does not apply is refused with its name, not silently ignored."""
    rc, out, err = _run(["evaluate", "--model", str(tiny_teacher), "--prompts", str(tmp_path / "missing.txt"),
                         "--steps", "2", "--num-samples", "4"], capsys)
    assert rc != 0 and "--prompts" in err and "digits model" in err and "Traceback" not in err
    assert "FD" not in out


def test_evaluate_seed_set_is_a_count(tiny_teacher, capsys):
    code, _, err = _exit(["evaluate", "--model", str(tiny_teacher), "--seed-set", "-1"], capsys)
    assert code == 2 and "--seed-set: expected an integer >= 0, got -1" in err


def test_evaluate_against_itself(tiny_teacher, capsys, tmp_path):
    rc, out, err = _run(["evaluate", "--model", str(tiny_teacher), "--teacher", str(tiny_teacher),
                         "--steps", "2", "32", "--num-samples", "12", "--out", str(tmp_path / "e.json")], capsys)
    assert rc == 0, err
    assert re.search(r"FD floor \(real train digits vs test digits\): \d+\.\d{3} at 12 samples", out)
    rows = re.findall(r"steps +(\d+) +FD (\S+) +pixel FD (\S+) +hist (\S+) +adherence (\S+) +teacher_mse (\S+)", out)
    assert [r[0] for r in rows] == ["2", "32"]
    for _, fd, pix, hist, adh, _ in rows:
        assert np.isfinite(float(fd)) and 0.0 <= float(adh) <= 1.0
        assert float(pix) >= 0.0 and 0.0 <= float(hist) <= 1.0
    # the 32-step row is the reference itself (same seeds, prompts, guidance and solver)
    assert float(rows[1][5]) == 0.0 and float(rows[0][5]) > 0.0
    saved = json.loads((tmp_path / "e.json").read_text())  # --out: the same rows as JSON
    assert [r["steps"] for r in saved["rows"]] == [2, 32] and saved["num_samples"] == 12
    assert {"fd", "pixel_fd", "hist", "adherence", "teacher_mse"} <= set(saved["rows"][0])
    assert saved["rows"][1]["teacher_mse"] == 0.0 and saved["pixel_fd_floor"] > 0


def test_train_teacher_end_to_end(tmp_path, capsys):
    from flashdistill.models.loading import load_model

    out_dir = tmp_path / "teacher"
    argv = ["train-teacher", "--out", str(out_dir), "--steps", "2", "--set", "channels=[8,16]",
            "--set", "train.batch_size=4", "--set", "train.log_every=1"]
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    assert f"teacher written to {out_dir}" in out
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["channels"] == [8, 16] and cfg["train"]["steps"] == 2 and cfg["train"]["batch_size"] == 4
    assert len((out_dir / "log.jsonl").read_text().splitlines()) == 2
    model = load_model(out_dir)
    assert list(model.denoiser.backbone.config.block_out_channels) == [8, 16]


def test_an_interrupted_benchmark_says_a_rerun_resumes_it(monkeypatch, tmp_path, capsys):
    """The benchmark has no --resume: its runs resume from the cache when the command runs again."""
    from flashdistill import benchmark
    from flashdistill.train import TrainingInterrupted

    def stopped(*args, **kwargs):
        raise TrainingInterrupted(7, 2)

    monkeypatch.setattr(benchmark, "run_benchmark", stopped)
    assert main(["benchmark", "--preset", "quick", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted by signal 2 at step 7; checkpoint saved, run the same command again to resume" in err
    assert "--resume" not in err
