"""Helpers for the sharding tests: real photos from scikit-image / scikit-learn written as image
files, and the real command line in a subprocess. (Imported by conftest.py and the test modules.)"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def real_photo(name: str) -> np.ndarray:
    """uint8 (h, w, 3) or (h, w): loaded with the libraries' own loaders (independent of sharding/)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


def crop(arr: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    return np.ascontiguousarray(arr[y:y + h, x:x + w])


def save(path: Path, arr_or_image, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    im.save(path, format=fmt, **kw)
    return path


PHOTO_CLASSES = ("astronaut", "chelsea", "coffee")


def build_photo_folder(root: Path, per_class: int = 4) -> dict[str, list[Path]]:
    """ROOT/<photo>/<photo>_<i>.(jpg|png): crops of three real photos, mixed sizes and formats."""
    files: dict[str, list[Path]] = {}
    for c, name in enumerate(PHOTO_CLASSES):
        arr = real_photo(name)
        for i in range(per_class):
            h, w = 48 + 8 * i, 64 + 4 * c  # landscape crops of different sizes
            part = crop(arr, 10 * i, 12 * c, h, w)
            fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
            files.setdefault(name, []).append(save(root / name / f"{name}_{i}.{ext}", part, fmt, quality=92)
                                              if fmt == "JPEG" else save(root / name / f"{name}_{i}.{ext}", part, fmt))
    return files


def run_cli(*args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a subprocess (the real entry point), output captured."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=full_env)
