"""FID and CLIP score for real (text-to-image) models, offline.

- **FID** (Heusel et al. 2017): the Fréchet distance between Inception-v3 pool features (2048-d) of
  generated images and of a reference image folder. The extractor is torchmetrics' FID Inception
  (the torch-fidelity port of the TF weights ``pt_inception-2015-12-05``), loaded from a local
  weights file: ``pip install 'flashdistill[metrics]'`` and pass ``--inception-weights FILE``
  (default: torch hub's cache, where torch-fidelity would have saved it).
- **CLIP score** (Hessel et al. 2021, as torchmetrics: ``max(100 * cos(image, text), 0)``, mean):
  a transformers ``CLIPModel`` + ``CLIPProcessor`` saved in a local folder (``--clip-model DIR``).

Nothing is downloaded: missing packages or weights raise :class:`MetricUnavailable` naming what is
missing and where it was looked for. Both metrics take any feature extractor / scorer with the
same call signature, which is how the tests exercise the code path without the real weights.

Protocols (the paper's Fig. 4a/4b and Table 1): prompts come from a COCO captions annotation file
(``captions_val2017.json`` / ``captions_val2014.json``) or a text file with one prompt per line;
the first caption of each image, images in increasing id order, the first N of them:

| protocol | prompts | N | reference images |
| --- | --- | --- | --- |
| ``coco2017-5k`` | COCO-2017 val captions | 5,000 | COCO-2017 val images |
| ``coco2014-30k`` | COCO-2014 val captions | 30,000 | COCO-2014 val images |
| ``coco2014-10k`` | COCO-2014 val captions | 10,000 | COCO-2014 val images |

The papers' exact prompt subsets are not published with them; ours are deterministic, so numbers
are comparable between runs of this tool, and close to, not identical with, published ones.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

PROTOCOLS = {"coco2017-5k": 5000, "coco2014-30k": 30000, "coco2014-10k": 10000}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class MetricUnavailable(RuntimeError):
    pass


def read_prompts(path: str | Path, n: int | None = None) -> list[str]:
    """Prompts from a COCO captions JSON (first caption per image, images by id) or a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if "annotations" not in data:
            raise ValueError(f"{path}: expected a COCO captions file with an 'annotations' list")
        first: dict[int, str] = {}
        for a in sorted(data["annotations"], key=lambda a: (a["image_id"], a.get("id", 0))):
            first.setdefault(a["image_id"], a["caption"].strip())
        prompts = [first[k] for k in sorted(first)]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts found")
    if n is not None:
        if len(prompts) < n:
            raise ValueError(f"{path}: {len(prompts)} prompts, the protocol needs {n}")
        prompts = prompts[:n]
    return prompts


def reference_files(folder: str | Path, limit: int | None = None) -> list[Path]:
    """A reference folder's images (sorted names; jpg/jpeg/png/webp), at least 2."""
    from .data.images import IMAGE_EXTS

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTS)[:limit]
    if len(files) < 2:
        raise ValueError(f"{folder}: need at least 2 reference images, found {len(files)}")
    return files


def read_images(files: list[Path], size: int) -> torch.Tensor:
    """Images resized (shorter side) and centre-cropped to ``size``, (N, 3, size, size) in [-1, 1]."""
    from PIL import Image

    from .data.images import to_tensor

    return torch.stack([to_tensor(Image.open(f), size) for f in files])


def reference_features(folder: str | Path, extractor: Callable[[torch.Tensor], np.ndarray], size: int = 299,
                       batch_size: int = 64, limit: int | None = None) -> np.ndarray:
    """Features of a folder's images (:func:`reference_files`), resized and centre-cropped to
    ``size``, read and embedded ``batch_size`` at a time (a 30k-image folder never sits in memory)."""
    files = reference_files(folder, limit)
    chunks = [extractor(read_images(files[i: i + batch_size], size)) for i in range(0, len(files), batch_size)]
    return np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks])


COND_SEED = 20261203  # conditions of real-model evaluation: sample i's from generator COND_SEED + i


def conditions_from(task, images: torch.Tensor, first: int, noise_level: int = 0) -> dict:
    """The evaluation condition of each image (masks, low-res, stroke maps; no training noise; the sr
    low-res at ``noise_level``, the model's default), sample ``first + j``'s made with its own
    generator, so a sample's condition does not depend on the batch."""
    items = [task.make(images[j: j + 1], torch.Generator().manual_seed(COND_SEED + first + j), train=False)
             for j in range(len(images))]
    out = {k: torch.cat([it[k] for it in items]) for k in items[0]}
    if "noise_level" in out:
        out["noise_level"] = torch.full_like(out["noise_level"], noise_level)
    return out


def inception_extractor(weights: str | Path | None = None) -> Callable[[torch.Tensor], np.ndarray]:
    """torchmetrics' FID Inception from a local weights file: images in [-1, 1] -> (N, 2048) features."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError:
        raise MetricUnavailable("FID needs torchmetrics and torch-fidelity: pip install 'flashdistill[metrics]'") from None
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise MetricUnavailable(f"FID needs the Inception weights {INCEPTION_FILE} (torch-fidelity's "
                                f"pt_inception-2015-12-05), not found at {path}; copy them there or pass "
                                "--inception-weights FILE (nothing is downloaded)")
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path)).eval()

    @torch.no_grad()
    def extract(images: torch.Tensor) -> np.ndarray:
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return torch.cat([net(x[i: i + 64]).reshape(-1, 2048) for i in range(0, len(x), 64)]).double().numpy()

    return extract


def clip_scorer(model_dir: str | Path | None) -> Callable[[torch.Tensor, list[str]], np.ndarray]:
    """A local transformers CLIP: (images in [-1, 1], prompts) -> per-image max(100 cos, 0)."""
    if not model_dir:
        raise MetricUnavailable("CLIP score needs a local CLIP model folder: pass --clip-model DIR (a transformers "
                                "CLIPModel + CLIPProcessor saved with save_pretrained, e.g. openai/clip-vit-large-patch14)")
    if not Path(model_dir).is_dir():
        raise MetricUnavailable(f"CLIP model folder {str(model_dir)!r} does not exist (nothing is downloaded)")
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: list[str]) -> np.ndarray:
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        inputs = processor(text=prompts, images=list(pixels), return_tensors="pt", padding=True, truncation=True)
        img = _embeds(model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = _embeds(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]))
        cos = torch.nn.functional.cosine_similarity(img, txt)
        return (100 * cos).clamp(min=0).double().numpy()

    return score


def _embeds(out) -> torch.Tensor:
    """Projected CLIP embeddings: a tensor (transformers 4) or the output's pooler_output (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def evaluate_real(model, prompts: list[str], steps: list[int], guidance: float | None = None,
                  reference: np.ndarray | None = None, extractor=None, scorer=None, seed: int = 0,
                  batch_size: int = 8, progress: bool = True, condition_files: list[Path] | None = None,
                  guidance_interval: tuple[float, float] | None = None) -> list[dict]:
    """Per step count: FID of the generated images against ``reference`` features (when given with
    ``extractor``) and CLIP score (when ``scorer``); sample i uses seed ``seed + i``. Images are
    embedded batch by batch and not kept.

    Conditional models (inpaint, sr, sketch pipelines): sample i is conditioned on image ``i mod R``
    of ``condition_files`` (read at the model's image size; its mask, low-res or stroke map made by
    :func:`conditions_from`), and each row also holds the task's own metrics against those images
    (unmasked / masked MSE, consistency and PSNR, stroke F1), averaged over the samples."""
    from tqdm.auto import tqdm

    from .scoring import frechet_distance
    from .sample import sample
    from .tasks import article

    task = model.task
    if task.keys and not condition_files:
        raise ValueError(f"this is {article(task.name)} {task.name!r} model: its evaluation conditions sample i on "
                         "reference image i (pass --reference DIR)")
    seeds = [seed + i for i in range(len(prompts))]
    use_fid = reference is not None and extractor is not None
    feats, clips, sums = {n: [] for n in steps}, {n: [] for n in steps}, {n: {} for n in steps}
    # batches outside, step counts inside: a batch's reference images are read and its conditions made once
    for i in tqdm(range(0, len(prompts), batch_size), desc=f"steps {', '.join(map(str, steps))}", disable=not progress):
        p = prompts[i: i + batch_size]
        condition = truth = None
        if task.keys:
            truth = read_images([condition_files[k % len(condition_files)] for k in range(i, i + len(p))],
                                model.pixel_shape[-1])
            condition = conditions_from(task, truth, i, model.default_noise_level)
        for n in steps:
            images = sample(model, p, seeds[i: i + batch_size], n, guidance=guidance, condition=condition,
                            guidance_interval=guidance_interval)
            if use_fid:
                feats[n].append(np.asarray(extractor(images), dtype=np.float64))
            if scorer is not None:
                clips[n].append(np.asarray(scorer(images, p), dtype=np.float64))
            if task.keys:  # per-sample means: a batch's mean weighted by its size
                for k, v in task.metrics(images, condition, truth).items():
                    sums[n][k] = sums[n].get(k, 0.0) + v * len(p)
    return [{"steps": n, "num_samples": len(prompts),
             "fid": frechet_distance(np.concatenate(feats[n]), reference) if use_fid else None,
             "clip_score": float(np.concatenate(clips[n]).mean()) if scorer is not None else None,
             **({"task": task.name, **{k: v / len(prompts) for k, v in sums[n].items()}} if task.keys else {})}
            for n in steps]
