"""The shard plan: which sample goes into which shard, fixed before any image is decoded.

Fixing the plan up front is what makes the output reproducible no matter who writes which shard:
a resumed run, a run with more worker processes, or Ray tasks that each write a range of shard
indices all produce byte-identical shards, because shard i's contents depend only on the plan.

Order within a split: items sorted by key (so the listing order of the file system does not matter),
then permuted by ``numpy.random.default_rng([seed, crc32(split)])`` so every shard mixes classes.
Cutting: consecutive items go to the same shard until it holds ``shard_maxcount`` items or adding the
next would exceed ``shard_maxsize`` *source* bytes (known from the listing; with --resize the written
shards are smaller than that bound). A shard always holds at least one item.

Shards are numbered per split (``train-000000.tar``, ``val-000000.tar``) and indexed globally
(0 .. num_shards-1, splits in listing order) for `write_shards(plan, indices)`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass

import numpy as np

from sharding.images import ImageOptions
from sharding.sources import ClassInfo, ListedReject, Source, SourceItem

DEFAULT_SHARD_MAXCOUNT = 1000  # samples per shard
DEFAULT_SHARD_MAXSIZE = 512 * 2**20  # source bytes per shard (512 MiB)
SHARD_NAME = "{split}-{number:06d}.tar"
PLAN_FORMAT = "cscctrl-shard-plan/1"


@dataclass(frozen=True)
class ShardSpec:
    index: int  # global index over all splits
    split: str
    number: int  # index within the split
    items: tuple[SourceItem, ...]

    @property
    def name(self) -> str:
        return SHARD_NAME.format(split=self.split, number=self.number)

    @property
    def part_name(self) -> str:
        """Where the shard's record (sample rows, rejects, sha256) is kept until the manifest is written."""
        return f"_parts/{self.name[:-len('.tar')]}.json"


@dataclass
class ShardPlan:
    source: Source
    image_options: ImageOptions
    seed: int
    shard_maxcount: int
    shard_maxsize: int
    shards: list[ShardSpec]
    classes: list[ClassInfo]
    listed_rejects: list[ListedReject]
    fingerprint: str = ""

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(s.split for s in self.shards))

    @property
    def label_names(self) -> dict[int, str]:
        return {c.label: c.name for c in self.classes}

    def options(self) -> dict:
        """Everything besides the item lists that determines the shard bytes (JSON-able)."""
        return {"format": PLAN_FORMAT, "source": self.source.describe(),
                "image_options": dataclasses.asdict(self.image_options), "seed": self.seed,
                "shard_maxcount": self.shard_maxcount, "shard_maxsize": self.shard_maxsize}


def _split_stream(split: str) -> int:
    return zlib.crc32(split.encode())  # stable across processes (str hash() is salted)


def order_items(items: list[SourceItem], split: str, seed: int) -> list[SourceItem]:
    """Sort by key, then a seeded permutation: class-mixed and independent of listing order."""
    by_key = sorted(items, key=lambda it: it.key)
    perm = np.random.default_rng([seed, _split_stream(split)]).permutation(len(by_key))
    return [by_key[i] for i in perm]


def cut_shards(items: list[SourceItem], maxcount: int, maxsize: int) -> list[list[SourceItem]]:
    """Consecutive runs of at most `maxcount` items and at most `maxsize` source bytes (>= 1 item each)."""
    shards: list[list[SourceItem]] = []
    current: list[SourceItem] = []
    size = 0
    for item in items:
        if current and (len(current) >= maxcount or size + item.size > maxsize):
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        shards.append(current)
    return shards


def fingerprint(plan: ShardPlan) -> str:
    """sha256 over the options and every shard's (key, label, source) list."""
    h = hashlib.sha256(json.dumps(plan.options(), sort_keys=True).encode())
    h.update(json.dumps([[c.label, c.name, c.description] for c in plan.classes]).encode())
    for spec in plan.shards:
        h.update(spec.name.encode())
        for it in spec.items:
            h.update(f"\0{it.key}\0{it.label}\0{it.source}".encode())
    return h.hexdigest()


def plan_shards(source: Source, *, shard_maxcount: int = DEFAULT_SHARD_MAXCOUNT,
                shard_maxsize: int = DEFAULT_SHARD_MAXSIZE, seed: int = 0,
                image_options: ImageOptions | None = None, splits: list[str] | None = None,
                max_per_split: int | None = None) -> ShardPlan:
    """List `source` and assign every sample to a shard.

    splits: keep only these splits (error naming the missing ones); max_per_split: keep the first N
    samples of each split's seeded order (a deterministic random subset).
    """
    if shard_maxcount < 1:
        raise ValueError(f"shard_maxcount must be >= 1, got {shard_maxcount}")
    if shard_maxsize < 1:
        raise ValueError(f"shard_maxsize must be >= 1 byte, got {shard_maxsize}")
    if max_per_split is not None and max_per_split < 1:
        raise ValueError(f"max_per_split must be >= 1 or None, got {max_per_split}")
    listing = source.list()
    wanted = list(listing.splits) if splits is None else list(splits)
    missing = [s for s in wanted if s not in listing.splits]
    if missing:
        raise ValueError(f"splits {missing} not in the source; it has {list(listing.splits)}")
    shards: list[ShardSpec] = []
    for split in wanted:
        items = order_items(listing.splits[split], split, seed)[:max_per_split]
        for number, chunk in enumerate(cut_shards(items, shard_maxcount, shard_maxsize)):
            shards.append(ShardSpec(len(shards), split, number, tuple(chunk)))
    plan = ShardPlan(source, image_options or ImageOptions(), seed, shard_maxcount, shard_maxsize, shards,
                     listing.classes, [r for r in listing.rejected if r.split in wanted])
    plan.fingerprint = fingerprint(plan)
    return plan


def parse_indices(spec: str, num_shards: int) -> list[int]:
    """``"3"``, ``"0:10"`` (half-open), ``"5:"``, ``"1,4,7"`` -> sorted shard indices, range-checked."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if ":" in part:
            lo_s, hi_s = part.split(":", 1)
            lo = int(lo_s) if lo_s else 0
            hi = int(hi_s) if hi_s else num_shards
            out.update(range(lo, hi))
        elif part:
            out.add(int(part))
    bad = sorted(i for i in out if not 0 <= i < num_shards)
    if bad:
        raise ValueError(f"shard indices {bad[:5]} outside the plan's 0..{num_shards - 1}")
    return sorted(out)
