"""Real-model metrics: prompt files and protocols, FID with a stand-in feature extractor, CLIP
score with a tiny local CLIP, and clear errors when weights are missing."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_pipelines as tp
from flashdistill.scoring import frechet_distance
from flashdistill.metrics import (MetricUnavailable, clip_scorer, evaluate_real, inception_extractor, read_prompts,
                                  reference_features)


def stand_in_extractor(images: torch.Tensor) -> np.ndarray:
    """Per-channel means and stds on a 4x4 pooling grid: a cheap deterministic feature map."""
    x = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)
    return torch.cat([x, images.float().flatten(2).std(2)], 1).double().numpy()


def test_read_prompts_coco_and_text(tmp_path):
    coco = {"annotations": [{"image_id": 5, "id": 2, "caption": " a dog "}, {"image_id": 1, "id": 9, "caption": "x"},
                            {"image_id": 1, "id": 3, "caption": "a cat"}, {"image_id": 5, "id": 1, "caption": "a pup"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    assert read_prompts(tmp_path / "c.json") == ["a cat", "a pup"]  # first caption per image, images by id
    (tmp_path / "p.txt").write_text("one\n\ntwo\nthree\n")
    assert read_prompts(tmp_path / "p.txt", 2) == ["one", "two"]
    with pytest.raises(ValueError, match="3 prompts, the protocol needs 5000"):
        read_prompts(tmp_path / "p.txt", 5000)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_reference_features_stream_a_folder(tmp_path):
    for i in range(5):
        Image.fromarray((np.full((20, 30, 3), 40 * i)).astype(np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    seen = []

    def extractor(images):
        seen.append(images.shape)
        return stand_in_extractor(images)

    feats = reference_features(tmp_path, extractor, size=8, batch_size=2)
    assert seen == [(2, 3, 8, 8), (2, 3, 8, 8), (1, 3, 8, 8)] and feats.shape[0] == 5
    # image i is flat gray 40*i: its pooled features equal 40*i/127.5 - 1 everywhere
    np.testing.assert_allclose(feats[3, :48], 120 / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 reference images"):
        reference_features(tmp_path, extractor, limit=1)


def test_missing_weights_fail_with_clear_messages(tmp_path):
    with pytest.raises(MetricUnavailable, match=r"torchmetrics|Inception weights"):
        inception_extractor(tmp_path / "missing.pth")
    with pytest.raises(MetricUnavailable, match="--clip-model DIR"):
        clip_scorer(None)
    with pytest.raises(MetricUnavailable, match="does not exist"):
        clip_scorer(tmp_path / "no-clip")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = tmp_path_factory.mktemp("clip")
    text = tp.clip_text().config.to_dict()
    cfg = CLIPConfig(text_config=text, vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                          num_hidden_layers=2, image_size=16, patch_size=4),
                     projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                  tokenizer=tp.clip_tokenizer()).save_pretrained(out)
    return out


def test_clip_score_and_evaluate_real_on_a_tiny_pipeline(tmp_path, tiny_clip):
    from flashdistill.models.loading import load_model

    scorer = clip_scorer(tiny_clip)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    s = scorer(images, ["a cat", "a dog"])
    assert s.shape == (2,) and (s >= 0).all() and (s <= 100).all()

    from flashdistill.sample import sample

    teacher = load_model(tp.build("sd", tmp_path / "sd"))
    prompts = ["a cat", "a dog", "a red car", "a lake"]
    reference = stand_in_extractor(torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    rows = evaluate_real(teacher, prompts, [1, 2], guidance=2.0, reference=reference,
                         extractor=stand_in_extractor, scorer=scorer, batch_size=3, progress=False)
    assert [r["steps"] for r in rows] == [1, 2] and all(r["num_samples"] == 4 for r in rows)
    # batching (3 + 1) gives the values of one pass over all images with the same seeds
    for r in rows:
        images = sample(teacher, prompts, [0, 1, 2, 3], r["steps"], guidance=2.0)
        assert r["fid"] == pytest.approx(frechet_distance(stand_in_extractor(images), reference), rel=1e-6)
        assert r["clip_score"] == pytest.approx(float(scorer(images, prompts).mean()), rel=1e-5)


def test_cli_evaluate_real_model_needs_prompts(tmp_path, capsys):
    from flashdistill.cli import main

    teacher = tp.build("sd", tmp_path / "sd")
    assert main(["evaluate", "--model", str(teacher), "--steps", "2"]) == 2
    assert "pass --prompts FILE" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    assert main(["evaluate", "--model", str(teacher), "--prompts", str(tmp_path / "p.txt"), "--steps", "2"]) == 2
    assert "--clip-model DIR" in capsys.readouterr().err


def test_evaluate_real_conditional_pipeline_takes_its_conditions_from_the_reference(tmp_path, capsys):
    """A conditional pipeline's real-model evaluation: sample i conditioned on reference image i mod R
    (its mask made with sample i's own generator, whatever the batch), the task metrics against
    those images beside FID; without --reference it is refused."""
    from PIL import Image

    from flashdistill.cli import main
    from flashdistill.metrics import conditions_from, read_images, reference_files
    from flashdistill.models.loading import load_model
    from flashdistill.sample import sample

    teacher_dir = tp.build("sd-inpaint", tmp_path / "inpaint")
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        Image.new("RGB", (20 + 4 * i, 24), (60 * i, 20, 200 - 30 * i)).save(ref / f"{i}.png")
    teacher = load_model(teacher_dir)
    files = reference_files(ref)
    images = read_images([files[k % 3] for k in range(4)], 16)
    cond = conditions_from(teacher.task, images, 0)
    part = conditions_from(teacher.task, images[2:], 2)
    assert all(torch.equal(cond[k][2:], part[k]) for k in cond)  # a sample's condition is its own
    assert not torch.equal(cond["mask"][0], cond["mask"][3])  # same image (0 and 3), another mask

    prompts = ["a cat", "a dog", "a red car", "a lake"]
    feats = stand_in_extractor(images)
    rows = evaluate_real(teacher, prompts, [2], guidance=2.0, reference=feats, extractor=stand_in_extractor,
                         batch_size=4, progress=False, condition_files=files)
    out = sample(teacher, prompts, [0, 1, 2, 3], 2, guidance=2.0, condition=cond)
    want = teacher.task.metrics(out, cond, images)
    assert rows[0]["task"] == "inpaint" and set(want) <= set(rows[0])
    for k, v in want.items():
        assert rows[0][k] == pytest.approx(v, rel=1e-6)
    assert rows[0]["fid"] == pytest.approx(frechet_distance(stand_in_extractor(out), feats), rel=1e-6)
    with pytest.raises(ValueError, match="its evaluation conditions sample i on reference image i"):
        evaluate_real(teacher, prompts, [2], progress=False)
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    assert main(["evaluate", "--model", str(teacher_dir), "--prompts", str(tmp_path / "p.txt"), "--steps", "2"]) == 2
    assert "pass --reference DIR, whose images give the conditions" in capsys.readouterr().err
