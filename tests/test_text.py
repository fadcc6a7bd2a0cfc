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
    assert torch.equal(batched[1], alone[0])  # bit for bit: a prompt is always encoded on its own


def test_embedding_does_not_depend_on_cache_history(monkeypatch):
    """A stand-in encoder whose output for a row depends on the other rows of its batch (as a BLAS
    kernel's rounding may on some CPUs): the cached embedding of a prompt must still be the same
    whatever was encoded before it, or a resumed run (empty cache) drifts from an unbroken one."""
    from types import SimpleNamespace

    def make():
        enc = TextEncoder(MINILM, 16)

        class BatchSensitive(torch.nn.Module):
            def forward(self, input_ids, **kwargs):
                h = input_ids.float()[..., None].expand(*input_ids.shape, 4) / 1000
                return SimpleNamespace(last_hidden_state=h + 1e-3 * input_ids.shape[0])

        monkeypatch.setattr(enc, "model", BatchSensitive())
        return enc

    a, b = make(), make()
    a.encode(["one"])
    late = a.encode(["one", "two", "three"])
    fresh = b.encode(["two", "three", "one"])
    assert torch.equal(late[1], fresh[0]) and torch.equal(late[2], fresh[1]) and torch.equal(late[0], fresh[2])


def test_cache_runs_model_once_per_new_prompt(monkeypatch):
    enc = TextEncoder(MINILM, 16)
    calls = _count_forward(enc, monkeypatch)
    first = enc.encode(["one", "two", "one"])
    assert calls == [1, 1]  # one forward per distinct prompt, each on its own
    torch.testing.assert_close(first[0], first[2], atol=0, rtol=0)
    second = enc.encode(["two", "one"])
    assert calls == [1, 1]  # all cached
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
    third = enc.encode(["three", "one", "three"])
    assert calls == [1, 1, 1]  # only the new prompt
    assert torch.equal(third[1], first[0]) and torch.equal(third[0], third[2])
    # returned tensors are fresh stacks: changing one does not poison the cache
    second.zero_()
    assert torch.equal(enc.encode(["one"])[0], first[0])
