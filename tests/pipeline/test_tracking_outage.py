"""MLflow outages: tracking never blocks the caller, and what was buffered is delivered when the server is
back, also by the next process after a kill (issue 17, item 3). A real `mlflow server` process is stopped
and started again on the same port and store; the tracker is the one training's rank 0 uses."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from tests.conftest import MlflowServer
from tests.pipeline.trainer_helpers import TINY
from tests.sharding.shardtest_helpers import REPO

pytestmark = pytest.mark.slow


def _tracker(server: MlflowServer, tmp_path: Path, name: str):
    from pipeline.tracking import MLflowTracker

    cfg = load_config(None, TINY + [f"run.storage_path={tmp_path / 'runs'}", f"tracking.uri={server.uri}"])
    return MLflowTracker(cfg, name, run_dir=str(tmp_path / "runs" / name))


def _steps(server: MlflowServer, run_id: str, key: str = "loss") -> set[int]:
    return {m.step for m in MlflowClient(server.uri).get_metric_history(run_id, key)}


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def _timed(call) -> float:
    """Seconds ``call`` took, or inf when it had not returned after 5 s (it is left running: it may be
    stuck in MLflow's own retries, which is what this measures)."""
    t0 = time.monotonic()
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=5.0)
    return float("inf") if thread.is_alive() else time.monotonic() - t0


def test_a_stopped_server_never_blocks_and_gets_everything_later(tmp_path):
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    try:
        tracker = _tracker(server, tmp_path, "outage")
        tracker.log_metrics(1, {"loss": 1.0})
        assert _wait_for(lambda: _steps(server, tracker.run_id) == {1}, 30)
        server.stop()
        took = [_timed(lambda s=s: tracker.log_metrics(s, {"loss": 1.0 / s})) for s in range(2, 7)]
        took.append(_timed(lambda: tracker.set_tags({"phase": "outage"})))
        assert max(took) < 0.5, took  # MLflow's own retries take ~4 minutes per call
        tracker.sync()  # a checkpoint: the buffered reports are on disk
        journal = tmp_path / "runs" / "outage" / "unsent_metrics"
        assert _wait_for(lambda: journal.is_dir() and any(journal.glob("*.json")), 10)

        server.start()
        assert tracker.outbox.flush(120)  # wakes the outbox's retry pause
        assert _steps(server, tracker.run_id) == {1, 2, 3, 4, 5, 6}
        tracker.finish()
        run = MlflowClient(server.uri).get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["phase"] == "outage"
        assert not list(journal.glob("*.json"))  # delivered, so no longer journaled
    finally:
        server.stop()


CHILD = """
import sys
from pipeline.config import load_config
from pipeline.tracking import MLflowTracker
from tests.pipeline.trainer_helpers import TINY

root, uri = sys.argv[1], sys.argv[2]
cfg = load_config(None, TINY + [f"run.storage_path={root}/runs", f"tracking.uri={uri}"])
tracker = MLflowTracker(cfg, "killed", run_dir=f"{root}/runs/killed")
print("ready", flush=True)
sys.stdin.readline()                      # the test stops the server
for step in range(1, 6):
    tracker.log_metrics(step, {"loss": 1.0 / step})
tracker.sync()                            # as at a checkpoint
print("journaled", flush=True)
sys.stdin.readline()                      # killed here
"""


def test_reports_buffered_by_a_killed_process_reach_the_run_after_a_restart(tmp_path):
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server").start()
    # Its warnings (stderr) go to a file: stdout carries only the lines this test waits for.
    err = tmp_path / "child.err"
    with open(err, "w") as err_file:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), server.uri], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=err_file, text=True, cwd=REPO,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert child.stdout.readline().strip() == "ready"
        server.stop()
        child.stdin.write("go\n")
        child.stdin.flush()
        line = []
        reader = threading.Thread(target=lambda: line.append(child.stdout.readline().strip()), daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert line == ["journaled"], f"the reports did not reach the journal while the server was down: {err.read_text()}"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=20)

        server.start()
        tracker = _tracker(server, tmp_path, "killed")  # the resumed run opens the same MLflow run
        assert tracker.resumed
        assert _wait_for(lambda: _steps(server, tracker.run_id) == {1, 2, 3, 4, 5}, 120)
        tracker.finish()
        assert not list((tmp_path / "runs" / "killed" / "unsent_metrics").glob("*.json"))
    finally:
        if child.poll() is None:
            child.kill()
        server.stop()
