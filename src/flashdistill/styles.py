"""Built-in image styles: transforms of the training images that a style LoRA learns
(``flashdistill train-teacher --style NAME --lora``) and that its evaluation is scored against.

- ``thick``: stroke thickening, a grey dilation of width 2 along the rows (SciPy's
  ``ndimage.grey_dilation(x, size=(1, 1, 2))`` on (N, 8, 8) images): each pixel becomes the larger
  of itself and its right neighbour. On 8x8 digits it keeps the content (the digits classifier reads
  94.4% of thickened test digits right, 97.5% of plain ones) and raises the mean ink from 0.305 to
  0.437: a style easy to see and to measure.

A style is a function of a batch of images in [-1, 1], (N, C, H, W) -> same shape.
"""
from __future__ import annotations

import torch

STYLE_NONE = "none"


def thicken(images: torch.Tensor) -> torch.Tensor:
    """max(x[..., j], x[..., j+1]) along the last axis; the last column is kept as is (SciPy's
    default ``reflect`` border repeats it)."""
    right = torch.cat([images[..., 1:], images[..., -1:]], dim=-1)
    return torch.maximum(images, right)


STYLES = {"thick": thicken}


def get_style(name: str):
    """The transform of a style name (``none``: the identity)."""
    if name == STYLE_NONE:
        return lambda images: images
    if name not in STYLES:
        raise ValueError(f"unknown style {name!r}; expected one of {[STYLE_NONE, *STYLES]}")
    return STYLES[name]
