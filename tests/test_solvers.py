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
