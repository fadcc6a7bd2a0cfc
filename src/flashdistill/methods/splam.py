"""SPLAM, Sub-Path Linear Approximation Model (Xu et al., ECCV 2024): LCM's consistency step, but
the online student reads a point of the linearised sub-path between the two ends of the teacher's
skip instead of its start,

    z_gamma = gamma x_t + (1 - gamma) (alpha_t / alpha_t') xhat_t'             (Eq. 12)
    F_theta(z_gamma, gamma, t) = c_skip(t) z_gamma + c_out(t) (z_gamma - sigma(gamma, t) eps_theta) / alpha_t
    L = d( F_theta(z_gamma, gamma, t),  F_theta-(xhat_t', 1, t') ),  gamma ~ U[0, 1]   (Eq. 17)

with sigma(gamma, t) the paper's linear form ``(1 - gamma) (alpha_t / alpha_t') sigma_t' + gamma
sigma_t`` (``sigma_form = "linear"``, the default since 2026-12-05), or the official code's
``sigma^2 = (sigma_t' alpha_t / alpha_t')^2 + gamma^2 (1 - (alpha_t / alpha_t')^2)`` (``"code"``). Both give sigma_t at
gamma = 1 and ``(alpha_t / alpha_t') sigma_t'`` at gamma = 0.

gamma reaches the network through a zero-initialised projection of Fourier features of
``u = 1 - gamma`` into the UNet's time embedding (``time_embedding.cond_proj``). Departure from
the official code, on purpose: the features are ``[sin, cos - 1]``, so gamma = 1 embeds to exactly
zero and the projection is dropped after training (the paper's claim; the code's embedding passes
cos 0 = 1 through the projection, see the notes). Inference and export are LCM's, at gamma = 1.

z_gamma carries less noise than the timestep t the network is told (sigma(0, t) = 0.87 against
sigma_t = 0.998 at t = 999 on SD's schedule), and x0 = (z - sigma eps) / alpha_t multiplies the
resulting eps error by up to 15: at step 0 the gamma = 0 prediction is 1.31 RMS from its target
against 0.22 at gamma = 1 (``scripts/splam_step0.py``). ``input_scale = "variance"`` (EDM's c_in,
1 at gamma = 1, so inference and export are unchanged) scales z_gamma to the variance the network
expects at t and cuts that to 0.12. The official code feeds z_gamma as is (``"none"``, the
default); the digits preset scales, since unscaled its 1- and 2-step students collapse (FD 256 /
236, docs/methods.md). Even scaled, SPLAM stays behind LCM there at 2 and 4 steps.
``input_time = "snr"`` (ours) also tells the network the timestep whose signal-to-noise ratio
is z_gamma's, which makes z_gamma an exact forward-process state: the step-0 error at gamma = 0
becomes 0. With the official code's sigma it leaves the trained 1- and 2-step students where they
were; with the paper's linear sigma, which is z_gamma's exact noise level when x_t' is the DDIM
move of x_t (x_t and x_t' then carry the same noise, and their mix carries the mix of the two
levels; the code's form assumes fresh noise in between), the digits preset's SPLAM improves at
every step count (docs/methods.md), so that preset uses both.

Everything else (skipping grid, guided DDIM teacher step, multiple estimation via
``teacher_steps``, EMA target, pseudo-Huber) is :mod:`flashdistill.methods.lcm`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import field
from ..core.schedules import append_dims, lcm_boundary_scalings
from ..models.denoiser import Denoiser
from ..models.student import add_condition_projection, fourier_features
from . import base
from .lcm import LCMConfig, LCMDistillation, PRESETS as LCM_PRESETS


def subpath_point(x_t: torch.Tensor, x_next: torch.Tensor, ratio: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Eq. 12: ``gamma x_t + (1 - gamma) ratio x_next`` with ``ratio = alpha_t / alpha_t'``;
    per-sample (B,) ``ratio`` and ``gamma``; float64 math, ``x_t``'s dtype out."""
    g, r = append_dims(gamma.double(), x_t.ndim), append_dims(ratio.double(), x_t.ndim)
    return (g * x_t.double() + (1 - g) * r * x_next.double()).to(x_t.dtype)


def subpath_sigma(sigma_t: torch.Tensor, sigma_next: torch.Tensor, ratio: torch.Tensor, gamma: torch.Tensor,
                  form: str = "linear") -> torch.Tensor:
    """sigma(gamma, t) of the noise in z_gamma (float64, per sample). ``code``: the official
    script's ``sqrt((sigma_t' ratio)^2 + gamma^2 (1 - ratio^2))``, exact when the increment
    x_t - ratio x_t' is fresh forward noise; ``linear``: the paper's
    ``(1 - gamma) ratio sigma_t' + gamma sigma_t``, exact when x_t' is a DDIM move of x_t (the same
    noise in both: tests/test_methods.py)."""
    g, r = gamma.double(), ratio.double()
    if form == "code":
        return ((sigma_next.double() * r) ** 2 + g**2 * (1 - r**2)).clamp_min(0).sqrt()
    if form == "linear":
        return (1 - g) * r * sigma_next.double() + g * sigma_t.double()
    raise ValueError(f"unknown sigma form {form!r}; expected 'code' or 'linear'")


def subpath_input_scale(alpha_t: torch.Tensor, sigma_t: torch.Tensor, sigma_gamma: torch.Tensor) -> torch.Tensor:
    """``input_scale = "variance"``: ``sqrt(alpha_t^2 + sigma_t^2) / sqrt(alpha_t^2 + sigma(gamma, t)^2)``
    (float64, per sample), EDM's c_in for z_gamma. z_gamma = alpha_t x0 + sigma(gamma, t) eps carries
    less noise than the network's timestep t says (sigma(0, t) = 0.87 against sigma_t = 0.998 at
    t = 999 on SD's schedule); scaled, its variance (for unit-variance data) is the one a VP network
    sees at t, so the teacher's eps at step 0 is already close to z_gamma's (the official code feeds
    z_gamma as is). 1 at gamma = 1, where sigma(1, t) = sigma_t."""
    return (alpha_t.double() ** 2 + sigma_t.double() ** 2).sqrt() / (alpha_t.double() ** 2 + sigma_gamma.double() ** 2).sqrt()


@dataclass
class SPLAMConfig(LCMConfig):
    sigma_form: Literal["code", "linear"] = field("linear", "sigma(gamma, t): the paper's linear form (exact when x_t' is "
                                                            "a DDIM move of x_t, as the teacher's step makes it) or the "
                                                            "official code's (exact for fresh forward noise between them)")
    gamma_dim: int = field(256, "size of the gamma embedding's Fourier features (the official code: 256)")
    gamma_scale: float = field(10000.0, "the embedding's input is gamma_scale * (1 - gamma) (the official code: 10 * 1000)")
    gamma_one_prob: float = field(0.0, "probability of drawing gamma = 1 exactly, the inference point (0: the paper's U[0, 1])")
    target_ema: float = field(-1.0, "EMA decay of the target network theta- (-1: 0.95, the official code's; "
                                    "0: the student itself without gradient)")
    input_scale: Literal["none", "variance"] = field("none", "scaling of z_gamma before the network: none (the "
                                                     "official code) or variance (1 / sqrt(alpha_t^2 + sigma(gamma, t)^2), the "
                                                     "variance a VP network expects at t; 1 at gamma = 1)")
    input_time: Literal["t", "snr"] = field("t", "the timestep the network is told for z_gamma: t (the paper and the "
                                            "code) or snr (the fractional t whose signal-to-noise ratio is z_gamma's, "
                                            "with z_gamma scaled to that t's VP state; t at gamma = 1)")

    def validate(self):
        super().validate()
        if not 0.0 <= self.gamma_one_prob <= 1.0 or self.gamma_scale <= 0:
            raise ValueError(f"need gamma_one_prob in [0, 1] and gamma_scale > 0, got {self.gamma_one_prob}, {self.gamma_scale}")
        if self.gamma_dim < 4 or self.gamma_dim % 2:
            raise ValueError(f"gamma_dim must be an even number >= 4, got {self.gamma_dim}")

    @property
    def ema(self) -> float:
        return 0.95 if self.target_ema == -1.0 else self.target_ema


PRESETS = {
    # SD1.5 (paper, Sec. 5.1): w = 3 with k = 100 = 5 DDIM steps of k_phi = 20 (multiple estimation),
    # Huber loss; the official README: lr 8e-6 (full), EMA 0.95. Our students are LoRAs by default.
    "sd": {"guidance": 4.0, "teacher_steps": 5},
    "sdxl": {},
    "pixart": {},
    "sd3": {},
    # SD2.1 (paper) and the official code: w = 8 in LCM form, k = k_phi = 20.
    "sd2": {"guidance": 9.0},
    # input_scale = variance: the official code's unscaled z_gamma collapses the 1- and 2-step
    # students at this scale (FD 256 / 236); scaled, 44.7 / 33.9 over two seeds (docs/methods.md).
    # sigma_form = linear (the paper's, exact when x_t' is a DDIM move of x_t) with input_time = snr
    # (the network told z_gamma's own noise level): 2- and 4-step FD 33.1 / 23.2 -> 29.3 / 15.1,
    # pixel FD lower at every step count, 1-step adherence 0.965 -> 0.937 (two seeds, docs/methods.md)
    # teacher_steps = 5 (the paper's SD1.5 multiple estimation, k = 100 by 5 DDIM steps of 20, as the
    # sd preset): 44.4 / 29.3 / 15.1 -> 15.4 / 13.0 / 9.0 at 1 / 2 / 4 steps, pixel FD and 1-step
    # adherence better too (two seeds, 2026-12-05), at 2.2x the time per step (docs/methods.md)
    # The samplers' timesteps: SPLAM trains at every point of the N-grid, and its 2-step student samples
    # better at [999, 299] than at LCMScheduler's [999, 499] (FD 10.28 / 9.91 -> 8.47 / 8.53, pixel FD
    # 0.282 / 0.258 -> 0.237 / 0.222, for 0.2-0.4 points of adherence, two seeds of the methods
    # benchmark's students), its 4-step one a little at [999, 399, 199, 99], CoDi's table (9.19 / 8.84 ->
    # 8.84 / 8.69, adherence up); LCM-LoRA's students do not gain, so LCM keeps LCMScheduler's picks
    # (docs/methods.md, "The sampler's timesteps").
    "digits": {**LCM_PRESETS["digits"], "gamma_dim": 32, "input_scale": "variance", "input_time": "snr",
               "teacher_steps": 5, "two_step_timesteps": [999, 299], "four_step_timesteps": [999, 399, 199, 99]},
}


def build_config(teacher, preset: str = "auto", *layers: dict) -> tuple[SPLAMConfig, str]:
    return base.build_config(SPLAMConfig, PRESETS, teacher, preset, *layers)


class SPLAMDistillation(LCMDistillation):
    name = "splam"
    label = "SPLAM"
    title = "SPLAM, Sub-Path Linear Approximation (Xu et al. 2024)"
    config_class = SPLAMConfig

    def prepare(self) -> None:
        if self.schedule.kind != "vp":
            raise ValueError("SPLAM's sub-path (Eq. 12) and sigma(gamma, t) are derived for VP schedules "
                             "(alpha^2 + sigma^2 = 1); this flow-matching teacher would need their flow form")
        if self.family in ("pixart", "sd3"):
            raise ValueError(f"SPLAM's gamma-embedding needs a UNet time embedding (time_embedding.cond_proj); "
                             f"{self.family} transformers have none")
        super().prepare()

    def uses_w_embedding(self) -> bool:
        if self.config.w_mode == "embedded":
            raise ValueError("w_mode=embedded: SPLAM's gamma-embedding takes the UNet's time_embedding.cond_proj, the "
                             "layer LCM's w-embedding would use; SPLAM distils one fixed scale (w_mode=fixed)")
        return False

    def make_student(self) -> torch.nn.Module:
        return add_condition_projection(super().make_student(), self.config.gamma_dim)

    def online(self, models: dict, x_t, x_next, t, t_next, cond: dict, generator,
               gamma: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """F_theta(z_gamma, gamma, t) with gradient; gamma ~ U[0, 1] per sample unless given."""
        sch = self.schedule
        c = self.config
        if gamma is None:
            gamma = torch.rand(x_t.shape[0], generator=generator, dtype=torch.float64)
            if c.gamma_one_prob > 0:
                one = torch.rand(x_t.shape[0], generator=generator, dtype=torch.float64) < c.gamma_one_prob
                gamma = torch.where(one, torch.ones_like(gamma), gamma)
        gamma = gamma.double().to(x_t.device)
        a_t, s_t, a_n, s_n = sch.alpha(t.double()), sch.sigma(t.double()), sch.alpha(t_next.double()), sch.sigma(t_next.double())
        ratio = a_t / a_n
        z = subpath_point(x_t, x_next, ratio, gamma)
        sig = subpath_sigma(s_t, s_n, ratio, gamma, c.sigma_form)
        emb = fourier_features(1.0 - gamma, c.gamma_dim, scale=c.gamma_scale).to(z.device)
        z_in, t_in = z, t
        if c.input_scale == "variance" or c.input_time == "snr":
            z_in = (z.double() * append_dims(subpath_input_scale(a_t, s_t, sig), z.ndim)).to(z.dtype)
        if c.input_time == "snr":
            # z_gamma = alpha_t x0 + sigma(gamma, t) eps, scaled by 1 / sqrt(alpha_t^2 + sigma(gamma, t)^2),
            # is exactly the VP state at the timestep whose sigma / alpha is sigma(gamma, t) / alpha_t
            t_in = sch.timestep_at(sig / a_t).float()
        native = Denoiser(models["student"], sch).predict(z_in, t_in, {**cond, "timestep_cond": emb})
        eps = sch.to_eps(native, z_in, t_in)  # the network's own eps at timestep t_in, in its input's frame
        x0 = (z.double() - append_dims(sig, z.ndim) * eps.double()) / append_dims(a_t, z.ndim)
        c_skip, c_out = (append_dims(v, z.ndim) for v in lcm_boundary_scalings(t))
        pred = (c_skip * z.double() + c_out * x0).float()
        return pred, {"gamma": gamma.mean().float()}

    def finalize(self, out_dir, models: dict) -> None:
        # gamma = 1 embeds to zero: the projection adds nothing at inference, so it is not exported
        student = base.unwrap(models["student"])
        student.time_embedding.cond_proj = None
        super().finalize(out_dir, models)


Method = SPLAMDistillation
