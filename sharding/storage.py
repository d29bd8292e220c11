"""Destinations through fsspec: URL resolution, up-front checks, atomic writes.

Every shard, manifest table and progress record goes through one `Destination`, so a local directory,
``s3://bucket/prefix``, ``gs://...`` and ``memory://...`` behave alike. Atomicity:

- local file systems: write ``.<name>.<uuid>.tmp`` next to the target, then ``os.replace`` (atomic
  within one file system);
- object stores and other remote file systems: build the object locally, then upload it in one
  ``put_file``/``pipe_file`` call; an object store makes an object visible only once its upload is
  complete, so a reader never sees half an object.

S3-compatible servers are reached through the usual environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or fsspec's ``FSSPEC_S3_*`` variables; nothing here is S3-specific.
"""
from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"  # temporary objects: ".<name>.<uuid>.tmp"; never matched by the shard pattern


class DestinationError(ValueError):
    """DEST cannot be used: unknown URL scheme, missing fsspec backend, or not writable."""


def naming(exc: OSError, path: str) -> OSError:
    """``exc`` as an OSError that names ``path`` (a failed write of an open file names no file: a full disk
    then reads "[Errno 28] No space left on device" without saying where)."""
    if exc.filename is not None:
        return exc
    named = OSError(exc.errno, exc.strerror or str(exc), path)
    named.__cause__ = exc
    return named


def split_protocol(url: str) -> str:
    """The fsspec protocol of `url` ('file' for plain paths)."""
    protocol, _ = fsspec.core.split_protocol(str(url))
    return protocol or "file"


def is_url(path: str | Path) -> bool:
    """True for a URL of another file system than this machine's (s3://, gs://, memory://, ...): what the
    project's code must reach through fsspec, never through pathlib. A plain path or file:// is local."""
    return split_protocol(str(path)) not in ("file", "local")


def check_protocol(url: str) -> None:
    """Fail, naming the scheme, when fsspec has no backend for `url` (before any work is done)."""
    protocol = split_protocol(url)
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError as exc:
        known = ", ".join(p for p in ("file", "s3", "gs", "abfs", "hdfs", "http", "memory")
                          if p in fsspec.available_protocols())
        raise DestinationError(f"unknown URL scheme {protocol!r} in {url!r}; fsspec knows e.g.: {known}") from exc
    except ImportError as exc:
        raise DestinationError(f"URL scheme {protocol!r} in {url!r} needs a package that is not installed: "
                               f"{exc}") from exc


@dataclass
class Destination:
    """A directory-like location: local path or fsspec URL. Picklable (workers re-resolve it)."""

    url: str
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = str(self.url).rstrip("/") or "/"
        check_protocol(self.url)
        self._fs = None
        self._root = ""

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self.storage_options}

    def __setstate__(self, state: dict) -> None:
        self.url = state["url"]
        self.storage_options = state["storage_options"]
        self._fs = None
        self._root = ""

    # -- resolution ------------------------------------------------------------------------
    def _resolve(self) -> None:
        if self._fs is None:
            self._fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            self._root = root.rstrip("/") or "/"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        self._resolve()
        return self._fs

    @property
    def root(self) -> str:
        self._resolve()
        return self._root

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def is_memory(self) -> bool:
        return split_protocol(self.url) == "memory"

    def path(self, name: str) -> str:
        """File-system path of `name` (relative, '/'-separated) under the destination."""
        return f"{self.root.rstrip('/')}/{name}" if name else self.root

    def url_of(self, name: str) -> str:
        """URL of `name` as readers open it: a plain path locally, ``proto://...`` otherwise."""
        if self.is_local:
            return self.path(name)
        return self.fs.unstrip_protocol(self.path(name))

    # -- queries (never answered from fsspec's listing cache: other processes write here) ------
    def _fresh(self, name: str) -> str:
        path = self.path(name)
        if not self.is_local:
            self.fs.invalidate_cache(path)  # drops cached listings of path and its parents
        return path

    def size(self, name: str) -> int | None:
        try:
            return int(self.fs.size(self._fresh(name)))
        except FileNotFoundError:
            return None

    def exists(self, name: str = "") -> bool:
        return self.fs.exists(self._fresh(name))

    def listdirs(self, name: str = "") -> list[str]:
        """Base names of the folders directly under `name` ([] when it does not exist)."""
        self._fresh(name)
        try:
            entries = self.fs.ls(self.path(name), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    def listdir(self, name: str = "") -> list[str]:
        """Base names directly under `name` ([] when it does not exist)."""
        self._fresh(name)
        try:
            entries = self.fs.ls(self.path(name), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.path(name))

    def open(self, name: str, mode: str = "rb"):
        return self.fs.open(self.path(name), mode)

    # -- writes ----------------------------------------------------------------------------
    def makedirs(self, name: str = "") -> None:
        self.fs.makedirs(self.path(name), exist_ok=True)

    def check_writable(self) -> None:
        """Create the destination and write/delete a probe object; raise naming DEST if that fails."""
        try:
            self.makedirs()
            self.write_bytes_atomic(f".write-probe-{uuid.uuid4().hex}", b"probe", keep=False)
        except DestinationError:
            raise
        except Exception as exc:  # any backend error means "cannot write here"
            raise DestinationError(f"DEST {self.url!r} is not writable: {type(exc).__name__}: {exc}") from exc

    def local_tmp_path(self, name: str) -> str:
        """A temporary path for building `name` before `commit_file`: next to the target locally
        (so that the final rename is atomic), in the system temp dir otherwise."""
        tmp_name = f".{name.rsplit('/', 1)[-1]}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        if self.is_local:
            parent = self.path(name).rsplit("/", 1)[0]
            return f"{parent}/{tmp_name}"

        return os.path.join(tempfile.gettempdir(), tmp_name)

    def commit_file(self, local_tmp: str, name: str) -> None:
        """Publish the finished local file `local_tmp` as `name` in one atomic step."""
        target = self.path(name)
        if self.is_local:
            os.replace(local_tmp, target)
            return
        try:
            self.fs.put_file(local_tmp, target)
        finally:
            Path(local_tmp).unlink(missing_ok=True)

    def write_bytes_atomic(self, name: str, data: bytes, keep: bool = True) -> None:
        """Write `data` as `name` atomically (temp + rename locally; one upload remotely)."""
        if self.is_local:
            tmp = self.local_tmp_path(name)
            Path(tmp).parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path(name))
            except OSError as exc:
                Path(tmp).unlink(missing_ok=True)
                raise naming(exc, self.path(name)) from exc
        else:
            self.fs.pipe_file(self.path(name), data)
        if not keep:
            self.remove(name)

    def upload_folder(self, local: str | Path, name: str = "") -> list[str]:
        """Every file under the local folder ``local`` to ``name`` (keeping sub-folders), each file atomically;
        returns the names written. Reports and summaries are built in a local folder, then published."""
        written = []
        for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            target = f"{name.rstrip('/')}/{f.relative_to(local).as_posix()}" if name else f.relative_to(local).as_posix()
            self.write_bytes_atomic(target, f.read_bytes())
            written.append(target)
        return written

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass

    def remove_stale_temporaries(self) -> int:
        """Delete leftover ``.*.tmp`` files of killed runs (local destinations only); return the count."""
        if not self.is_local:
            return 0
        removed = 0
        for directory in (Path(self.root), Path(self.root) / "manifest", Path(self.root) / "_parts"):
            if directory.is_dir():
                for p in directory.glob(f".*{TMP_SUFFIX}"):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed
