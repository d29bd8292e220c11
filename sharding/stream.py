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
                                                         #   gs://, ...); unsafe names refused; corrupt
                                                         #   shards skipped with a warning and counted
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

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from sharding.layout import IMAGE_KEYS, is_unsafe_member
from sharding.manifest import Manifest, read_manifest
from sharding.transforms import ImageTransform

log = logging.getLogger(__name__)

SAMPLE_SHUFFLE_SIZE = 2000  # samples in each loader worker's shuffle buffer
SAMPLE_SHUFFLE_INITIAL = 500  # samples buffered before the first one is yielded
MAX_CONSECUTIVE_BAD_SHARDS = 50  # resampled mode gives up when this many shard reads in a row fail
READ_BLOCK_SIZE = 1 << 20  # fsspec read-ahead block for remote shards (bytes)


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


def node_shards(urls: list[str], rank: int, world_size: int) -> list[str]:
    """Shards of `rank`: urls[rank::world_size] (disjoint across ranks, together all of them)."""
    return list(urls[rank::world_size])


def worker_shards(urls: list[str], worker: int, num_workers: int) -> list[str]:
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
    """Counters shared with the loader worker processes (multiprocessing.Value)."""

    def __init__(self) -> None:
        self._corrupt_shards = multiprocessing.Value("q", 0)
        self._corrupt_samples = multiprocessing.Value("q", 0)
        self._unsafe_members = multiprocessing.Value("q", 0)

    def bump(self, name: str) -> None:
        """Add one to the counter `name` (corrupt_shards, corrupt_samples, unsafe_members)."""
        counter = getattr(self, f"_{name}")
        with counter.get_lock():
            counter.value += 1

    @property
    def corrupt_shards(self) -> int:
        """Shard reads that failed (unreadable or truncated tar); the rest of that shard is skipped."""
        return int(self._corrupt_shards.value)

    @property
    def corrupt_samples(self) -> int:
        """Samples skipped because their image or label could not be decoded."""
        return int(self._corrupt_samples.value)

    @property
    def unsafe_members(self) -> int:
        """Tar members refused for absolute or '..' paths."""
        return int(self._unsafe_members.value)

    def as_dict(self) -> dict[str, int]:
        return {"corrupt_shards": self.corrupt_shards, "corrupt_samples": self.corrupt_samples,
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

    Shards are opened through fsspec (local paths, s3://, gs://, memory://, ...). A shard that cannot
    be opened or read to its end is skipped with a warning and counted once in stats.corrupt_shards;
    members read before the failure are kept (each of them is complete).
    """

    stats: ReaderStats
    storage_options: dict
    resampled: bool

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        consecutive_bad = 0
        for source in src:
            url, ok = source["url"], True
            try:
                fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
                with fs.open(path, "rb", block_size=READ_BLOCK_SIZE) as stream, \
                        tarfile.open(fileobj=stream, mode="r|") as tar:
                    for info in tar:
                        if is_unsafe_member(info.name):
                            self.stats.bump("unsafe_members")
                            log.warning("refusing tar member %r (absolute or '..' path) in %s", info.name, url)
                            continue
                        if not info.isreg():
                            continue
                        yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            except Exception as exn:  # missing/unreadable object, truncated or corrupt tar
                self.stats.bump("corrupt_shards")
                log.warning("skipping corrupt shard %s: %s: %s (corrupt shard reads so far: %d)",
                            url, type(exn).__name__, exn, self.stats.corrupt_shards)
                ok = False
            yield {}  # end of shard: group_by_keys never joins members of two shards
            consecutive_bad = 0 if ok else consecutive_bad + 1
            if self.resampled and consecutive_bad >= MAX_CONSECUTIVE_BAD_SHARDS:
                raise RuntimeError(f"{consecutive_bad} shard reads in a row failed; the shard set looks "
                                   "unreadable (run `cscctrl verify DEST`)")


@dataclass
class GroupSamples:
    """tar members -> samples {__key__, __url__, jpg|png, cls, json} (wds.tariterators.group_by_keys);
    a malformed shard (e.g. a duplicated member) costs the affected sample, counted as corrupt."""

    stats: ReaderStats

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        return wds.tariterators.group_by_keys(src, handler=self._handler)

    def _handler(self, exn: Exception) -> bool:
        self.stats.bump("corrupt_samples")
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
                data = next(sample[k] for k in IMAGE_KEYS if k in sample)
                label = int(sample["cls"].decode("ascii"))
                x = self.transform(data, generator)
            except Exception as exn:  # missing member, undecodable image or label
                self.stats.bump("corrupt_samples")
                log.warning("skipping sample %s from %s: %s: %s", key, sample.get("__url__"),
                            type(exn).__name__, exn)
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

    def __iter__(self) -> Iterator[tuple]:
        self._epoch.value = self._next_epoch
        self._next_epoch += 1
        return iter(self.loader)


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
    urls = [s.url for s in manifest.shard_infos(split) if s.samples > 0]
    if not urls:
        raise ValueError(f"split {split!r} at {manifest.url} holds no samples")
    if len(urls) < world_size:
        log.warning("%d %s shards for %d ranks: every rank resamples from all shards", len(urls), split, world_size)
    stats, epoch = ReaderStats(), SharedEpoch(0)
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
    stats, epoch = ReaderStats(), SharedEpoch(0)
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
