"""The publishing stages: evaluate (pipeline/evaluate.py ``evaluate_checkpoint`` per set) and register."""
from __future__ import annotations

import dataclasses
from typing import Any

import fsspec

from pipeline.evaluate import EvalReport, evaluate_checkpoint
from pipeline.tracking import logged_model_uri, tracking_uri_set_to
from pipeline.workflow.context import Context
from pipeline.workflow.stages_data import eval_shards

# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def evaluate_inputs(ctx: Context) -> tuple[dict[str, Any], None]:
    e = ctx.wf.evaluate
    return {"train": ctx.fingerprints["train"], "shards": ctx.fingerprints["shard"],
            "sets": [dataclasses.asdict(s) for s in e.sets], "max_batches": e.max_batches,
            "batch_size": e.batch_size, "fd": e.fd}, None


def evaluate_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    def exists(url: str) -> bool:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)

    return all(exists(p) for p in outputs.get("reports", {}).values())


def evaluate_run(ctx: Context, _: None, stage_run_id: str) -> dict[str, Any]:
    e, train = ctx.wf.evaluate, ctx.outputs["train"]
    out_root = f"{train['run_dir'].rstrip('/')}/workflow-eval-{ctx.fingerprints['evaluate'][:8]}"
    table, reports = [], {}
    for s in e.sets:
        data = eval_shards(ctx.wf, s, ctx.progress) if s.source else s.data
        report: EvalReport = evaluate_checkpoint(
            train["run_dir"], data=data, split=s.split, reference_split="train", max_batches=e.max_batches,
            batch_size=e.batch_size, device="cpu", fd=e.fd, out=f"{out_root}/{s.name}", tracking_uri=ctx.uri)
        if report.lost_samples:
            raise RuntimeError(f"evaluation on {s.name}: {report.losses_text()}")
        table.append({"set": s.name, "data": data or ctx.wf.shard_url, "split": s.split,
                      "generalisation": report.generalisation or s.split == "unseen",
                      **{k: float(v) for k, v in report.metrics.items()}})
        reports[s.name] = report.path
    if ctx.mlflow is not None:
        client = ctx.mlflow.client
        for row in table:
            for k, v in row.items():
                if isinstance(v, float):
                    client.log_metric(stage_run_id, f"{row['set']}/{k}", v)
        client.log_table(stage_run_id, data=_columns(table), artifact_file="evaluation/table.json")
    return {"table": table, "reports": reports}


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


# ----------------------------------------------------------------------------------------------
# register
# ----------------------------------------------------------------------------------------------


def register_inputs(ctx: Context) -> tuple[dict[str, Any], None]:
    return {"train": ctx.fingerprints["train"], "evaluate": ctx.fingerprints.get("evaluate", ""),
            "model": ctx.wf.register.model, "alias": ctx.wf.register.alias}, None


def register_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient(ctx.uri).get_model_version_by_alias(ctx.wf.register.model, ctx.wf.register.alias)
    except MlflowException:
        return False
    return str(mv.version) == str(outputs.get("version"))


def register_run(ctx: Context, _: None, stage_run_id: str) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    r, train = ctx.wf.register, ctx.outputs["train"]
    client = MlflowClient(ctx.uri)
    if not train.get("run_id"):
        raise RuntimeError(f"no MLflow run found for training run {train['run_name']}")
    with tracking_uri_set_to(ctx.uri):
        mv = mlflow.register_model(logged_model_uri(client, train["run_id"]), r.model,
                                   tags={"cscctrl.workflow": ctx.wf.name, "cscctrl.run_name": train["run_name"]})
    client.set_registered_model_alias(r.model, r.alias, mv.version)
    table = ctx.outputs.get("evaluate", {}).get("table", [])
    if table:
        # The evaluation table travels with the model: on the run that logged it, and as version tags.
        client.log_table(train["run_id"], data=_columns(table), artifact_file="evaluation/table.json")
        for row in table:
            for k, v in row.items():
                if isinstance(v, float):
                    client.set_model_version_tag(r.model, mv.version, f"eval.{row['set']}.{k}", f"{v:.6g}")
        client.update_model_version(r.model, mv.version, description=_table_text(table))
    return {"model": r.model, "version": str(mv.version), "alias": r.alias, "run_id": train["run_id"]}


def _table_text(rows: list[dict[str, Any]]) -> str:
    keys = [k for k in _columns(rows) if k not in ("data",)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row.get(k):.4g}" if isinstance(row.get(k), float) else str(row.get(k))
                                       for k in keys) + " |")
    return "Evaluation (cscctrl run):\n\n" + "\n".join(lines)
