"""The sweep file: what to search, how, ranked by which metric, on what resources.

    cscctrl tune -c configs/sweeps/sparsity_unroll.yaml [key=value ...]

A sweep file is YAML with these keys (all optional; defaults below):

    name: ""                  # '' = derived from the content: the same sweep re-run resumes
    config: ""                # experiment YAML the trials start from (as `cscctrl train -c`)
    base: {train.steps: 500}  # dotted config overrides on top of it (as `cscctrl train key=value`)
    space: sparsity_unroll    # a preset name, a list of them, or {dotted.key: spec} (tuning/spaces.py)
    search: optuna            # optuna | random | grid
    num_samples: 12           # optuna/random: points drawn; grid/random: repeats of the grid keys
    metric: eval/psnr         # what ranks trials: held-out PSNR of the end-of-training evaluation
    mode: max
    scheduler: asha           # asha | none
    asha: {metric: train/recon_psnr, mode: max, grace_period: 0, reduction_factor: 2}
    max_concurrent_trials: 0  # 0 = as many as the cluster holds at once
    max_failures: 1           # Tune-level retries of a trial whose driver fails
    seed: 0                   # searcher seed
    resources: {num_workers: 1, cpus_per_worker: 1.0, use_gpu: false, gpus_per_worker: 1.0, driver_cpus: 0.1}

Command-line ``key=value`` items whose first part is a config section (model, optim, train, ...) go
into ``base``; any other key sets a field of this file (``num_samples=4``, ``space=unroll``,
``space=[sparsity, unroll]``, ``asha.grace_period=20``, ``resources.num_workers=2``). Both kinds are
read in the one dialect of pipeline/dialect.py (YAML flow values), as ``cscctrl train`` reads its items.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline import metric_names
from pipeline.config import (CONFIG_DIR, ConfigError, ExperimentConfig, from_dict, parse_override,
                             read_yaml_file, resolve_named_file, set_dotted)
from pipeline.content_hash import config_identity, content_hash
from pipeline.metric_names import evaluation_metrics, training_metrics

SWEEP_DIR = CONFIG_DIR / "sweeps"
CONFIG_SECTIONS = tuple(f.name for f in dataclasses.fields(ExperimentConfig))
# scaling.* keys the sweep sets from 'resources:' (the other scaling keys may go in 'base').
RESOURCE_KEYS = ("scaling.num_workers", "scaling.cpus_per_worker", "scaling.use_gpu", "scaling.gpus_per_worker")
# What ASHA measures progress in: the training step every report carries (pipeline/metric_names.py).
TIME_ATTR = metric_names.STEP


@dataclass
class AshaSpec:
    metric: str = metric_names.RECON_PSNR
    """Metric ASHA compares trials on at its rungs; it must be in every report (the held-out metric
    exists only at the end, so early stopping looks at the training reconstruction PSNR)."""

    mode: Literal["max", "min"] = "max"
    grace_period: int = 0
    """Steps every trial runs before it can be stopped; 0 = a quarter of train.steps."""

    reduction_factor: float = 2.0
    """1/reduction_factor of the trials reaching a rung continue to the next."""

    def __post_init__(self) -> None:
        if self.grace_period < 0:
            raise ConfigError(f"asha.grace_period={self.grace_period}: must be >= 0 (0 = train.steps / 4)")
        if self.reduction_factor <= 1:
            raise ConfigError(f"asha.reduction_factor={self.reduction_factor}: must be > 1")


@dataclass
class ResourcesSpec:
    """Per-trial resources: the trial's Ray Train worker group, and the Tune trial that drives it."""

    num_workers: int = 1
    """Ray Train workers per trial (scaling.num_workers of each trial)."""

    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    """GPUs per worker when use_gpu (fractions let several small trials share one GPU)."""

    driver_cpus: float = 0.1
    """CPU reserved by Tune for the trial's driver function, which only launches and watches the worker
    group; a fraction, so drivers never take the CPUs the workers need."""

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"resources.num_workers={self.num_workers}: a trial needs at least 1 Ray Train "
                              f"worker (in-process runs, num_workers=0, cannot report to Tune)")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"resources.cpus_per_worker={self.cpus_per_worker}: must be > 0")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ConfigError(f"resources.gpus_per_worker={self.gpus_per_worker}: must be > 0 with use_gpu")
        if self.driver_cpus <= 0:
            raise ConfigError(f"resources.driver_cpus={self.driver_cpus}: must be > 0 (Ray places the driver "
                              f"in a placement group, which cannot be empty); a small fraction such as 0.1")

    def scaling_overrides(self) -> dict[str, Any]:
        """The trial config's scaling.* keys."""
        return {"scaling.num_workers": self.num_workers, "scaling.cpus_per_worker": self.cpus_per_worker,
                "scaling.use_gpu": self.use_gpu, "scaling.gpus_per_worker": self.gpus_per_worker}


@dataclass
class SweepSpec:
    name: str = ""
    config: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    space: Any = "sparsity_unroll"
    search: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: int = 12
    metric: str = metric_names.EVAL_PREFIX + "psnr"
    mode: Literal["max", "min"] = "max"
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaSpec = field(default_factory=AshaSpec)
    max_concurrent_trials: int = 0
    max_failures: int = 1
    seed: int = 0
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"num_samples={self.num_samples}: must be >= 1")
        if self.max_concurrent_trials < 0:
            raise ConfigError(f"max_concurrent_trials={self.max_concurrent_trials}: must be >= 0 (0 = derived "
                              f"from the cluster's resources)")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures}: must be >= 0")
        if not isinstance(self.base, dict):
            raise ConfigError(f"base must be a mapping of dotted config keys to values, got {self.base!r}")
        for key in self.base:
            if key.split(".", 1)[0] not in CONFIG_SECTIONS:
                raise ConfigError(f"base key {key!r} is not a dotted config key (sections: "
                                  f"{', '.join(CONFIG_SECTIONS)})")
            if key in RESOURCE_KEYS:
                raise ConfigError(f"base key {key!r}: per-trial resources go under 'resources:' "
                                  f"(num_workers, cpus_per_worker, use_gpu, gpus_per_worker, driver_cpus)")
        if self.name and not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"name={self.name!r}: use letters, digits, '-', '_' and '.' only (it names a "
                              f"directory and prefixes every trial's run name)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Loading: YAML file < command-line items
# ----------------------------------------------------------------------------------------------


def resolve_sweep_path(path: str | Path) -> Path:
    """A sweep file path, or the bare name of one in configs/sweeps/ ('debug' -> configs/sweeps/debug.yaml)."""
    return resolve_named_file(path, SWEEP_DIR, "sweep")


def load_sweep(path: str | Path | None = None, items: list[str] | None = None) -> SweepSpec:
    """defaults < sweep YAML file < command-line items -> a checked SweepSpec (unknown keys raise). Items
are read as ``cscctrl train`` reads them (pipeline/dialect.py)."""
    tree: dict[str, Any] = {}
    if path:
        p = resolve_sweep_path(path)
        data = read_yaml_file(p, "sweep") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a sweep file is a mapping (name, base, space, search, ...)")
        tree = data
    tree.setdefault("base", {})
    tree["base"] = dict(tree["base"] or {})
    for item in items or []:
        key, value = parse_override(item)
        if key.split(".", 1)[0] in CONFIG_SECTIONS:
            tree["base"][key] = value
        else:  # a field of this file: num_samples=4, space=[sparsity, unroll], asha.grace_period=20
            set_dotted(tree, key, value, root=SweepSpec)
    if isinstance(tree.get("space"), dict) and not tree["space"]:
        raise ConfigError("space: {} is empty; give dotted config keys with specs, or a preset name")
    # ``space`` and ``base`` are free-form here: tuning/spaces.py and pipeline/config.py check them against
    # the experiment config.
    return from_dict(SweepSpec, tree)


def sweep_name(spec: SweepSpec, base: ExperimentConfig) -> str:
    """spec.name, else content-based: the same sweep on the same base config gets the same name (and so
    resumes), with no timestamp in it."""
    if spec.name:
        return spec.name
    d = spec.to_dict()
    d.pop("name")
    return f"sweep-{content_hash({'sweep': d, 'base': config_identity(base)})}"


# ----------------------------------------------------------------------------------------------
# Which metrics a trial reports (checked before any trial starts)
# ----------------------------------------------------------------------------------------------


def evaluation_skipped_because(cfg: ExperimentConfig, splits: list[str] | None) -> str:
    """Why the end-of-training evaluation will not run for ``cfg`` ('' when it will). ``splits`` are the
    shard manifest's splits (None for synthetic data)."""
    if cfg.data.synthetic:
        return "data.synthetic=true (random tensors have no held-out split)"
    if not cfg.data.eval_split:
        return "data.eval_split is empty"
    if cfg.train.eval_batches == 0:
        return "train.eval_batches=0"
    if splits is not None and cfg.data.eval_split not in splits:
        return f"the shards have no '{cfg.data.eval_split}' split (splits: {', '.join(splits)})"
    return ""


def check_metric(name: str, role: str, cfg: ExperimentConfig, splits: list[str] | None, *,
                 every_report: bool) -> None:
    """``name`` must be reported by the trials (by every report when ``every_report``); else a
    ConfigError that lists what is reported."""
    train = training_metrics(cfg)
    evaluation = evaluation_metrics(cfg)
    if name in train:
        return
    if name in evaluation:
        if every_report:
            raise ConfigError(f"{role}={name!r} is measured only by the end-of-training evaluation, but "
                              f"{role} needs a value at every report; use one of the training metrics, e.g. "
                              f"train/recon_psnr or sparsity/stage1")
        why = evaluation_skipped_because(cfg, splits)
        if why:
            raise ConfigError(f"{role}={name!r} comes from the end-of-training evaluation, which these trials "
                              f"skip: {why}. Use a training metric (e.g. metric=train/recon_psnr) or give shards "
                              f"with an evaluation split")
        return
    candidates = sorted(train | (set() if every_report else evaluation))
    near = difflib.get_close_matches(name, candidates, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"{role}={name!r} is never reported by a trial.{hint} Reported: {', '.join(candidates)}")


def asha_grace_period(spec: SweepSpec, cfg: ExperimentConfig) -> int:
    """ASHA's first rung, in training steps; checked against train.steps."""
    grace = spec.asha.grace_period or max(1, cfg.train.steps // 4)
    if grace > cfg.train.steps:
        raise ConfigError(f"asha.grace_period={grace} exceeds train.steps={cfg.train.steps}: no trial could "
                          f"ever be compared; lower it or train longer")
    return grace
