"""Run names stay inside run.storage_path and survive MLflow's search filter; credentials inside URLs are
never echoed or stored; `cscctrl eval RUN_ID` reads the run's store and never creates one (issue 17,
item 7). In-process runs (scaling.num_workers=0) with real sqlite MLflow stores."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import load_config
from tests.pipeline.trainer_helpers import TINY
from tests.sharding.shardtest_helpers import REPO


@pytest.mark.parametrize("name", ["../../escaped", "a/b", ".hidden", "both'\"quotes"])
def test_a_run_name_that_would_leave_the_storage_folder_is_refused(name, tmp_path, capsys):
    storage = tmp_path / "deep" / "runs"
    code = main(["train", *TINY, "train.steps=1", f"run.storage_path={storage}", f"run.name={name}"])
    err = capsys.readouterr().err
    assert code == 2 and "run.name=" in err and "Traceback" not in err
    assert not (tmp_path / "escaped").exists() and not storage.exists()


def test_a_run_name_with_a_quote_resumes_its_mlflow_run(tmp_path, capsys):
    items = ["train", *TINY, f"run.storage_path={tmp_path}", "run.name=it's-mine", "train.log_every=1",
             "train.checkpoint_every=1"]
    assert main([*items, "train.steps=1"]) == 0
    assert main([*items, "train.steps=2"]) == 0, capsys.readouterr().err[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cscctrl").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["cscctrl.run_name"] == "it's-mine"
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/step")) == [1, 2]


def test_credentials_in_urls_are_neither_echoed_nor_stored(tmp_path, capsys):
    code = main(["train", *TINY, f"run.storage_path={tmp_path}", "tracking.uri=http://alice:hunter2@127.0.0.1:9/"])
    err = capsys.readouterr().err
    assert code == 2 and "http://***@127.0.0.1:9" in err and "hunter2" not in err and "alice" not in err

    from pipeline.tracking import MLflowTracker

    cfg = load_config(None, TINY + [f"run.storage_path={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
                                    "data.shards=s3://AKIAEXAMPLE:s3cr3t@bucket/shards"])
    tracker = MLflowTracker(cfg, "secret-run")
    tracker.finish()
    run = MlflowClient(cfg.tracking.uri).get_run(tracker.run_id)
    assert run.data.params["data.shards"] == "s3://***@bucket/shards"
    config_text = MlflowClient(cfg.tracking.uri).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    text = Path(config_text).read_text()
    assert "s3cr3t" not in text and "AKIAEXAMPLE" not in text


def test_eval_of_a_run_id_reads_the_runs_store_and_creates_none(demo_shards, tmp_path, capsys):
    cwd = tmp_path / "work"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    lost = subprocess.run([sys.executable, "-m", "pipeline", "eval", "0123456789abcdef0123456789abcdef", "--no-fd"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert lost.returncode == 2 and "there is no MLflow store at" in lost.stderr and "--tracking-uri" in lost.stderr
    assert not (cwd / "mlflow.db").exists() and not list(cwd.iterdir())  # nothing created

    base = [i for i in TINY if not i.startswith("data.synthetic")]
    assert main(["train", *base, f"data.shards={demo_shards}", "data.loader_workers=0", "train.steps=1",
                 "train.eval_batches=0", f"run.storage_path={cwd / 'runs'}", "run.name=by-id"]) == 0
    capsys.readouterr()
    client = MlflowClient(f"sqlite:///{cwd / 'runs' / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("cscctrl").experiment_id])[0].info.run_id
    found = subprocess.run([sys.executable, "-m", "pipeline", "eval", run_id, "--no-fd", "--max-batches", "1",
                            "--device", "cpu"], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert found.returncode == 0, found.stderr[-3000:]
    assert f"{cwd / 'runs' / 'by-id'}" in found.stdout and not (cwd / "mlflow.db").exists()
