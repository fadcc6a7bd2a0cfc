"""Captioned image datasets on disk, for distilling real teachers (``distill --data PATH``).

Three formats, detected from the path:

- **image folder** (Hugging Face ``imagefolder`` convention): a folder with ``metadata.jsonl``,
  one JSON object per line with ``file_name`` (relative to the folder) and ``text``;
- **Hugging Face ``datasets`` folder** written by ``Dataset.save_to_disk`` (or a ``DatasetDict``:
  its ``train`` split), with an image column and a ``text`` or ``caption`` column;
- **webdataset shards**: a ``.tar`` file, a folder of ``.tar`` files, or a glob such as
  ``shards/*.tar``; samples are grouped by key (the member name up to the first dot of its base
  name), with a ``jpg``/``jpeg``/``png``/``webp`` image and a ``txt`` caption or a ``json`` with
  ``caption`` or ``text``.

Each item is ``{"image": float32 (3, R, R) in [-1, 1], "prompt": str}``: RGB, the shorter side
resized to R (bicubic), centre-cropped. The teacher's VAE encodes images during training.
Unreadable or corrupt images are skipped (the next readable item takes their place) and counted,
with a warning; if most of the first items probed fail, or most reads fail, it stops with an error.
So are images over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, checked from the
header before any pixel is decoded) and captions that are not UTF-8. Items rejected while listing
(``rejected``, with a warning each): metadata lines that are not UTF-8 or not JSON objects, tar
members with an absolute path or a ``..`` component, and the unreadable tail of a truncated shard
(the members before it are kept).
"""
from __future__ import annotations

import glob
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PROBE = 32  # items read at start-up to reject a dataset that is mostly unreadable


class DatasetError(ValueError):
    pass


def to_tensor(image, resolution: int) -> torch.Tensor:
    """PIL image -> RGB, shorter side ``resolution`` (bicubic), centre crop, float32 in [-1, 1]."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class CaptionedImages(torch.utils.data.Dataset):
    """Common skipping and counting over a format's ``_read(i) -> (PIL image, caption)``."""

    rejected = 0  # items dropped while listing (a subclass counts them with reject())

    def reject(self, source, why: str) -> None:
        self.rejected += 1
        warnings.warn(f"{source}: {why}; {self.rejected} rejected so far", stacklevel=3)

    def __init__(self, source: str, n: int, resolution: int):
        if n == 0:
            raise DatasetError(f"{source}: no samples found" + (f" ({self.rejected} rejected)" if self.rejected else ""))
        if resolution <= 0:
            raise DatasetError(f"resolution must be > 0, got {resolution}")
        self.source, self.n, self.resolution = source, n, resolution
        self.reads = self.failures = 0
        self.bad: set[int] = set()
        probe = range(min(PROBE, n))
        failed = [i for i in probe if self._try(i) is None]
        if len(failed) * 2 > len(probe):
            raise DatasetError(f"{source}: {len(failed)} of the first {len(probe)} images could not be read "
                               f"(e.g. item {failed[0]}); is this the right folder and format?")

    def __len__(self) -> int:
        return self.n

    def _read(self, i: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def _try(self, i: int):
        from PIL import Image

        self.reads += 1
        try:
            with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS: skipped, never decoded
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image, caption = self._read(i)
                image.load()
            if isinstance(caption, bytes):
                caption = caption.decode("utf-8")
            return to_tensor(image, self.resolution), str(caption)
        except Exception as e:  # noqa: BLE001 - any decoding error means "skip this image"
            self.failures += 1
            if i not in self.bad:
                self.bad.add(i)
                warnings.warn(f"{self.source}: skipping unreadable item {i} ({type(e).__name__}: {e}); "
                              f"{len(self.bad)} skipped so far", stacklevel=3)
            return None

    def __getitem__(self, i: int) -> dict:
        for k in range(self.n):
            j = (i + k) % self.n
            if j in self.bad:
                continue
            got = self._try(j)
            if got is not None:
                return {"image": got[0], "prompt": got[1]}
            if self.reads >= 20 and self.failures * 2 > self.reads:
                raise DatasetError(f"{self.source}: {self.failures} of {self.reads} image reads failed; stopping")
        raise DatasetError(f"{self.source}: no readable image left")


class ImageFolder(CaptionedImages):
    def __init__(self, root: Path, resolution: int, caption_column: str = "text"):
        self.root = Path(root)
        self.rows = []
        meta = self.root / "metadata.jsonl"
        for k, raw in enumerate(meta.read_bytes().splitlines()):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                self.reject(meta, f"line {k + 1} is not UTF-8")
                continue
            except json.JSONDecodeError as e:
                raise DatasetError(f"{meta}: line {k + 1} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{meta}: line {k + 1} must be a JSON object, got {type(row).__name__}")
            if "file_name" not in row or caption_column not in row:
                raise DatasetError(f"{self.root / 'metadata.jsonl'}: line {k + 1} needs 'file_name' and "
                                   f"{caption_column!r}, got keys {sorted(row)}")
            self.rows.append((row["file_name"], row[caption_column]))
        super().__init__(str(self.root), len(self.rows), resolution)

    def _read(self, i):
        from PIL import Image

        name, caption = self.rows[i]
        return Image.open(self.root / name), caption


class HFDisk(CaptionedImages):
    def __init__(self, root: Path, resolution: int, caption_column: str | None = None):
        try:
            import datasets
        except ImportError:
            raise DatasetError(f"{root} is a Hugging Face datasets folder: install the 'datasets' package "
                               "(pip install 'flashdistill[hf]')") from None
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DatasetError(f"{root}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        features = ds.features
        images = [k for k, f in features.items() if isinstance(f, datasets.Image)] or [k for k in ("image", "img") if k in features]
        captions = [caption_column] if caption_column else [k for k in ("text", "caption", "prompt") if k in features]
        if not images or not captions or captions[0] not in features:
            raise DatasetError(f"{root}: need an image column and a text/caption column, got columns {list(features)}")
        self.ds, self.image_col, self.caption_col = ds, images[0], captions[0]
        super().__init__(str(root), len(ds), resolution)

    def _read(self, i):
        from PIL import Image

        row = self.ds[i]
        image = row[self.image_col]
        if isinstance(image, dict):  # undecoded: {"bytes": ..., "path": ...}
            image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
        return image, row[self.caption_col]


class WebDatasetShards(CaptionedImages):
    def __init__(self, shards: list[Path], resolution: int):
        self.shards = shards
        self.samples = []  # (shard index, image TarInfo, caption TarInfo or None)
        for s, shard in enumerate(shards):
            groups: dict[str, dict] = {}
            try:
                tar = tarfile.open(shard)
            except (tarfile.TarError, OSError) as e:
                raise DatasetError(f"{shard}: not a readable tar shard ({e})") from None
            with tar:
                while True:
                    try:
                        m = tar.next()
                    except (tarfile.TarError, OSError) as e:  # a truncated shard: keep what came before
                        self.reject(shard, f"unreadable after {len(groups)} samples ({type(e).__name__}: {e}); "
                                           "the rest of this shard is skipped")
                        break
                    if m is None:
                        break
                    if not m.isfile():
                        continue
                    if m.name.startswith("/") or ".." in m.name.split("/"):
                        self.reject(shard, f"member {m.name!r} has an absolute or '..' path")
                        continue
                    folder, _, base = m.name.rpartition("/")
                    stem, _, ext = base.partition(".")
                    groups.setdefault(f"{folder}/{stem}", {})[ext.lower()] = m  # TarInfo: read by offset
            for key, parts in groups.items():
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                caption = parts.get("txt") or parts.get("json")
                if image is not None:
                    self.samples.append((s, image, caption))
        self._open: dict[int, tarfile.TarFile] = {}
        super().__init__(", ".join(str(s) for s in shards[:3]) + (" ..." if len(shards) > 3 else ""),
                         len(self.samples), resolution)

    def _member(self, s: int, member: tarfile.TarInfo) -> bytes:
        if s not in self._open:
            self._open[s] = tarfile.open(self.shards[s])
        return self._open[s].extractfile(member).read()  # by offset: no listing of a truncated shard

    def _read(self, i):
        from PIL import Image

        s, image, caption = self.samples[i]
        text = ""
        if caption is not None:
            raw = self._member(s, caption).decode("utf-8")  # not UTF-8: the item is skipped and counted
            if caption.name.endswith(".json"):
                obj = json.loads(raw)
                text = obj.get("caption", obj.get("text", ""))
            else:
                text = raw.strip()
        return Image.open(io.BytesIO(self._member(s, image))), text

    def __getstate__(self):  # tar handles do not cross process boundaries
        state = self.__dict__.copy()
        state["_open"] = {}
        return state


def load_image_dataset(path: str | Path, resolution: int, caption_column: str | None = None) -> CaptionedImages:
    """Detect the format of ``path`` (see the module docstring) and open it."""
    p = Path(path)
    if any(c in str(path) for c in "*?["):
        shards = sorted(Path(s) for s in glob.glob(str(path)))
        if not shards:
            raise DatasetError(f"no files match {str(path)!r}")
        return WebDatasetShards(shards, resolution)
    if not p.exists():
        raise DatasetError(f"dataset path {str(path)!r} does not exist")
    if p.is_file():
        if p.suffix == ".tar":
            return WebDatasetShards([p], resolution)
        raise DatasetError(f"{str(path)!r}: expected a folder, a .tar shard or a glob of shards")
    if (p / "metadata.jsonl").is_file():
        return ImageFolder(p, resolution, caption_column or "text")
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        return HFDisk(p, resolution, caption_column)
    shards = sorted(p.glob("*.tar"))
    if shards:
        return WebDatasetShards(shards, resolution)
    raise DatasetError(f"{str(path)!r}: not a recognised dataset; expected an image folder with metadata.jsonl, "
                       "a Hugging Face datasets folder (save_to_disk), or webdataset .tar shards")
