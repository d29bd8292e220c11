"""`cscctrl shard SOURCE DEST`: images -> WebDataset tar shards + parquet manifest.

SOURCE: a folder in the ImageNet layout (train/<wnid>/..., val/ + LOC_val_solution.csv), any
class-per-folder tree, or a named source: `demo` (crops of the photos bundled with scikit-image and
scikit-learn) or `fashion-mnist` (Debian package dataset-fashion-mnist).
DEST: a folder or fsspec URL (s3://bucket/prefix, gs://..., memory://...).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time

from sharding.fanout import shard_on_ray, write_report
from sharding.images import DEFAULT_MAX_PIXELS, DEFAULT_QUALITY, ImageOptions
from sharding.lock import DestLock
from sharding.plan import DEFAULT_SHARD_MAXCOUNT, DEFAULT_SHARD_MAXSIZE, parse_indices, plan_shards
from sharding.sources import DemoSource, SourceError, open_source
from sharding.storage import Destination, DestinationError
from sharding.write import collect_results, finalize, prepare_destination, write_shards

SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
DEFAULT_WORKERS = max(1, min(8, os.cpu_count() or 1))

EPILOG = """\
examples:
  cscctrl shard demo runs/shards/demo
  cscctrl shard /data/imagenet s3://bucket/imagenet-160 --resize 160 --quality 90 --workers 16
  cscctrl shard /data/imagenet /data/shards --shards 0:100   # only shard indices 0..99 (fan-out)
  cscctrl shard /data/imagenet s3://bucket/imagenet-160 --resize 160 --ray   # Ray tasks on every node

An interrupted run resumes when started again with the same arguments: finished shards are kept and
the result is byte-identical to an uninterrupted run.
"""


def parse_size(text: str) -> int:
    """'512MB' / '1GiB' / '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 512MB, 1GiB or 1000000, got {text!r}")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("source", metavar="SOURCE",
                        help="image folder (ImageNet layout auto-detected) or a named source: demo, fashion-mnist")
    parser.add_argument("dest", metavar="DEST", help="output folder or fsspec URL (s3://, gs://, memory://)")
    g = parser.add_argument_group("shards")
    g.add_argument("--shard-maxcount", type=int, default=DEFAULT_SHARD_MAXCOUNT, metavar="N",
                   help="samples per shard (default %(default)s)")
    g.add_argument("--shard-maxsize", type=parse_size, default=DEFAULT_SHARD_MAXSIZE, metavar="SIZE",
                   help="source bytes per shard, e.g. 256MB (default 512MiB)")
    g.add_argument("--splits", default=None, metavar="A,B",
                   help="comma-separated splits to shard (default: every split the source has)")
    g.add_argument("--max-per-split", type=int, default=None, metavar="N",
                   help="keep a seeded random subset of N samples per split")
    g.add_argument("--seed", type=int, default=0, help="seed of the class-mixed sample order (default 0)")
    g = parser.add_argument_group("images")
    g.add_argument("--resize", type=int, default=None, metavar="PIXELS",
                   help="resize so the shorter side is PIXELS and store JPEG (default: keep original bytes)")
    g.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                   help="JPEG quality of re-encoded images (default %(default)s)")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="reject larger images (decompression-bomb guard; default %(default)s)")
    g = parser.add_argument_group("run")
    g.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="processes writing whole shards in parallel (default %(default)s)")
    g.add_argument("--ray", action="store_true",
                   help="write as Ray tasks over disjoint shard ranges, spread over the nodes of the cluster named "
                        "by RAY_ADDRESS (else a local one); DEST must be shared storage on several nodes")
    g.add_argument("--tasks", type=int, default=0, metavar="N",
                   help="with --ray: Ray tasks (default 0: one per CPU of the cluster, at most one per shard)")
    g.add_argument("--shards", default=None, metavar="RANGE",
                   help="write only these shard indices: 0:100, 5, 1,4,7 (the manifest is written once all exist)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace shards of a different plan found in DEST (default: refuse)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = parser.add_argument_group("demo source")
    defaults = DemoSource()
    g.add_argument("--demo-train", type=int, default=defaults.counts["train"], help="crops (default %(default)s)")
    g.add_argument("--demo-val", type=int, default=defaults.counts["val"], help="crops (default %(default)s)")
    g.add_argument("--demo-unseen", type=int, default=defaults.counts["unseen"],
                   help="crops of photos not used for train/val (default %(default)s)")
    g.add_argument("--demo-size", type=int, default=defaults.size, help="crop side in pixels (default %(default)s)")


def _format_rejects(by_reason: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        dest = Destination(args.dest)
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        image_options = ImageOptions(resize=args.resize, quality=args.quality, max_pixels=args.max_pixels)
        source = open_source(args.source, seed=args.seed, train=args.demo_train, val=args.demo_val,
                             unseen=args.demo_unseen, size=args.demo_size) if args.source == "demo" \
            else open_source(args.source)
        dest.check_writable()
        plan = plan_shards(source, shard_maxcount=args.shard_maxcount, shard_maxsize=args.shard_maxsize,
                           seed=args.seed, image_options=image_options,
                           splits=args.splits.split(",") if args.splits else None,
                           max_per_split=args.max_per_split)
        indices = parse_indices(args.shards, len(plan.shards)) if args.shards else None
        if args.ray and (indices is not None or dest.is_memory):
            raise ValueError("--ray writes every shard of the plan to storage every node can reach: drop "
                             + ("--shards" if indices is not None else "--ray (memory:// lives in this process)"))
        with DestLock(dest, exclusive=indices is None):  # sharding/lock.py: one full job, or range jobs
            prepare_destination(plan, dest, overwrite=args.overwrite)
            if indices is None:
                dest.remove_stale_temporaries()
            if args.ray:
                start = time.perf_counter()
                results = shard_on_ray(plan, dest, args.tasks, progress=not args.no_progress)
                report = write_report(plan, dest, results, time.perf_counter() - start)
                print(f"cscctrl shard: {len(results)} Ray task(s) on {len({r['node'] for r in results})} node(s)")
            else:
                workers = 1 if dest.is_memory else args.workers
                report = write_shards(plan, dest, indices, workers=workers, progress=not args.no_progress)
            return _finish(plan, dest, report, remove_temporaries=indices is None)
    except (SourceError, DestinationError, ValueError) as exc:
        print(f"cscctrl shard: error: {exc}", file=sys.stderr)
        return 2


def _finish(plan, dest: Destination, report, remove_temporaries: bool) -> int:
    """The summary lines, and the manifest once every shard exists."""
    head = (f"cscctrl shard: {len(report.written)} shards written, {len(report.skipped)} already finished, "
            f"{report.samples} samples, {report.rejected} rejected, {report.bytes / 1e6:.1f} MB "
            f"in {report.seconds:.1f} s ({report.images_per_s:.0f} img/s)")
    _, missing = collect_results(plan, dest)
    if missing:
        print(f"{head}; manifest not written yet: {len(missing)} of {len(plan.shards)} shards still to write")
        return 0
    manifest = finalize(plan, dest, remove_temporaries=remove_temporaries)
    per_split = ", ".join(f"{s} {manifest.num_samples(s)} in {manifest.num_shards(s)} shards" for s in manifest.splits)
    rejected = manifest.summary["rejected"]
    reasons = f" ({_format_rejects(rejected['by_reason'])})" if rejected["total"] else ""
    print(head)
    print(f"cscctrl shard: {manifest.url}: {per_split}; {manifest.num_classes} classes; "
          f"rejected {rejected['total']}{reasons}")
    return 0
