"""`cscctrl run WORKFLOW.yaml`: the whole pipeline as cached, resumable stages.

    shard -> verify -> (tune) -> train -> evaluate -> register

A workflow file names the source data, the shard destination, an optional sweep, the training config
(or the best trial of the sweep), the evaluation sets and the model name to register (the keys are
documented on ``Workflow`` in spec.py and in docs/workflow.md; bundled files live in pipeline/workflows/).

    spec.py           the workflow file: dataclasses, loading (pipeline/config.py's typed loader)
    records.py        stage records (<storage>/workflows/<name>/stages.json) and the MLflow parent run
    context.py        what the stages share: the training config and the sweep spec, built once
    stages_data.py    shard (sharding/ensure.py, as Ray tasks: sharding/fanout.py), verify
    stages_model.py   tune (tuning/sweep.py run_sweep), train (pipeline/launch.py run_training)
    stages_report.py  evaluate (pipeline/evaluate.py evaluate_checkpoint), register
    runner.py         the checks before any stage, run_workflow, run_stage
    cli.py            add_arguments / main / run

Caching. Each stage computes a fingerprint of its inputs: its own section of the file plus the
fingerprints of the stages it reads from,

    fingerprint(stage) = sha256(json(inputs(stage)) )[:16]

and records it with its outputs in ``<storage>/workflows/<name>/stages.json`` and as tags on the
workflow's MLflow parent run. A stage whose fingerprint equals the recorded one, whose record says
``done`` and whose outputs still exist (the manifest, the checkpoint, the registered version) is
skipped. An interrupted stage resumes: shards that exist are kept, a training run of the same name
resumes from its last checkpoint, an interrupted sweep resumes through ``Tuner.restore``.
``--from STAGE`` runs that stage and every later one again (a new run name for train and tune).

Sharding fans out as Ray tasks over disjoint ranges of shard indices (sharding/fanout.py: any node writes
to shared storage through fsspec); shard i's bytes depend only on the plan, so the result equals
`cscctrl shard`'s.

MLflow: one parent run per execution (tag ``cscctrl.kind=workflow``); each stage is a nested run; the
sweep's parent run and the training run are nested under their stage's run; the status of every stage
(``cscctrl.stage.<stage>.state`` / ``.duration_s`` / ``.fingerprint``) is a tag of the parent run and
the summary table is its artifact ``workflow/summary.txt``.
"""
from __future__ import annotations

from pipeline.workflow.cli import add_arguments, main, plan_text, run
from pipeline.workflow.records import StageOutcome, StageRecords, WorkflowRun, fingerprint, summary_text
from pipeline.workflow.runner import STAGE_TABLE, check_workflow, run_stage, run_workflow, tracking_uri
from pipeline.workflow.spec import (STAGES, WORKFLOW_DIR, EvalSet, StageFailed, Workflow, WorkflowError,
                                    load_workflow, resolve_workflow_path)
from sharding.fanout import shard_on_ray, split_ranges

__all__ = ["STAGES", "STAGE_TABLE", "WORKFLOW_DIR", "EvalSet", "StageFailed", "StageOutcome", "StageRecords",
           "Workflow", "WorkflowError", "WorkflowRun", "add_arguments", "check_workflow", "fingerprint",
           "load_workflow", "main", "plan_text", "resolve_workflow_path", "run", "run_stage",
           "run_workflow", "shard_on_ray", "split_ranges", "summary_text", "tracking_uri"]
