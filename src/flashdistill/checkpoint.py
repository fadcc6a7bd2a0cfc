"""Atomic checkpoints in safetensors: trainable weights, optimizer states and RNG streams.

Layout of ``RUN/checkpoints/step_00000100/``: ``<model>.safetensors`` (the trainable tensors of
each model), ``<model>.optim.safetensors`` + ``<model>.optim.json`` (optimizer state), one
``rng_rank<r>.safetensors`` per process, the method's own state where it keeps some
(``method.safetensors``: an EMA target; ``method_rank<r>.safetensors`` per process: a replay
buffer, packed by :func:`pack_tree`) and ``state.json``. A checkpoint is written into a
temporary folder and renamed into place, and ``latest`` is replaced atomically afterwards, so
a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in tensors)
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def save_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    """Writes ``<path>.safetensors`` (state tensors) and ``<path>.json`` (param groups, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, f"{path}.safetensors")
    Path(f"{path}.json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    meta = json.loads(Path(f"{path}.json").read_text())
    state: dict = {}
    for key, v in {**load_file_tensors(Path(f"{path}.safetensors")), **meta["scalars"]}.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(generator: torch.Generator, path: Path) -> None:
    """Every random stream a step may draw from: the loop's generator, torch's global CPU
    generator, Python's ``random`` and NumPy's global state (the last two as integer tensors)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    save_file({
        "generator": generator.get_state(), "torch_cpu": torch.get_rng_state(),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_meta": torch.tensor([version, 0 if gauss is None else 1], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_meta": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
    }, str(path))


def load_rng(generator: torch.Generator, path: Path) -> None:
    t = load_file(str(path))
    generator.set_state(t["generator"])
    torch.set_rng_state(t["torch_cpu"])
    if "python_mt" in t:  # checkpoints written before these streams were saved lack them
        version, has_gauss = t["python_meta"].tolist()
        random.setstate((version, tuple(t["python_mt"].tolist()), float(t["python_gauss"][0]) if has_gauss else None))
        pos, has_np_gauss = t["numpy_meta"].tolist()
        np.random.set_state(("MT19937", t["numpy_keys"].numpy().astype(np.uint32), pos, has_np_gauss,
                             float(t["numpy_gauss"][0])))


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def staging_dir(root: Path, step: int) -> Path:
    return root / f".tmp_step_{step:08d}"


def commit(root: Path, step: int, keep: int) -> Path:
    """Rename the staged checkpoint into place, point ``latest`` at it and prune old ones."""
    final = root / f"step_{step:08d}"
    if final.exists():  # re-saving a step (a finished run resumed): move the old copy aside first
        aside = root / f".old_step_{step:08d}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(staging_dir(root, step), final)
    _write_json_atomic(root / "latest.json", {"step": step, "dir": final.name})
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: max(0, len(done) - keep)] + sorted(root.glob(".old_step_*")) + sorted(root.glob(".tmp_step_*")):
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest.json`` names; if that is gone (a crash between the two renames of
    a re-save), the newest complete ``step_*`` folder."""
    f = root / "latest.json"
    if f.is_file():
        d = root / json.loads(f.read_text())["dir"]
        if d.is_dir():
            return d
    done = sorted(p for p in root.glob("step_*") if (p / "state.json").is_file())
    return done[-1] if done else None


CHECKSUM_FILE = "checksums.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(stage: Path) -> None:
    """Record the size and sha256 of every file of a staged checkpoint (before it is committed)."""
    sums = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(stage.iterdir()) if p.is_file() and p.name != CHECKSUM_FILE}
    (stage / CHECKSUM_FILE).write_text(json.dumps(sums, indent=2))


def verify(ckpt_dir: Path) -> list[str]:
    """What is wrong with a checkpoint folder against the checksums recorded when it was saved: one
    line per missing, truncated or altered file (empty: intact). A checkpoint written before
    checksums existed has nothing to check against and passes."""
    ckpt_dir = Path(ckpt_dir)
    f = ckpt_dir / CHECKSUM_FILE
    if not f.is_file():
        return [] if (ckpt_dir / "state.json").is_file() else [f"{ckpt_dir.name}: no {CHECKSUM_FILE} and no state.json"]
    try:
        sums = json.loads(f.read_text())
    except ValueError:
        return [f"{ckpt_dir.name}/{CHECKSUM_FILE}: unreadable"]
    problems = []
    for name, want in sums.items():
        p = ckpt_dir / name
        if not p.is_file():
            problems.append(f"{ckpt_dir.name}/{name}: missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{ckpt_dir.name}/{name}: {p.stat().st_size} bytes, {want['bytes']} when saved (truncated?)")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{ckpt_dir.name}/{name}: checksum differs from the one recorded at save time")
    return problems


def latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, starting from ``latest``, and one warning per
    checkpoint skipped because it is corrupt (naming it and what is wrong)."""
    root = Path(root)
    first = latest(root)
    others = sorted((p for p in root.glob("step_*") if p.is_dir() and p != first), reverse=True)
    warnings = []
    for candidate in ([first] if first else []) + others:
        problems = verify(candidate)
        if not problems:
            return candidate, warnings
        warnings.append(f"checkpoint {candidate} is corrupt, skipped: " + "; ".join(problems))
    return None, warnings


def save_file_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))


def load_file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, each copied into its own fresh allocation.

    safetensors hands back tensors at whatever byte offset they sit in the file (often not
    64-byte aligned), while tensors a live run allocates are aligned by torch's CPU allocator.
    Values are equal either way, but a restored optimizer or EMA state must not differ from the
    live one in anything a kernel may dispatch on, so every tensor is cloned."""
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in load_file(str(path)).items()}


def pack_tree(tree) -> dict[str, torch.Tensor]:
    """A nest of dicts (string keys), lists and tensors, with JSON leaves (None, numbers, strings),
    as flat safetensors tensors: ``tensor/<i>`` for the tensors and ``skeleton`` (the nest as
    UTF-8 JSON, tensors replaced by their index). A tensor that appears twice (a condition shared by
    both CFG branches) is stored once and comes back as one tensor. :func:`unpack_tree` inverts it."""
    tensors: dict[str, torch.Tensor] = {}
    index_of: dict[int, int] = {}  # id(tensor) -> its index: one tensor used twice is stored once
    storages: set[int] = set()

    def walk(x):
        if torch.is_tensor(x):
            if id(x) not in index_of:
                ptr = x.untyped_storage().data_ptr()
                # safetensors refuses tensors that share memory: a view of one already stored is copied
                tensors[f"tensor/{len(tensors)}"] = x.clone() if ptr in storages else x
                storages.add(ptr)
                index_of[id(x)] = len(tensors) - 1
            return {"tensor": index_of[id(x)]}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError(f"pack_tree: dict keys must be strings, got {list(x)}")
            return {"dict": {k: walk(v) for k, v in x.items()}}
        if isinstance(x, (list, tuple)):
            return {"list": [walk(v) for v in x]}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"value": x}
        raise TypeError(f"pack_tree: cannot store a {type(x).__name__} in a checkpoint")

    skeleton = json.dumps(walk(tree)).encode("utf-8")
    return {**tensors, "skeleton": torch.tensor(list(skeleton), dtype=torch.uint8)}


def unpack_tree(tensors: dict[str, torch.Tensor]):
    def build(node):
        (kind, v), = node.items()
        if kind == "tensor":
            return tensors[f"tensor/{v}"]
        if kind == "dict":
            return {k: build(x) for k, x in v.items()}
        if kind == "list":
            return [build(x) for x in v]
        return v

    return build(json.loads(bytes(tensors["skeleton"].tolist()).decode("utf-8")))


def describe_tensor(t: torch.Tensor) -> dict:
    """What a restored tensor must share with its live counterpart, beyond its values."""
    return {"dtype": str(t.dtype), "shape": tuple(t.shape), "stride": t.stride(), "device": str(t.device),
            "contiguous": t.is_contiguous(), "aligned64": t.data_ptr() % 64 == 0}


def state_differences(live, restored, prefix: str = "") -> list[str]:
    """Field-by-field comparison of two nested states (dicts, lists, tensors, scalars): values
    bit for bit, and for tensors dtype, shape, strides, device, contiguity and 64-byte alignment.
    Returns one line per difference (empty: identical)."""
    out: list[str] = []
    if isinstance(live, dict) and isinstance(restored, dict):
        if set(live) != set(restored):
            out.append(f"{prefix}: keys {sorted(map(str, set(live) ^ set(restored)))} differ")
        for k in live:
            if k in restored:
                out += state_differences(live[k], restored[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(live, (list, tuple)) and isinstance(restored, (list, tuple)):
        if len(live) != len(restored):
            out.append(f"{prefix}: length {len(live)} != {len(restored)}")
        for i, (a, b) in enumerate(zip(live, restored)):
            out += state_differences(a, b, f"{prefix}[{i}]")
    elif torch.is_tensor(live) and torch.is_tensor(restored):
        da, db = describe_tensor(live), describe_tensor(restored)
        for k in da:
            if da[k] != db[k]:
                out.append(f"{prefix}: {k} {da[k]} != {db[k]}")
        if da["shape"] == db["shape"] and live.dtype == restored.dtype and not torch.equal(live, restored):
            worst = float((live.double() - restored.double()).abs().max()) if live.is_floating_point() else "?"
            out.append(f"{prefix}: values differ (max |diff| {worst})")
    elif live != restored:
        out.append(f"{prefix}: {live!r} != {restored!r}")
    return out
