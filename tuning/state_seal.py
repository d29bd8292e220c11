"""Ray Tune's resume state is restored only when this project wrote it: an HMAC seal, keyed outside storage.

Resuming a sweep makes Ray Tune unpickle files in the sweep's experiment folder (``tuner.pkl``, the
cloudpickle blobs inside ``experiment_state-*.json``, ``basic-variant-state-*.json``,
``searcher-state-*.pkl``, ``callback-states-*.pkl``, trial ``params.pkl`` / ``error.pkl``). That folder is
under ``run.storage_path``, typically a bucket or NFS share that more principals can write than the machine
running the sweep; unpickling a planted file there would run its code on the driver. So every file of the
folder except plain data (``PLAIN_DATA``) and the trial runs below ``runs/`` (checkpoints: verified by
their own checksums and read with ``torch.load(weights_only=True)``) must be listed in the seal

    <experiment>/cscctrl-state-seal.json = {"format", "files": {relative path: sha256},
                                           "mac": HMAC-SHA256(key, canonical JSON of "files")}

with its current sha256, and the seal's MAC must verify with the local key, before ``Tuner.restore``
(or ``ExperimentAnalysis``) touches the folder; otherwise the sweep refuses, naming each file.

The key is 32 random bytes in ``~/.config/cscctrl/state.key`` (mode 0600, created on first use; override
the file with $CSCCTRL_STATE_KEY_FILE, or give the key itself as $CSCCTRL_STATE_KEY): it never lives in
storage, so writing the bucket is not enough to forge a seal. The sweep driver seals ``tuner.pkl`` as soon
as building the tuner has written it, and the rest of the folder each time Tune saves its state
(``StateSealer``, run by the SealState Tune callback: it seals the driver's local staging copy, which only
the driver writes, just before Tune uploads it; Tune saves when it starts, periodically, on Ctrl-C and at
the end), so a driver stopped at any point leaves a sealed state behind. It never seals what it reads
back from storage, except with --trust-sweep-state, where the user vouches for the folder.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any

import fsspec

SEAL_FILE = "cscctrl-state-seal.json"
SEAL_FORMAT = "cscctrl-tune-seal/1"
PLAIN_DATA = ("result.json", "progress.csv", "params.json", "error.txt", ".validate_storage_marker")
PLAIN_DATA_PREFIXES = ("events.out.tfevents.",)
"""Files Tune reads, if at all, as plain JSON / CSV / text / TensorBoard records: they may change between
seals (trials append results after a save)."""
SKIPPED_DIRS = ("runs", "summary")  # trial training runs (own checksums) and the sweep's summary files
KEY_FILE = Path("~/.config/cscctrl/state.key")


class StateTrustError(ValueError):
    """A sweep's resume state that this machine did not seal (or that changed since): refused."""


def state_key() -> bytes:
    """The sealing key: $CSCCTRL_STATE_KEY, else the key file (created with 32 random bytes, mode 0600)."""
    given = os.environ.get("CSCCTRL_STATE_KEY", "")
    if given:
        return given.encode()
    path = Path(os.environ.get("CSCCTRL_STATE_KEY_FILE", "") or KEY_FILE).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def _mac(files: dict[str, str], key: bytes) -> str:
    return hmac.new(key, json.dumps(files, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def is_plain_data(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return name in PLAIN_DATA or name.startswith(PLAIN_DATA_PREFIXES)


def state_files(root: str) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root`` (local path or fsspec URL) that the seal must
    cover: all but the seal itself, plain data, and the trial runs and summary folders."""
    fs, base = fsspec.core.url_to_fs(root)
    base = base.rstrip("/")
    out: dict[str, str] = {}
    try:
        found = fs.find(base)
    except FileNotFoundError:
        return out
    for path in sorted(found):
        relative = path[len(base):].lstrip("/")
        if not relative or relative == SEAL_FILE or relative.split("/", 1)[0] in SKIPPED_DIRS:
            continue
        if is_plain_data(relative) or relative.rsplit("/", 1)[-1].startswith("tmp-"):
            continue  # tmp-*: Tune's own half-written files, renamed when complete
        out[relative] = hashlib.sha256(fs.cat_file(path)).hexdigest()
    return out


def write_seal(root: str, files: dict[str, str]) -> None:
    """Write the seal of ``files`` (relative path -> sha256) into ``root``."""
    fs, base = fsspec.core.url_to_fs(root)
    doc = {"format": SEAL_FORMAT, "files": files, "mac": _mac(files, state_key())}
    data = json.dumps(doc, indent=1, sort_keys=True).encode()
    path = f"{base.rstrip('/')}/{SEAL_FILE}"
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        tmp = f"{path}.tmp"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def seal(root: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Seal the current state files under ``root`` (plus ``extra`` entries); returns what was sealed."""
    files = {**(extra or {}), **state_files(root)}
    write_seal(root, files)
    return files


def read_seal(root: str) -> dict[str, str] | None:
    """The sealed {path: sha256} when the seal exists and its MAC verifies with the local key; None when
    there is no seal; StateTrustError when it does not verify."""
    fs, base = fsspec.core.url_to_fs(root)
    try:
        doc = json.loads(fs.cat_file(f"{base.rstrip('/')}/{SEAL_FILE}"))
        files, mac = doc["files"], doc["mac"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise StateTrustError(f"{root}/{SEAL_FILE} is damaged ({type(e).__name__}); refusing the sweep's resume "
                              f"state") from e
    if not isinstance(files, dict) or not hmac.compare_digest(str(mac), _mac(files, state_key())):
        raise StateTrustError(f"{root}/{SEAL_FILE} was not written with this machine's key (see docs/cluster.md: "
                              f"the key in ~/.config/cscctrl/state.key or $CSCCTRL_STATE_KEY); refusing the "
                              f"sweep's resume state")
    return files


def verify(root: str) -> None:
    """StateTrustError naming every state file under ``root`` that the seal does not cover as it is now."""
    sealed = read_seal(root)
    current = state_files(root)
    if sealed is None:
        if current:
            raise StateTrustError(
                f"the sweep state in {root} carries no seal of this project ({len(current)} file(s), e.g. "
                f"{sorted(current)[0]}): it was written by an earlier version or by someone else. "
                f"{WAY_OUT}")
        return
    changed = [p for p, digest in current.items() if p in sealed and sealed[p] != digest]
    unknown = [p for p in current if p not in sealed]
    if changed or unknown:
        listed = "; ".join([f"changed: {p}" for p in changed[:5]] + [f"not written by cscctrl: {p}" for p in unknown[:5]])
        raise StateTrustError(f"the sweep state in {root} does not match its seal ({listed}). Ray Tune would "
                              f"unpickle these files, so they are not restored. {WAY_OUT}")


WAY_OUT = ("If you know who wrote them (say the sweep's own driver, killed while saving), run the same command "
           "with --trust-sweep-state to seal and resume them; otherwise start the sweep under another name "
           "(name=...). Trials' training runs are not affected.")


class StateSealer:
    """Mixin-free Tune callback body (tuning/callbacks.py wraps it): seals Tune's staging copy of the
    experiment folder each time Tune saves it, just before the upload, so a driver killed at any time
    leaves a sealed state behind. Holds no key (it is pickled into tuner.pkl, in storage)."""

    def __init__(self, experiment_path: str) -> None:
        self.experiment_path = experiment_path
        self._staging = ""
        self._tuner_digest: dict[str, str] | None = None

    def note_trials(self, trials: list[Any]) -> None:
        if trials and not self._staging:
            self._staging = trials[0].storage.experiment_driver_staging_path

    def seal_staging(self) -> None:
        if not self._staging or not Path(self._staging).is_dir():
            return
        if self._tuner_digest is None:  # tuner.pkl is written to storage only (Tuner construction)
            stored = state_files(self.experiment_path)
            self._tuner_digest = {k: v for k, v in stored.items() if k == "tuner.pkl"}
        seal(self._staging, self._tuner_digest)

    def __getstate__(self) -> dict[str, Any]:
        return {"experiment_path": self.experiment_path, "_staging": "", "_tuner_digest": None}
