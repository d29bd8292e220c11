"""MLflow tracking for a training run (rank 0 only).

One MLflow run per training run name: a resumed run re-attaches to the MLflow run carrying the tag
``cscctrl.run_name`` instead of starting a second one. Metrics that cannot be sent (server down) are
kept in memory and appended to ``<run dir>/unsent_metrics.jsonl``; they are sent with the next
successful call and the gap is reported, never silently dropped.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, ExperimentConfig, dump_yaml, flatten

log = logging.getLogger(__name__)

RUN_NAME_TAG = "cscctrl.run_name"


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_tracking_uri(cfg: ExperimentConfig) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite store beside the checkpoints."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if _is_remote(cfg.run.storage_path):
        raise ConfigError(
            f"run.storage_path={cfg.run.storage_path!r} is remote, so the default local MLflow store cannot "
            f"live beside it: set tracking.uri (e.g. http://127.0.0.1:5000 on the head node)")
    root = Path(cfg.run.storage_path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def default_artifact_location(cfg: ExperimentConfig, uri: str) -> str | None:
    """Artifacts beside a local sqlite store; a server decides for itself (proxied artifacts)."""
    if uri.startswith("sqlite:///"):
        return (Path(cfg.run.storage_path).expanduser().resolve() / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before training when an HTTP tracking server does not answer (issue: unreachable at start)."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
    except (OSError, urllib.error.URLError) as e:
        raise ConnectionError(
            f"MLflow tracking server {uri} is not reachable ({e}). Start it (`mlflow server --host 127.0.0.1 "
            f"--port 5000 ...`), forward its port, or set tracking.uri to another store.") from e


class Autoencoder(nn.Module):
    """encoder f + decoder g as one module for ``mlflow.pytorch.log_model``: forward(x) = g(f(x))."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


@contextlib.contextmanager
def tracking_uri_set_to(uri: str) -> Iterator[None]:
    """MLflow's fluent API (log_model, load_model of models:/ URIs) reads one global URI, and
    mlflow.set_tracking_uri also writes it to os.environ for subprocesses: set it for the block only, so
    an in-process run leaves the caller's process as it found it."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None unsets the variable


def model_requirements() -> list[str]:
    """The logged model's pip requirements, stated rather than inferred: MLflow saves it with torch.export,
    so loading needs torch (and MLflow's own loader), never this package; inferring them loads the model
    in a subprocess, 7 of the 10 s a log_model call takes on 2 CPUs."""
    import cloudpickle
    import mlflow

    return [f"mlflow=={mlflow.__version__}", f"cloudpickle=={cloudpickle.__version__}",
            f"torch=={torch.__version__.split('+')[0]}"]  # no local label (+cpu / +cu128): pip cannot resolve it


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_run(client: Any, experiment_id: str, run_name: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              max_results=1)
    return runs[0].info.run_id if runs else None


class MLflowTracker:
    """Rank 0's view of the MLflow run of a training run."""

    def __init__(self, cfg: ExperimentConfig, run_name: str, run_dir: str | None = None,
                 parent_run_id: str | None = None) -> None:
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg)
        self.client = MlflowClient(self.uri)
        self.experiment_id = get_or_create_experiment(
            self.client, cfg.tracking.experiment, default_artifact_location(cfg, self.uri))
        self.unsent: list[dict[str, Any]] = []
        self.unsent_path = Path(run_dir) / "unsent_metrics.jsonl" if run_dir and not _is_remote(run_dir) else None
        existing = find_run(self.client, self.experiment_id, run_name)
        if existing:
            self.run_id = existing
            self.resumed = True
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_NAME_TAG: run_name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.resumed = False
            self._log_config()

    def _log_config(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in flatten(self.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, dump_yaml(self.cfg), "config.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Send metrics; on failure keep them (memory + jsonl) and send them with the next success."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.unsent.append({"step": step, "timestamp": ts, "metrics": metrics})
        batch = [Metric(k, float(v), e["timestamp"], e["step"])
                 for e in self.unsent for k, v in e["metrics"].items()]
        try:
            for i in range(0, len(batch), 1000):
                self.client.log_batch(self.run_id, metrics=batch[i:i + 1000])
        except Exception as e:  # the server dropped: training goes on
            steps = [u["step"] for u in self.unsent]
            log.warning("MLflow unreachable (%s); %d metric reports buffered (steps %d..%d)%s",
                        type(e).__name__, len(steps), steps[0], steps[-1],
                        f", also written to {self.unsent_path}" if self.unsent_path else "")
            if self.unsent_path:
                self.unsent_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.unsent_path, "a") as f:
                    f.write(json.dumps(self.unsent[-1]) + "\n")
            return
        if len(self.unsent) > 1:
            log.warning("MLflow reachable again: sent %d buffered metric reports (steps %d..%d)",
                        len(self.unsent), self.unsent[0]["step"], self.unsent[-1]["step"])
        self.unsent = []

    def log_image(self, image: Any, artifact_file: str) -> None:
        try:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)
        except Exception as e:
            log.warning("could not log image %s to MLflow: %s", artifact_file, e)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_model(self, encoder: nn.Module, decoder: nn.Module) -> str | None:
        """Log g∘f with mlflow.pytorch; register it and set the alias when tracking.registered_model is set.
        Returns the registered version (or None)."""
        import mlflow

        model = Autoencoder(encoder, decoder).cpu().eval()
        # Batch 2: torch.export specialises a dimension whose example size is 0 or 1, then refuses other batches.
        example = torch.zeros(2, self.cfg.model.in_channels, self.cfg.model.image_size, self.cfg.model.image_size)
        with torch.no_grad():
            model(example)  # eager: atoms projected and step sizes current, so export traces the solver alone
        name = self.cfg.tracking.registered_model or None
        with tracking_uri_set_to(self.uri), mlflow.start_run(run_id=self.run_id):
            info = mlflow.pytorch.log_model(model, name="model", registered_model_name=name,
                                            input_example=example.numpy(), pip_requirements=model_requirements())
        if not name:
            return None
        version = str(info.registered_model_version)
        if self.cfg.tracking.alias:
            self.client.set_registered_model_alias(name, self.cfg.tracking.alias, version)
        return version

    def finish(self, status: str = "FINISHED") -> None:
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("could not close the MLflow run: %s", e)

