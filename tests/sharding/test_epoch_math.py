"""Epoch arithmetic: every rank yields exactly steps_per_epoch full batches; the exact mode's batch
count per rank is Σ_workers ⌈n_worker / b⌉; the nominal epoch is ⌊N / (b · W)⌋."""
from __future__ import annotations

import math

import pytest

from sharding.manifest import read_manifest
from sharding.stream import eval_batches, make_eval_loader, make_train_loader, nominal_steps_per_epoch


@pytest.mark.parametrize("num_workers,steps,batch", [(0, 7, 5), (2, 7, 5), (2, 5, 9)])
def test_train_loader_yields_exactly_steps_full_batches(demo_shards, num_workers, steps, batch):
    loader = make_train_loader(str(demo_shards), image_size=8, batch_size=batch, steps_per_epoch=steps,
                               num_workers=num_workers, seed=1, rank=1, world_size=3, shuffle_buffer=20)
    for _ in range(2):  # two epochs, same count
        sizes = [x.shape[0] for x, _ in loader]
        assert sizes == [batch] * steps and len(loader) == steps


@pytest.mark.parametrize("world_size,num_workers,batch", [(3, 2, 7), (4, 2, 5), (1, 0, 11)])
def test_exact_mode_batch_count_matches_formula(demo_shards, world_size, num_workers, batch):
    manifest = read_manifest(str(demo_shards))
    counts = [s.samples for s in manifest.shard_infos("train")]
    total = 0
    for rank in range(world_size):
        loader = make_eval_loader(manifest, "train", image_size=8, batch_size=batch, num_workers=num_workers,
                                  rank=rank, world_size=world_size)
        sizes = [x.shape[0] for x, _ in loader]
        # Independent count: shard i -> rank i mod W -> worker (i // W) mod workers.
        per_worker = [0] * max(1, num_workers)
        for i, n in enumerate(counts):
            if i % world_size == rank:
                per_worker[(i // world_size) % max(1, num_workers)] += n
        assert len(sizes) == sum(math.ceil(n / batch) for n in per_worker) == len(loader)
        assert sum(sizes) == sum(per_worker) == loader.num_samples
        assert eval_batches(counts, rank, world_size, num_workers, batch) == (len(sizes), sum(sizes))
        total += sum(sizes)
    assert total == manifest.num_samples("train")


def test_nominal_epoch():
    assert nominal_steps_per_epoch(1_281_167, 300, 8) == 1_281_167 // 2400 == 533
    assert nominal_steps_per_epoch(10, 300, 8) == 1
    with pytest.raises(ValueError):
        nominal_steps_per_epoch(10, 0, 1)
