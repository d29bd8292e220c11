"""Plan printers change nothing, and the workflow reads command-line values as `cscctrl train` does.

- `cscctrl run fashion_mnist --print-plan` and `cscctrl tune -c sparsity_unroll --print-plan`, run in an
  empty working directory (their default storage is relative to it), leave it empty: no runs/ folder, no
  MLflow store, no demo shards; the tune plan names the shards its first run would write instead;
- `cscctrl run fashion_mnist optim.encoder.lr=1e-4` types the value as a number (it used to be the
  string '1e-4', refused by the training config), in the plan and in the training config built from it;
  so does 1e-4 written in a workflow file.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.workflow import WorkflowError, load_workflow
from pipeline.workflow.context import resolve

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
       "TQDM_DISABLE": "1"}
for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
    ENV.pop(var, None)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def cscctrl(cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=timeout)


def test_run_print_plan_writes_nothing_and_types_overrides(tmp_path):
    proc = cscctrl(tmp_path, "run", "fashion_mnist", "optim.encoder.lr=1e-4", "--print-plan")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(tmp_path) == []  # no runs/fashion-mnist, no mlflow.db
    plan = yaml.safe_load(proc.stdout)
    assert plan["training"]["set"]["optim.encoder.lr"] == 0.0001
    assert plan["stages"] == ["shard", "verify", "tune", "train", "evaluate", "register"]
    assert plan["resolved_tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'runs' / 'fashion-mnist' / 'mlflow.db'}"
    assert plan["shard_url"] == "runs/fashion-mnist/shards"


def test_tune_print_plan_shards_nothing_and_describes_the_shards_instead(tmp_path):
    proc = cscctrl(tmp_path, "tune", "-c", "sparsity_unroll", "--print-plan")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(tmp_path) == []  # no runs/demo-shards-32px, no mlflow.db
    doc = yaml.safe_load(proc.stdout.split("base config:")[0])
    pending = doc["shards (written by the first run)"]
    url = str(tmp_path.resolve() / "runs" / "demo-shards-32px")
    assert pending["url"] == url and pending["state"] == "to be written"
    assert pending["samples"] == {"train": 3072, "val": 256, "unseen": 256} and pending["shards"] == 8
    assert f"shards: {url}" in proc.stdout.split("base config:")[1]


def test_command_line_and_file_numbers_are_numbers(tmp_path):
    wf = load_workflow("fashion_mnist", ["optim.encoder.lr=1e-4", "storage=" + str(tmp_path / "store")])
    assert wf.training.set["optim.encoder.lr"] == 1e-4
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resolved = resolve(wf, uri)  # the training config of the workflow (refused '1e-4' before)
    assert resolved.training.optim.encoder.lr == 1e-4
    assert resolved.training.data.shards == f"{tmp_path / 'store'}/shards"
    assert resolved.sweep is not None and resolved.sweep.base["optim.encoder.lr"] == 1e-4

    path = tmp_path / "wf.yaml"
    path.write_text("name: n\nsource: demo\ntraining:\n  set: {optim.decoder.lr: 2e-4, train.steps: 3}\n"
                    "shards: {shard_maxcount: 1e3}\n")
    with pytest.raises(WorkflowError, match="shards.shard_maxcount"):  # an int key given a float: refused
        load_workflow(str(path))
    path.write_text("name: n\nsource: demo\ntraining:\n  set: {optim.decoder.lr: 2e-4, train.steps: 3}\n")
    wf = load_workflow(str(path))
    assert resolve(wf, uri).training.optim.decoder.lr == 2e-4
