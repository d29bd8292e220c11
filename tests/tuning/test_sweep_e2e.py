"""A real 2-trial sweep through `cscctrl tune`: Tune -> driver function -> Ray Train (1 CPU worker each)
-> end-of-training evaluation on the demo shards' exact val split -> MLflow parent and child runs, read
back with MlflowClient, with ASHA on (rungs from step 2, so every report must carry its metric and the
evaluation report must get past max_t). The sweep is interrupted (SIGINT) after its first trial
finished and resumed by running the same command again. All commands join one small Ray cluster
(2 CPUs) started here, and every wait is bounded. (ASHA stopping a trial: test_sweep_cli.py.)
"""
from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

CSCCTRL = [sys.executable, "-m", "pipeline"]
RAY = str(Path(sys.executable).with_name("ray"))
TRIALS_LAM = (0.0, 0.5)
STEPS = 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Our own token (not ~/.ray/auth_token, which other local clusters may rewrite) for our own head.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A 2-CPU Ray head of our own on 127.0.0.1 (`ray start --block`: SIGTERM stops exactly its processes)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")  # noqa: SIM115 (the head's log while it runs)
    # A temp dir of its own (short: it holds unix sockets), so that `ray start` writes its
    # ray_current_cluster file there and not in /tmp/ray, where other local ray.init() calls would
    # read it and try to join this cluster after it is gone.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    head = subprocess.Popen([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard=false",
                             "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
                             "--temp-dir", temp_dir, "--block"],
                            stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **AUTH, "RAY_USAGE_STATS_ENABLED": "0",
                                 "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})  # nothing to drain at teardown
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([RAY, "status", "--address", address], capture_output=True,
                         env={**os.environ, **AUTH}).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            head.kill()
            pytest.fail(f"ray head did not start: {Path(log.name).read_text()[-2000:]}")
        time.sleep(1)
    yield address
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def env(address: str) -> dict[str, str]:
    return {**os.environ, **AUTH, "RAY_ADDRESS": address, "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def sweep_args(storage: Path, shards: str, *extra: str) -> list[str]:
    space = "{model.lam: {grid: [0.0, 0.5]}}"   # the dense trial first: alone at its rungs, it continues
    return ["tune", "-c", "debug", f"data.shards={shards}", f"run.storage_path={storage}", f"train.steps={STEPS}",
            "train.log_every=2", "train.checkpoint_every=2", "train.batch_size_per_worker=8", "train.eval_batches=1",
            f"space={space}", "scheduler=asha", "asha.metric=sparsity/stage1", "asha.mode=min",
            "asha.grace_period=2", "name=e2e", *extra]


def read_lines(proc: subprocess.Popen, sink: queue.Queue) -> None:
    for line in proc.stdout:
        sink.put(line)
    sink.put(None)


@pytest.fixture(scope="module")
def sweep(ray_address, demo_shards, tmp_path_factory):
    """Run the sweep one trial at a time; SIGINT it once the first trial is done; run it again."""
    storage = tmp_path_factory.mktemp("sweep")
    args = CSCCTRL + sweep_args(storage, demo_shards, "max_concurrent_trials=1")
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(ray_address))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(first, lines), daemon=True).start()
    out1, interrupted, deadline = [], False, time.time() + 300
    while time.time() < deadline:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            continue
        if line is None:
            break
        out1.append(line)
        if not interrupted and re.match(r"^\S+_00000\s+done\s", line):
            first.send_signal(signal.SIGINT)   # Ctrl-C: Tune saves its state and stops the running trial
            interrupted = True
    first.wait(timeout=120)
    out1_text = "".join(out1)
    assert interrupted, out1_text[-4000:]
    second = subprocess.run(args, capture_output=True, text=True, env=env(ray_address), timeout=300)
    return {"storage": storage, "first": (first.returncode, out1_text),
            "second": (second.returncode, second.stdout + second.stderr), "shards": demo_shards}


def lam(run) -> float:
    return float(run.data.params["model.lam"])


def children_of(client: MlflowClient, parent_id: str) -> list:
    exp = client.get_experiment_by_name("cscctrl")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_interrupted_sweep_exits_incomplete_and_resumes(sweep):
    rc1, out1 = sweep["first"]
    rc2, out2 = sweep["second"]
    assert rc1 == 130, out1[-4000:]
    assert "incomplete (interrupted)" in out1
    assert rc2 == 0, out2[-4000:]
    assert "sweep e2e (resuming)" in out2
    assert "2 trial(s): 2 done" in out2
    assert re.search(r"trial\s+status\s+λ\s+step\s+eval/psnr\s+nonzero", out2)   # the live table


def test_mlflow_parent_with_one_child_per_trial(sweep):
    client = MlflowClient(f"sqlite:///{sweep['storage'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cscctrl")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`cscctrl.kind` = 'sweep'")
    assert len(parents) == 1                                 # the resumed sweep re-attached to its run
    parent = parents[0]
    assert parent.info.run_name == "e2e" and parent.info.status == "FINISHED"
    assert parent.data.params["sweep.space.model.lam"] == "grid [0.0, 0.5]"
    children = children_of(client, parent.info.run_id)
    assert len(children) == 2                                # one per trial, none duplicated by the resume
    assert sorted(lam(c) for c in children) == list(TRIALS_LAM)
    dense, sparse = sorted(children, key=lam)
    for c in children:
        assert c.data.params["tracking.parent_run_id"] == parent.info.run_id
    # λ really reached the model: at the rung (step 2) the codes of λ = 0.5 are sparser than those of λ = 0
    at_rung = {c.info.run_id: {m.step: m.value for m in client.get_metric_history(c.info.run_id, "sparsity/stage1")}[2]
               for c in children}
    assert at_rung[sparse.info.run_id] < at_rung[dense.info.run_id]
    for c in children:
        assert c.info.status == "FINISHED" and c.data.tags["cscctrl.sweep.trial_status"] == "done"
        assert 0 < c.data.metrics["eval/psnr"] < 60 and "eval/sparsity/stage1" in c.data.metrics
    # the dense trial finished before the interruption and was not trained again: each step logged once
    assert dense.data.tags["cscctrl.sweep.trial_id"].endswith("_00000")
    steps = [m.step for m in client.get_metric_history(dense.info.run_id, "train/step")]
    assert sorted(steps) == list(range(2, STEPS + 1, 2))
    best = max(children, key=lambda c: c.data.metrics["eval/psnr"])
    assert parent.data.tags["cscctrl.sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/eval/psnr"] == pytest.approx(best.data.metrics["eval/psnr"])


def test_parent_holds_table_plot_and_a_best_config_train_accepts(sweep, tmp_path):
    client = MlflowClient(f"sqlite:///{sweep['storage'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cscctrl")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`cscctrl.kind` = 'sweep'")[0]
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/trials.json", "sweep/metric_vs_lam_n.png", "sweep/best_config.yaml",
            "sweep/sweep.yaml"} <= names
    local = Path(client.download_artifacts(parent.info.run_id, "sweep", str(tmp_path)))
    assert (local / "metric_vs_lam_n.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((local / "trials.json").read_text())["data"]) == 2   # replaced, not appended, on resume
    table = (local / "trials.csv").read_text().splitlines()
    assert table[0].startswith("trial_id,run_name,status,model.lam,step,eval/psnr")
    assert len(table) == 3
    best_cfg = load_config(local / "best_config.yaml")
    best = client.get_run(parent.data.tags["cscctrl.sweep.best_run_id"])
    assert best_cfg.model.lam == lam(best)
    assert best_cfg.model.preset == "csc_ctrl_debug" and best_cfg.train.steps == STEPS
    assert best_cfg.data.shards == sweep["shards"] and best_cfg.run.name == ""
    # the same file sits beside the sweep's experiment, and the summary names the best checkpoint
    summary = sweep["storage"] / "sweeps" / "e2e" / "summary"
    assert yaml.safe_load((summary / "best_config.yaml").read_text()) == yaml.safe_load(
        (local / "best_config.yaml").read_text())
    _, out2 = sweep["second"]
    ckpt = re.search(rf"checkpoint (\S+checkpoint_step{STEPS:09d})", out2)
    assert ckpt and Path(ckpt.group(1), "state.pt").exists(), out2[-3000:]


def test_resources_no_trial_can_get_fail_before_any_trial(ray_address, demo_shards, tmp_path):
    proc = subprocess.run(CSCCTRL + sweep_args(tmp_path, demo_shards, "resources.num_workers=3"),
                          capture_output=True, text=True, env=env(ray_address), timeout=180)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no trial can get its resources" in proc.stderr and "3 worker(s)" in proc.stderr
    assert not (tmp_path / "sweeps" / "e2e").exists()           # Tune never started
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cscctrl")
    assert exp is None or not client.search_runs([exp.experiment_id])
