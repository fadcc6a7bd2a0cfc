"""One backbone, several weight sets (issue 14: a LoRA student costs a LoRA, not a second UNet).

A LoRA student is the teacher's own module with peft LoRA layers injected in place, as diffusers'
LCM-LoRA scripts and the Flash reference do: the teacher's forward is the same module with its
adapters switched off (:func:`adapter_scope`); the student's forward has them on. Frozen extra
weight sets of the student (an EMA target, a previous stage's student) are dicts of tensors swapped
into the live parameters for a no-grad call (:func:`swapped_weights`), not module copies.

This sits at the bottom of :mod:`flashdistill.models` beside :mod:`.denoiser`; it imports nothing
of the package.
"""
from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager

import torch
from torch import nn


def lora_layers(module: nn.Module) -> list[nn.Module]:
    """The peft tuner layers (LoRA-wrapped Linear/Conv) inside ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def lora_root(module: nn.Module) -> nn.Module:
    """The part of a backbone a LoRA student goes into: the module itself, or the submodule it
    names as ``lora_root`` (a ControlNet teacher's UNet: its ControlNet takes no LoRA)."""
    return getattr(module, "lora_root", module)


def lora_metadata(rank: int, alpha: float, targets) -> dict:
    """A LoRA's peft ``LoraConfig`` as the JSON-able dict diffusers stores beside LoRA weights
    (``*_lora_adapter_metadata``), so that its loaders rebuild the rank and alpha exactly."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian")
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


class _Layout:
    """What :func:`adapter_scope` touches in a module, found once per structure: its LoRA layers,
    where each outermost one sits (parent, name, base layer), all its submodules and those with
    diffusers' ``gradient_checkpointing`` flag (a walk of a UNet's ~700 submodules costs
    milliseconds, as much as a digits teacher call)."""

    def __init__(self, module: nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.modules = list(module.modules())
        self.layers = lora_layers(module)
        self.checkpointable = [m for m in self.modules if "gradient_checkpointing" in m.__dict__]
        self.places = []  # (parent's child dict, name, LoRA layer, base layer), outermost layers only
        for name, parent in module.named_modules():
            if isinstance(parent, BaseTunerLayer):
                continue  # a LoRA layer's own children (its base layer, lora_A/B) stay where they are
            for child_name, child in parent._modules.items():
                if isinstance(child, BaseTunerLayer):
                    self.places.append((parent._modules, child_name, child, child.get_base_layer()))


_LAYOUTS: "weakref.WeakKeyDictionary[nn.Module, _Layout]" = weakref.WeakKeyDictionary()


def forget_layout(module: nn.Module) -> None:
    """Drop the cached layout of ``module`` (called where the structure changes: LoRA injected,
    stripped or fused)."""
    _LAYOUTS.pop(module, None)


def _layout(module: nn.Module) -> _Layout:
    """The cached layout, built on first use and after :func:`forget_layout`. Not re-validated per
    call (counting a UNet's submodules costs more than a digits teacher call): whatever changes a
    module's structure (``make_student_backbone``, ``fuse_lora``, ``strip_adapters``,
    ``add_condition_projection``) calls :func:`forget_layout`."""
    found = _LAYOUTS.get(module)
    if found is None:
        found = _LAYOUTS[module] = _Layout(module)
    return found


@contextmanager
def adapter_scope(module: nn.Module, enabled: bool):
    """Run ``module`` with its LoRA layers on (``enabled``) or off (the base weights in eval mode:
    the teacher, whatever mode the student's training left the shared module in).

    peft's public switch (``enable_adapters``) also flips ``requires_grad`` on the adapter weights,
    which must not happen in the middle of a training step whose student graph is live, so this
    sets the layers' ``_disable_adapters`` flag directly and restores it on exit (peft 0.21; the
    tests check that a disabled call equals the plain teacher bit for bit and that an enabled one
    sees the LoRA). With gradients enabled, diffusers' gradient checkpointing is suspended for the
    call: its recomputation would run during backward, after this scope has restored the flags.

    Switched off, each LoRA layer is also taken out of its parent for the call and its base layer
    put in its place, so a teacher call runs the plain layers without peft's per-layer dispatch
    (on the digits UNet that dispatch is a visible share of a teacher call). Not for merged layers,
    whose base weights hold the LoRA: those keep peft's own path (which unmerges).
    """
    layout = _layout(module)
    if not layout.layers:
        yield module
        return
    # plain attributes, written through __dict__: nn.Module.__setattr__ costs microseconds per call,
    # milliseconds over a UNet's submodules
    before = [m.__dict__["_disable_adapters"] for m in layout.layers]
    modes = [m.__dict__["training"] for m in layout.modules] if module.training and not enabled else None
    checkpointed = [m for m in layout.checkpointable if m.__dict__["gradient_checkpointing"]] \
        if torch.is_grad_enabled() else []
    places = [] if enabled or any(m.merged for m in layout.layers) else layout.places
    try:
        for m in layout.layers:
            m.__dict__["_disable_adapters"] = not enabled
        for children, name, _, base in places:
            children[name] = base
        for m in checkpointed:
            m.__dict__["gradient_checkpointing"] = False
        if modes is not None:
            for m in layout.modules:
                m.__dict__["training"] = False
        yield module
    finally:
        for children, name, layer, _ in places:
            children[name] = layer
        for m, flag in zip(layout.layers, before):
            m.__dict__["_disable_adapters"] = flag
        for m in checkpointed:
            m.__dict__["gradient_checkpointing"] = True
        if modes is not None:
            for m, mode in zip(layout.modules, modes):
                m.__dict__["training"] = mode


def strip_adapters(module: nn.Module) -> nn.Module:
    """Put every LoRA layer's base layer back in its place, dropping the adapters (no merge)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(module.named_modules()):
        if isinstance(m, BaseTunerLayer):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())
    root = lora_root(module)
    if "peft_config" in root.__dict__:  # what inject_adapter_in_model records on the model
        del root.peft_config
    forget_layout(root)
    forget_layout(module)
    return module


def base_copy(module: nn.Module, replace: dict[str, nn.Module] | None = None) -> nn.Module:
    """A deep copy of ``module`` without its adapters: the teacher alone, for models that need
    their own trainable copy (Lightning's discriminator, DMD2's trained fake score).

    ``replace`` maps names of submodules (dotted: ``unet.up_blocks``) to what the copy holds
    instead; those submodules are never copied (Lightning's discriminator drops the decoder half of
    a UNet without a transient copy of it). Names the module lacks are ignored."""
    memo = {}
    for name, new in (replace or {}).items():
        try:
            old = module.get_submodule(name)
        except AttributeError:
            continue
        memo[id(old)] = new  # deepcopy returns memo[id(x)] for an object it has seen
    return strip_adapters(copy.deepcopy(module, memo))


def decoder_stubs(prefix: str = "") -> dict[str, nn.Module]:
    """``base_copy`` replacements that drop a diffusers UNet's decoder half (up blocks, output norm
    and convolution), for copies that only ever run the encoder and mid block."""
    return {prefix + "up_blocks": nn.ModuleList(), prefix + "conv_norm_out": nn.Identity(), prefix + "conv_out": nn.Identity()}


def encoder_copy(backbone: nn.Module) -> nn.Module:
    """A trainable (``requires_grad``) copy of ``backbone``'s encoder and mid block, without its
    adapters or decoder. A backbone that knows better (``ControlledUNet``) makes its own."""
    own = getattr(backbone, "encoder_copy", None)
    if callable(own):
        return own()
    return base_copy(backbone, decoder_stubs()).requires_grad_(True)


@contextmanager
def swapped_weights(module: nn.Module, weights: dict[str, torch.Tensor]):
    """Within the scope, the parameters named in ``weights`` hold those tensors (their storage is
    swapped in, nothing is copied); the live values are back on exit. For no-grad calls of a frozen
    weight set on the live module: the student's EMA target, a previous stage's student."""
    if torch.is_grad_enabled():
        raise RuntimeError("swapped_weights is for no-grad calls: a graph built inside would point at the swapped weights")
    params = dict(module.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise KeyError(f"weights name no parameter of {type(module).__name__}: {unknown[:3]}")
    live = {n: params[n].data for n in weights}
    try:
        for n, v in weights.items():
            params[n].data = v
        yield module
    finally:
        for n, v in live.items():
            params[n].data = v
