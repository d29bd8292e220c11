"""Shared test setup.

Markers (see pyproject.toml): ``gpu`` tests skip without CUDA; ``ray`` tests start a real local Ray
cluster; ``slow`` marks tests over ~30 s. The default run is CPU-only.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (restored after): on tiny tensors it is the fastest and
    immune to the oversubscription of a busy 2-core CI machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 (sqlite backend, proxied artifacts) that can be stopped
    and started again on the same port and store."""

    def __init__(self, root, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> MlflowServer:
        import subprocess
        import sys
        import time
        import urllib.request
        from pathlib import Path

        mlflow_bin = Path(sys.executable).with_name("mlflow")
        self.log = open(self.root / "server.log", "a")  # noqa: SIM115 (the server's log for its lifetime)
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
             str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
            start_new_session=True)
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Terminate the server and its worker processes (its own process group)."""
        import signal
        import subprocess

        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self.log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1 (sqlite backend, proxied artifacts). Yields its URI."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> str:
    """Small shards of real photo crops (the demo source): train 256 / val 64 / unseen 64 at 32 px."""
    from sharding.ensure import ensure_demo_shards

    return ensure_demo_shards(str(tmp_path_factory.mktemp("demo")), progress=False, counts=(256, 64, 64),
                              shard_maxcount=64)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (free port; moto[server] provides it), with fake credentials in the
    environment and the bucket ``shards-bucket``. Yields the environment it set. One per session: moto keeps
    its buckets in this process's memory, so a second server would see the first one's."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] provides the local S3 server")
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by spawned writer processes and loader workers
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists("shards-bucket"):  # moto keeps its buckets per process, across servers
        fs.mkdir("shards-bucket")
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fsspec.filesystem("s3").clear_instance_cache()
    server.stop()
