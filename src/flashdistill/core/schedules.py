"""Noise schedules and parametrisation conversions.

Conventions (used throughout flashdistill):

* ``t`` is always the network's timestep in training units: a float tensor in ``[0, T)`` with
  ``T = num_train_timesteps`` (1000); flow-matching schedules also use ``t = T`` for pure noise.
  For the discrete variance-preserving (VP) schedule ``t`` is the integer index into
  ``alphas_cumprod``; fractional values are interpolated like diffusers does (``np.interp`` of the
  VE sigma array ``sqrt((1 - acp) / acp)`` over the index). For the flow-matching schedule
  ``sigma = t / T``.
* Forward process for both kinds: ``x_t = alpha(t) * x0 + sigma(t) * eps`` (DDPM, Ho et al. 2020,
  Eq. 4). VP: ``alpha = sqrt(acp)``, ``sigma = sqrt(1 - acp)``. Flow (rectified flow / SD3,
  Esser et al. 2024): ``alpha = 1 - sigma``.
* Native predictions: ``"epsilon"`` (eps), ``"v_prediction"`` (``v = alpha * eps - sigma * x0``,
  Salimans & Ho 2022) and ``"flow"`` (velocity ``v = eps - x0``).
* All schedule math runs in float64; functions taking a sample ``x`` return ``x``'s dtype
  (float32 in, float32 out). ``alpha``/``sigma``/``alphas_cumprod`` are returned in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FlowSchedule",
    "VPSchedule",
    "append_dims",
    "eps_to_x0",
    "flow_to_x0",
    "lcm_boundary_scalings",
    "lightning_forward",
    "v_to_x0",
    "x0_to_eps",
    "x0_to_flow",
    "x0_to_v",
]


def append_dims(x: Tensor, target_ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample tensor of shape (B,) broadcasts over (B, ...)."""
    if x.ndim > target_ndim:
        raise ValueError(f"tensor has {x.ndim} dims, more than target_ndim={target_ndim}")
    return x.reshape(*x.shape, *([1] * (target_ndim - x.ndim)))


def _f64(c, like: Tensor) -> Tensor:
    """Coefficient (float or tensor) as float64 on ``like``'s device, broadcastable against ``like``."""
    return append_dims(torch.as_tensor(c, dtype=torch.float64, device=like.device), like.ndim)


# Conversions between parametrisations of x_t = alpha * x0 + sigma * eps (float64 math, dtype of
# the first sample argument returned). v_to_x0 / x0_to_v assume alpha^2 + sigma^2 = 1 (VP).


def eps_to_x0(eps: Tensor, x_t: Tensor, alpha, sigma) -> Tensor:
    """x0 = (x_t - sigma * eps) / alpha (DDPM, Ho et al. 2020, Eq. 4 solved for x0)."""
    return ((x_t.double() - _f64(sigma, x_t) * eps.double()) / _f64(alpha, x_t)).to(x_t.dtype)


def x0_to_eps(x0: Tensor, x_t: Tensor, alpha, sigma) -> Tensor:
    """eps = (x_t - alpha * x0) / sigma (DDPM, Ho et al. 2020, Eq. 4 solved for eps)."""
    return ((x_t.double() - _f64(alpha, x_t) * x0.double()) / _f64(sigma, x_t)).to(x0.dtype)


def v_to_x0(v: Tensor, x_t: Tensor, alpha, sigma) -> Tensor:
    """x0 = alpha * x_t - sigma * v for v = alpha * eps - sigma * x0 (Salimans & Ho 2022, VP only)."""
    return (_f64(alpha, x_t) * x_t.double() - _f64(sigma, x_t) * v.double()).to(x_t.dtype)


def x0_to_v(x0: Tensor, eps: Tensor, alpha, sigma) -> Tensor:
    """v = alpha * eps - sigma * x0 (Salimans & Ho 2022)."""
    return (_f64(alpha, x0) * eps.double() - _f64(sigma, x0) * x0.double()).to(x0.dtype)


def flow_to_x0(v: Tensor, x_t: Tensor, sigma) -> Tensor:
    """x0 = x_t - sigma * v for x_t = (1 - sigma) * x0 + sigma * eps, v = eps - x0 (Esser et al. 2024)."""
    return (x_t.double() - _f64(sigma, x_t) * v.double()).to(x_t.dtype)


def x0_to_flow(x0: Tensor, x_t: Tensor, sigma) -> Tensor:
    """v = eps - x0 = (x_t - x0) / sigma (rectified flow, Esser et al. 2024)."""
    return ((x_t.double() - x0.double()) / _f64(sigma, x_t)).to(x0.dtype)


def lcm_boundary_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """Consistency-model boundary conditions ``f(x, t) = c_skip * x + c_out * F(x, t)``.

    LCM (Luo et al. 2023, Eq. 5 and App.), as in diffusers' LCMScheduler:
    ``c_skip = sigma_data^2 / ((t*s)^2 + sigma_data^2)``, ``c_out = t*s / sqrt((t*s)^2 + sigma_data^2)``
    with ``s = timestep_scaling``, so ``c_skip -> 1, c_out -> 0`` as ``t -> 0``. Float64 tensors.
    """
    ts = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    denom = ts**2 + sigma_data**2
    return sigma_data**2 / denom, ts / denom.sqrt()


def lightning_forward(schedule, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """SDXL-Lightning's schedule fix (Lin et al. 2024, Eq. 24): the forward process, except that the
    last training timestep (t = T - 1, the paper's t = T) is pure noise, as the sampler starts there;
    SD's schedule keeps alpha_T = 0.068 of signal. Per-sample ``t`` of shape (B,)."""
    last = append_dims(torch.as_tensor(t) >= schedule.num_train_timesteps - 1, x0.ndim)
    return torch.where(last.to(x0.device), noise.to(x0.dtype), schedule.add_noise(x0, noise, t))


class _Schedule:
    """Shared forward process; subclasses define ``alpha(t)`` and ``sigma(t)`` (float64)."""

    def _coefs(self, t, like: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t, device=like.device)
        return append_dims(self.alpha(t), like.ndim), append_dims(self.sigma(t), like.ndim)

    def add_noise(self, x0: Tensor, noise: Tensor, t) -> Tensor:
        """x_t = alpha(t) * x0 + sigma(t) * eps (Ho et al. 2020, Eq. 4); ``t`` of shape (B,) or scalar."""
        a, s = self._coefs(t, x0)
        return (a * x0.double() + s * noise.double()).to(x0.dtype)


@dataclass(frozen=True)
class VPSchedule(_Schedule):
    """Discrete variance-preserving schedule of DDPM (Ho et al. 2020) / Stable Diffusion."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    kind: ClassVar[str] = "vp"
    BETA_SCHEDULES: ClassVar[tuple[str, ...]] = ("scaled_linear", "linear")
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    def __post_init__(self):
        if self.beta_schedule not in self.BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}; allowed: {self.BETA_SCHEDULES}")
        if self.prediction_type not in self.PREDICTION_TYPES:
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r}; allowed: {self.PREDICTION_TYPES}"
            )

    def alphas_cumprod(self) -> Tensor:
        """prod_{s<=t} (1 - beta_s), float64, shape (T,); "scaled_linear" is linear in sqrt(beta)."""
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        else:
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float64) ** 2
        return torch.cumprod(1.0 - betas, dim=0)

    def _ve_table(self, device) -> Tensor:
        """sigma/alpha = sqrt((1 - acp) / acp) at the integer timesteps (increasing), float64."""
        acp = self.alphas_cumprod().to(device)
        return ((1.0 - acp) / acp).sqrt()

    def _ve_sigma(self, t) -> Tensor:
        """sigma/alpha, linearly interpolated in t like np.interp (clamped)."""
        t = torch.as_tensor(t)
        table = self._ve_table(t.device)
        t = t.double().clamp(0, len(table) - 1)
        i = t.floor().clamp(max=len(table) - 2)
        w = t - i
        i = i.long()
        return table[i] * (1 - w) + table[i + 1] * w

    def timestep_at(self, ve_sigma) -> Tensor:
        """The inverse of the interpolated ``sigma / alpha``: the fractional ``t`` whose noise-to-signal
        ratio is ``ve_sigma`` (float64, shape of ``ve_sigma``; clamped to ``[0, T - 1]``)."""
        ve = torch.as_tensor(ve_sigma).double()
        table = self._ve_table(ve.device)
        ve = ve.clamp(table[0], table[-1])
        i = (torch.searchsorted(table, ve.contiguous(), right=True) - 1).clamp(0, len(table) - 2)
        return i.double() + (ve - table[i]) / (table[i + 1] - table[i])

    def alpha(self, t) -> Tensor:
        """sqrt(acp(t)), float64, shape of ``t``."""
        return (1.0 + self._ve_sigma(t) ** 2).rsqrt()

    def sigma(self, t) -> Tensor:
        """sqrt(1 - acp(t)), float64, shape of ``t``."""
        s = self._ve_sigma(t)
        return s * (1.0 + s**2).rsqrt()

    def to_x0(self, model_output: Tensor, x_t: Tensor, t) -> Tensor:
        """Native prediction (eps or v) -> x0."""
        a, s = self._coefs(t, x_t)
        if self.prediction_type == "epsilon":
            return eps_to_x0(model_output, x_t, a, s)
        return v_to_x0(model_output, x_t, a, s)

    def to_eps(self, model_output: Tensor, x_t: Tensor, t) -> Tensor:
        """Native prediction -> eps; for v: eps = sigma * x_t + alpha * v (Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return model_output.to(x_t.dtype)
        a, s = self._coefs(t, x_t)
        return (s * x_t.double() + a * model_output.double()).to(x_t.dtype)

    def from_x0(self, x0: Tensor, x_t: Tensor, t) -> Tensor:
        """x0 -> native prediction (inverse of ``to_x0``; training targets / export)."""
        a, s = self._coefs(t, x_t)
        eps = x0_to_eps(x0.double(), x_t, a, s)
        if self.prediction_type == "epsilon":
            return eps.to(x0.dtype)
        return x0_to_v(x0.double(), eps, a, s).to(x0.dtype)

    def timesteps(self, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
        """Decreasing int64 sampling timesteps, as diffusers' DDIMScheduler.set_timesteps.

        Spacings follow Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are
        Flawed"), Table 2. ``steps_offset`` only applies to "leading" (SD 1.x configs use 1).
        For "trailing", numpy's float ``arange`` occasionally yields ``num_steps + 1`` values in
        diffusers (the extra one being -1); we keep the first ``num_steps``.
        """
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        if spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps))[:num_steps] - 1
        elif spacing == "leading":
            ts = np.arange(num_steps)[::-1] * (T // num_steps) + steps_offset
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1]
        else:
            raise ValueError(f"unsupported spacing {spacing!r}; allowed: ('trailing', 'leading', 'linspace')")
        return torch.from_numpy(ts.astype(np.int64))

    @classmethod
    def from_diffusers_config(cls, config: dict) -> VPSchedule:
        """Build from a diffusers scheduler config (DDPM/DDIM/Euler/DPM-Solver/LCM...).

        Reads the dataclass fields (missing keys take this class's defaults) and ignores the rest,
        except that custom ``trained_betas`` and ``rescale_betas_zero_snr`` change the schedule and
        are rejected rather than silently ignored.
        """
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
            raise ValueError("trained_betas / rescale_betas_zero_snr are not supported by VPSchedule")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def to_diffusers_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class FlowSchedule(_Schedule):
    """Rectified-flow schedule of SD3 (Esser et al. 2024): sigma = t / T, alpha = 1 - sigma."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    kind: ClassVar[str] = "flow"
    prediction_type: ClassVar[str] = "flow"
    UNSUPPORTED: ClassVar[tuple[str, ...]] = (
        "use_dynamic_shifting", "invert_sigmas", "shift_terminal",
        "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    )  # fmt: skip

    def sigma(self, t) -> Tensor:
        return torch.as_tensor(t).double() / self.num_train_timesteps

    def alpha(self, t) -> Tensor:
        return 1.0 - self.sigma(t)

    def shift_sigma(self, sigma):
        """Timestep shift (Esser et al. 2024, Eq. 23): shift * s / (1 + (shift - 1) * s)."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def to_x0(self, model_output: Tensor, x_t: Tensor, t) -> Tensor:
        """Velocity v = eps - x0 -> x0 = x_t - sigma * v."""
        return flow_to_x0(model_output, x_t, self._coefs(t, x_t)[1])

    def to_eps(self, model_output: Tensor, x_t: Tensor, t) -> Tensor:
        """eps = x0 + v = x_t + (1 - sigma) * v."""
        return (x_t.double() + self._coefs(t, x_t)[0] * model_output.double()).to(x_t.dtype)

    def from_x0(self, x0: Tensor, x_t: Tensor, t) -> Tensor:
        """x0 -> velocity (x_t - x0) / sigma."""
        return x0_to_flow(x0, x_t, self._coefs(t, x_t)[1])

    def timesteps(self, num_steps: int) -> Tensor:
        """Decreasing float32 timesteps of diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        T = self.num_train_timesteps
        sigmas = np.linspace(1.0, self.shift_sigma(1.0 / T), num_steps)
        return torch.from_numpy(self.shift_sigma(sigmas) * T).float()

    @classmethod
    def from_diffusers_config(cls, config: dict) -> FlowSchedule:
        """Build from a FlowMatchEulerDiscreteScheduler config; resolution-dependent or custom sigma
        options (``use_dynamic_shifting``, ``shift_terminal``, ...) are rejected."""
        bad = [k for k in cls.UNSUPPORTED if config.get(k)]
        if bad:
            raise ValueError(f"unsupported flow-matching scheduler options {bad} (set in config)")
        return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})

    def to_diffusers_config(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
