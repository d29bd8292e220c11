"""The streaming reader: WebDataset shards -> batches of (x in [−1, 1], labels) for training and evaluation.

Training (`make_train_loader`): a resampled, step-counted stream, as WebDataset recommends for
distributed training. Every rank yields exactly `steps_per_epoch` batches per epoch (a rank that
yields fewer would hang DDP's collectives). Evaluation (`make_eval_loader`): exact and disjoint: every
sample exactly once across ranks × loader workers, partial last batches allowed.

The pipeline, one stage per line, with what the stream holds after it::

    train: ResampledRankShards(urls, seed, epoch, rank)  # shard URLs: this rank's shards, drawn with
                                                         #   replacement per (seed, epoch, rank, worker)
    eval:  RankShards(urls, rank, world_size)            # shard URLs: shard i -> rank i mod W, then
                                                         #   loader worker (i // W) mod num_workers
    TarMembers                                           # tar members, shards opened through fsspec (s3://,
                                                         #   gs://, ...); unsafe names refused; damaged
                                                         #   stretches skipped; every sample the manifest
                                                         #   lists is yielded or counted as lost
    GroupSamples (wds group_by_keys)                     # samples {__key__, jpg|png, cls, json}
    SeededShuffle (train)                                # samples, shuffled in a buffer per worker
    DecodeTransform                                      # (x (C,H,W), label, key); only image and cls
                                                         #   members are decoded, nothing is unpickled
    wds.batched(batch_size, partial=eval)                # (x (b,C,H,W) float32, labels (b,) int64[, keys])
    wds.WebLoader(batch_size=None, num_workers)          # batches from the loader workers
      .with_epoch(steps_per_epoch)  (train)              # exactly that many batches per epoch

C = `channels`: 3 decodes every image to RGB (grey replicated), 1 to grey (colour -> ITU-R 601 luminance,
Pillow's convert("L")); sharding/transforms.py has the per-image steps.

Seeds: data order depends only on (seed, epoch, rank, loader worker). `loader.set_epoch(e)` fixes the
epoch of the next iteration; otherwise each full iteration advances it by one.
Rank and world size are passed explicitly; None falls back to the RANK / WORLD_SIZE environment
variables (set by Ray Train and torchrun), then to (0, 1).
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from sharding.layout import IMAGE_KEYS, is_unsafe_member, split_member_name
from sharding.manifest import Manifest, ShardInfo, read_manifest
from sharding.transforms import ImageTransform

log = logging.getLogger(__name__)
T = TypeVar("T")

SAMPLE_SHUFFLE_SIZE = 2000  # samples in each loader worker's shuffle buffer
SAMPLE_SHUFFLE_INITIAL = 500  # samples buffered before the first one is yielded
MAX_CONSECUTIVE_BAD_SHARDS = 50  # resampled mode gives up when this many shard reads in a row fail
READ_BLOCK_SIZE = 1 << 20  # fsspec read-ahead block for remote shards (bytes)
REASON_BYTES = 240  # bytes kept of each shard's first loss reason


# ----------------------------------------------------------------------------------------------
# Ranks, workers, seeds
# ----------------------------------------------------------------------------------------------
def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; else the RANK / WORLD_SIZE environment variables; else (0, 1)."""
    if rank is None:
        rank = int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def worker_id() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def node_shards(urls: list[T], rank: int, world_size: int) -> list[T]:
    """Shards of `rank`: urls[rank::world_size] (disjoint across ranks, together all of them)."""
    return list(urls[rank::world_size])


def worker_shards(urls: list[T], worker: int, num_workers: int) -> list[T]:
    """Shards of one loader worker within a rank: urls[worker::num_workers]."""
    return list(urls[worker::num_workers])


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, worker, purpose) via numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


SEED_SHARDS, SEED_SHUFFLE, SEED_AUGMENT = 1, 2, 3  # purposes: independent streams per worker


# ----------------------------------------------------------------------------------------------
# Shared counters (visible in the main process, incremented in loader workers)
# ----------------------------------------------------------------------------------------------
class ReaderStats:
    """Counters shared with the loader worker processes (multiprocessing.Value / Array).

    Sample accounting: every sample the manifest promises for a shard read is either yielded or counted as
    lost, per shard and with the first reason seen there (``losses()``):

        promised (manifest count of the shard) = yielded + missing + corrupt

    missing: the shard read did not find the sample (a damaged stretch of the tar, a truncated or unreadable
    shard, refused member names); corrupt: found, but its image or label does not decode. The training
    stream resamples shards, so there the counts are of lost sample *reads* (a damaged shard drawn twice
    counts twice).
    """

    def __init__(self, shards: list[ShardInfo] | None = None) -> None:
        self._corrupt_shards = multiprocessing.Value("q", 0)
        self._corrupt_samples = multiprocessing.Value("q", 0)
        self._missing_samples = multiprocessing.Value("q", 0)
        self._unsafe_members = multiprocessing.Value("q", 0)
        self.shards = list(shards or [])
        self._index = {s.url: i for i, s in enumerate(self.shards)}
        self._lost = multiprocessing.Array("q", max(1, len(self.shards)))
        self._reasons = multiprocessing.Array("c", max(1, len(self.shards)) * REASON_BYTES)

    def bump(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the counter `name` (corrupt_shards, corrupt_samples, missing_samples, unsafe_members)."""
        counter = getattr(self, f"_{name}")
        with counter.get_lock():
            counter.value += n

    def expected(self, url: str) -> int | None:
        """Samples the manifest lists for the shard at ``url`` (None: a shard it does not list)."""
        i = self._index.get(url)
        return None if i is None else self.shards[i].samples

    def expected_bytes(self, url: str) -> int | None:
        i = self._index.get(url)
        return None if i is None else self.shards[i].bytes

    def lose(self, url: str | None, n: int, reason: str, kind: str) -> None:
        """Count ``n`` samples of the shard at ``url`` as lost (kind 'missing' or 'corrupt'), keeping the
        shard's first reason (and the first 'missing' one)."""
        if n <= 0:
            return
        self.bump(f"{kind}_samples", n)
        i = self._index.get(url) if url else None
        if i is None:
            return
        with self._lost.get_lock():
            self._lost[i] += n
            start = i * REASON_BYTES
            kept = bytes(self._reasons[start:start + REASON_BYTES]).split(b"\0", 1)[0]
            if not kept or (kind == "missing" and b"not found" not in kept):  # a shard's missing samples are
                text = (kept + b"; " if kept else b"") + reason.encode("utf-8", "replace")  # always said
                text = text[:REASON_BYTES - 1]
                self._reasons[start:start + len(text)] = text

    @property
    def corrupt_shards(self) -> int:
        """Shard reads that failed or did not find every sample the manifest lists (unreadable, truncated or
        damaged tar)."""
        return int(self._corrupt_shards.value)

    @property
    def corrupt_samples(self) -> int:
        """Samples skipped because their image or label could not be decoded."""
        return int(self._corrupt_samples.value)

    @property
    def missing_samples(self) -> int:
        """Samples the manifest lists that a shard read did not find (damaged, truncated or unreadable tar)."""
        return int(self._missing_samples.value)

    @property
    def lost_samples(self) -> int:
        """missing_samples + corrupt_samples: promised by the manifest, not yielded."""
        return self.missing_samples + self.corrupt_samples

    @property
    def unsafe_members(self) -> int:
        """Tar members refused for absolute or '..' paths."""
        return int(self._unsafe_members.value)

    def losses(self) -> list[dict]:
        """[{"shard", "lost", "reason"}] for every shard that lost samples, in manifest order."""
        out = []
        for i, info in enumerate(self.shards):
            n = int(self._lost[i])
            if n:
                raw = bytes(self._reasons[i * REASON_BYTES:(i + 1) * REASON_BYTES]).split(b"\0", 1)[0]
                out.append({"shard": info.name, "lost": n, "reason": raw.decode("utf-8", "replace")})
        return out

    def as_dict(self) -> dict[str, int]:
        return {"corrupt_shards": self.corrupt_shards, "corrupt_samples": self.corrupt_samples,
                "missing_samples": self.missing_samples, "lost_samples": self.lost_samples,
                "unsafe_members": self.unsafe_members}


class SharedEpoch:
    """The epoch number, shared with (persistent) loader workers."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = multiprocessing.Value("q", epoch)

    @property
    def value(self) -> int:
        return int(self._value.value)

    @value.setter
    def value(self, epoch: int) -> None:
        self._value.value = int(epoch)


# ----------------------------------------------------------------------------------------------
# Pipeline stages
# ----------------------------------------------------------------------------------------------
class RankShards(IterableDataset):
    """Exact mode: each shard URL once, for this rank and this loader worker only."""

    def __init__(self, urls: list[str], rank: int, world_size: int) -> None:
        super().__init__()
        self.urls, self.rank, self.world_size = list(urls), rank, world_size

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_id()
        for url in worker_shards(node_shards(self.urls, self.rank, self.world_size), worker, num_workers):
            yield {"url": url}


class ResampledRankShards(IterableDataset):
    """Training mode: endless draws with replacement from this rank's shards.

    With at least `world_size` shards the ranks draw from disjoint subsets (node_shards); with fewer,
    every rank draws from all shards (with its own seed), so no rank is left without data.
    """

    def __init__(self, urls: list[str], rank: int, world_size: int, seed: int, epoch: SharedEpoch) -> None:
        super().__init__()
        self.urls = node_shards(urls, rank, world_size) if len(urls) >= world_size else list(urls)
        self.rank, self.seed, self.epoch = rank, seed, epoch

    def __iter__(self) -> Iterator[dict]:
        worker, _ = worker_id()
        rng = random.Random(stream_seed(self.seed, self.epoch.value, self.rank, worker, SEED_SHARDS))
        while True:
            yield {"url": rng.choice(self.urls)}


@dataclass
class TarMembers:
    """{url} -> tar members {fname, data, __url__}, then {} as an end-of-shard marker.

    Shards are opened through fsspec (local paths, s3://, gs://, memory://, ...). A damaged stretch inside
    a tar (invalid member headers) is skipped: reading resumes at the next valid header, as ``tar
    --ignore-zeros`` does, where Python's tar stream would take the first bad header for the end of the
    archive and drop the rest of the shard unseen. Members read before a failure are kept (each of them
    is complete). At the end of each shard, the samples the manifest lists for it but the read did not
    find are counted as lost (stats.lose), with the reason; a read that failed or lost samples is warned
    about once and counted in stats.corrupt_shards.
    """

    stats: ReaderStats
    storage_options: dict
    resampled: bool

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        consecutive_bad = 0
        for source in src:
            url = source["url"]
            keys: set[str] = set()
            problems: list[str] = []
            skipped = refused = 0
            try:
                fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
                with fs.open(path, "rb", block_size=READ_BLOCK_SIZE) as stream, \
                        tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True) as tar:
                    end = 0  # where the next header should start
                    for info in tar:
                        skipped += max(0, info.offset - end)
                        end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                        if is_unsafe_member(info.name):
                            self.stats.bump("unsafe_members")
                            refused += 1
                            log.warning("refusing tar member %r (absolute or '..' path) in %s", info.name, url)
                            continue
                        if not info.isreg():
                            continue
                        keys.add(split_member_name(info.name)[0])
                        member = tar.extractfile(info)
                        assert member is not None  # a regular file (isreg() above) has its data
                        yield {"fname": info.name, "data": member.read(), "__url__": url}
            except Exception as exn:  # missing/unreadable object, truncated or corrupt tar
                problems.append(f"{type(exn).__name__}: {exn}")
            yield {}  # end of shard: group_by_keys never joins members of two shards
            failed = bool(problems) or (not keys and bool(self.stats.expected(url)))
            self._account(url, keys, problems, skipped, refused, failed)
            consecutive_bad = consecutive_bad + 1 if failed else 0
            if self.resampled and consecutive_bad >= MAX_CONSECUTIVE_BAD_SHARDS:
                raise RuntimeError(f"{consecutive_bad} shard reads in a row failed; the shard set looks "
                                   "unreadable (run `cscctrl verify DEST`)")

    def _account(self, url: str, keys: set[str], problems: list[str], skipped: int, refused: int,
                 failed: bool) -> None:
        """Count the samples the manifest lists for the shard that this read did not find, with the reason;
        a read that failed or lost samples is one corrupt shard read, warned about once."""
        expected = self.stats.expected(url) or 0
        missing = expected - len(keys)
        if missing <= 0 and not failed:
            return
        if expected and not keys and not problems:
            problems.append("no readable tar member")
        if skipped:
            problems.append(f"{skipped} bytes of damaged tar headers skipped")
        if refused:
            problems.append(f"{refused} member(s) with unsafe names refused")
        size, want = self._size(url), self.stats.expected_bytes(url)
        if size is not None and want and size != want:
            problems.append(f"{size} bytes, the manifest says {want} ({'truncated' if size < want else 'replaced'})")
        reason = "; ".join(problems) or "fewer samples in the tar than its manifest lists"
        self.stats.lose(url, missing, f"{missing} sample(s) not found in the shard: {reason}", "missing")
        self.stats.bump("corrupt_shards")
        log.warning("skipping corrupt shard %s: %s (%d of the %d samples its manifest lists not found; corrupt "
                    "shard reads so far: %d; run `cscctrl verify` on the shard set)", url, reason, max(0, missing),
                    expected, self.stats.corrupt_shards)

    def _size(self, url: str) -> int | None:
        try:
            fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
            return int(fs.size(path))
        except Exception:  # the shard is gone or unreachable: its read error already says so
            return None


@dataclass
class GroupSamples:
    """tar members -> samples {__key__, __url__, jpg|png, cls, json} (wds.tariterators.group_by_keys);
    a malformed shard (e.g. a duplicated member) costs the affected sample, counted as corrupt."""

    stats: ReaderStats

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        return wds.tariterators.group_by_keys(src, handler=self._handler)

    def _handler(self, exn: Exception) -> bool:
        self.stats.lose(None, 1, f"{type(exn).__name__}: {exn}", "corrupt")
        log.warning("skipping malformed sample: %s: %s", type(exn).__name__, exn)
        return True


@dataclass
class SeededShuffle(wds.PipelineStage):
    """wds.shuffle with an RNG seeded by (seed, epoch, rank, worker) when iteration starts."""

    bufsize: int
    initial: int
    seed: int
    rank: int
    epoch: SharedEpoch

    def run(self, src: Iterable) -> Iterator:
        worker, _ = worker_id()
        rng = random.Random(stream_seed(self.seed, self.epoch.value, self.rank, worker, SEED_SHUFFLE))
        return wds.shuffle(self.bufsize, min(self.initial, self.bufsize), rng=rng)(src)


@dataclass
class DecodeTransform(wds.PipelineStage):
    """sample dict -> (x, label, key). Only an image member and ``cls`` are decoded (PIL, ASCII int)."""

    transform: ImageTransform
    stats: ReaderStats
    seed: int
    rank: int
    epoch: SharedEpoch

    def run(self, src: Iterable[dict]) -> Iterator[tuple[torch.Tensor, int, str]]:
        worker, _ = worker_id()
        generator = torch.Generator().manual_seed(
            stream_seed(self.seed, self.epoch.value, self.rank, worker, SEED_AUGMENT))
        for sample in src:
            key = sample.get("__key__", "?")
            try:
                data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                if data is None:
                    raise ValueError(f"no image member ({'/'.join(IMAGE_KEYS)})")
                if "cls" not in sample:
                    raise ValueError("no label member (cls)")
                label = int(sample["cls"].decode("ascii"))
                x = self.transform(data, generator)
            except Exception as exn:  # missing member, undecodable image or label
                url = sample.get("__url__")
                self.stats.lose(url, 1, f"sample {key}: {type(exn).__name__}: {exn}", "corrupt")
                log.warning("skipping sample %s from %s: %s: %s", key, url, type(exn).__name__, exn)
                continue
            yield x, label, key


def collate(samples: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """[(x (C,H,W), label, key)] -> (x (b,C,H,W), labels (b,) int64, keys)."""
    xs, labels, keys = zip(*samples)
    # np.stack: a plain copy, without torch's intra-op threads (see transforms.to_signed_unit).
    return torch.from_numpy(np.stack([x.numpy() for x in xs])), torch.tensor(labels, dtype=torch.int64), list(keys)


def drop_keys(batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    return batch[0], batch[1]


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------
class ShardLoader:
    """Iterable of batches with reader statistics and an epoch counter.

    Yields (x (b,C,H,W) float32 in [−1, 1], labels (b,) int64), plus keys when built with_keys; C is the
    loader's `channels` (3 or 1).
    """

    def __init__(self, loader: wds.WebLoader, stats: ReaderStats, epoch: SharedEpoch, num_batches: int,
                 num_samples: int) -> None:
        self.loader, self.stats, self._epoch = loader, stats, epoch
        self.num_batches, self.num_samples = num_batches, num_samples
        self._next_epoch = epoch.value

    @property
    def epoch(self) -> int:
        """Epoch of the next iteration."""
        return self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def account(self, read: int) -> dict:
        """The sample accounting of a finished exact pass (make_eval_loader) that yielded ``read`` samples:
        promised (what the manifest lists for this rank's shards), read, lost = promised − read, and the
        shards that lost samples with their reasons (ReaderStats.losses)."""
        return {"promised": self.num_samples, "read": int(read), "lost": max(0, self.num_samples - int(read)),
                "shards": self.stats.losses()}

    def __iter__(self) -> Iterator[tuple]:
        self._epoch.value = self._next_epoch
        self._next_epoch += 1
        return iter(self.loader)


def describe_losses(account: dict, what: str) -> str:
    """One line for an exact pass that lost samples (ShardLoader.account): how many, where, why."""
    shards = account["shards"]
    listed = "; ".join(f"{s['shard']}: {s['lost']} ({s['reason']})" for s in shards[:3])
    more = f"; and {len(shards) - 3} more shard(s)" if len(shards) > 3 else ""
    return (f"{account['lost']} of the {account['promised']} samples of {what} were not evaluated (damaged or "
            f"unreadable shards: {listed}{more}). Run `cscctrl verify` on the shard set and shard it again")


def _manifest(shards: str | Manifest, storage_options: dict | None) -> Manifest:
    return shards if isinstance(shards, Manifest) else read_manifest(shards, storage_options)


def _check_sizes(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def _web_loader(pipeline: wds.DataPipeline, num_workers: int, **loader_kwargs) -> wds.WebLoader:
    # Batching happens inside the pipeline; the DataLoader only moves whole batches out of workers.
    return wds.WebLoader(pipeline, batch_size=None, num_workers=num_workers, **loader_kwargs)


def make_train_loader(shards: str | Manifest, split: str = "train", *, image_size: int, batch_size: int,
                      steps_per_epoch: int, num_workers: int = 2, seed: int = 0, rank: int | None = None,
                      world_size: int | None = None, flip: bool = True, dequantize: bool = False,
                      shuffle_buffer: int = SAMPLE_SHUFFLE_SIZE, with_keys: bool = False,
                      storage_options: dict | None = None, channels: int = 3, **loader_kwargs) -> ShardLoader:
    """Resampled training stream: exactly `steps_per_epoch` full batches per epoch on every rank.

    shards: DEST URL (or a Manifest); batch_size: per rank; num_workers: DataLoader processes per rank;
    channels: 3 (RGB) or 1 (grey), the model's in_channels.
    Extra keyword arguments go to the DataLoader (pin_memory, prefetch_factor, persistent_workers).
    """
    _check_sizes(batch_size, num_workers)
    transform = ImageTransform(image_size, flip, dequantize, channels)  # validates image_size, channels
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1 sample, got {shuffle_buffer}")
    rank, world_size = resolve_rank(rank, world_size)
    manifest = _manifest(shards, storage_options)
    infos = [s for s in manifest.shard_infos(split) if s.samples > 0]
    urls = [s.url for s in infos]
    if not urls:
        raise ValueError(f"split {split!r} at {manifest.url} holds no samples")
    if len(urls) < world_size:
        log.warning("%d %s shards for %d ranks: every rank resamples from all shards", len(urls), split, world_size)
    stats, epoch = ReaderStats(infos), SharedEpoch(0)
    pipeline = wds.DataPipeline(
        ResampledRankShards(urls, rank, world_size, seed, epoch),
        TarMembers(stats, storage_options or manifest.storage_options, resampled=True),
        GroupSamples(stats),
        SeededShuffle(shuffle_buffer, SAMPLE_SHUFFLE_INITIAL, seed, rank, epoch),
        DecodeTransform(transform, stats, seed, rank, epoch),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    )
    loader = _web_loader(pipeline, num_workers, **loader_kwargs)
    if not with_keys:
        loader = loader.map(drop_keys)
    loader = loader.with_epoch(steps_per_epoch)
    return ShardLoader(loader, stats, epoch, steps_per_epoch, steps_per_epoch * batch_size)


def nominal_steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    """Steps that make one nominal epoch: ⌊num_samples / (batch_size · world_size)⌋, at least 1.

    The training stream resamples shards, so an epoch is a step count, not an exact pass; with this
    count, all ranks together draw about num_samples samples per epoch.
    """
    if num_samples < 0 or batch_size < 1 or world_size < 1:
        raise ValueError(f"need num_samples >= 0, batch_size >= 1, world_size >= 1; got {num_samples}, "
                         f"{batch_size}, {world_size}")
    return max(1, num_samples // (batch_size * world_size))


def eval_batches(shard_samples: list[int], rank: int, world_size: int, num_workers: int,
                 batch_size: int) -> tuple[int, int]:
    """(batches, samples) one rank yields in exact mode: Σ over its workers of ⌈n_worker / b⌉."""
    per_rank = node_shards(list(range(len(shard_samples))), rank, world_size)
    batches = samples = 0
    for worker in range(max(1, num_workers)):
        n = sum(shard_samples[i] for i in worker_shards(per_rank, worker, max(1, num_workers)))
        batches += math.ceil(n / batch_size)
        samples += n
    return batches, samples


def make_eval_loader(shards: str | Manifest, split: str = "val", *, image_size: int, batch_size: int,
                     num_workers: int = 2, rank: int | None = None, world_size: int | None = None,
                     with_keys: bool = False, storage_options: dict | None = None, channels: int = 3,
                     **loader_kwargs) -> ShardLoader:
    """Exact evaluation pass: every sample of `split` once across ranks × workers; last batches partial.

    channels: 3 (RGB) or 1 (grey), the model's in_channels.
    """
    _check_sizes(batch_size, num_workers)
    transform = ImageTransform(image_size, channels=channels)  # validates image_size, channels
    rank, world_size = resolve_rank(rank, world_size)
    manifest = _manifest(shards, storage_options)
    infos = manifest.shard_infos(split)
    urls = [s.url for s in infos]
    if len(urls) < world_size * max(1, num_workers):
        log.info("%d %s shards for %d ranks x %d workers: some workers stay idle",
                 len(urls), split, world_size, max(1, num_workers))
    stats, epoch = ReaderStats(infos), SharedEpoch(0)
    pipeline = wds.DataPipeline(
        RankShards(urls, rank, world_size),
        TarMembers(stats, storage_options or manifest.storage_options, resampled=False),
        GroupSamples(stats),
        DecodeTransform(transform, stats, 0, rank, epoch),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    loader = _web_loader(pipeline, num_workers, **loader_kwargs)
    if not with_keys:
        loader = loader.map(drop_keys)
    num_batches, num_samples = eval_batches([s.samples for s in infos], rank, world_size, num_workers, batch_size)
    return ShardLoader(loader, stats, epoch, num_batches, num_samples)
