"""Discriminator head on the frozen teacher's encoder features (Flash Diffusion, Sec. "Adversarial
objective"): 4x4 stride-2 convolutions with GroupNorm and SiLU down to 1x1, then a 1x1
convolution to one logit per sample.

GroupNorm's group count is chosen per layer so that every group normalises at least
``MIN_GROUP_ELEMENTS`` values. With the usual 32 groups, a 1x1 map of 64 channels (the digits
teacher's head) leaves 2 values per group, which GroupNorm maps to +-1 whatever their
magnitude, with a gradient near zero: the head then cannot learn (measured: accuracy 0.5, real
and fake logits both 0.5, for a whole run). At SD scale (1280 channels) nothing changes."""
from __future__ import annotations

import torch
from torch import nn


MIN_GROUP_ELEMENTS = 16


def _groups(c: int, spatial: int = 1) -> int:
    """The largest of 32, 16, ..., 1 that divides ``c`` and leaves each group at least
    ``MIN_GROUP_ELEMENTS`` values on a ``spatial`` x ``spatial`` map."""
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0 and (c // g) * spatial * spatial >= MIN_GROUP_ELEMENTS:
            return g
    return 1


class DiscriminatorHead(nn.Module):
    def __init__(self, in_channels: int, spatial: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels
        layers, c, s = [], in_channels, spatial
        while s > 1:
            s_out = (s + 1) // 2
            layers += [nn.Conv2d(c, hidden, 4, stride=2, padding=1), nn.GroupNorm(_groups(hidden, s_out), hidden), nn.SiLU()]
            c, s = hidden, s_out
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)
