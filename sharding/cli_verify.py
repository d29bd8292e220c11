"""`cscctrl verify DEST`: re-read every shard against the manifest; exit 1 when any is missing,
truncated or altered (2 when DEST holds no readable manifest)."""
from __future__ import annotations

import argparse
import logging
import sys

from sharding.manifest import ManifestError
from sharding.storage import DestinationError
from sharding.verify import verify_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", metavar="DEST", help="shard folder or fsspec URL written by `cscctrl shard`")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = verify_shards(args.dest, progress=not args.no_progress)
    except (ManifestError, DestinationError, FileNotFoundError) as exc:
        print(f"cscctrl verify: error: {exc}", file=sys.stderr)
        return 2
    for check in report.problems:
        print(f"{check.status.upper():9s} {check.split}/{check.name}: {check.detail}")
    print(report.summary_line())
    return 0 if report.ok else 1
