"""An s3:// destination against a real S3-compatible server (moto) on 127.0.0.1: write with parallel
processes, read the manifest, verify, stream batches; no temporary object is ever left visible."""
from __future__ import annotations

import fsspec

from sharding.manifest import read_manifest
from sharding.stream import make_eval_loader, make_train_loader
from sharding.verify import verify_shards
from tests.sharding.shardtest_helpers import run_cli


def test_shard_verify_and_stream_from_s3(s3_endpoint):
    url = "s3://shards-bucket/demo"
    result = run_cli("shard", "demo", url, "--demo-train", "60", "--demo-val", "20", "--demo-unseen", "0",
                     "--demo-size", "16", "--shard-maxcount", "16", "--workers", "2", env=s3_endpoint)
    assert result.returncode == 0, result.stderr
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("shards-bucket/demo", detail=False, refresh=True))
    assert names == ["_parts", "manifest", "manifest.json", "train-000000.tar", "train-000001.tar",
                     "train-000002.tar", "train-000003.tar", "val-000000.tar", "val-000001.tar"]
    assert not [p for p in fs.find("shards-bucket") if p.rsplit("/", 1)[1].startswith(".")]  # no temporaries

    manifest = read_manifest(url)
    assert manifest.shard_urls("val") == ["s3://shards-bucket/demo/val-000000.tar", "s3://shards-bucket/demo/val-000001.tar"]
    assert verify_shards(manifest).ok
    keys = [k for _, _, ks in make_eval_loader(manifest, "val", image_size=16, batch_size=8, num_workers=2,
                                               with_keys=True) for k in ks]
    assert sorted(keys) == sorted(manifest.samples("val").column("key").to_pylist())
    loader = make_train_loader(url, image_size=16, batch_size=8, steps_per_epoch=5, num_workers=1, seed=0)
    assert [x.shape for x, _ in loader] == [(8, 3, 16, 16)] * 5 and loader.stats.corrupt_shards == 0

    fs.rm_file("shards-bucket/demo/train-000002.tar")
    fs.invalidate_cache()
    check = run_cli("verify", url, "--no-progress", env=s3_endpoint)
    assert check.returncode == 1 and "MISSING" in check.stdout and "train-000002.tar" in check.stdout
