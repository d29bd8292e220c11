"""A run resumes with the settings it was trained with: a changed config is refused, or recorded.

Before a run with existing checkpoints resumes, its config is compared with the one stored in its newest
checkpoint (pipeline/checkpoint.py ``stored_config``). Keys that say how long, how often or on what the run
executes may change (``MUTABLE``: steps, the logging / image / checkpoint / evaluation cadences, loader
processes, resources, storage location, MLflow settings); the change applies from the resumed step and is
recorded on the run's MLflow run (tags ``cscctrl.resume.<key>`` = "old -> new (at step N)", and the
text artifact ``resume/step<N>.yaml``). Any other difference — the model, the objective, the optimizer and
its learning rates, the data, the batch, the seed, the precision — would silently mix two experiments in
one run (the restored optimizer and schedule keep the old learning rate), so the resume is refused before
Ray starts, with the list of differences and the way out (another run name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.checkpoint import stored_config
from pipeline.config import ConfigError, ExperimentConfig, flatten
from pipeline.redact import redact

MUTABLE: tuple[str, ...] = (
    "train.steps", "train.log_every", "train.image_every", "train.checkpoint_every", "train.eval_batches",
    "train.compile", "train.channels_last",
    "data.loader_workers", "data.shuffle_buffer",
    "scaling.num_workers", "scaling.use_gpu", "scaling.cpus_per_worker", "scaling.gpus_per_worker",
    "scaling.max_failures", "scaling.keep_checkpoints", "scaling.placement_strategy", "scaling.accelerator_type",
    "run.storage_path",
    "tracking.",
)
"""Keys (or, ending in '.', sections) a resumed run may change."""


@dataclass(frozen=True)
class Change:
    key: str
    stored: Any
    current: Any

    @property
    def mutable(self) -> bool:
        return any(self.key == m or (m.endswith(".") and self.key.startswith(m)) for m in MUTABLE)

    def __str__(self) -> str:
        return f"{self.key}: {self.stored!r} -> {self.current!r}"


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Every key whose value differs between a stored config tree and the current one. A key the stored
    tree lacks (written by an older version) is compared as its default; keys the current config no longer
    has are ignored."""
    defaults = flatten(ExperimentConfig().to_dict())
    old = flatten(stored)
    changes = []
    for key, value in flatten(current).items():
        before = old.get(key, defaults.get(key))
        if _normal(before) != _normal(value):
            changes.append(Change(key, before, value))
    return changes


def _normal(value: Any) -> Any:
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def run_dir(cfg: ExperimentConfig) -> str:
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def check_resume(cfg: ExperimentConfig) -> list[Change]:
    """The allowed changes of a resumed run ([] for a new run); ConfigError listing the others."""
    if not cfg.run.name:
        return []
    found = stored_config(run_dir(cfg))
    if found is None:
        return []
    path, stored = found
    changes = config_changes(stored, cfg.to_dict())
    fixed = [c for c in changes if not c.mutable]
    if fixed:
        listed = "; ".join(str(c) for c in fixed)
        raise ConfigError(
            f"run.name={cfg.run.name!r} exists (newest checkpoint {path}) and was trained with other settings: "
            f"{listed}. A resumed run keeps the settings it was trained with (its optimizer and schedule would "
            f"keep the old ones). To train with these, start a new run: choose another run.name, or leave "
            f"run.name empty (it is then derived from the config). A resume may change only: "
            f"{', '.join(m + '*' if m.endswith('.') else m for m in MUTABLE)}.")
    return changes


def changes_text(changes: list[Change], step: int) -> str:
    """The record of a resume's changes (YAML)."""
    return yaml.safe_dump({"resumed_at_step": step,
                           "changes": {c.key: {"before": c.stored, "after": c.current} for c in changes}},
                          sort_keys=False)


def record_changes(tracker: Any, changes: list[Change], step: int) -> None:
    """Tags ``cscctrl.resume.<key>`` and the artifact ``resume/step<N>.yaml`` on the run's MLflow run (its
    params keep the values the run started with: MLflow params cannot change)."""
    if not changes:
        return
    tracker.set_tags({f"cscctrl.resume.{c.key}": redact(f"{c.stored!r} -> {c.current!r} (at step {step})")[:5000]
                      for c in changes})
    tracker.log_text(redact(changes_text(changes, step)), f"resume/step{step:09d}.yaml")
