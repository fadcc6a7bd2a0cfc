"""Tiny diffusers pipelines built in code and saved to a folder, one per supported family: a
2-block UNet or a 2-layer transformer, a tiny VAE (latents 8x8 for 16x16 images), 2-layer CLIP
or T5 text encoders, and tokenizers built from a small vocabulary written here. Nothing is
downloaded; each builds in well under a second."""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a an the of photo cat dog red car on street bowl fruit mountain lake at sunset digit "
         "handwritten number one two three seven").split()
LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
IMAGE_SIZE = 16


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {}
    for t in ["<|startoftext|>", "<|endoftext|>"] + LETTERS + [c + "</w>" for c in LETTERS] + [w + "</w>" for w in WORDS]:
        vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(max_length: int = 32):
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS]
    pieces += [(c, -2.0) for c in LETTERS] + [("▁", -3.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def clip_text(projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(WORDS) + 2 * len(LETTERS) + 2,
                         projection_dim=hidden, max_position_embeddings=77, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_text():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(t5_tokenizer()), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels: int = 4, shift: float | None = None, scale: float = 0.18215):
    from diffusers import AutoencoderKL

    kw = {} if shift is None else {"shift_factor": shift}
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=8, sample_size=IMAGE_SIZE, scaling_factor=scale, **kw).eval()


def unet(cross: int, sdxl: bool = False, prediction_type: str = "epsilon", in_channels: int = 4, **extra):
    from diffusers import UNet2DConditionModel

    kw = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=6 * 8 + 32) if sdxl else {}
    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 2, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross,
                                attention_head_dim=4, norm_num_groups=8, **kw, **extra).eval()


def _seeded(fn, seed):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


def build(family: str, out: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write a tiny ``family`` pipeline (sd, sd-inpaint, sd-upscale, sd-adapter, sdxl-adapter, sd-controlnet,
    sdxl-controlnet, sdxl, pixart, sd3) to ``out`` and return it."""
    import diffusers

    def make():
        sd_sched = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type=prediction_type, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        if family == "sd":
            return diffusers.StableDiffusionPipeline(
                vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(), unet=unet(32),
                scheduler=diffusers.DDIMScheduler(**sd_sched), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        if family == "sd-inpaint":  # the 9-channel inpainting UNet: [latents, mask, masked image latents]
            return diffusers.StableDiffusionInpaintPipeline(
                vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(), unet=unet(32, in_channels=9),
                scheduler=diffusers.DDIMScheduler(**sd_sched), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        if family == "sd-upscale":  # x2 here (a 2-block VAE): [latents, noised low-res RGB], noise level as class label
            return diffusers.StableDiffusionUpscalePipeline(
                vae=vae(scale=0.08333), text_encoder=clip_text(), tokenizer=clip_tokenizer(),
                unet=unet(32, in_channels=7, num_class_embeds=1000), low_res_scheduler=diffusers.DDPMScheduler(),
                scheduler=diffusers.DDIMScheduler(**sd_sched), safety_checker=None, feature_extractor=None,
                watermarker=None, max_noise_level=350)
        if family == "sd-adapter":  # a T2I-Adapter on a 1-channel sketch: features at 8x8 and 4x4
            adapter = diffusers.T2IAdapter(in_channels=1, channels=[16, 32], num_res_blocks=1, downscale_factor=2,
                                           adapter_type="full_adapter")
            return diffusers.StableDiffusionAdapterPipeline(
                vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(), unet=unet(32), adapter=adapter.eval(),
                scheduler=diffusers.DDIMScheduler(**sd_sched), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        if family == "sdxl-adapter":  # the same adapter on the SDXL UNet (pooled text embeddings, time ids)
            adapter = diffusers.T2IAdapter(in_channels=1, channels=[16, 32], num_res_blocks=1, downscale_factor=2,
                                           adapter_type="full_adapter")
            return diffusers.StableDiffusionXLAdapterPipeline(
                vae=vae(scale=0.13025), text_encoder=clip_text(), text_encoder_2=clip_text(projection=True),
                tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet(64, sdxl=True), adapter=adapter.eval(),
                scheduler=diffusers.EulerDiscreteScheduler(**{k: v for k, v in sd_sched.items() if k not in ("clip_sample", "set_alpha_to_one")}))
        if family in ("sd-controlnet", "sdxl-controlnet"):  # an RGB ControlNet with one stride-2 layer (16 px -> 8x8 latents)
            xl = family == "sdxl-controlnet"
            base = unet(64, sdxl=True) if xl else unet(32)
            controlnet = diffusers.ControlNetModel.from_unet(base, conditioning_channels=3,
                                                             conditioning_embedding_out_channels=(16, 32))
            with torch.no_grad():  # away from the zero initialisation, so that the condition steers
                for m in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                          controlnet.controlnet_cond_embedding.conv_out]:
                    m.weight.normal_(0, 0.2)
            if xl:
                return diffusers.StableDiffusionXLControlNetPipeline(
                    vae=vae(scale=0.13025), text_encoder=clip_text(), text_encoder_2=clip_text(projection=True),
                    tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=base, controlnet=controlnet.eval(),
                    scheduler=diffusers.EulerDiscreteScheduler(**{k: v for k, v in sd_sched.items() if k not in ("clip_sample", "set_alpha_to_one")}))
            return diffusers.StableDiffusionControlNetPipeline(
                vae=vae(), text_encoder=clip_text(), tokenizer=clip_tokenizer(), unet=base, controlnet=controlnet.eval(),
                scheduler=diffusers.DDIMScheduler(**sd_sched), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)
        if family == "sdxl":
            return diffusers.StableDiffusionXLPipeline(
                vae=vae(scale=0.13025), text_encoder=clip_text(), text_encoder_2=clip_text(projection=True),
                tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet(64, sdxl=True),
                scheduler=diffusers.EulerDiscreteScheduler(**{k: v for k, v in sd_sched.items() if k not in ("clip_sample", "set_alpha_to_one")}))
        if family == "pixart":
            transformer = diffusers.PixArtTransformer2DModel(
                sample_size=IMAGE_SIZE // 2, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                caption_channels=32, in_channels=4, cross_attention_dim=16, out_channels=8, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000)
            return diffusers.PixArtAlphaPipeline(
                tokenizer=t5_tokenizer(), text_encoder=t5_text(), vae=vae(), transformer=transformer.eval(),
                scheduler=diffusers.DPMSolverMultistepScheduler(**{k: v for k, v in sd_sched.items() if k not in ("clip_sample", "set_alpha_to_one", "steps_offset")}))
        if family == "sd3":
            transformer = diffusers.SD3Transformer2DModel(
                sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=64, pooled_projection_dim=64,
                out_channels=4)
            return diffusers.StableDiffusion3Pipeline(
                transformer=transformer.eval(), scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=vae(shift=0.0609, scale=1.5305), text_encoder=clip_text(projection=True), tokenizer=clip_tokenizer(),
                text_encoder_2=clip_text(projection=True), tokenizer_2=clip_tokenizer(), text_encoder_3=None,
                tokenizer_3=None)
        raise ValueError(family)

    pipe = _seeded(make, seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return Path(out)
