"""Stateless deterministic samplers working on x0 predictions (k-diffusion style).

A *model* is a callable ``model(x_t, t) -> x0_pred`` (already conditioned) where ``t`` is the
float32 batch of timesteps ``t.expand(B)`` in training units (see ``schedules``). Samplers only use
x0 predictions and the schedule's ``alpha(t)`` / ``sigma(t)``, so they are agnostic to the
backbone and to its native parametrisation (wrap a raw network with ``schedule.to_x0``).

``x`` is the state at ``timesteps[0]`` and is used as is (never rescaled): pure noise when
``timesteps[0]`` is the largest timestep, or a partially noised sample. Each sampler integrates
through every ``timesteps[i]`` and finally to the clean sample (alpha = 1, sigma = 0), returning x0.

Precision: coefficients are float64 and the state is kept in float64 internally; the model is
called with the state cast to ``x.dtype`` and the result is returned in ``x.dtype``.
``generator`` is accepted for API uniformity; these ODE solvers are deterministic and ignore it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .schedules import append_dims

Model = Callable[[Tensor, Tensor], Tensor]

__all__ = ["SAMPLERS", "cfg_model", "ddim", "ddim_move", "dpmpp_2m", "euler", "flow_euler", "get_sampler",
           "guidance_from_lcm_w", "lcm_w_from_guidance", "unipc"]


def cat_cond(a, b):
    """Concatenate tensors (recursing into dicts and lists, e.g. T2I-Adapter residuals) along dim 0;
    other values are taken from ``a``."""
    if torch.is_tensor(a):
        return torch.cat([a, b])
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"cond/uncond lists differ in length: {len(a)} vs {len(b)}")
        return [cat_cond(x, y) for x, y in zip(a, b)]
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"cond/uncond keys differ: {sorted(a)} vs {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    return a


def cfg_model(denoiser: Callable[[Tensor, Tensor, dict], Tensor], cond: dict, uncond: dict | None, guidance,
              interval: tuple[float, float] | None = None) -> Model:
    """Classifier-free guidance (Ho & Salimans 2022) as an x0 model.

    ``denoiser(x, t, cond_dict) -> x0``. Cond and uncond run in ONE batched forward: ``x``, ``t`` and
    every tensor value of the dicts (recursively) are concatenated along dim 0, cond first; then
    ``x0 = x0_u + w * (x0_c - x0_u)``. ``guidance`` is a float or a per-sample tensor of shape (B,).
    With ``uncond=None`` or ``guidance == 1.0`` (a float) only the cond branch runs.
    ``interval = (lo, hi)``: guidance applies only to samples whose t is in [lo, hi] (Kynkäänniemi et
    al. 2024, "guidance in a limited interval"); the others get the cond prediction, and a call whose
    whole batch is outside runs the cond branch alone.
    Since x0 is affine in eps (and in v) with coefficients shared by both branches, guidance in x0
    space equals guidance in eps/v space.
    """
    if uncond is None or (not torch.is_tensor(guidance) and guidance == 1.0):
        return lambda x, t: denoiser(x, t, cond)
    if interval is not None and not interval[0] <= interval[1]:
        raise ValueError(f"guidance interval must be [lo, hi] with lo <= hi, got {list(interval)}")
    both = cat_cond(cond, uncond)

    def model(x: Tensor, t: Tensor) -> Tensor:
        inside = None
        if interval is not None:
            inside = (t >= interval[0]) & (t <= interval[1])
            if not bool(inside.any()):
                return denoiser(x, t, cond)
        x0_c, x0_u = denoiser(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        w = append_dims(guidance.to(x0_c), x0_c.ndim) if torch.is_tensor(guidance) else guidance
        guided = x0_u + w * (x0_c - x0_u)
        return guided if inside is None or bool(inside.all()) else torch.where(append_dims(inside, x0_c.ndim), guided, x0_c)

    return model


def guidance_from_lcm_w(w):
    """LCM's CFG ``p_c + w (p_c - p_u)`` (w = 0: no guidance) is this toolkit's (and diffusers')
    ``p_u + g (p_c - p_u)`` at ``g = w + 1``. Configs hold g; LCM's w is converted here only."""
    return w + 1


def lcm_w_from_guidance(g):
    """Inverse of :func:`guidance_from_lcm_w`: ``w = g - 1`` (diffusers' LCM pipeline feeds this w
    to the w-embedding)."""
    return g - 1


def ddim_move(x_t: Tensor, x0: Tensor, t: Tensor, t_next: Tensor, schedule) -> Tensor:
    """The deterministic DDIM step from ``t`` to ``t_next`` given the x0 prediction (Song et al.
    2021, Eq. 12; SDXL-Lightning's ``move``, Eq. 5): ``alpha_next x0 + sigma_next eps_hat`` with
    ``eps_hat = (x_t - alpha_t x0) / sigma_t``. Per-sample ``t`` / ``t_next`` of shape (B,);
    float64 math, ``x_t``'s dtype out. ``t_next = 0`` lands on the schedule's t = 0 (VP: alpha_0 < 1)."""
    a, s = (append_dims(f(t.double()), x_t.ndim) for f in (schedule.alpha, schedule.sigma))
    a_n, s_n = (append_dims(f(t_next.double()), x_t.ndim) for f in (schedule.alpha, schedule.sigma))
    eps = (x_t.double() - a * x0.double()) / s
    return (a_n * x0.double() + s_n * eps).to(x_t.dtype)


def _check(timesteps: Tensor) -> Tensor:
    if timesteps.ndim != 1 or timesteps.numel() == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D tensor, got {timesteps.tolist()}")
    if (timesteps[1:] >= timesteps[:-1]).any():
        raise ValueError(f"timesteps must be strictly decreasing, got {timesteps.tolist()}")
    return timesteps


def _steps(timesteps: Tensor, schedule, device):
    """Iterate (t, alpha, sigma, alpha_next, sigma_next) with float64 0-d coefficients; the last step
    goes to the clean sample (alpha_next = 1, sigma_next = 0)."""
    ts = _check(timesteps).to(device)
    alphas, sigmas = schedule.alpha(ts), schedule.sigma(ts)
    one, zero = torch.ones_like(alphas[:1]), torch.zeros_like(sigmas[:1])
    alphas_n, sigmas_n = torch.cat([alphas[1:], one]), torch.cat([sigmas[1:], zero])
    return zip(ts, alphas, sigmas, alphas_n, sigmas_n)


def _denoise(model: Model, x: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    return model(x.to(dtype), t.float().expand(x.shape[0])).double()


def ddim(model: Model, x: Tensor, timesteps: Tensor, schedule, generator=None) -> Tensor:
    """DDIM, eta = 0 (Song et al. 2021, Eq. 12): x_next = alpha_next * x0 + sigma_next * eps_hat.

    For the flow schedule this is exactly the flow Euler step.
    """
    dtype, x = x.dtype, x.double()
    for t, a, s, a_n, s_n in _steps(timesteps, schedule, x.device):
        x0 = _denoise(model, x, t, dtype)
        x = a_n * x0 + s_n * (x - a * x0) / s
    return x.to(dtype)


def euler(model: Model, x: Tensor, timesteps: Tensor, schedule, generator=None) -> Tensor:
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn) in the VE
    coordinates y = x / alpha, sigma_ve = sigma / alpha, as diffusers' EulerDiscreteScheduler.

    dy/dsigma_ve = (y - x0) / sigma_ve. Requires alpha > 0 at every timestep (VP schedules);
    mathematically identical to ``ddim``.
    """
    dtype, x = x.dtype, x.double()
    for t, a, s, a_n, s_n in _steps(timesteps, schedule, x.device):
        x0 = _denoise(model, x, t, dtype)
        y, s_ve = x / a, s / a
        y = y + (s_n / a_n - s_ve) * (y - x0) / s_ve
        x = a_n * y
    return x.to(dtype)


def dpmpp_2m(model: Model, x: Tensor, timesteps: Tensor, schedule, generator=None,
             callback: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """DPM-Solver++(2M), data prediction, midpoint form (Lu et al. 2022, Alg. 2), lambda = log(alpha/sigma).

    First step first order, later steps second order, final step to sigma = 0 first order (which
    lands on the last x0 prediction); matches diffusers' DPMSolverMultistepScheduler(
    algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero").
    ``callback(i, x)``, if given, sees the state at ``timesteps[i]`` for i >= 1 (in ``x.dtype``),
    after each step that reaches it: the solve's trajectory, without a second solve.
    """
    dtype, x = x.dtype, x.double()
    x0_prev = h_prev = None
    i = 0
    for t, a, s, a_n, s_n in _steps(timesteps, schedule, x.device):
        x0 = _denoise(model, x, t, dtype)
        h = (a_n.log() - s_n.log()) - (a.log() - s.log())  # +inf on the final step
        first_order = x0_prev is None or s_n == 0
        d = x0 if first_order else x0 + (x0 - x0_prev) * (h / (2 * h_prev))
        x = (s_n / s) * x - a_n * torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
        i += 1
        if callback is not None and i < len(timesteps):
            callback(i, x.to(dtype))
    return x.to(dtype)


def flow_euler(model: Model, x: Tensor, timesteps: Tensor, schedule, generator=None) -> Tensor:
    """Euler for rectified flow (Esser et al. 2024), as diffusers' FlowMatchEulerDiscreteScheduler:
    x_next = x + (sigma_next - sigma) * v with v = (x - x0) / sigma; final sigma 0."""
    if schedule.kind != "flow":
        raise ValueError(f"flow_euler needs a flow schedule (alpha = 1 - sigma), got kind {schedule.kind!r}")
    dtype, x = x.dtype, x.double()
    for t, _, s, _, s_n in _steps(timesteps, schedule, x.device):
        x0 = _denoise(model, x, t, dtype)
        x = x + (s_n - s) * (x - x0) / s
    return x.to(dtype)


def unipc(model: Model, x: Tensor, timesteps: Tensor, schedule, generator=None) -> Tensor:
    """UniPC (Zhao et al. 2023; bh2, order 2, data prediction) through diffusers'
    ``UniPCMultistepScheduler``: a fresh scheduler per call, fed x0 predictions
    (``prediction_type="sample"``) at exactly ``timesteps`` (its sigmas are overwritten with this
    schedule's at those timesteps, then 0), so the call stays stateless. Works on VP and flow
    schedules; state and coefficients are float32 as in diffusers.
    """
    from diffusers import UniPCMultistepScheduler

    ts = _check(timesteps).to(x.device)
    flow = schedule.kind == "flow"
    config = {k: v for k, v in schedule.to_diffusers_config().items() if k != "prediction_type"}
    if flow:
        config = {"num_train_timesteps": config["num_train_timesteps"], "use_flow_sigmas": True}
    sched = UniPCMultistepScheduler(**config, prediction_type="sample", solver_order=2, solver_type="bh2",
                                    lower_order_final=True, final_sigmas_type="zero")
    sched.set_timesteps(len(ts))
    sig = schedule.sigma(ts) if flow else schedule.sigma(ts) / schedule.alpha(ts)
    if flow:  # as diffusers: alpha = 0 at sigma = 1 would put log(0) in the first update
        sig = sig.clamp(max=1 - 1e-6)
    sched.sigmas = torch.cat([sig, sig.new_zeros(1)]).float().cpu()
    sched.timesteps = ts.cpu()
    dtype, x = x.dtype, x.float()
    for t in sched.timesteps:
        x0 = model(x.to(dtype), t.float().expand(x.shape[0]).to(x.device)).float()
        x = sched.step(x0, t, x).prev_sample
    return x.to(dtype)


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddim": ddim, "euler": euler, "dpmpp_2m": dpmpp_2m,
                                              "flow_euler": flow_euler, "unipc": unipc}


def get_sampler(name: str) -> Callable[..., Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; valid: {sorted(SAMPLERS)}") from None
