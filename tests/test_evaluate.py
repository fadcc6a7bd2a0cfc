import math

import numpy as np
import pytest
import scipy.linalg
import torch

from flashdistill.data.digits import NUMBER_WORDS, PROMPT_TEMPLATES, load_digits
from flashdistill.scoring import (
    FEATURE_DIM,
    FLOOR_SUBSETS,
    eval_prompts,
    fd_floor,
    features,
    frechet_distance,
    predict,
    score,
)


def _correlated(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / math.sqrt(d)
    return rng.normal(size=(n, d)) @ a + rng.normal(size=d) + shift


def _fd_scipy(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_fd_zero_for_identical_features():
    f = _correlated(400, 16, seed=0)
    assert abs(frechet_distance(f, f)) < 1e-6
    assert abs(frechet_distance(f, f.copy()[::-1])) < 1e-6  # order of samples does not matter


def test_fd_zero_for_identical_rank_deficient_features():
    f = _correlated(300, 12, seed=1)
    f[:, :4] = 0.0  # dead ReLU units, as in real classifier features
    assert abs(frechet_distance(f, f)) < 1e-6


def test_fd_pure_mean_shift():
    f = _correlated(500, 16, seed=2)
    delta = np.random.default_rng(3).normal(size=16)
    assert frechet_distance(f, f + delta) == pytest.approx(float((delta ** 2).sum()), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fd_matches_scipy_sqrtm(seed):
    f1 = _correlated(600, 10, seed=seed)
    f2 = _correlated(700, 10, seed=seed + 100, shift=0.3)
    ours = frechet_distance(f1, f2)
    assert ours > 0.1  # genuinely different distributions
    assert ours == pytest.approx(_fd_scipy(f1, f2), rel=1e-6)
    assert frechet_distance(f2, f1) == pytest.approx(ours, rel=1e-9)


def test_features_shape_and_clamp():
    x = torch.linspace(-3, 3, 2 * 64).reshape(2, 1, 8, 8)
    f = features(x)
    assert f.shape == (2, FEATURE_DIM) and f.dtype == np.float64
    np.testing.assert_array_equal(f, features(x.clamp(-1, 1)))


def test_packaged_classifier_accuracy():
    test = load_digits("test")
    acc = float((predict(test.images) == test.labels).float().mean())
    assert acc >= 0.95


def test_fd_floor_finite_positive():
    floor = fd_floor()
    assert math.isfinite(floor) and floor > 0
    assert fd_floor() == floor  # cached, deterministic


def test_fd_floor_matches_sample_size():
    """Subset floors are the mean over seeded train subsets of that size, and shrink towards the
    whole-split floor as the size grows (FD's small-sample bias)."""
    train = features(load_digits("train").images)
    rng = np.random.default_rng(0)
    expected = np.mean([frechet_distance(train[rng.choice(len(train), 300, replace=False)], features(load_digits("test").images))
                        for _ in range(FLOOR_SUBSETS)])
    assert fd_floor(300) == pytest.approx(expected, rel=1e-9)
    assert fd_floor(300) > fd_floor(1000) > fd_floor()
    assert fd_floor(10_000) == fd_floor()
    with pytest.raises(ValueError, match="num_samples must be > 1, got 1"):
        fd_floor(1)


def test_eval_prompts_labels_and_seeds():
    n = 3 * 10 * len(PROMPT_TEMPLATES) + 7
    prompts, labels, seeds = eval_prompts(n, seed=11)
    assert len(prompts) == len(labels) == len(seeds) == n
    assert labels.dtype == torch.int64
    assert seeds == list(range(11, 11 + n))
    for p, d in zip(prompts, labels.tolist()):
        assert str(d) in p.split() or NUMBER_WORDS[d] in p.split(), (p, d)
    assert labels[:10].tolist() == list(range(10))
    assert len(set(prompts[: 10 * len(PROMPT_TEMPLATES)])) == 10 * len(PROMPT_TEMPLATES)  # all phrasings used
    # a prefix of a longer list is the shorter list (sample i does not depend on n)
    p5, l5, s5 = eval_prompts(5, seed=11)
    assert p5 == prompts[:5] and l5.tolist() == labels[:5].tolist() and s5 == seeds[:5]


def test_score_teacher_mse_is_mean_per_sample_mse():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 8, 8, generator=g) * 2 - 1
    reference = images + torch.randn(12, 1, 8, 8, generator=g) * torch.linspace(0.01, 1, 12).reshape(12, 1, 1, 1)
    labels = torch.arange(12) % 10
    out = score(images, labels, reference)
    expected = np.mean([((images[i] - reference[i]) ** 2).mean().item() for i in range(12)])
    assert out["teacher_mse"] == pytest.approx(expected, rel=1e-6)
    assert score(images, labels, images.clone())["teacher_mse"] == 0.0
    assert score(images, labels)["teacher_mse"] is None
    with pytest.raises(ValueError, match="shape"):
        score(images, labels, reference[:5])


def test_real_test_digits_score_well():
    test = load_digits("test")
    out = score(test.images, test.labels)
    assert out["adherence"] >= 0.95
    assert abs(out["fd"]) < 1e-3  # the test split against itself
    train = load_digits("train")
    assert score(train.images[:400], train.labels[:400])["fd"] < 3 * fd_floor()


def test_noise_scores_far_above_floor():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(360, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.arange(360) % 10
    out = score(noise, labels)
    assert out["fd"] > 20 * fd_floor()
    assert out["adherence"] < 0.5
    # wrong labels for real digits: adherence collapses, FD does not change
    test = load_digits("test")
    wrong = score(test.images, (test.labels + 1) % 10)
    assert wrong["adherence"] < 0.05
