"""Image files as a model's input, prepared exactly as training prepared its shards.

A file becomes what `cscctrl shard` stores (sharding/images.py ``prepare_image``, without --resize: odd modes
converted to 8-bit RGB or grey, alpha composited over white; broken files refused with a reason), then what
the shard reader yields (sharding/transforms.py ``ImageTransform``: decoded to the model's channels, the
centre square crop resized to image_size, x = pixel / 127.5 − 1). Any size and aspect works.

Listing (``list_images``): a single image file, or every image file under a folder, recursively, in path
order, with sharding/sources.py's rules (extensions .jpg .jpeg .png .bmp .gif .webp .tif .tiff .ppm .pgm
.pbm; hidden entries skipped; unreadable entries listed with their reason). A file's key is its path
relative to the folder; its label name is its first folder below the root ('' for a file at the top).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sharding.images import ImageOptions, RejectedImage, prepare_image
from sharding.sources import IMAGE_EXTENSIONS, scan_images
from sharding.transforms import ImageTransform


@dataclass(frozen=True)
class ImageFile:
    path: Path
    key: str          # path relative to the listed folder (the file's name for a single file)
    label_name: str   # first folder below the root, '' at the top


def list_images(root: str | Path) -> tuple[list[ImageFile], list[tuple[str, str]]]:
    """(image files, [(relative path, why it is left out)]) of a folder or a single image file."""
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{root} is not an image file (extensions: {' '.join(sorted(IMAGE_EXTENSIONS))})")
        return [ImageFile(root.resolve(), root.name, "")], []
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or folder")
    found, bad = scan_images(root, root)
    files = [ImageFile((root / rel).resolve(), rel, rel.split("/", 1)[0] if "/" in rel else "") for rel, _ in found]
    return files, bad


def load_image(path: Path, image_size: int, channels: int) -> Tensor:
    """One file as a (channels, image_size, image_size) float32 tensor in [-1, 1] (module docstring).
    Raises sharding.images.RejectedImage with the reason for a file that cannot be used."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise RejectedImage(f"cannot read file: {e.strerror or e}") from e
    prepared = prepare_image(data, ImageOptions())
    return ImageTransform(image_size, channels=channels)(prepared.data)


class ImageFileDataset(torch.utils.data.Dataset):
    """Item i: (x or None, i, reason): the loaded image, or None and why it was refused."""

    def __init__(self, files: list[ImageFile], image_size: int, channels: int) -> None:
        self.files, self.image_size, self.channels = files, image_size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        try:
            return load_image(self.files[i].path, self.image_size, self.channels), i, ""
        except RejectedImage as e:
            return None, i, e.reason


def _collate(items: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, list[int], list[tuple[int, str]]]:
    good = [(x, i) for x, i, _ in items if x is not None]
    refused = [(i, why) for x, i, why in items if x is None]
    x = torch.from_numpy(np.stack([t.numpy() for t, _ in good])) if good else None
    return x, [i for _, i in good], refused


def image_batches(files: list[ImageFile], image_size: int, channels: int, batch_size: int,
                  workers: int = 0) -> Iterator[tuple[Tensor | None, list[int], list[tuple[int, str]]]]:
    """Batches in file order: (x (b, C, S, S) or None when every file of the batch was refused, the indices
    into ``files`` of its rows, [(index, reason)] of the refused files). ``workers`` loader processes."""
    loader = torch.utils.data.DataLoader(ImageFileDataset(files, image_size, channels), batch_size=batch_size,
                                         shuffle=False, num_workers=workers, collate_fn=_collate)
    yield from loader
