"""Atomic checkpoints in safetensors: trainable weights, optimizer states and RNG streams.

Layout of ``RUN/checkpoints/step_00000100/``: ``<model>.safetensors`` (the trainable tensors of
each model), ``<model>.optim.safetensors`` + ``<model>.optim.json`` (optimizer state), one
``rng_rank<r>.safetensors`` per process and ``state.json``. A checkpoint is written into a
temporary folder and renamed into place, and ``latest`` is replaced atomically afterwards, so
a crash mid-save leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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
    for key, v in {**load_file(f"{path}.safetensors"), **meta["scalars"]}.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(generator: torch.Generator, path: Path) -> None:
    save_file({"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}, str(path))


def load_rng(generator: torch.Generator, path: Path) -> None:
    t = load_file(str(path))
    generator.set_state(t["generator"])
    torch.set_rng_state(t["torch_cpu"])


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


def save_file_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path))


def load_file_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
