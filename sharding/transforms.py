"""Image transforms of the reader: CTRL's ImageNet preprocessing (docs/method.md §3), nothing else.

    img = decode(bytes) -> mode           C = channels: 3 -> "RGB" (grey replicated to 3 equal channels),
                                          1 -> "L" (grey stays grey; colour becomes its ITU-R 601 luminance
                                          L = R·299/1000 + G·587/1000 + B·114/1000, Pillow's convert("L"));
                                          JPEGs decoded at a reduced DCT scale when much larger than needed
                                          (Pillow's draft)
    img = centre_crop(img)                square of side s = min(w, h), offset round((w − s)/2), round((h − s)/2)
    img = resize(img, image_size)         bicubic, antialiased (one Pillow call with the crop box)
    x   = img / 127.5 − 1                 [0, 255] -> [−1, 1], shape (C, H, W), float32
    x   = flip(x) with probability ½      (training, optional)
    x   = x + u / 128,  u ~ U[0, 1)       (training, optional dequantisation noise; x may reach 1 + 1/128)

The conversion to "L" comes before the crop and resize, so with channels=1 a colour image gives exactly
convert("L") of its RGB decode, cropped and resized.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from sharding.images import DEFAULT_MAX_PIXELS

DEQUANTIZE_SCALE = 1.0 / 128.0  # noise U[0, 1)/128: one quantisation step of [−1, 1] is 2/255 ≈ 1/128


CHANNEL_MODES = {1: "L", 3: "RGB"}  # image channels C -> the Pillow mode the reader decodes to


def decode_image(data: bytes, mode: str = "RGB", min_size: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to a Pillow image of `mode` ("RGB": grey -> 3 equal channels; "L": colour ->
    ITU-R 601 luminance, Pillow's convert("L")).

    min_size: lets JPEG decoding skip resolution it does not need (both sides stay >= min_size). The
    draft only picks the DCT scale, never the colour space: libjpeg's own grey output (its Y plane)
    differs from convert("L") of the RGB decode by up to one level, so "L" is converted here too.
    Raises ValueError for images over `max_pixels` (a tampered shard must not exhaust memory).
    """
    if mode not in CHANNEL_MODES.values():
        raise ValueError(f"mode must be one of {sorted(CHANNEL_MODES.values())}, got {mode!r}")
    img: Image.Image = Image.open(io.BytesIO(data))
    if img.width * img.height > max_pixels:
        raise ValueError(f"image of {img.width}x{img.height} pixels exceeds max_pixels {max_pixels}")
    if min_size is not None and img.format == "JPEG":
        img.draft(img.mode, (min_size, min_size))  # the stored mode: a scale change only
    if img.mode != mode:
        img = img.convert(mode)
    return img


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop of side min(w, h), resized to size × size (bicubic, antialiased)."""
    w, h = img.size
    s = min(w, h)
    left, top = round((w - s) / 2.0), round((h - s) / 2.0)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s))


def to_signed_unit(img: Image.Image, flip: bool = False) -> np.ndarray:
    """x = pixel / 127.5 − 1: uint8 (H, W, 3) ("RGB") or (H, W) ("L") -> float32 (C, H, W) in [−1, 1],
    C = 3 or 1; mirrored when `flip`.

    Per-image arithmetic runs in numpy: on arrays this small torch's intra-op thread pool only adds
    overhead (10x slower on a busy 2-core machine when the loader runs in the main process).
    """
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]  # "L": (H, W) -> (H, W, 1)
    if arr.ndim != 3 or arr.shape[2] not in CHANNEL_MODES:
        raise ValueError(f"expected an RGB image (H, W, 3) or a grey one (H, W), got array shape {arr.shape}")
    if flip:
        arr = arr[:, ::-1]
    x = np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)
    x /= 127.5
    x -= 1.0
    return x


@dataclass(frozen=True)
class ImageTransform:
    """bytes -> (channels, image_size, image_size) float32 tensor, per the module docstring.

    channels: 3 (RGB) or 1 (grey: Pillow mode "L"); models.config.ModelConfig.in_channels.
    """

    image_size: int
    flip: bool = False
    dequantize: bool = False
    channels: int = 3

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 pixel, got {self.image_size}")
        if self.channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {self.channels!r}")

    @property
    def mode(self) -> str:
        """The Pillow mode images are decoded to: "L" for channels=1, "RGB" for channels=3."""
        return CHANNEL_MODES[self.channels]

    def __call__(self, data: bytes, generator: torch.Generator | None = None) -> torch.Tensor:
        img = center_crop_resize(decode_image(data, self.mode, self.image_size), self.image_size)
        flip = self.flip and torch.rand((), generator=generator).item() < 0.5
        x = to_signed_unit(img, flip)
        if self.dequantize:
            x += torch.rand(x.shape, generator=generator).numpy() * np.float32(DEQUANTIZE_SCALE)
        return torch.from_numpy(x)
