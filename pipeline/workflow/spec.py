"""The workflow file: its dataclasses, and loading it (YAML file < command-line ``key=value`` items).

The file is typed by pipeline/config.py's checker (``from_dict``); command-line items are read by its
``parse_override`` (the values of `cscctrl train key=value`) and placed by ``set_dotted`` (every part of a
dotted workflow path must exist). Unknown keys and mistyped values are WorkflowErrors naming the key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import (ConfigError, ExperimentConfig, from_dict, load_yaml_text, parse_override,
                             read_yaml_file, set_dotted)

STAGES = ("shard", "verify", "tune", "train", "evaluate", "register")
WORKFLOW_DIR = Path(__file__).resolve().parent.parent / "workflows"
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))


class WorkflowError(ValueError):
    """The workflow file or its command line is wrong; raised before any stage runs."""


class StageFailed(RuntimeError):
    """A stage failed; completed stages stay recorded and reusable."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"stage '{stage}' failed: {message}")
        self.stage = stage


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


def _workflow_error(e: ConfigError) -> WorkflowError:
    return WorkflowError(str(e).replace("config key", "workflow key"))


def place_item(tree: dict[str, Any], item: str) -> None:
    """One ``key=value`` item into the file's tree: a config section key (train.steps=50) goes to
    training.set, ``sweep.X`` to sweep.set, anything else is a dotted path of the workflow file
    (shards.tasks=4, register.alias=x, sweep=null). Config values are read as `cscctrl train` reads them
    (``parse_override``: 1e-4 is a number); other values may also be YAML flow text ([a, b], {k: v})."""
    try:
        key, value = parse_override(item)
    except ConfigError as e:
        raise WorkflowError(f"expected key=value, got {item!r}") from e
    head, _, rest = key.partition(".")
    sweep_field = head == "sweep" and rest and rest not in ("config", "set")
    if isinstance(value, str) and (rest if sweep_field else key).split(".", 1)[0] not in CONFIG_SECTIONS:
        try:
            value = load_yaml_text(item.split("=", 1)[1]) if value else value
        except yaml.YAMLError as e:
            raise WorkflowError(f"{key}: cannot read {value!r} as a value: {e}") from None
    if head in CONFIG_SECTIONS:
        tree.setdefault("training", {}).setdefault("set", {})[key] = value
    elif sweep_field:
        if not isinstance(tree.get("sweep"), dict):
            tree["sweep"] = {}
        tree["sweep"].setdefault("set", {})[rest] = value
    else:
        try:
            set_dotted(tree, key, value, root=Workflow)
        except ConfigError as e:
            raise _workflow_error(e) from None


def load_workflow(spec: str, items: list[str] | None = None) -> Workflow:
    """defaults < workflow file (or bundled name) < command-line items -> a checked Workflow."""
    path = resolve_workflow_path(spec)
    try:
        tree = read_yaml_file(path, "workflow") or {}
    except ConfigError as e:
        raise WorkflowError(str(e)) from None
    if not isinstance(tree, dict):
        raise WorkflowError(f"{path}: a workflow file is a mapping (name, source, shards, training, ...)")
    for section in ("shards", "training", "evaluate", "register"):  # an empty section keeps its defaults
        if section in tree and tree[section] is None:
            del tree[section]
    for item in items or []:
        place_item(tree, item)
    missing = [f.name for f in dataclasses.fields(Workflow) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in tree]
    if missing:
        raise WorkflowError(f"the workflow: missing key(s) {', '.join(missing)}")
    try:
        return from_dict(Workflow, tree)
    except ConfigError as e:
        raise _workflow_error(e) from None
