"""What each stage did: ``<storage>/workflows/<name>/stages.json`` and the workflow's MLflow parent run.

Each stage's fingerprint is ``sha256(json(inputs(stage)))[:16]``; its record holds the fingerprint, the
state (running / done / failed / interrupted), the outputs, the duration and the attempt number. The
MLflow parent run (tag ``cscctrl.kind=workflow``) has one nested run per stage and the state of every
stage as tags ``cscctrl.stage.<stage>.state`` / ``.duration_s`` / ``.fingerprint``; the summary table is
its artifact ``workflow/summary.txt``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.config import load_config
from pipeline.tracking import default_artifact_location, find_run, get_or_create_experiment
from pipeline.content_hash import content_hash
from pipeline.workflow.spec import Workflow

KIND_TAG = "cscctrl.kind"
WORKFLOW_TAG = "cscctrl.workflow"
STAGE_TAG = "cscctrl.stage"


def fingerprint(inputs: Any) -> str:
    """sha256 of the canonical JSON of a stage's inputs (16 hex digits; pipeline/content_hash.py)."""
    return content_hash(inputs, 16, "sha256")


class StageRecords:
    """``<storage>/workflows/<name>/stages.json``: {stage: {fingerprint, state, outputs, duration_s, attempt}}."""

    def __init__(self, state_dir: str) -> None:
        self.fs, root = fsspec.core.url_to_fs(state_dir)
        self.path = f"{root.rstrip('/')}/stages.json"
        self.fs.makedirs(root, exist_ok=True)
        self.records: dict[str, dict[str, Any]] = {}
        if self.fs.exists(self.path):
            with self.fs.open(self.path, "rb") as f:
                self.records = json.loads(f.read())

    def get(self, stage: str) -> dict[str, Any]:
        return self.records.get(stage, {})

    def put(self, stage: str, record: dict[str, Any]) -> None:
        self.records[stage] = record
        tmp = f"{self.path}.tmp"
        with self.fs.open(tmp, "wb") as f:
            f.write(json.dumps(self.records, indent=2, sort_keys=True, default=str).encode())
        self.fs.mv(tmp, self.path)


class WorkflowRun:
    """The execution's MLflow parent run and its nested stage runs."""

    def __init__(self, wf: Workflow, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self.client = MlflowClient(uri)
        cfg = load_config(None, {"run.storage_path": wf.storage, "tracking.uri": uri})
        self.experiment_id = get_or_create_experiment(self.client, wf.experiment,
                                                      default_artifact_location(cfg, uri))
        run = self.client.create_run(self.experiment_id, run_name=wf.name,
                                     tags={KIND_TAG: "workflow", WORKFLOW_TAG: wf.name})
        self.run_id = run.info.run_id
        self.client.log_param(self.run_id, "workflow.stages", ",".join(wf.stages))

    def stage_run(self, wf: Workflow, stage: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{wf.name}/{stage}",
                                     tags={"mlflow.parentRunId": self.run_id, KIND_TAG: "workflow-stage",
                                           WORKFLOW_TAG: wf.name, STAGE_TAG: stage})
        return run.info.run_id

    def record(self, stage: str, run_id: str, record: dict[str, Any]) -> None:
        tags = {"state": record["state"], "fingerprint": record.get("fingerprint", ""),
                "duration_s": f"{record.get('duration_s', 0.0):.1f}"}
        for k, v in tags.items():
            self.client.set_tag(self.run_id, f"{STAGE_TAG}.{stage}.{k}", v)
            self.client.set_tag(run_id, f"{STAGE_TAG}.{k}", v)
        outputs = json.dumps(record.get("outputs", {}), sort_keys=True, default=str)
        self.client.set_tag(run_id, f"{STAGE_TAG}.outputs", outputs[:5000])
        if record.get("error"):
            self.client.set_tag(run_id, f"{STAGE_TAG}.error", record["error"][:5000])
        status = {"done": "FINISHED", "skipped": "FINISHED", "failed": "FAILED"}.get(record["state"], "KILLED")
        self.client.set_terminated(run_id, status=status)

    def nest_run_by_name(self, experiment: str, run_name: str, parent_run_id: str) -> str | None:
        """Put the run carrying ``cscctrl.run_name=run_name`` under ``parent_run_id`` (a resumed run was
        created by an earlier execution; this execution's stage run becomes its parent)."""
        exp = self.client.get_experiment_by_name(experiment)
        run_id = find_run(self.client, exp.experiment_id, run_name) if exp else None
        if run_id:
            self.client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
        return run_id

    def finish(self, summary: str, state: str, current: str) -> None:
        self.client.set_tag(self.run_id, f"{WORKFLOW_TAG}.state", state)
        self.client.set_tag(self.run_id, f"{WORKFLOW_TAG}.stage", current)
        self.client.log_text(self.run_id, summary, "workflow/summary.txt")
        self.client.set_terminated(self.run_id, status="FINISHED" if state == "done" else "FAILED")


@dataclass
class StageOutcome:
    stage: str
    state: str  # done | skipped | failed
    duration_s: float
    note: str = ""


def summary_text(wf: Workflow, outcomes: list[StageOutcome]) -> str:
    lines = [f"workflow {wf.name}", f"{'stage':<10} {'state':<8} {'duration':>9}  note"]
    for o in outcomes:
        lines.append(f"{o.stage:<10} {o.state:<8} {o.duration_s:>8.1f}s  {o.note}")
    return "\n".join(lines) + "\n"
