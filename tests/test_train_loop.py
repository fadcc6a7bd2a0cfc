import json
import math
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import flashdistill.checkpoint as ckpt
from flashdistill.config import to_dict
from flashdistill.train import DeterministicBatches, TrainingInterrupted, train

STEPS = 6


def _weights(unet) -> dict:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _assert_same_weights(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"weights differ by up to {worst}"


def _cheap_preview(method):
    """The end-of-run preview (40 images x 32 steps x CFG) is covered once by ``reference_run``;
    other runs skip it to keep the suite fast."""
    method.preview = lambda models, generator: (torch.zeros(2, 1, 8, 8), 2)


def _scramble(method):
    """Move every weight far from anything a run produces, so that matching the reference after a
    resume can only come from the checkpoint."""
    with torch.no_grad():
        for p in method.unet.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_run(make_method, digits_train, tmp_path_factory):
    """An unbroken 6-step run that checkpoints every step and keeps 2 checkpoints."""
    out = tmp_path_factory.mktemp("reference_run")
    method = make_method(init_seed=0, steps=STEPS, checkpoint_every=1, keep_checkpoints=2, log_every=1)
    init = _weights(method.unet)
    summary = train(method, digits_train, out, progress=False)
    return {"out": out, "method": method, "init": init, "final": _weights(method.unet), "summary": summary}


def test_training_changes_weights(reference_run):
    assert reference_run["summary"]["steps"] == STEPS
    worst = max(float((reference_run["final"][k] - reference_run["init"][k]).abs().max()) for k in reference_run["init"])
    assert worst > 1e-4


def test_resume_after_interrupt_matches_unbroken_run(make_method, digits_train, reference_run, tmp_path):
    """Same config (steps=6); the first process is stopped by SIGINT during step 3, saves a
    checkpoint at step 3 and raises; a fresh process-like method object resumes to step 6."""
    first = make_method(init_seed=0, steps=STEPS, checkpoint_every=1, keep_checkpoints=2, log_every=1)
    _cheap_preview(first)
    _assert_same_weights(_weights(first.unet), reference_run["init"], atol=0)  # same init as the reference
    inner = first.step

    def step_then_signal(batch, step, models, generator):
        out = inner(batch, step, models, generator)
        if step == 2:
            signal.raise_signal(signal.SIGINT)
        return out

    first.step = step_then_signal
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as e:
        train(first, digits_train, tmp_path, progress=False)
    assert e.value.step == 3 and e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    found = ckpt.latest(tmp_path / "checkpoints")
    assert found is not None and found.name == "step_00000003"
    assert json.loads((found / "state.json").read_text()) == {"step": 3, "total_steps": 6}
    assert not (tmp_path / "flashdistill.json").exists()  # not finalized

    second = make_method(init_seed=99, steps=STEPS, checkpoint_every=1, keep_checkpoints=2, log_every=1)
    _cheap_preview(second)
    _scramble(second)
    fresh = _weights(second.unet)
    assert max(float((fresh[k] - reference_run["init"][k]).abs().max()) for k in fresh) > 1e-3
    summary = train(second, digits_train, tmp_path, resume=True, progress=False)
    assert summary["steps"] == STEPS
    _assert_same_weights(_weights(second.unet), reference_run["final"], atol=0)  # bit for bit

    # the log continues where it stopped and every resumed loss equals the unbroken run's exactly
    log, ref = _log(tmp_path), _log(reference_run["out"])
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert [(r["loss"], r["grad_norm/unet"]) for r in log] == [(r["loss"], r["grad_norm/unet"]) for r in ref]


def test_resume_without_checkpoint_starts_from_zero(make_method, digits_train, reference_run, tmp_path, capsys):
    method = make_method(init_seed=0, steps=STEPS, checkpoint_every=1, keep_checkpoints=2, log_every=1)
    _cheap_preview(method)
    train(method, digits_train, tmp_path, resume=True, progress=False)
    assert "no checkpoint" in capsys.readouterr().out
    _assert_same_weights(_weights(method.unet), reference_run["final"], atol=0)


def test_checkpoints_are_safetensors_and_pruned(reference_run):
    root = reference_run["out"] / "checkpoints"
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert dirs == ["step_00000005", "step_00000006"]  # keep_checkpoints=2, nothing staged left over
    assert json.loads((root / "latest.json").read_text()) == {"step": 6, "dir": "step_00000006"}
    assert ckpt.latest(root) == root / "step_00000006"
    last = root / "step_00000006"
    assert sorted(p.name for p in last.iterdir()) == [
        "checksums.json", "rng_rank0.safetensors", "state.json", "unet.ema.safetensors", "unet.optim.json",
        "unet.optim.safetensors", "unet.safetensors"]
    assert ckpt.verify(last) == [] and set(json.loads((last / "checksums.json").read_text())) == {
        p.name for p in last.iterdir() if p.name != "checksums.json"}
    final = reference_run["final"]
    with safe_open(str(last / "unet.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert keys == {n for n, p in reference_run["method"].unet.named_parameters() if p.requires_grad}
    # the finished model holds the EMA weights (the checkpoint keeps raw and EMA weights apart)
    with safe_open(str(last / "unet.ema.safetensors"), "pt") as f:
        assert set(f.keys()) == keys
        for k in keys:
            assert torch.equal(f.get_tensor(k), final[k])
    with safe_open(str(last / "unet.optim.safetensors"), "pt") as f:
        assert any(k.endswith(".exp_avg") for k in f.keys()) and any(k.endswith(".exp_avg_sq") for k in f.keys())
    assert json.loads((last / "state.json").read_text()) == {"step": 6, "total_steps": 6}


def test_optimizer_round_trip(tmp_path):
    """The saved AdamW state loads into a new optimizer and equals what was saved."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(5, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    ckpt.save_optimizer(opt, tmp_path / "o.optim")
    opt2 = torch.optim.AdamW(net.parameters(), lr=5.0)
    ckpt.load_optimizer(opt2, tmp_path / "o.optim")
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["weight_decay"] == 0.1
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys() and len(s1) == 4
    for i in s1:
        assert s1[i].keys() == s2[i].keys()
        for k in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k])), (i, k)


def test_restored_state_equals_live_state_field_by_field(tmp_path):
    """Optimizer state, EMA-style tensors and every RNG stream, right after a load: values bit for
    bit, and dtype, shape, strides, device, contiguity and 64-byte alignment as the live ones."""
    import random

    import numpy as np

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3), torch.nn.Flatten(), torch.nn.Linear(5 * 36, 7))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.1)
    for _ in range(3):
        net(torch.randn(4, 1, 8, 8)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    ckpt.save_optimizer(opt, tmp_path / "o.optim")
    opt2 = torch.optim.AdamW(net.parameters(), lr=5.0)
    ckpt.load_optimizer(opt2, tmp_path / "o.optim")
    assert ckpt.state_differences(opt.state_dict(), opt2.state_dict()) == []

    ema = {n: p.detach().clone() for n, p in net.named_parameters()}
    ckpt.save_file_tensors(ema, tmp_path / "ema.safetensors")
    assert ckpt.state_differences(ema, ckpt.load_file_tensors(tmp_path / "ema.safetensors")) == []

    gen = torch.Generator().manual_seed(3)
    torch.randn(5, generator=gen), random.random(), np.random.rand(), random.gauss(0, 1)
    ckpt.save_rng(gen, tmp_path / "rng.safetensors")
    live = [torch.randn(4, generator=gen), torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(3).tolist()]
    gen2 = torch.Generator().manual_seed(99)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    ckpt.load_rng(gen2, tmp_path / "rng.safetensors")
    restored = [torch.randn(4, generator=gen2), torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(3).tolist()]
    assert ckpt.state_differences(live, restored) == []


def test_state_differences_reports_each_field():
    a = torch.arange(6.0)
    buf = torch.zeros(7)
    shifted = buf[1:].copy_(a)  # same values, 4 bytes off the allocator's alignment
    diffs = ckpt.state_differences({"x": a, "y": 1}, {"x": shifted, "y": 2})
    assert any("aligned64" in d for d in diffs) and any(d.startswith("y:") for d in diffs)
    assert any("values differ" in d for d in ckpt.state_differences(a, a + 1e-7))
    assert any("dtype" in d for d in ckpt.state_differences(a, a.double()))


def test_crash_during_save_keeps_previous_checkpoint(make_method, digits_train, reference_run, tmp_path, monkeypatch):
    class Crash(RuntimeError):
        pass

    real_save_optimizer = ckpt.save_optimizer
    calls = []

    def flaky_save_optimizer(opt, path):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint (step 4): weights already staged, optimizer not
            raise Crash("disk full")
        return real_save_optimizer(opt, path)

    monkeypatch.setattr(ckpt, "save_optimizer", flaky_save_optimizer)
    method = make_method(init_seed=0, steps=STEPS, checkpoint_every=2, keep_checkpoints=1, log_every=1)
    _cheap_preview(method)
    with pytest.raises(Crash):
        train(method, digits_train, tmp_path, progress=False)
    monkeypatch.setattr(ckpt, "save_optimizer", real_save_optimizer)

    root = tmp_path / "checkpoints"
    assert json.loads((root / "latest.json").read_text()) == {"step": 2, "dir": "step_00000002"}
    found = ckpt.latest(root)
    assert found == root / "step_00000002"
    assert not (root / "step_00000004").exists()
    assert (root / ".tmp_step_00000004").is_dir()  # the half-written stage, never committed
    # the previous checkpoint is complete and loadable
    probe = make_method(init_seed=5, steps=STEPS)
    ckpt.load_trainable(probe.unet, ckpt.load_file_tensors(found / "unet.safetensors"))
    opt = torch.optim.AdamW(probe.unet.parameters(), lr=1.0)
    ckpt.load_optimizer(opt, found / "unet.optim")
    assert len(opt.state_dict()["state"]) == len(list(probe.unet.parameters()))
    assert json.loads((found / "state.json").read_text()) == {"step": 2, "total_steps": STEPS}

    # resuming from it (through the stale stage) reproduces the unbroken run
    resumed = make_method(init_seed=7, steps=STEPS, checkpoint_every=2, keep_checkpoints=1, log_every=1)
    _cheap_preview(resumed)
    _scramble(resumed)
    train(resumed, digits_train, tmp_path, resume=True, progress=False)
    _assert_same_weights(_weights(resumed.unet), reference_run["final"], atol=0)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000006"]


def test_crash_during_commit_keeps_latest(tmp_path, monkeypatch):
    """A crash after staging but before the rename leaves ``latest`` on the old checkpoint."""
    root = tmp_path
    for step in (1, 2):
        stage = ckpt.staging_dir(root, step)
        stage.mkdir()
        (stage / "state.json").write_text(json.dumps({"step": step}))
        if step == 2:
            def boom(*a, **k):
                raise OSError("power cut")

            monkeypatch.setattr(ckpt.os, "replace", boom)
            with pytest.raises(OSError):
                ckpt.commit(root, step, keep=2)
            monkeypatch.undo()
        else:
            ckpt.commit(root, step, keep=2)
    assert ckpt.latest(root) == root / "step_00000001"
    assert json.loads((ckpt.latest(root) / "state.json").read_text()) == {"step": 1}


def test_commit_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 10):
        ckpt.staging_dir(tmp_path, step).mkdir()
        ckpt.commit(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000003", "step_00000010"]
    assert ckpt.latest(tmp_path) == tmp_path / "step_00000010"
    assert ckpt.latest(tmp_path / "nowhere") is None


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"idx": torch.tensor(i), "name": f"item{i}"}


def test_batches_depend_only_on_step_and_micro():
    ds = _Indexed(10)
    a = DeterministicBatches(ds, batch_size=3, grad_accum=2, seed=4, rank=0, world=1)
    in_order = {(s, m): a.get(s, m)["idx"].tolist() for s in range(7) for m in range(2)}
    b = DeterministicBatches(ds, batch_size=3, grad_accum=2, seed=4, rank=0, world=1)
    for key in reversed(list(in_order)):
        assert b.get(*key)["idx"].tolist() == in_order[key]
    batch = b.get(0, 0)
    assert batch["name"] == [f"item{i}" for i in batch["idx"].tolist()]  # non-tensors stay lists
    c = DeterministicBatches(ds, batch_size=3, grad_accum=2, seed=5, rank=0, world=1)
    assert [c.get(s, m)["idx"].tolist() for s, m in in_order] != list(in_order.values())


def test_two_ranks_get_disjoint_samples_and_cover_the_epoch():
    n, bs, accum = 24, 3, 2
    ds = _Indexed(n)
    ranks = [DeterministicBatches(ds, bs, accum, seed=1, rank=r, world=2) for r in range(2)]
    per_step = bs * accum * 2  # 12 samples per optimizer step across both ranks
    for epoch in range(2):
        seen = {0: [], 1: []}
        for step in range(epoch * n // per_step, (epoch + 1) * n // per_step):
            for micro in range(accum):
                for r in range(2):
                    seen[r] += ranks[r].get(step, micro)["idx"].tolist()
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n))  # every item exactly once per epoch
    # consecutive epochs use different orders
    assert ranks[0].get(0, 0)["idx"].tolist() != ranks[0].get(n // per_step, 0)["idx"].tolist() or \
        ranks[0].get(0, 1)["idx"].tolist() != ranks[0].get(n // per_step, 1)["idx"].tolist()


def test_epoch_covers_every_item_once_with_ragged_batches():
    n = 10
    batches = DeterministicBatches(_Indexed(n), batch_size=3, grad_accum=1, seed=0, rank=0, world=1)
    flat = [i for s in range(10) for i in batches.get(s, 0)["idx"].tolist()]  # 30 positions = 3 epochs
    for e in range(3):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n:2 * n]


def test_digits_batch_layout(digits_train):
    batch = DeterministicBatches(digits_train, 8, 1, 0, 0, 1).get(0, 0)
    assert batch["image"].shape == (8, 1, 8, 8) and batch["label"].shape == (8,)
    assert len(batch["prompt"]) == 8 and all(isinstance(p, str) for p in batch["prompt"])


def test_run_folder_contents(reference_run):
    from flashdistill.models.loading import load_model

    out, method = reference_run["out"], reference_run["method"]
    assert json.loads((out / "config.json").read_text()) == to_dict(method.config)
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    for r in log:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert math.isfinite(r["grad_norm/unet"])
    pngs = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["step_00000006.png"]
    with Image.open(pngs[0]) as im:
        # 40 previews in a 10x4 grid of 8x8 tiles with 1px borders, upscaled 4x
        assert im.size == ((10 * 9 + 1) * 4, (4 * 9 + 1) * 4)
        assert len(np.unique(np.asarray(im))) > 2
    model = load_model(out)
    assert model.meta["kind"] == "teacher" and model.image_shape == (1, 8, 8)
    assert model.meta["max_length"] == method.config.text_max_length
    _assert_same_weights(_weights(model.denoiser.backbone), reference_run["final"], atol=0)
    assert model.schedule.prediction_type == method.schedule.prediction_type


def test_train_seed_controls_initialisation(make_method, digits_train, tmp_path):
    """train.seed, not the global RNG state at construction time, decides the initial weights."""
    finals = []
    for init_seed, seed in ((1, 0), (2, 0), (1, 3)):
        method = make_method(init_seed=init_seed, steps=1, log_every=1, seed=seed)
        _cheap_preview(method)
        train(method, digits_train, tmp_path / f"{init_seed}_{seed}", progress=False)
        finals.append(_weights(method.unet))
    _assert_same_weights(finals[0], finals[1], atol=1e-6)
    assert max(float((finals[0][k] - finals[2][k]).abs().max()) for k in finals[0]) > 1e-3


def test_pack_tree_round_trips_nested_state_through_safetensors(tmp_path):
    """A replay buffer's batches (dicts of tensors, T2I-Adapter residual lists, plain values) go
    through a safetensors file and come back equal, same structure."""
    from flashdistill.checkpoint import load_file_tensors, pack_tree, save_file_tensors, unpack_tree

    image, base = torch.randn(2, 1, 8, 8), torch.randn(4, 3)
    tree = [{"x_t": torch.randn(2, 1, 8, 8), "cond": {"encoder_hidden_states": torch.randn(2, 3, 4),
                                                      "adapter": [torch.ones(2, 4), torch.zeros(2, 8)], "scale": 0.5,
                                                      "name": "sketch", "extra": None, "concat": image,
                                                      "parts": [base[:2], base[2:]]},
             "uncond": {"concat": image}}]  # one tensor in both branches; two views of one storage
    save_file_tensors(pack_tree(tree), tmp_path / "s.safetensors")
    back = unpack_tree(load_file_tensors(tmp_path / "s.safetensors"))
    assert back[0].keys() == tree[0].keys() and back[0]["cond"].keys() == tree[0]["cond"].keys()
    assert torch.equal(back[0]["x_t"], tree[0]["x_t"])
    assert all(torch.equal(a, b) for a, b in zip(back[0]["cond"]["adapter"], tree[0]["cond"]["adapter"]))
    assert (back[0]["cond"]["scale"], back[0]["cond"]["name"], back[0]["cond"]["extra"]) == (0.5, "sketch", None)
    assert back[0]["uncond"]["concat"] is back[0]["cond"]["concat"] and torch.equal(back[0]["cond"]["concat"], image)
    assert torch.equal(torch.cat(back[0]["cond"]["parts"]), base)
    with pytest.raises(TypeError, match="cannot store a object"):
        pack_tree({"bad": object()})
