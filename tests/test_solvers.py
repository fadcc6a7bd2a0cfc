import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from flashdistill.core.schedules import FlowSchedule, VPSchedule
from flashdistill.core.solvers import SAMPLERS, cfg_model, ddim, dpmpp_2m, euler, flow_euler, get_sampler, unipc

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS = [1, 2, 4, 10]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dummy(x, t):
    """Smooth, nonlinear-in-t native prediction (eps, v or velocity)."""
    t = append(t.float(), x)
    return 0.3 * x * torch.cos(t / 300) + 0.1 * torch.sin(t / 100)


def append(t, x):
    return t.reshape(-1, *[1] * (x.ndim - 1))


def as_x0_model(schedule):
    return lambda x, t: schedule.to_x0(dummy(x, t), x, t)


def diffusers_loop(scheduler, x):
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)  # absent for flow matching
    for t in scheduler.timesteps:
        out = dummy(scale(x, t), t.expand(x.shape[0]))
        x = scheduler.step(out, t, x).prev_sample
    return x


def assert_rel_close(ours, ref, tol=1e-4):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < tol, f"relative error {rel:.2e}"


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(n, prediction_type):
    ref = DDIMScheduler(**SD, prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing="trailing")  # fmt: skip
    ref.set_timesteps(n)
    sch = VPSchedule(**SD, prediction_type=prediction_type)
    x = _rand(2, 4, 8, 8)
    assert_rel_close(ddim(as_x0_model(sch), x, ref.timesteps, sch), diffusers_loop(ref, x))


@pytest.mark.parametrize("n", STEPS + [7])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])  # linspace with n=7 gives fractional t
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_matches_diffusers(n, spacing, prediction_type):
    ref = EulerDiscreteScheduler(**SD, prediction_type=prediction_type, timestep_spacing=spacing)
    ref.set_timesteps(n)
    sch = VPSchedule(**SD, prediction_type=prediction_type)
    x = _rand(2, 4, 8, 8)
    # diffusers keeps the VE state x / alpha = x * sqrt(1 + sigma_ve^2); ours is the VP state x.
    expected = diffusers_loop(ref, x * (1 + ref.sigmas[0] ** 2) ** 0.5)
    assert_rel_close(euler(as_x0_model(sch), x, ref.timesteps, sch), expected)


@pytest.mark.parametrize("n", STEPS + [7])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_matches_diffusers(n, spacing, prediction_type):
    ref = DPMSolverMultistepScheduler(**SD, prediction_type=prediction_type, algorithm_type="dpmsolver++",
                                      solver_order=2, final_sigmas_type="zero", lower_order_final=True,
                                      timestep_spacing=spacing)  # fmt: skip
    ref.set_timesteps(n)
    sch = VPSchedule(**SD, prediction_type=prediction_type)
    x = _rand(2, 4, 8, 8)
    assert_rel_close(dpmpp_2m(as_x0_model(sch), x, ref.timesteps, sch), diffusers_loop(ref, x))


def test_dpmpp_2m_callback_sees_diffusers_intermediate_states():
    """The trajectory the callback reports (Flash's consistency option reads its state K/4 grid
    points down) is diffusers' state after each step, and the solve itself is unchanged."""
    ref = DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero",
                                      lower_order_final=True, timestep_spacing="trailing")
    ref.set_timesteps(8)
    sch, x = VPSchedule(**SD), _rand(2, 4, 8, 8)
    expected, y = [], x
    for t in ref.timesteps:
        y = ref.step(dummy(y, t.expand(2)), t, y).prev_sample
        expected.append(y)
    seen = {}
    out = dpmpp_2m(as_x0_model(sch), x, ref.timesteps, sch, callback=lambda i, s: seen.update({i: s}))
    assert sorted(seen) == list(range(1, 8))  # the states at timesteps[1:], not the clean sample
    for i, state in seen.items():
        assert_rel_close(state, expected[i - 1])
    assert torch.equal(out, dpmpp_2m(as_x0_model(sch), x, ref.timesteps, sch))


@pytest.mark.parametrize("n", STEPS)
def test_flow_euler_matches_diffusers(n):
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(n)
    sch = FlowSchedule(shift=3.0)
    x = _rand(2, 4, 8, 8)
    assert_rel_close(flow_euler(as_x0_model(sch), x, ref.timesteps, sch), diffusers_loop(ref, x))


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unipc_matches_diffusers(n, prediction_type):
    # diffusers run natively (native eps/v outputs, its own trailing timesteps) against our wrapper
    # fed x0 predictions at the same timesteps.
    ref = UniPCMultistepScheduler(**SD, prediction_type=prediction_type, timestep_spacing="trailing",
                                  final_sigmas_type="zero")  # fmt: skip
    ref.set_timesteps(n)
    sch = VPSchedule(**SD, prediction_type=prediction_type)
    x = _rand(2, 4, 8, 8)
    assert_rel_close(unipc(as_x0_model(sch), x, ref.timesteps, sch), diffusers_loop(ref, x))


@pytest.mark.parametrize("n", STEPS)
def test_unipc_flow_matches_diffusers(n):
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                  final_sigmas_type="zero")  # fmt: skip
    ref.set_timesteps(n)
    # diffusers truncates these timesteps to integers but keeps the unrounded sigmas; make its
    # sigmas those of the integer timesteps the model sees (sigma = t / T), as our schedule does.
    ref.sigmas[:-1] = (ref.timesteps / 1000).clamp(max=1 - 1e-6)
    sch = FlowSchedule(shift=3.0)
    x = _rand(2, 4, 8, 8)
    assert_rel_close(unipc(as_x0_model(sch), x, ref.timesteps, sch), diffusers_loop(ref, x))


def test_ddim_equals_euler_and_flow_euler():
    x, vp, fl = _rand(2, 4, 8, 8), VPSchedule(**SD), FlowSchedule()
    ts = vp.timesteps(6, "linspace").float() + 0.5
    torch.testing.assert_close(ddim(as_x0_model(vp), x, ts, vp), euler(as_x0_model(vp), x, ts, vp))
    tf = fl.timesteps(6)
    torch.testing.assert_close(ddim(as_x0_model(fl), x, tf, fl), flow_euler(as_x0_model(fl), x, tf, fl))


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize(
    "sampler,schedule",
    [(ddim, VPSchedule(**SD)), (euler, VPSchedule(**SD)), (dpmpp_2m, VPSchedule(**SD)),
     (ddim, FlowSchedule()), (dpmpp_2m, FlowSchedule()), (flow_euler, FlowSchedule()),
     (unipc, VPSchedule(**SD)), (unipc, FlowSchedule())],
)  # fmt: skip
def test_oracle_lands_on_x0(sampler, schedule, n):
    x0 = _rand(3, 4, 8, 8, seed=1)
    ts = schedule.timesteps(n)
    for x in [_rand(3, 4, 8, 8, seed=2), 10 * _rand(3, 4, 8, 8, seed=3)]:  # noise or any state
        torch.testing.assert_close(sampler(lambda x, t: x0, x, ts, schedule), x0, atol=1e-5, rtol=0)


def test_model_sees_float32_batch_timesteps_and_input_dtype():
    seen = []

    def model(x, t):
        seen.append((x.dtype, t.dtype, t.shape))
        return torch.zeros_like(x)

    sch = VPSchedule(**SD)
    out = dpmpp_2m(model, _rand(3, 2, 4, 4), sch.timesteps(4), sch)
    assert out.dtype == torch.float32
    assert seen == [(torch.float32, torch.float32, (3,))] * 4


class Counting:
    def __init__(self):
        self.batches = []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        assert t.shape[0] == x.shape[0] == cond["emb"].shape[0] == cond["extra"]["pooled"].shape[0]
        return x * cond["emb"][:, :1, None, None] + append(t, x) / 1000 + append(cond["extra"]["pooled"].mean(1), x)


def _conds(B):
    c = {"emb": _rand(B, 3, seed=5) + 1, "extra": {"pooled": _rand(B, 2, seed=6)}, "flag": True}
    u = {"emb": torch.zeros(B, 3), "extra": {"pooled": torch.zeros(B, 2)}, "flag": True}
    return c, u


@pytest.mark.parametrize("guidance", [4.5, torch.tensor([1.0, 2.0, 7.5])])
def test_cfg_single_batched_call(guidance):
    B, x, t = 3, _rand(3, 2, 4, 4), torch.full((3,), 500.0)
    cond, uncond = _conds(B)
    den = Counting()
    out = cfg_model(den, cond, uncond, guidance)(x, t)
    assert den.batches == [2 * B]
    x0_c, x0_u = Counting()(x, t, cond), Counting()(x, t, uncond)
    w = guidance.reshape(-1, 1, 1, 1) if torch.is_tensor(guidance) else guidance
    torch.testing.assert_close(out, x0_u + w * (x0_c - x0_u))


def test_cfg_no_guidance_runs_cond_only():
    x, t = _rand(3, 2, 4, 4), torch.full((3,), 500.0)
    cond, uncond = _conds(3)
    for u, w in [(uncond, 1.0), (None, 7.5)]:
        den = Counting()
        torch.testing.assert_close(cfg_model(den, cond, u, w)(x, t), Counting()(x, t, cond))
        assert den.batches == [3]


def test_cfg_guidance_interval_guides_only_inside_and_skips_uncond_outside():
    x, w = _rand(3, 2, 4, 4), torch.tensor([1.0, 2.0, 7.5])
    cond, uncond = _conds(3)
    t = torch.tensor([50.0, 300.0, 900.0])  # below, inside, above [100, 500]
    den = Counting()
    out = cfg_model(den, cond, uncond, w, interval=(100, 500))(x, t)
    assert den.batches == [6]
    x0_c, x0_u = Counting()(x, t, cond), Counting()(x, t, uncond)
    torch.testing.assert_close(out[1], (x0_u + w.reshape(-1, 1, 1, 1) * (x0_c - x0_u))[1])
    torch.testing.assert_close(out[[0, 2]], x0_c[[0, 2]])
    # a batch wholly outside the interval makes one cond-only call; wholly inside, plain CFG
    den = Counting()
    t_out = torch.full((3,), 700.0)
    torch.testing.assert_close(cfg_model(den, cond, uncond, 4.5, interval=(100, 500))(x, t_out), Counting()(x, t_out, cond))
    assert den.batches == [3]
    t_in = torch.full((3,), 500.0)
    torch.testing.assert_close(cfg_model(Counting(), cond, uncond, 4.5, interval=(100, 500))(x, t_in),
                               cfg_model(Counting(), cond, uncond, 4.5)(x, t_in))
    with pytest.raises(ValueError, match=r"interval.*\[500, 100\]"):
        cfg_model(Counting(), cond, uncond, 4.5, interval=(500, 100))


@pytest.mark.parametrize("ts", [[999, 999, 500], [100, 500], [], [[999, 500]]])
def test_bad_timesteps_raise(ts):
    with pytest.raises(ValueError, match="timesteps"):
        ddim(lambda x, t: x, _rand(1, 2), torch.tensor(ts), VPSchedule())


def test_get_sampler():
    assert all(get_sampler(k) is v for k, v in SAMPLERS.items())
    with pytest.raises(ValueError, match="heun.*ddim"):
        get_sampler("heun")
    with pytest.raises(ValueError, match="flow"):
        flow_euler(lambda x, t: x, _rand(1, 2), torch.tensor([999]), VPSchedule())


# --- the student's multistep sampler: gamma between DDIM (0) and LCM (1), as diffusers' TCD ---

@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.7])
@pytest.mark.parametrize("timesteps", [[999, 249], [999, 749, 499, 249], [999, 499, 249, 124]])
def test_student_sampler_matches_diffusers_tcd(gamma, timesteps):
    """lcm_multistep(gamma) walks the same path as diffusers' TCDScheduler(eta=gamma) fed the same
    model outputs and fresh noise: the model sees the same input at every step. (TCD's last
    prev_sample is x0 re-noised to t = 0, alpha(0) x0 + sigma(0) eps; ours returns x0 itself.)
    gamma = 1 is LCM exactly (LCMScheduler, checked in test_pipelines); TCD's eta = 1 differs from it
    by design: its move goes through t = 0 (alphas_cumprod[0] = 0.99915), not through a clean x0."""
    from diffusers import TCDScheduler

    from flashdistill.models.student import lcm_multistep

    sch = VPSchedule(**SD)
    ref = TCDScheduler(**SD, timestep_spacing="trailing")
    ref.set_timesteps(timesteps=timesteps)
    x = _rand(2, 4, 8, 8)
    g = torch.Generator().manual_seed(3)
    sample, ref_inputs = x, []
    for t in ref.timesteps:
        ref_inputs.append(sample)
        sample = ref.step(dummy(sample, t.expand(2)), t, sample, eta=gamma, generator=g).prev_sample
    g = torch.Generator().manual_seed(3)  # TCD draws one noise per move when eta > 0
    noises = [torch.randn(x.shape, generator=g) if gamma > 0 else torch.zeros_like(x) for _ in timesteps[1:]]
    inputs = []

    def model(x, t, cond):
        inputs.append(x)
        return sch.to_x0(dummy(x, t), x, t)

    ours = lcm_multistep(model, x, torch.tensor(timesteps, dtype=torch.float64), {}, sch, noises, gamma=gamma)
    assert len(inputs) == len(ref_inputs) == len(timesteps)
    for a, b in zip(inputs, ref_inputs):
        assert_rel_close(a, b)
    last = torch.tensor(float(timesteps[-1])).expand(2)
    expected_last = sch.add_noise(ours.double(), sch.to_eps(dummy(inputs[-1], last), inputs[-1], last).double(),
                                  torch.zeros(2)).float()
    assert_rel_close(expected_last, sample)


def test_student_sampler_ddim_move_keeps_the_trajectory():
    """A denoiser that always answers the same x0 (a point mass) is a perfect consistency model:
    with gamma = 0 every step's input is alpha_t x0 + sigma_t z0 with the *initial* noise z0; with
    gamma = 1 it is re-noised with the fresh noise; in between its noise is a mix of unit variance."""
    from flashdistill.models.student import lcm_multistep

    sch = VPSchedule(**SD)
    c = torch.full((3, 1, 4, 4), 0.25, dtype=torch.float64)
    z0 = _rand(3, 1, 4, 4).double()
    ts = torch.tensor([999, 499, 249], dtype=torch.float64)
    fresh = [_rand(3, 1, 4, 4, seed=s).double() for s in (1, 2)]
    for gamma in (0.0, 0.5, 1.0):
        seen = []

        def denoiser(x, t, cond):
            seen.append(x.clone())
            return c

        x_start = sch.add_noise(c, z0, ts[:1].expand(3))
        out = lcm_multistep(denoiser, x_start, ts, {}, sch, fresh, gamma=gamma)
        assert torch.equal(out, c)
        for i, t in enumerate(ts[1:]):
            a, s = sch.alpha(t).item(), sch.sigma(t).item()
            z = (seen[i + 1] - a * c) / s  # the noise the sampler put into step i+1's input
            if gamma == 0.0:
                torch.testing.assert_close(z, z0)
            elif gamma == 1.0:
                torch.testing.assert_close(z, fresh[i])
            else:
                zi = (seen[i] - sch.alpha(ts[i]).item() * c) / sch.sigma(ts[i]).item()
                # z = p * (previous noise) + q * fresh with p^2 + q^2 = 1, 0 < p < 1
                coef = torch.linalg.lstsq(torch.stack([zi.flatten(), fresh[i].flatten()], 1), z.flatten()[:, None]).solution
                p, q = coef.flatten().tolist()
                assert 0 < p < 1 and 0 < q < 1 and p**2 + q**2 == pytest.approx(1.0, abs=1e-9)


def test_student_sampler_rejects_bad_gamma():
    from flashdistill.models.student import lcm_multistep

    with pytest.raises(ValueError, match="gamma must be in"):
        lcm_multistep(lambda x, t, c: x, torch.zeros(1, 1, 2, 2), torch.tensor([999.0, 499.0]), {}, VPSchedule(), gamma=1.5)
