"""flashdistill: distil multi-step diffusion models into 1-4 step students.

>>> import flashdistill as fd
>>> run = fd.distill(teacher="runs/demo/teacher", out="runs/x", steps=510)
>>> fd.load(run).generate(["a handwritten digit seven"], steps=2, seed=0)

See :mod:`flashdistill.api`; the names load on first use, so ``import flashdistill`` stays cheap.
"""
__version__ = "0.1.0"
__all__ = ["train_teacher", "distill", "load", "evaluate", "export", "Run", "Loaded", "scale_lora_blocks"]


def __getattr__(name):
    if name == "scale_lora_blocks":  # a LoRA state dict scaled per UNet block, for diffusers' own loaders
        from .models.loading import scale_lora_blocks

        return scale_lora_blocks
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'flashdistill' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
