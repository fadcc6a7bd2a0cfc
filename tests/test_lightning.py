"""SDXL-Lightning: its move and schedule fix against independent re-derivations, the NS-GAN loss,
the stage machinery (snapshots, discriminator resets, exact resume across a stage boundary), and
the per-stage outputs that sample / evaluate / export pick by step count."""
import json

import pytest
import torch

from flashdistill.config import from_dict
from flashdistill.core.schedules import VPSchedule, lightning_forward
from flashdistill.core.solvers import ddim_move
from flashdistill.losses import ns_gan_discriminator_loss, ns_gan_generator_loss
from flashdistill.methods.lightning import CLEAN, LightningConfig, LightningDistillation, move_to

TINY = {"lora_rank": 2, "teacher_steps": 8, "stages": [4, 2, 1], "stage_steps": [2, 2, 3], "convert_steps": 1,
        "mse_lr": 1e-2, "lr": 1e-2, "disc_lr": 1e-2, "guidance": 1.5,
        "train": {"steps": 7, "batch_size": 4, "checkpoint_every": 2, "log_every": 1, "sample_every": 0}}


def tiny(teacher, **over):
    data = {**TINY, "teacher": str(teacher)}
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return LightningDistillation(from_dict(LightningConfig, data))


def test_move_is_the_deterministic_step_between_forward_marginals():
    """Eq. 5 on a known case: for x_t = forward(x0, eps, t), move with the true x0 gives
    forward(x0, eps, t') exactly, for every t' (and the clean sample at CLEAN)."""
    sch = VPSchedule()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t, t_n = torch.tensor([999.0, 600.0, 40.0]), torch.tensor([499.0, 0.0, CLEAN])
    x_t = sch.add_noise(x0, eps, t)
    out = move_to(x_t, x0, t, t_n, sch)
    torch.testing.assert_close(out[:2], sch.add_noise(x0[:2], eps[:2], t_n[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], x0[2])
    torch.testing.assert_close(ddim_move(x_t[:2], x0[:2], t[:2], t_n[:2], sch), out[:2])


def test_schedule_fix_is_pure_noise_at_T_only():
    sch = VPSchedule()
    x0, eps = torch.ones(2, 3), torch.full((2, 3), 2.0)
    out = lightning_forward(sch, x0, eps, torch.tensor([999.0, 998.0]))
    assert torch.equal(out[0], eps[0])  # Eq. 24: t = T is pure noise
    torch.testing.assert_close(out[1], sch.add_noise(x0[1:], eps[1:], torch.tensor([998.0]))[0])
    assert sch.alpha(torch.tensor(999.0)).item() > 0.05  # SD's schedule is not zero-SNR: the fix matters


def test_ns_gan_losses():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0])
    d, _ = ns_gan_discriminator_loss(real, fake)
    sp = torch.nn.functional.softplus
    assert d.item() == pytest.approx((sp(-real).mean() + sp(fake).mean()).item())
    g, _ = ns_gan_generator_loss(fake)
    assert g.item() == pytest.approx(sp(-fake).mean().item())
    # -log(sigmoid(x)) = softplus(-x): the paper's -log D written stably
    assert g.item() == pytest.approx(-torch.log(torch.sigmoid(fake)).mean().item(), rel=1e-6)


def test_config_rejects_bad_stages(tiny_teacher):
    with pytest.raises(ValueError, match="each half the previous"):
        tiny(tiny_teacher, stages=[4, 3, 1])
    with pytest.raises(ValueError, match="must equal sum"):
        tiny(tiny_teacher, train={"steps": 9})
    with pytest.raises(ValueError, match="ema_decay must be 0"):
        tiny(tiny_teacher, train={"ema_decay": 0.9})


def test_stage_schedule_resets_and_teacher_targets(tiny_teacher):
    m = tiny(tiny_teacher)
    m.setup("cpu")
    models = m.models()
    assert [m.stage_at(s) for s in range(7)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]
    assert m.converting(2, 0) and not m.converting(2, 1) and not m.converting(1, 0)
    assert m.uncond_phase(2, 2) and not m.uncond_phase(2, 1) and not m.uncond_phase(0, 1)
    settings = m.at_step(0, models)
    assert settings["student"]["lr"] == m.config.mse_lr and settings["student"]["betas"] == (0.9, 0.999)
    with torch.no_grad():
        for p in models["disc"].parameters():
            p.add_(1.0)
    settings = m.at_step(2, models)  # stage 1 starts: snapshot stage 0, fresh discriminator
    assert settings["disc"]["reset"] and settings["student"]["betas"] == (0.0, 0.99)
    assert all(torch.equal(v, models["disc"].state_dict()[k]) for k, v in m.disc_init.items())
    assert set(m.finished) == {4}  # the stage-0 student, stage 1's teacher
    # stage 1's teacher target: two moves of the stage-0 student (size T / 4), no CFG
    cond = m.teacher.cond(["a handwritten digit four"] * 2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([999.0, 249.0], dtype=torch.float64)
    import copy

    from flashdistill.models.denoiser import Denoiser

    stage0 = copy.deepcopy(m.student)  # a separate module holding the stage-0 weights
    with torch.no_grad():
        for name, p in stage0.named_parameters():
            if name in m.finished[4]:
                p.copy_(m.finished[4][name])
    ref = []
    for b in range(2):
        xb, cur = x[b: b + 1], t[b: b + 1]
        for _ in range(2):
            nxt = torch.round(cur - 250)
            nxt = torch.where(nxt < 0, torch.full_like(nxt, CLEAN), nxt)
            if cur.item() < 0:
                break
            x0 = Denoiser(stage0, m.schedule)(xb, cur.float(), {k: v[b: b + 1] for k, v in cond.items()})
            xb = move_to(xb, x0, cur, nxt, m.schedule)
            cur = nxt
        ref.append(xb)
    torch.testing.assert_close(m.teacher_target(1, x, t, cond, None), torch.cat(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("disc_reset", ["phase", "stage"])
def test_disc_reset_at_the_unconditional_phase_only_when_asked(tiny_teacher, disc_reset):
    """Stage 2 of TINY runs steps 4-6, its unconditional phase from step 6: 'phase' re-initialises
    the discriminator there too, 'stage' (the paper's words) keeps it and its optimizer state;
    both re-initialise at the stage's first step."""
    m = tiny(tiny_teacher, disc_reset=disc_reset)
    m.setup("cpu")
    models = m.models()

    def perturb():
        with torch.no_grad():
            for p in models["disc"].parameters():
                p.add_(1.0)
        return {k: v.clone() for k, v in models["disc"].state_dict().items()}

    for step in range(4):
        m.at_step(step, models)
    perturb()
    assert m.at_step(4, models)["disc"]["reset"]  # the stage's start, either way
    assert all(torch.equal(v, models["disc"].state_dict()[k]) for k, v in m.disc_init.items())
    assert not m.at_step(5, models)["disc"]["reset"]
    trained = perturb()
    assert m.uncond_phase(2, 2) and not m.uncond_phase(2, 1)
    reset = m.at_step(6, models)["disc"]["reset"]
    expected = m.disc_init if disc_reset == "phase" else trained
    assert reset == (disc_reset == "phase")
    assert all(torch.equal(v, models["disc"].state_dict()[k]) for k, v in expected.items())


def test_skip_level_teacher_gives_the_one_step_stage_four_moves_of_the_stage_two_up(tiny_teacher):
    """Sec. 3.4: in the unconditional phase of the small-step stages the real samples come from the
    student two stages up. TINY's 1-step stage (steps 4-6, unconditional from 6) then takes four
    moves of the 4-step student (stage 0), not two of the 2-step one; before that phase, and with
    skip_level_steps = 0, the previous stage's."""
    from flashdistill.models.denoiser import Denoiser

    m = tiny(tiny_teacher, skip_level_steps=2)
    m.setup("cpu")
    models = m.models()
    g = torch.Generator().manual_seed(5)
    for step in range(7):
        if step in (2, 4):  # distinct weights for each finished stage
            with torch.no_grad():
                for p in m.student.parameters():
                    if p.requires_grad:
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.at_step(step, models)
    assert not m.skip_level(2, 1) and m.skip_level(2, 2) and not m.skip_level(1, 1)
    assert not tiny(tiny_teacher, skip_level_steps=0).skip_level(2, 2)
    cond = m.teacher.cond(["a handwritten digit seven"] * 2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([999.0, 499.0], dtype=torch.float64)

    def chain(weights, size):
        with torch.no_grad(), m.frozen_student(weights):
            out = []
            for b in range(2):
                xb, cur = x[b: b + 1], t[b: b + 1]
                while cur.item() >= 0:
                    nxt = torch.round(cur - size)
                    nxt = torch.where(nxt < 0, torch.full_like(nxt, CLEAN), nxt)
                    x0 = Denoiser(m.student, m.schedule)(xb, cur.float(), {k: v[b: b + 1] for k, v in cond.items()})
                    xb, cur = move_to(xb, x0, cur, nxt, m.schedule), nxt
                out.append(xb)
        return torch.cat(out)

    skip, prev = chain(m.finished[4], 250), chain(m.finished[2], 500)
    assert (skip - prev).abs().max() > 1e-3  # the two teachers differ
    torch.testing.assert_close(m.teacher_target(2, x, t, cond, None, level=2), skip, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.teacher_target(2, x, t, cond, None), prev, rtol=1e-5, atol=1e-5)
    # the step asks for the skip-level target only in that phase
    levels = []
    target = m.teacher_target
    m.teacher_target = lambda *a, **kw: levels.append(a[5] if len(a) > 5 else kw.get("level", 1)) or target(*a, **kw)
    batch = {"image": torch.rand(2, 1, 8, 8) * 2 - 1, "prompt": ["a handwritten digit one"] * 2}
    for step in (5, 6):
        m.step(batch, step, models, torch.Generator().manual_seed(step))
    assert levels == [1, 2]


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def test_lightning_trains_all_stages_resumes_exactly_and_routes_by_steps(tiny_teacher, tmp_path):
    from safetensors.torch import load_file

    from flashdistill.data.digits import get_dataset
    from flashdistill.exporting import export
    from flashdistill.models.loading import load_model
    from flashdistill.sample import sample
    from flashdistill.train import train

    data = get_dataset("digits")
    train(tiny(tiny_teacher), data, tmp_path / "a", progress=False)
    # stopped at step 4 (the 1-step stage's first step, mid checkpoint), then resumed
    part = tiny(tiny_teacher)
    part.config.train.steps = 4
    train(part, data, tmp_path / "b", progress=False)
    train(tiny(tiny_teacher), data, tmp_path / "b", resume=True, progress=False)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la == {s: lb[s] for s in la} and len(la) == 7
    logs = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in logs] == [0, 0, 1, 1, 2, 2, 2] and "convert" in logs[4] and "adv_g" in logs[6]
    assert logs[6]["uncond_d"] == 1.0 and logs[2]["uncond_d"] == 0.0
    for n in ("4", "2", "1"):
        a = load_file(str(tmp_path / "a" / "stages" / n / "student" / "student_lora.safetensors"))
        b = load_file(str(tmp_path / "b" / "stages" / n / "student" / "student_lora.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), n
    meta = json.loads((tmp_path / "a" / "flashdistill.json").read_text())
    assert meta["stages"] == {"4": "stages/4", "2": "stages/2", "1": "stages/1"}
    assert meta["scheduler_config"]["prediction_type"] == "sample"
    four = json.loads((tmp_path / "a" / "stages" / "4" / "flashdistill.json").read_text())
    assert four["sampling"]["timesteps"] == {"4": [999, 749, 499, 249]}
    assert four["scheduler_config"]["prediction_type"] == "epsilon"

    model = load_model(tmp_path / "a")
    imgs = {n: sample(model, ["a handwritten digit six"] * 2, [0, 1], n) for n in (1, 2, 4)}
    assert all(v.shape == (2, 1, 8, 8) and torch.isfinite(v).all() for v in imgs.values())
    direct = sample(load_model(tmp_path / "a" / "stages" / "4"), ["a handwritten digit six"] * 2, [0, 1], 4)
    assert torch.equal(direct, imgs[4])  # routed to the 4-step stage
    with pytest.raises(ValueError, match="samples with"):
        sample(model, ["x"], [0], 3)
    out = export(tmp_path / "a", tmp_path / "export", None)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["1-step", "2-step", "4-step"]
    assert "EulerDiscreteScheduler" in (out / "1-step" / "README.md").read_text()
    # --timesteps: a stage samples at its own timesteps, and an export of the stages takes none
    from flashdistill.models.student import with_timesteps

    with pytest.raises(ValueError, match="this run's 4-step student is a stage of its own"):
        with_timesteps(load_model(tmp_path / "a"), [999, 500, 300, 100])
    with pytest.raises(ValueError, match="keeps one student per step count"):
        export(tmp_path / "a", tmp_path / "export-chosen", None, sampling=model.sampling)
