"""Validate, convert and (optionally) shrink one image before it goes into a shard.

Every image is decoded once at shard time, so broken files are rejected here instead of in the middle
of a training run. What is stored:

    8-bit RGB or grayscale JPEG/PNG, no resize needed   -> the original bytes, untouched
    CMYK, palette, alpha, 16-bit, 1-bit, other formats   -> converted, then re-encoded:
                                                            PNG for lossless sources, JPEG otherwise
    --resize S (shorter side > S)                        -> shorter side resized to S, JPEG(quality);
                                                            JPEGs first decoded at 1/2, 1/4 or 1/8 scale
                                                            in the DCT domain when that stays >= S

Conversions (all to 8 bits per channel):
    16-bit grey  v ∈ [0, 65535]  ->  round(v / 257) ∈ [0, 255]    (65535 / 255 = 257 exactly)
    alpha (RGBA, LA, P + transparency)  ->  composited over white: c' = a·c + (1 − a)·255, a ∈ [0, 1]
    CMYK, YCbCr, LAB, HSV, palette      ->  RGB through PIL's converters
Grayscale stays single-channel in the shard (a third of the bytes); the reader decodes it to the model's
channels (replicated to RGB, or kept grey for model.in_channels = 1).
EXIF orientation is not applied (as torchvision's ImageFolder does not apply it).

Encoding is deterministic for a given Pillow/libjpeg/zlib build: no timestamps, fixed quality and
subsampling, so a re-run writes the same bytes.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (≈ 0.25 GiB of RGBA)
DEFAULT_QUALITY = 90  # JPEG quality of re-encoded images
JPEG_SUBSAMPLING = 0  # 4:4:4 chroma; fixed so the bytes do not depend on Pillow's default
LOSSLESS_FORMATS = frozenset({"PNG", "GIF", "BMP", "TIFF", "PPM", "WEBP", "TGA", "ICO"})
# formats stored as-is when no conversion is needed
KEPT_FORMATS: dict[str, Literal["jpg", "png"]] = {"JPEG": "jpg", "PNG": "png"}


class RejectedImage(Exception):
    """The file cannot become a training sample; ``reason`` goes into the manifest's rejected table."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored in the shards.

    resize: target shorter side in pixels, or None to keep the original resolution.
    quality: JPEG quality (1-95) of re-encoded images.
    max_pixels: images with more pixels are rejected (decompression-bomb guard).
    """

    resize: int | None = None
    quality: int = DEFAULT_QUALITY
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.resize is not None and not (8 <= self.resize <= 16384):
            raise ValueError(f"resize must be a shorter side in [8, 16384] pixels or None, got {self.resize}")
        if not 1 <= self.quality <= 95:
            raise ValueError(f"quality must be in [1, 95] (JPEG), got {self.quality}")
        if self.max_pixels < 64:
            raise ValueError(f"max_pixels must be >= 64, got {self.max_pixels}")


@dataclass(frozen=True)
class PreparedImage:
    """Bytes as stored in the shard; ``ext`` is the tar member extension ('jpg' or 'png')."""

    data: bytes
    ext: Literal["jpg", "png"]
    width: int
    height: int
    converted: bool  # True when the stored bytes differ from the source bytes


def _open_checked(data: bytes, max_pixels: int, draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open and decode `data` (every byte of it); raise RejectedImage with a readable reason on failure.

    draft_to: for JPEGs with a shorter side over draft_to, let libjpeg scale by 1/2, 1/4 or 1/8 in the
    DCT domain while both sides stay >= draft_to (the whole file is still read, so truncation is
    still detected). Returns the decoded image and the file's own (width, height).
    """
    if len(data) == 0:
        raise RejectedImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise RejectedImage(f"decompression bomb: {im.width}x{im.height} = {im.width * im.height} "
                                    f"pixels > max_pixels {max_pixels}")
            size = im.size
            if draft_to is not None and im.format == "JPEG" and im.mode in ("RGB", "L") and min(size) > draft_to:
                im.draft(im.mode, (draft_to, draft_to))
            im.load()
    except RejectedImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedImage(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise RejectedImage("not an image (no decoder recognises the bytes)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated data as OSError("image file is truncated ...") and broken
        # headers as SyntaxError/ValueError.
        raise RejectedImage(f"corrupt or truncated image: {exc}") from exc
    if im.width < 1 or im.height < 1:
        raise RejectedImage(f"degenerate size {im.width}x{im.height}")
    return im, size


def check_pillow_is_strict() -> None:
    """Validation relies on Pillow raising for truncated files; fail if that was switched off."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated "
                           "images would pass validation silently. Set it to False before sharding.")


def _composite_over_white(im: Image.Image) -> Image.Image:
    """c' = a·c + (1 − a)·255 per channel with a = alpha / 255 (PIL's alpha_composite)."""
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_8bit(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit 'L' (grey sources) or 'RGB' (everything else)."""
    mode = im.mode
    if mode in ("RGB", "L"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grey (and 32-bit 'I', which Pillow uses for some 16-bit files): round(v / 257).
        v = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8), mode="L")
    if mode == "F":
        raise RejectedImage("unsupported floating-point image (mode F): no defined 8-bit range")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_over_white(im)
    if mode == "P":
        if "transparency" in im.info:
            return _composite_over_white(im)
        return im.convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...


def resize_shorter_side(im: Image.Image, shorter: int, original_size: tuple[int, int] | None = None) -> Image.Image:
    """Resize so that min(w, h) = `shorter`, keeping the aspect ratio (bicubic, antialiased).

    Long side = round(long · shorter / short) of `original_size` (the file's size, when `im` was
    decoded at a reduced DCT scale), at least 1 pixel.
    """
    w, h = original_size or im.size
    scale = shorter / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.Resampling.BICUBIC)


def encode(im: Image.Image, fmt: Literal["jpg", "png"], quality: int) -> bytes:
    """Deterministic encoding: no metadata, fixed quality/subsampling/compression level."""
    buf = io.BytesIO()
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING, optimize=False)
    else:
        im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def prepare_image(data: bytes, options: ImageOptions) -> PreparedImage:
    """Validate `data` (one source file) and return what the shard stores; raise RejectedImage."""
    im, (width, height) = _open_checked(data, options.max_pixels, draft_to=options.resize)
    fmt = im.format or ""
    converted = to_8bit(im)
    resize_to = options.resize if options.resize is not None and min(width, height) > options.resize else None
    if resize_to is None and converted is im and fmt in KEPT_FORMATS:
        return PreparedImage(data, KEPT_FORMATS[fmt], width, height, converted=False)
    if resize_to is not None:
        out = resize_shorter_side(converted, resize_to, (width, height))
        ext: Literal["jpg", "png"] = "jpg"
    else:
        out = converted
        ext = "png" if fmt in LOSSLESS_FORMATS else "jpg"
    return PreparedImage(encode(out, ext, options.quality), ext, out.width, out.height, converted=True)
