"""``flashdistill app`` end to end in headless Chromium (Playwright driving Debian's chromium):
type a prompt, click generate, and check that both images are this run's, pixel for pixel what
``flashdistill sample`` gives with the same seed. Gradio, Playwright and chromium are installed by
scripts/test.sh; a missing one fails this test instead of skipping it."""
import io
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import app_check  # noqa: E402


def _pixels(png: bytes, scale: int) -> np.ndarray:
    from PIL import Image

    im = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    return im[::scale, ::scale]


def test_app_compares_student_and_teacher_in_a_browser(tiny_teacher, tmp_path):
    import importlib

    for name in ("gradio", "playwright"):  # installed by scripts/test.sh: fail, do not skip
        importlib.import_module(name)

    import flashdistill as fd
    from flashdistill.app import display_scale
    from flashdistill.cli import main

    app_check.chromium()
    run = fd.distill(tiny_teacher, tmp_path / "run", overrides={"K": 8, "phase_steps": [1, 1, 1]},
                     steps=2, batch_size=4, progress=False)
    port = app_check.free_port()
    proc = app_check.serve(str(run), port)
    try:
        got = app_check.drive(f"http://127.0.0.1:{port}/", "a handwritten digit seven", 3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    scale = display_scale(8)
    # the student's image is `flashdistill sample --seed 3 --steps 2`'s first image
    npz = tmp_path / "s.npz"
    assert main(["sample", "--model", str(run), "--prompt", "a handwritten digit seven", "--steps", "2", "--seed", "3",
                 "--num-images", "1", "--out", str(tmp_path / "s.png"), "--npz", str(npz)]) == 0
    want = np.round((np.load(npz)["images"][0, 0].clip(-1, 1) + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(_pixels(got["student_png"], scale), want)
    # and the teacher's is the teacher at 32 steps, same seed
    assert main(["sample", "--model", str(tiny_teacher), "--prompt", "a handwritten digit seven", "--steps", "32",
                 "--seed", "3", "--num-images", "1", "--out", str(tmp_path / "t.png"), "--npz", str(npz)]) == 0
    want_t = np.round((np.load(npz)["images"][0, 0].clip(-1, 1) + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(_pixels(got["teacher_png"], scale), want_t)
    assert not np.array_equal(want, want_t)
    assert "student" in got["latency"] and "teacher" in got["latency"] and "ms" in got["latency"]


def test_app_needs_a_model_folder(tmp_path, capsys):
    from flashdistill.cli import main

    assert main(["app", "--model", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["0", "70000", "x"])
def test_app_rejects_bad_ports(port, capsys):
    from flashdistill.cli import main

    with pytest.raises(SystemExit):
        main(["app", "--model", "x", "--port", port])
    assert "expected a port" in capsys.readouterr().err
