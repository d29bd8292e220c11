"""A real 2-node Ray cluster on this machine: a head (`ray start --head`, 1 CPU, dashboard on 127.0.0.1)
and a second node joining it (1 CPU), both with token authentication (RAY_AUTH_MODE=token and a token of
our own in RAY_AUTH_TOKEN: the clients below pass the same two variables).

- the workflow's distributed sharding stage: 2 Ray tasks spread over the 2 nodes write the same bytes as
  `shard_source` in one process;
- `cscctrl train` submitted through the Ray Jobs API with 2 workers × 1 CPU: with 1 CPU per node the
  workers must sit on different nodes; their node ids are read back from Ray's state API (the
  RayTrainWorker actors), and the run from the MLflow server;
- `cscctrl tune` (the 2-trial debug sweep) submitted the same way; its parent run and 2 trials are read
  back from MLflow.

Both node processes run `ray start --block` in their own process group and are killed by group at the
end, even on failure (never a machine-wide `ray stop`, which would stop other clusters on this host).
"""
from __future__ import annotations

import os
import re
import secrets
import signal
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

RAY = str(Path(sys.executable).with_name("ray"))
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
CLUSTER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
               "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}


def _start(args: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **AUTH, **CLUSTER_ENV}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([RAY, "start", *args, "--block", "--disable-usage-stats"], env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _alive_nodes(address: str) -> int:
    out = subprocess.run([RAY, "status", "--address", address], capture_output=True, text=True,
                         env={**os.environ, **AUTH}, timeout=60)
    if out.returncode != 0:
        return 0
    active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return len(re.findall(r"^\s*\d+\s+node_", active, flags=re.M))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Yields (gcs address, dashboard URL); the token variables are set in this process meanwhile."""
    logs = tmp_path_factory.mktemp("ray-two-nodes")
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dash = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    procs = [_start(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(dash), "--include-dashboard", "true", "--num-cpus", "1", "--num-gpus", "0",
                     "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", temp_dir], logs / "head.log")]
    saved = {k: os.environ.get(k) for k in AUTH}
    os.environ.update(AUTH)
    try:
        deadline = time.time() + 120
        while _alive_nodes(address) < 1:
            assert procs[0].poll() is None and time.time() < deadline, (logs / "head.log").read_text()[-3000:]
            time.sleep(1)
        procs.append(_start(["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                             "--num-gpus", "0", "--dashboard-agent-listen-port", str(free_port())],
                            logs / "worker.log"))
        while _alive_nodes(address) < 2:
            assert procs[1].poll() is None and time.time() < deadline, (logs / "worker.log").read_text()[-3000:]
            time.sleep(1)
        yield address, f"http://127.0.0.1:{dash}"
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_distributed_sharding_gives_the_local_bytes(two_nodes, tmp_path):
    import ray

    from pipeline.workflow import shard_on_ray
    from sharding.plan import plan_shards
    from sharding.sources import open_source
    from sharding.storage import Destination
    from sharding.write import finalize, prepare_destination, shard_source

    address, _ = two_nodes
    plan = plan_shards(open_source("demo", train=64, val=16, unseen=16, size=32), shard_maxcount=16)
    dest = Destination(str(tmp_path / "ray"))
    prepare_destination(plan, dest)
    ray.init(address=address)
    try:
        results = shard_on_ray(plan, dest, tasks=2, progress=False)
    finally:
        ray.shutdown()
    assert len({r["node"] for r in results}) == 2  # one task per node
    assert sorted(i for r in results for i in r["written"]) == list(range(len(plan.shards)))
    finalize(plan, dest)
    reference = tmp_path / "local"
    shard_source(plan, Destination(str(reference)))
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert len(names) == len(plan.shards) and names == sorted(p.name for p in (tmp_path / "ray").glob("*.tar"))
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (reference / name).read_bytes(), name
    assert (tmp_path / "ray" / "manifest.json").exists() or list((tmp_path / "ray").glob("manifest*"))


def _submit(dashboard: str, args: list[str], timeout_s: float = 300) -> tuple[str, str]:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    entrypoint = shlex.join([sys.executable, "-m", "pipeline", *args])  # the job runs it through a shell
    job = client.submit_job(entrypoint=entrypoint,
                            runtime_env={"env_vars": {**CLUSTER_ENV, "PYTHONUNBUFFERED": "1"}})
    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {timeout_s} s:\n{client.get_job_logs(job)[-3000:]}")
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return job, logs


def test_train_and_tune_jobs_use_both_nodes(two_nodes, demo_shards, mlflow_server, tmp_path):
    from mlflow import MlflowClient
    from ray.util.state import list_actors, list_nodes

    address, dashboard = two_nodes
    common = [f"data.shards={demo_shards}", f"run.storage_path={tmp_path}", f"tracking.uri={mlflow_server}",
              "tracking.experiment=multinode", "model.preset=csc_ctrl_debug", "train.batch_size_per_worker=16",
              "train.precision=fp32", "train.log_every=2", "train.checkpoint_every=2", "train.image_every=0",
              "train.eval_batches=1", "data.loader_workers=0"]
    _, logs = _submit(dashboard, ["train", *common, "train.steps=4", "scaling.num_workers=2",
                                  "scaling.cpus_per_worker=1", "run.name=mn-train", "tracking.log_model=false"])
    assert "finished mn-train" in logs

    nodes = {n.node_id for n in list_nodes(address=dashboard)}
    workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          raise_on_missing_output=False)
    assert len(workers) == 2 and {w.node_id for w in workers} == nodes and len(nodes) == 2

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("multinode").experiment_id
    run = client.search_runs([exp], "tags.`cscctrl.run_name` = 'mn-train'")[0]
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/recon_psnr")][-1] == 4

    _, logs = _submit(dashboard, ["tune", "-c", "debug", *common, "train.steps=2", "name=mn-sweep",
                                  "space={model.lam: {grid: [0.05, 0.1]}}"])
    parent = client.search_runs([exp], "tags.`cscctrl.run_name` = 'mn-sweep'")[0]
    assert parent.data.tags["cscctrl.kind"] == "sweep" and parent.info.status == "FINISHED"
    trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
