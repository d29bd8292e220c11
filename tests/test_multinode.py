"""A real 2-node Ray cluster on this machine: a head (`ray start --head`, 1 CPU, dashboard on 127.0.0.1)
and a second node joining it (1 CPU), both with token authentication (RAY_AUTH_MODE=token and a token of
our own in RAY_AUTH_TOKEN). Ray reads those variables once per process, so every client (the sharding
driver, `ray job submit`, `ray list`) runs in a process of its own with them set.

- the workflow's distributed sharding stage: 2 Ray tasks spread over the 2 nodes write the same bytes as
  `shard_source` in one process;
- `cscctrl train` submitted with `ray job submit` (the Jobs API) with 2 workers × 1 CPU: with 1 CPU per node the
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


SHARD_ON_RAY = """
import json, sys
import ray
from sharding.fanout import shard_on_ray
from sharding.plan import plan_shards
from sharding.sources import open_source
from sharding.storage import Destination
from sharding.write import finalize, prepare_destination
plan = plan_shards(open_source("demo", train=64, val=16, unseen=16, size=32), shard_maxcount=16)
dest = Destination(sys.argv[1])
prepare_destination(plan, dest)
ray.init(address=sys.argv[2])
results = shard_on_ray(plan, dest, tasks=2, progress=False)
ray.shutdown()
finalize(plan, dest)
print("RESULT " + json.dumps(results))
"""


def _client_env(address: str = "") -> dict[str, str]:
    """The environment of a client process: the cluster's token variables (Ray reads them once per
    process, so clients run in processes of their own rather than in this test process)."""
    env = {**os.environ, **AUTH, **CLUSTER_ENV}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    return env


def test_distributed_sharding_gives_the_local_bytes(two_nodes, tmp_path):
    import json

    from sharding.plan import plan_shards
    from sharding.sources import open_source
    from sharding.storage import Destination
    from sharding.write import shard_source

    address, _ = two_nodes
    proc = subprocess.run([sys.executable, "-c", SHARD_ON_RAY, str(tmp_path / "ray"), address], capture_output=True,
                          text=True, timeout=300, env=_client_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    plan = plan_shards(open_source("demo", train=64, val=16, unseen=16, size=32), shard_maxcount=16)
    assert len({r["node"] for r in results}) == 2  # one task per node
    assert sorted(i for r in results for i in r["written"]) == list(range(len(plan.shards)))
    reference = tmp_path / "local"
    shard_source(plan, Destination(str(reference)))
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert len(names) == len(plan.shards) and names == sorted(p.name for p in (tmp_path / "ray").glob("*.tar"))
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (reference / name).read_bytes(), name
    assert (tmp_path / "ray" / "manifest.json").exists()


def _submit(dashboard: str, args: list[str], timeout_s: float = 300) -> str:
    """`ray job submit` (it waits for the job and streams its logs); returns the logs."""
    entrypoint = [sys.executable, "-m", "pipeline", *args]
    runtime_env = '{"env_vars": {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}}'
    # The CLI quotes the words after "--" itself (shlex.join) before the job's shell runs them.
    cmd = [RAY, "job", "submit", "--address", dashboard, "--runtime-env-json", runtime_env, "--", *entrypoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_client_env())
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in logs.lower(), logs[-4000:]
    return logs


def _ray_list(dashboard: str, *args: str) -> list[dict]:
    import json

    proc = subprocess.run([RAY, "list", *args, "--address", dashboard, "--format", "json", "--detail"],
                          capture_output=True, text=True, timeout=120, env=_client_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_train_and_tune_jobs_use_both_nodes(two_nodes, demo_shards, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    _address, dashboard = two_nodes
    common = [f"data.shards={demo_shards}", f"run.storage_path={tmp_path}", f"tracking.uri={mlflow_server}",
              "tracking.experiment=multinode", "model.preset=csc_ctrl_debug", "train.batch_size_per_worker=16",
              "train.precision=fp32", "train.log_every=2", "train.checkpoint_every=2", "train.image_every=0",
              "train.eval_batches=1", "data.loader_workers=0"]
    logs = _submit(dashboard, ["train", *common, "train.steps=4", "scaling.num_workers=2",
                                  "scaling.cpus_per_worker=1", "run.name=mn-train", "tracking.log_model=false"])
    assert "finished mn-train" in logs

    nodes = {n["node_id"] for n in _ray_list(dashboard, "nodes")}
    workers = [a for a in _ray_list(dashboard, "actors", "--filter", "class_name=RayTrainWorker", "--limit", "1000")]
    assert len(workers) == 2 and {w["node_id"] for w in workers} == nodes and len(nodes) == 2

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("multinode").experiment_id
    run = client.search_runs([exp], "tags.`cscctrl.run_name` = 'mn-train'")[0]
    assert run.info.status == "FINISHED" and run.data.params["scaling.num_workers"] == "2"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/recon_psnr")][-1] == 4

    _submit(dashboard, ["tune", "-c", "debug", *common, "train.steps=2", "name=mn-sweep",
                                  "space={model.lam: {grid: [0.05, 0.1]}}"])
    parent = client.search_runs([exp], "tags.`cscctrl.run_name` = 'mn-sweep'")[0]
    assert parent.data.tags["cscctrl.kind"] == "sweep" and parent.info.status == "FINISHED"
    trials = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
