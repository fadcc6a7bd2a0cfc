"""LCM and SPLAM: their key equations against independent re-derivations (diffusers' schedulers,
a Monte-Carlo forward process), the CFG convention, and each method on the one training loop
(checkpoints, exact resume with an EMA target, sampling, export)."""
import json
import warnings

import pytest
import torch

from flashdistill.config import from_dict
from flashdistill.core.schedules import VPSchedule, lcm_boundary_scalings
from flashdistill.core.solvers import cfg_model, ddim_move, guidance_from_lcm_w, lcm_w_from_guidance
from flashdistill.core.timesteps import lcm_inference_timesteps, next_on_grid, skipping_grid
from flashdistill.losses import consistency_loss
from flashdistill.methods import METHODS, method_module
from flashdistill.methods.lcm import LCMConfig, LCMDistillation, build_config as build_lcm_config
from flashdistill.methods.splam import SPLAMConfig, SPLAMDistillation, subpath_input_scale, subpath_point, subpath_sigma

TINY_TRAIN = {"steps": 2, "batch_size": 4, "checkpoint_every": 1, "log_every": 1, "sample_every": 0}


def tiny(cls, cfg_cls, teacher, **over):
    data = {"teacher": str(teacher), "N": 10, "lora_rank": 2, "lr": 1e-2, "guidance": 1.5, "train": dict(TINY_TRAIN)}
    for k, v in over.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    return cls(from_dict(cfg_cls, data))


@pytest.mark.parametrize("N", [50, 16, 10])
def test_skipping_grid_and_inference_timesteps_are_lcm_schedulers(N):
    from diffusers import LCMScheduler

    sch = VPSchedule()
    grid = skipping_grid(sch, N)
    k = 1000 // N
    assert grid.tolist() == [float((i + 1) * k - 1) for i in reversed(range(N))]
    lcm = LCMScheduler(**sch.to_diffusers_config(), original_inference_steps=N)
    for steps in (1, 2, 4, 8):
        if steps <= N:
            lcm.set_timesteps(steps)
            assert lcm_inference_timesteps(grid, steps) == [float(t) for t in lcm.timesteps.tolist()]
    # the step past the grid's last point is t = 0 (LCM's max(t - k, 0))
    assert next_on_grid(grid, torch.tensor([0, N - 1]), 1).tolist() == [grid[1].item(), 0.0]


def test_cfg_convention_converts_lcm_w_to_diffusers_guidance():
    torch.manual_seed(0)
    x0_c, x0_u = torch.randn(3, 4), torch.randn(3, 4)

    def denoiser(x, t, cond):  # rows whose c is 0 are the cond branch, 1 the uncond branch
        rows = torch.arange(len(x)) % 3
        return torch.where(cond["c"][:, None] == 0, x0_c[rows], x0_u[rows])

    for w in (0.0, 0.5, 7.5):
        g = guidance_from_lcm_w(w)
        assert lcm_w_from_guidance(g) == w
        ours = cfg_model(denoiser, {"c": torch.zeros(3)}, {"c": torch.ones(3)}, g)(torch.zeros(3, 4), torch.zeros(3))
        torch.testing.assert_close(ours, x0_c + w * (x0_c - x0_u))  # LCM's form, written out


def test_lcm_teacher_step_is_diffusers_ddim_with_lcm_guidance(tiny_teacher):
    """The skipping-step target's teacher half: from x_t at grid[i], LCM's guided DDIM step (eps
    and x0 both guided in LCM's form) equals diffusers' DDIMScheduler step to t - k, whose last
    step (t = k - 1) ends at alphas_cumprod[0] as LCM's solver (set_alpha_to_one = False)."""
    from diffusers import DDIMScheduler

    m = tiny(LCMDistillation, LCMConfig, tiny_teacher, teacher_steps=1)
    m.setup("cpu")
    sch, unet = m.schedule, m.teacher.denoiser.backbone
    N, k, g = m.config.N, 1000 // m.config.N, m.config.guidance
    ddim = DDIMScheduler(**sch.to_diffusers_config(), timestep_spacing="leading", steps_offset=k - 1,
                         set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(N)
    assert ddim.timesteps.tolist() == m.grid.long().tolist()
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    cond, uncond = m.teacher.cond(prompts), m.teacher.uncond(2)
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for i in (0, 4, N - 1):
        t = int(m.grid[i])
        with torch.no_grad():
            eps_c = unet(x_t, t, **cond).sample
            eps_u = unet(x_t, t, **uncond).sample
        w = lcm_w_from_guidance(g)
        ref = ddim.step(eps_c + w * (eps_c - eps_u), t, x_t).prev_sample
        ours = m.teacher_solve(x_t, torch.tensor([i, i]), cond, uncond)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the target at the last cell is the solver's output itself (c_skip(0) = 1, c_out(0) = 0)
    assert lcm_boundary_scalings(torch.tensor(0.0)) == (1.0, 0.0)


def test_teacher_steps_chain_ddim_moves_and_stop_at_zero(tiny_teacher):
    m = tiny(LCMDistillation, LCMConfig, tiny_teacher, teacher_steps=3)
    m.setup("cpu")
    cond, uncond = m.teacher.cond(["a handwritten digit one"] * 2), m.teacher.uncond(2)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([2, m.config.N - 2])  # the second sample has one grid point left, then t = 0
    ref = []
    for b, i in enumerate(idx.tolist()):
        xb = x[b: b + 1]
        ts = [m.grid[j].item() for j in range(i, min(i + 3, m.config.N))] + ([0.0] if i + 3 >= m.config.N else [m.grid[i + 3].item()])
        for t, t_n in zip(ts[:-1], ts[1:]):
            tt, tn = torch.tensor([t]), torch.tensor([t_n])
            xb = ddim_move(xb, cfg_model(m.teacher.denoiser, {k: v[b: b + 1] for k, v in cond.items()},
                                         {k: v[b: b + 1] for k, v in uncond.items()}, m.config.guidance)(xb, tt.float()),
                           tt, tn, m.schedule)
        ref.append(xb)
    torch.testing.assert_close(m.teacher_solve(x, idx, cond, uncond), torch.cat(ref), rtol=1e-5, atol=1e-5)


def test_consistency_losses():
    a, b = torch.tensor([0.0, 3.0]), torch.tensor([0.0, -1.0])
    assert consistency_loss(a, b, "l2")[0].item() == pytest.approx(8.0)
    c = 0.5
    assert consistency_loss(a, b, "huber", c)[0].item() == pytest.approx(((16 + c * c) ** 0.5 - c) / 2)
    with pytest.raises(ValueError, match="unknown consistency loss 'l3'"):
        consistency_loss(a, b, "l3")


def test_splam_subpath_ends_and_sigma_ends():
    sch = VPSchedule()
    t, t_n = torch.tensor([999.0, 519.0]), torch.tensor([979.0, 499.0])
    a, s, a_n, s_n = sch.alpha(t), sch.sigma(t), sch.alpha(t_n), sch.sigma(t_n)
    r = a / a_n
    x_t, x_n = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    one, zero = torch.ones(2), torch.zeros(2)
    torch.testing.assert_close(subpath_point(x_t, x_n, r, one), x_t)
    torch.testing.assert_close(subpath_point(x_t, x_n, r, zero), (r[:, None] * x_n.double()).float())
    for form in ("code", "linear"):
        torch.testing.assert_close(subpath_sigma(s, s_n, r, one, form), s)
        torch.testing.assert_close(subpath_sigma(s, s_n, r, zero, form), r * s_n)
    with pytest.raises(ValueError, match="unknown sigma form"):
        subpath_sigma(s, s_n, r, one, "cubic")


def test_splam_code_sigma_is_the_noise_of_the_subpath_point():
    """Monte Carlo over the true forward process: x_t' = a' x0 + s' e1 and x_t = (a/a') x_t' +
    sqrt(s^2 - (a s'/a')^2) e2; the noise in z_gamma then has the code form's std."""
    sch = VPSchedule()
    t, t_n = torch.tensor(600.0), torch.tensor(580.0)
    a, s, a_n, s_n = (f(v) for f, v in ((sch.alpha, t), (sch.sigma, t), (sch.alpha, t_n), (sch.sigma, t_n)))
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = torch.zeros(n, dtype=torch.float64)
    x_n = a_n * x0 + s_n * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = (a / a_n) * x_n + (s**2 - (a * s_n / a_n) ** 2).sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    for gamma in (0.0, 0.3, 0.8, 1.0):
        z = subpath_point(x_t[:, None], x_n[:, None], (a / a_n).expand(n), torch.full((n,), gamma))
        expected = subpath_sigma(s[None], s_n[None], (a / a_n)[None], torch.tensor([gamma]), "code")
        assert z.std().item() == pytest.approx(expected.item(), rel=5e-3)


@pytest.mark.parametrize("t_val", [999.0, 600.0, 39.0])
def test_splam_linear_sigma_is_exact_on_a_ddim_move(t_val):
    """x_t' from a DDIM move of x_t with the true x0 (SPLAM's teacher step, exact): x_t and x_t'
    carry the same noise, so z_gamma = alpha_t x0 + sigma(gamma, t) eps with the paper's linear
    sigma exactly (the code's form, exact for fresh forward noise, is not, for 0 < gamma < 1)."""
    from flashdistill.core.solvers import ddim_move

    sch = VPSchedule()
    t, t_n = torch.tensor([t_val]), torch.tensor([t_val - 20])
    a, s, a_n, s_n = sch.alpha(t), sch.sigma(t), sch.alpha(t_n), sch.sigma(t_n)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 64, generator=g, dtype=torch.float64), torch.randn(1, 64, generator=g, dtype=torch.float64)
    x_t = a[:, None] * x0 + s[:, None] * eps
    x_n = ddim_move(x_t, x0, t, t_n, sch)
    for gamma in (0.0, 0.5, 1.0):
        gam = torch.tensor([gamma], dtype=torch.float64)
        z = subpath_point(x_t, x_n, a / a_n, gam)
        linear = subpath_sigma(s, s_n, a / a_n, gam, "linear")
        torch.testing.assert_close(z, a[:, None] * x0 + linear[:, None] * eps, rtol=0, atol=1e-9)
        if gamma == 0.5:
            code = subpath_sigma(s, s_n, a / a_n, gam, "code")
            assert not torch.allclose(z, a[:, None] * x0 + code[:, None] * eps, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t_val", [999.0, 600.0, 39.0])
def test_splam_variance_input_scale_gives_z_gamma_the_variance_of_x_t(t_val):
    """input_scale = "variance": for unit-variance data, c_in z_gamma has x_t's variance
    (alpha_t^2 + sigma_t^2 = 1) at every gamma (Monte Carlo over the true forward process), and
    c_in = 1 at gamma = 1."""
    sch = VPSchedule()
    t, t_n = torch.tensor(t_val), torch.tensor(t_val - 20)
    a, s, a_n, s_n = (f(v) for f, v in ((sch.alpha, t), (sch.sigma, t), (sch.alpha, t_n), (sch.sigma, t_n)))
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x0 = torch.randn(n, generator=g, dtype=torch.float64)
    x_n = a_n * x0 + s_n * torch.randn(n, generator=g, dtype=torch.float64)
    x_t = (a / a_n) * x_n + (s**2 - (a * s_n / a_n) ** 2).sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
    for gamma in (0.0, 0.5, 1.0):
        gam = torch.tensor([gamma])
        z = subpath_point(x_t[:, None], x_n[:, None], (a / a_n).expand(n), torch.full((n,), gamma))
        c_in = subpath_input_scale(a[None], s[None], subpath_sigma(s[None], s_n[None], (a / a_n)[None], gam, "code"))
        assert (c_in * z.std()).item() == pytest.approx((a**2 + s**2).sqrt().item(), rel=5e-3)
        if gamma == 1.0:
            assert c_in.item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("input_scale,input_time", [("none", "t"), ("variance", "t"), ("none", "snr")])
def test_splam_gamma_embedding_is_exactly_zero_at_gamma_one(tiny_teacher, monkeypatch, input_scale, input_time):
    """At gamma = 1 the online prediction equals the LCM student without the projection, even with
    non-zero projection weights: the branch can be dropped after training."""
    from flashdistill.models.student import StudentDenoiser, fourier_features

    assert fourier_features(torch.zeros(3), 8).abs().max() == 0
    assert fourier_features(torch.full((1,), 0.3), 8).abs().max() > 0
    m = tiny(SPLAMDistillation, SPLAMConfig, tiny_teacher, gamma_dim=8, input_scale=input_scale, input_time=input_time)
    m.setup("cpu")
    proj = m.student.time_embedding.cond_proj
    assert proj.weight.requires_grad and proj.weight.abs().max() == 0  # starts as the teacher
    torch.nn.init.normal_(proj.weight)
    cond = m.teacher.cond(["a handwritten digit two"] * 2)
    x_t, x_n = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t, t_n = torch.tensor([599.0, 299.0]), torch.tensor([499.0, 199.0])

    # gamma ~ U[0, 1] replaced by gamma = 1
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.ones(n, dtype=kw.get("dtype", torch.float32)))
    pred, _ = m.online({"student": m.student}, x_t, x_n, t, t_n, cond, None)
    monkeypatch.undo()
    with torch.no_grad():
        lcm = StudentDenoiser(m.student, m.schedule)(x_t, t, cond)
    torch.testing.assert_close(pred.detach(), lcm, rtol=1e-6, atol=1e-6)


def test_splam_snr_input_time_at_gamma_zero_reads_the_skip_end(tiny_teacher):
    """input_time = "snr": z_gamma at gamma = 0 is (alpha_t / alpha_t') x_t', whose signal-to-noise
    ratio is t''s, so the network sees x_t' itself at timestep t'."""
    from flashdistill.core.schedules import lcm_boundary_scalings
    from flashdistill.models.student import StudentDenoiser

    m = tiny(SPLAMDistillation, SPLAMConfig, tiny_teacher, gamma_dim=8, input_time="snr")
    m.setup("cpu")
    cond = m.teacher.cond(["a handwritten digit two"] * 2)
    x_t, x_n = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t, t_n = torch.tensor([599.0, 299.0]), torch.tensor([479.5, 199.0])
    with torch.no_grad():
        pred, _ = m.online({"student": m.student}, x_t, x_n, t, t_n, cond, None, gamma=torch.zeros(2))
        x0 = StudentDenoiser(m.student, m.schedule)(x_n, t_n, cond)  # zero projection: the student at step 0
    ratio = (m.schedule.alpha(t) / m.schedule.alpha(t_n)).view(2, 1, 1, 1)
    c_skip, c_out = (v.view(2, 1, 1, 1) for v in lcm_boundary_scalings(t))
    torch.testing.assert_close(pred, (c_skip * ratio * x_n + c_out * x0).float(), rtol=1e-5, atol=1e-5)


def test_lcm_and_splam_sample_at_the_grid_points_they_are_given(tiny_teacher):
    """LCM and SPLAM share CoDi's sampler keys: their 2- and 4-step samplers sit at the given points of
    the N-grid ([]: LCMScheduler's pick); points off that grid, out of order or of the wrong count are
    refused, naming them. The digits presets: LCM at LCMScheduler's picks, SPLAM at [999, 299] and
    [999, 399, 199, 99]."""
    from flashdistill.config import ConfigError
    from flashdistill.methods.splam import build_config as build_splam_config

    assert build_lcm_config(tiny_teacher, "digits")[0].sampler_tables() == {2: [], 4: []}
    assert build_splam_config(tiny_teacher, "digits")[0].sampler_tables() == {2: [999, 299], 4: [999, 399, 199, 99]}
    for cls, cfg_cls in ((LCMDistillation, LCMConfig), (SPLAMDistillation, SPLAMConfig)):
        m = tiny(cls, cfg_cls, tiny_teacher, two_step_timesteps=[999, 199], four_step_timesteps=[])
        m.setup("cpu")
        assert m.sampling()["timesteps"] == {"1": [999], "2": [999, 199], "4": [999, 799, 499, 299]}
        with pytest.raises(ValueError, match=r"four_step_timesteps: \[350\] not on the N = 10 grid .*999, 899, 799, ..., 99"):
            tiny(cls, cfg_cls, tiny_teacher, four_step_timesteps=[999, 599, 350, 99]).setup("cpu")
        for bad in ([199, 999], [999], [999, 199, 99]):
            with pytest.raises((ValueError, ConfigError), match="two_step_timesteps must be .* from high to low"):
                tiny(cls, cfg_cls, tiny_teacher, two_step_timesteps=bad)


@pytest.mark.parametrize("name", ["lcm", "splam"])
def test_method_trains_samples_and_exports(tiny_teacher, tmp_path, name):
    from diffusers import LCMScheduler

    from flashdistill.data.digits import get_dataset
    from flashdistill.exporting import export
    from flashdistill.models.loading import load_model
    from flashdistill.sample import sample
    from flashdistill.train import train

    module = method_module(name)
    cfg, preset = module.build_config(tiny_teacher, "auto", {"N": 10, "lora_rank": 2, "lr": 1e-2, "train": dict(TINY_TRAIN)})
    assert preset == "digits" and name in METHODS
    method = module.Method(cfg)
    run = tmp_path / "run"
    train(method, get_dataset("digits"), run, progress=False)
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(r["consistency"] > 0 for r in logs)
    meta = json.loads((run / "flashdistill.json").read_text())
    assert meta["method"] == name and meta["scheduler_config"]["original_inference_steps"] == 10
    # LCM samples at LCMScheduler's picks, which its exported scheduler makes itself; the SPLAM digits
    # preset at its own grid points, which the model card lists
    own = {"lcm": {"1": [999], "2": [999, 499], "4": [999, 799, 499, 299]},
           "splam": {"1": [999], "2": [999, 299], "4": [999, 399, 199, 99]}}[name]
    assert meta["sampling"]["timesteps"] == own
    lcm = LCMScheduler.from_pretrained(run / "scheduler")
    lcm.set_timesteps(4)
    assert (lcm.timesteps.tolist() == own["4"]) == (name == "lcm")
    student = load_model(run)
    for n in (1, 2, 4):
        images = sample(student, ["a handwritten digit five"] * 2, [0, 1], n)
        assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    # a guidance scale or a solver given to a student without a w-embedding is ignored, and said so
    with pytest.warns(UserWarning, match=r"guidance 3 ignored: this student runs no CFG.*; sampler 'ddim' ignored"):
        ignored = sample(student, ["a handwritten digit five"] * 2, [0, 1], 4, guidance=3.0, sampler="ddim")
    assert torch.equal(ignored, images)
    out = export(run, tmp_path / "export", None)
    card = (out / "README.md").read_text()
    assert f"# {module.Method.label} student" in card and module.Method.title in card
    assert "LCMScheduler" in card and "in 1, 2 or 4 steps" in card
    assert all(f"| {k} | `{v}` |" in card for k, v in own.items())


def test_splam_resume_with_ema_target_is_bit_identical(tiny_teacher, tmp_path):
    """The EMA target is method state: a run stopped after step 2 and resumed ends with exactly the
    weights of an unbroken 4-step run, and its step-by-step losses match."""
    from safetensors.torch import load_file

    from flashdistill.data.digits import get_dataset
    from flashdistill.train import train

    data = get_dataset("digits")
    over = {"gamma_dim": 8, "train": {"steps": 4, "checkpoint_every": 2}}
    m = tiny(SPLAMDistillation, SPLAMConfig, tiny_teacher, **over)
    assert m.config.ema == 0.95 and m.target_weights is not None
    train(m, data, tmp_path / "a", progress=False)
    train(tiny(SPLAMDistillation, SPLAMConfig, tiny_teacher, gamma_dim=8, train={"steps": 2, "checkpoint_every": 2}),
          data, tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "checkpoints" / "latest.json").read_text())["step"] == 2
    train(tiny(SPLAMDistillation, SPLAMConfig, tiny_teacher, **over), data, tmp_path / "b", resume=True, progress=False)

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "step_00000004" / "method.safetensors")) for r in "ab")
    assert a.keys() == b.keys() and any("cond_proj" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (load_file(str(tmp_path / r / "checkpoints" / "step_00000004" / "student.safetensors")) for r in "ab")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_lora_targets_and_refusals(tiny_teacher):
    m = tiny(LCMDistillation, LCMConfig, tiny_teacher)
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in m.student.named_parameters() if ".lora_A" in n}
    assert any(n.endswith("conv1") for n in names) and any(n.endswith("to_q") for n in names)
    assert not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in names)
    assert m.config.ema == 0.0 and m.target_weights is None  # LCM-LoRA: the target is the student
    assert from_dict(LCMConfig, {"teacher": "x", "full": True}).ema == 0.95
    with pytest.raises(ValueError, match="teacher_steps must be in"):
        from_dict(LCMConfig, {"teacher": "x", "N": 4, "teacher_steps": 4})


def test_guidance_embedding_is_what_diffusers_pipelines_pass_as_timestep_cond():
    """The w-embedding of a scale g is, bit for bit, the ``timestep_cond`` diffusers' SD pipeline
    computes for a UNet with ``time_cond_proj_dim`` at ``guidance_scale = g`` (w = g - 1)."""
    from diffusers import StableDiffusionPipeline

    from flashdistill.models.student import guidance_embedding, w_condition

    # 1.007, 8.999, 1.021: g - 1 must be rounded to float32 after the subtraction, as the pipeline's
    # torch.tensor(g - 1) does (subtracting in float32 gives another embedding at these scales)
    for g, dim in [(1.0, 256), (1.5, 256), (8.5, 256), (16.0, 32), (2.75, 8), (1.007, 256), (8.999, 64)]:
        ref = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor(g - 1).repeat(3), embedding_dim=dim)
        assert torch.equal(guidance_embedding(torch.full((3,), g, dtype=torch.float64), dim), ref)
    spec = {"w_embedding": {"dim": 8, "guidance": 1.5, "range": [1.0, 3.0]}}
    assert torch.equal(w_condition(spec, 2)["timestep_cond"],
                       StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor(0.5).repeat(2), embedding_dim=8))
    assert torch.equal(w_condition(spec, 2, guidance=1.021)["timestep_cond"],
                       StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor(1.021 - 1).repeat(2), embedding_dim=8))
    assert w_condition({"timesteps": {}}, 2) == {}  # no w-embedding: nothing told
    with pytest.raises(ValueError, match=r"outside the range .* \[1, 3\]"):
        w_condition(spec, 2, guidance=4.0)


def test_full_lcm_is_told_the_scale_through_a_zero_w_embedding(tiny_teacher, tmp_path):
    """Full LCM: a zero-initialised w-embedding (the student starts as the teacher at every scale),
    the teacher's CFG per sample from guidance_range, the EMA target, a UNet config that keeps
    time_cond_proj_dim through save and reload, and sampling at any scale of the range."""
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import StudentDenoiser, guidance_embedding, sample_student
    from flashdistill.sample import sample
    from flashdistill.train import train

    full = {"full": True, "lr": 1e-3, "guidance_range": [1.0, 3.0], "w_embedding_dim": 16}
    m = tiny(LCMDistillation, LCMConfig, tiny_teacher, **full)
    m.setup("cpu")
    assert m.w_embed and m.config.ema == 0.95 and m.target_weights is not None
    proj = m.student.time_embedding.cond_proj
    assert m.student.config.time_cond_proj_dim == 16 and proj.weight.requires_grad and proj.weight.abs().max() == 0
    assert "time_embedding.cond_proj.weight" in m.target_weights and m.teacher.denoiser.backbone.config.time_cond_proj_dim is None
    cond = m.teacher.cond(["a handwritten digit two"] * 2)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([599.0, 299.0])
    told = {"timestep_cond": guidance_embedding(torch.tensor([1.0, 3.0]), 16)}
    with torch.no_grad():  # zero projection: the teacher's x0 at every scale
        torch.testing.assert_close(StudentDenoiser(m.student, m.schedule)(x, t, {**cond, **told}),
                                   StudentDenoiser(m.teacher.denoiser.backbone, m.schedule)(x, t, cond), rtol=0, atol=0)
    g, drawn = m.draw_guidance(64, torch.Generator().manual_seed(0))
    assert g.shape == (64,) and 1.0 <= g.min() < 1.3 and 2.7 < g.max() <= 3.0
    assert torch.equal(drawn["timestep_cond"], guidance_embedding(g, 16))
    uncond, index = m.teacher.uncond(2), torch.tensor([20, 35])
    per_sample = m.teacher_solve(x, index, cond, uncond, torch.tensor([1.0, 3.0]))
    for i, scale in enumerate([1.0, 3.0]):  # per-sample CFG = each sample at its own scale
        one = m.teacher_solve(x[i:i + 1], index[i:i + 1], {k: v[i:i + 1] for k, v in cond.items()},
                              {k: v[i:i + 1] for k, v in uncond.items()}, scale)
        torch.testing.assert_close(per_sample[i:i + 1], one, rtol=1e-5, atol=1e-6)

    run = tmp_path / "run"
    train(m, get_dataset("digits"), run, progress=False)
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(1.0 <= r["guidance"] <= 3.0 for r in logs)
    meta = json.loads((run / "flashdistill.json").read_text())
    assert meta["sampling"]["w_embedding"] == {"dim": 16, "guidance": 1.5, "range": [1.0, 3.0]}
    assert json.loads((run / "student" / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 16
    student = load_model(run)
    trained = student.denoiser.backbone.time_embedding.cond_proj.weight
    assert trained.abs().max() > 0 and torch.equal(trained, m.student.time_embedding.cond_proj.weight.detach())
    prompts, seeds = ["a handwritten digit five"] * 2, [0, 1]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="guidance .* ignored")  # a w-embedded student takes it
        at = {g: sample(student, prompts, seeds, 2, guidance=g) for g in (None, 1.5, 1.0, 3.0)}
    assert torch.equal(at[None], at[1.5]) and not torch.equal(at[1.0], at[3.0])
    assert torch.equal(sample_student(student, prompts, seeds, 2, guidance=3.0), sample(student, prompts, seeds, 2, 3.0, decode=False))
    with pytest.raises(ValueError, match="outside the range"):
        sample(student, prompts, seeds, 2, guidance=5.0)


def test_w_embedding_refusals_and_defaults(tiny_teacher):
    """auto: embedded for full students only; embedded: refused for LoRAs (a LoRA file cannot carry the new
    layer), for SPLAM (its gamma-embedding uses the same layer), and with a default scale outside
    the trained range."""
    assert not tiny(LCMDistillation, LCMConfig, tiny_teacher).w_embed
    lora, full = (tiny(LCMDistillation, LCMConfig, tiny_teacher, full=f, full_lr=2e-4, guidance_range=[1.0, 3.0])
                  for f in (False, True))
    assert lora.optimizer_settings("student")["lr"] == 1e-2 and full.optimizer_settings("student")["lr"] == 2e-4
    assert build_lcm_config(tiny_teacher)[0].full_lr == 2e-4  # the digits preset's full students
    assert not tiny(LCMDistillation, LCMConfig, tiny_teacher, full=True, w_mode="fixed").w_embed
    with pytest.raises(ValueError, match="w_mode=embedded needs full=true"):
        from_dict(LCMConfig, {"teacher": "x", "w_mode": "embedded"})
    with pytest.raises(ValueError, match="must lie in guidance_range"):
        tiny(LCMDistillation, LCMConfig, tiny_teacher, full=True, guidance_range=[2.0, 3.0])
    with pytest.raises(ValueError, match="guidance_range must be"):
        from_dict(LCMConfig, {"teacher": "x", "guidance_range": [3.0, 2.0]})
    assert not tiny(SPLAMDistillation, SPLAMConfig, tiny_teacher, full=True, gamma_dim=8).w_embed
    with pytest.raises(ValueError, match="gamma-embedding takes"):
        tiny(SPLAMDistillation, SPLAMConfig, tiny_teacher, full=True, gamma_dim=8, w_mode="embedded")


def test_init_weights_starts_one_method_from_another_runs_lora(tiny_teacher, tmp_path):
    """init_weights: a Flash student starts from an LCM run's LoRA (same rank and targets) exactly;
    another rank, other targets or a missing file are refused, naming what differs."""
    from safetensors.torch import load_file

    from flashdistill.data.digits import get_dataset
    from flashdistill.methods.flash import FlashConfig, FlashDistillation
    from flashdistill.models.student import LORA_FILE
    from flashdistill.train import train

    lcm = tiny(LCMDistillation, LCMConfig, tiny_teacher)
    train(lcm, get_dataset("digits"), tmp_path / "lcm", progress=False)
    saved = load_file(str(tmp_path / "lcm" / "student" / LORA_FILE))
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained away from zero

    def flash(**over):
        cfg = {"teacher": str(tiny_teacher), "K": 8, "lora_rank": 2, "lora_targets": lcm.lora_targets, **over}
        return FlashDistillation(from_dict(FlashConfig, cfg))

    for source in (tmp_path / "lcm", tmp_path / "lcm" / "student" / LORA_FILE):
        m = flash(init_weights=str(source))
        live = {n: p for n, p in m.student.named_parameters() if p.requires_grad}
        assert len(live) == len(saved)
        for name, value in saved.items():  # peft's saved names drop the adapter name
            match = [p for n, p in live.items() if n.replace(".default", "") == name]
            assert len(match) == 1 and torch.equal(match[0].detach(), value), name
    with pytest.raises(ValueError, match="another LoRA rank"):
        flash(init_weights=str(tmp_path / "lcm"), lora_rank=3)
    with pytest.raises(ValueError, match="other layers"):
        flash(init_weights=str(tmp_path / "lcm"), lora_targets=["to_q", "to_k"])
    with pytest.raises(FileNotFoundError, match="expected a run folder"):
        flash(init_weights=str(tmp_path / "nowhere"))


def test_runs_are_portable_with_their_teacher_or_a_teacher_flag(tiny_teacher, tmp_path, capsys):
    """A run records its teacher absolutely and relative to itself: moved together with the
    teacher it still loads; moved alone, loading names the missing folder and --teacher fixes it."""
    import shutil

    from flashdistill.cli import main
    from flashdistill.data.digits import get_dataset
    from flashdistill.models.loading import ModelNotFound, load_model
    from flashdistill.sample import sample
    from flashdistill.train import train

    home = tmp_path / "home"
    shutil.copytree(tiny_teacher, home / "teacher")
    train(tiny(LCMDistillation, LCMConfig, home / "teacher"), get_dataset("digits"), home / "run", progress=False)
    before = sample(load_model(home / "run"), ["a handwritten digit one"], [0], 2)
    assert json.loads((home / "run" / "flashdistill.json").read_text())["teacher_relative"] == "../teacher"
    shutil.move(home, tmp_path / "moved")
    moved = tmp_path / "moved"
    assert torch.equal(sample(load_model(moved / "run"), ["a handwritten digit one"], [0], 2), before)
    shutil.move(moved / "teacher", tmp_path / "elsewhere")
    with pytest.raises(ModelNotFound, match="pass --teacher DIR"):
        load_model(moved / "run")
    model = load_model(moved / "run", teacher=tmp_path / "elsewhere")
    assert torch.equal(sample(model, ["a handwritten digit one"], [0], 2), before)
    assert main(["sample", "--model", str(moved / "run"), "--prompt", "a handwritten digit one", "--steps", "2",
                 "--num-images", "2", "--out", str(tmp_path / "g.png")]) == 2
    assert "pass --teacher DIR" in capsys.readouterr().err
    assert main(["sample", "--model", str(moved / "run"), "--teacher", str(tmp_path / "elsewhere"), "--prompt",
                 "a handwritten digit one", "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["export", "--model", str(moved / "run"), "--teacher", str(tmp_path / "elsewhere"),
                 "--num-samples", "0", "--out", str(tmp_path / "x")]) == 0
    assert main(["evaluate", "--model", str(moved / "run"), "--teacher", str(tmp_path / "elsewhere"),
                 "--steps", "1", "--num-samples", "20"]) == 0
