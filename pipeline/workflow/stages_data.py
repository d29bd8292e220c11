"""The data stages: shard (Ray tasks over disjoint shard ranges, sharding/fanout.py) and verify.

Each stage is three functions: ``inputs(ctx) -> (key, payload)`` (the key is fingerprinted; the payload is
what ``run`` needs beyond the records, built once), ``run(ctx, payload, stage_run_id) -> outputs`` (one
typed call into the layer below) and ``valid(ctx, outputs)`` (do the recorded outputs still exist?).
"""
from __future__ import annotations

from typing import Any

from sharding.ensure import ShardSet, ensure_shards
from sharding.images import ImageOptions
from sharding.manifest import holds_plan
from sharding.plan import ShardPlan, plan_shards
from sharding.sources import Source, open_source
from sharding.verify import verify_shards
from sharding.write import PlanMismatchError
from pipeline.workflow.context import Context, ensure_ray
from pipeline.workflow.spec import EvalSet, Workflow


def open_workflow_source(wf: Workflow) -> Source:
    return open_source(wf.source, **wf.source_options)


def make_plan(wf: Workflow) -> ShardPlan:
    s = wf.shards
    return plan_shards(open_workflow_source(wf), shard_maxcount=s.shard_maxcount, shard_maxsize=s.shard_maxsize,
                       seed=s.seed, image_options=ImageOptions(resize=s.resize, quality=s.quality),
                       splits=list(s.splits) or None, max_per_split=s.max_per_split or None)


# ----------------------------------------------------------------------------------------------
# shard
# ----------------------------------------------------------------------------------------------


def shard_inputs(ctx: Context) -> tuple[dict[str, Any], ShardPlan]:
    plan = make_plan(ctx.wf)
    return {"plan": plan.fingerprint, "dest": ctx.wf.shard_url}, plan


def shard_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    return "manifest" in outputs and "plan" in outputs and holds_plan(outputs["manifest"], outputs["plan"])


def shard_run(ctx: Context, plan: ShardPlan, stage_run_id: str) -> dict[str, Any]:
    url = ctx.wf.shard_url
    if not url.startswith("memory://"):  # memory:// lives in this process: written here, without Ray
        ensure_ray()
    try:
        shards: ShardSet = ensure_shards(plan, url, tasks=ctx.wf.shards.tasks, progress=ctx.progress)
    except PlanMismatchError:
        raise PlanMismatchError(
            f"{url} holds shards of another source or other shard options (an earlier version of this "
            f"workflow?). Nothing was changed: delete that folder, or give this workflow another storage= "
            f"(cscctrl demo: --storage DIR) or shards.dest=") from None
    manifest = shards.manifest
    return {"manifest": manifest.url, "plan": plan.fingerprint, "shards": len(plan.shards), "nodes": list(shards.nodes),
            "samples": {s: manifest.num_samples(s) for s in manifest.splits},
            "rejected": manifest.summary["rejected"]["total"]}


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------


def verify_inputs(ctx: Context) -> tuple[dict[str, Any], None]:
    return {"shards": ctx.fingerprints["shard"]}, None


def verify_run(ctx: Context, _: None, stage_run_id: str) -> dict[str, Any]:
    report = verify_shards(ctx.outputs["shard"]["manifest"], progress=ctx.progress)
    if not report.ok:
        raise RuntimeError(report.summary_line())
    return {"summary": report.summary_line(), **{k: int(v) for k, v in report.counts().items()}}


def verify_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    return True


# ----------------------------------------------------------------------------------------------
# Evaluation sets with a source of their own
# ----------------------------------------------------------------------------------------------


def eval_shards(wf: Workflow, s: EvalSet, progress: bool) -> str:
    """Shards of an evaluation set's own source (its split only), written once under
    <storage>/eval-shards/<name>: a later run whose plan is the same reuses them; shards of another plan
    there are replaced (a cache of ours)."""
    url = f"{wf.storage.rstrip('/')}/eval-shards/{s.name}"
    plan = plan_shards(open_source(s.source, **s.source_options), splits=[s.split], seed=wf.shards.seed)
    return ensure_shards(plan, url, progress=progress, overwrite=True).url
