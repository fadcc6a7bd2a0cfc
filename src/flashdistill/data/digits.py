"""Built-in dataset ``digits``: sklearn's 1,797 handwritten 8x8 digits with text prompts.

Images are scaled from sklearn's 0..16 intensities to [-1, 1] and shaped (1, 8, 8). The
train/test split is fixed (seeded, stratified by class, 20% test), so every model in the
project is measured against the same held-out digits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Several phrasings per digit so that the text encoder has to carry the meaning, not a token id.
PROMPT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit}",
    "{digit}",
    "a drawing of the digit {word}",
    "{word}",
    "a scanned handwritten {digit}",
)
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt for ``digit`` in template number ``template`` (cycled)."""
    fmt = PROMPT_TEMPLATES[template % len(PROMPT_TEMPLATES)]
    return fmt.format(word=NUMBER_WORDS[digit], digit=digit)


def all_prompts() -> list[str]:
    """Every prompt the dataset can emit, plus the empty prompt used for guidance."""
    return [prompt_for(d, k) for d in range(10) for k in range(len(PROMPT_TEMPLATES))] + [""]


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # float32 (N, 1, 8, 8) in [-1, 1]
    labels: torch.Tensor  # int64 (N,)


def load_digits(split: str = "train") -> DigitsSplit:
    """The fixed ``train`` or ``test`` split (about 80/20, stratified, seed 0)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    data = sk_load()
    images = (data.images.astype(np.float32) / 8.0 - 1.0)[:, None]
    idx = np.arange(len(images))
    train_idx, test_idx = train_test_split(
        idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    pick = train_idx if split == "train" else test_idx
    return DigitsSplit(torch.from_numpy(images[pick]), torch.from_numpy(data.target[pick]).long())


def first_of_each_class(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first image of each digit 0..9 in ``split``: (10, 1, 8, 8) images and their labels."""
    data = load_digits(split)
    idx = torch.stack([torch.nonzero(data.labels == d)[0, 0] for d in range(10)])
    return data.images[idx], data.labels[idx]


class DigitsDataset(torch.utils.data.Dataset):
    """Every (image, prompt template) pair is one item ``{"image", "prompt", "label"}``, so an
    epoch sees each digit under each phrasing and item i is deterministic."""

    def __init__(self, split: str = "train"):
        self.data = load_digits(split)

    def __len__(self) -> int:
        return len(self.data.labels) * len(PROMPT_TEMPLATES)

    def __getitem__(self, i: int) -> dict:
        img, template = divmod(i, len(PROMPT_TEMPLATES))
        label = int(self.data.labels[img])
        return {"image": self.data.images[img], "prompt": prompt_for(label, template), "label": torch.tensor(label)}


DATASETS = {"digits": DigitsDataset}


def get_dataset(name: str, split: str = "train") -> torch.utils.data.Dataset:
    """A built-in dataset by name; unknown names raise a ValueError listing the valid ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](split)
