"""Image validation and conversion at shard time, checked against numpy computations on real photos."""
from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sharding.images import ImageOptions, RejectedImage, prepare_image
from tests.sharding.shardtest_helpers import crop, real_photo


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def png_rgb16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one): IHDR, IDAT, IEND."""
    h, w, _ = arr.shape

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter type 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return crop(real_photo("astronaut"), 0, 100, 60, 80)


def test_rgb_jpeg_and_png_keep_their_bytes(astronaut):
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
        data = encode(Image.fromarray(astronaut), fmt)
        out = prepare_image(data, ImageOptions())
        assert out.data == data and out.ext == ext and not out.converted
        assert (out.width, out.height) == (80, 60)


def test_grayscale_stays_single_channel_and_exact():
    gray = crop(real_photo("camera"), 100, 100, 40, 50)
    out = prepare_image(encode(Image.fromarray(gray), "PNG"), ImageOptions())
    assert not out.converted
    np.testing.assert_array_equal(decode(out.data), gray)


def test_png_with_another_extension_is_stored_as_png(astronaut):
    # ImageNet ships a PNG named *.JPEG; the stored extension follows the bytes, not the name.
    out = prepare_image(encode(Image.fromarray(astronaut), "PNG"), ImageOptions())
    assert out.ext == "png"


def test_16bit_grayscale_is_rounded_v_over_257():
    v = (real_photo("camera")[:32, :48].astype(np.uint32) * 257 + np.arange(48) * 3).clip(0, 65535).astype(np.uint16)
    out = prepare_image(encode(Image.fromarray(v), "PNG"), ImageOptions())
    assert out.converted and out.ext == "png"
    expected = np.clip(np.rint(v.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(decode(out.data), expected)


def test_16bit_rgb_png_becomes_8bit_rgb(astronaut):
    v16 = astronaut.astype(np.uint16) * 257 + 100  # high byte = original value
    out = prepare_image(png_rgb16(v16), ImageOptions())
    got = decode(out.data)
    assert got.shape == astronaut.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - astronaut.astype(int)).max() <= 1


def test_rgba_is_composited_over_white(astronaut):
    alpha = np.tile(np.linspace(0, 255, astronaut.shape[1]).astype(np.uint8), (astronaut.shape[0], 1))
    rgba = np.dstack([astronaut, alpha])
    out = prepare_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), ImageOptions())
    a = alpha[..., None].astype(np.float64) / 255.0
    expected = a * astronaut + (1 - a) * 255.0  # c' = a·c + (1 − a)·255
    got = decode(out.data)
    assert got.shape == astronaut.shape
    assert np.abs(got - expected).max() <= 1.0  # Pillow's integer rounding


def test_palette_with_and_without_transparency(astronaut):
    pal = Image.fromarray(astronaut).quantize(colors=32)
    rgb_of_pal = np.asarray(pal.convert("RGB"))
    out = prepare_image(encode(pal, "PNG"), ImageOptions())
    np.testing.assert_array_equal(decode(out.data), rgb_of_pal)
    index = np.asarray(pal)
    pal.info["transparency"] = int(index[0, 0])
    out_t = prepare_image(encode(pal, "PNG", transparency=int(index[0, 0])), ImageOptions())
    got = decode(out_t.data)
    transparent = index == index[0, 0]
    assert (got[transparent] == 255).all()  # transparent pixels -> white
    np.testing.assert_array_equal(got[~transparent], rgb_of_pal[~transparent])


def test_la_and_one_bit_modes():
    gray = crop(real_photo("camera"), 0, 0, 20, 30)
    la = Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA")
    out = prepare_image(encode(la, "PNG"), ImageOptions())
    got = decode(out.data)
    np.testing.assert_array_equal(got, np.dstack([gray] * 3))  # opaque: grey replicated to RGB
    one_bit = Image.fromarray(gray > 128)
    out1 = prepare_image(encode(one_bit, "PNG"), ImageOptions())
    np.testing.assert_array_equal(decode(out1.data), np.where(gray > 128, 255, 0))


def test_cmyk_jpeg_is_converted_to_rgb(astronaut):
    cmyk = Image.fromarray(astronaut).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    out = prepare_image(data, ImageOptions())
    assert out.converted and out.ext == "jpg"
    got = decode(out.data)
    assert got.shape == astronaut.shape
    # Two JPEG generations (CMYK at q95, RGB at q90): small mean error against the original photo.
    assert np.abs(got.astype(float) - astronaut).mean() < 6.0


def test_resize_at_shard_sets_shorter_side(astronaut):
    data = encode(Image.fromarray(astronaut), "PNG")  # 80 x 60
    out = prepare_image(data, ImageOptions(resize=30, quality=85))
    assert (out.width, out.height, out.ext) == (40, 30, "jpg")
    assert decode(out.data).shape == (30, 40, 3)
    small = prepare_image(data, ImageOptions(resize=100))  # never upsampled: original bytes kept
    assert small.data == data


def test_resize_of_a_large_jpeg_keeps_the_files_aspect_ratio():
    photo = Image.fromarray(real_photo("rocket")).resize((500, 375))  # ImageNet-like
    data = encode(photo, "JPEG", quality=90)
    out = prepare_image(data, ImageOptions(resize=100))  # decoded at 1/2 scale (250x188), then resized
    assert (out.width, out.height) == (133, 100) and decode(out.data).shape == (100, 133, 3)
    direct = np.asarray(photo.resize((133, 100), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(decode(out.data).astype(float) - direct).mean() < 4.0  # same picture, two JPEG generations


def test_reencoding_is_deterministic(astronaut):
    data = encode(Image.fromarray(astronaut).convert("CMYK"), "JPEG")
    a, b = (prepare_image(data, ImageOptions(resize=32)) for _ in range(2))
    assert hashlib.sha256(a.data).digest() == hashlib.sha256(b.data).digest()


@pytest.mark.parametrize("name,make,reason", [
    ("zero bytes", lambda full: b"", "empty file"),
    ("truncated jpeg", lambda full: full[: len(full) // 2], "corrupt or truncated"),
    ("not an image", lambda full: b"%PDF-1.4 this is not an image\n" * 20, "not an image"),
])
def test_broken_files_are_rejected(astronaut, name, make, reason):
    full = encode(Image.fromarray(astronaut), "JPEG")
    with pytest.raises(RejectedImage) as info:
        prepare_image(make(full), ImageOptions())
    assert reason in info.value.reason


def test_decompression_bomb_is_rejected():
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")  # 400 Mpixel, a few kB of PNG
    with pytest.raises(RejectedImage) as info:
        prepare_image(bomb, ImageOptions())
    assert info.value.reason.startswith("decompression bomb")
    with pytest.raises(RejectedImage, match="max_pixels 1000"):
        prepare_image(encode(Image.new("L", (50, 50)), "PNG"), ImageOptions(max_pixels=1000))


def test_bad_options_fail_with_the_value():
    with pytest.raises(ValueError, match="quality"):
        ImageOptions(quality=0)
    with pytest.raises(ValueError, match="resize"):
        ImageOptions(resize=2)
