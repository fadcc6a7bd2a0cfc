"""The SD-style UNet used for the built-in teacher (a diffusers ``UNet2DConditionModel``)."""
from __future__ import annotations

from diffusers import UNet2DConditionModel


def digits_unet_config(cross_attention_dim: int = 384, channels: tuple[int, ...] = (32, 64),
                       extra_channels: int = 0, class_embeds: int = 0) -> dict:
    """About 0.9M parameters for 1x8x8 digits: cross-attention at 8x8, plain ResNet block at 4x4.
    Conditional teachers take ``extra_channels`` more input channels (inpainting: mask and masked
    image; super-resolution: the low-res) and, for noise-augmented super-resolution, a class
    embedding of ``class_embeds`` noise levels (diffusers' upscaler: ``num_class_embeds``)."""
    extra = {"num_class_embeds": class_embeds} if class_embeds else {}
    return dict(
        **extra,
        sample_size=8,
        in_channels=1 + extra_channels,
        out_channels=1,
        block_out_channels=tuple(channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def digits_adapter_config(channels: tuple[int, ...] = (32, 64)) -> dict:
    """A diffusers ``T2IAdapter`` for the digits UNet: a 1-channel stroke map at 8x8
    (``downscale_factor=1``) gives one feature per down block (32 at 8x8, 64 at 4x4), the tensors
    the UNet adds inside each down block."""
    return dict(in_channels=1, channels=list(channels), num_res_blocks=1, downscale_factor=1, adapter_type="full_adapter")


def build_unet(config: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel(**config)
