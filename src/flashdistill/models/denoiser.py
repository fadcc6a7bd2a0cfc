"""One calling convention over every backbone.

``Denoiser(backbone, schedule)`` turns a raw network (a diffusers ``UNet2DConditionModel``,
``PixArtTransformer2DModel`` or ``SD3Transformer2DModel``) into ``denoiser(x_t, t, cond) -> x0``
in float32, where ``t`` follows the convention of :mod:`flashdistill.core.schedules` and ``cond``
holds the backbone's other keyword arguments as batched tensors, possibly nested
(``encoder_hidden_states``; SDXL's ``added_cond_kwargs``; SD3's ``pooled_projections``...).
Samplers and losses only ever see this. Backbones that also predict a variance (PixArt's learned
sigma: twice the input channels) have that half dropped, as their pipelines do.

Precision boundary: the input is cast to the backbone's dtype here and the output back to
float32 here; schedule arithmetic outside stays in float32/float64.

``lora=False`` makes the denoiser a view of the backbone's base weights: a LoRA student shares the
teacher's module, and the teacher's denoiser runs it with the adapters off
(:func:`flashdistill.models.adapters.adapter_scope`). ``None`` runs the module as it is.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..tasks import CONCAT
from .adapters import adapter_scope


class _StopForward(Exception):
    pass


def compile_forward(module: nn.Module) -> None:
    """``torch.compile`` the no-grad calls of ``module`` in place (inductor, static shapes): the
    teacher's solve and CFG scores, a student's no-grad calls (DMD's fake score). Calls with
    gradients stay eager: on the digits UNet, inductor's backward of the whole forward gives wrong
    LoRA gradients (up to 2.3x off a finite difference on half the LoRA tensors, torch 2.13 CPU;
    aot_eager is exact, and so is inductor with max_fusion_size=1: a node-fusion fault;
    docs/quality.md section 11), so nothing that trains goes through it. One
    compiled forward serves a LoRA student and its teacher on the shared module: dynamo's guards tell
    them apart (the adapter scope swaps layers and flips training modes), at one graph per
    (adapters, input shapes). The eager forward stays at hand for calls that must not be traced
    (:meth:`Denoiser.encoder_features` stops a forward with a hook). Undone by :func:`uncompile_forward`."""
    if "_eager_forward" in module.__dict__:
        return
    eager = module.forward
    compiled = torch.compile(eager, dynamic=False)

    def forward(*args, **kwargs):
        return (eager if torch.is_grad_enabled() else compiled)(*args, **kwargs)

    module.__dict__["_eager_forward"] = (eager, "forward" in module.__dict__)  # an instance forward: an accelerate hook
    module.forward = forward


def uncompile_forward(module: nn.Module) -> None:
    eager = module.__dict__.pop("_eager_forward", None)
    if eager is None:
        return
    forward, own = eager
    if own:
        module.forward = forward
    else:
        del module.__dict__["forward"]


def eager_call(module: nn.Module):
    """``module`` itself, or its eager forward where :func:`compile_forward` compiled it."""
    eager = module.__dict__.get("_eager_forward")
    return module if eager is None else eager[0]


def _cast(cond, dtype: torch.dtype):
    """Floating tensors of a (nested) conditioning dict in the backbone's dtype (text embeddings
    are cached in float32; a bf16 teacher takes them in bf16). Lists (T2I-Adapter residuals) come
    back as new lists of new tensors: the UNet pops from that list and adds to its tensors in place,
    so every call gets its own copy (diffusers' adapter pipelines clone them per step)."""
    if torch.is_tensor(cond):
        return cond.to(dtype) if cond.is_floating_point() else cond
    if isinstance(cond, dict):
        return {k: _cast(v, dtype) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return [v.to(dtype).clone() if torch.is_tensor(v) else _cast(v, dtype) for v in cond]
    return cond


def backbone_call(x_t: torch.Tensor, cond: dict, dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    """The backbone's sample and keyword arguments: a spatial condition under ``concat`` joins x_t
    along channels after it (inpainting: ``[x_t, mask, masked]``; super-resolution: ``[x_t, low_res]``)."""
    kwargs = _cast(cond, dtype)
    concat = kwargs.pop(CONCAT, None)
    x = x_t.to(dtype)
    if concat is not None:
        x = torch.cat([x, concat.to(x.device)], 1)
    return x, kwargs


class Denoiser(nn.Module):
    def __init__(self, backbone: nn.Module, schedule, feature_block: int = -1, lora: bool | None = None):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.feature_block = feature_block  # transformers: block whose output feeds the discriminator (-1: middle)
        self.lora = lora  # False: the base weights of a backbone that carries a student's LoRA (the teacher)

    def _scope(self):
        return nullcontext() if self.lora is None else adapter_scope(self.backbone, self.lora)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The backbone's native output (eps, v or flow velocity), float32."""
        x, kwargs = backbone_call(x_t, cond, self.dtype)
        with self._scope():
            out = self.backbone(x, timestep=t, **kwargs, return_dict=False)[0]
        if out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        return out.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.schedule.to_x0(self.predict(x_t, t, cond), x_t.float(), t)

    def _feature_module(self) -> nn.Module:
        if getattr(self.backbone, "mid_block", None) is not None:
            return self.backbone.mid_block
        blocks = getattr(self.backbone, "transformer_blocks", None)
        if blocks is None:
            raise ValueError(f"no encoder features for {type(self.backbone).__name__}: "
                             "expected a UNet mid_block or transformer_blocks")
        i = len(blocks) // 2 if self.feature_block < 0 else self.feature_block
        if not 0 <= i < len(blocks):
            raise ValueError(f"feature_block {self.feature_block} out of range: the backbone has {len(blocks)} blocks")
        return blocks[i]

    def encoder_features(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Features for discriminator heads, (B, C, h, w) float32: a UNet's encoder output (down
        blocks, then the mid block), or a transformer's image tokens after block ``feature_block``
        laid back on the patch grid.

        The backbone's own forward runs up to that module, where a hook stops it, so every
        conditioning path (time, text, added embeddings) is the backbone's own code. A ControlNet's
        mid residual, which diffusers' UNet adds right after its mid block, is added here too (the
        encoder output the decoder sees), so the features see the ControlNet's condition; its down
        residuals go to the skip connections only, not into this output.
        """
        captured = {}

        def residual(_module, _args, kwargs):
            captured["mid"] = kwargs.get("mid_block_additional_residual")

        def hook(_module, _inputs, output):
            captured["h"] = output[-1] if isinstance(output, tuple) else output  # SD3 blocks: (context, image)
            raise _StopForward

        # the module whose forward takes the residual: a ControlledUNet's UNet, or the backbone itself
        inner = getattr(self.backbone, "unet", None)
        inner = inner if isinstance(inner, nn.Module) else self.backbone
        handles = [inner.register_forward_pre_hook(residual, with_kwargs=True),
                   self._feature_module().register_forward_hook(hook)]
        x, kwargs = backbone_call(x_t, cond, self.dtype)
        try:
            with self._scope():
                eager_call(self.backbone)(x, timestep=t, **kwargs, return_dict=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        h = captured["h"]
        if captured.get("mid") is not None and h.ndim == 4:
            h = h + captured["mid"]
        h = h.float()
        if h.ndim == 3:  # tokens (B, N, D) on an (H/p, W/p) grid
            p = self.backbone.config.patch_size
            gh, gw = x_t.shape[-2] // p, x_t.shape[-1] // p
            h = h.transpose(1, 2).reshape(h.shape[0], h.shape[2], gh, gw)
        return h


class X0Denoiser(Denoiser):
    """A backbone whose native output is x0 itself (diffusers' ``prediction_type="sample"``):
    SDXL-Lightning's one-step student."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.predict(x_t, t, cond)
