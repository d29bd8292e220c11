"""A workflow whose storage is an s3:// URL, against the local S3-compatible server (moto) and a real MLflow
server: the shards (written by Ray tasks), the stage records, the training run's checkpoints and the
evaluation reports live in the bucket; running it again skips every stage from what the bucket holds."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import yaml

from tests.pipeline.test_workflow import TRAINING, summary_states

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_workflow_with_s3_storage_runs_and_is_reused(s3_endpoint, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from sharding.plan import plan_shards
    from sharding.sources import open_source
    from sharding.storage import Destination
    from sharding.write import shard_source

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("workflow-bucket"):  # a bucket of its own (Ray Train leaves a marker object in it)
        fs.mkdir("workflow-bucket")
    storage = "s3://workflow-bucket/wf"
    tree = {"name": "s3wf", "source": "demo", "source_options": {"train": 48, "val": 16, "unseen": 0, "size": 32},
            "storage": storage, "tracking_uri": mlflow_server, "experiment": "wf-s3",
            "shards": {"shard_maxcount": 16, "tasks": 2}, "training": {"set": dict(TRAINING)},
            "evaluate": {"sets": [{"split": "val"}], "batch_size": 16},
            "register": {"model": "s3wf-model", "alias": "candidate"}}
    path = tmp_path / "s3wf.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = {**os.environ, **s3_endpoint, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true",
           "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline", "run", "--no-progress", str(path)],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)

    first = run()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert summary_states(first.stdout) == dict.fromkeys(("shard", "verify", "train", "evaluate", "register"), "done")
    fs.invalidate_cache()
    records = json.loads(fs.cat_file("workflow-bucket/wf/workflows/s3wf/stages.json"))
    assert {s: r["state"] for s, r in records.items()} == dict.fromkeys(("shard", "verify", "train", "evaluate", "register"), "done")
    train = records["train"]["outputs"]
    assert train["run_dir"] == f"{storage}/{train['run_name']}"
    assert train["checkpoint"].startswith(f"{train['run_dir']}/checkpoint") and fs.exists(train["checkpoint"])
    assert sorted(p for p in os.listdir(tmp_path) if p != "s3wf.yaml") == []  # nothing written to the cwd
    # The evaluation report of the model read back from the bucket is in the bucket, beside its run.
    report = records["evaluate"]["outputs"]["reports"]["val"]
    assert report.startswith(f"{train['run_dir']}/workflow-eval-") and report.endswith("/report.html")
    assert fs.exists(report) and fs.exists(report.replace("report.html", "metrics.json"))
    (row,) = records["evaluate"]["outputs"]["table"]
    assert row["images"] == 16 and row["psnr"] > 0

    # The bucket's shards equal one process writing the same plan.
    plan = plan_shards(open_source("demo", train=48, val=16, unseen=0, size=32), shard_maxcount=16)
    reference = tmp_path / "reference"
    shard_source(plan, Destination(str(reference)))
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert len(names) == 4
    for name in names:
        assert fs.cat_file(f"workflow-bucket/wf/shards/{name}") == (reference / name).read_bytes(), name

    client = MlflowClient(mlflow_server)
    mv = client.get_model_version_by_alias("s3wf-model", "candidate")
    assert mv.tags["cscctrl.run_name"] == train["run_name"]

    again = run()
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert summary_states(again.stdout) == dict.fromkeys(("shard", "verify", "train", "evaluate", "register"), "skipped")
