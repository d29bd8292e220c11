"""What a training run's MLflow page shows besides metrics (issue 18, items 1-4), each through the tracker
rank 0 uses and a real sqlite store: images keyed by name at a training step, the shard sets as dataset
inputs with the manifest digest, system metrics sampled while the run is open, and the run's description.
(The demo test finds all of them on a real training run: tests/pipeline/test_demo.py.)"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from sharding.manifest import read_manifest
from tests.pipeline.trainer_helpers import TINY


def _tracker(tmp_path, name="page", **kw):
    from pipeline.tracking import MLflowTracker

    cfg = load_config(None, TINY + [f"run.storage_path={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db"])
    return MLflowTracker(cfg, name, run_dir=str(tmp_path / name), **kw), cfg


def test_images_are_keyed_by_name_at_their_training_step(tmp_path):
    tracker, _ = _tracker(tmp_path)
    picture = np.zeros((8, 8, 3), np.uint8)
    for step in (50, 100):
        tracker.log_image(picture, key="recon", step=step)
    tracker.log_image(picture, "eval/val_recon.png")  # an evaluation picture stays an artifact file
    with pytest.raises(ValueError, match="image key"):  # refused at once: the outbox would retry it forever
        tracker.log_image(picture, key="recon#1", step=1)
    tracker.finish()

    client = MlflowClient(tracker.uri)
    names = [a.path for a in client.list_artifacts(tracker.run_id, "images")]
    steps = sorted(int(m.group(1)) for p in names if (m := re.match(r"images/recon\+step\+(\d+)\+.*\.png$", p)))
    assert steps == [50, 100], names
    assert client.get_run(tracker.run_id).data.tags["mlflow.loggedImages"] == "True"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "eval")] == ["eval/val_recon.png"]


def test_shard_splits_are_dataset_inputs_with_the_manifest_digest(tmp_path, demo_shards):
    from pipeline.datasets import shard_dataset

    tracker, _ = _tracker(tmp_path)
    train = shard_dataset(demo_shards, "train", "training")
    val = shard_dataset(demo_shards, "val", "evaluation")
    tracker.log_datasets([train, val])
    tracker.log_datasets([train])  # a resumed run logs its data again: still one input
    tracker.finish()

    inputs = MlflowClient(tracker.uri).get_run(tracker.run_id).inputs.dataset_inputs
    found = {d.dataset.name: d for d in inputs}
    manifest = read_manifest(demo_shards)
    assert sorted(found) == ["demo-shards-32px/train", "demo-shards-32px/val"]
    for split, context in (("train", "training"), ("val", "evaluation")):
        d = found[f"demo-shards-32px/{split}"]
        assert d.dataset.digest == manifest.digest(split)
        assert {t.key: t.value for t in d.tags} == {"mlflow.data.context": context}
        assert json.loads(d.dataset.source) == {"uri": str(Path(demo_shards).resolve())}
        profile = json.loads(d.dataset.profile)
        assert profile["num_rows"] == manifest.num_samples(split) and profile["split"] == split
        assert d.dataset.source_type == "local"


def test_the_digest_names_the_shard_bytes_not_their_place(tmp_path, demo_shards):
    copy = tmp_path / "copy"
    shutil.copytree(demo_shards, copy)
    original, moved = read_manifest(demo_shards), read_manifest(str(copy))
    assert moved.digest("train") == original.digest("train") and len(original.digest("train")) == 32
    assert original.digest("train") != original.digest("val")


def test_system_metrics_are_sampled_while_the_run_is_open(tmp_path):
    tracker, _ = _tracker(tmp_path)
    gpu = tracker.start_system_metrics(0.2)
    tracker.system_metrics.log_now({"data_wait_percentage": 12.5})
    time.sleep(1.5)
    tracker.finish()

    client = MlflowClient(tracker.uri)
    cpu = client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 3, cpu
    assert all(0 <= m.step <= 60 for m in cpu)  # whole seconds since the run started
    assert all(0.0 <= m.value <= 100.0 for m in cpu)
    memory = client.get_metric_history(tracker.run_id, "system/system_memory_usage_megabytes")
    assert memory and memory[-1].value > 0
    wait = client.get_metric_history(tracker.run_id, "system/data_wait_percentage")
    assert [m.value for m in wait] == [12.5]
    gpu_metrics = [k for k in client.get_run(tracker.run_id).data.metrics if k.startswith("system/gpu_")]
    assert bool(gpu_metrics) == gpu  # GPU metrics exactly when NVML found a GPU


def test_a_new_run_gets_a_description_and_a_resumed_run_keeps_its_own(tmp_path):
    from pipeline.run_description import describe_run

    cfg = load_config(None, ["model.preset=csc_ctrl_32", "model.in_channels=1", "objective.mode=multiclass",
                             "objective.consistency_weight=0.01", "train.batch_size_per_worker=128",
                             "scaling.num_workers=2", "data.shards=/data/fmnist",
                             "tracking.command=cscctrl train -c demo.yaml"])
    text = describe_run(cfg, num_classes=10, train_samples=10000)
    for fact in ("csc_ctrl_32: 32 px grey", "multiclass over 10 classes + sample-wise term (λ₂ = 0.01)",
                 "Data: /data/fmnist [train], 10000 images", "Global batch 256 = 2 workers × 128",
                 "2 workers × 1 CPU, no GPU", "Started by: cscctrl train -c demo.yaml"):
        assert fact in text, (fact, text)
    gpu = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=8"])
    assert "8 × NVIDIA H200, 1 GPU per worker" in describe_run(gpu, num_classes=1, gpu_name="NVIDIA H200")

    tracker, _ = _tracker(tmp_path, description=text)
    tracker.finish()
    client = MlflowClient(tracker.uri)
    assert client.get_run(tracker.run_id).data.tags["mlflow.note.content"] == text
    client.set_tag(tracker.run_id, "mlflow.note.content", "edited in the UI")
    again, _ = _tracker(tmp_path, description="another text")
    again.finish()
    assert again.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).data.tags["mlflow.note.content"] == "edited in the UI"


def test_the_launcher_records_the_command_that_started_the_run():
    from pipeline import cli
    from pipeline.launch import with_command

    cfg = load_config(None, TINY)
    cli.INVOCATION = "cscctrl train tracking.uri=http://user:secret@host:5000"
    try:
        assert with_command(cfg).tracking.command == "cscctrl train tracking.uri=http://***@host:5000"
    finally:
        cli.INVOCATION = ""
    named = load_config(None, TINY + ["tracking.command=cscctrl tune -c debug"])
    assert with_command(named).tracking.command == "cscctrl tune -c debug"  # a sweep's trials keep the sweep's
