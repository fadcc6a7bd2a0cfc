"""Captioned image datasets: image folder, Hugging Face datasets folder, webdataset shards;
resizing and centre-cropping; corrupt images skipped and counted; mostly-corrupt data refused."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from flashdistill.data.images import DatasetError, load_image_dataset, to_tensor


def _image(seed: int, size=(24, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    _image(seed).save(buf, format="PNG")
    return buf.getvalue()


def test_to_tensor_resizes_shorter_side_and_centre_crops():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # a blue band on the left quarter: cropped away
    x = to_tensor(img, 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    assert x.min() >= -1 and x.max() <= 1
    gray = to_tensor(Image.new("L", (8, 8), 0), 8)
    assert gray.shape == (3, 8, 8) and (gray == -1).all()


def _folder(root, n=6, corrupt=()):
    root.mkdir()
    lines = []
    for i in range(n):
        name = f"img_{i}.png"
        if i in corrupt:
            (root / name).write_bytes(b"not an image")
        else:
            _image(i).save(root / name)
        lines.append(json.dumps({"file_name": name, "text": f"caption {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder(tmp_path):
    ds = load_image_dataset(_folder(tmp_path / "f"), 8)
    assert len(ds) == 6
    item = ds[3]
    assert item["prompt"] == "caption 3" and item["image"].shape == (3, 8, 8)
    torch.testing.assert_close(item["image"], to_tensor(_image(3), 8))


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    ds = load_image_dataset(_folder(tmp_path / "f", n=8, corrupt=(2,)), 8)
    assert ds.failures == 1 and ds.bad == {2}  # found while probing
    with pytest.warns(UserWarning, match="skipping unreadable item 5"):
        (tmp_path / "f" / "img_5.png").write_bytes(b"truncated")
        item = ds[5]
    assert item["prompt"] == "caption 6"  # the next readable item takes its place
    assert ds[2]["prompt"] == "caption 3" and ds.bad == {2, 5}


def test_mostly_corrupt_dataset_stops_with_a_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="5 of the first 6 images could not be read"):
        with pytest.warns(UserWarning):
            load_image_dataset(_folder(tmp_path / "f", n=6, corrupt=(0, 1, 2, 3, 4)), 8)


def test_bad_metadata_and_paths(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    (root / "metadata.jsonl").write_text(json.dumps({"file": "a.png"}) + "\n")
    with pytest.raises(DatasetError, match="line 1 needs 'file_name' and 'text'"):
        load_image_dataset(root, 8)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_dataset(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a recognised dataset"):
        load_image_dataset(tmp_path / "empty", 8)


def _shard(path, start, n, json_captions=False, corrupt=()):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"sample{i:04d}"
            caption = (json.dumps({"caption": f"caption {i}"}) if json_captions else f"caption {i}\n").encode()
            files = {f"{key}.png": b"garbage" if i in corrupt else _png(i),
                     f"{key}.{'json' if json_captions else 'txt'}": caption}
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_shards_folder_file_and_glob(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    _shard(root / "a-000.tar", 0, 3)
    _shard(root / "a-001.tar", 3, 3, json_captions=True)
    for path in (root, root / "a-*.tar"):
        ds = load_image_dataset(path, 8)
        assert len(ds) == 6
        assert [ds[i]["prompt"] for i in (0, 4)] == ["caption 0", "caption 4"]
        torch.testing.assert_close(ds[4]["image"], to_tensor(_image(4), 8))
    assert len(load_image_dataset(root / "a-000.tar", 8)) == 3
    with pytest.raises(DatasetError, match="no files match"):
        load_image_dataset(root / "b-*.tar", 8)


def test_webdataset_corrupt_member_is_skipped(tmp_path):
    path = _shard(tmp_path / "s.tar", 0, 5, corrupt=(1,))
    with pytest.warns(UserWarning, match="skipping unreadable item 1"):
        ds = load_image_dataset(path, 8)
    assert ds[1]["prompt"] == "caption 2"


def test_hf_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [_image(i) for i in range(4)], "text": [f"caption {i}" for i in range(4)]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    for folder in ("single", "dict"):
        loaded = load_image_dataset(tmp_path / folder, 8)
        assert len(loaded) == 4 and loaded[2]["prompt"] == "caption 2"
        torch.testing.assert_close(loaded[2]["image"], to_tensor(_image(2), 8))


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_truncated_webdataset_shard_keeps_the_samples_before_the_cut(tmp_path):
    path = _shard(tmp_path / "s.tar", 0, 10)
    data = path.read_bytes()
    with tarfile.open(path) as tar:  # cut inside the 8th sample's image data
        cut = tar.getmember("sample0007.png").offset_data + 20
    path.write_bytes(data[:cut])
    with pytest.warns(UserWarning) as record:
        ds = load_image_dataset(path, 8)
        items = [ds[i] for i in range(len(ds))]
    assert len(ds) <= 8 and ds.rejected + len(ds.bad) >= 1
    assert [it["prompt"] for it in items[:7]] == [f"caption {i}" for i in range(7)]
    torch.testing.assert_close(items[6]["image"], to_tensor(_image(6), 8))
    assert any("s.tar" in str(w.message) for w in record)


def test_tar_members_with_absolute_or_parent_paths_are_rejected(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i, prefix in enumerate(["", "/etc/", "../", "a/../../", "ok/"]):
            _add(tar, f"{prefix}sample{i}.png", _png(i))
            _add(tar, f"{prefix}sample{i}.txt", f"caption {i}".encode())
    with pytest.warns(UserWarning, match=r"absolute or '\.\.' path"):
        ds = load_image_dataset(path, 8)
    assert len(ds) == 2 and ds.rejected == 6  # three bad samples, two members each
    assert sorted(ds[i]["prompt"] for i in range(2)) == ["caption 0", "caption 4"]


def test_decompression_bomb_is_skipped_and_counted_without_decoding(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    root = _folder(tmp_path / "f", n=6)
    PILImage.new("L", (300, 300)).save(root / "img_3.png")  # 90,000 pixels: a "bomb" under the limit below
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 50_000)  # warning above 50k, error above 100k
    with pytest.warns(UserWarning, match="skipping unreadable item 3.*DecompressionBomb"):
        ds = load_image_dataset(root, 8)
    assert ds.bad == {3} and ds[3]["prompt"] == "caption 4"


def test_non_utf8_captions_are_skipped_and_counted(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(5):
            _add(tar, f"sample{i}.png", _png(i))
            _add(tar, f"sample{i}.txt", b"caption \xff\xfe" if i == 2 else f"caption {i}".encode())
    with pytest.warns(UserWarning, match="skipping unreadable item 2.*UnicodeDecodeError"):
        ds = load_image_dataset(path, 8)
    assert ds.bad == {2} and ds[2]["prompt"] == "caption 3"
    root = _folder(tmp_path / "f", n=4)
    meta = root / "metadata.jsonl"
    lines = meta.read_bytes().splitlines()
    lines[1] = b'{"file_name": "img_1.png", "text": "caption \xff"}'
    meta.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UserWarning, match="line 2 is not UTF-8"):
        ds = load_image_dataset(root, 8)
    assert len(ds) == 3 and ds.rejected == 1 and [ds[i]["prompt"] for i in range(3)] == ["caption 0", "caption 2", "caption 3"]
