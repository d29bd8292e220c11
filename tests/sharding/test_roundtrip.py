"""Image files -> shards -> the real WebDataset reader: keys, labels, bytes and pixels survive."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from sharding.images import ImageOptions
from sharding.plan import plan_shards
from sharding.sources import ImageFolderSource
from sharding.storage import Destination
from sharding.stream import make_eval_loader
from sharding.transforms import DEQUANTIZE_SCALE, ImageTransform
from sharding.verify import verify_shards
from sharding.write import shard_source
from tests.sharding.shardtest_helpers import crop, real_photo, save


@pytest.fixture(scope="module")
def kept_shards(photo_folder, tmp_path_factory):
    dest = tmp_path_factory.mktemp("kept")
    plan = plan_shards(ImageFolderSource(photo_folder), shard_maxcount=5, seed=1)
    manifest, _report = shard_source(plan, Destination(str(dest)))
    return photo_folder, dest, manifest


def test_plain_webdataset_reads_every_sample_with_original_bytes(kept_shards):
    folder, _dest, manifest = kept_shards
    assert manifest.num_shards("train") == 3 and manifest.num_samples("train") == 12
    seen = {}
    for sample in wds.WebDataset(manifest.shard_urls("train"), shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        image = sample.get("jpg", sample.get("png"))
        source_bytes = (folder / meta["source"]).read_bytes()
        assert image == source_bytes  # original bytes kept
        seen[sample["__key__"]] = int(sample["cls"])
    rows = manifest.samples("train").to_pylist()
    assert seen == {r["key"]: r["label"] for r in rows}
    names = manifest.class_names
    for r in rows:
        assert r["label_name"] == names[r["label"]] == r["source"].split("/")[0]
        assert r["sha256"] == hashlib.sha256((folder / r["source"]).read_bytes()).hexdigest()


def test_shards_are_class_mixed(kept_shards):
    _, _, manifest = kept_shards
    rows = manifest.samples("train").to_pylist()
    first = [r["label"] for r in rows if r["shard"] == "train-000000.tar"]
    assert len(set(first)) >= 2


def test_tar_headers_are_fixed(kept_shards):
    _, dest, _manifest = kept_shards
    with tarfile.open(dest / "train-000000.tar") as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(946684800, 0, 0, "cscctrl",
                                                                                  "cscctrl", 0o444)}
    assert [i.name.split(".", 1)[1] for i in infos[:3]] in (["cls", "jpg", "json"], ["cls", "json", "png"])


def test_eval_loader_pixels_match_numpy(tmp_path):
    """Square PNG crops at the training size: x must equal pixel/127.5 − 1 exactly (no resampling)."""
    photos = {"astronaut": crop(real_photo("astronaut"), 0, 0, 24, 24),
              "camera": crop(real_photo("camera"), 50, 50, 24, 24)}
    for name, arr in photos.items():
        save(tmp_path / "src" / name / f"{name}.png", arr, "PNG")
    plan = plan_shards(ImageFolderSource(tmp_path / "src"), shard_maxcount=10)
    shard_source(plan, Destination(str(tmp_path / "out")))
    x, labels, keys = next(iter(make_eval_loader(str(tmp_path / "out"), "train", image_size=24, batch_size=8,
                                                 num_workers=0, with_keys=True)))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32 and labels.dtype == torch.int64
    for i, key in enumerate(keys):
        name = key.split("_")[0]
        arr = photos[name].astype(np.float64)
        rgb = np.dstack([arr] * 3) if arr.ndim == 2 else arr  # grey replicated to 3 channels
        np.testing.assert_allclose(x[i].numpy(), rgb.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)
        assert labels[i].item() == ["astronaut", "camera"].index(name)


def test_memory_destination_round_trip(photo_folder):
    """fsspec's in-memory file system as DEST: write, manifest, verify and stream without local files."""
    url = "memory://cscctrl-roundtrip/shards"
    plan = plan_shards(ImageFolderSource(photo_folder), shard_maxcount=4)
    manifest, _ = shard_source(plan, Destination(url))
    assert manifest.shard_urls("train")[0].endswith("/cscctrl-roundtrip/shards/train-000000.tar")
    assert verify_shards(url).ok
    keys = [k for _, _, ks in make_eval_loader(url, "train", image_size=16, batch_size=5, num_workers=0,
                                               with_keys=True) for k in ks]
    assert sorted(keys) == sorted(manifest.samples("train").column("key").to_pylist())
    fsspec.filesystem("memory").rm("/cscctrl-roundtrip", recursive=True)


def test_resize_at_shard_stores_small_jpegs(photo_folder, tmp_path):
    plan = plan_shards(ImageFolderSource(photo_folder), shard_maxcount=100,
                       image_options=ImageOptions(resize=32, quality=80))
    manifest, _ = shard_source(plan, Destination(str(tmp_path)))
    rows = manifest.samples("train").to_pylist()
    assert all(min(r["width"], r["height"]) == 32 and r["ext"] == "jpg" and r["converted"] for r in rows)
    for sample in wds.WebDataset(manifest.shard_urls("train"), shardshuffle=False, empty_check=False):
        im = Image.open(io.BytesIO(sample["jpg"]))
        meta = json.loads(sample["json"])
        assert im.format == "JPEG" and (im.width, im.height) == (meta["width"], meta["height"])
        src = Image.open(photo_folder / meta["source"])
        assert abs(im.width / im.height - src.width / src.height) < 0.05  # aspect ratio kept


def test_transform_centre_crop_flip_and_dequantisation():
    arr = crop(real_photo("chelsea"), 0, 0, 30, 40)  # 40 wide, 30 high: centre square = columns 5..34
    png = io.BytesIO()
    Image.fromarray(arr).save(png, format="PNG")
    clean = ImageTransform(30)(png.getvalue())
    expected = arr[:, 5:35].astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0
    np.testing.assert_allclose(clean.numpy(), expected, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    flips = [ImageTransform(30, flip=True)(png.getvalue(), gen) for _ in range(40)]
    n_flipped = sum(torch.equal(f, clean.flip(-1)) for f in flips)
    assert sum(torch.equal(f, clean) for f in flips) + n_flipped == 40 and 5 < n_flipped < 35
    noisy = ImageTransform(30, dequantize=True)(png.getvalue(), gen)
    noise = (noisy - clean).numpy()
    assert noise.min() >= 0 and noise.max() < DEQUANTIZE_SCALE and noise.std() > DEQUANTIZE_SCALE / 5
