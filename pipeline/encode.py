"""`cscctrl encode MODEL DATA OUT`: the features z = f(x) of a shard set or an image folder, as parquet.

One row per image read, written batch by batch (one parquet row group per batch):

    key                 string         the sample's key (shards), or its path relative to DATA (image folder)
    split               string         the shard split it came from; '' for an image folder
    label               int64 or null  its class index: the manifest's label (shards); for a folder, the index of
                                       label_name among the folder's sorted label names (null at the top level)
    label_name          string         the class name (the manifest's classes; the first folder below DATA)
    z                   float32[nz]    f(x), unit norm
    nonzero_stage1 …    float32        per CSC stage (input to output): the fraction of non-zero entries of
                                       that stage's code of this image (the per-image sparsity)

Order: a shard split after another (the manifest's order, or --split's), each in shard order; a folder in
path order. Images are prepared as training prepared them (pipeline/image_files.py for folders; the
shard reader's exact pass for shards), on the GPU when there is one (--device).

Nothing is lost silently: OUT is written as OUT.partial and renamed to OUT only when complete; image files
that cannot be read are listed in OUT.refused.csv with the reason; samples the manifest lists that could not
be read (damaged shards) are counted, named, and make the command exit 1 (--allow-lost-samples: 0). OUT is
never overwritten without --overwrite. The file's schema metadata names the model and the data.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.applied_model import MODEL_HELP, add_model_options, load_applied_model, pick_device
from pipeline.image_files import image_batches, list_images
from sharding.manifest import read_manifest
from sharding.stream import describe_losses, make_eval_loader

HELP_EPILOG = """\
examples:
  cscctrl encode models:/csc-ctrl-demo@candidate runs/demo/shards/fmnist features.parquet \\
      --tracking-uri sqlite:///$PWD/runs/demo/mlflow.db --split val
  cscctrl encode runs/ctrl-32px-multiclass-0123456789 ~/Pictures/garments garments.parquet
  python -c "import pandas as pd; print(pd.read_parquet('features.parquet').head())"

Columns: key, split, label, label_name, z (float32[nz], unit norm), nonzero_stage1..L (the fraction of
non-zero entries of each CSC stage's code of the image). Written as OUT.partial, renamed when complete.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = HELP_EPILOG
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("data", metavar="DATA", help="a shard set (a folder or URL holding manifest.json, written by "
                                                "`cscctrl shard`), or a folder of images (searched recursively; "
                                                "any size: centre-cropped and resized to the model's resolution)")
    p.add_argument("out", metavar="OUT", help="the parquet file to write (a local path)")
    p.add_argument("--split", default="", help="shard splits to encode, comma-separated (default: every split of "
                                               "the manifest, in its order); not for image folders")
    p.add_argument("--limit", type=int, default=0,
                   help="encode at most this many images per split (per folder) and stop: a quick look "
                        "(default 0 = all)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes decoding images beside the model (default 2; 0 = decode in this process)")
    add_model_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists (default: refuse)")
    p.add_argument("--allow-lost-samples", action="store_true",
                   help="exit 0 when samples the manifest lists could not be read (damaged shards); they are "
                        "still counted and named (default: exit 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class Batch:
    """One batch of images and what identifies each row."""

    x: Any                    # (b, C, S, S) float32 in [-1, 1]
    keys: list[str]
    split: str
    labels: list[int | None]
    label_names: list[str | None]


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.limit < 0 or args.workers < 0:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1, --limit {args.limit} and --workers "
                         f"{args.workers} >= 0")
    out = check_output(args.out, args.overwrite)
    source = open_data(args.data, args.split)
    model = load_applied_model(args.model, device=pick_device(args.device), tracking_uri=args.tracking_uri,
                               need_features=True)
    print(f"[cscctrl] encoding {source.describe()} with {model.description} on {model.device}", file=sys.stderr,
          flush=True)
    refused: list[tuple[str, str]] = []
    refused_csv = Path(f"{out}.refused.csv")
    refused_csv.unlink(missing_ok=True)  # belongs to OUT: an earlier run's list is not this one's
    try:
        rows = write_features(out, model, source.batches(model, args, refused), source.total(args.limit),
                              metadata={"cscctrl.model": model.description, "cscctrl.data": args.data},
                              progress=not args.no_progress)
    finally:
        if refused:
            write_refused(refused_csv, refused)
            print(f"[cscctrl] {len(refused)} file(s) could not be read and are not in {out.name}; they and the "
                  f"reasons are listed in {refused_csv}", file=sys.stderr)
    print(f"[cscctrl] wrote {rows} rows to {out}", flush=True)
    return source.finish(args)


def write_refused(path: Path, refused: list[tuple[str, str]]) -> None:
    """The files that could not be used, with the reason, as CSV (path, reason)."""
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "reason"), *refused])


def check_output(out: str, overwrite: bool) -> Path:
    if "://" in out:
        raise ValueError(f"OUT {out!r}: a local file path is needed (write it locally, then copy it)")
    path = Path(out).expanduser()
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(path))
    if path.exists() and not overwrite:
        raise ValueError(f"OUT {path} exists: pass --overwrite to replace it, or choose another path")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# The data: a shard set or an image folder
# ----------------------------------------------------------------------------------------------


def open_data(data: str, splits: str) -> Any:
    """A ShardData when DATA holds a manifest (a folder or URL), an ImageFolderData for a local folder
    without one, or a single image file."""
    local = Path(data).expanduser() if "://" not in data else None
    if local is not None and not local.exists():
        raise FileNotFoundError(2, "No such file or folder (DATA: a shard set or a folder of images)", str(local))
    if local is not None and (local.is_file() or not (local / "manifest.json").exists()):
        if splits:
            raise ValueError(f"--split {splits}: DATA {data} is a folder of images (no manifest.json), which has no "
                             f"splits")
        return ImageFolderData(data)
    manifest = read_manifest(data)  # a ManifestError names what is wrong with it
    chosen = [s.strip() for s in splits.split(",") if s.strip()] if splits else list(manifest.splits)
    unknown = [s for s in chosen if s not in manifest.splits]
    if unknown:
        raise ValueError(f"--split {','.join(unknown)}: not in {data} (splits: {', '.join(manifest.splits)})")
    return ShardData(data, manifest, chosen)


class ShardData:
    """Exact passes over splits of a shard set (every sample once), with the reader's sample accounting."""

    def __init__(self, url: str, manifest: Any, splits: list[str]) -> None:
        self.url, self.manifest, self.splits = url, manifest, splits
        self.names = {c.label: c.name for c in manifest.classes}
        self.accounts: dict[str, dict[str, Any]] = {}

    def describe(self) -> str:
        return f"{self.url} [{', '.join(self.splits)}]"

    def total(self, limit: int) -> int:
        counts = [self.manifest.num_samples(s) for s in self.splits]
        return sum(min(n, limit) if limit else n for n in counts)

    def batches(self, model: Any, args: argparse.Namespace, refused: list) -> Iterator[Batch]:
        for split in self.splits:
            if self.manifest.num_samples(split) == 0:
                continue
            loader = make_eval_loader(self.manifest, split, image_size=model.image_size, batch_size=args.batch_size,
                                      num_workers=args.workers, rank=0, world_size=1, with_keys=True,
                                      channels=model.in_channels, pin_memory=model.device.type == "cuda")
            read = 0
            for x, labels, keys in loader:
                if args.limit:
                    x, labels, keys = x[:args.limit - read], labels[:args.limit - read], keys[:args.limit - read]
                read += len(keys)
                label_list = [int(v) for v in labels.tolist()]
                yield Batch(x, list(keys), split, label_list, [self.names.get(v) for v in label_list])
                if args.limit and read >= args.limit:
                    break
            if not args.limit:
                self.accounts[split] = loader.account(read)

    def finish(self, args: argparse.Namespace) -> int:
        lost = {s: a for s, a in self.accounts.items() if a["lost"]}
        for split, account in lost.items():
            level = "WARNING" if args.allow_lost_samples else "error"
            print(f"cscctrl encode: {level}: {describe_losses(account, f'{self.url} [{split}]')}"
                  f"{'' if args.allow_lost_samples else ' (--allow-lost-samples accepts the incomplete file)'}",
                  file=sys.stderr)
        return 1 if lost and not args.allow_lost_samples else 0


class ImageFolderData:
    """Image files of a folder (or one file), in path order; unreadable ones are refused with a reason."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.files, self.unlisted = list_images(root)
        if not self.files:
            raise ValueError(f"DATA {root}: no image files in it ({len(self.unlisted)} unreadable entries)")
        names = sorted({f.label_name for f in self.files if f.label_name})
        self.label_of = {n: i for i, n in enumerate(names)}

    def describe(self) -> str:
        return f"{len(self.files)} image files under {self.root}"

    def total(self, limit: int) -> int:
        return min(len(self.files), limit) if limit else len(self.files)

    def batches(self, model: Any, args: argparse.Namespace, refused: list) -> Iterator[Batch]:
        refused.extend(self.unlisted)
        files = self.files[:args.limit] if args.limit else self.files
        for x, rows, bad in image_batches(files, model.image_size, model.in_channels, args.batch_size, args.workers):
            refused.extend((files[i].key, why) for i, why in bad)
            if x is None:
                continue
            chosen = [files[i] for i in rows]
            yield Batch(x, [f.key for f in chosen], "", [self.label_of.get(f.label_name) for f in chosen],
                        [f.label_name or None for f in chosen])

    def finish(self, args: argparse.Namespace) -> int:
        return 0


# ----------------------------------------------------------------------------------------------
# The parquet file
# ----------------------------------------------------------------------------------------------


def feature_table(batch: Batch, z: Any, nonzero: Any) -> Any:
    """The rows of one batch (module docstring's columns)."""
    import pyarrow as pa

    z = np.ascontiguousarray(z, dtype=np.float32)
    nonzero = np.ascontiguousarray(nonzero, dtype=np.float32)
    columns = {
        "key": pa.array(batch.keys, pa.string()),
        "split": pa.array([batch.split] * len(batch.keys), pa.string()),
        "label": pa.array(batch.labels, pa.int64()),
        "label_name": pa.array(batch.label_names, pa.string()),
        "z": pa.FixedSizeListArray.from_arrays(pa.array(z.ravel(), pa.float32()), z.shape[1]),
    }
    for stage in range(nonzero.shape[1]):
        columns[f"nonzero_stage{stage + 1}"] = pa.array(nonzero[:, stage], pa.float32())
    return pa.table(columns)


def write_features(out: Path, model: Any, batches: Iterator[Batch], total: int, metadata: dict[str, str],
                   progress: bool = True) -> int:
    """Encode every batch and append its rows to OUT.partial; rename it to OUT when all are written.
    Returns the number of rows. Raises ValueError when no image at all could be read."""
    import pyarrow.parquet as pq

    partial = Path(f"{out}.partial")
    writer = None
    rows = 0
    try:
        with tqdm(total=total, unit="img", desc="encode", disable=not progress, dynamic_ncols=True) as bar:
            for batch in batches:
                z, nonzero = model.features(batch.x)
                table = feature_table(batch, z.cpu().numpy(), nonzero.cpu().numpy())
                if writer is None:
                    meta = {**metadata, "cscctrl.columns": json.dumps(COLUMN_TEXT),
                            "cscctrl.image_size": str(model.image_size), "cscctrl.in_channels": str(model.in_channels)}
                    schema = table.schema.with_metadata(meta)
                    writer = pq.ParquetWriter(partial, schema, compression="zstd")
                writer.write_table(table.cast(writer.schema))
                rows += table.num_rows
                bar.update(table.num_rows)
    except BaseException:
        if writer is not None:
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    if writer is None:
        raise ValueError("no image could be read: nothing to encode (see the refused files)")
    writer.close()
    os.replace(partial, out)
    return rows


COLUMN_TEXT = {
    "key": "the sample's key (shards) or its path relative to DATA (image folder)",
    "split": "the shard split ('' for an image folder)",
    "label": "class index (null when unlabelled)",
    "label_name": "class name",
    "z": "f(x): the unit-norm feature vector",
    "nonzero_stageL": "fraction of non-zero entries of CSC stage L's code of the image",
}
