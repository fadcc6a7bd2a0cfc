"""Metrics for the built-in digits task.

- **FD**: Fréchet distance (Heusel et al. 2017, the FID formula) between generated images and the
  held-out test digits, on the 64-d penultimate features of a fixed CNN classifier trained on the
  train split. Its floor is FD(train split, test split). FD grows as the sample shrinks (at 500
  samples real train digits score about 6.3, at 1,000 about 4.5, at all 1,437 about 4.0), so a
  row is compared with the floor at its own sample size, ``fd_floor(N)``.
- **Pixel FD** (``pixel_fd``): the same Fréchet distance on the raw 64 pixels (in [0, 1]) instead
  of classifier features: blind to what a classifier has learnt, sensitive to blur, contrast and
  stroke placement. Its floor is ``pixel_fd_floor(N)``.
- **Histogram distance** (``hist``): the Wasserstein-1 distance between the pixel-intensity
  distributions (all pixels pooled, in [0, 1]) of the generated images and the test digits: a
  greyer or washed-out sample set scores higher.
- **Adherence**: the classifier's accuracy on generated images against the digit the prompt asked for.
- **Teacher fidelity** (``teacher_mse``): mean over samples of the per-sample MSE between a model's
  output and the teacher's 32-step output from the same noise and prompt.
- **Conditional tasks** (inpaint, sr, sketch; :mod:`flashdistill.tasks`): sample i is conditioned on
  test digit ``i mod 360`` (its mask, low-res or stroke map, made with a fixed seed; no full masks,
  no low-res noise) with a prompt for its label. Besides the rows above: the task's consistency
  metrics (inpaint: ``unmasked_mse`` and ``masked_mse`` of the raw output against the truth; sr:
  ``consistency``, the MSE of the 2x2-pooled output against the low-res, and ``psnr``; sketch:
  ``stroke_f1``) and ``diversity``, the pixel std over 8 seeds of the same condition, averaged over
  the first 50 conditions (0 for a model that ignores its noise).

Generated images are clamped to [-1, 1] (the data range) before the classifier. Evaluation prompts
cycle through the digits and the prompt templates, and sample i always uses seed ``seed + i``.

The classifier's weights ship with the package (``data/digits_classifier.safetensors``) so FD is
the same metric on every machine; ``python -m flashdistill.scoring --build-classifier`` rebuilds
them deterministically.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data.digits import PROMPT_TEMPLATES, load_digits, prompt_for
from .styles import STYLE_NONE, get_style

CLASSIFIER_FILE = Path(__file__).parent / "data" / "digits_classifier.safetensors"
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_classifier(epochs: int = 40, seed: int = 0) -> DigitsClassifier:
    """Train on the train split only: Adam, random one-pixel shifts as augmentation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = load_digits("train")
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x_all, y_all = data.images, data.labels
    for _ in range(epochs):
        perm = torch.randperm(len(y_all), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i: i + 64]
            x = x_all[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(net(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@functools.lru_cache(maxsize=1)
def classifier() -> DigitsClassifier:
    from safetensors.torch import load_file

    net = DigitsClassifier()
    if not CLASSIFIER_FILE.is_file():
        raise FileNotFoundError(
            f"{CLASSIFIER_FILE} is missing; rebuild it with: python -m flashdistill.scoring --build-classifier"
        )
    net.load_state_dict(load_file(str(CLASSIFIER_FILE)))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def features(images: torch.Tensor) -> np.ndarray:
    x = images.detach().float().cpu().clamp(-1, 1)
    return torch.cat([classifier().features(c) for c in x.split(1024)]).double().numpy()


@torch.no_grad()
def predict(images: torch.Tensor) -> torch.Tensor:
    x = images.detach().float().cpu().clamp(-1, 1)
    return torch.cat([classifier()(c).argmax(1) for c in x.split(1024)])


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)); the trace of the matrix square root is taken
    from the eigenvalues of the symmetric S1^(1/2) S2 S1^(1/2)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return max(0.0, float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross))


def pixels(images: torch.Tensor) -> np.ndarray:
    """Raw pixels in [0, 1], (N, C*H*W) float64: the 'feature' of pixel FD."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).flatten(1).double().numpy()


def histogram_distance(images: torch.Tensor, reference: torch.Tensor | np.ndarray) -> float:
    """Wasserstein-1 distance between the pooled pixel intensities (in [0, 1]) of two image sets
    (``reference`` may be given as ``pixels(...)`` already): the area between their empirical CDFs."""
    a = np.sort(pixels(images).ravel())
    b = np.sort((reference if isinstance(reference, np.ndarray) else pixels(reference)).ravel())
    grid = np.linspace(0.0, 1.0, 2049)
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b)[:-1].sum() * (grid[1] - grid[0]))


@functools.lru_cache(maxsize=4)
def _test_pixels(style: str = STYLE_NONE) -> np.ndarray:
    return pixels(get_style(style)(load_digits("test").images))


@functools.lru_cache(maxsize=4)
def _test_features(style: str = STYLE_NONE) -> np.ndarray:
    return features(get_style(style)(load_digits("test").images))


@functools.lru_cache(maxsize=4)
def _train_features(style: str = STYLE_NONE) -> np.ndarray:
    return features(get_style(style)(load_digits("train").images))


FLOOR_SUBSETS = 20


def _floor(train: np.ndarray, test: np.ndarray, num_samples: int | None) -> float:
    if num_samples is not None and num_samples <= 1:
        raise ValueError(f"num_samples must be > 1, got {num_samples}")
    if num_samples is None or num_samples >= len(train):
        return frechet_distance(train, test)
    rng = np.random.default_rng(0)
    return float(np.mean([frechet_distance(train[rng.choice(len(train), num_samples, replace=False)], test)
                          for _ in range(FLOOR_SUBSETS)]))


@functools.lru_cache(maxsize=8)
def fd_floor(num_samples: int | None = None, style: str = STYLE_NONE) -> float:
    """FD(train split, test split): what real digits score (both splits in ``style``).

    FD is biased upwards at small sample sizes, so a row scored on N generated images is compared
    with real digits at the same N: ``num_samples`` below the train split's size gives the mean
    FD of ``FLOOR_SUBSETS`` seeded random train subsets of that size. ``None`` (or N at least the
    split's size) uses the whole train split.
    """
    return _floor(_train_features(style), _test_features(style), num_samples)


@functools.lru_cache(maxsize=8)
def pixel_fd_floor(num_samples: int | None = None, style: str = STYLE_NONE) -> float:
    """Pixel FD of real train digits against the test split, at ``num_samples`` (as ``fd_floor``)."""
    return _floor(pixels(get_style(style)(load_digits("train").images)), _test_pixels(style), num_samples)


def eval_prompts(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor, list[int]]:
    """Prompts cycling digits and templates, their labels and per-sample seeds ``seed + i``."""
    labels = torch.arange(n) % 10
    prompts = [prompt_for(int(d), (i // 10) % len(PROMPT_TEMPLATES)) for i, d in enumerate(labels)]
    return prompts, labels, [seed + i for i in range(n)]


COND_SEED = 1234  # masks of the conditional evaluation set
DIVERSITY_CONDITIONS, DIVERSITY_SEEDS = 50, 8
SEED_SET_STRIDE = 100_000  # seed set k draws its sample seeds from k * this on


def eval_set(n: int, task, seed: int = 0, cond_seed: int = COND_SEED) -> tuple[list[str], torch.Tensor, list[int], dict, torch.Tensor]:
    """A conditional task's evaluation set: sample i takes test digit ``i mod 360`` (its label's
    prompt, template cycling) and that digit's condition (random parts, such as inpainting's boxes,
    drawn from ``cond_seed``); returns prompts, labels, seeds ``seed + i``, the condition and the
    true images."""
    test = load_digits("test")
    idx = torch.arange(n) % len(test.labels)
    truth, labels = test.images[idx], test.labels[idx]
    prompts = [prompt_for(int(d), i % len(PROMPT_TEMPLATES)) for i, d in enumerate(labels)]
    condition = task.make(truth, torch.Generator().manual_seed(cond_seed), train=False)
    return prompts, labels, [seed + i for i in range(n)], condition, truth


def seed_set_args(seed_set: int) -> dict:
    """``eval_set`` / ``diversity_set`` keywords of evaluation seed set ``seed_set`` (0: the usual
    one): other sample seeds and, for conditional tasks, other random condition parts, on the same
    test digits and prompts. A second set checks a choice made on the first."""
    if seed_set < 0:
        raise ValueError(f"seed_set must be >= 0 (0: the usual evaluation seeds), got {seed_set}")
    return {"seed": seed_set * SEED_SET_STRIDE, "cond_seed": COND_SEED + seed_set}


def diversity_set(task, seed: int = 0, cond_seed: int = COND_SEED) -> tuple[list[str], list[int], dict]:
    """The first ``DIVERSITY_CONDITIONS`` evaluation conditions, each ``DIVERSITY_SEEDS`` times
    (condition-major), with seeds of their own."""
    prompts, _, _, condition, _ = eval_set(DIVERSITY_CONDITIONS, task, cond_seed=cond_seed)
    rep = torch.arange(DIVERSITY_CONDITIONS).repeat_interleave(DIVERSITY_SEEDS)
    return ([prompts[int(i)] for i in rep], [seed + 10**6 + i for i in range(len(rep))],
            {k: v[rep] for k, v in condition.items()})


def diversity(images: torch.Tensor) -> float:
    """Mean over conditions of the per-pixel std (in [0, 1]) across the seeds of one condition."""
    x = pixels(images).reshape(DIVERSITY_CONDITIONS, DIVERSITY_SEEDS, -1)
    return float(x.std(1, ddof=1).mean())


def retrieval_row(task, num_samples: int) -> dict:
    """The nearest-neighbour retrieval yardstick of a conditional task: for each evaluation
    condition, the train digit that fits it best (inpaint: pasted into the repaint region), scored
    like a model's row (its diversity is 0: it ignores the noise)."""
    _, labels, _, condition, truth = eval_set(num_samples, task)
    images = task.retrieve(condition, load_digits("train").images)
    return {"task": task.name, **score(images, labels), **task.metrics(images, condition, truth), "diversity": 0.0}


def score(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None = None,
          style: str = STYLE_NONE) -> dict:
    """FD, pixel FD and histogram distance against the test split, adherence, and teacher MSE
    when ``reference`` is given. With a ``style`` (a model with a style LoRA), FD, pixel FD and the
    histogram are taken against the styled test split, and the row adds ``fd_unstyled`` (FD to the
    plain test split) and ``ink`` (mean pixel value in [0, 1]): how far the style shows."""
    feats = features(images)
    out = {
        "fd": frechet_distance(feats, _test_features(style)),
        "pixel_fd": frechet_distance(pixels(images), _test_pixels(style)),
        "hist": histogram_distance(images, _test_pixels(style)),
        "adherence": float((predict(images) == labels.cpu()).float().mean()),
        "teacher_mse": None,
    }
    if style != STYLE_NONE:
        out.update(style=style, fd_unstyled=frechet_distance(feats, _test_features()), ink=float(pixels(images).mean()))
    if reference is not None:
        if reference.shape != images.shape:
            raise ValueError(f"reference shape {tuple(reference.shape)} != images shape {tuple(images.shape)}")
        out["teacher_mse"] = float(((images.float() - reference.float()) ** 2).flatten(1).mean(1).mean())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flashdistill.scoring", description="Maintain the digits metric.")
    ap.add_argument("--build-classifier", action="store_true", help=f"retrain and write {CLASSIFIER_FILE.name}")
    args = ap.parse_args(argv)
    if args.build_classifier:
        from safetensors.torch import save_file

        net = build_classifier()
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(CLASSIFIER_FILE))
        classifier.cache_clear()
    test = load_digits("test")
    print(f"test accuracy {float((predict(test.images) == test.labels).float().mean()):.4f}  FD floor {fd_floor():.3f}  "
          f"pixel FD floor {pixel_fd_floor():.3f}")


if __name__ == "__main__":
    main()
