"""Checkpoint files: one ``state.pt`` per checkpoint directory, read with ``weights_only=True``.

Ray Train copies a reported checkpoint directory to ``run.storage_path/<run name>/checkpoint_*``;
``find_latest`` locates the newest one there for ``cscctrl eval`` and for in-process runs.
``check_architecture`` refuses a checkpoint whose stored config describes another model than the one it
would be loaded into.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from models.config import ARCHITECTURE_KEYS, ModelConfig

STATE_FILE = "state.pt"


def save_state(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically (temporary name, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".tmp")
    os.close(fd)
    torch.save(state, tmp)
    final = directory / STATE_FILE
    os.replace(tmp, final)
    return final


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint directory or ``state.pt`` file. Untrusted bytes are never unpickled:
    ``weights_only=True`` admits tensors and plain containers only."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path} (expected a directory holding {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=True)


def check_architecture(state: dict[str, Any], model: ModelConfig, source: str | Path = "the checkpoint") -> None:
    """Raise ValueError unless the model config stored in ``state`` (a checkpoint written by the trainer)
    agrees with ``model`` on every ARCHITECTURE_KEYS field. The stored config decides, not the tensors: the
    plain-convolution baseline (model.layer='conv') has the CSC model's parameter shapes, and its decoder
    even the same state-dict keys, so shapes alone would let a CSC checkpoint load into a conv model.
    A key missing from an older checkpoint's config takes ModelConfig's default (layer: 'csc')."""
    config = state.get("config")
    stored = config.get("model") if isinstance(config, dict) else None
    if not isinstance(stored, dict):
        raise ValueError(f"{source}: no model config in the checkpoint, so its architecture cannot be checked")
    defaults = ModelConfig()
    differ = []
    for key in ARCHITECTURE_KEYS:
        theirs, ours = stored.get(key, getattr(defaults, key)), getattr(model, key)
        if theirs != ours:
            differ.append(f"model.{key}: checkpoint {theirs!r}, this config {ours!r}")
    if differ:
        raise ValueError(f"{source} was written by another architecture ({'; '.join(differ)}); refusing to load "
                         f"it. Use another run.name (or none: it is then derived from the config), or set these "
                         f"keys to the checkpoint's values.")


def load_ray_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """Read a ``ray.train.Checkpoint`` (local or remote storage) into a state dict."""
    with checkpoint.as_directory() as d:
        return load_state(d)


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint directory (by the step stored in its name) under a Ray run directory, or
    ``run_dir`` itself when it is a checkpoint directory."""
    run_dir = Path(run_dir)
    if (run_dir / STATE_FILE).exists():
        return run_dir
    candidates = [p for p in run_dir.glob("checkpoint*") if (p / STATE_FILE).exists()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (_step_of(p), p.stat().st_mtime))


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:09d}"


def _step_of(path: Path) -> int:
    digits = "".join(ch for ch in path.name.rsplit("step", 1)[-1] if ch.isdigit())
    return int(digits) if digits else -1
