import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
)

from flashdistill.core.schedules import (
    FlowSchedule,
    VPSchedule,
    append_dims,
    eps_to_x0,
    flow_to_x0,
    lcm_boundary_scalings,
    v_to_x0,
    x0_to_eps,
    x0_to_flow,
    x0_to_v,
)

SD = dict(beta_start=0.00085, beta_end=0.012)
STEPS = [1, 2, 4, 25, 32]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(beta_schedule):
    ours = VPSchedule(beta_schedule=beta_schedule, **SD).alphas_cumprod()
    ref = DDPMScheduler(beta_schedule=beta_schedule, **SD).alphas_cumprod.double()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=0)


def test_vp_add_noise_matches_diffusers():
    x0, noise = _rand(6, 4, 8, 8, seed=1), _rand(6, 4, 8, 8, seed=2)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    ours = VPSchedule(**SD).add_noise(x0, noise, t)
    ref = DDPMScheduler(beta_schedule="scaled_linear", **SD).add_noise(x0, noise, t)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_flow_add_noise_matches_diffusers():
    ref_s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref_s.set_timesteps(10)
    t = ref_s.timesteps[[0, 3, 6, 9]]
    x0, noise = _rand(4, 4, 8, 8, seed=1), _rand(4, 4, 8, 8, seed=2)
    ours = FlowSchedule(shift=3.0).add_noise(x0, noise, t)
    torch.testing.assert_close(ours, ref_s.scale_noise(x0, t, noise), rtol=1e-5, atol=1e-6)


def test_vp_closed_forms_and_interpolation():
    sch = VPSchedule(**SD)
    t = torch.arange(1000)
    a, s = sch.alpha(t), sch.sigma(t)
    torch.testing.assert_close(a**2 + s**2, torch.ones(1000, dtype=torch.float64))
    torch.testing.assert_close(a, sch.alphas_cumprod().sqrt())
    # fractional t interpolates the VE sigma linearly (np.interp as in diffusers).
    ve = (s / a)[[10, 11]]
    mid = sch.sigma(torch.tensor(10.25)) / sch.alpha(torch.tensor(10.25))
    torch.testing.assert_close(mid, 0.75 * ve[0] + 0.25 * ve[1])



def test_timestep_at_inverts_the_interpolated_ve_sigma():
    sch = VPSchedule(**SD)
    t = torch.tensor([0.0, 3.5, 10.25, 499.0, 871.6, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sch.timestep_at(sch.sigma(t) / sch.alpha(t)), t)
    # an SNR found by np.interp over the table, independently
    table = np.sqrt((1 - sch.alphas_cumprod().numpy()) / sch.alphas_cumprod().numpy())
    ve = torch.tensor([0.5, 2.0, 30.0], dtype=torch.float64)
    ref = np.interp(ve.numpy(), table, np.arange(1000.0))
    torch.testing.assert_close(sch.timestep_at(ve), torch.from_numpy(ref))
    # out of range clamps to the ends
    assert sch.timestep_at(torch.tensor([0.0, 1e6])).tolist() == [0.0, 999.0]

def test_parametrisation_round_trips():
    x0, eps = _rand(3, 2, 4, 4, seed=3), _rand(3, 2, 4, 4, seed=4)
    t = torch.tensor([5.0, 400.0, 990.0])
    vp = VPSchedule(**SD)
    a, s = append_dims(vp.alpha(t), 4), append_dims(vp.sigma(t), 4)
    x_t = (a * x0 + s * eps).float()
    torch.testing.assert_close(eps_to_x0(x0_to_eps(x0, x_t, a, s), x_t, a, s), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(x0_to_eps(x0, x_t, a, s), eps, atol=1e-5, rtol=0)
    v = x0_to_v(x0, eps, a, s)
    torch.testing.assert_close(v_to_x0(v, x_t, a, s), x0, atol=1e-6, rtol=0)
    for pt in ["epsilon", "v_prediction"]:
        sch = VPSchedule(prediction_type=pt, **SD)
        native = sch.from_x0(x0, x_t, t)
        torch.testing.assert_close(native, eps if pt == "epsilon" else v, atol=1e-5, rtol=0)
        torch.testing.assert_close(sch.to_x0(native, x_t, t), x0, atol=1e-6, rtol=0)
        torch.testing.assert_close(sch.to_eps(native, x_t, t), eps, atol=1e-5, rtol=0)
    fl = FlowSchedule()
    tf = torch.tensor([1000.0, 400.0, 30.0])
    x_t = fl.add_noise(x0, eps, tf)
    vel = x0_to_flow(x0, x_t, append_dims(fl.sigma(tf), 4))
    torch.testing.assert_close(vel, eps - x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow_to_x0(vel, x_t, append_dims(fl.sigma(tf), 4)), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(fl.to_x0(fl.from_x0(x0, x_t, tf), x_t, tf), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(fl.to_eps(eps - x0, x_t, tf), eps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_to_x0_matches_ddim_pred_original_sample(prediction_type):
    ref = DDIMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False, **SD)
    ref.set_timesteps(4)
    sch = VPSchedule(prediction_type=prediction_type, **SD)
    x, out = _rand(2, 4, 8, 8, seed=5), _rand(2, 4, 8, 8, seed=6)
    for t in ref.timesteps:
        expected = ref.step(out, t, x).pred_original_sample
        torch.testing.assert_close(sch.to_x0(out, x, t.expand(2)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("spacing,offset", [("trailing", 0), ("leading", 0), ("leading", 1), ("linspace", 0)])
def test_vp_timesteps_match_ddim(n, spacing, offset):
    ref = DDIMScheduler(beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=offset, **SD)
    ref.set_timesteps(n)
    ours = VPSchedule(**SD).timesteps(n, spacing, steps_offset=offset)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, ref.timesteps)


@pytest.mark.parametrize("n", STEPS)
def test_vp_trailing_timesteps_match_dpmsolver(n):
    # DPMSolverMultistepScheduler's "leading"/"linspace" use an (n + 1)-point grid, unlike DDIM;
    # only "trailing" (the recommended spacing for few steps) is shared by both.
    ref = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing", **SD)
    ref.set_timesteps(n)
    assert torch.equal(VPSchedule(**SD).timesteps(n), ref.timesteps)


def test_trailing_timesteps_always_have_num_steps_valid_entries():
    # numpy's float arange gives diffusers 62 trailing timesteps (last one -1) for n = 61.
    ts = VPSchedule().timesteps(61)
    assert len(ts) == 61 and ts.min() >= 0 and ts[0] == 999


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_timesteps_match_diffusers(n, shift):
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    ours = FlowSchedule(shift=shift).timesteps(n)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref.timesteps, rtol=1e-6, atol=1e-4)


def test_shift_sigma():
    fl = FlowSchedule(shift=3.0)
    assert fl.shift_sigma(0.0) == 0.0 and fl.shift_sigma(1.0) == 1.0
    assert fl.shift_sigma(0.5) == pytest.approx(0.75)


def test_lcm_boundary_scalings_match_diffusers():
    ref = LCMScheduler(beta_schedule="scaled_linear", **SD)
    t = torch.tensor([0, 1, 19, 259, 499, 999])
    c_skip, c_out = lcm_boundary_scalings(t)
    for i, ti in enumerate(t.tolist()):
        r_skip, r_out = ref.get_scalings_for_boundary_condition_discrete(ti)
        assert c_skip[i].item() == pytest.approx(r_skip, rel=1e-12)
        assert c_out[i].item() == pytest.approx(r_out, rel=1e-12)
    assert c_skip[0] == 1 and c_out[0] == 0


def test_invalid_configs_name_the_bad_value():
    with pytest.raises(ValueError, match="cosine_nope"):
        VPSchedule(beta_schedule="cosine_nope")
    with pytest.raises(ValueError, match="sample"):
        VPSchedule(prediction_type="sample")
    with pytest.raises(ValueError, match="squaredcos_cap_v2"):
        VPSchedule.from_diffusers_config(DDIMScheduler(beta_schedule="squaredcos_cap_v2").config)
    with pytest.raises(ValueError, match="bogus"):
        VPSchedule().timesteps(4, spacing="bogus")
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowSchedule.from_diffusers_config({"shift": 1.0, "use_dynamic_shifting": True})


def test_diffusers_config_round_trip():
    cfg = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", **SD).config
    sch = VPSchedule.from_diffusers_config(dict(cfg))
    assert sch == VPSchedule(prediction_type="v_prediction", **SD)
    assert DDPMScheduler(**sch.to_diffusers_config()).config.prediction_type == "v_prediction"
    assert VPSchedule.from_diffusers_config(sch.to_diffusers_config()) == sch
    fl = FlowSchedule.from_diffusers_config(dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert fl == FlowSchedule(shift=3.0)
    assert FlowMatchEulerDiscreteScheduler(**fl.to_diffusers_config()).config.shift == 3.0
