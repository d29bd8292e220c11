"""`cscctrl run WORKFLOW.yaml`: the whole pipeline as cached, resumable stages.

    shard -> verify -> (tune) -> train -> evaluate -> register

A workflow file names the source data, the shard destination, an optional sweep, the training config
(or the best trial of the sweep), the evaluation sets and the model name to register (the keys are
documented on ``Workflow`` below and in docs/workflow.md; bundled files live in pipeline/workflows/).

Caching. Each stage computes a fingerprint of its inputs: its own section of the file plus the
fingerprints of the stages it reads from,

    fingerprint(stage) = sha256(json(inputs(stage)) )[:16]

and records it with its outputs in ``<storage>/workflows/<name>/stages.json`` and as tags on the
workflow's MLflow parent run. A stage whose fingerprint equals the recorded one, whose record says
``done`` and whose outputs still exist (the manifest, the checkpoint, the registered version) is
skipped. An interrupted stage resumes: shards that exist are kept, a training run of the same name
resumes from its last checkpoint, an interrupted sweep resumes through ``Tuner.restore``.
``--from STAGE`` runs that stage and every later one again (a new run name for train and tune).

Sharding fans out as Ray tasks over disjoint ranges of shard indices (any node writes to shared storage
through fsspec); shard i's bytes depend only on the plan, so the result equals `cscctrl shard`'s.
Progress of every task is summed by a small actor and shown in the driver's progress bar.

MLflow: one parent run per execution (tag ``cscctrl.kind=workflow``); each stage is a nested run; the
sweep's parent run and the training run are nested under their stage's run; the status of every stage
(``cscctrl.stage.<stage>.state`` / ``.duration_s`` / ``.fingerprint``) is a tag of the parent run and
the summary table is its artifact ``workflow/summary.txt``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import yaml

from models.config import ARCHITECTURE_KEYS  # a registered name keeps them across versions
from pipeline.config import ConfigError, ExperimentConfig, coerce_value, load_config

log = logging.getLogger(__name__)

STAGES = ("shard", "verify", "tune", "train", "evaluate", "register")
WORKFLOW_DIR = Path(__file__).with_name("workflows")
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
KIND_TAG = "cscctrl.kind"
WORKFLOW_TAG = "cscctrl.workflow"
STAGE_TAG = "cscctrl.stage"
PROGRESS_EVERY = 32  # samples between progress messages of a sharding task
POLL_S = 0.5  # seconds between progress-bar updates of the driver


class WorkflowError(ValueError):
    """The workflow file or its command line is wrong; raised before any stage runs."""


class StageFailed(RuntimeError):
    """A stage failed; completed stages stay recorded and reusable."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage


# ----------------------------------------------------------------------------------------------
# The workflow file
# ----------------------------------------------------------------------------------------------


@dataclass
class ShardOptions:
    dest: str = ""
    """Shard folder or fsspec URL ('' = <storage>/shards). Multi-node: shared storage (s3://, NFS)."""

    shard_maxcount: int = 1000
    shard_maxsize: int = 512 * 2**20
    """Source bytes per shard."""

    seed: int = 0
    resize: int | None = None
    """Shorter side in pixels at shard time (None = keep the original bytes)."""

    quality: int = 90
    splits: tuple[str, ...] = ()
    """Splits to shard (() = every split of the source)."""

    max_per_split: int = 0
    """Seeded subset of N samples per split (0 = all)."""

    tasks: int = 0
    """Ray tasks writing disjoint ranges of shards (0 = one per CPU of the cluster, at most one per shard)."""


@dataclass
class SweepOptions:
    config: str = ""
    """Sweep file (as `cscctrl tune -c`); its base overrides start from the training section."""

    set: dict[str, Any] = field(default_factory=dict)
    """Sweep fields or dotted config keys, as `cscctrl tune key=value` items."""


@dataclass
class TrainingOptions:
    config: str = ""
    """Experiment YAML (as `cscctrl train -c`)."""

    from_sweep: bool = False
    """Train the best trial's config of the sweep stage (needs a sweep section)."""

    set: dict[str, Any] = field(default_factory=dict)
    """Dotted config overrides (as `cscctrl train key=value`)."""


@dataclass
class EvalSet:
    split: str
    data: str = ""
    """Shard set ('' = the workflow's shards); another set measures generalisation."""

    source: str = ""
    """A source to shard for this set alone (e.g. demo: photo crops), written once under
    <storage>/eval-shards/<name> by the evaluate stage; exclusive with data."""

    source_options: dict[str, Any] = field(default_factory=dict)
    """Options of that source (as the workflow's source_options)."""

    label: str = ""
    """Name in the evaluation table ('' = split, or <folder>-<split> / <source>-<split> for other data)."""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.data:
            return f"{Path(self.data.rstrip('/')).name}-{self.split}"
        return f"{self.source}-{self.split}" if self.source else self.split


@dataclass
class EvaluateOptions:
    sets: tuple[EvalSet, ...] = ()
    max_batches: int = 0
    batch_size: int = 256
    fd: bool = False
    """Fréchet distance in EfficientNet-Lite0 features (slow on CPU)."""


@dataclass
class RegisterOptions:
    model: str = ""
    """Registered model name ('' = no register stage)."""

    alias: str = "candidate"


@dataclass
class Workflow:
    name: str
    """Workflow name: folder under <storage>/workflows, MLflow parent run name."""

    source: str
    """demo | fashion-mnist | an image folder (ImageNet layout auto-detected)."""

    storage: str = "runs"
    """Checkpoints, sweeps, reports and the default MLflow store (a local path or a shared URL)."""

    tracking_uri: str = ""
    """MLflow URI ('' = $MLFLOW_TRACKING_URI, else sqlite under storage)."""

    experiment: str = "cscctrl"
    source_options: dict[str, Any] = field(default_factory=dict)
    """Options of the demo source: train, val, unseen (crop counts), size (pixels), seed, crop (side range
    as fractions of the photo's shorter side)."""

    shards: ShardOptions = field(default_factory=ShardOptions)
    sweep: SweepOptions | None = None
    training: TrainingOptions = field(default_factory=TrainingOptions)
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)
    register: RegisterOptions = field(default_factory=RegisterOptions)

    @property
    def shard_url(self) -> str:
        return self.shards.dest or f"{self.storage.rstrip('/')}/shards"

    @property
    def state_dir(self) -> str:
        return f"{self.storage.rstrip('/')}/workflows/{self.name}"

    @property
    def stages(self) -> list[str]:
        out = ["shard", "verify"]
        if self.sweep is not None:
            out.append("tune")
        out.append("train")
        if self.evaluate.sets:
            out.append("evaluate")
        if self.register.model:
            out.append("register")
        return out


def _typed(cls: type, tree: Any, path: str) -> Any:
    """A dataclass from a mapping: unknown keys raise with a suggestion, values are type-checked."""
    if not isinstance(tree, dict):
        raise WorkflowError(f"{path or 'the workflow'}: expected a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in tree.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (keys: {', '.join(names)})"
            raise WorkflowError(f"unknown workflow key '{where}'{hint}")
        tp = hints[key]
        if SweepOptions in typing.get_args(tp):  # the optional sweep section
            if value is None:
                kwargs[key] = None
                continue
            tp = SweepOptions
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _typed(tp, value or {}, where)
        elif tp == tuple[EvalSet, ...]:
            if not isinstance(value, list):
                raise WorkflowError(f"{where}: expected a list of {{split, data, label}}, got {value!r}")
            kwargs[key] = tuple(_typed(EvalSet, v, f"{where}[{i}]") for i, v in enumerate(value))
        elif typing.get_origin(tp) is dict:
            if not isinstance(value, dict):
                raise WorkflowError(f"{where}: expected a mapping, got {value!r}")
            kwargs[key] = dict(value)
        else:
            try:
                kwargs[key] = coerce_value(value, tp, where)
            except ConfigError as e:
                raise WorkflowError(str(e).replace("config key", "workflow key")) from None
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = [n for n in names if n not in kwargs and dataclasses.fields(cls)[names.index(n)].default
                   is dataclasses.MISSING and dataclasses.fields(cls)[names.index(n)].default_factory
                   is dataclasses.MISSING]
        raise WorkflowError(f"{path or 'the workflow'}: missing key(s) {', '.join(missing)}") from e


def resolve_workflow_path(spec: str) -> Path:
    """A workflow file, or the name of a bundled one ('demo' -> pipeline/workflows/demo.yaml)."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    for candidate in (WORKFLOW_DIR / spec, WORKFLOW_DIR / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(q.stem for q in WORKFLOW_DIR.glob("*.yaml")))
    raise WorkflowError(f"workflow file {spec!r} not found (bundled workflows: {bundled})")


def apply_items(tree: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``key=value`` items: a config section key (train.steps=50) goes to training.set, ``sweep.X`` to
    sweep.set, anything else is a dotted path of the workflow file (shards.tasks=4, register.alias=x)."""
    tree = json.loads(json.dumps(tree))
    for item in items:
        if "=" not in item:
            raise WorkflowError(f"expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        head, _, rest = key.partition(".")
        if head in CONFIG_SECTIONS:
            tree.setdefault("training", {}).setdefault("set", {})[key] = value
        elif head == "sweep" and rest and rest not in ("config", "set"):
            sweep = tree.get("sweep") or {}
            sweep.setdefault("set", {})[rest] = value
            tree["sweep"] = sweep
        else:
            node = tree
            *sections, leaf = key.split(".")
            for part in sections:
                if node.get(part) is None:
                    node[part] = {}
                if not isinstance(node[part], dict):
                    raise WorkflowError(f"{key}: '{part}' is not a section of the workflow file")
                node = node[part]
            node[leaf] = value
    return tree


def load_workflow(spec: str, items: list[str] | None = None) -> Workflow:
    path = resolve_workflow_path(spec)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise WorkflowError(f"{path}: not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkflowError(f"workflow file {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(tree, dict):
        raise WorkflowError(f"{path}: a workflow file is a mapping (name, source, shards, training, ...)")
    tree = apply_items(tree, list(items or []))
    return _typed(Workflow, tree, "")


# ----------------------------------------------------------------------------------------------
# Records: what each stage did, on storage and in MLflow
# ----------------------------------------------------------------------------------------------


def fingerprint(inputs: Any) -> str:
    """sha256 of the canonical JSON of a stage's inputs (16 hex digits)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageRecords:
    """``<storage>/workflows/<name>/stages.json``: {stage: {fingerprint, state, outputs, duration_s, attempt}}."""

    def __init__(self, state_dir: str) -> None:
        import fsspec

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

        from pipeline.tracking import default_artifact_location, get_or_create_experiment

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

    def finish(self, summary: str, state: str, current: str) -> None:
        self.client.set_tag(self.run_id, f"{WORKFLOW_TAG}.state", state)
        self.client.set_tag(self.run_id, f"{WORKFLOW_TAG}.stage", current)
        self.client.log_text(self.run_id, summary, "workflow/summary.txt")
        self.client.set_terminated(self.run_id, status="FINISHED" if state == "done" else "FAILED")


# ----------------------------------------------------------------------------------------------
# Stage context
# ----------------------------------------------------------------------------------------------


@dataclass
class Context:
    wf: Workflow
    uri: str
    records: StageRecords
    mlflow: WorkflowRun | None = None
    progress: bool = True
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)

    def forced_overrides(self, stage_run_id: str = "") -> dict[str, Any]:
        """What the workflow decides for every training run it starts."""
        return {"data.shards": self.wf.shard_url, "run.storage_path": self.wf.storage, "tracking.uri": self.uri,
                "tracking.experiment": self.wf.experiment, "tracking.registered_model": "",
                "tracking.parent_run_id": stage_run_id,
                **({"tracking.log_model": True} if self.wf.register.model else {})}


def suffix(attempt: int) -> str:
    return f"-r{attempt}" if attempt else ""


def ensure_ray() -> None:
    """pipeline.launch.init_ray (RAY_ADDRESS or a private local cluster), Tune's own output off."""
    from pipeline.launch import init_ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init_ray()


# ----------------------------------------------------------------------------------------------
# shard: Ray tasks over disjoint shard ranges
# ----------------------------------------------------------------------------------------------


class ProgressCounter:
    """A Ray actor the sharding tasks send sample counts to; the driver reads the total."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def total(self) -> int:
        return self.count


def write_range(plan: Any, dest: Any, indices: list[int], counter: Any) -> dict[str, Any]:
    """One Ray task: write shards ``indices`` of ``plan`` (finished ones are skipped), reporting every
    PROGRESS_EVERY samples to ``counter``. Returns the node it ran on and what it wrote."""
    import ray

    from sharding.write import finished_result, write_shard

    pending = 0

    def tick() -> None:
        nonlocal pending
        pending += 1
        if pending >= PROGRESS_EVERY:
            counter.add.remote(pending)
            pending = 0

    written, skipped = [], []
    for i in indices:
        spec = plan.shards[i]
        if finished_result(spec, dest) is not None:
            skipped.append(i)
            counter.add.remote(len(spec.items))
            continue
        write_shard(plan.source, spec, dest, plan.image_options, plan.label_names, on_sample=tick)
        written.append(i)
    counter.add.remote(pending)
    return {"node": ray.get_runtime_context().get_node_id(), "written": written, "skipped": skipped}


def split_ranges(num_shards: int, tasks: int) -> list[list[int]]:
    """``tasks`` contiguous, disjoint ranges covering 0..num_shards-1 (sizes differ by at most one)."""
    tasks = max(1, min(tasks, num_shards))
    bounds = [round(t * num_shards / tasks) for t in range(tasks + 1)]
    return [list(range(bounds[t], bounds[t + 1])) for t in range(tasks) if bounds[t + 1] > bounds[t]]


def shard_on_ray(plan: Any, dest: Any, tasks: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Fan the shards of ``plan`` out as Ray tasks (1 CPU each, spread over the nodes); returns each
    task's {node, written, skipped}. ``prepare_destination`` must have run; ``finalize`` comes after."""
    import ray
    from tqdm.auto import tqdm

    ensure_ray()
    if tasks <= 0:
        tasks = max(1, int(ray.cluster_resources().get("CPU", 1)))
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    task = ray.remote(num_cpus=1, max_retries=2)(write_range)
    plan_ref = ray.put(plan)
    refs = [task.options(scheduling_strategy="SPREAD").remote(plan_ref, dest, r, counter)
            for r in split_ranges(len(plan.shards), tasks)]
    total = sum(len(s.items) for s in plan.shards)
    with tqdm(total=total, unit="img", desc="shard", disable=not progress, dynamic_ncols=True) as bar:
        pending = list(refs)
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            bar.update(ray.get(counter.total.remote()) - bar.n)
        results = ray.get(refs)
        bar.update(ray.get(counter.total.remote()) - bar.n)
    ray.kill(counter)
    return results


def open_workflow_source(wf: Workflow) -> Any:
    from sharding.sources import open_source

    return open_source(wf.source, **wf.source_options)


def make_plan(wf: Workflow) -> Any:
    from sharding.images import ImageOptions
    from sharding.plan import plan_shards

    s = wf.shards
    return plan_shards(open_workflow_source(wf), shard_maxcount=s.shard_maxcount, shard_maxsize=s.shard_maxsize,
                       seed=s.seed, image_options=ImageOptions(resize=s.resize, quality=s.quality),
                       splits=list(s.splits) or None, max_per_split=s.max_per_split or None)


def shard_inputs(ctx: Context) -> dict[str, Any]:
    plan = make_plan(ctx.wf)
    ctx.outputs["_plan"] = {"plan": plan}
    return {"plan": plan.fingerprint, "dest": ctx.wf.shard_url}


def shard_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    from sharding.manifest import holds_plan

    return "manifest" in outputs and "plan" in outputs and holds_plan(outputs["manifest"], outputs["plan"])


def shard_run(ctx: Context, stage_run_id: str) -> dict[str, Any]:
    from sharding.lock import DestLock
    from sharding.storage import Destination
    from sharding.write import PlanMismatchError, finalize, prepare_destination, write_shards

    plan = ctx.outputs.pop("_plan")["plan"]
    dest = Destination(ctx.wf.shard_url)
    try:
        prepare_destination(plan, dest)
    except PlanMismatchError:
        raise PlanMismatchError(
            f"{dest.url} holds shards of another source or other shard options (an earlier version of this "
            f"workflow?). Nothing was changed: delete that folder, or give this workflow another storage= "
            f"(cscctrl demo: --storage DIR) or shards.dest=") from None
    nodes: list[str] = []
    with DestLock(dest, exclusive=True):  # sharding/lock.py: no other shard job deletes our temporaries
        if dest.is_memory:  # memory:// lives in this process only
            write_shards(plan, dest, progress=ctx.progress)
        else:
            dest.remove_stale_temporaries()
            results = shard_on_ray(plan, dest, ctx.wf.shards.tasks, ctx.progress)
            nodes = sorted({r["node"] for r in results})
        manifest = finalize(plan, dest)
    return {"manifest": manifest.url, "plan": plan.fingerprint, "shards": len(plan.shards), "nodes": nodes,
            "samples": {s: manifest.num_samples(s) for s in manifest.splits},
            "rejected": manifest.summary["rejected"]["total"]}


# ----------------------------------------------------------------------------------------------
# verify
# ----------------------------------------------------------------------------------------------


def verify_inputs(ctx: Context) -> dict[str, Any]:
    return {"shards": ctx.fingerprints["shard"]}


def verify_run(ctx: Context, stage_run_id: str) -> dict[str, Any]:
    from sharding.verify import verify_shards

    report = verify_shards(ctx.outputs["shard"]["manifest"], progress=ctx.progress)
    if not report.ok:
        raise RuntimeError(report.summary_line())
    return {"summary": report.summary_line(), **{k: int(v) for k, v in report.counts().items()}}


# ----------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------


def sweep_items(ctx: Context) -> list[str]:
    """The sweep as `cscctrl tune` items: training overrides, the workflow's forced keys, the sweep's own."""
    wf = ctx.wf
    forced = {k: v for k, v in ctx.forced_overrides().items() if k != "tracking.parent_run_id"}
    forced["tracking.log_model"] = False  # the trials' models are not the product; the train stage's is
    # Per-trial resources are the sweep's own (resources.*), never the training run's scaling.
    training = {k: v for k, v in wf.training.set.items() if not k.startswith("scaling.")}
    items = {**training, **forced, **(wf.sweep.set if wf.sweep else {})}
    if wf.training.config and wf.sweep and not wf.sweep.config:
        items.setdefault("config", wf.training.config)
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in items.items()]


def load_workflow_sweep(ctx: Context) -> Any:
    from tuning.spec import load_sweep

    return load_sweep(ctx.wf.sweep.config or None, sweep_items(ctx))


def tune_inputs(ctx: Context) -> dict[str, Any]:
    return {"sweep": load_workflow_sweep(ctx).to_dict(), "shards": ctx.fingerprints["shard"]}


def tune_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    import fsspec

    path = outputs.get("best_config", "")
    return bool(path) and fsspec.core.url_to_fs(path)[0].exists(fsspec.core.url_to_fs(path)[1])


def tune_run(ctx: Context, stage_run_id: str) -> dict[str, Any]:
    from tuning.sweep import plan_sweep, run_sweep

    spec = dataclasses.replace(load_workflow_sweep(ctx), name=f"{ctx.wf.name}-sweep-"
                               f"{ctx.fingerprints['tune'][:8]}{suffix(ctx.attempts['tune'])}")
    plan = plan_sweep(spec)
    ensure_ray()
    try:
        outcome = run_sweep(plan)
    finally:
        _nest_run_by_name(ctx, plan.base.tracking.experiment, plan.name, stage_run_id)
    if not outcome.complete or outcome.best is None:
        raise RuntimeError(f"sweep {plan.name} ended {'incomplete' if not outcome.complete else 'without a best trial'}"
                           f" (see {plan.experiment_path})")
    return {"sweep": plan.name, "best_config": outcome.best_config_path, "best_trial": outcome.best.trial_id,
            "best_run_name": outcome.best.run_name, "metric": spec.metric,
            "best_value": outcome.best.value(spec.metric), "sweep_run_id": outcome.parent_run_id}


def _nest_run_by_name(ctx: Context, experiment: str, run_name: str, parent_run_id: str) -> str | None:
    """Put the run carrying ``cscctrl.run_name=run_name`` under ``parent_run_id`` (a resumed run was
    created by an earlier execution; this execution's stage run becomes its parent)."""
    if ctx.mlflow is None:
        return None
    from pipeline.tracking import find_run

    exp = ctx.mlflow.client.get_experiment_by_name(experiment)
    run_id = find_run(ctx.mlflow.client, exp.experiment_id, run_name) if exp else None
    if run_id:
        ctx.mlflow.client.set_tag(run_id, "mlflow.parentRunId", parent_run_id)
    return run_id


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def training_config(ctx: Context, stage_run_id: str = "") -> ExperimentConfig:
    """The training run's config: the best trial's file when ``from_sweep``, else the training section;
    then the workflow's forced keys."""
    wf = ctx.wf
    forced = ctx.forced_overrides(stage_run_id)
    if wf.training.from_sweep and "tune" in ctx.outputs:
        path = _local_copy(ctx.outputs["tune"]["best_config"], ctx)
        return load_config(path, {**wf.training.set, **forced})
    return load_config(wf.training.config or None, {**wf.training.set, **forced})


def _local_copy(url: str, ctx: Context) -> str:
    """load_config reads local files; a best config on shared storage is copied beside the records."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    if "://" not in url or url.startswith("file://"):
        return path
    local = Path(os.environ.get("TMPDIR", "/tmp")) / f"cscctrl-{ctx.wf.name}-best_config.yaml"
    fs.get_file(path, str(local))
    return str(local)


def train_inputs(ctx: Context) -> dict[str, Any]:
    d = training_config(ctx).to_dict()
    d["tracking"].pop("parent_run_id", None)
    d["run"].pop("name", None)
    return {"config": d, "shards": ctx.fingerprints["shard"], "sweep": ctx.fingerprints.get("tune", "")}


def train_run_name(ctx: Context) -> str:
    return ctx.wf.training.set.get("run.name") or \
        f"{ctx.wf.name}-train-{ctx.fingerprints['train'][:8]}{suffix(ctx.attempts['train'])}"


def train_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    from pipeline.checkpoint import find_latest

    run_dir = outputs.get("run_dir", "")
    if not run_dir:
        return False
    if "://" in run_dir:  # shared storage: the recorded checkpoint folder must still be there
        import fsspec

        fs, path = fsspec.core.url_to_fs(outputs.get("checkpoint") or run_dir)
        return fs.exists(path)
    return Path(run_dir).exists() and find_latest(Path(run_dir)) is not None


def train_run(ctx: Context, stage_run_id: str) -> dict[str, Any]:
    from pipeline.launch import prepare, run_training

    cfg = training_config(ctx, stage_run_id)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=train_run_name(ctx)))
    cfg = prepare(cfg)
    ensure_ray()
    # A run resumed from an earlier execution moves under this execution's stage run.
    _nest_run_by_name(ctx, cfg.tracking.experiment, cfg.run.name, stage_run_id)
    result = run_training(cfg)
    if result is None:
        raise RuntimeError(f"training run {cfg.run.name} failed (its error is printed above)")
    run_id = _nest_run_by_name(ctx, cfg.tracking.experiment, cfg.run.name, stage_run_id)
    return {"run_name": cfg.run.name, "run_dir": f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}",
            "run_id": run_id or "", "checkpoint": str(result.checkpoint.path) if result.checkpoint else "",
            "steps": cfg.train.steps}


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def evaluate_inputs(ctx: Context) -> dict[str, Any]:
    e = ctx.wf.evaluate
    return {"train": ctx.fingerprints["train"], "shards": ctx.fingerprints["shard"],
            "sets": [dataclasses.asdict(s) for s in e.sets], "max_batches": e.max_batches,
            "batch_size": e.batch_size, "fd": e.fd}


def evaluate_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    return all(Path(p).exists() for p in outputs.get("reports", {}).values())


def evaluate_run(ctx: Context, stage_run_id: str) -> dict[str, Any]:
    from pipeline.evaluate import main as eval_main

    e, train = ctx.wf.evaluate, ctx.outputs["train"]
    out_root = Path(train["run_dir"]) / f"workflow-eval-{ctx.fingerprints['evaluate'][:8]}"
    table, reports = [], {}
    for s in e.sets:
        out = out_root / s.name
        data = eval_shards(ctx, s) if s.source else s.data
        args = argparse.Namespace(source=train["run_dir"], data=data, split=s.split, reference_split="train",
                                  max_batches=e.max_batches, batch_size=e.batch_size, device="cpu",
                                  no_fd=not e.fd, out=str(out), tracking_uri=ctx.uri)
        if eval_main(args) != 0:
            raise RuntimeError(f"evaluation on {s.name} ({data or 'the workflow shards'} [{s.split}]) failed")
        report = json.loads((out / "metrics.json").read_text())
        table.append({"set": s.name, "data": data or ctx.wf.shard_url, "split": s.split,
                      "generalisation": bool(report.get("generalisation")) or s.split == "unseen",
                      **{k: float(v) for k, v in report["metrics"].items()}})
        reports[s.name] = str(out / "report.html")
    if ctx.mlflow is not None:
        client = ctx.mlflow.client
        for row in table:
            for k, v in row.items():
                if isinstance(v, float):
                    client.log_metric(stage_run_id, f"{row['set']}/{k}", v)
        client.log_table(stage_run_id, data=_columns(table), artifact_file="evaluation/table.json")
    return {"table": table, "reports": reports}


def eval_shards(ctx: Context, s: EvalSet) -> str:
    """Shards of an evaluation set's own source (its split only), written once: a later run whose plan is the
    same reuses them (the manifest records the plan's fingerprint)."""
    from sharding.manifest import holds_plan
    from sharding.plan import plan_shards
    from sharding.sources import open_source
    from sharding.storage import Destination
    from sharding.write import shard_source

    url = f"{ctx.wf.storage.rstrip('/')}/eval-shards/{s.name}"
    plan = plan_shards(open_source(s.source, **s.source_options), splits=[s.split], seed=ctx.wf.shards.seed)
    if holds_plan(url, plan.fingerprint):
        return url
    shard_source(plan, Destination(url), workers=1, progress=ctx.progress, overwrite=True)  # a cache of ours
    return url


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


# ----------------------------------------------------------------------------------------------
# register
# ----------------------------------------------------------------------------------------------


def register_inputs(ctx: Context) -> dict[str, Any]:
    return {"train": ctx.fingerprints["train"], "evaluate": ctx.fingerprints.get("evaluate", ""),
            "model": ctx.wf.register.model, "alias": ctx.wf.register.alias}


def register_valid(ctx: Context, outputs: dict[str, Any]) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient(ctx.uri).get_model_version_by_alias(ctx.wf.register.model, ctx.wf.register.alias)
    except MlflowException:
        return False
    return str(mv.version) == str(outputs.get("version"))


def logged_model_uri(client: Any, run_id: str) -> str:
    """The URI of the model the training run logged (``mlflow.pytorch.log_model(name="model")``)."""
    run = client.get_run(run_id)
    models = [o for o in (run.outputs.model_outputs or [])] if run.outputs else []
    if models:
        return f"models:/{models[-1].model_id}"
    found = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                        filter_string=f"source_run_id = '{run_id}'")
    if not found:
        raise RuntimeError(f"training run {run_id} logged no model (tracking.log_model=false?)")
    return f"models:/{found[-1].model_id}"


def register_run(ctx: Context, stage_run_id: str) -> dict[str, Any]:
    import mlflow
    from mlflow import MlflowClient

    from pipeline.tracking import tracking_uri_set_to

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


# ----------------------------------------------------------------------------------------------
# The stage table and the driver
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    inputs: Callable[[Context], dict[str, Any]]
    run: Callable[[Context, str], dict[str, Any]]
    valid: Callable[[Context, dict[str, Any]], bool]


STAGE_TABLE: dict[str, Stage] = {
    "shard": Stage(shard_inputs, shard_run, shard_valid),
    "verify": Stage(verify_inputs, verify_run, lambda ctx, out: True),
    "tune": Stage(tune_inputs, tune_run, tune_valid),
    "train": Stage(train_inputs, train_run, train_valid),
    "evaluate": Stage(evaluate_inputs, evaluate_run, evaluate_valid),
    "register": Stage(register_inputs, register_run, register_valid),
}


def check_workflow(wf: Workflow, from_stage: str | None, uri: str) -> None:
    """Everything that can fail before a stage runs (WorkflowError / ConfigError, naming the key)."""
    if from_stage is not None and from_stage not in STAGES:
        raise WorkflowError(f"--from {from_stage!r}: unknown stage (stages: {', '.join(STAGES)})")
    if from_stage is not None and from_stage not in wf.stages:
        raise WorkflowError(f"--from {from_stage!r}: this workflow has no such stage (it runs {', '.join(wf.stages)})")
    if wf.training.from_sweep and wf.sweep is None:
        raise WorkflowError("training.from_sweep: true needs a sweep section (the best trial of which sweep?)")
    if not wf.name or "/" in wf.name:
        raise WorkflowError(f"name: {wf.name!r} must be a non-empty name without '/'")
    from sharding.sources import SourceError, open_source

    try:
        open_workflow_source(wf)
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
    ctx = Context(wf=wf, uri=uri, records=None)  # type: ignore[arg-type]
    cfg = training_config(ctx)  # unknown or mistyped training keys raise here
    if wf.sweep is not None:
        from tuning.spaces import SpaceError, parse_space, resolve_space

        spec = load_workflow_sweep(ctx)
        try:
            parse_space(resolve_space(spec.space), load_config(spec.config or None, spec.base))
        except SpaceError as e:
            raise WorkflowError(f"sweep: {e}") from None
    from pipeline.tracking import check_reachable

    check_reachable(uri)
    if wf.register.model:
        check_registered_architecture(uri, wf.register.model, cfg)


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
    params = client.get_run(latest.run_id).data.params
    ours = cfg.model
    differ = []
    for key in ARCHITECTURE_KEYS:
        theirs = params.get(f"model.{key}")
        if theirs is not None and str(getattr(ours, key)) != theirs:
            differ.append(f"model.{key}: registered {theirs}, this workflow {getattr(ours, key)}")
    if differ:
        raise WorkflowError(f"register.model={name!r} is already taken by another architecture (version "
                            f"{latest.version}): {'; '.join(differ)}. Choose another name (a register.model=NAME "
                            f"item on the command line) or another storage= (cscctrl demo: --storage DIR).")


def tracking_uri(wf: Workflow) -> str:
    from pipeline.tracking import resolve_tracking_uri

    return resolve_tracking_uri(load_config(None, {"run.storage_path": wf.storage, "tracking.uri": wf.tracking_uri}))


@dataclass
class StageOutcome:
    stage: str
    state: str  # done | skipped | failed
    duration_s: float
    note: str = ""


def run_workflow(wf: Workflow, from_stage: str | None = None, progress: bool = True) -> list[StageOutcome]:
    """Run the stages in order; returns one outcome per stage. Raises StageFailed on the first failure."""
    uri = tracking_uri(wf)
    check_workflow(wf, from_stage, uri)
    ctx = Context(wf=wf, uri=uri, records=StageRecords(wf.state_dir), progress=progress)
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
        fp = fingerprint(s.inputs(ctx))
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
        ctx.outputs.pop("_plan", None)
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
        outputs = s.run(ctx, stage_run_id)
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


def summary_text(wf: Workflow, outcomes: list[StageOutcome]) -> str:
    lines = [f"workflow {wf.name}", f"{'stage':<10} {'state':<8} {'duration':>9}  note"]
    for o in outcomes:
        lines.append(f"{o.stage:<10} {o.state:<8} {o.duration_s:>8.1f}s  {o.note}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

HELP_EPILOG = """\
examples:
  cscctrl run demo                                   # pipeline/workflows/demo.yaml on the embedded default
  cscctrl run fashion_mnist storage=/data/runs train.steps=2000
  cscctrl run imagenet128_cluster.yaml --from train  # train again (and evaluate, register) with cached shards
  cscctrl run my_workflow.yaml --print-plan          # the resolved workflow and its stages; nothing runs

key=value items: a config section key (train.steps=50, model.lam=0.05) overrides the training config;
sweep.FIELD=value sets a sweep field or base key (sweep.num_samples=4); any other key is a dotted path of
the workflow file (storage=..., shards.tasks=8, register.alias=staging). Re-running the same workflow
skips stages whose inputs did not change and resumes an interrupted one. See docs/workflow.md.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = HELP_EPILOG
    p.add_argument("workflow", metavar="WORKFLOW.yaml", help="workflow file, or the name of a bundled one "
                                                              f"({', '.join(sorted(q.stem for q in WORKFLOW_DIR.glob('*.yaml')))})")
    p.add_argument("items", nargs="*", metavar="key=value", help="overrides of the workflow file")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help=f"run this stage and every later one again ({', '.join(STAGES)})")
    p.add_argument("--print-plan", action="store_true", help="print the resolved workflow and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        wf = load_workflow(args.workflow, args.items)
        if args.print_plan:
            uri = tracking_uri(wf)
            doc = {"stages": wf.stages, "tracking_uri": uri, "shards": wf.shard_url, **dataclasses.asdict(wf)}
            print(yaml.safe_dump(doc, sort_keys=False), end="")
            return 0
        outcomes = run_workflow(wf, args.from_stage, progress=not args.no_progress)
    except (WorkflowError, ConfigError, FileNotFoundError, ConnectionError) as e:
        print(f"cscctrl run: error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"cscctrl run: {e}\n(completed stages are recorded in {wf.state_dir}/stages.json and are "
              f"reused when the workflow runs again)", file=sys.stderr)
        return 1
    print(summary_text(wf, outcomes), end="", flush=True)
    return 0
