"""Every sample the manifest promises is read or counted as lost, per shard and with the reason; a damaged
stretch inside a shard costs only the samples it touches (issue 17, item 1). Real shards of real photo
crops, damaged on disk, read by the real WebDataset pipeline."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from sharding.manifest import read_manifest
from sharding.stream import make_eval_loader, make_train_loader


def flip_middle(path: Path, n: int = 2048) -> None:
    """Invert ``n`` bytes in the middle of a file (size unchanged)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def exact_pass(dest: Path, split: str, num_workers: int = 0) -> tuple[int, dict]:
    loader = make_eval_loader(str(dest), split, image_size=16, batch_size=16, num_workers=num_workers)
    read = sum(x.shape[0] for x, _ in loader)
    return read, loader.account(read)


def test_an_intact_shard_set_loses_nothing(demo_shards):
    read, account = exact_pass(demo_shards, "train")
    assert read == 240 and account == {"promised": 240, "read": 240, "lost": 0, "shards": []}


def test_a_damaged_stretch_mid_shard_costs_only_the_samples_it_touches(demo_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    flip_middle(dest / "train-000004.tar")
    read, account = exact_pass(dest, "train")
    promised = read_manifest(str(dest)).num_samples("train")
    assert account["promised"] == promised == 240
    assert 1 <= account["lost"] <= 3 and read == promised - account["lost"]  # the rest of the shard is read
    [entry] = account["shards"]
    assert entry["shard"] == "train-000004.tar" and entry["lost"] == account["lost"] and entry["reason"]


def test_truncated_and_unreadable_shards_count_every_missing_sample(demo_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    truncated = dest / "train-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    (dest / "train-000007.tar").write_bytes(os.urandom((dest / "train-000007.tar").stat().st_size))
    read, account = exact_pass(dest, "train", num_workers=2)  # counted in the loader worker processes
    lost = {s["shard"]: s for s in account["shards"]}
    assert set(lost) == {"train-000002.tar", "train-000007.tar"}
    assert lost["train-000007.tar"]["lost"] == 24 and "not found in the shard" in lost["train-000007.tar"]["reason"]
    assert 10 <= lost["train-000002.tar"]["lost"] < 24 and "(truncated)" in lost["train-000002.tar"]["reason"]
    assert read + account["lost"] == 240


def test_the_training_stream_counts_what_it_could_not_deliver(demo_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    for path in dest.glob("train-*.tar"):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    loader = make_train_loader(str(dest), image_size=8, batch_size=8, steps_per_epoch=6, num_workers=0, seed=0,
                               rank=0, world_size=1, shuffle_buffer=16)
    assert [x.shape[0] for x, _ in loader] == [8] * 6
    stats = loader.stats
    assert stats.corrupt_shards >= 1 and stats.lost_samples >= 10 * stats.corrupt_shards
    assert all("truncated" in s["reason"] for s in stats.losses())
