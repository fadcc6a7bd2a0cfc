"""Flash Diffusion: pi(t), the teacher target, the losses, re-noising, LoRA, resume and DDP."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashdistill.config import from_dict
from flashdistill.core.schedules import VPSchedule
from flashdistill.core.timesteps import grid_probabilities, mode_indices, phase_at, sample_grid_index
from flashdistill.losses import discriminator_loss, distillation_loss, dmd_loss, generator_adv_loss
from flashdistill.methods.flash import PRESETS, FlashConfig, FlashDistillation

TINY = {"lora_rank": 2, "lr": 1e-3, "disc_lr": 1e-3, "K": 8, "guidance_min": 1.0, "guidance_max": 3.0,
        "phase_steps": [1, 1, 1], "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1}}


def tiny_flash(teacher, **over):
    cfg = {**TINY, "teacher": str(teacher), **over}
    return FlashDistillation(from_dict(FlashConfig, cfg))


# --- pi(t), Eq. (3) ------------------------------------------------------------------------

def test_mode_indices_are_the_four_inference_timesteps():
    grid = VPSchedule().timesteps(32, "trailing")
    assert grid[mode_indices(32)].tolist() == [999, 749, 499, 249]


def test_pi_formula_reference_mass_fractions():
    p = grid_probabilities(32, "flash", [0, 0, 0.5, 0.5], std=0.5)
    # Reference behaviour (notes): ~79% on each mode's centre, ~10.5% on each neighbour.
    assert p[16] == pytest.approx(0.5 * 0.787, abs=0.003)
    assert p[15] == pytest.approx(0.5 * 0.1065, abs=0.003)
    assert p[:14].sum() < 1e-6  # warm-up: no mass near full noise
    assert p.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kind,weights", [("flash", [0.4, 0.2, 0.2, 0.2]), ("flash", [0.1, 0.3, 0.3, 0.3]),
                                          ("uniform", None), ("gaussian", None), ("sharp", [0.4, 0.2, 0.2, 0.2])])
def test_pi_drawn_frequencies_match_formula(kind, weights):
    K, n = 32, 200_000
    j = torch.arange(K, dtype=torch.float64)
    if kind == "flash":
        expected = sum(w * torch.exp(-(j - m) ** 2 / (2 * 0.25)) for w, m in zip(weights, [0, 8, 16, 24]))
    elif kind == "uniform":
        expected = torch.ones(K, dtype=torch.float64)
    elif kind == "gaussian":
        expected = torch.exp(-(j - 16) ** 2 / (2 * 8.0**2))
    else:
        expected = torch.zeros(K, dtype=torch.float64)
        expected[[0, 8, 16, 24]] = torch.tensor(weights, dtype=torch.float64)
    expected = expected / expected.sum()
    probs = grid_probabilities(K, kind, weights, std=0.5)
    torch.testing.assert_close(probs, expected)
    draws = sample_grid_index(probs, n, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=K).double() / n
    # 5 standard errors per bin
    tol = 5 * torch.sqrt(expected * (1 - expected) / n) + 1e-9
    assert ((freq - expected).abs() <= tol).all(), (freq - expected).abs().max()


def test_phases_shift_mass_towards_full_noise(tiny_teacher):
    m = tiny_flash(tiny_teacher, K=32, phase_steps=[10, 10, 10])
    assert [m.phase(s) for s in (0, 9, 10, 19, 20, 29, 30, 10_000)] == [0, 0, 1, 1, 2, 2, 3, 3]
    p_full = [float(m.probabilities(s)[0]) for s in (0, 10, 20, 30)]
    assert p_full[0] < 1e-9 and p_full[1] < p_full[2] < p_full[3]
    assert phase_at(5, [2, 2]) == 2


def test_bad_pi_config_is_rejected(tiny_teacher):
    with pytest.raises(ValueError, match="K must be"):
        tiny_flash(tiny_teacher, K=30)
    with pytest.raises(ValueError, match="mode_weights"):
        tiny_flash(tiny_teacher, mode_weights=[[1, 0, 0, 0]])
    with pytest.raises(ValueError, match="nope"):
        tiny_flash(tiny_teacher, pi="nope")
    with pytest.raises(ValueError, match=r"two_step_modes must be two increasing mode indices in 0..3, got \[2, 1\]"):
        tiny_flash(tiny_teacher, two_step_modes=[2, 1])


def test_two_step_timesteps_follow_the_config(tiny_teacher):
    """The 2-step sampler starts from the configured modes (the real-model presets: the first and
    middle), its second call two_step_shift grid points above its mode (digits: the first and last
    modes, shifted by one: 999 and 311 at K = 16)."""
    assert tiny_flash(tiny_teacher, two_step_modes=[1, 2]).sampling()["timesteps"]["2"] == [749, 499]
    assert tiny_flash(tiny_teacher).sampling()["timesteps"]["2"] == [999, 499]
    digits = from_dict(FlashConfig, {**PRESETS["digits"], "teacher": "x"})
    assert (digits.two_step_modes, digits.two_step_shift) == ([0, 3], 1)
    assert from_dict(FlashConfig, {**PRESETS["sd"], "teacher": "x"}).two_step_modes == [0, 2]
    # the second call moves up the K-grid (K = 8: 999, 874, 749, 624, 499, 374, 249, 124) from its mode
    assert tiny_flash(tiny_teacher, two_step_modes=[0, 3], two_step_shift=1).sampling()["timesteps"]["2"] == [999, 374]
    assert tiny_flash(tiny_teacher, K=16, two_step_modes=[0, 3], two_step_shift=1).sampling()["timesteps"]["2"] == [999, 311]
    assert tiny_flash(tiny_teacher, two_step_shift=3).sampling()["timesteps"]["2"] == [999, 874]
    with pytest.raises(ValueError, match=r"two_step_shift must be in \[0, 4\) grid points .* got 4"):
        tiny_flash(tiny_teacher, two_step_shift=4)  # would reach the first call's mode


def test_four_step_timesteps_follow_the_config_and_the_conditional_digits_preset(tiny_teacher, tmp_path):
    """The 4-step sampler sits at the four modes unless four_step_timesteps names K-grid points;
    the digits preset on a built-in conditional teacher ends it at t = 124, on text-to-image not."""
    from flashdistill.methods.flash import build_config

    assert tiny_flash(tiny_teacher).sampling()["timesteps"]["4"] == [999, 749, 499, 249]
    chosen = tiny_flash(tiny_teacher, four_step_timesteps=[999, 749, 499, 124])  # K = 8: ..., 249, 124
    assert chosen.sampling()["timesteps"]["4"] == [999, 749, 499, 124]
    assert chosen.sampling()["timesteps"]["2"] == tiny_flash(tiny_teacher).sampling()["timesteps"]["2"]
    with pytest.raises(ValueError, match=r"four_step_timesteps: \[700\] not on the K = 8 grid"):
        tiny_flash(tiny_teacher, four_step_timesteps=[999, 749, 700, 124])
    with pytest.raises(ValueError, match=r"four_step_timesteps must be \[\] or 4 timesteps >= 0 from high to low"):
        from_dict(FlashConfig, {"teacher": "x", "four_step_timesteps": [124, 499, 749, 999]}).validate()
    for task, want in (("t2i", []), ("inpaint", [999, 749, 499, 124]), ("sr", [999, 749, 499, 124]),
                       ("sketch", [999, 749, 499, 124])):
        folder = tmp_path / task
        folder.mkdir()
        (folder / "flashdistill.json").write_text(json.dumps({"kind": "teacher", "task": task}))
        config, preset = build_config(folder)
        assert preset == "digits" and config.four_step_timesteps == want, task
        assert build_config(folder, "digits", {"four_step_timesteps": []})[0].four_step_timesteps == []  # --set wins
        assert build_config(folder, "digits-long")[0].four_step_timesteps == []  # measured on `digits` only
    assert build_config(tmp_path / "stand-in", "digits")[0].four_step_timesteps == []  # the benchmark's cache key


def test_exported_scheduler_picks_the_student_timesteps_from_the_step_count(tiny_teacher):
    """original_inference_steps is chosen so that diffusers' own set_timesteps(n), with no
    timesteps= (the upscale pipeline passes none), gives the student's timesteps; where no grid
    does (the digits preset's [999, 311] at 2 steps), it stays the teacher grid's K."""
    from diffusers import LCMScheduler, TCDScheduler

    for gamma, cls in ((1.0, LCMScheduler), (0.0, TCDScheduler)):
        m = tiny_flash(tiny_teacher, K=32, sampler_gamma=gamma)
        config = m.scheduler_config()
        assert config["_class_name"] == cls.__name__ and config["original_inference_steps"] == 4
        sched = cls.from_config(config)
        for n, ts in m.sampling()["timesteps"].items():
            sched.set_timesteps(int(n))
            assert sched.timesteps.tolist() == ts
    assert tiny_flash(tiny_teacher, K=16, two_step_modes=[0, 3]).scheduler_config()["original_inference_steps"] == 16
    assert tiny_flash(tiny_teacher, K=16, two_step_modes=[0, 3], two_step_shift=1).scheduler_config()["original_inference_steps"] == 16


def test_presets_sampler_gamma_and_the_long_preset():
    digits = from_dict(FlashConfig, {**PRESETS["digits"], "teacher": "x"})
    long = from_dict(FlashConfig, {**PRESETS["digits-long"], "teacher": "x"})
    assert digits.sampler_gamma == 0.0 and from_dict(FlashConfig, {**PRESETS["sd"], "teacher": "x"}).sampler_gamma == 1.0
    assert long.train.steps == 4 * digits.train.steps and sum(long.phase_steps) == 4 * sum(digits.phase_steps)
    assert {k: v for k, v in vars(long).items() if k not in ("train", "phase_steps")} == \
        {k: v for k, v in vars(digits).items() if k not in ("train", "phase_steps")}
    with pytest.raises(ValueError, match=r"sampler_gamma must be in \[0, 1\].*got 1.5"):
        from_dict(FlashConfig, {"teacher": "x", "sampler_gamma": 1.5}).validate()


def test_sampler_gamma_is_recorded_used_and_exported(tiny_teacher, tmp_path):
    """A run records its gamma; sampling reads it; gamma < 1 exports diffusers' TCDScheduler
    (called with eta = gamma), gamma = 1 LCMScheduler."""
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import lcm_multistep, student_timesteps
    from flashdistill.sample import sample
    from flashdistill.train import train

    run = tmp_path / "run"
    train(tiny_flash(tiny_teacher, sampler_gamma=0.0, train={**TINY["train"], "steps": 2}), get_dataset("digits"), run,
          progress=False)
    meta = json.loads((run / "flashdistill.json").read_text())
    assert meta["sampling"]["gamma"] == 0.0 and meta["scheduler_config"]["_class_name"] == "TCDScheduler"
    assert json.loads((run / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "TCDScheduler"
    model = load_model(run)
    got = sample(model, ["7", "3"], [5, 6], 2, decode=False)
    g = [torch.Generator().manual_seed(k) for k in (5, 6)]
    draws = [torch.stack([torch.randn(model.image_shape, generator=gi) for gi in g]) for _ in range(2)]
    ts = student_timesteps(model.sampling, 2)
    with torch.no_grad():
        deterministic = lcm_multistep(model.denoiser, draws[0], ts, model.cond(["7", "3"]), model.schedule, draws[1:], gamma=0.0)
        lcm = lcm_multistep(model.denoiser, draws[0], ts, model.cond(["7", "3"]), model.schedule, draws[1:], gamma=1.0)
    torch.testing.assert_close(got, deterministic)
    assert not torch.allclose(deterministic, lcm)
    from flashdistill.exporting import export

    card = (export(run, tmp_path / "export") / "README.md").read_text()
    assert "gamma = 0" in card


def test_dmd_input_t_min_limits_dmd_to_high_noise_batches(tiny_teacher):
    from flashdistill.data.digits import get_dataset
    from flashdistill.train import DeterministicBatches

    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    for t_min, expect in ((0, True), (10_000, False)):
        m = tiny_flash(tiny_teacher, phase_steps=[0, 0, 0], dmd_input_t_min=t_min)
        m.setup("cpu")
        _, logs = m.step(batch, 10, m.models(), torch.Generator().manual_seed(0))
        assert ("dmd" in logs) is expect


def test_dmd_guidance_sets_the_real_scores_range_only(tiny_teacher, monkeypatch):
    """dmd_guidance = [lo, hi]: DMD's real score draws w in that range; the Eq. (2) target keeps
    guidance_min..guidance_max; [] (the reference) draws both from the target's range."""
    import flashdistill.methods.flash as flash_module
    from flashdistill.data.digits import get_dataset
    from flashdistill.train import DeterministicBatches

    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    original = flash_module.cfg_model
    for dmd_guidance, expect in (([], (1.0, 3.0)), ([5.0, 6.0], (5.0, 6.0))):
        ws = []

        def spy(denoiser, cond, uncond, w, **kw):
            ws.append(torch.as_tensor(w).clone())
            return original(denoiser, cond, uncond, w, **kw)

        monkeypatch.setattr(flash_module, "cfg_model", spy)
        m = tiny_flash(tiny_teacher, phase_steps=[0, 0, 0], dmd_guidance=dmd_guidance)
        m.setup("cpu")
        _, logs = m.step(batch, 10, m.models(), torch.Generator().manual_seed(0))
        assert "dmd" in logs and len(ws) == 2  # the target's solve, then DMD's real score
        target_w, dmd_w = ws
        assert 1.0 <= target_w.min() and target_w.max() <= 3.0
        assert expect[0] <= dmd_w.min() and dmd_w.max() <= expect[1]
    with pytest.raises(ValueError, match="dmd_guidance"):
        tiny_flash(tiny_teacher, dmd_guidance=[3.0, 2.0])


def test_guidance_intervals_reach_the_targets_solve_and_dmds_real_score(tiny_teacher, monkeypatch):
    """guidance_interval goes to the Eq. (2) solve's CFG, dmd_guidance_interval to DMD's real score;
    [] (the paper) guides everywhere. Bad intervals are refused naming the key."""
    import flashdistill.methods.flash as flash_module
    from flashdistill.data.digits import get_dataset
    from flashdistill.train import DeterministicBatches

    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    original = flash_module.cfg_model
    for target_iv, dmd_iv in (([], []), ([100, 500], [500, 999])):
        seen = []

        def spy(denoiser, cond, uncond, w, interval=None):
            seen.append(interval)
            return original(denoiser, cond, uncond, w, interval=interval)

        monkeypatch.setattr(flash_module, "cfg_model", spy)
        m = tiny_flash(tiny_teacher, phase_steps=[0, 0, 0], guidance_interval=target_iv, dmd_guidance_interval=dmd_iv)
        m.setup("cpu")
        _, logs = m.step(batch, 10, m.models(), torch.Generator().manual_seed(0))
        assert "dmd" in logs
        assert seen == [target_iv or None, dmd_iv or None]
    for key, bad in (("guidance_interval", [500, 100]), ("dmd_guidance_interval", [0, 1000]), ("guidance_interval", [1])):
        with pytest.raises(ValueError, match=rf"{key} must be \[\] or timesteps \[lo, hi\].*got {re.escape(str(bad))}"):
            tiny_flash(tiny_teacher, **{key: bad})


def test_teacher_sampling_with_a_guidance_interval(tiny_teacher):
    """sample_teacher's guidance_interval: one that holds every timestep gives plain CFG, one that
    holds none gives w = 1 (the cond branch alone), one in between neither."""
    from flashdistill.models.loading import load_model
    from flashdistill.sample import sample_teacher

    t = load_model(tiny_teacher)
    prompts, seeds = ["a handwritten digit three", "a handwritten digit seven"], [0, 1]
    guided, plain = (sample_teacher(t, prompts, seeds, 4, w) for w in (3.0, 1.0))
    torch.testing.assert_close(sample_teacher(t, prompts, seeds, 4, 3.0, guidance_interval=(0, 999)), guided)
    torch.testing.assert_close(sample_teacher(t, prompts, seeds, 4, 3.0, guidance_interval=(1000, 1000)), plain)
    part = sample_teacher(t, prompts, seeds, 4, 3.0, guidance_interval=(0, 500))
    assert not torch.allclose(part, guided) and not torch.allclose(part, plain)


def test_first_guidance_sets_the_range_of_targets_solved_from_the_first_grid_point(tiny_teacher, monkeypatch):
    """first_guidance = [lo, hi]: a target solved from grid[0] draws w in that range, one solved
    from any other grid point keeps guidance_min..guidance_max; [] draws both from the latter."""
    import flashdistill.methods.flash as flash_module
    from flashdistill.data.digits import get_dataset
    from flashdistill.train import DeterministicBatches

    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    original = flash_module.cfg_model
    for first_guidance, index, expect in (([5.0, 6.0], 0, (5.0, 6.0)), ([5.0, 6.0], 1, (1.0, 3.0)), ([], 0, (1.0, 3.0))):
        ws = []

        def spy(denoiser, cond, uncond, w, **kw):
            ws.append(torch.as_tensor(w).clone())
            return original(denoiser, cond, uncond, w, **kw)

        monkeypatch.setattr(flash_module, "cfg_model", spy)
        monkeypatch.setattr(flash_module, "sample_grid_index", lambda p, n, g: torch.tensor([index]))
        m = tiny_flash(tiny_teacher, phase_steps=[0, 0, 0], use_dmd=False, use_adv=False, first_guidance=first_guidance)
        m.setup("cpu")
        m.step(batch, 10, m.models(), torch.Generator().manual_seed(0))
        assert len(ws) == 1  # the target's solve
        assert expect[0] <= ws[0].min() and ws[0].max() <= expect[1]
    with pytest.raises(ValueError, match="first_guidance"):
        tiny_flash(tiny_teacher, first_guidance=[2.0])


# --- Teacher target, Eq. (2) -----------------------------------------------------------------

def test_teacher_target_equals_independent_diffusers_dpm_solver(tiny_teacher):
    from diffusers import DPMSolverMultistepScheduler

    m = tiny_flash(tiny_teacher)
    m.setup("cpu")
    unet, sch = m.teacher.denoiser.backbone, m.schedule
    prompts = ["the number 3", "7"]
    cond, uncond = m.teacher.cond(prompts), m.teacher.cond(["", ""])
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    index = 3
    t = m.grid[index].float().expand(2)
    x_t = sch.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    w = torch.tensor([1.5, 4.0])
    ours = m.teacher_target(x_t, index, cond, uncond, w)

    ref = DPMSolverMultistepScheduler(**sch.to_diffusers_config(), algorithm_type="dpmsolver++", solver_order=2,
                                      final_sigmas_type="zero", timestep_spacing="trailing")
    ref.set_timesteps(m.config.K)
    assert ref.timesteps.tolist() == m.grid.tolist()
    ref.set_begin_index(index)
    x, states = x_t.clone(), {}
    with torch.no_grad():
        for i, ts in enumerate(ref.timesteps[index:], start=index + 1):
            tt = ts.expand(2)
            eps_c = unet(x, tt, encoder_hidden_states=cond["encoder_hidden_states"]).sample
            eps_u = unet(x, tt, encoder_hidden_states=uncond["encoder_hidden_states"]).sample
            eps = eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u)
            x = states[i] = ref.step(eps, ts, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    # the consistency option's state K/4 points down is the same solve's state there
    same, kept = m.teacher_target(x_t, index, cond, uncond, w, keep=index + 2)
    assert torch.equal(same, ours)
    torch.testing.assert_close(kept, states[index + 2], rtol=1e-4, atol=1e-4)


def test_consistency_target_mixes_the_students_x0_from_the_solve_one_sampler_step_lower(tiny_teacher, monkeypatch):
    """consistency = c: Eq. (2)'s target becomes (1 - c) * solve + c * student(x_next, t_next) (no
    grad), x_next the solve's state K/4 grid points below t (or ``consistency_skip`` points); batches
    with no grid point that far below keep the solve."""
    import flashdistill.methods.flash as flash
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.student import StudentDenoiser
    from flashdistill.train import DeterministicBatches

    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    # K = 8: keep = index + 2 by default (K/4); index 6 has none; consistency_skip = 1: index + 1
    for c, index, skip in ((1.0, 0, 0), (0.25, 1, 0), (0.5, 6, 0), (0.5, 6, 1), (1.0, 7, 1)):
        m = tiny_flash(tiny_teacher, consistency=c, consistency_skip=skip, use_dmd=False, use_adv=False)
        keep = index + (skip or 2)
        m.setup("cpu")
        models = m.models()
        with torch.no_grad():  # a LoRA away from zero, so that the student differs from the teacher
            for p in models["student"].parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        seen, real = {}, m.teacher_target
        monkeypatch.setattr(flash, "sample_grid_index", lambda *a: torch.tensor([index]))
        monkeypatch.setattr(m, "teacher_target", lambda *a, **k: seen.setdefault("solve", real(*a, **k)))

        def recording_loss(pred, target, kind):
            seen["target"] = target
            return ((pred - target) ** 2).mean(), {}

        monkeypatch.setattr(flash, "distillation_loss", recording_loss)
        m.step(batch, 10, models, torch.Generator().manual_seed(0))
        if keep < m.config.K:
            solve, x_next = seen["solve"]
            with torch.no_grad():
                x0_next = StudentDenoiser(models["student"], m.schedule)(x_next, m.grid[keep].float().expand(4), m.inputs(
                    batch, torch.Generator().manual_seed(0))[1])
            assert not torch.allclose(x0_next, solve, atol=1e-3)
            torch.testing.assert_close(seen["target"], (1 - c) * solve + c * x0_next)
        else:
            assert torch.equal(seen["target"], seen["solve"])
        assert not seen["target"].requires_grad
    with pytest.raises(ValueError, match="consistency"):
        tiny_flash(tiny_teacher, consistency=1.5)
    with pytest.raises(ValueError, match="consistency_skip"):
        tiny_flash(tiny_teacher, consistency=0.5, consistency_skip=8)


def test_backward_simulation_trains_on_the_students_own_sampler_state(tiny_teacher, monkeypatch):
    """backward_simulation = p: a batch below the first grid point takes as x_t the state the
    student's own sampler reaches at t (its calls above t, each move as the sampler's), and the
    teacher's target is solved from it; batches at the first grid point keep the noised real sample."""
    import flashdistill.methods.flash as flash
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.student import StudentDenoiser, lcm_multistep
    from flashdistill.train import DeterministicBatches

    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    m = tiny_flash(tiny_teacher, backward_simulation=1.0, sampler_gamma=0.5, use_dmd=False, use_adv=False)
    m.setup("cpu")
    models = m.models()
    with torch.no_grad():  # a LoRA away from zero: the student's state differs from the teacher's
        for p in models["student"].parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    student = models["student"]
    cond = m.inputs(batch, torch.Generator().manual_seed(0))[1]
    # K = 8: the 4-step sampler calls at 999, 749, 499, 249; t = grid[5] has three calls above it
    t = m.grid[5].float().expand(4)
    assert m.sampling()["timesteps"]["4"] == [999, 749, 499, 249] and float(t[0]) not in (999, 749, 499, 249)
    got = m.simulated_state(student, (4, 1, 8, 8), t, cond, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    x, noises, seen = torch.randn(4, 1, 8, 8, generator=g), [torch.randn(4, 1, 8, 8, generator=g) for _ in range(3)], {}

    def recording(x_t, tt, c):
        seen[int(tt[0])] = x_t
        return StudentDenoiser(student, m.schedule)(x_t, tt, c)

    with torch.no_grad():
        lcm_multistep(recording, x, torch.tensor([999, 749, 499, int(t[0])]), cond, m.schedule, noises, gamma=0.5)
    torch.testing.assert_close(got, seen[int(t[0])])
    assert not torch.allclose(got, seen[499], atol=1e-2)
    # in a training step: the simulated state goes to the teacher's solve and to the student
    for index, simulated in ((5, True), (0, False)):
        monkeypatch.setattr(flash, "sample_grid_index", lambda *a: torch.tensor([index]))
        state = torch.full((4, 1, 8, 8), 0.25)
        monkeypatch.setattr(m, "simulated_state", lambda *a: state)
        solves = []
        monkeypatch.setattr(m, "teacher_target", lambda x_t, *a, **k: solves.append(x_t) or torch.zeros_like(x_t))
        m.step(batch, 10, models, torch.Generator().manual_seed(0))
        assert torch.equal(solves[0], state) is simulated
    with pytest.raises(ValueError, match="backward_simulation"):
        tiny_flash(tiny_teacher, backward_simulation=2.0)
    with pytest.raises(ValueError, match="backward_simulation_steps"):
        tiny_flash(tiny_teacher, backward_simulation_steps=3)


# --- Losses ----------------------------------------------------------------------------------

def _gaussian_x0(mu, s2, schedule):
    """Exact x0 denoiser of N(mu, s2 I) data: E[x0 | x_t]."""
    def f(x_t, t):
        a = schedule.alpha(t).float().view(-1, 1)
        sg = schedule.sigma(t).float().view(-1, 1)
        k = a * s2 / (a**2 * s2 + sg**2)
        return mu + k * (x_t - a * mu)
    return f


def test_dmd_gradient_moves_student_samples_towards_teacher_distribution():
    """Toy case with a known answer: teacher data N(mu_r, s2), student samples N(mu_f, s2) with exact
    denoisers for both. The DMD gradient must point along mu_f - mu_r, so descent moves the student
    samples' mean to mu_r."""
    sch = VPSchedule()
    g = torch.Generator().manual_seed(0)
    mu_r, mu_f, s2 = torch.tensor([1.0, -0.5]), torch.tensor([-1.0, 0.5]), 0.25
    real, fake = _gaussian_x0(mu_r, s2, sch), _gaussian_x0(mu_f, s2, sch)
    x = (mu_f + s2**0.5 * torch.randn(512, 2, generator=g)).requires_grad_(True)
    t = torch.randint(20, 980, (512,), generator=g).float()
    noisy = sch.add_noise(x.detach(), torch.randn(512, 2, generator=g), t)
    loss, logs = dmd_loss(x, real(noisy, t), fake(noisy, t))
    loss.backward()
    direction = x.grad.mean(0)
    cos = torch.nn.functional.cosine_similarity(direction, mu_f - mu_r, dim=0)
    assert cos > 0.99
    # a few descent steps on the samples themselves (fresh noise each time) move them to mu_r
    y = x.detach().clone()
    for _ in range(200):
        y.requires_grad_(True)
        t = torch.randint(20, 980, (512,), generator=g).float()
        noisy = sch.add_noise(y.detach(), torch.randn(512, 2, generator=g), t)
        l, _ = dmd_loss(y, real(noisy, t), fake(noisy, t))
        (gy,) = torch.autograd.grad(l, y)
        y = (y - 0.5 * 512 * gy).detach()
        fake = _gaussian_x0(y.mean(0), s2, sch)  # the student's score follows its samples
    assert (y.mean(0) - mu_r).abs().max() < 0.1
    assert torch.isfinite(logs["dmd"])


def test_dmd_is_zero_when_student_matches_teacher():
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    same = torch.randn(4, 1, 8, 8)
    loss, _ = dmd_loss(x, same, same)
    loss.backward()
    assert loss.item() == 0 and x.grad.abs().max() == 0


def test_gan_losses_values():
    real, fake = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])
    assert discriminator_loss(real, fake, "lsgan")[0].item() == pytest.approx(0.5 * (0.125 + 0.125))
    assert generator_adv_loss(fake, "lsgan")[0].item() == pytest.approx(0.5 * (1 + 0.25) / 2)
    assert discriminator_loss(real, fake, "hinge")[0].item() == pytest.approx(0.25 + 1.25)
    assert discriminator_loss(real, fake, "wgan")[0].item() == pytest.approx(0.25 - 0.75)
    assert generator_adv_loss(fake, "hinge")[0].item() == pytest.approx(-0.25)
    p, tgt = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 0.0])
    assert distillation_loss(p, tgt, "mse")[0].item() == pytest.approx(5.0)
    assert distillation_loss(p, tgt, "l1")[0].item() == pytest.approx(2.0)
    assert distillation_loss(p, tgt, "huber")[0].item() == pytest.approx((0.5 + 2.5) / 2)
    with pytest.raises(ValueError, match="nope"):
        distillation_loss(p, tgt, "nope")


# --- The training step -----------------------------------------------------------------------

def test_adversarial_renoising_uses_t_prime_and_shared_noise(tiny_teacher, monkeypatch):
    """The reference collapses off-grid t' to the last grid point; ours must re-noise real and student
    samples with the same noise at exactly t' in adv_timesteps, with the schedule's own alphas."""
    from flashdistill.data.digits import get_dataset
    from flashdistill.train import DeterministicBatches

    m = tiny_flash(tiny_teacher, phase_steps=[0, 0, 0])  # phase 3: every loss is on
    m.setup("cpu")
    calls = []
    original = VPSchedule.add_noise

    def spy(self, x0, noise, t):
        out = original(self, x0, noise, t)
        calls.append((x0.detach(), noise.detach(), torch.as_tensor(t).detach(), out.detach()))
        return out

    monkeypatch.setattr(VPSchedule, "add_noise", spy)
    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    m.step(batch, 10, m.models(), torch.Generator().manual_seed(0))
    is_adv = [set(c[2].tolist()) <= {10.0, 250.0, 500.0, 750.0} for c in calls]
    adv = [c for c, a in zip(calls, is_adv) if a]
    assert len(adv) == 2, [c[2].tolist() for c in calls]
    (x_real, n_real, t_real, out_real), (x_fake, n_fake, t_fake, out_fake) = adv
    assert torch.equal(n_real, n_fake) and torch.equal(t_real, t_fake)
    assert not torch.isin(t_real, m.grid.float()).all()  # off-grid values are used as such
    a = VPSchedule().alpha(t_real).float().view(-1, 1, 1, 1)
    s = VPSchedule().sigma(t_real).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(out_real, a * x_real + s * n_real)
    # DMD re-noising happens at integer t'' in [dmd_t_min, dmd_t_max], not snapped to the grid
    dmd = [c for c, a in zip(calls, is_adv) if not a and not torch.isin(c[2], m.grid.float()).all()]
    assert dmd, "no off-grid DMD re-noising call"


def test_lora_student_starts_as_teacher_and_only_lora_trains(tiny_teacher):
    from flashdistill.models.student import StudentDenoiser

    m = tiny_flash(tiny_teacher)
    assert 0 < m.trainable < 0.2 * m.total
    names = [n for n, p in m.student.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    # LoRA B starts at zero: the student's x0 equals the teacher's x0 with the boundary scaling
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([999.0, 499.0])
    cond = m.teacher.cond(["1", "2"])
    with torch.no_grad():
        torch.testing.assert_close(StudentDenoiser(m.student, m.schedule)(x, t, cond),
                                   StudentDenoiser(m.teacher.denoiser.backbone, m.schedule)(x, t, cond))


def test_trained_fake_score_is_a_lora_that_learns_the_student_samples(tiny_teacher, monkeypatch):
    """dmd_fake_score=trained (DMD2): a third model, a LoRA of the teacher, trained each step by
    denoising the student's samples; the DMD term reads its x0, not the student's."""
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.denoiser import Denoiser
    from flashdistill.train import DeterministicBatches

    assert "fake" not in tiny_flash(tiny_teacher).models()
    assert "fake" not in tiny_flash(tiny_teacher, dmd_fake_score="trained", use_dmd=False).models()
    m = tiny_flash(tiny_teacher, phase_steps=[0, 0, 0], dmd_fake_score="trained", fake_lr=3e-3)
    assert m.optimizer_settings("fake")["lr"] == 3e-3
    names = [n for n, p in m.fake.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)
    m.setup("cpu")
    seen = []
    original = Denoiser.forward

    def spy(self, x_t, t, cond):
        out = original(self, x_t, t, cond)
        seen.append(self.backbone)
        return out

    monkeypatch.setattr(Denoiser, "forward", spy)
    batch = DeterministicBatches(get_dataset("digits"), 4, 1, 0, 0, 1).get(0, 0)
    losses, logs = m.step(batch, 10, m.models(), torch.Generator().manual_seed(0))
    assert [n for n, _ in losses] == ["student", "disc", "fake"] and "fake_dsm" in logs
    assert any(b is m.fake for b in seen)  # DMD's fake x0 came from the fake-score model
    fake_loss = dict(losses)["fake"]
    # the fake-score loss does not reach the student
    student_params = [p for p in m.student.parameters() if p.requires_grad]
    assert all(g is None for g in torch.autograd.grad(fake_loss, student_params, allow_unused=True, retain_graph=True))
    grads = torch.autograd.grad(fake_loss, [p for p in m.fake.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_target_reuse_solves_every_rth_step_replays_kept_batches_and_resumes_exactly(tiny_teacher, tmp_path, monkeypatch):
    """target_reuse = R: the teacher solves at steps 0, R, 2R, ... only; the steps between train on
    one of the last replay_batches solved batches; the buffer travels with each checkpoint (per
    process), so a run resumed between solves is bit-identical to an unbroken one."""
    from flashdistill.data.digits import get_dataset
    from flashdistill.train import train

    solves, replayed = [], []  # steps whose batch the teacher solved; per other step, whether it came from the buffer
    real_solve, real_pick = FlashDistillation.teacher_target, FlashDistillation._solved_batch

    def counting_solve(self, *args):
        solves.append(self.current_step)
        return real_solve(self, *args)

    def recording_pick(self, batch, step, generator, student):
        self.current_step, kept = step, list(self.replay)
        picked = real_pick(self, batch, step, generator, student)
        if not solves or solves[-1] != step:
            replayed.append(any(picked is e for e in kept))
        return picked

    monkeypatch.setattr(FlashDistillation, "teacher_target", counting_solve)
    monkeypatch.setattr(FlashDistillation, "_solved_batch", recording_pick)
    ds = get_dataset("digits")
    over = {"target_reuse": 3, "replay_batches": 2, "train": {**TINY["train"], "steps": 7, "checkpoint_every": 1}}
    full = tmp_path / "full"
    train(tiny_flash(tiny_teacher, **over), ds, full, progress=False)
    assert solves == [0, 3, 6] and replayed == [True] * 4
    split = tmp_path / "split"
    train(tiny_flash(tiny_teacher, **{**over, "train": {**over["train"], "steps": 4}}), ds, split, progress=False)
    solves.clear()
    train(tiny_flash(tiny_teacher, **over), ds, split, resume=True, progress=False)
    assert solves == [6]  # steps 4 and 5 replayed the restored buffer
    a, b = _weights(full), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="target_reuse"):
        tiny_flash(tiny_teacher, target_reuse=0)


def test_full_student_trains_every_weight(tiny_teacher):
    m = tiny_flash(tiny_teacher, full=True)
    assert m.trainable == m.total


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "student_lora.safetensors"))


def test_flash_train_resume_sample_and_logs(tiny_teacher, tmp_path):
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.loading import load_model
    from flashdistill.sample import sample
    from flashdistill.train import train

    ds = get_dataset("digits")
    full = tmp_path / "full"
    train(tiny_flash(tiny_teacher), ds, full, progress=False)
    split = tmp_path / "split"
    train(tiny_flash(tiny_teacher, train={**TINY["train"], "steps": 2}), ds, split, progress=False)
    train(tiny_flash(tiny_teacher), ds, split, resume=True, progress=False)
    a, b = _weights(full), _weights(split)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k  # a resumed run is bit-identical to an unbroken one
    log_full = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    log_split = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    measured = ("time", "peak_mem_gb")  # wall time and memory, not values of the run
    assert [{k: v for k, v in r.items() if k not in measured} for r in log_split] == \
        [{k: v for k, v in r.items() if k not in measured} for r in log_full]  # every logged value, every step
    # the LoRA moved away from its initialisation (lora_B starts at zero)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    logs = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert {"distill", "adv_d", "d_real", "d_fake", "dmd", "phase"} <= set(logs[-1])
    # the run folder samples with its own timesteps and no CFG
    meta = json.loads((full / "flashdistill.json").read_text())
    assert meta["sampling"]["timesteps"] == {"1": [999], "2": [999, 499], "4": [999, 749, 499, 249]}
    model = load_model(full)
    # image i depends on its own prompt and seed only: the same item beside another prompt and seed
    # is bit-identical (same batch size, so the same CPU kernels; a batch of 1 may round differently)
    x1 = sample(model, ["7", "3"], [5, 6], 2)
    x2 = sample(model, ["9", "3"], [11, 6], 2)
    assert torch.equal(x1[1], x2[1]) and not torch.equal(x1[0], x2[0])
    with pytest.raises(ValueError, match="steps"):
        sample(model, ["7"], [0], 3)
    assert (full / "scheduler" / "scheduler_config.json").is_file()
    # the demo's comparison table: same prompts/seeds, NFE accounting, finite metrics
    from flashdistill.demo import comparison_rows

    rows = comparison_rows(load_model(tiny_teacher), model, 20, 1.5)
    assert [(r["method"], r["steps"], r["nfe"]) for r in rows] == [
        ("teacher dpmpp_2m", 32, 64), ("teacher dpmpp_2m", 1, 2), ("teacher dpmpp_2m", 1, 1),
        ("teacher dpmpp_2m", 2, 4), ("teacher dpmpp_2m", 2, 2), ("teacher dpmpp_2m", 4, 8), ("teacher dpmpp_2m", 4, 4),
        ("flash student", 1, 1), ("flash student", 2, 2), ("flash student", 4, 4)]
    assert rows[0]["teacher_mse"] == 0.0
    assert all(torch.isfinite(torch.tensor([r["fd"], r["adherence"], r["teacher_mse"]])).all() for r in rows)


@pytest.mark.skipif(os.environ.get("FLASHDISTILL_SKIP_MULTIPROC") == "1", reason="multi-process test disabled")
def test_two_process_run_keeps_ranks_identical(tiny_teacher, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU-only machine (gloo, MULTI_CPU) runs the same command; both ranks end identical."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "flashdistill.cli", "distill", "--teacher", str(tiny_teacher), "--out", str(out),
           "--set", "lora_rank=2", "--set", "K=8", "--set", "phase_steps=[1,1,1]",
           "--set", "train.steps=3", "--set", "train.batch_size=2", "--set", "train.checkpoint_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads((out / "ranks.json").read_text())
    assert ranks["processes"] == 2
    for name, sums in ranks["checksums"].items():
        assert len(sums) == 2 and sums[0] == sums[1], (name, sums)
    assert any(abs(v) > 0 for k, v in _weights(out).items() if "lora_B" in k for v in v.flatten()[:1].tolist())


def test_fused_student_equals_adapter_student(tiny_teacher, tmp_path):
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.loading import load_student
    from flashdistill.train import train

    train(tiny_flash(tiny_teacher), get_dataset("digits"), tmp_path / "run", progress=False)
    fused, adapter = load_student(tmp_path / "run"), load_student(tmp_path / "run", fuse=False)
    assert not any("lora" in n for n, _ in fused.denoiser.named_parameters())
    assert any("lora" in n for n, _ in adapter.denoiser.named_parameters())
    x, t, cond = torch.randn(3, 1, 8, 8), torch.tensor([999.0, 499.0, 10.0]), fused.cond(["1", "2", "3"])
    with torch.no_grad():
        torch.testing.assert_close(fused.denoiser(x, t, cond), adapter.denoiser(x, t, cond), rtol=1e-4, atol=1e-5)


def test_export_digits_student_with_metrics_in_the_model_card(tiny_teacher, tmp_path):
    from flashdistill.cli import main
    from flashdistill.data.digits import get_dataset
    from flashdistill.train import train

    train(tiny_flash(tiny_teacher), get_dataset("digits"), tmp_path / "run", progress=False)
    assert main(["export", "--model", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--num-samples", "20"]) == 0
    card = (tmp_path / "x" / "README.md").read_text()
    assert "| 2 | 2 |" in card and "20 samples per row" in card
    assert json.loads((tmp_path / "x" / "flashdistill_sampling.json").read_text())["timesteps"]["2"] == [999, 499]
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "x" / "pytorch_lora_weights.safetensors")))
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys)
