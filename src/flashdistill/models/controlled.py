"""A UNet steered by a ControlNet, as one backbone (CoDi's adapted model, Eq. 12).

``ControlledUNet(unet, controlnet)(x_t, t, encoder_hidden_states=..., controlnet_cond=c)`` runs the
ControlNet on the same x_t, t and text, then the UNet with the ControlNet's down and mid residuals
(diffusers' ``down_block_additional_residuals`` / ``mid_block_additional_residual``). The residuals
depend on x_t and t, so they are computed afresh at every call, as diffusers' ControlNet pipelines
do at every step. A ControlNet made by ``ControlNetModel.from_unet`` has zero-initialised output
convolutions: until it trains, the pair is exactly the UNet. Being one module, the pair is a
backbone like any other: :class:`~flashdistill.models.denoiser.Denoiser`, the training loop, its
EMA and its checkpoints see the UNet's LoRA and the ControlNet together.
"""
from __future__ import annotations

import torch
from torch import nn

CONTROLNET_DIR = "controlnet"  # a CoDi run's ControlNet, beside student/


class ControlledUNet(nn.Module):
    def __init__(self, unet: nn.Module, controlnet: nn.Module):
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    @property
    def config(self):
        return self.unet.config

    @property
    def lora_root(self) -> nn.Module:
        """Where a LoRA student goes: the UNet (the ControlNet of a ControlNet teacher stays frozen)."""
        return self.unet

    @property
    def mid_block(self) -> nn.Module:
        """The UNet's mid block (encoder features for discriminators)."""
        return self.unet.mid_block

    def encoder_copy(self) -> "ControlledUNet":
        """A trainable copy of the pair for encoder features (Lightning's discriminator): the
        ControlNet and the UNet's encoder and mid block. The UNet's decoder is not copied, and the
        ControlNet's down-residual convolutions, which feed only that decoder, are frozen (DDP would
        report them unused); its mid residual reaches the features."""
        from .adapters import base_copy, decoder_stubs

        pair = base_copy(self, decoder_stubs("unet.")).requires_grad_(True)
        pair.controlnet.controlnet_down_blocks.requires_grad_(False)
        return pair

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, return_dict: bool = False, **kwargs):
        channels = self.controlnet.config.conditioning_channels
        if controlnet_cond.shape[1] == 1 and channels != 1:  # a 1-channel map for an RGB ControlNet, as convert("RGB")
            controlnet_cond = controlnet_cond.expand(-1, channels, -1, -1)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond.to(sample.dtype), return_dict=False, **kwargs)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=list(down), mid_block_additional_residual=mid,
                         return_dict=False, **kwargs)


EMBEDDING_WIDTHS = (16, 32, 96, 256)  # diffusers' default conditioning embedding (three stride-2 layers: 8x)


def controlnet_for(unet: nn.Module, channels: int, downscale: int = 1) -> nn.Module:
    """A ControlNet copied from ``unet``'s encoder and mid block, zero convolutions out, taking a
    ``channels``-channel condition image ``downscale`` times the UNet's resolution (1: the digits'
    8x8, one conditioning conv; a latent model's VAE factor 2, 4 or 8: one stride-2 layer per
    factor 2, diffusers' default widths)."""
    from diffusers import ControlNetModel

    steps = max(int(downscale), 1).bit_length() - 1
    if 2 ** steps != downscale or steps >= len(EMBEDDING_WIDTHS):
        raise ValueError(f"a ControlNet's conditioning embedding downsamples by 1, 2, 4 or 8, not {downscale}")
    return ControlNetModel.from_unet(unet, conditioning_channels=channels,
                                     conditioning_embedding_out_channels=EMBEDDING_WIDTHS[: steps + 1])
