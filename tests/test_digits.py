import re
from collections import Counter

import numpy as np
import pytest
import torch

from flashdistill.data.digits import (
    NUMBER_WORDS,
    PROMPT_TEMPLATES,
    DigitsDataset,
    all_prompts,
    get_dataset,
    load_digits,
    prompt_for,
)

N_DIGITS = 1797


@pytest.fixture(scope="module")
def splits():
    return load_digits("train"), load_digits("test")


def _rows(split):
    """(image bytes, label) for every sample, as a multiset."""
    imgs = split.images.numpy()
    return Counter((imgs[i].tobytes(), int(split.labels[i])) for i in range(len(imgs)))


def test_split_sizes(splits):
    train, test = splits
    assert len(train.images) + len(test.images) == N_DIGITS
    assert len(train.labels) == len(train.images) and len(test.labels) == len(test.images)
    assert len(test.images) == pytest.approx(0.2 * N_DIGITS, abs=1)


def test_split_is_a_partition_of_sklearn_digits(splits):
    from sklearn.datasets import load_digits as sk_load

    train, test = splits
    data = sk_load()
    full = Counter(((data.images[i].astype(np.float32) / 8.0 - 1.0)[None].tobytes(), int(data.target[i]))
                   for i in range(len(data.target)))
    # Every sklearn sample lands in exactly one split: the union (as a multiset) is the dataset.
    assert _rows(train) + _rows(test) == full


def test_split_is_stable_across_calls(splits):
    train, test = splits
    again_train, again_test = load_digits("train"), load_digits("test")
    assert torch.equal(train.images, again_train.images) and torch.equal(train.labels, again_train.labels)
    assert torch.equal(test.images, again_test.images) and torch.equal(test.labels, again_test.labels)


def test_split_is_stratified(splits):
    train, test = splits
    for d in range(10):
        n_test = int((test.labels == d).sum())
        n_all = n_test + int((train.labels == d).sum())
        assert n_all > 150
        assert abs(n_test / n_all - 0.2) < 0.01, (d, n_test, n_all)


def test_images_range_shape_dtype(splits):
    for split in splits:
        assert split.images.dtype == torch.float32 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (1, 8, 8)
        assert float(split.images.min()) == -1.0 and float(split.images.max()) == 1.0
        assert set(split.labels.tolist()) == set(range(10))


def test_unknown_split_rejected():
    with pytest.raises(ValueError, match="validation"):
        load_digits("validation")


DIGIT_MENTION = re.compile(r"\b(\d|" + "|".join(NUMBER_WORDS) + r")\b")


@pytest.mark.parametrize("digit", range(10))
def test_every_template_names_its_digit_and_no_other(digit):
    ok = {str(digit), NUMBER_WORDS[digit]}
    for k in range(len(PROMPT_TEMPLATES)):
        p = prompt_for(digit, k)
        mentions = DIGIT_MENTION.findall(p)
        assert mentions and set(mentions) <= ok, (digit, k, p)
    # templates cycle
    assert prompt_for(digit, len(PROMPT_TEMPLATES) + 1) == prompt_for(digit, 1)


def test_all_prompts_are_distinct_and_include_empty():
    prompts = all_prompts()
    assert len(prompts) == 10 * len(PROMPT_TEMPLATES) + 1
    assert len(set(prompts)) == len(prompts)
    assert prompts[-1] == ""


def test_dataset_length_and_items(splits):
    train, _ = splits
    ds = DigitsDataset("train")
    n_t = len(PROMPT_TEMPLATES)
    assert len(ds) == len(train.images) * n_t
    for i in (0, 1, n_t - 1, n_t, 7 * n_t + 3, len(ds) - 1):
        item = ds[i]
        img, k = divmod(i, n_t)
        assert torch.equal(item["image"], train.images[img])
        assert int(item["label"]) == int(train.labels[img])
        assert item["prompt"] == prompt_for(int(train.labels[img]), k)
        again = DigitsDataset("train")[i]
        assert torch.equal(again["image"], item["image"]) and again["prompt"] == item["prompt"]
    # all templates of one image appear in one epoch
    assert {ds[3 * n_t + k]["prompt"] for k in range(n_t)} == {prompt_for(int(train.labels[3]), k) for k in range(n_t)}


def test_get_dataset():
    ds = get_dataset("digits", "test")
    assert isinstance(ds, DigitsDataset) and len(ds) == len(load_digits("test").labels) * len(PROMPT_TEMPLATES)


def test_unknown_dataset_name_raises_naming_it():
    with pytest.raises(ValueError, match="'nope'") as e:
        get_dataset("nope")
    assert "digits" in str(e.value)  # lists the valid ones
