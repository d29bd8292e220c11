"""Node and worker splits: disjoint, covering, exact in evaluation; seeded order in training."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from sharding.manifest import read_manifest
from sharding.stream import make_eval_loader, make_train_loader, node_shards, resolve_rank, worker_shards


@pytest.mark.parametrize("num_shards,world_size,num_workers", [(13, 4, 3), (10, 2, 2), (3, 4, 2), (1, 1, 1)])
def test_node_and_worker_splits_are_disjoint_and_cover(num_shards, world_size, num_workers):
    urls = [f"s3://b/train-{i:06d}.tar" for i in range(num_shards)]
    owners = Counter()
    for rank in range(world_size):
        mine = node_shards(urls, rank, world_size)
        per_worker = [worker_shards(mine, w, num_workers) for w in range(num_workers)]
        assert sorted(u for part in per_worker for u in part) == sorted(mine)
        owners.update(u for part in per_worker for u in part)
    assert owners == Counter(urls)  # every shard exactly once


def test_rank_comes_from_arguments_then_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank() == (2, 3)
    assert resolve_rank(0, 2) == (0, 2)
    with pytest.raises(ValueError, match="rank=3, world_size=3"):
        resolve_rank(3)


def _keys_of(loader) -> list[str]:
    return [k for _, _, keys in loader for k in keys]


def test_exact_mode_yields_every_sample_once_across_2_ranks_x_2_workers(demo_shards, monkeypatch):
    manifest = read_manifest(str(demo_shards))
    expected = set(manifest.samples("train").column("key").to_pylist())
    seen = Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))  # rank/world size from the environment, as under Ray Train
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = make_eval_loader(manifest, "train", image_size=16, batch_size=7, num_workers=2, with_keys=True)
        keys = _keys_of(loader)
        assert len(keys) == loader.num_samples
        seen.update(keys)
    assert set(seen) == expected and set(seen.values()) == {1}


def test_training_ranks_read_disjoint_shards(demo_shards):
    manifest = read_manifest(str(demo_shards))
    shard_of = {r["key"]: r["shard"] for r in manifest.samples("train").to_pylist()}
    names = [s.name for s in manifest.shard_infos("train")]
    used = []
    for rank in range(2):
        loader = make_train_loader(manifest, image_size=16, batch_size=8, steps_per_epoch=12, num_workers=2,
                                   seed=0, rank=rank, world_size=2, shuffle_buffer=50, with_keys=True)
        shards = {shard_of[k] for k in _keys_of(loader)}
        assert shards <= set(node_shards(names, rank, 2))
        used.append(shards)
    assert not used[0] & used[1] and len(used[0]) > 1 and len(used[1]) > 1


def _first_batches(loader, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i, (x, y) in enumerate(loader):
        out.append((x, y))
        if i + 1 == n:
            break
    return out


def test_training_order_is_a_function_of_seed_epoch_and_rank(demo_shards):
    def loader(rank=0, seed=0):
        return make_train_loader(str(demo_shards), image_size=16, batch_size=8, steps_per_epoch=4, num_workers=2,
                                 seed=seed, rank=rank, world_size=2, shuffle_buffer=64, flip=True, dequantize=True)

    def same(a, b):
        return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))

    first = loader()
    epoch0 = _first_batches(first)
    assert same(epoch0, _first_batches(loader()))  # same (seed, epoch, rank): same batches, same noise
    epoch1 = _first_batches(first)  # the second iteration is epoch 1
    assert first.epoch == 2 and not same(epoch0, epoch1)
    resumed = loader()
    resumed.set_epoch(1)
    assert same(epoch1, _first_batches(resumed))
    assert not same(epoch0, _first_batches(loader(rank=1)))
    assert not same(epoch0, _first_batches(loader(seed=1)))
