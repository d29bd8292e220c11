"""Real Ray Train runs on CPU: 2 workers (gloo) tracked by a real MLflow server, and fault tolerance
(a worker process killed mid-run is restarted from the last checkpoint)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CSCCTRL = [sys.executable, "-m", "pipeline"]
TINY = ["model.preset=csc_ctrl_debug", "train.batch_size_per_worker=8", "train.precision=fp32",
        "scaling.num_workers=2", "scaling.cpus_per_worker=1", "data.loader_workers=0"]


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(CSCCTRL + args, capture_output=True, text=True, timeout=timeout, env=_env())


def _find_run(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name("cscctrl")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`cscctrl.run_name` = '{name}'")
    assert len(runs) == 1
    return runs[0]


def test_two_workers_log_metrics_images_and_register_the_model(tmp_path, mlflow_server, demo_shards):
    proc = _run(["train", *TINY, f"data.shards={demo_shards}", "train.steps=6", "train.log_every=2",
                 "train.image_every=6", "train.checkpoint_every=3", f"run.storage_path={tmp_path}",
                 "run.name=two-workers", f"tracking.uri={mlflow_server}", "tracking.registered_model=csc-ctrl-test",
                 "tracking.alias=candidate", "train.eval_batches=2"], timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 6/6" in proc.stdout

    client = MlflowClient(mlflow_server)
    run = _find_run(client, "two-workers")
    assert run.info.status == "FINISHED"
    assert run.data.params["scaling.num_workers"] == "2"
    for key in ("decoder/delta_r_z_zhat", "encoder/delta_r_z_zhat", "train/recon_psnr", "sparsity/stage1",
                "perf/images_per_s", "optim/decoder_lr", "eval/psnr"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/step")]
    assert sorted(steps) == [2, 4, 6]
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]  # keyed by name at their step
    assert any(p.startswith("images/recon+step+6+") for p in images), images
    assert any(p.startswith("images/atoms_stage1+step+6+") for p in images), images
    version = client.get_model_version_by_alias("csc-ctrl-test", "candidate")
    assert version.run_id == run.info.run_id
    # Ray persisted the checkpoints (keep-N = 2) under storage_path/run name
    ckpts = sorted(p.name for p in (tmp_path / "two-workers").glob("checkpoint_step*"))
    assert ckpts == ["checkpoint_step000000003", "checkpoint_step000000006"]


def _train_workers(driver_pid: int) -> list[int]:
    """PIDs of the Ray Train worker processes of our run: descendants of the `cscctrl train` driver (which
    started its own local Ray cluster), so other Ray clusters on the machine are never touched."""
    import psutil

    pids = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RayTrainWorker" in cmd:
            pids.append(p.pid)
    return pids


def test_killed_worker_is_restarted_from_the_last_checkpoint(tmp_path):
    steps = 120
    args = ["train", *TINY, "data.synthetic=true", f"train.steps={steps}", "train.log_every=10",
            "train.checkpoint_every=10", "train.image_every=0", f"run.storage_path={tmp_path}", "run.name=killed",
            "tracking.log_model=false", "scaling.max_failures=2"]
    proc = subprocess.Popen(CSCCTRL + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
    run_dir = tmp_path / "killed"
    deadline = time.time() + 300
    killed = None
    while time.time() < deadline and proc.poll() is None:
        # Kill once the second checkpoint is on disk, so Ray has certainly registered the first one.
        if (run_dir / "checkpoint_step000000020").exists():
            workers = _train_workers(proc.pid)
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.2)
    assert killed is not None, "no checkpoint / worker appeared in time"
    out, _ = proc.communicate(timeout=420)
    assert proc.returncode == 0, out[-4000:]
    assert "resuming killed from step" in out, out[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = _find_run(client, "killed")          # one MLflow run across the restart
    assert run.info.status == "FINISHED"
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "train/step")}
    assert logged == set(range(10, steps + 1, 10)), sorted(logged)   # continuous: no step missing
    assert (run_dir / "checkpoint_step000000120").exists()
