"""Sharding and streaming throughput on full-size JPEGs; prints a markdown table (asserts nothing).

    python benchmarks/sharding_bench.py --out results.md                  # GPU machine: all cores
    python benchmarks/sharding_bench.py --num-images 300 --workers 2      # a laptop, small

What it measures, on the same synthetic ImageNet-like folder (JPEGs of 500×375 / 375×500 made by
cropping and resizing the real photos bundled with scikit-image and scikit-learn, quality 90):

1. sharding: `shard_source` with original bytes (decode once to validate) and with resize-at-shard
   (shorter side --resize, JPEG q90): images/s, source MB/s, shard MB written;
2. streaming read + decode + CTRL transforms (centre crop, resize to --image-size, flip, [−1, 1]) to
   batches, per loader worker process ("per core"):
   - the WebDataset training stream (`make_train_loader`) over both shard sets,
   - the usual baseline: torchvision.datasets.ImageFolder + DataLoader over the JPEG files with
     Resize + CenterCrop + ToTensor + Normalize (or, when torchvision does not import, a plain
     torch Dataset doing the same: PIL open + convert("RGB") + the same crop/resize/scale),
   all with the same number of worker processes and batch size.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.images import ImageOptions
from sharding.plan import plan_shards
from sharding.sources import ImageFolderSource, load_photo
from sharding.storage import Destination
from sharding.stream import SAMPLE_SHUFFLE_SIZE, make_train_loader
from sharding.transforms import center_crop_resize, to_signed_unit
from sharding.write import shard_source

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower", "hubble_deep_field",
          "immunohistochemistry")
FULL_SIZE = (500, 375)  # the typical ImageNet photo (w, h); every third image is portrait
JPEG_QUALITY = 90
BATCH_SIZE = 64


# ----------------------------------------------------------------------------------------------
# Synthetic ImageNet-like folder
# ----------------------------------------------------------------------------------------------
def _make_image(args: tuple[Path, int, int]) -> int:
    """One 500×375 (or 375×500) JPEG: a random 4:3 crop of a bundled photo, resized; returns bytes."""
    root, index, seed = args
    rng = np.random.default_rng([seed, index])
    name = PHOTOS[index % len(PHOTOS)]
    photo = load_photo(name)
    if photo.ndim == 2:
        photo = np.dstack([photo] * 3)
    w_out, h_out = FULL_SIZE if index % 3 else FULL_SIZE[::-1]
    h, w = photo.shape[:2]
    scale = rng.uniform(0.5, 1.0) * min(h / h_out, w / w_out)
    ch, cw = int(h_out * scale), int(w_out * scale)
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((w_out, h_out), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    path = root / name / f"{name}_{index:06d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def make_folder(root: Path, n: int, workers: int, seed: int = 0) -> int:
    with cf.ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_make_image, [(root, i, seed) for i in range(n)], chunksize=32))


# ----------------------------------------------------------------------------------------------
# Baseline: ImageFolder + DataLoader
# ----------------------------------------------------------------------------------------------
class FolderDataset(torch.utils.data.Dataset):
    """What torchvision's ImageFolder + the CTRL transforms do, without torchvision:
    PIL open + convert("RGB") (full decode), centre crop, resize, flip, scale to [−1, 1]."""

    def __init__(self, root: Path, image_size: int):
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.files = [(p, c) for c, name in enumerate(self.classes) for p in sorted((root / name).iterdir())]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return torch.from_numpy(to_signed_unit(center_crop_resize(img, self.image_size), torch.rand(()) < 0.5)), label


def baseline_dataset(root: Path, image_size: int):
    """torchvision.datasets.ImageFolder when torchvision imports, else FolderDataset."""
    try:
        import torchvision.datasets as tvd
        import torchvision.transforms as T
    except Exception:  # any import failure (missing, or built against another torch)
        return FolderDataset(root, image_size), "Dataset over files (PIL, torchvision not importable)"
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.RandomHorizontalFlip(),
                           T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    return tvd.ImageFolder(str(root), transform=transform), "torchvision ImageFolder + DataLoader"


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------
def timed_batches(loader, max_batches: int, warmup: int) -> tuple[int, float]:
    """Images and seconds after the first `warmup` batches (one per worker: start-up excluded)."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start, images = time.perf_counter(), 0
    for i, (x, _) in enumerate(it):
        images += x.shape[0]
        if i + 1 + warmup >= max_batches:
            break
    return images, time.perf_counter() - start


def bench_sharding(folder: Path, out: Path, options: ImageOptions, workers: int, num_images: int) -> dict:
    start = time.perf_counter()
    maxcount = max(50, num_images // (4 * workers))  # about 4 shards per worker process
    plan = plan_shards(ImageFolderSource(folder), shard_maxcount=maxcount, image_options=options)
    manifest, report = shard_source(plan, Destination(str(out)), workers=workers)
    seconds = time.perf_counter() - start
    source_bytes = sum(it.size for s in plan.shards for it in s.items)
    n = manifest.num_samples("train")
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "mb_per_s": source_bytes / 1e6 / seconds,
            "shard_mb": report.bytes / 1e6}


def bench_stream(shards: Path, image_size: int, workers: int, batches: int) -> dict:
    """Steady state of the training stream: the warm-up lets every worker fill its shuffle buffer (until
    then each yielded sample reads two from the tar, see wds.shuffle), as it has after the first
    minute of a real run; the resampled stream then runs for `batches` more."""
    warmup = max(1, workers) * -(-SAMPLE_SHUFFLE_SIZE // BATCH_SIZE)
    loader = make_train_loader(str(shards), image_size=image_size, batch_size=BATCH_SIZE,
                               steps_per_epoch=warmup + batches, num_workers=workers, seed=0, rank=0, world_size=1,
                               flip=True)
    images, seconds = timed_batches(loader, warmup + batches, warmup=warmup)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def bench_baseline(folder: Path, image_size: int, workers: int, batches: int) -> tuple[dict, str]:
    dataset, label = baseline_dataset(folder, image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)
    images, seconds = timed_batches(loader, min(batches, len(loader)), warmup=max(1, workers))
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}, label


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=8000, help="synthetic JPEGs (default %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for sharding and loader workers (default: all cores)")
    parser.add_argument("--image-size", type=int, default=128, help="training resolution (default %(default)s)")
    parser.add_argument("--resize", default="128,144",
                        help="resize-at-shard shorter sides, comma-separated (default %(default)s: the training "
                             "resolution itself, and a margin above it)")
    parser.add_argument("--workdir", default=None, help="where to build the data (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        source_mb = make_folder(root / "jpeg", args.num_images, args.workers) / 1e6
        synth_s = time.perf_counter() - t0
        keep = bench_sharding(root / "jpeg", root / "keep", ImageOptions(), args.workers, args.num_images)
        sizes = [int(v) for v in args.resize.split(",") if v]
        small = {r: bench_sharding(root / "jpeg", root / f"small{r}", ImageOptions(resize=r), args.workers,
                                   args.num_images) for r in sizes}
        batches = max(args.workers + 2, args.num_images // BATCH_SIZE)
        base, base_label = bench_baseline(root / "jpeg", args.image_size, args.workers, batches)
        wds_keep = bench_stream(root / "keep", args.image_size, args.workers, batches)
        wds_small = {r: bench_stream(root / f"small{r}", args.image_size, args.workers, batches) for r in sizes}

    w = args.workers
    shard_rows = [
        ["original bytes (validated)", f"{keep['images']}", f"{keep['seconds']:.1f}", f"{keep['images_per_s']:.0f}",
         f"{keep['mb_per_s']:.1f}", f"{keep['shard_mb']:.0f}", f"{keep['images_per_s'] / w:.0f}"],
    ] + [[f"resize-at-shard {size}px q90", f"{r['images']}", f"{r['seconds']:.1f}", f"{r['images_per_s']:.0f}",
           f"{r['mb_per_s']:.1f}", f"{r['shard_mb']:.0f}", f"{r['images_per_s'] / w:.0f}"] for size, r in small.items()]
    stream_rows = []
    readers = [(base_label + " (JPEG files)", base), ("WebDataset stream, original-bytes shards", wds_keep)]
    readers += [(f"WebDataset stream, {size}px shards", r) for size, r in wds_small.items()]
    for label, r in readers:
        stream_rows.append([label, f"{r['images']}", f"{r['seconds']:.2f}", f"{r['images_per_s']:.0f}",
                            f"{r['images_per_s'] / w:.0f}", f"{r['images_per_s'] / base['images_per_s']:.2f}x"])
    report = "\n".join([
        "# Sharding and streaming throughput",
        "",
        f"{platform.node()}: {os.cpu_count()} CPU cores, {w} worker processes; Python {platform.python_version()}, "
        f"torch {torch.__version__}, Pillow {PIL.__version__}. {args.num_images} synthetic JPEGs "
        f"({FULL_SIZE[0]}×{FULL_SIZE[1]}, q{JPEG_QUALITY}, {source_mb:.0f} MB, built in {synth_s:.1f} s) "
        f"from the photos bundled with scikit-image / scikit-learn; training resolution {args.image_size}px, "
        f"batch {BATCH_SIZE}. Load average (1 min) before the run: {load_before:.1f} "
        "(other processes on the machine skew every number).",
        "",
        "## Sharding (`shard_source`: listing, plan, worker start-up, writing, manifest)",
        "",
        table(shard_rows, ["variant", "images", "s", "images/s", "source MB/s", "shard MB", "images/s per core"]),
        "",
        "## Streaming read + decode + transforms to batches",
        "",
        "Baseline: after the first batch of each worker. Streams: after every worker filled its shuffle "
        f"buffer ({SAMPLE_SHUFFLE_SIZE} samples), i.e. the steady state of a training run.",
        "",
        table(stream_rows, ["reader", "images", "s", "images/s", "images/s per core", "vs baseline"]),
        "",
    ])
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
