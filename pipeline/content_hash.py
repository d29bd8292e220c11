"""Names from content: the same inputs give the same name, so re-running resumes (no timestamps).

Run names (pipeline/launch.py), sweep names (tuning/spec.py) and workflow stage fingerprints hash the
canonical JSON of what identifies them with ``content_hash``."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from pipeline.config import ExperimentConfig


def content_hash(obj: Any, length: int = 10, algorithm: str = "sha1") -> str:
    """The first ``length`` hex digits of the ``algorithm`` digest of ``obj``'s canonical JSON (sorted keys;
    what JSON cannot hold is written as its str)."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.new(algorithm, text.encode()).hexdigest()[:length]


def config_identity(cfg: ExperimentConfig) -> dict[str, Any]:
    """What identifies a run of ``cfg``: the whole config except run.name (the name being derived) and the
    tracking section (where it is recorded changes nothing of what it trains)."""
    d = cfg.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k != "name"}
    d.pop("tracking", None)
    return d
