"""Shard once, reuse after: the shards of a plan at a URL, written only when they are not there yet.

    shards = ensure_shards(plan, url)                 # in this process
    shards = ensure_shards(plan, url, tasks=0)        # as Ray tasks (sharding/fanout.py)
    describe_shards(plan, url)                        # what ensure_shards would find or write; writes nothing

A finished shard set is reused when its manifest records the plan's fingerprint (source listing,
options, seed). Otherwise the shards are written under DEST's lock (sharding/lock.py): finished shards of
an interrupted run of the same plan are kept, shards of another plan are refused (PlanMismatchError)
unless ``overwrite`` (a cache the caller owns). `cscctrl demo` / `cscctrl train` without data.shards, the
workflow's shard stage and its evaluation sets with a source of their own all come through here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from sharding.fanout import shard_on_ray, write_report
from sharding.images import ImageOptions
from sharding.lock import DestLock
from sharding.manifest import Manifest, ManifestError, holds_plan, read_manifest
from sharding.plan import ShardPlan, plan_shards
from sharding.sources import open_source
from sharding.storage import Destination
from sharding.write import WriteReport, finalize, prepare_destination, write_shards

DEMO_COUNTS = (3072, 256, 256)  # demo crops per split: train, val, unseen
DEMO_SHARD_MAXCOUNT = 512  # samples per shard (several shards, so 2 ranks × loader workers split them)


@dataclass(frozen=True)
class ShardSet:
    """A finished shard set: where, its manifest, and whether this call wrote it."""

    url: str
    manifest: Manifest
    reused: bool
    report: WriteReport = field(default_factory=WriteReport)
    nodes: tuple[str, ...] = ()
    """Ray nodes whose tasks wrote shards (empty when written in this process, or reused)."""


def ensure_shards(plan: ShardPlan, url: str, *, tasks: int | None = None, workers: int = 1,
                  progress: bool = False, overwrite: bool = False) -> ShardSet:
    """The shards of ``plan`` at ``url``: reused when its manifest holds this plan, else written (resuming an
    interrupted run of the same plan) and the manifest finalised. ``tasks`` None writes in this process (with
    ``workers`` processes); an int writes as that many Ray tasks (0 = one per CPU of the cluster), except
    for memory://, which lives in this process only."""
    if holds_plan(url, plan.fingerprint):
        return ShardSet(url=url, manifest=read_manifest(url), reused=True)
    dest = Destination(url)
    dest.check_writable()
    nodes: tuple[str, ...] = ()
    with DestLock(dest, exclusive=True):  # no other shard job deletes our temporaries
        prepare_destination(plan, dest, overwrite=overwrite)
        dest.remove_stale_temporaries()
        if tasks is None or dest.is_memory:
            report = write_shards(plan, dest, workers=1 if dest.is_memory else workers, progress=progress)
        else:
            start = time.perf_counter()
            results = shard_on_ray(plan, dest, tasks, progress)
            report = write_report(plan, dest, results, time.perf_counter() - start)
            nodes = tuple(sorted({r["node"] for r in results}))
        manifest = finalize(plan, dest)
    return ShardSet(url=url, manifest=manifest, reused=False, report=report, nodes=nodes)


def describe_shards(plan: ShardPlan, url: str) -> dict:
    """What ``ensure_shards(plan, url)`` would do, without writing: reuse the set there, or write it."""
    there = holds_plan(url, plan.fingerprint)
    samples: dict[str, int] = {}
    for spec in plan.shards:
        samples[spec.split] = samples.get(spec.split, 0) + len(spec.items)
    return {"url": url, "state": "present (reused)" if there else "to be written", "plan": plan.fingerprint[:16],
            "shards": len(plan.shards), "samples": samples}


def num_classes_in(plan: ShardPlan, split: str) -> int:
    """max label + 1 over the planned samples of ``split`` (the manifest's num_classes_in, before writing)."""
    labels = [it.label for spec in plan.shards if spec.split == split for it in spec.items]
    return max(labels) + 1 if labels else 0


def demo_shards_url(storage: str, image_size: int = 32) -> str:
    return f"{storage.rstrip('/')}/demo-shards-{image_size}px"


def demo_plan(image_size: int = 32, counts: tuple[int, int, int] = DEMO_COUNTS,
              shard_maxcount: int = DEMO_SHARD_MAXCOUNT) -> ShardPlan:
    """The plan of the demo shards: seeded crops of the bundled photos (sharding/sources.py DemoSource)."""
    train, val, unseen = counts
    source = open_source("demo", seed=0, train=train, val=val, unseen=unseen, size=image_size)
    return plan_shards(source, shard_maxcount=shard_maxcount, image_options=ImageOptions())


def ensure_demo_shards(storage: str, image_size: int = 32, progress: bool = True,
                       counts: tuple[int, int, int] = DEMO_COUNTS,
                       shard_maxcount: int = DEMO_SHARD_MAXCOUNT) -> str:
    """The demo shards under ``storage`` (a cache of ours: written once, reused after); returns their URL."""
    url = demo_shards_url(storage, image_size)
    return ensure_shards(demo_plan(image_size, counts, shard_maxcount), url, progress=progress, overwrite=True).url


def existing_manifest(url: str) -> Manifest | None:
    """The manifest at ``url``, or None when there is none (nothing is created)."""
    try:
        return read_manifest(url)
    except (FileNotFoundError, ManifestError):
        return None
