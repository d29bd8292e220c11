"""Checkpoint files: ``state.pt`` plus its record ``checkpoint.json``, written last; verified on every read.

A checkpoint directory holds

    state.pt          torch.save of the trainer's state (read with ``weights_only=True``: untrusted bytes
                      are never unpickled)
    checkpoint.json   {"format", "step", "files": {"state.pt": {"bytes", "sha256"}}, "config"}: written
                      after state.pt, each atomically (temporary name, fsync, rename)

A checkpoint is intact when its record parses and state.pt has the recorded size and sha256 (and loads);
one written before records existed (no checkpoint.json) is intact when it loads. Anything else is damaged:
``load_checkpoint`` raises CheckpointError naming the file and the reason, and ``newest_intact`` passes
over it to the next older one, saying so. ``repair_run`` (before a run resumes) moves damaged checkpoints
newer than the newest intact one aside (``damaged_<name>``, kept for inspection) and drops them, and
checkpoint folders that no longer exist, from Ray Train's record of the run, so that Ray resumes from the
newest intact checkpoint instead of failing on the damaged one.

Paths are local folders or fsspec URLs (s3://…): Ray Train copies a reported checkpoint directory to
``run.storage_path/<run name>/checkpoint_*``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from models.config import ARCHITECTURE_KEYS, ModelConfig
from sharding.storage import Destination, is_url

STATE_FILE = "state.pt"
RECORD_FILE = "checkpoint.json"
RECORD_FORMAT = "cscctrl-checkpoint/1"
DAMAGED_PREFIX = "damaged_"
HASH_CHUNK = 1 << 22  # bytes


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or of another model; the message names its path."""


# ----------------------------------------------------------------------------------------------
# Paths on local disks and object stores alike
# ----------------------------------------------------------------------------------------------


def _location(path: str | Path) -> Destination:
    """The checkpoint path as the one fsspec location type of the project (sharding/storage.py)."""
    return Destination(str(path))


def _fs(path: str | Path) -> tuple[Any, str]:
    loc = _location(path)
    return loc.fs, loc.root


def _join(directory: str | Path, name: str) -> str:
    return f"{str(directory).rstrip('/')}/{name}"


def _exists(path: str | Path) -> bool:
    return _location(path).exists()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # A failed write (full disk, quota) names no file, and torch.save reports it as a RuntimeError whose
        # context is the OSError: name the file being written.
        cause = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is not None and cause.filename is None:
            raise OSError(cause.errno, cause.strerror or str(cause), str(path)) from e
        raise


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def save_state(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``state`` to ``directory/state.pt``, then its record ``checkpoint.json`` (size, sha256, step,
    config), each atomically and durably. A crash leaves either no record (the checkpoint is unverified and
    is loaded only if state.pt loads) or a record that matches state.pt. ``directory`` may be an fsspec URL
    (s3://…): each file is then one complete upload. Returns the path (or URL) of state.pt."""
    if is_url(directory):
        return _save_state_remote(state, _location(directory))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / STATE_FILE
    _write_atomic(final, lambda f: torch.save(state, f))
    digest, size = hashlib.sha256(), 0
    with open(final, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    record = _record(state, size, digest.hexdigest())
    _write_atomic(directory / RECORD_FILE, lambda f: f.write(json.dumps(record, indent=1).encode()))
    _fsync_dir(directory)
    return final


def _record(state: dict[str, Any], size: int, sha256: str) -> dict[str, Any]:
    return {"format": RECORD_FORMAT, "step": int(state.get("step", 0)),
            "files": {STATE_FILE: {"bytes": size, "sha256": sha256}}, "config": state.get("config")}


def _save_state_remote(state: dict[str, Any], loc: Destination) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    loc.makedirs()
    loc.write_bytes_atomic(STATE_FILE, data)
    record = _record(state, len(data), hashlib.sha256(data).hexdigest())
    loc.write_bytes_atomic(RECORD_FILE, json.dumps(record, indent=1).encode())
    return loc.url_of(STATE_FILE)


# ----------------------------------------------------------------------------------------------
# Reading and verifying
# ----------------------------------------------------------------------------------------------


def read_record(directory: str | Path) -> dict[str, Any] | None:
    """The checkpoint's record, or None when it has none (written before records existed). A record that
    cannot be read or parsed raises CheckpointError."""
    fs, path = _fs(_join(directory, RECORD_FILE))
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"{_join(directory, RECORD_FILE)} cannot be read: {e}") from e
    try:
        record = json.loads(raw)
        entry = record["files"][STATE_FILE]
        int(entry["bytes"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{_join(directory, RECORD_FILE)} is damaged (not a checkpoint record: "
                              f"{type(e).__name__})") from e
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(f"{_join(directory, RECORD_FILE)}: format {record.get('format')!r}, expected "
                              f"{RECORD_FORMAT!r}")
    return record


def _read_verified_bytes(directory: str | Path, record: dict[str, Any] | None) -> bytes:
    """state.pt's bytes, checked against the record's size and sha256 when there is one."""
    state_path = _join(directory, STATE_FILE)
    fs, path = _fs(state_path)
    try:
        if record is not None:
            size = fs.size(path)
            want = int(record["files"][STATE_FILE]["bytes"])
            if size != want:
                raise CheckpointError(f"{state_path} is damaged: {size} bytes, its record says {want} (an "
                                      f"interrupted copy or a truncated file)")
        data = fs.cat_file(path)
    except FileNotFoundError as e:
        raise CheckpointError(f"{state_path} is missing") from e
    except IsADirectoryError as e:
        raise CheckpointError(f"{state_path} is a folder, not a checkpoint file") from e
    except OSError as e:
        raise CheckpointError(f"{state_path} cannot be read: {e}") from e
    if record is not None:
        want = record["files"][STATE_FILE]["sha256"]
        if hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"{state_path} is damaged: its sha256 differs from the one recorded when it was "
                                  f"written")
    return data


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The verified state of a checkpoint directory; CheckpointError (naming the file) when it is missing or
    damaged. Untrusted bytes are never unpickled: ``weights_only=True`` admits tensors and plain containers."""
    record = read_record(directory)
    data = _read_verified_bytes(directory, record)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, … on bad bytes
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{_join(directory, STATE_FILE)} is damaged: it does not load as a checkpoint "
                              f"({type(e).__name__}: {reason[:200]})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{_join(directory, STATE_FILE)} is not a cscctrl checkpoint (a "
                              f"{type(state).__name__}, not a state dict)")
    return state


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint directory or its ``state.pt`` file (verified; see ``load_checkpoint``)."""
    path = str(path).rstrip("/")
    if path == STATE_FILE or path.endswith("/" + STATE_FILE):
        path = path[: -len(STATE_FILE)].rstrip("/") or "."
    if not _exists(path):
        raise FileNotFoundError(f"no checkpoint at {path} (expected a directory holding {STATE_FILE})")
    return load_checkpoint(path)


def load_ray_checkpoint(checkpoint: Any) -> dict[str, Any]:
    """Read a ``ray.train.Checkpoint`` (local or remote storage) into a verified state dict."""
    with checkpoint.as_directory() as d:
        return load_checkpoint(d)


def architecture_differences(stored: Mapping[str, Any], model: ModelConfig, *,
                             missing: Literal["default", "skip"] = "default") -> list[tuple[str, Any, Any]]:
    """(key, stored value, ``model``'s value) for every ARCHITECTURE_KEYS field on which a stored model
    config and ``model`` disagree: the one architecture check of checkpoints (``check_architecture``) and
    of registered model names (the workflow's register stage).

    ``stored`` is a checkpoint's model section ({'layer': 'csc', ...}) or a run's MLflow params
    ({'model.layer': 'csc', ...}: text, compared with str of ``model``'s value). A key ``stored`` lacks takes
    ModelConfig's default (``missing='default'``: an older checkpoint without 'layer' is a CSC model) or is
    not compared (``missing='skip'``)."""
    defaults = ModelConfig()
    out = []
    for key in ARCHITECTURE_KEYS:
        theirs = stored.get(key, stored.get(f"model.{key}"))
        if theirs is None:
            if missing == "skip":
                continue
            theirs = getattr(defaults, key)
        ours = getattr(model, key)
        if theirs != ours and not (isinstance(theirs, str) and theirs == str(ours)):
            out.append((key, theirs, ours))
    return out


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
    differ = [f"model.{key}: checkpoint {theirs!r}, this config {ours!r}"
              for key, theirs, ours in architecture_differences(stored, model)]
    if differ:
        raise ValueError(f"{source} was written by another architecture ({'; '.join(differ)}); refusing to load "
                         f"it. Use another run.name (or none: it is then derived from the config), or set these "
                         f"keys to the checkpoint's values.")


# ----------------------------------------------------------------------------------------------
# The checkpoints of a run
# ----------------------------------------------------------------------------------------------


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:09d}"


def _step_of(name: str) -> int:
    digits = "".join(ch for ch in name.rsplit("step", 1)[-1] if ch.isdigit())
    return int(digits) if digits else -1


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """Checkpoint directories (``checkpoint*``) directly under a run directory, newest (highest step) first."""
    names = [n for n in _location(run_dir).listdirs() if n.startswith("checkpoint")]
    return [_join(run_dir, n) for n in sorted(names, key=lambda n: (_step_of(n), n), reverse=True)]


def find_latest(run_dir: str | Path) -> Path | str | None:
    """The newest checkpoint directory holding a ``state.pt`` (by the step in its name) under a run
    directory, or ``run_dir`` itself when it is a checkpoint directory: a Path for a local run directory, the
    URL for one on an object store. Not verified: see newest_intact."""
    found = next((c for c in [str(run_dir), *list_checkpoints(run_dir)] if _exists(_join(c, STATE_FILE))), None)
    if found is None:
        return None
    return found if is_url(found) else Path(found)


@dataclass
class Damaged:
    path: str
    reason: str


def newest_intact(run_dir: str | Path) -> tuple[str | None, dict[str, Any] | None, list[Damaged]]:
    """(path, state) of the newest checkpoint under ``run_dir`` that verifies and loads, passing over damaged
    ones (returned with their reasons, newest first, for the caller to report); (None, None, damaged)
    when there is none. ``run_dir`` may itself be a checkpoint directory (then it alone is tried)."""
    is_checkpoint = _exists(_join(run_dir, STATE_FILE)) or _exists(_join(run_dir, RECORD_FILE))
    candidates = [str(run_dir)] if is_checkpoint else list_checkpoints(run_dir)
    damaged: list[Damaged] = []
    for candidate in candidates:
        try:
            return candidate, load_checkpoint(candidate), damaged
        except CheckpointError as e:
            damaged.append(Damaged(candidate, str(e)))
    return None, None, damaged


def load_newest(source: str | Path) -> tuple[str, dict[str, Any]]:
    """(path, state) of a checkpoint directory, or of the newest intact checkpoint of a run directory; each
    damaged checkpoint passed over is named on stderr. FileNotFoundError when there is no checkpoint,
    CheckpointError when every one is damaged."""
    path, state, damaged = newest_intact(source)
    for d in damaged:
        print(f"[cscctrl] checkpoint {d.path} is damaged and passed over: {d.reason}", file=sys.stderr, flush=True)
    if path is None:
        if damaged:
            raise CheckpointError(f"no intact checkpoint under {source}: " + "; ".join(d.reason for d in damaged))
        raise FileNotFoundError(f"no checkpoint under {source} (expected checkpoint_*/state.pt or state.pt)")
    return path, state


def stored_config(run_dir: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(checkpoint path, config) of the newest checkpoint of a run whose config can be read: from its record
    (cheap), else from its state (a checkpoint without a record). None when the run has no checkpoint."""
    for candidate in list_checkpoints(run_dir):
        try:
            record = read_record(candidate)
            config = record.get("config") if record is not None else load_checkpoint(candidate).get("config")
        except CheckpointError:
            continue
        if isinstance(config, dict):
            return candidate, config
    return None


# ----------------------------------------------------------------------------------------------
# Before a run resumes: damaged checkpoints out of the way, Ray Train's record of the run consistent
# ----------------------------------------------------------------------------------------------


@dataclass
class Repair:
    resume_from: str | None  # the newest intact checkpoint (None: the run starts from scratch)
    step: int
    moved: list[tuple[Damaged, str]]  # damaged checkpoints and where they were moved
    forgotten: list[str]  # checkpoint folders Ray Train recorded that no longer exist

    def messages(self, run_name: str) -> list[str]:
        lines = [f"[cscctrl] run {run_name}: checkpoint {d.path} is damaged ({d.reason}); moved to {dest}"
                 for d, dest in self.moved]
        lines += [f"[cscctrl] run {run_name}: checkpoint folder {p} recorded by Ray Train no longer exists"
                  for p in self.forgotten]
        if lines:
            lines.append(f"[cscctrl] run {run_name}: resuming from " +
                         (f"{self.resume_from} (step {self.step}), the newest intact checkpoint"
                          if self.resume_from else "scratch: no intact checkpoint is left"))
        return lines


def quarantine(path: str) -> str:
    """Move a damaged checkpoint directory to ``damaged_<name>`` (``damaged_<name>.2``, … when taken)."""
    fs, fs_path = _fs(path)
    parent, name = path.rstrip("/").rsplit("/", 1)
    dest, n = _join(parent, DAMAGED_PREFIX + name), 1
    while _exists(dest):
        n += 1
        dest = _join(parent, f"{DAMAGED_PREFIX}{name}.{n}")
    if not is_url(path):
        fs.mv(fs_path, _fs(dest)[1], recursive=True)  # one rename
        return dest
    # An object store has no folders to rename (s3fs's recursive mv also tries to copy the folder's own
    # key, which does not exist): copy each object, then delete the originals.
    dest_root = _fs(dest)[1]
    for f in fs.find(fs_path):
        fs.copy(f, dest_root + f[len(fs_path):])
    fs.rm(fs_path, recursive=True)
    return dest


def repair_run(run_dir: str) -> Repair:
    """Verify the run's checkpoints newest first up to the newest intact one; move the damaged ones above
    it aside; drop them and any vanished checkpoint folder from Ray Train's snapshot of the run."""
    resume_from, state, damaged = newest_intact(run_dir)
    moved = [(d, quarantine(d.path)) for d in damaged]
    forgotten = [p for p in forget_missing_checkpoints(run_dir) if p not in {d.path for d in damaged}]
    return Repair(resume_from, int(state.get("step", 0)) if state else 0, moved, forgotten)


def forget_missing_checkpoints(run_dir: str) -> list[str]:
    """Rewrite Ray Train's checkpoint-manager snapshot (``<run dir>/checkpoint_manager_snapshot.json``)
    without the checkpoints whose folders are gone, so that Ray resumes from the newest one present instead
    of refusing the whole run. Returns the paths dropped."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    snapshot_path = _join(run_dir, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    fs, path = _fs(snapshot_path)
    try:
        snapshot = json.loads(fs.cat_file(path))
        results = snapshot["checkpoint_results"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return []  # no snapshot (in-process runs, a new run) or one Ray itself will report on

    def present(entry: dict[str, Any] | None) -> bool:
        return entry is not None and _exists(_join(run_dir, entry["checkpoint_dir_name"]))

    keep = [i for i, r in enumerate(results) if present(r)]
    gone = [_join(run_dir, r["checkpoint_dir_name"]) for i, r in enumerate(results) if i not in keep]
    latest = snapshot.get("latest_checkpoint_result")
    if latest is not None and not present(latest) and _join(run_dir, latest["checkpoint_dir_name"]) not in gone:
        gone.append(_join(run_dir, latest["checkpoint_dir_name"]))
    if not gone:
        return []
    indices = snapshot["checkpoint_report_indices"]
    snapshot["checkpoint_results"] = [results[i] for i in keep]
    snapshot["checkpoint_report_indices"] = [indices[i] for i in keep]
    if not present(latest):
        newest = max(keep, key=lambda i: indices[i], default=None)
        snapshot["latest_checkpoint_result"] = results[newest] if newest is not None else None
    pending = list(zip(snapshot.get("pending_training_results", []), snapshot.get("pending_validation_specs", [])))
    pending = [(r, v) for r, v in pending if present(r)]
    snapshot["pending_training_results"] = [r for r, _ in pending]
    snapshot["pending_validation_specs"] = [v for _, v in pending]
    names = {results[i]["checkpoint_dir_name"] for i in keep}
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snapshot:
            snapshot[key] = [n for n in snapshot[key] if n in names]
    # atomic: temp + rename locally; an object store shows a new object only once it is complete
    _location(run_dir).write_bytes_atomic(CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, json.dumps(snapshot).encode())
    return gone
