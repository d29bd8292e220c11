"""Grey (channels=1) and RGB (channels=3) reading of real shards written by the project's own sharding:
grey stays grey, colour becomes Pillow's ITU-R 601 luminance, RGB is unchanged, bad values fail."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sharding.plan import plan_shards
from sharding.sources import FashionMNISTSource, ImageFolderSource, find_fashion_mnist, read_idx
from sharding.storage import Destination
from sharding.stream import make_eval_loader, make_train_loader
from sharding.transforms import DEQUANTIZE_SCALE, ImageTransform, decode_image
from sharding.write import shard_source
from tests.sharding.shardtest_helpers import crop, real_photo, save

SIZE = 24  # pixels: the square PNG crops are stored at the reading size, so no resampling happens
JPEG_SIDE = 4 * SIZE  # the JPEG is 4x larger: decoded at 1/4 DCT scale (Pillow's draft)


def signed(arr: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> float64 (C, H, W) in [-1, 1]: p / 127.5 − 1."""
    arr = arr[..., None] if arr.ndim == 2 else arr
    return arr.astype(np.float64).transpose(2, 0, 1) / 127.5 - 1.0


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """A grey photo (camera) and a colour one (astronaut) as SIZE-px PNGs, and a colour JPEG (coffee)
    4x larger; sharded by the project's sharding. Returns (shard dir, {key prefix: uint8 array})."""
    root = tmp_path_factory.mktemp("channels")
    photos = {"camera": crop(real_photo("camera"), 100, 180, SIZE, SIZE),
              "astronaut": crop(real_photo("astronaut"), 40, 180, SIZE, SIZE),
              "coffee": crop(real_photo("coffee"), 60, 150, JPEG_SIDE, JPEG_SIDE)}
    assert photos["camera"].ndim == 2 and photos["astronaut"].shape == (SIZE, SIZE, 3)
    for name, arr in photos.items():
        fmt = "JPEG" if name == "coffee" else "PNG"
        save(root / "src" / name / f"{name}.{fmt.lower()}", arr, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    plan = plan_shards(ImageFolderSource(root / "src"), shard_maxcount=2)
    shard_source(plan, Destination(str(root / "out")))
    return root / "out", photos


def read_all(dest, channels: int, image_size: int = SIZE) -> dict[str, torch.Tensor]:
    """{photo name: x (C, H, W)} of every sample, through the real eval loader."""
    out = {}
    for x, _, keys in make_eval_loader(str(dest), "train", image_size=image_size, batch_size=2, num_workers=0,
                                       with_keys=True, channels=channels):
        assert x.dtype == torch.float32 and x.shape[1:] == (channels, image_size, image_size)
        out.update({key.split("_")[0]: xi for key, xi in zip(keys, x)})
    return out


def test_grey_stays_grey_and_colour_becomes_pillow_luminance(mixed_shards):
    dest, photos = mixed_shards
    x = read_all(dest, channels=1)
    np.testing.assert_allclose(x["camera"].numpy(), signed(photos["camera"]), atol=1e-6)
    # Pillow's convert("L"): L = (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16, ITU-R 601 in 16-bit fixed point.
    lum = np.asarray(Image.fromarray(photos["astronaut"]).convert("L"))
    np.testing.assert_allclose(x["astronaut"].numpy(), signed(lum), atol=1e-6)
    # ... within one level of the real-valued formula 0.299 R + 0.587 G + 0.114 B (independent check).
    rgb = photos["astronaut"].astype(np.float64)
    formula = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs((x["astronaut"].numpy()[0] + 1.0) * 127.5 - formula).max() <= 1.0


def test_rgb_reading_is_unchanged(mixed_shards):
    dest, photos = mixed_shards
    x = read_all(dest, channels=3)
    np.testing.assert_allclose(x["camera"].numpy(), signed(np.dstack([photos["camera"]] * 3)), atol=1e-6)
    np.testing.assert_allclose(x["astronaut"].numpy(), signed(photos["astronaut"]), atol=1e-6)
    default = make_eval_loader(str(dest), "train", image_size=SIZE, batch_size=8, num_workers=0)
    explicit = make_eval_loader(str(dest), "train", image_size=SIZE, batch_size=8, num_workers=0, channels=3)
    assert torch.equal(next(iter(default))[0], next(iter(explicit))[0])


def test_large_jpeg_is_drafted_in_both_modes_and_grey_is_its_luminance(mixed_shards):
    dest, _photos = mixed_shards
    data = (dest.parent / "src" / "coffee" / "coffee.jpeg").read_bytes()
    for mode in ("L", "RGB"):
        img = decode_image(data, mode, min_size=SIZE)
        assert img.mode == mode and img.size == (SIZE, SIZE)  # 96 px decoded at 1/4 DCT scale
    grey, rgb = read_all(dest, channels=1)["coffee"], read_all(dest, channels=3)["coffee"]
    # The grey decode is convert("L") of the RGB decode; both are then resized by the same (linear)
    # bicubic filter, so the grey sample is the RGB sample's luminance up to rounding to 8 bits.
    lum = torch.einsum("c,chw->hw", torch.tensor([0.299, 0.587, 0.114]), rgb)
    assert (grey[0] - lum).abs().max().item() <= 2.0 / 127.5


def test_grey_training_stream_flips_and_dequantises(mixed_shards):
    dest, _ = mixed_shards
    loader = make_train_loader(str(dest), image_size=16, batch_size=3, steps_per_epoch=2, num_workers=0,
                               channels=1, dequantize=True)
    batches = list(loader)
    assert len(batches) == 2 and all(x.shape == (3, 1, 16, 16) for x, _ in batches)
    x = batches[0][0]
    levels = torch.floor((x + 1.0) * 127.5 + 1e-4)  # the 8-bit level each value was dequantised from
    noise = x - (levels / 127.5 - 1.0)
    assert noise.min() >= -1e-6 and noise.max() < DEQUANTIZE_SCALE and noise.std() > DEQUANTIZE_SCALE / 5
    png = io.BytesIO()
    Image.fromarray(crop(real_photo("camera"), 0, 0, 20, 20)).save(png, format="PNG")
    clean = ImageTransform(20, channels=1)(png.getvalue())
    gen = torch.Generator().manual_seed(0)
    flips = [ImageTransform(20, flip=True, channels=1)(png.getvalue(), gen) for _ in range(20)]
    assert all(torch.equal(f, clean) or torch.equal(f, clean.flip(-1)) for f in flips)
    assert any(torch.equal(f, clean.flip(-1)) for f in flips)


@pytest.mark.parametrize("channels", [0, 2, 4, "1"])
def test_bad_channels_fail_with_the_value(mixed_shards, channels):
    dest, _ = mixed_shards
    message = rf"channels must be 1 \(grey\) or 3 \(RGB\), got {channels!r}"
    with pytest.raises(ValueError, match=message):
        ImageTransform(SIZE, channels=channels)
    with pytest.raises(ValueError, match=message):
        make_eval_loader(str(dest), "train", image_size=SIZE, batch_size=2, num_workers=0, channels=channels)
    with pytest.raises(ValueError, match=message):
        make_train_loader(str(dest), image_size=SIZE, batch_size=2, steps_per_epoch=1, num_workers=0,
                          channels=channels)


@pytest.mark.skipif(find_fashion_mnist() is None,
                    reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it as root)")
def test_fashion_mnist_shards_read_as_grey_are_the_idx_pixels(tmp_path):
    source = FashionMNISTSource()
    plan = plan_shards(source, shard_maxcount=16, splits=["val"], max_per_split=40)
    shard_source(plan, Destination(str(tmp_path)))
    idx = read_idx(str(next(Path(source.directory).glob("t10k-images-idx3-ubyte*"))))  # (10000, 28, 28)
    seen = 0
    for channels in (1, 3):
        for x, _, keys in make_eval_loader(str(tmp_path), "val", image_size=28, batch_size=16, num_workers=0,
                                           with_keys=True, channels=channels):
            assert x.shape[1:] == (channels, 28, 28)
            for key, xi in zip(keys, x):
                expected = signed(idx[int(key.rsplit("_", 1)[1])])  # key fmnist_val_<index>
                np.testing.assert_allclose(xi.numpy(), np.repeat(expected, channels, axis=0), atol=1e-6)
                seen += 1
    assert seen == 2 * 40
