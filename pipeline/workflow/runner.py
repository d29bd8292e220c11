"""Running a workflow: the checks before any stage, then each stage in order (skipped, resumed or run).

A stage whose fingerprint equals the recorded one, whose record says ``done`` and whose outputs still
exist is skipped; ``--from STAGE`` forces that stage and every later one (a forced stage that had finished
gets a new attempt number, so train and tune get a new run name).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.checkpoint import architecture_differences
from pipeline.config import ExperimentConfig, load_config
from pipeline.tracking import check_reachable, resolve_tracking_uri
import pipeline.workflow.stages_data as stages_data
import pipeline.workflow.stages_model as stages_model
import pipeline.workflow.stages_report as stages_report
from pipeline.workflow.context import Context, Resolved, resolve
from pipeline.workflow.records import StageOutcome, StageRecords, WorkflowRun, fingerprint, summary_text
from pipeline.workflow.spec import STAGES, StageFailed, Workflow, WorkflowError
from sharding.sources import SourceError, open_source
from tuning.spaces import SpaceError, parse_space, resolve_space

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    inputs: Callable[[Context], tuple[dict[str, Any], Any]]
    """(what is fingerprinted, the stage's typed input for run)"""

    run: Callable[[Context, Any, str], dict[str, Any]]
    valid: Callable[[Context, dict[str, Any]], bool]


STAGE_TABLE: dict[str, Stage] = {
    "shard": Stage(stages_data.shard_inputs, stages_data.shard_run, stages_data.shard_valid),
    "verify": Stage(stages_data.verify_inputs, stages_data.verify_run, stages_data.verify_valid),
    "tune": Stage(stages_model.tune_inputs, stages_model.tune_run, stages_model.tune_valid),
    "train": Stage(stages_model.train_inputs, stages_model.train_run, stages_model.train_valid),
    "evaluate": Stage(stages_report.evaluate_inputs, stages_report.evaluate_run, stages_report.evaluate_valid),
    "register": Stage(stages_report.register_inputs, stages_report.register_run, stages_report.register_valid),
}


def tracking_uri(wf: Workflow, create: bool = True) -> str:
    """The workflow's MLflow URI (``create`` false: the default sqlite store's folder is not made)."""
    cfg = load_config(None, {"run.storage_path": wf.storage, "tracking.uri": wf.tracking_uri})
    return resolve_tracking_uri(cfg, create=create)


def check_workflow(wf: Workflow, from_stage: str | None, uri: str) -> Resolved:
    """Everything that can fail before a stage runs (WorkflowError / ConfigError, naming the key); returns
    the configs built on the way (once per execution)."""
    if from_stage is not None and from_stage not in STAGES:
        raise WorkflowError(f"--from {from_stage!r}: unknown stage (stages: {', '.join(STAGES)})")
    if from_stage is not None and from_stage not in wf.stages:
        raise WorkflowError(f"--from {from_stage!r}: this workflow has no such stage (it runs {', '.join(wf.stages)})")
    if wf.training.from_sweep and wf.sweep is None:
        raise WorkflowError("training.from_sweep: true needs a sweep section (the best trial of which sweep?)")
    if not wf.name or "/" in wf.name:
        raise WorkflowError(f"name: {wf.name!r} must be a non-empty name without '/'")
    try:
        stages_data.open_workflow_source(wf)
    except (SourceError, TypeError) as e:
        raise WorkflowError(f"source: {e}") from None
    for s in wf.evaluate.sets:
        if s.source and s.data:
            raise WorkflowError(f"evaluate.sets[{s.name}]: give data or source, not both")
        try:
            if s.source:
                open_source(s.source, **s.source_options)
        except (SourceError, TypeError) as e:
            raise WorkflowError(f"evaluate.sets[{s.name}].source: {e}") from None
    resolved = resolve(wf, uri)  # unknown or mistyped training / sweep keys raise here
    if resolved.sweep is not None:
        spec = resolved.sweep
        try:
            parse_space(resolve_space(spec.space), load_config(spec.config or None, spec.base))
        except SpaceError as e:
            raise WorkflowError(f"sweep: {e}") from None
    check_reachable(uri)
    if wf.register.model:
        check_registered_architecture(uri, wf.register.model, resolved.training)
    return resolved


def check_registered_architecture(uri: str, name: str, cfg: ExperimentConfig) -> None:
    """A registered name holds one architecture: refuse to add a version whose weights have other shapes or
    are of another layer type (CSC vs plain convolutions: models.config.ARCHITECTURE_KEYS)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri)
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return
    if not versions:
        return
    latest = max(versions, key=lambda v: int(v.version))
    if not latest.run_id:
        return
    differences = architecture_differences(client.get_run(latest.run_id).data.params, cfg.model, missing="skip")
    differ = [f"model.{key}: registered {theirs}, this workflow {ours}" for key, theirs, ours in differences]
    if differ:
        raise WorkflowError(f"register.model={name!r} is already taken by another architecture (version "
                            f"{latest.version}): {'; '.join(differ)}. Choose another name (a register.model=NAME "
                            f"item on the command line) or another storage= (cscctrl demo: --storage DIR).")


def run_workflow(wf: Workflow, from_stage: str | None = None, progress: bool = True) -> list[StageOutcome]:
    """Run the stages in order; returns one outcome per stage. Raises StageFailed on the first failure."""
    uri = tracking_uri(wf)
    resolved = check_workflow(wf, from_stage, uri)
    ctx = Context(wf=wf, uri=uri, resolved=resolved, records=StageRecords(wf.state_dir), progress=progress)
    ctx.mlflow = WorkflowRun(wf, uri)
    forced = False
    outcomes: list[StageOutcome] = []
    current = ""
    try:
        for stage in wf.stages:
            current = stage
            forced = forced or stage == from_stage
            outcomes.append(run_stage(ctx, stage, forced))
    except StageFailed as e:
        outcomes.append(StageOutcome(current, "failed", 0.0, str(e)))
        ctx.mlflow.finish(summary_text(wf, outcomes), "failed", current)
        raise
    except BaseException:
        ctx.mlflow.finish(summary_text(wf, outcomes), "interrupted", current)
        raise
    ctx.mlflow.finish(summary_text(wf, outcomes), "done", current)
    return outcomes


def run_stage(ctx: Context, stage: str, forced: bool) -> StageOutcome:
    s = STAGE_TABLE[stage]
    previous = ctx.records.get(stage)
    try:
        key, payload = s.inputs(ctx)
        fp = fingerprint(key)
    except Exception as e:
        raise StageFailed(stage, f"{type(e).__name__}: {e}") from e
    ctx.fingerprints[stage] = fp
    same = previous.get("fingerprint") == fp
    # A forced stage that finished before gets a new attempt number (a new run name for train / tune);
    # an unfinished one keeps its number, so it resumes.
    attempt = int(previous.get("attempt", 0)) if same else 0
    if forced and same and previous.get("state") == "done":
        attempt += 1
    ctx.attempts[stage] = attempt
    stage_run_id = ctx.mlflow.stage_run(ctx.wf, stage) if ctx.mlflow else ""
    if not forced and same and previous.get("state") == "done" and s.valid(ctx, previous.get("outputs", {})):
        ctx.outputs[stage] = previous["outputs"]
        record = {**previous, "state": "skipped", "duration_s": 0.0}
        if ctx.mlflow:
            ctx.mlflow.record(stage, stage_run_id, record)
        log.info("stage %s: inputs unchanged (%s), skipped", stage, fp)
        return StageOutcome(stage, "skipped", 0.0, "inputs unchanged")
    print(f"[cscctrl run] stage {stage} ({'forced' if forced else 'resuming' if same else 'new inputs'}, "
          f"fingerprint {fp})", flush=True)
    ctx.records.put(stage, {"fingerprint": fp, "state": "running", "attempt": attempt, "outputs": {}})
    start = time.perf_counter()
    try:
        outputs = s.run(ctx, payload, stage_run_id)
    except BaseException as e:
        duration = time.perf_counter() - start
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
        record = {"fingerprint": fp, "state": "interrupted" if interrupted else "failed", "attempt": attempt,
                  "outputs": {}, "duration_s": duration, "error": f"{type(e).__name__}: {e}"}
        ctx.records.put(stage, record)
        if ctx.mlflow:
            ctx.mlflow.record(stage, stage_run_id, record)
        if interrupted:
            raise
        raise StageFailed(stage, f"{type(e).__name__}: {e}") from e
    duration = time.perf_counter() - start
    record = {"fingerprint": fp, "state": "done", "attempt": attempt, "outputs": outputs, "duration_s": duration}
    ctx.records.put(stage, record)
    ctx.outputs[stage] = outputs
    if ctx.mlflow:
        ctx.mlflow.record(stage, stage_run_id, record)
    return StageOutcome(stage, "done", duration)
