"""Timestep distributions pi(t) on a K-point grid (Flash Diffusion, Eq. 3).

The grid is the K-step "trailing" teacher grid, index 0 being the noisiest point (t = 999 for
SD's 1000-step schedule). Flash's pi is a mixture of Gaussians evaluated at the grid indices,
centred on the 4 inference modes at indices 0, K/4, K/2 and 3K/4 (t = 999, 749, 499, 249 for K=32):

    p(j) ∝ sum_m beta_m * exp(-(j - mu_m)^2 / (2 std^2)),  j = 0..K-1

with mode weights beta that change by training phase. ``std`` is in grid-index units. The
reference implementation's default (std = 0.5) puts about 79% of a mode's mass on its centre and
about 10.5% on each neighbour. The paper's text (sigma = sqrt(0.5 / K^2) in t-units, read as a
standard deviation of 0.707 indices) spreads more (56% on the centre); pass ``std=0.5**0.5`` for it.

Ablation variants (paper Fig. 4d): ``uniform`` over the K points, ``gaussian`` (one Gaussian
centred on t = 0.5, std K/4 indices) and ``sharp`` (only the 4 mode indices, with the phase's
weights).
"""
from __future__ import annotations

import math

import torch

PI_KINDS = ("flash", "uniform", "gaussian", "sharp")


def mode_indices(K: int) -> list[int]:
    """Grid indices of the 4 inference timesteps: 0, K/4, K/2, 3K/4."""
    if K < 4 or K % 4:
        raise ValueError(f"K must be a positive multiple of 4, got {K}")
    return [0, K // 4, K // 2, 3 * K // 4]


def phase_at(step: int, phase_steps: list[int]) -> int:
    """Phase index at ``step``: phase p lasts phase_steps[p] steps; the last phase then holds."""
    boundary = 0
    for p, n in enumerate(phase_steps):
        boundary += n
        if step < boundary:
            return p
    return len(phase_steps)


def grid_probabilities(K: int, kind: str = "flash", weights: list[float] | None = None, std: float = 0.5) -> torch.Tensor:
    """Probability of each grid index (float64, shape (K,), sums to 1)."""
    j = torch.arange(K, dtype=torch.float64)
    if kind == "uniform":
        p = torch.ones(K, dtype=torch.float64)
    elif kind == "gaussian":
        p = torch.exp(-((j - K / 2) ** 2) / (2 * (K / 4) ** 2))
    elif kind in ("flash", "sharp"):
        if weights is None or len(weights) != 4 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mode weights must be 4 non-negative numbers with a positive sum, got {weights}")
        p = torch.zeros(K, dtype=torch.float64)
        for w, mu in zip(weights, mode_indices(K)):
            if kind == "sharp":
                p[mu] += w
            else:
                if std <= 0:
                    raise ValueError(f"std must be > 0, got {std}")
                p += w * torch.exp(-((j - mu) ** 2) / (2 * std**2)) / math.sqrt(2 * math.pi * std**2)
    else:
        raise ValueError(f"unknown timestep distribution {kind!r}; expected one of {list(PI_KINDS)}")
    return p / p.sum()


def sample_grid_index(probs: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    return torch.multinomial(probs.float(), n, replacement=True, generator=generator)


def skipping_grid(schedule, N: int) -> torch.Tensor:
    """LCM's skipping-step grid (Luo et al. 2023, Sec. 4.3), decreasing, float64, N points.

    VP: diffusers' LCM origin grid ``tau_i = (i + 1) * (T // N) - 1``, i = N-1..0 (N = 50: 999, 979,
    ..., 19), so that LCMScheduler(original_inference_steps=N) samples on it; the skip is k = T // N.
    Flow: the N-step shifted sigmas of the schedule (``schedule.timesteps(N)``)."""
    T = schedule.num_train_timesteps
    if not 1 <= N <= T:
        raise ValueError(f"the skipping grid needs 1 <= N <= {T} points, got {N}")
    if schedule.kind == "flow":
        return schedule.timesteps(N).double()
    k = T // N
    return torch.arange(N, 0, -1, dtype=torch.float64) * k - 1


def next_on_grid(grid: torch.Tensor, index: torch.Tensor, skip: int = 1) -> torch.Tensor:
    """``grid[index + skip]``, or 0 (the clean end; VP: LCM's ``max(t - k, 0)``) past the grid's end."""
    ext = torch.cat([grid, grid.new_zeros(1)])
    return ext[(index + skip).clamp(max=len(grid))]


def lcm_inference_timesteps(grid: torch.Tensor, steps: int) -> list:
    """The ``steps`` sampling timesteps LCMScheduler picks from its N-point origin grid:
    ``grid[floor(linspace(0, N, steps, endpoint=False))]`` (N = 50: 4 -> 999, 759, 499, 259)."""
    N = len(grid)
    if not 1 <= steps <= N:
        raise ValueError(f"steps must be in [1, {N}] for a {N}-point grid, got {steps}")
    idx = torch.floor(torch.linspace(0, N, steps + 1, dtype=torch.float64)[:-1]).long()
    return grid[idx].tolist()
