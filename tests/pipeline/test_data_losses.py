"""Samples lost to damaged shards reach the user: the progress line and MLflow metrics of a training run,
and the report and exit status of an exact `cscctrl eval` pass (issue 17, item 1). Real demo shards
damaged on disk, in-process runs (scaling.num_workers=0) with a real sqlite MLflow store."""
from __future__ import annotations

import json
import shutil

import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from tests.pipeline.trainer_helpers import TINY
from tests.sharding.test_sample_accounting import flip_middle


@pytest.fixture
def damaged_shards(demo_shards, tmp_path):
    """The demo shards (train 256 in 4 shards, val 64 in 1) with 2 KB flipped in the middle of every shard
    and the second half of train-000001.tar cut off."""
    dest = tmp_path / "damaged"
    shutil.copytree(demo_shards, dest)
    for path in sorted(dest.glob("*.tar")):
        flip_middle(path)
    cut = dest / "train-000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    return dest


def _checkpoint(tmp_path, shards) -> str:
    from models import build_models
    from pipeline.checkpoint import save_state
    from pipeline.config import load_config

    cfg = load_config(None, [i for i in TINY if not i.startswith("data.synthetic")] + [f"data.shards={shards}"])
    encoder, decoder = build_models(cfg.model)
    save_state({"config": cfg.to_dict(), "encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                "step": 0}, tmp_path / "ckpt")
    return str(tmp_path / "ckpt")


def test_an_exact_evaluation_that_lost_samples_says_so_and_fails(damaged_shards, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, damaged_shards)
    args = ["eval", ckpt, "--split", "train", "--no-fd", "--device", "cpu", "--batch-size", "64"]
    code = main([*args, "--out", str(tmp_path / "strict")])
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "strict" / "metrics.json").read_text())
    samples = report["samples"]
    assert code == 1
    assert samples["promised"] == 256 and samples["read"] == report["metrics"]["images"]
    assert samples["lost"] == 256 - samples["read"] == report["metrics"]["lost_samples"] > 0
    assert sum(s["lost"] for s in samples["shards"]) == samples["lost"]
    cut = next(s for s in samples["shards"] if s["shard"] == "train-000001.tar")
    assert cut["lost"] >= 20 and "truncated" in cut["reason"]
    line = next(line for line in err.splitlines() if line.startswith("cscctrl eval: error:"))
    assert f"{samples['lost']} of the 256 samples" in line and "train-000001.tar" in line and "cscctrl verify" in line

    code = main([*args, "--allow-lost-samples", "--out", str(tmp_path / "lenient")])
    err = capsys.readouterr().err
    assert code == 0 and f"cscctrl eval: WARNING: {samples['lost']} of the 256 samples" in err


def test_training_shows_and_logs_what_damaged_shards_cost(damaged_shards, tmp_path, capsys):
    base = [i for i in TINY if not i.startswith("data.synthetic")]
    code = main(["train", *base, f"data.shards={damaged_shards}", "data.loader_workers=0", "data.shuffle_buffer=64",
                 "train.steps=2", "train.log_every=1", "train.eval_batches=1", f"run.storage_path={tmp_path}",
                 "run.name=lossy"])
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("[cscctrl] step")]
    assert "| LOST " in lines[-1] and "damaged shards (cscctrl verify)" in lines[-1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cscctrl").experiment_id])[0]
    assert run.data.metrics["data/lost_samples"] > 0 and "data/corrupt_shard_reads" in run.data.metrics
    assert "eval/lost_samples" in run.data.metrics
