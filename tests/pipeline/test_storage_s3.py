"""Checkpoints, evaluation reports and sweep summaries on s3:// through the one fsspec layer
(sharding/storage.py), against a real S3-compatible server (moto) on 127.0.0.1."""
from __future__ import annotations

import argparse
import hashlib
import json

import fsspec
import pytest
import torch

from models import build_models
from pipeline.checkpoint import (RECORD_FILE, STATE_FILE, checkpoint_dir_name, find_latest, list_checkpoints,
                                 load_newest, newest_intact, read_record, repair_run, save_state)
from pipeline.config import load_config
from pipeline.evaluate import add_arguments, load_trained
from pipeline.evaluate import main as eval_main
from sharding.storage import Destination, is_url
from tuning.sweep import copy_summary

pytest.importorskip("moto.server", reason="moto[server] provides the local S3 server")

DEBUG = ["model.preset=csc_ctrl_debug"]


def s3() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("s3", skip_instance_cache=True)


def model_state(step: int) -> dict:
    cfg = load_config(None, [*DEBUG, "run.name=on-s3"])
    torch.manual_seed(step)
    encoder, decoder = build_models(cfg.model)
    return {"step": step, "config": cfg.to_dict(), "encoder": encoder.state_dict(), "decoder": decoder.state_dict()}


def test_is_url():
    assert is_url("s3://b/x") and is_url("memory://x") and is_url("gs://b")
    assert not is_url("/tmp/x") and not is_url("runs/x") and not is_url("file:///tmp/x")


def test_checkpoints_on_s3_are_written_listed_verified_loaded_and_repaired(s3_endpoint):
    run = "s3://shards-bucket/runs/r1"
    for step in (1, 2, 3):
        written = save_state(model_state(step), f"{run}/{checkpoint_dir_name(step)}")
        assert written == f"{run}/{checkpoint_dir_name(step)}/{STATE_FILE}"
    newest = f"{run}/{checkpoint_dir_name(3)}"
    assert list_checkpoints(run) == [f"{run}/{checkpoint_dir_name(s)}" for s in (3, 2, 1)]
    assert find_latest(run) == newest and find_latest(newest) == newest
    stored = s3().cat_file(f"shards-bucket/runs/r1/{checkpoint_dir_name(3)}/{STATE_FILE}")
    record = read_record(newest)
    assert record["files"][STATE_FILE] == {"bytes": len(stored), "sha256": hashlib.sha256(stored).hexdigest()}
    path, state = load_newest(run)
    assert path == newest and state["step"] == 3
    assert not [p for p in s3().find("shards-bucket/runs") if p.rsplit("/", 1)[1].startswith(".")]  # no temporaries

    # the newest checkpoint is damaged on the server; Ray Train's record of the run lists all three
    s3().pipe_file(f"shards-bucket/runs/r1/{checkpoint_dir_name(3)}/{STATE_FILE}", stored[: len(stored) // 2])
    resume, state, damaged = newest_intact(run)
    assert resume == f"{run}/{checkpoint_dir_name(2)}" and state["step"] == 2
    assert [d.path for d in damaged] == [newest] and "bytes" in damaged[0].reason
    results = [{"checkpoint_dir_name": checkpoint_dir_name(s), "metrics": {}} for s in (1, 2, 3)]
    snapshot = {"checkpoint_results": results, "checkpoint_report_indices": [0, 1, 2],
                "latest_checkpoint_result": results[2]}
    s3().pipe_file("shards-bucket/runs/r1/checkpoint_manager_snapshot.json", json.dumps(snapshot).encode())
    repair = repair_run(run)
    assert repair.resume_from == f"{run}/{checkpoint_dir_name(2)}" and repair.step == 2
    assert [dest for _, dest in repair.moved] == [f"{run}/damaged_{checkpoint_dir_name(3)}"]
    names = {p.rsplit("/", 1)[1] for p in s3().ls("shards-bucket/runs/r1", detail=False, refresh=True)}
    assert f"damaged_{checkpoint_dir_name(3)}" in names and checkpoint_dir_name(3) not in names
    rewritten = json.loads(s3().cat_file("shards-bucket/runs/r1/checkpoint_manager_snapshot.json"))
    assert [r["checkpoint_dir_name"] for r in rewritten["checkpoint_results"]] == [checkpoint_dir_name(s) for s in (1, 2)]
    assert rewritten["latest_checkpoint_result"]["checkpoint_dir_name"] == checkpoint_dir_name(2)
    assert list_checkpoints(run)[0] == f"{run}/{checkpoint_dir_name(2)}"
    assert s3().exists(f"shards-bucket/runs/r1/damaged_{checkpoint_dir_name(3)}/{RECORD_FILE}")


def test_eval_reads_a_checkpoint_on_s3_and_writes_its_report_there(s3_endpoint, demo_shards):
    run = "s3://shards-bucket/runs/eval"
    save_state(model_state(5), f"{run}/{checkpoint_dir_name(5)}")
    cfg, _, _, desc = load_trained(run)
    assert cfg.run.name == "on-s3" and desc.startswith(f"{run}/{checkpoint_dir_name(5)}")
    out = "s3://shards-bucket/reports/eval-val"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([run, "--data", demo_shards, "--split", "val", "--max-batches", "1",
                              "--batch-size", "16", "--device", "cpu", "--no-fd", "--out", out])
    assert eval_main(args) == 0
    names = {p.rsplit("/", 1)[1] for p in s3().ls("shards-bucket/reports/eval-val", detail=False, refresh=True)}
    assert {"report.html", "metrics.json", "recon.png", "atoms_stage1.png"} <= names
    report = json.loads(s3().cat_file("shards-bucket/reports/eval-val/metrics.json"))
    assert report["metrics"]["images"] == 16 and report["model"].startswith(run)
    assert "recon.png" in s3().cat_file("shards-bucket/reports/eval-val/report.html").decode()


def test_sweep_summary_is_published_to_s3(s3_endpoint, tmp_path):
    (tmp_path / "trials.csv").write_text("trial,psnr\na,1.0\n")
    (tmp_path / "best_config.yaml").write_text("train:\n  steps: 3\n")
    copy_summary(tmp_path, "s3://shards-bucket/sweeps/s1/summary")
    loc = Destination("s3://shards-bucket/sweeps/s1/summary")
    assert loc.listdir() == ["best_config.yaml", "trials.csv"]
    assert loc.read_bytes("trials.csv") == b"trial,psnr\na,1.0\n"
