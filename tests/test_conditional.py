"""Conditional tasks (inpaint, sr, sketch): the condition's call contract, the task metrics, the
teachers, Flash on them, sampling and scoring with a condition, and the conditional benchmark."""
import json

import numpy as np
import pytest
import torch

from flashdistill.core.solvers import cfg_model
from flashdistill.tasks import RESIDUALS, get_task

TINY = [8, 16]


def _teacher(out, task, base=None, seed=0):
    from flashdistill.config import from_dict
    from flashdistill.methods.dsm import TeacherConfig, TeacherTraining

    cfg = from_dict(TeacherConfig, {"channels": TINY, "task": task, **({"base": str(base)} if base else {}),
                                    "train": {"batch_size": 8, "steps": 2, "seed": seed}})
    method = TeacherTraining(cfg)
    if method.adapter is not None:  # weights away from their initialisation, so the adapter visibly steers
        with torch.no_grad():
            for p in method.adapter.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    method.finalize(out, method.models())
    return out


@pytest.fixture(scope="module")
def teachers(tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("cond_teachers")
    return {t: _teacher(root / t, t, base=tiny_teacher if t == "sketch" else None) for t in ("inpaint", "sr", "sketch")}


def _digits(n=6):
    from flashdistill.data.digits import load_digits

    return load_digits("test").images[:n]


# --- tasks ------------------------------------------------------------------------------------
def test_inpaint_condition_masks_and_concat_order():
    task = get_task("inpaint")
    x = _digits(200)
    c = task.make(x, torch.Generator().manual_seed(0), train=False)
    mask = c["mask"]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    sides = mask[:, 0].amax(2).sum(1), mask[:, 0].amax(1).sum(1)  # box height and width
    assert all(((s >= 2) & (s <= 5)).all() for s in sides)
    assert torch.equal(mask.sum((1, 2, 3)), sides[0] * sides[1])  # one box, filled
    concat = task.kwargs(c)["concat"]
    assert concat.shape == (200, 2, 8, 8)
    assert torch.equal(concat[:, :1], mask)  # [mask, masked image] after x_t, as diffusers' inpaint UNet
    assert torch.equal(concat[:, 1:], x * (1 - mask))  # masked pixels are 0 (mid grey)
    full = task.make(x, torch.Generator().manual_seed(0), train=True)["mask"].sum((1, 2, 3)) == 64
    assert 5 <= int(full.sum()) <= 40  # about 10% whole-image masks in training (200 draws)


def test_task_metrics_on_known_cases():
    x = _digits(50)
    g = torch.Generator().manual_seed(0)
    inp = get_task("inpaint")
    c = inp.make(x, g, train=False)
    assert inp.metrics(x, c, x) == {"unmasked_mse": 0.0, "masked_mse": 0.0}
    grey = torch.zeros_like(x)
    m = inp.metrics(grey, c, x)
    keep = 1 - c["mask"]
    want = ((((x + 1) / 2 - 0.5) ** 2 * keep).sum((1, 2, 3)) / keep.sum((1, 2, 3))).mean()
    assert m["unmasked_mse"] == pytest.approx(float(want), rel=1e-5)

    sr = get_task("sr")
    c = sr.make(x, g, train=False)
    assert c["low_res"].shape == (50, 1, 4, 4) and int(c["noise_level"].abs().sum()) == 0
    nearest = sr.show(c)
    assert sr.metrics(nearest, c, x)["consistency"] == pytest.approx(0.0, abs=1e-12)  # gamed by nearest: FD must go with it
    assert sr.metrics(x, c, x)["psnr"] == pytest.approx(100.0)  # MSE clamped at 1e-10

    sk = get_task("sketch")
    c = sk.make(x, g)
    assert sk.metrics(x, c, x)["stroke_f1"] == 1.0
    assert sk.metrics(-torch.ones_like(x), c, x)["stroke_f1"] == 0.0


def test_sr_noise_augmentation_follows_the_upscaler_low_res_schedule():
    sr = get_task("sr")
    low = torch.rand(3, 1, 4, 4) * 2 - 1
    level = torch.tensor([0, 100, 999])
    out = sr.kwargs({"low_res": low, "noise_level": level}, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out["class_labels"], level)
    assert torch.equal(out["concat"][0], torch.nn.functional.interpolate(low, scale_factor=2)[0])  # level 0: clean
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a = torch.cumprod(1 - betas, 0)[100]
    noise = torch.randn(low.shape, generator=torch.Generator().manual_seed(0))
    want = (a.sqrt() * low[1] + (1 - a).sqrt() * noise[1]).float()
    assert torch.allclose(out["concat"][1, :, ::2, ::2], want, atol=1e-6)


def test_retrieval_row_is_the_nearest_train_digit():
    from flashdistill.scoring import retrieval_row

    sr = get_task("sr")
    x = _digits(4)
    from flashdistill.data.digits import load_digits

    pool = load_digits("train").images
    out = sr.retrieve(sr.make(x, torch.Generator(), train=False), pool)
    d = ((torch.nn.functional.avg_pool2d(pool, 2)[None] - torch.nn.functional.avg_pool2d(x, 2)[:, None]) ** 2).sum((2, 3, 4))
    assert torch.equal(out, pool[d.argmin(1)])
    row = retrieval_row(get_task("inpaint"), 30)
    assert row["unmasked_mse"] == 0.0 and row["diversity"] == 0.0 and row["adherence"] > 0.5


# --- call contracts -----------------------------------------------------------------------------
class _Spy(torch.nn.Module):
    """Records what each backbone call receives; returns zeros of x_t's shape (eps = 0)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states=None, down_intrablock_additional_residuals=None,
                class_labels=None, return_dict=False):
        res = down_intrablock_additional_residuals
        self.calls.append({"sample": sample.clone(), "res": None if res is None else [r.clone() for r in res],
                           "res_list": res})
        if res is not None:
            res.pop(0)  # as UNet2DConditionModel does
            res[0].add_(1.0)  # and in-place arithmetic on what it was given
        return (torch.zeros_like(sample[:, :1]) + self.w,)


def test_spatial_condition_reaches_both_cfg_branches_and_follows_x_t():
    from flashdistill.core.schedules import VPSchedule
    from flashdistill.models.denoiser import Denoiser

    spy = _Spy()
    d = Denoiser(spy, VPSchedule())
    task = get_task("inpaint")
    x = _digits(3)
    spatial = task.kwargs(task.make(x, torch.Generator().manual_seed(0), train=False))
    cond = {"encoder_hidden_states": torch.ones(3, 2, 4), **spatial}
    uncond = {"encoder_hidden_states": torch.zeros(3, 2, 4), **spatial}
    x_t = torch.randn(3, 1, 8, 8)
    cfg_model(d, cond, uncond, 3.0)(x_t, torch.full((3,), 500.0))
    seen = spy.calls[0]["sample"]
    assert seen.shape == (6, 3, 8, 8)  # one batched call: [cond; uncond], channels [x_t, mask, masked]
    assert torch.equal(seen[:3, :1], x_t) and torch.equal(seen[3:, :1], x_t)
    assert torch.equal(seen[:3, 1:], spatial["concat"]) and torch.equal(seen[3:, 1:], spatial["concat"])


def test_adapter_residuals_are_cloned_at_every_call():
    from flashdistill.core.schedules import VPSchedule
    from flashdistill.models.denoiser import Denoiser

    spy = _Spy()
    d = Denoiser(spy, VPSchedule())
    feats = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    kept = [f.clone() for f in feats]
    cond = {"encoder_hidden_states": torch.ones(2, 2, 4), RESIDUALS: feats}
    uncond = {"encoder_hidden_states": torch.zeros(2, 2, 4), RESIDUALS: feats}
    m = cfg_model(d, cond, uncond, 2.0)
    for _ in range(3):  # a solver's steps, then encoder features (the discriminator's path)
        m(torch.randn(2, 1, 8, 8), torch.full((2,), 10.0))
    assert len(cond[RESIDUALS]) == 2 and all(torch.equal(a, b) for a, b in zip(feats, kept))
    for call in spy.calls:  # every call got both features, intact, for both branches
        assert [r.shape[0] for r in call["res"]] == [4, 4]
        assert torch.equal(call["res"][0], torch.cat([kept[0], kept[0]]))
        assert torch.equal(call["res"][1], torch.cat([kept[1], kept[1]]))
    assert len({id(c["res_list"]) for c in spy.calls}) == 3  # a new list each call


def test_real_unet_consumes_both_adapter_features_once_per_call(teachers):
    """With the real digits UNet: two calls from the same residuals give the same output, and the
    output differs from the teacher without the adapter (the features are used)."""
    from flashdistill.models.loading import load_teacher

    t = load_teacher(teachers["sketch"])
    x = _digits(2)
    spatial = t.spatial(get_task("sketch").make(x, torch.Generator()), 2)
    assert [f.shape[1:] for f in spatial[RESIDUALS]] == [(8, 8, 8), (16, 4, 4)]
    x_t, ts = torch.randn(2, 1, 8, 8), torch.full((2,), 300.0)
    a = t.denoiser(x_t, ts, t.cond(["3", "4"], spatial))
    b = t.denoiser(x_t, ts, t.cond(["3", "4"], spatial))
    c = t.denoiser(x_t, ts, t.cond(["3", "4"]))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --- teachers, Flash, sampling and scoring --------------------------------------------------
def test_conditional_teachers_train_and_reload(teachers, tiny_teacher, tmp_path):
    from flashdistill.models.loading import load_teacher

    inp, sr, sk = (load_teacher(teachers[t]) for t in ("inpaint", "sr", "sketch"))
    assert inp.denoiser.backbone.config.in_channels == 3 and sr.denoiser.backbone.config.in_channels == 2
    assert sr.denoiser.backbone.config.num_class_embeds == 1000
    assert sk.adapter is not None and sk.task.name == "sketch"
    base = load_teacher(tiny_teacher)  # the adapter steers the base teacher, unchanged
    for (n, p), (_, q) in zip(sk.denoiser.backbone.named_parameters(), base.denoiser.backbone.named_parameters()):
        assert torch.equal(p, q), n
    from flashdistill import api

    run = api.train_teacher(tmp_path / "sk", task="sketch", base=str(tiny_teacher), steps=2, progress=False,
                            overrides={"train.batch_size": 4, "train.sample_every": 2})
    log = [json.loads(line) for line in (tmp_path / "sk" / "log.jsonl").read_text().splitlines()]
    assert "grad_norm/adapter" in log[-1] and "grad_norm/unet" not in log[-1]
    assert (run.path / "adapter" / "diffusion_pytorch_model.safetensors").is_file()


def test_bad_task_settings_are_one_line_errors(tiny_teacher, tmp_path):
    from flashdistill import api

    with pytest.raises(ValueError, match="--base"):
        api.train_teacher(tmp_path / "a", task="sketch", dry_run=True, progress=False)
    with pytest.raises(ValueError, match="base is for task sketch"):
        api.train_teacher(tmp_path / "b", task="inpaint", base=str(tiny_teacher), dry_run=True, progress=False)
    with pytest.raises(ValueError, match=r"task: got 'depth', expected one of \['t2i', 'inpaint', 'sr', 'sketch'\]"):
        api.train_teacher(tmp_path / "c", task="depth", dry_run=True, progress=False)


def test_sampling_checks_the_condition_and_is_per_sample(teachers, tiny_teacher, tmp_path):
    from PIL import Image

    from flashdistill import api

    t = api.load(teachers["inpaint"])
    img, mask = tmp_path / "i.png", tmp_path / "m.png"
    Image.fromarray((np.random.default_rng(0).random((16, 16)) * 255).astype(np.uint8)).save(img)
    m = np.zeros((8, 8), np.uint8)
    m[2:5, 2:6] = 255
    Image.fromarray(m).save(mask)
    with pytest.raises(ValueError, match="an 'inpaint' model: it takes --image, --mask, got --image"):
        t.condition(image=img)
    with pytest.raises(ValueError, match="needs the condition"):
        t.generate_tensor(["3"], steps=2)
    with pytest.raises(ValueError, match="takes no image"):
        api.load(tiny_teacher).condition(image=img)
    cond = t.condition(image=img, mask=mask, n=3)
    assert torch.equal(cond["mask"][0, 0], torch.from_numpy(m > 0).float())
    three = t.generate_tensor(["3"] * 3, steps=2, seed=5, condition=cond)
    one = t.generate_tensor(["3"], steps=2, seed=6, condition={k: v[1:2] for k, v in cond.items()})
    # image i depends on seed i only (up to float rounding of a batch of 3 against 1: untrained outputs reach ~30)
    assert torch.allclose(three[1:2], one, rtol=1e-4, atol=1e-4)


def _flash(teacher, out, **over):
    from flashdistill.methods.flash import FlashDistillation, build_config
    from flashdistill.train import train
    from flashdistill.data.digits import get_dataset

    cfg, _ = build_config(teacher, "digits", {"use_adv": True, "phase_steps": [1, 1, 1], "lambda_adv": [0, 0.3, 0.3, 0.3],
                                               "train": {"steps": 3, "batch_size": 4, "sample_every": 3,
                                                         "checkpoint_every": 3}, **over})
    method = FlashDistillation(cfg)
    train(method, get_dataset("digits"), out, progress=False)
    return method


@pytest.mark.parametrize("task", ["inpaint", "sr", "sketch"])
def test_flash_on_a_conditional_teacher_passes_the_condition_everywhere(teachers, task, tmp_path, monkeypatch):
    """Every teacher, student, DMD and discriminator call of a Flash step gets the spatial condition:
    the backbone would fail on a missing concat channel (inpaint, sr) and the adapter's residuals are
    counted per call (sketch)."""
    from flashdistill.models import denoiser as dn

    calls = []
    real = dn.backbone_call

    def spy(x_t, cond, dtype):
        calls.append(("concat" in cond, RESIDUALS in cond, "class_labels" in cond))
        return real(x_t, cond, dtype)

    monkeypatch.setattr(dn, "backbone_call", spy)
    _flash(teachers[task], tmp_path / "run")
    want = {"inpaint": (True, False, False), "sr": (True, False, True), "sketch": (False, True, False)}[task]
    assert calls and set(calls) == {want}
    from flashdistill import api
    from flashdistill.scoring import eval_set

    s = api.load(tmp_path / "run")
    assert s.task == task and s.meta["kind"] == "student"
    prompts, _, seeds, condition, _ = eval_set(4, s.model.task)
    out = s.generate_tensor(prompts, steps=2, condition=condition)
    assert out.shape == (4, 1, 8, 8) and torch.isfinite(out).all()
    grid = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert grid  # the preview (condition row first) was written


@pytest.mark.parametrize("method", ["lcm", "splam", "lightning"])
def test_peer_methods_on_a_conditional_teacher(teachers, method, tmp_path, monkeypatch):
    """LCM, SPLAM and SDXL-Lightning share the input path: every backbone call of their training
    steps gets the inpainting condition, and the student samples with it."""
    import flashdistill as fd
    from flashdistill.models import denoiser as dn
    from flashdistill.scoring import eval_set

    calls = []
    real = dn.backbone_call

    def spy(x_t, cond, dtype):
        calls.append("concat" in cond)
        return real(x_t, cond, dtype)

    monkeypatch.setattr(dn, "backbone_call", spy)
    settings = {"lcm": {"N": 10}, "splam": {"N": 10, "gamma_dim": 8}, "lightning": {}}[method]
    train = {"steps": 2, "batch_size": 4, "sample_every": 2, "checkpoint_every": 2}
    if method == "lightning":  # an MSE stage at 2 steps, then the adversarial 1-step stage
        settings = {"lora_rank": 2, "teacher_steps": 4, "stages": [2, 1], "stage_steps": [1, 2], "convert_steps": 1}
        train = {"steps": 3, "batch_size": 2, "checkpoint_every": 3}
    run = fd.distill(teachers["inpaint"], tmp_path / "run", method=method, overrides={**settings, "train": train},
                     progress=False)
    assert calls and all(calls)
    s = fd.load(run)
    prompts, _, _, condition, _ = eval_set(3, s.model.task)
    out = s.generate_tensor(prompts, steps=s.step_counts[-1], condition=condition)
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_evaluate_reports_task_metrics_and_diversity(teachers, monkeypatch):
    from flashdistill import api, scoring

    monkeypatch.setattr(scoring, "DIVERSITY_CONDITIONS", 4)
    rows = api.evaluate(teachers["sr"], steps=[2], num_samples=20, teacher=teachers["sr"])
    r = rows[0]
    assert r["task"] == "sr" and {"consistency", "psnr", "diversity", "fd", "adherence"} <= set(r)
    assert r["teacher_mse"] is not None and r["diversity"] > 0


def test_evaluate_seed_sets_draw_other_seeds_and_conditions(teachers, monkeypatch):
    """Seed set 0 is the usual evaluation set; set 1 keeps the test digits and prompts and draws other
    sample seeds and other inpainting boxes, and the teacher reference follows it (so a teacher
    scored against itself at 32 steps still has teacher MSE 0)."""
    from flashdistill import api, scoring
    from flashdistill.tasks import get_task

    task = get_task("inpaint")
    usual, other = (scoring.eval_set(40, task, **scoring.seed_set_args(k)) for k in (0, 1))
    default = scoring.eval_set(40, task)  # set 0 is what every documented figure used
    assert usual[0] == default[0] and usual[2] == default[2] == list(range(40))
    assert torch.equal(usual[1], default[1]) and torch.equal(usual[4], default[4])
    assert all(torch.equal(usual[3][k], default[3][k]) for k in default[3])
    assert usual[0] == other[0] and torch.equal(usual[4], other[4])  # same prompts, same true digits
    assert other[2] == [100_000 + i for i in range(40)]
    assert not all(torch.equal(usual[3][k], other[3][k]) for k in usual[3])  # other boxes
    with pytest.raises(ValueError, match="seed_set must be >= 0"):
        scoring.seed_set_args(-1)

    monkeypatch.setattr(scoring, "DIVERSITY_CONDITIONS", 2)
    rows = {k: api.evaluate(teachers["inpaint"], steps=[32], num_samples=6, teacher=teachers["inpaint"], seed_set=k)[0]
            for k in (0, 1)}
    assert rows[0]["teacher_mse"] == rows[1]["teacher_mse"] == 0.0
    assert rows[0]["unmasked_mse"] != rows[1]["unmasked_mse"]


def test_cli_sample_writes_the_condition_first(teachers, tmp_path, capsys):
    from PIL import Image

    from flashdistill.cli import main

    sk = tmp_path / "s.png"
    a = np.zeros((8, 8), np.uint8)
    a[1:7, 3:5] = 255
    Image.fromarray(a).save(sk)
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(teachers["sketch"]), "--prompt", "one", "--steps", "2", "--sketch", str(sk),
                 "--num-images", "2", "--out", str(out)]) in (0, None)
    grid = np.asarray(Image.open(out).convert("L"))
    assert grid.shape == (8 * 10, 8 * 28)  # 1 row of 3 tiles of 8x8 with 1-px white borders, upscaled 8x
    first = grid[8:72:8, 8:72:8]  # the first tile, one value per pixel
    assert np.array_equal(first > 127, a > 127)  # the stroke map as the model saw it
    assert main(["sample", "--model", str(teachers["sketch"]), "--prompt", "one", "--out", str(out)]) not in (0, None)
    assert "is a 'sketch' model: it takes --sketch, got none" in capsys.readouterr().err


def test_conditional_benchmark_writes_every_row(teachers, tmp_path, monkeypatch):
    """The preset end to end at toy size (2 training steps, 20 samples): rows, targets, report, grid."""
    from flashdistill import benchmark, conditional_benchmark as cb, scoring

    monkeypatch.setattr(scoring, "DIVERSITY_CONDITIONS", 2)
    real_teacher, real_method = benchmark.teacher_config, benchmark.method_config
    monkeypatch.setattr(benchmark, "teacher_config", lambda o=None: real_teacher(
        {**(o or {}), "channels": TINY, "train": {"steps": 2, "batch_size": 4, "sample_every": 2, "checkpoint_every": 2}}))
    monkeypatch.setattr(benchmark, "method_config", lambda m, t, o=None: real_method(
        m, t, {**(o or {}), "train": {"steps": 2, "batch_size": 4, "sample_every": 2, "checkpoint_every": 2}}))
    from flashdistill import sample as sample_module

    calls, real_sample = [], sample_module.sample
    monkeypatch.setattr(sample_module, "sample", lambda model, prompts, seeds, steps, **kw: calls.append((len(prompts), steps))
                        or real_sample(model, prompts, seeds, steps, **kw))
    result = cb.run_conditional(tmp_path / "out", cache=tmp_path / "cache", num_samples=20, progress=False, tasks=("inpaint",))
    assert calls.count((20, 32)) == 1  # the teacher's 32-step row scores the reference, not a second sampling of it
    assert result["rows"][0]["teacher_mse"] == 0
    methods = [(r["method"], r["steps"]) for r in result["rows"]]
    assert methods == [("teacher dpmpp_2m", 32), ("dpmpp_2m (training-free)", 1), ("dpmpp_2m (training-free)", 2),
                       ("dpmpp_2m (training-free)", 4), ("flash student", 1), ("flash student", 2), ("flash student", 4),
                       ("codi student", 1), ("codi student", 2), ("codi student", 4),
                       ("pe-codi student", 1), ("pe-codi student", 2), ("pe-codi student", 4),
                       ("nearest-neighbour retrieval", 0)]
    assert [r["nfe"] for r in result["rows"]] == [64, 2, 4, 8, 1, 2, 4, 1, 2, 4, 1, 2, 4, 0]
    assert all(r["task"] == "inpaint" and "unmasked_mse" in r and "diversity" in r for r in result["rows"])
    assert [(t["task"], t["method"]) for t in result["targets"]] == [
        ("inpaint", "flash student"), ("inpaint", "codi student"), ("inpaint", "pe-codi student")]
    for f in ("results.json", "report.md", "grid.png", "quality_vs_nfe.png"):
        assert (tmp_path / "out" / f).is_file()


# --- CoDi -----------------------------------------------------------------------------------------
def _codi(teacher, **over):
    from flashdistill.methods.codi import CoDiDistillation, build_config

    cfg, _ = build_config(teacher, "digits", {"train": {"steps": 2, "batch_size": 4, "sample_every": 2,
                                                        "checkpoint_every": 2}, **over})
    m = CoDiDistillation(cfg)
    m.setup(torch.device("cpu"))
    return m


def test_codi_long_preset_is_the_digits_preset_at_4x_the_steps(tiny_teacher):
    from flashdistill.config import to_dict
    from flashdistill.methods.codi import build_config

    short, _ = build_config(tiny_teacher, "digits")
    long, preset = build_config(tiny_teacher, "digits-long")
    a, b = to_dict(short), to_dict(long)
    assert preset == "digits-long" and b["train"]["steps"] == 4 * a["train"]["steps"] == 2400
    # the same but for the learning rate (digits-long keeps 5e-4) and the samplers (LCMScheduler's picks),
    # where its figures were measured
    assert a["lr"] == 2e-3 and b["lr"] == 5e-4
    assert a["four_step_timesteps"] == [999, 399, 199, 99] and b["two_step_timesteps"] == b["four_step_timesteps"] == []
    differ = ("train", "lr", "two_step_timesteps", "four_step_timesteps")
    assert {k: v for k, v in a.items() if k not in differ} == {k: v for k, v in b.items() if k not in differ}


def test_codi_samples_at_the_timesteps_it_is_given(tiny_teacher):
    """The digits preset's 2- and 4-step samplers sit at [999, 199] and [999, 399, 199, 99]; []
    leaves LCMScheduler's pick on the N-grid; timesteps off the grid the student trains at, out of
    order or of the wrong count are refused, naming them."""
    from flashdistill.config import ConfigError

    assert _codi(tiny_teacher).sampling()["timesteps"] == {"1": [999], "2": [999, 199], "4": [999, 399, 199, 99]}
    lcm = _codi(tiny_teacher, two_step_timesteps=[], four_step_timesteps=[])
    assert lcm.sampling()["timesteps"] == {"1": [999], "2": [999, 499], "4": [999, 759, 499, 259]}
    with pytest.raises(ValueError, match=r"four_step_timesteps: \[400, 200, 100\] not on the N = 50 grid .*999, 979, 959, ..., 19"):
        _codi(tiny_teacher, four_step_timesteps=[999, 400, 200, 100])
    for bad in ([199, 999], [999], [999, 199, 99]):
        with pytest.raises((ValueError, ConfigError), match="two_step_timesteps must be .* from high to low"):
            _codi(tiny_teacher, two_step_timesteps=bad)


def test_codi_adapted_model_is_the_teacher_at_step_0(tiny_teacher):
    """Eq. 12 with zero-initialised output convolutions: the ControlNet-steered UNet (with its LoRA
    at initialisation) equals the teacher bit for bit, whatever the condition."""
    from flashdistill.models.denoiser import Denoiser
    from flashdistill.tasks import CONTROL

    m = _codi(tiny_teacher, task="sr")
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([999.0, 500.0, 20.0])
    text = m.teacher.cond(["1", "2", "3"])
    control = torch.rand(3, 1, 8, 8)
    adapted = Denoiser(m.student, m.schedule)(x_t, t, {**text, CONTROL: control})
    assert torch.equal(adapted, m.teacher.denoiser(x_t, t, text))
    with torch.no_grad():  # and the condition does reach the model once the encoder has learnt
        for p in m.student.controlnet.controlnet_mid_block.parameters():
            p.add_(0.1)
    assert not torch.allclose(Denoiser(m.student, m.schedule)(x_t, t, {**text, CONTROL: control}), adapted)


def test_codi_ode_step_is_eq14_and_ddim_with_the_model_eps(tiny_teacher):
    from flashdistill.models.denoiser import Denoiser
    from flashdistill.tasks import CONTROL

    m = _codi(tiny_teacher, task="sketch")
    x0 = _digits(2)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, s = torch.full((2,), 499.0), torch.full((2,), 479.0)
    z_t = m.schedule.add_noise(x0, noise, t)
    cond = {**m.teacher.cond(["0", "1"]), CONTROL: get_task("sketch").control({"sketch": (x0 > 0).float()})}
    x_hat = Denoiser(m.student, m.schedule)(z_t, t, cond)
    ab = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, 0)  # SD's scaled_linear
    a_t, s_t, a_s, s_s = (float(v) for v in (ab[499].sqrt(), (1 - ab[499]).sqrt(), ab[479].sqrt(), (1 - ab[479]).sqrt()))
    want = a_s * x_hat + s_s * noise  # Eq. 14: the TRUE eps
    assert torch.allclose(m.ode_step(m.student, z_t, t, s, noise, cond), want, atol=1e-5)
    m.config.ode_eps = "model"  # the public code's default: the model's eps, a DDIM step
    eps_hat = (z_t - a_t * x_hat) / s_t
    assert torch.allclose(m.ode_step(m.student, z_t, t, s, noise, cond), a_s * x_hat + s_s * eps_hat, atol=1e-4)
    assert not torch.allclose(eps_hat, noise, atol=1e-3)  # the two variants differ here


def test_codi_loss_on_a_known_case(tiny_teacher):
    m = _codi(tiny_teacher, beta=0.5)
    fx, feps = torch.full((2, 1, 2, 2), 1.0), torch.full((2, 1, 2, 2), 2.0)
    fx_t, feps_t, x0 = torch.full((2, 1, 2, 2), 0.0), torch.full((2, 1, 2, 2), 5.0), torch.full((2, 1, 2, 2), 3.0)
    loss, logs = m.loss(fx, feps, fx_t, feps_t, x0)
    assert float(loss) == pytest.approx(9.0 + 0.5 * 4.0)  # (2 - 5)^2 + beta (1 - 3)^2, noise space (Eq. 15)
    m.config.consistency = "x"
    assert float(m.loss(fx, feps, fx_t, feps_t, x0)[0]) == pytest.approx(1.0 + 0.5 * 4.0)
    # guidance_weight: the signal-space term weighted per sample at its t by alpha_bar(t) or min(1, SNR(t))
    t = torch.tensor([100.0, 900.0])
    abar = torch.tensor([float(m.schedule.alpha(v) ** 2) for v in t])
    for mode, w in (("none", torch.ones(2)), ("alpha2", abar), ("min_snr", (abar / (1 - abar)).clamp(max=1))):
        m.config.guidance_weight = mode
        assert torch.allclose(m.guidance_weight(t), w, atol=1e-6)
        assert float(m.loss(fx, feps, fx_t, feps_t, x0, t)[0]) == pytest.approx(1.0 + 0.5 * 4.0 * float(w.mean()), rel=1e-5)
    assert 0.8 < float(abar[0]) and float(abar[1]) < 0.1  # t = 100 is near-clean, 900 near-noise here
    m.config.guidance_weight, m.config.consistency = "none", "eps"
    # boundary scalings: at t = 0, F_x = F_eps = x_t (c_skip = 1, c_out = 0)
    x_t = torch.randn(1, 1, 8, 8)
    fx0, feps0 = m.scaled(x_t, torch.randn(1, 1, 8, 8), torch.zeros(1))
    assert torch.allclose(fx0, x_t) and torch.allclose(feps0, x_t)


def _check_codi_export(run, teacher, out, pe, loaded, prompts, condition):
    """The export in diffusers' own classes: the teacher's UNet (+ the exported LoRA, for CoDi) and
    the exported ControlNetModel give the toolkit's backbone output."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from flashdistill import api
    from flashdistill.models.controlled import ControlledUNet
    from flashdistill.tasks import CONTROL

    api.export(run, out, num_samples=20)
    card = (out / "README.md").read_text()
    assert "controlnet/" in card and "--image IMAGE.png --mask MASK.png" in card
    assert (out / "pytorch_lora_weights.safetensors").is_file() != pe
    unet = UNet2DConditionModel.from_pretrained(teacher / "unet").eval()
    if not pe:
        unet.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    theirs = ControlledUNet(unet, ControlNetModel.from_pretrained(out / "controlnet").eval())
    model = loaded.model
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 500, 20])
    cond = model.cond(prompts, model.spatial(condition, 3))
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=cond["encoder_hidden_states"], controlnet_cond=cond[CONTROL])[0]
        mine = model.denoiser.backbone(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                                       controlnet_cond=cond[CONTROL])[0]
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_codi_and_pe_codi_train_save_load_and_sample(tiny_teacher, tmp_path):
    from flashdistill import api
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.loading import load_teacher
    from flashdistill.scoring import eval_set
    from flashdistill.train import train

    for pe in (False, True):
        m = _codi(tiny_teacher, task="inpaint", pe=pe)
        names = {n.split(".")[0] for n, p in m.student.named_parameters() if p.requires_grad}
        assert names == ({"controlnet"} if pe else {"controlnet", "unet"})
        ts = []
        real = m.scaled

        def spy(x_t, x0, t, real=real):
            ts.append(t.clone())
            return real(x_t, x0, t)

        m.scaled = spy
        out = tmp_path / f"run{pe}"
        train(m, get_dataset("digits"), out, progress=False)
        assert all(len(set(t.tolist())) == 1 for t in ts)  # one t per batch (paper, Sec. 5.2)
        s = api.load(out)
        assert s.task == "inpaint" and (out / "controlnet").is_dir()
        assert (out / "student" / "student_lora.safetensors").is_file() != pe
        prompts, _, _, condition, _ = eval_set(3, get_task("inpaint"))
        x = s.generate_tensor(prompts, steps=2, condition=condition)
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
        _check_codi_export(out, tiny_teacher, tmp_path / f"export{pe}", pe, s, prompts, condition)
    base = load_teacher(tiny_teacher)  # PE-CoDi leaves the teacher's UNet as it was
    for (n, p), (_, q) in zip(s.model.denoiser.backbone.unet.named_parameters(), base.denoiser.backbone.named_parameters()):
        assert torch.equal(p, q), n


def test_codi_refuses_conditional_teachers(teachers):
    with pytest.raises(ValueError, match="text-to-image teacher, not an 'inpaint' one"):
        _codi(teachers["inpaint"])


def test_app_actions_take_the_condition(teachers, tmp_path):
    """The comparison page of a conditional run: upload fields for the task's images, and the
    student's and teacher's images those of Loaded.generate with the same condition and seed."""
    from PIL import Image

    import flashdistill as fd
    from flashdistill.app import actions, build_app, inputs

    _flash(teachers["inpaint"], tmp_path / "run")
    student, ref = fd.load(tmp_path / "run"), fd.load(teachers["inpaint"])
    assert inputs(student) == ["image", "mask"]
    run_student, run_teacher = actions(student, ref, 1)
    img, mask = Image.new("L", (8, 8), 200), Image.new("L", (8, 8), 0)
    mask.paste(255, (2, 2, 6, 6))
    cond = student.condition(image=img, mask=mask)
    image, ms, text = run_student("a handwritten digit two", 3, "2", 0, img, mask)
    want = student.generate(["a handwritten digit two"], steps=2, seed=3, condition=cond)[0]
    assert np.array_equal(np.asarray(image), np.asarray(want)) and "student" in text
    timage, text = run_teacher("a handwritten digit two", 3, True, ms, text, 0, img, mask)
    want = ref.generate(["a handwritten digit two"], steps=32, seed=3, condition=cond)[0]
    assert np.array_equal(np.asarray(timage), np.asarray(want)) and "teacher" in text
    with pytest.raises(ValueError, match="upload the mask first"):
        run_student("a handwritten digit two", 0, "2", 0, img, None)
    page = build_app(tmp_path / "run")
    ids = {getattr(b, "elem_id", None) for b in page.blocks.values()}
    assert {"cond-image", "cond-mask", "noise-level"} <= ids and "cond-sketch" not in ids
