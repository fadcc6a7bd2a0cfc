"""One calling convention over every backbone.

``Denoiser(backbone, schedule)`` turns a raw network (a diffusers UNet today; DiT/MMDiT adapters
follow the same contract) into ``denoiser(x_t, t, cond) -> x0`` in float32, where ``t`` follows
the convention of :mod:`flashdistill.core.schedules` and ``cond`` is a flat dict of batched
tensors (``encoder_hidden_states`` for SD-style UNets). Samplers and losses only ever see this.

Precision boundary: the input is cast to the backbone's dtype here and the output back to
float32 here; schedule arithmetic outside stays in float32/float64.
"""
from __future__ import annotations

import torch
from torch import nn


class _StopForward(Exception):
    pass


class Denoiser(nn.Module):
    def __init__(self, backbone: nn.Module, schedule):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The backbone's native output (eps, v or flow velocity), float32."""
        out = self.backbone(x_t.to(self.dtype), t, **cond, return_dict=False)[0]
        return out.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.schedule.to_x0(self.predict(x_t, t, cond), x_t.float(), t)

    def encoder_features(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The UNet encoder's output (down blocks, then the mid block), for discriminator heads.

        The backbone's own forward runs up to the mid block, where a hook stops it, so every
        conditioning path (time, text, added embeddings) is the backbone's own code.
        """
        captured = {}

        def hook(_module, _inputs, output):
            captured["h"] = output
            raise _StopForward

        handle = self.backbone.mid_block.register_forward_hook(hook)
        try:
            self.backbone(x_t.to(self.dtype), t, **cond, return_dict=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"].float()

    def feature_channels(self) -> int:
        return self.backbone.config.block_out_channels[-1]
