"""What the stages of one workflow execution share: the workflow, the configs built once, the records.

The training config of the training section and the sweep spec are built once per execution (by
``resolve``, before any stage runs: their errors are bad input); the stages take them from here. What a
stage hands to the next goes through ``outputs`` (the JSON-able outputs its record keeps, so that a skipped
stage hands over the same); what a stage itself needs beyond that (the shard plan) is its typed input,
built by its ``inputs`` and passed to its ``run``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.config import ExperimentConfig, load_config
from pipeline.ray_init import init_ray
from pipeline.workflow.records import StageRecords, WorkflowRun
from pipeline.workflow.spec import Workflow
from tuning.spec import SweepSpec, load_sweep


def forced_overrides(wf: Workflow, uri: str) -> dict[str, Any]:
    """What the workflow decides for every training run it starts (the MLflow parent is set per stage run)."""
    return {"data.shards": wf.shard_url, "run.storage_path": wf.storage, "tracking.uri": uri,
            "tracking.experiment": wf.experiment, "tracking.registered_model": "", "tracking.parent_run_id": "",
            **({"tracking.log_model": True} if wf.register.model else {})}


def sweep_items(wf: Workflow, uri: str) -> list[str]:
    """The sweep as `cscctrl tune` items: training overrides, the workflow's forced keys, the sweep's own."""
    forced = {k: v for k, v in forced_overrides(wf, uri).items() if k != "tracking.parent_run_id"}
    forced["tracking.log_model"] = False  # the trials' models are not the product; the train stage's is
    # Per-trial resources are the sweep's own (resources.*), never the training run's scaling.
    training = {k: v for k, v in wf.training.set.items() if not k.startswith("scaling.")}
    items = {**training, **forced, **(wf.sweep.set if wf.sweep else {})}
    if wf.training.config and wf.sweep and not wf.sweep.config:
        items.setdefault("config", wf.training.config)
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in items.items()]


@dataclass(frozen=True)
class Resolved:
    """The configs of one execution, built once."""

    training: ExperimentConfig
    """The training section's config with the workflow's forced keys (the train stage's config unless it
    trains the best trial of the sweep)."""

    sweep: SweepSpec | None


def resolve(wf: Workflow, uri: str) -> Resolved:
    """Build the training config and the sweep spec (unknown or mistyped keys raise ConfigError here)."""
    training = load_config(wf.training.config or None, {**wf.training.set, **forced_overrides(wf, uri)})
    sweep = load_sweep(wf.sweep.config or None, sweep_items(wf, uri)) if wf.sweep is not None else None
    return Resolved(training=training, sweep=sweep)


@dataclass
class Context:
    wf: Workflow
    uri: str
    resolved: Resolved
    records: StageRecords
    mlflow: WorkflowRun | None = None
    progress: bool = True
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    def nest_run(self, experiment: str, run_name: str, parent_run_id: str) -> str | None:
        """Put a (possibly resumed) run under this execution's stage run; its MLflow id, if it exists."""
        return self.mlflow.nest_run_by_name(experiment, run_name, parent_run_id) if self.mlflow else None


def suffix(attempt: int) -> str:
    return f"-r{attempt}" if attempt else ""


def ensure_ray() -> None:
    """pipeline/ray_init.py (RAY_ADDRESS or a private local cluster), Tune's own output off."""
    init_ray(tune=True)
