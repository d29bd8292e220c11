"""Checkpoints are verified: a damaged newest checkpoint is named by path and the run resumes from the
newest intact one; `cscctrl eval` does the same (issue 17, item 2). In-process runs
(scaling.num_workers=0) with a real sqlite MLflow store, and one real Ray Train run whose record of the
run points at a damaged and at a deleted checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from pipeline.checkpoint import (RECORD_FILE, STATE_FILE, CheckpointError, load_checkpoint, newest_intact,
                                 save_state)
from pipeline.cli import main
from tests.pipeline.trainer_helpers import TINY


def _state(step: int = 3) -> dict:
    return {"step": step, "w": torch.arange(1000, dtype=torch.float32), "config": {"run": {"name": "x"}}}


def test_a_checkpoint_carries_a_record_written_last(tmp_path):
    save_state(_state(), tmp_path / "c")
    record = json.loads((tmp_path / "c" / RECORD_FILE).read_text())
    assert record["step"] == 3 and record["files"][STATE_FILE]["bytes"] == (tmp_path / "c" / STATE_FILE).stat().st_size
    assert record["config"] == {"run": {"name": "x"}}
    assert torch.equal(load_checkpoint(tmp_path / "c")["w"], torch.arange(1000, dtype=torch.float32))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [RECORD_FILE, STATE_FILE]  # no temporaries


@pytest.mark.parametrize("damage, needle", [
    ("garbage", "sha256 differs"),
    ("truncate", "bytes, its record says"),
    ("record", "checkpoint.json is damaged"),
    ("missing", "state.pt is missing"),
])
def test_damage_is_detected_and_named(tmp_path, damage, needle):
    d = tmp_path / "c"
    save_state(_state(), d)
    state = d / STATE_FILE
    if damage == "garbage":
        state.write_bytes(os.urandom(state.stat().st_size))
    elif damage == "truncate":
        state.write_bytes(state.read_bytes()[:-100])
    elif damage == "record":
        (d / RECORD_FILE).write_text("{not json")
    else:
        state.unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d)
    assert needle in str(e.value) and str(d) in str(e.value)


def test_a_checkpoint_without_a_record_loads_when_intact_and_is_damaged_otherwise(tmp_path):
    d = tmp_path / "old"
    save_state(_state(), d)
    (d / RECORD_FILE).unlink()  # as written before records existed
    assert load_checkpoint(d)["step"] == 3
    (d / STATE_FILE).write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match="does not load as a checkpoint"):
        load_checkpoint(d)


def test_newest_intact_passes_over_damaged_ones(tmp_path):
    for step in (2, 4, 6):
        save_state(_state(step), tmp_path / f"checkpoint_step{step:09d}")
    (tmp_path / "checkpoint_step000000006" / STATE_FILE).write_bytes(b"\0" * 64)
    path, state, damaged = newest_intact(tmp_path)
    assert path.endswith("checkpoint_step000000004") and state["step"] == 4
    assert [d.path.rsplit("/", 1)[-1] for d in damaged] == ["checkpoint_step000000006"]


def _train(capsys, tmp_path, *items: str) -> tuple[int, str, str]:
    code = main(["train", *TINY, f"run.storage_path={tmp_path}", "run.name=ck", "train.log_every=2",
                 "train.checkpoint_every=2", *items])
    out, err = capsys.readouterr()
    return code, out, err


def test_in_process_run_resumes_from_the_newest_intact_checkpoint(tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path, "train.steps=4")
    assert code == 0, err[-3000:]
    run = tmp_path / "ck"
    damaged = run / "checkpoint_step000000004"
    garbage = os.urandom((damaged / STATE_FILE).stat().st_size)
    (damaged / STATE_FILE).write_bytes(garbage)

    code, out, err = _train(capsys, tmp_path, "train.steps=6")
    assert code == 0, err[-3000:]
    assert f"checkpoint {damaged} is damaged" in out and "sha256 differs" in out
    assert f"moved to {run / 'damaged_checkpoint_step000000004'}" in out
    assert "resuming ck from step 2" in out
    assert (run / "damaged_checkpoint_step000000004" / STATE_FILE).read_bytes() == garbage  # kept for inspection
    assert load_checkpoint(run / "checkpoint_step000000006")["step"] == 6

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cscctrl").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_eval_uses_the_newest_intact_checkpoint_and_names_the_damaged_one(demo_shards, tmp_path, capsys):
    code, _, err = _train(capsys, tmp_path, "train.steps=4")
    assert code == 0, err[-3000:]
    damaged = tmp_path / "ck" / "checkpoint_step000000004"
    (damaged / STATE_FILE).write_bytes((damaged / STATE_FILE).read_bytes()[:1000])  # a torn copy
    code = main(["eval", str(tmp_path / "ck"), "--data", demo_shards, "--split", "val", "--no-fd", "--device", "cpu",
                 "--max-batches", "1", "--out", str(tmp_path / "report")])
    _out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert f"checkpoint {damaged} is damaged" in err
    assert "checkpoint_step000000002 (step 2)" in json.loads((tmp_path / "report" / "metrics.json").read_text())["model"]

    (tmp_path / "ck" / "checkpoint_step000000002" / STATE_FILE).write_bytes(b"x")
    code = main(["eval", str(tmp_path / "ck"), "--data", demo_shards, "--no-fd", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "no intact checkpoint under" in err and "Traceback" not in err


@pytest.mark.ray
@pytest.mark.slow
def test_ray_run_resumes_past_a_damaged_and_a_deleted_checkpoint(tmp_path):
    """Ray Train's record of the run lists checkpoints 2, 4 and 6. The newest holds garbage and folder 4 was
    deleted by hand: the run resumes from step 2, naming both, instead of failing three times on the
    garbage and then telling the user to delete the whole run."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "pipeline", "train", *[i for i in TINY if not i.startswith("scaling.num_workers")],
            "scaling.num_workers=1", "data.loader_workers=0", "train.log_every=2", "train.checkpoint_every=2",
            "scaling.keep_checkpoints=3", f"run.storage_path={tmp_path}", "run.name=rk"]
    first = subprocess.run([*args, "train.steps=6"], capture_output=True, text=True, timeout=400, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "rk"
    assert "checkpoint_step000000004" in (run / "checkpoint_manager_snapshot.json").read_text()
    (run / "checkpoint_step000000006" / STATE_FILE).write_bytes(b"garbage" * 100)
    for f in (run / "checkpoint_step000000004").iterdir():
        f.unlink()
    (run / "checkpoint_step000000004").rmdir()

    second = subprocess.run([*args, "train.steps=8"], capture_output=True, text=True, timeout=400, env=env)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert f"checkpoint {run / 'checkpoint_step000000006'} is damaged" in out
    assert f"checkpoint folder {run / 'checkpoint_step000000004'} recorded by Ray Train no longer exists" in out
    assert "resuming rk from step 2" in out
    assert load_checkpoint(run / "checkpoint_step000000008")["step"] == 8
