"""The model stages: tune (tuning/sweep.py ``run_sweep``) and train (pipeline/launch.py ``run_training``).

The sweep spec and the training config were built once (pipeline/workflow/context.py ``resolve``); the
train stage of ``training.from_sweep`` builds its config from the sweep's best_config.yaml instead.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import fsspec

from pipeline.checkpoint import find_latest
from pipeline.config import ExperimentConfig, load_config
from pipeline.launch import resolve_run_config, run_training
from pipeline.workflow.context import Context, ensure_ray, forced_overrides, suffix
from tuning.spec import SweepSpec
from tuning.sweep import plan_sweep, run_sweep

# ----------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------


def tune_inputs(ctx: Context) -> tuple[dict[str, Any], SweepSpec]:
    spec = ctx.resolved.sweep
    return {"sweep": spec.to_dict(), "shards": ctx.fingerprints["shard"]}, spec


def tune_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    path = outputs.get("best_config", "")
    return bool(path) and fsspec.core.url_to_fs(path)[0].exists(fsspec.core.url_to_fs(path)[1])


def tune_run(ctx: Context, spec: SweepSpec, stage_run_id: str) -> dict[str, Any]:
    spec = dataclasses.replace(spec, name=f"{ctx.wf.name}-sweep-{ctx.fingerprints['tune'][:8]}"
                                          f"{suffix(ctx.attempts['tune'])}")
    plan = plan_sweep(spec)
    ensure_ray()
    try:
        outcome = run_sweep(plan)
    finally:
        ctx.nest_run(plan.base.tracking.experiment, plan.name, stage_run_id)
    if not outcome.complete or outcome.best is None:
        raise RuntimeError(f"sweep {plan.name} ended {'incomplete' if not outcome.complete else 'without a best trial'}"
                           f" (see {plan.experiment_path})")
    return {"sweep": plan.name, "best_config": outcome.best_config_path, "best_trial": outcome.best.trial_id,
            "best_run_name": outcome.best.run_name, "metric": spec.metric,
            "best_value": outcome.best.value(spec.metric), "sweep_run_id": outcome.parent_run_id}


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def training_config(ctx: Context) -> ExperimentConfig:
    """The training run's config: the best trial's file when ``from_sweep``, else the training section's
    (built once); then the workflow's forced keys."""
    wf = ctx.wf
    if wf.training.from_sweep and "tune" in ctx.outputs:
        path = _local_copy(ctx.outputs["tune"]["best_config"], wf.name)
        return load_config(path, {**wf.training.set, **forced_overrides(wf, ctx.uri)})
    return ctx.resolved.training


def _local_copy(url: str, name: str) -> str:
    """load_config reads local files; a best config on shared storage is copied beside the records."""
    fs, path = fsspec.core.url_to_fs(url)
    if "://" not in url or url.startswith("file://"):
        return path
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"cscctrl-{name}-best_config.yaml"
    fs.get_file(path, str(local))
    return str(local)


def train_inputs(ctx: Context) -> tuple[dict[str, Any], ExperimentConfig]:
    cfg = training_config(ctx)
    d = cfg.to_dict()
    d["tracking"].pop("parent_run_id", None)
    d["run"].pop("name", None)
    return {"config": d, "shards": ctx.fingerprints["shard"], "sweep": ctx.fingerprints.get("tune", "")}, cfg


def train_run_name(ctx: Context) -> str:
    return ctx.wf.training.set.get("run.name") or \
        f"{ctx.wf.name}-train-{ctx.fingerprints['train'][:8]}{suffix(ctx.attempts['train'])}"


def train_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    run_dir = outputs.get("run_dir", "")
    if not run_dir:
        return False
    return find_latest(run_dir) is not None  # a path or a URL (pipeline/checkpoint.py, through fsspec)


def train_run(ctx: Context, cfg: ExperimentConfig, stage_run_id: str) -> dict[str, Any]:
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=train_run_name(ctx)),
                              tracking=dataclasses.replace(cfg.tracking, parent_run_id=stage_run_id))
    cfg = resolve_run_config(cfg)
    ensure_ray()
    # A run resumed from an earlier execution moves under this execution's stage run.
    ctx.nest_run(cfg.tracking.experiment, cfg.run.name, stage_run_id)
    result = run_training(cfg)
    if result is None:
        raise RuntimeError(f"training run {cfg.run.name} failed (its error is printed above)")
    run_id = ctx.nest_run(cfg.tracking.experiment, cfg.run.name, stage_run_id)
    return {"run_name": result.run_name, "run_dir": result.run_dir, "run_id": run_id or "",
            "checkpoint": result.checkpoint, "steps": result.steps}
