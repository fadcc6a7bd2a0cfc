"""Cached latents and text embeddings for ``distill --data`` (``--cache-latents DIR``), as
diffusers' training scripts offer: the teacher's VAE and text encoders run once per image, with a
progress bar, and training reads the cache.

What is cached per item is the VAE's latent *distribution* (its mean and std, in the VAE's dtype)
and the per-prompt text embeddings, so a cached run still draws a fresh latent sample each time
from the run's generator, exactly as :meth:`PipelineVAE.encode` does: a cached run is the uncached
run (bit-identical when the VAE sees the same batch shapes; tested at batch 1).

Layout of ``DIR``: ``cache.json`` (what the cache was built from: data, resolution, teacher, VAE
dtype, item count, shard size) and per shard of ``shard_size`` items ``shard-00000.safetensors``
(``latent_mean``, ``latent_std``, ``text.<key>``) and ``shard-00000.json`` (captions). Shards are
written atomically; an interrupted build resumes at the first missing shard. A cache built from
other data, another teacher or another resolution is refused with the differences named.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

VERSION = 1
INFO = "cache.json"


class CacheMismatch(ValueError):
    pass


def cache_info(data: str, resolution: int, teacher, n: int, shard_size: int) -> dict:
    vae = teacher.vae.vae
    return {"version": VERSION, "data": str(Path(data).resolve()), "resolution": int(resolution),
            "teacher": str(Path(teacher.path).resolve()), "vae_dtype": str(vae.dtype).replace("torch.", ""),
            "vae_scaling": [teacher.vae.scale, teacher.vae.shift], "items": int(n), "shard_size": int(shard_size)}


def _shard(root: Path, k: int, ext: str) -> Path:
    return root / f"shard-{k:05d}.{ext}"


def build_cache(dataset, teacher, root: str | Path, data: str, shard_size: int = 256, batch_size: int = 8,
                progress: bool = True) -> Path:
    """Encode every item of ``dataset`` (``{"image", "prompt"}``) with ``teacher``'s VAE and text
    encoders into ``root``; shards already complete are kept. Returns ``root``."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    if teacher.vae is None or not hasattr(teacher.conditioner, "encode_one"):
        raise ValueError("--cache-latents needs a diffusers pipeline teacher (a VAE and text encoders to cache)")
    if shard_size <= 0 or batch_size <= 0:
        raise ValueError(f"shard_size and batch_size must be > 0, got {shard_size}, {batch_size}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = cache_info(data, dataset.resolution, teacher, len(dataset), shard_size)
    path = root / INFO
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in info if old.get(k) != info[k])
        if diff:
            raise CacheMismatch(f"the cache in {str(root)!r} was built from other inputs ({', '.join(f'{k}: {old.get(k)!r} here, {info[k]!r} now' for k in diff)}); "
                                "pass another --cache-latents folder or delete this one")
    else:
        path.write_text(json.dumps(info, indent=2))
    n, shards = len(dataset), -(-len(dataset) // shard_size)
    todo = [k for k in range(shards) if not (_shard(root, k, "safetensors").is_file() and _shard(root, k, "json").is_file())]
    bar = tqdm(total=n, initial=n - sum(min(shard_size, n - k * shard_size) for k in todo), desc="cache latents",
               unit="img", disable=not progress, dynamic_ncols=True)
    for k in todo:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        means, stds, texts, captions = [], [], [], []
        for i in range(lo, hi, batch_size):
            items = [dataset[j] for j in range(i, min(hi, i + batch_size))]
            mean, std = teacher.vae.moments(torch.stack([it["image"] for it in items]).to(teacher.device))
            means.append(mean.cpu())
            stds.append(std.cpu())
            captions += [it["prompt"] for it in items]
            texts += [teacher.conditioner.encode_one(it["prompt"]) for it in items]
            bar.update(len(items))
        tensors = {"latent_mean": torch.cat(means).contiguous(), "latent_std": torch.cat(stds).contiguous()}
        for key in texts[0]:
            tensors[f"text.{key}"] = torch.stack([t[key] for t in texts]).contiguous()
        for ext, write in (("json", lambda p: p.write_text(json.dumps(captions))),
                           ("safetensors", lambda p: save_file(tensors, str(p)))):
            tmp = _shard(root, k, ext + ".tmp")
            write(tmp)
            os.replace(tmp, _shard(root, k, ext))  # the safetensors file last: its presence marks the shard done
    bar.close()
    return root


class CachedLatents(torch.utils.data.Dataset):
    """Items ``{"latent_mean", "latent_std", "text": {key: tensor}, "prompt"}`` of a complete cache
    (what :meth:`StudentMethod.inputs` turns into latents and conditioning)."""

    def __init__(self, root: str | Path):
        from safetensors import safe_open

        self.root = Path(root)
        self.info = json.loads((self.root / INFO).read_text())
        self.n, self.size = self.info["items"], self.info["shard_size"]
        self.resolution = self.info["resolution"]
        shards = -(-self.n // self.size)
        missing = [k for k in range(shards) if not _shard(self.root, k, "safetensors").is_file()]
        if missing:
            raise ValueError(f"the cache in {str(self.root)!r} is incomplete (shard {missing[0]} of {shards} missing); "
                             "run distill with --cache-latents again to finish it")
        self._files = [safe_open(str(_shard(self.root, k, "safetensors")), "pt") for k in range(shards)]
        self._captions = [json.loads(_shard(self.root, k, "json").read_text()) for k in range(shards)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        k, j = divmod(i, self.size)
        f = self._files[k]
        item = {name: f.get_slice(name)[j: j + 1][0] for name in ("latent_mean", "latent_std")}
        item["text"] = {name[len("text."):]: f.get_slice(name)[j: j + 1][0] for name in f.keys() if name.startswith("text.")}
        item["prompt"] = self._captions[k][j]
        return item
