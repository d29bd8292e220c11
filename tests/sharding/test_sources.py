"""Sources: the ImageNet layout as distributed, class folders, the demo photos, Fashion-MNIST."""
from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sharding.manifest import read_manifest
from sharding.sources import (DemoSource, FashionMNISTSource, ImageFolderSource, ImageNetSource, SourceError,
                              find_fashion_mnist, key_from_relpath, open_source, unique_keys)
from tests.sharding.shardtest_helpers import crop, real_photo, run_cli, save

WNIDS = {"n01440764": ("astronaut", "tench, Tinca tinca"), "n01443537": ("coffee", "goldfish, Carassius auratus"),
         "n01484850": ("chelsea", "great white shark, white shark")}
EXTRA_WNIDS = {"n01491361": "tiger shark, Galeocerdo cuvieri", "n01494475": "hammerhead, hammerhead shark"}
VAL = [("ILSVRC2012_val_00000001", "n01443537"), ("ILSVRC2012_val_00000002", "n01440764"),
       ("ILSVRC2012_val_00000003", "n01484850"), ("ILSVRC2012_val_00000004", "n01440764")]


def build_imagenet(image_root: Path, meta_dir: Path, flat_val: bool = True) -> None:
    """train/<wnid>/<wnid>_<n>.JPEG, val/ (flat + LOC_val_solution.csv, or val/<wnid>/), LOC_synset_mapping.txt."""
    for w, (photo, _) in WNIDS.items():
        arr = real_photo(photo)
        for n in range(3):
            save(image_root / "train" / w / f"{w}_{n}.JPEG", crop(arr, 20 * n, 30, 40, 56), "JPEG")
    for i, (image_id, w) in enumerate(VAL):
        sub = "val" if flat_val else f"val/{w}"
        save(image_root / sub / f"{image_id}.JPEG", crop(real_photo(WNIDS[w][0]), 100, 20 * i, 40, 40), "JPEG")
    if flat_val:
        # One image without a row, one row without an image, one row of a class absent from train/.
        save(image_root / "val" / "ILSVRC2012_val_00000005.JPEG", crop(real_photo("rocket"), 0, 0, 40, 40), "JPEG")
        rows = [f"{image_id},{w} 10 20 30 40 {w} 1 2 3 4" for image_id, w in VAL]
        rows += ["ILSVRC2012_val_00000099,n01440764 1 2 3 4", "ILSVRC2012_val_00000006,n01491361 1 2 3 4"]
        save(image_root / "val" / "ILSVRC2012_val_00000006.JPEG", crop(real_photo("rocket"), 50, 0, 40, 40), "JPEG")
        (meta_dir / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    mapping = {**{w: d for w, (_, d) in WNIDS.items()}, **EXTRA_WNIDS}
    (meta_dir / "LOC_synset_mapping.txt").write_text("".join(f"{w} {d}\n" for w, d in sorted(mapping.items())))


@pytest.mark.parametrize("kaggle", [False, True], ids=["train-val-root", "kaggle-ILSVRC-root"])
def test_imagenet_layout_with_val_csv_and_synset_mapping(tmp_path, kaggle):
    image_root = tmp_path / "ILSVRC" / "Data" / "CLS-LOC" if kaggle else tmp_path
    build_imagenet(image_root, tmp_path)
    source = open_source(str(tmp_path))
    assert isinstance(source, ImageNetSource)
    listing = source.list()
    assert [c.name for c in listing.classes] == sorted(WNIDS)
    assert [c.description for c in listing.classes] == [WNIDS[w][1] for w in sorted(WNIDS)]
    train = listing.splits["train"]
    assert len(train) == 9
    label_of = {w: i for i, w in enumerate(sorted(WNIDS))}
    for item in train:
        wnid = item.key.split("_")[0]
        assert item.label == label_of[wnid] and "." not in item.key
        assert item.key == Path(item.source).stem  # n01440764_0
    val = {it.key: it.label for it in listing.splits["val"]}
    assert val == {image_id: label_of[w] for image_id, w in VAL}
    reasons = {Path(r.source).stem: r.reason for r in listing.rejected}
    assert "no label" in reasons["ILSVRC2012_val_00000005"]
    assert "n01491361 is not in train" in reasons["ILSVRC2012_val_00000006"]


def test_imagenet_val_in_class_folders(tmp_path):
    build_imagenet(tmp_path, tmp_path, flat_val=False)
    listing = ImageNetSource(tmp_path).list()
    label_of = {w: i for i, w in enumerate(sorted(WNIDS))}
    assert {it.key: it.label for it in listing.splits["val"]} == {i: label_of[w] for i, w in VAL}


def test_imagenet_flat_val_without_csv_fails_naming_the_file(tmp_path):
    build_imagenet(tmp_path, tmp_path)
    (tmp_path / "LOC_val_solution.csv").unlink()
    with pytest.raises(SourceError, match="LOC_val_solution.csv"):
        ImageNetSource(tmp_path).list()


def test_imagenet_shards_through_the_cli(tmp_path):
    build_imagenet(tmp_path / "in", tmp_path / "in")
    result = run_cli("shard", str(tmp_path / "in"), str(tmp_path / "out"), "--workers", "1", "--shard-maxcount", "4")
    assert result.returncode == 0, result.stderr
    assert "rejected 2" in result.stdout
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest.num_classes == 3 and manifest.num_samples("train") == 9 and manifest.num_samples("val") == 4
    assert manifest.num_shards("train") == 3
    rows = manifest.samples("val").to_pylist()
    assert {r["key"]: r["label_name"] for r in rows} == {i: w for i, w in VAL}
    rejected = manifest.rejected().to_pylist()
    assert sorted(Path(r["source"]).stem for r in rejected) == ["ILSVRC2012_val_00000005", "ILSVRC2012_val_00000006"]
    assert all(r["stage"] == "list" for r in rejected)


def test_class_folder_tree_single_split_and_split_folders(tmp_path, photo_folder):
    listing = open_source(str(photo_folder)).list()
    assert list(listing.splits) == ["train"] and [c.name for c in listing.classes] == ["astronaut", "chelsea", "coffee"]
    assert {it.key for it in listing.splits["train"]} == {f"{c}_{c}_{i}" for c in ("astronaut", "chelsea", "coffee")
                                                          for i in range(4)}
    arr = real_photo("coffee")
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            save(tmp_path / split / "cup" / f"{i}.png", crop(arr, 30 * i, 0, 32, 32), "PNG")
            save(tmp_path / split / "mug" / f"{i}.png", crop(arr, 30 * i, 50, 32, 32), "PNG")
    src = open_source(str(tmp_path))
    assert isinstance(src, ImageFolderSource)
    listing = src.list()
    assert list(listing.splits) == ["train", "val"]
    assert sorted((it.key, it.label) for it in listing.splits["val"]) == [("cup_0", 0), ("cup_1", 0), ("mug_0", 1),
                                                                          ("mug_1", 1)]


def test_keys_have_no_dots_and_stay_unique():
    assert key_from_relpath("dogs/img.001 (copy).jpg") == "dogs_img_001_copy"
    keys = unique_keys(["x/a.b.jpg", "x/a_b.jpg", "x/c.png"])
    assert len(set(keys)) == 3 and all("." not in k for k in keys) and keys[2] == "x_c"


def test_empty_class_folder_and_missing_source_fail_before_any_work(tmp_path, photo_folder):
    tree = tmp_path / "tree"
    save(tree / "full" / "a.png", crop(real_photo("coffee"), 0, 0, 16, 16), "PNG")
    (tree / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        ImageFolderSource(tree).list()
    result = run_cli("shard", str(tree), str(tmp_path / "dest"))
    assert result.returncode == 2 and "class folder" in result.stderr and "empty" in result.stderr
    missing = run_cli("shard", str(tmp_path / "nope"), str(tmp_path / "dest2"))
    assert missing.returncode == 2 and "nope" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "dest2").exists()


def test_symlink_loops_and_broken_links_are_listed_as_rejected(tmp_path):
    tree = tmp_path / "tree"
    save(tree / "cls" / "ok.png", crop(real_photo("coffee"), 0, 0, 16, 16), "PNG")
    os.symlink(tree / "cls" / "b.jpg", tree / "cls" / "a.jpg")
    os.symlink(tree / "cls" / "a.jpg", tree / "cls" / "b.jpg")  # a -> b -> a
    os.symlink(tree / "cls" / "gone.jpg", tree / "cls" / "broken.jpg")
    os.symlink(tree / "cls", tree / "cls" / "again")  # directory loop
    listing = ImageFolderSource(tree).list()
    assert [it.key for it in listing.splits["train"]] == ["cls_ok"]
    reasons = {r.source: r.reason for r in listing.rejected}
    assert reasons["cls/a.jpg"] == reasons["cls/b.jpg"] == "symlink loop"
    assert "broken symlink" in reasons["cls/broken.jpg"]
    assert "directory symlink loop" in reasons["cls/again"]


def test_demo_is_deterministic_and_crops_real_photos():
    a, b = (DemoSource(seed=5, train=12, val=6, unseen=8, size=24) for _ in range(2))
    la, lb = a.list(), b.list()
    assert la.splits == lb.splits
    assert [a.read(it) for it in la.splits["train"][:3]] == [b.read(it) for it in lb.splits["train"][:3]]
    assert DemoSource(seed=6, train=12).list().splits["train"] != la.splits["train"]
    names = [c.name for c in la.classes]
    train_photos = {names[it.label] for it in la.splits["train"] + la.splits["val"]}
    unseen_photos = {names[it.label] for it in la.splits["unseen"]}
    assert len(train_photos) == 6 and len(unseen_photos) == 4 and not train_photos & unseen_photos
    assert min(it.label for it in la.splits["unseen"]) == 6
    # The stored crop is the photo's pixels at the recorded box, resized (checked with skimage's loader).
    item = la.splits["train"][0]
    name, box = item.source.split("#")
    y0, x0, side = map(int, box.split(","))
    expected = Image.fromarray(real_photo(name)[y0:y0 + side, x0:x0 + side]).resize((24, 24), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(a.read(item)))), np.asarray(expected))


def _debian_reader():
    path = Path("/usr/share/doc/dataset-fashion-mnist/utils/mnist_reader.py")
    spec = importlib.util.spec_from_file_location("fashion_mnist_reader", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(find_fashion_mnist() is None,
                    reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it as root)")
def test_fashion_mnist_matches_the_packages_own_reader(tmp_path):
    source = open_source("fashion-mnist")
    assert isinstance(source, FashionMNISTSource)
    listing = source.list()
    assert {s: len(v) for s, v in listing.splits.items()} == {"train": 60000, "val": 10000}
    images, labels = _debian_reader().load_mnist(source.directory, kind="t10k")  # independent parser
    val = listing.splits["val"]
    np.testing.assert_array_equal([it.label for it in val], labels)
    for i in (0, 1234, 9999):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(source.read(val[i])))),
                                      images[i].reshape(28, 28))
    result = run_cli("shard", "fashion-mnist", str(tmp_path / "fm"), "--splits", "val", "--max-per-split", "40",
                     "--workers", "1")
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(tmp_path / "fm" / "manifest" / "val-samples.parquet").to_pylist()
    assert len(rows) == 40
    for r in rows:
        assert r["label"] == labels[int(r["source"].split("#")[1])] and r["ext"] == "png"


def test_demo_crop_sizes_follow_the_crop_option():
    for scale in [(0.2, 0.6), (0.9, 1.0), (1.0, 1.0)]:
        listing = DemoSource(seed=2, train=30, val=0, unseen=10, size=16, crop=scale).list()
        for item in listing.splits["train"] + listing.splits["unseen"]:
            name, box = item.source.split("#")
            y0, x0, side = map(int, box.split(","))
            h, w = real_photo(name).shape[:2]
            assert int(scale[0] * min(h, w)) <= side <= scale[1] * min(h, w), (scale, item.source)
            assert 0 <= y0 <= h - side and 0 <= x0 <= w - side
    for bad in [(0.0, 0.5), (0.7, 0.3), (0.5, 1.2)]:
        with pytest.raises(SourceError, match="demo crop must be"):
            DemoSource(crop=bad)
