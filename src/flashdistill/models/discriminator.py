"""Discriminator head on the frozen teacher's encoder features (Flash Diffusion, Sec. "Adversarial
objective"): 4x4 stride-2 convolutions with GroupNorm and SiLU down to 1x1, then a 1x1
convolution to one logit per sample."""
from __future__ import annotations

import torch
from torch import nn


def _groups(c: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if c % g == 0:
            return g
    return 1


class DiscriminatorHead(nn.Module):
    def __init__(self, in_channels: int, spatial: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels
        layers, c, s = [], in_channels, spatial
        while s > 1:
            layers += [nn.Conv2d(c, hidden, 4, stride=2, padding=1), nn.GroupNorm(_groups(hidden), hidden), nn.SiLU()]
            c, s = hidden, (s + 1) // 2
        layers.append(nn.Conv2d(c, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)
