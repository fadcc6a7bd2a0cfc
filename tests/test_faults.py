"""Injected faults: corrupted or truncated checkpoint files, a full disk during a save, non-finite
losses. Each must be detected, named, and leave a resumable run."""
import json

import pytest
import torch

import flashdistill.checkpoint as ckpt
from flashdistill.train import NonFiniteLoss, train

STEPS = 4


def _weights(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _cheap(method):
    method.preview = lambda models, generator: (torch.zeros(2, 1, 8, 8), 2)
    return method


@pytest.fixture(scope="module")
def unbroken(make_method, digits_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken")
    method = _cheap(make_method(init_seed=0, steps=STEPS, checkpoint_every=1, keep_checkpoints=3, log_every=1))
    train(method, digits_train, out, progress=False)
    return {"out": out, "final": _weights(method.unet)}


def _corruptions(path):
    data = path.read_bytes()
    yield "truncated", data[: len(data) // 2]
    yield "one byte flipped", data[:-1] + bytes([data[-1] ^ 0xFF])
    yield "emptied", b""


def test_every_injected_corruption_of_every_checkpoint_file_is_detected(unbroken, tmp_path):
    import shutil

    src = ckpt.latest(unbroken["out"] / "checkpoints")
    assert ckpt.verify(src) == []
    files = sorted(p.name for p in src.iterdir() if p.name != ckpt.CHECKSUM_FILE)
    assert {"unet.safetensors", "unet.optim.safetensors", "unet.optim.json", "state.json"} <= set(files)
    injected = detected = 0
    for name in files:
        for kind, data in _corruptions(src / name):
            d = tmp_path / f"{name}-{kind}".replace(" ", "_")
            shutil.copytree(src, d)
            (d / name).write_bytes(data)
            injected += 1
            problems = ckpt.verify(d)
            detected += any(name in p for p in problems)
        d = tmp_path / f"{name}-missing"
        shutil.copytree(src, d)
        (d / name).unlink()
        injected += 1
        detected += any(name in p for p in ckpt.verify(d))
    assert injected >= 4 * len(files) and detected == injected


def test_resume_skips_a_corrupted_latest_checkpoint(make_method, digits_train, unbroken, tmp_path, capsys):
    """The newest checkpoint is truncated: resume warns naming it, falls back to the one before, and
    still ends exactly where the unbroken run ends."""
    import shutil

    shutil.copytree(unbroken["out"] / "checkpoints", tmp_path / "checkpoints")
    # keep steps 2 and 3 only, as if the run had been killed after step 3
    root = tmp_path / "checkpoints"
    shutil.rmtree(root / "step_00000004")
    (root / "latest.json").write_text(json.dumps({"step": 3, "dir": "step_00000003"}))
    bad = root / "step_00000003" / "unet.optim.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    found, warnings = ckpt.latest_valid(root)
    assert found == root / "step_00000002"
    assert any("step_00000003" in w and "unet.optim.safetensors" in w for w in warnings)
    method = _cheap(make_method(init_seed=9, steps=STEPS, checkpoint_every=1, keep_checkpoints=3, log_every=1))
    train(method, digits_train, tmp_path, resume=True, progress=False)
    out = capsys.readouterr().out
    assert "step_00000003" in out and "corrupt" in out and "resumed from" in out and "step_00000002" in out
    for k, v in unbroken["final"].items():
        assert torch.equal(_weights(method.unet)[k], v), k


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(make_method, digits_train, tmp_path, monkeypatch):
    import errno

    real = ckpt.save_file_tensors
    calls = []

    def full(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's weights
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file_tensors", full)
    method = _cheap(make_method(init_seed=0, steps=STEPS, checkpoint_every=2, keep_checkpoints=2, log_every=1))
    with pytest.raises(OSError) as e:
        train(method, digits_train, tmp_path, progress=False)
    assert e.value.errno == errno.ENOSPC
    found, warnings = ckpt.latest_valid(tmp_path / "checkpoints")
    assert found.name == "step_00000002" and warnings == [] and ckpt.verify(found) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_naming_the_term_and_step(make_method, digits_train, tmp_path, value):
    method = _cheap(make_method(init_seed=0, steps=STEPS, checkpoint_every=1, keep_checkpoints=3, log_every=1))
    real_step = method.step

    def poisoned(batch, step, models, generator):
        losses, logs = real_step(batch, step, models, generator)
        if step == 2:
            logs = {**logs, "loss": torch.tensor(value)}
            losses = [(n, loss * value) for n, loss in losses]
        return losses, logs

    method.step = poisoned
    with pytest.raises(NonFiniteLoss, match=r"step 3.*'loss'") as e:
        train(method, digits_train, tmp_path, progress=False)
    assert e.value.step == 3 and "loss" in e.value.terms
    # the last good checkpoint (step 2) is kept, complete, and nothing later was written
    found, warnings = ckpt.latest_valid(tmp_path / "checkpoints")
    assert found.name == "step_00000002" and not warnings
    assert not (tmp_path / "checkpoints" / "step_00000003").exists()


def test_nonfinite_loss_skip_policy_skips_the_step(make_method, digits_train, tmp_path):
    method = _cheap(make_method(init_seed=0, steps=STEPS, checkpoint_every=2, log_every=1, on_nonfinite="skip"))
    real_step = method.step

    def poisoned(batch, step, models, generator):
        losses, logs = real_step(batch, step, models, generator)
        if step == 1:
            losses = [(n, loss * float("nan")) for n, loss in losses]
        return losses, logs

    method.step = poisoned
    train(method, digits_train, tmp_path, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert logs[1].get("skipped_nonfinite") == 1 and all("skipped_nonfinite" not in r for r in (logs[0], logs[2], logs[3]))
    assert all(torch.isfinite(p).all() for p in method.unet.parameters())


def test_on_nonfinite_rejects_unknown_policy(make_method):
    with pytest.raises(ValueError, match="on_nonfinite"):
        make_method(on_nonfinite="ignore")
