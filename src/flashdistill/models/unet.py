"""The SD-style UNet used for the built-in teacher (a diffusers ``UNet2DConditionModel``)."""
from __future__ import annotations

from diffusers import UNet2DConditionModel


def digits_unet_config(cross_attention_dim: int = 384, channels: tuple[int, ...] = (32, 64)) -> dict:
    """About 0.9M parameters for 1x8x8 digits: cross-attention at 8x8, plain ResNet block at 4x4."""
    return dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_unet(config: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel(**config)
