import pytest
import torch

from flashdistill.models.text import MINILM, MINILM_HIDDEN, TextEncoder


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(MINILM, max_length=16)


def _count_forward(enc, monkeypatch):
    """Wrap the transformer's forward; returns the list of batch sizes it was called with."""
    calls = []
    inner = enc.model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0] if "input_ids" in kwargs else args[0].shape[0])
        return inner(*args, **kwargs)

    monkeypatch.setattr(enc.model, "forward", counting)
    return calls


def test_loads_offline_and_shapes(encoder):
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert encoder.hidden_size == MINILM_HIDDEN
    out = encoder.encode(["the number 7", "a handwritten digit three", ""])
    assert out.shape == (3, 16, MINILM_HIDDEN) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    short = TextEncoder(MINILM, max_length=5).encode(["a very long prompt that will be truncated for sure"])
    assert short.shape == (1, 5, MINILM_HIDDEN)


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="'clip'"):
        TextEncoder("clip")


def test_different_prompts_differ(encoder):
    a, b, empty = encoder.encode(["the number 1", "the number 7", ""])
    assert (a - b).abs().max() > 1e-2
    assert (a - empty).abs().max() > 1e-2
    # the difference is not only in the one differing token position
    assert ((a - b).abs().amax(-1) > 1e-3).sum() > 1


def test_embedding_does_not_depend_on_batch():
    e1 = TextEncoder(MINILM, 16)
    e2 = TextEncoder(MINILM, 16)
    alone = e1.encode(["seven"])
    batched = e2.encode(["a much longer prompt about handwritten digits", "seven", "3"])
    torch.testing.assert_close(batched[1], alone[0], atol=1e-5, rtol=1e-5)


def test_cache_runs_model_once_per_new_prompt(monkeypatch):
    enc = TextEncoder(MINILM, 16)
    calls = _count_forward(enc, monkeypatch)
    first = enc.encode(["one", "two", "one"])
    assert calls == [2]  # one forward, for the two distinct prompts
    torch.testing.assert_close(first[0], first[2], atol=0, rtol=0)
    second = enc.encode(["two", "one"])
    assert calls == [2]  # all cached
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
    third = enc.encode(["three", "one", "three"])
    assert calls == [2, 1]  # only the new prompt
    assert torch.equal(third[1], first[0]) and torch.equal(third[0], third[2])
    # returned tensors are fresh stacks: changing one does not poison the cache
    second.zero_()
    assert torch.equal(enc.encode(["one"])[0], first[0])
