"""MLflow tracking for a training run (rank 0 only).

One MLflow run per training run name: a resumed run re-attaches to the MLflow run carrying the tag
``cscctrl.run_name`` instead of starting a second one. Metrics, images (artifact files, and images keyed
by name at a training step for the run's image view), tags, texts, dataset inputs (pipeline/datasets.py) and
system metrics (pipeline/system_metrics.py) go through the outbox (pipeline/outbox.py): a background thread
delivers them, so a slow or stopped tracking server never blocks a training step; what cannot be delivered
waits in ``<run dir>/unsent_metrics/`` and is delivered when the server answers again, by this process or by
the next one that opens the run. A new run gets a description (the tag ``mlflow.note.content``,
pipeline/run_description.py). Params, the logged config and the description never hold credentials from
URLs (pipeline/redact.py). The logged model is pipeline/model_export.py's.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import torch
from torch import Tensor, nn

from pipeline.config import ConfigError, ExperimentConfig, dump_yaml, flatten
from pipeline.model_export import Autoencoder  # noqa: F401  (g∘f, the logged model; imported from here too)
from pipeline.model_export import input_example, log_autoencoder
from pipeline.outbox import Outbox, bounded_http_requests, png_item, restore_environment
from pipeline.redact import redact, redact_tree
from pipeline.system_metrics import SystemMetrics
from sharding.storage import is_url

log = logging.getLogger(__name__)

RUN_NAME_TAG = "cscctrl.run_name"
DESCRIPTION_TAG = "mlflow.note.content"  # the run's description in the MLflow UI (markdown)


def resolve_tracking_uri(cfg: ExperimentConfig, create: bool = True) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else a sqlite store beside the checkpoints (whose folder is
    created unless ``create`` is false: a plan print writes nothing)."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    if is_url(cfg.run.storage_path):
        raise ConfigError(
            f"run.storage_path={cfg.run.storage_path!r} is remote, so the default local MLflow store cannot "
            f"live beside it: set tracking.uri (e.g. http://127.0.0.1:5000 on the head node)")
    root = Path(cfg.run.storage_path).expanduser().resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def existing_store_uri(given: str, what: str) -> str:
    """The MLflow store a reading command looks in: ``given``, else $MLFLOW_TRACKING_URI, else the default
    store (``runs/mlflow.db`` of the default run.storage_path). A sqlite store that does not exist is
    FileNotFoundError(``what``: ...), never created (MLflow's own default would create ./mlflow.db, an
    empty store unrelated to any run)."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        default = Path(ExperimentConfig().run.storage_path).expanduser().resolve() / "mlflow.db"
        uri = f"sqlite:///{default}"
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))  # sqlite:////abs/x.db is absolute, sqlite:///x.db relative
        if not path.exists():
            raise FileNotFoundError(f"{what}: there is no MLflow store at {path} (give the run's store with "
                                    f"--tracking-uri, e.g. sqlite:///<run.storage_path>/mlflow.db)")
    return uri


def default_artifact_location(cfg: ExperimentConfig, uri: str) -> str | None:
    """Artifacts beside a local sqlite store; a server decides for itself (proxied artifacts)."""
    if uri.startswith("sqlite:///"):
        return (Path(cfg.run.storage_path).expanduser().resolve() / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before training when an HTTP tracking server does not answer (issue: unreachable at start)."""
    if not uri.startswith(("http://", "https://")):
        return

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
    except (OSError, urllib.error.URLError) as e:
        raise ConnectionError(
            f"MLflow tracking server {uri} is not reachable ({e}). Start it (`mlflow server --host 127.0.0.1 "
            f"--port 5000 ...`), forward its port, or set tracking.uri to another store.") from e


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
    import mlflow

    return [f"mlflow=={mlflow.__version__}", f"cloudpickle=={cloudpickle.__version__}",
            f"torch=={torch.__version__.split('+')[0]}"]  # no local label (+cpu / +cu128): pip cannot resolve it


def get_or_create_experiment(client: Any, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def filter_literal(value: str) -> str:
    """``value`` quoted for an MLflow search filter: with the quote kind it does not hold (MLflow's filter
    grammar has no escape; RunConfig refuses a name holding both kinds)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{value!r} holds both ' and \", which an MLflow search filter cannot quote")


def find_run(client: Any, experiment_id: str, run_name: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {filter_literal(run_name)}",
                              max_results=1)
    return runs[0].info.run_id if runs else None


class MLflowTracker:
    """Rank 0's view of the MLflow run of a training run (also a sweep's parent run)."""

    FINISH_FLUSH_S = 60.0  # seconds finish() waits for undelivered tracking before leaving it to the journal

    def __init__(self, cfg: ExperimentConfig, run_name: str, run_dir: str | None = None,
                 parent_run_id: str | None = None, description: str = "") -> None:
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = resolve_tracking_uri(cfg)
        self._env_before = bounded_http_requests() if self.uri.startswith(("http://", "https://")) else {}
        self.client = MlflowClient(self.uri)
        self.experiment_id = get_or_create_experiment(
            self.client, cfg.tracking.experiment, default_artifact_location(cfg, self.uri))
        existing = find_run(self.client, self.experiment_id, run_name)
        if existing:
            self.run_id = existing
            self.resumed = True
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {RUN_NAME_TAG: run_name}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            if description:  # the run's description in the UI; a resumed run keeps its own (maybe edited)
                tags[DESCRIPTION_TAG] = redact(description)
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.resumed = False
            self._log_config()
        self.outbox = Outbox(self.client, self.run_id, run_dir)
        self.system_metrics: Any = None

    def _log_config(self) -> None:
        from mlflow.entities import Param

        params = [Param(k, redact(str(v))[:6000]) for k, v in flatten(self.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow's batch limit is 100 params
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, dump_yaml(ExperimentConfig.from_dict(redact_tree(self.cfg.to_dict()))),
                             "config.yaml")

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Queue a metric report; returns at once (delivered by the outbox, journaled while undeliverable)."""
        self.outbox.put({"kind": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                         "metrics": {k: float(v) for k, v in metrics.items()}})

    def log_image(self, image: Any, artifact_file: str | None = None, *, key: str | None = None,
                  step: int | None = None) -> None:
        """Queue an image: an artifact file (``artifact_file``), or with ``key`` and ``step`` an image of the
        run's image view, which the run page scrubs through by training step (MLflow's ``log_image``)."""
        self.outbox.put(png_item(image, artifact_file, key=key, step=step))

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Queue dataset inputs (pipeline/datasets.py ``shard_dataset`` dicts) for the run's Datasets panel."""
        if datasets:
            self.outbox.put({"kind": "datasets", "datasets": list(datasets)})

    def start_system_metrics(self, interval_s: float) -> bool:
        """Sample CPU, memory, disk, network and GPU use every ``interval_s`` seconds into the run's system
        metrics until ``finish`` (pipeline/system_metrics.py); returns whether a GPU is sampled too."""
        try:
            start_ms = self.client.get_run(self.run_id).info.start_time
        except Exception as e:  # the axis then starts now; the run itself was found a moment ago
            log.warning("could not read the MLflow run's start time (%s); system metric steps count from now", e)
            start_ms = None
        self.system_metrics = SystemMetrics(self.outbox, self.run_id, self.uri, interval_s, start_ms).start()
        return self.system_metrics.gpu

    def log_text(self, text: str, artifact_file: str) -> None:
        self.outbox.put({"kind": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        self.outbox.put({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def sync(self) -> None:
        """Journal whatever is still only in memory (at a checkpoint: see pipeline/outbox.py)."""
        self.outbox.sync()

    def log_model(self, encoder: nn.Module, decoder: nn.Module, images: Tensor | None = None) -> str | None:
        """Log the model of pipeline/model_export.py (g∘f for pyfunc, f with its codes for `cscctrl encode`,
        signature, metadata, and two of ``images`` (the last training batch) as the input example); register
        it and set the alias when tracking.registered_model is set. Returns the registered version (or None).
        The networks are moved to the CPU in eval mode (training is over)."""
        import mlflow

        name = self.cfg.tracking.registered_model or None
        self.outbox.flush(self.FINISH_FLUSH_S)  # the run's history before its model
        with tracking_uri_set_to(self.uri), mlflow.start_run(run_id=self.run_id):
            info = log_autoencoder(encoder, decoder, self.cfg.model, input_example(self.cfg.model, images), name,
                                   model_requirements())
        if not name:
            return None
        version = str(info.registered_model_version)
        if self.cfg.tracking.alias:
            self.client.set_registered_model_alias(name, self.cfg.tracking.alias, version)
        return version

    def finish(self, status: str = "FINISHED") -> None:
        """Deliver what is queued (up to FINISH_FLUSH_S; the rest stays in the journal), then close the run."""
        if self.system_metrics is not None:
            self.system_metrics.stop()
        self.outbox.close(self.FINISH_FLUSH_S)
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as e:
            log.warning("could not close the MLflow run: %s", e)
        restore_environment(self._env_before)


def logged_model_uri(client: Any, run_id: str) -> str:
    """The URI of the model the training run logged (``mlflow.pytorch.log_model(name="model")``)."""
    run = client.get_run(run_id)
    models = list(run.outputs.model_outputs or []) if run.outputs else []
    if models:
        return f"models:/{models[-1].model_id}"
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'")
    if not found:
        raise RuntimeError(f"training run {run_id} logged no model (tracking.log_model=false?)")
    return f"models:/{found[-1].model_id}"
