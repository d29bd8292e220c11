"""The MLflow outbox: tracking never blocks a training step, and nothing it was given is lost.

Rank 0 hands every metric report, image, tag and text artifact to ``Outbox.put``, which returns at once;
one background thread delivers them in order. While the tracking server is unreachable, what could not be
delivered is written to the run's journal (``<run dir>/unsent_metrics/<time>-<seq>.json``, one atomic file
or object per write, local or on shared storage) and retried with a growing pause (1 s doubling to 60 s);
once the server answers again everything waiting is sent, oldest first, and its journal files are deleted.
An outbox opened for the same run later (a resumed run, after a crash or a kill) delivers what the journal
still holds, so buffered steps reach the run's history after a restart too; so does the single
``unsent_metrics.jsonl`` file earlier versions wrote.

Guarantee: an item handed to ``put`` is delivered, or is in the journal, or was handed over less than one
delivery attempt ago. ``sync()`` (called at every checkpoint) writes whatever is still only in memory to the
journal, so every report up to the step a resumed run starts from survives a kill of the process.
``close(timeout_s)`` delivers what it can within the timeout and leaves the rest in the journal, saying so.
Requests are bounded (``HTTP_TIMEOUT_S`` per request, ``HTTP_RETRIES`` quick retries: MLflow's own defaults
retry for about 4 minutes), so a down server costs a background attempt, not a training step.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.datasets import dataset_input

log = logging.getLogger(__name__)

JOURNAL_DIR = "unsent_metrics"
LEGACY_JOURNAL = "unsent_metrics.jsonl"  # one file of metric reports, written by earlier versions
HTTP_TIMEOUT_S = "10"  # MLFLOW_HTTP_REQUEST_TIMEOUT while an outbox is open (an explicit setting wins)
HTTP_RETRIES = "1"  # MLFLOW_HTTP_REQUEST_MAX_RETRIES
HTTP_BACKOFF = "1"  # MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR (an integer)
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
IMAGE_KEY = re.compile(r"[a-zA-Z0-9_\-./ ]+")  # the image keys MLflow's log_image accepts


class Journal:
    """Undelivered items under ``<run dir>/unsent_metrics/`` (any fsspec location); None-safe helpers."""

    def __init__(self, run_dir: str) -> None:
        self.url = f"{run_dir.rstrip('/')}/{JOURNAL_DIR}"
        self.legacy_url = f"{run_dir.rstrip('/')}/{LEGACY_JOURNAL}"
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        _, self.legacy = fsspec.core.url_to_fs(self.legacy_url)
        self._seq = 0

    def write(self, items: list[dict[str, Any]]) -> str:
        """One new journal file holding ``items``; returns its path."""
        self._seq += 1
        name = f"{time.time_ns():020d}-{self._seq:06d}-{uuid.uuid4().hex[:8]}.json"
        path = f"{self.root.rstrip('/')}/{name}"
        data = json.dumps(items).encode()
        if "file" in _protocols(self.fs):
            Path(self.root).mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:  # an object appears only once its upload is complete
            self.fs.pipe_file(path, data)
        return path

    def read(self) -> list[tuple[str, list[dict[str, Any]]]]:
        """(path, items) of every journal file, oldest first; the legacy file's reports as metric items."""
        found: list[tuple[str, list[dict[str, Any]]]] = []
        try:
            if self.fs.exists(self.legacy):
                lines = self.fs.cat_file(self.legacy).decode("utf-8", "replace").splitlines()
                found.append((self.legacy, [{"kind": "metrics", **json.loads(x)} for x in lines if x.strip()]))
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): its metric reports stay there", self.legacy_url, e)
        try:
            names = sorted(p for p in self.fs.ls(self.root, detail=False) if p.endswith(".json"))
        except (FileNotFoundError, NotADirectoryError):
            names = []
        for path in names:
            try:
                found.append((path, json.loads(self.fs.cat_file(path))))
            except (OSError, ValueError) as e:
                log.warning("cannot read the MLflow journal file %s (%s); it is left in place", path, e)
        return found

    def remove(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass


def _protocols(fs: Any) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


class Outbox:
    """Delivers items to one MLflow run from a background thread (see the module docstring).

    Items wait in ``_pending`` until the thread picks them up; it writes each pick-up to the journal as one
    batch, delivers the batches oldest first and deletes a batch's journal file once it is delivered. A
    batch whose journal write failed (path None) is kept in memory and retried all the same. Journal writes
    happen under the lock (one small local file, or one object), so batches keep their order."""

    def __init__(self, client: Any, run_id: str, run_dir: str | None = None) -> None:
        self.client, self.run_id = client, run_id
        self.journal = Journal(run_dir) if run_dir else None
        self._pending: deque[dict[str, Any]] = deque()
        self._batches: list[list[Any]] = []  # [journal path or None, items], oldest first
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._outage_since: float | None = None
        self.delivered = 0
        if self.journal is not None:
            self._batches = [[path, items] for path, items in self.journal.read()]
            waiting = sum(len(items) for _, items in self._batches)
            if waiting:
                log.warning("MLflow journal %s holds %d undelivered item(s) from an earlier process; sending them",
                            self.journal.url, waiting)
        self._thread = threading.Thread(target=self._run, name="cscctrl-mlflow-outbox", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------
    def put(self, item: dict[str, Any]) -> None:
        """Queue one item ({"kind": "metrics" | "image" | "tags" | "text" | "datasets", ...}); never waits for
        MLflow."""
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()

    def sync(self) -> None:
        """Write what is only in memory to the journal (a checkpoint is being written: a run resumed from
        it must find every report up to its step delivered or journaled)."""
        with self._cond:
            self._journal_pending()
            for batch in self._batches:  # batches whose journal write failed before: try again
                if batch[0] is None and self.journal is not None:
                    batch[0] = self._write(batch[1])

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for everything to be delivered; True when it was."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while self._pending or self._batches or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def close(self, timeout_s: float) -> int:
        """Deliver what can be delivered within ``timeout_s``, journal the rest, stop the thread. Returns the
        number of items left undelivered (in the journal, or lost when there is no journal: said)."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        self.sync()
        with self._cond:
            left = sum(len(items) for _, items in self._batches)
        if left:
            where = f"kept in {self.journal.url}; the next run of this name sends them" if self.journal else \
                "lost (this run has no journal folder)"
            log.warning("MLflow unreachable: %d item(s) for run %s not delivered, %s", left, self.run_id, where)
        return left

    # -- the thread ------------------------------------------------------------------------
    def _write(self, items: list[dict[str, Any]]) -> str | None:
        if self.journal is None:
            return None
        try:
            return self.journal.write(items)
        except Exception as e:  # storage trouble: the items stay in memory and are still retried
            log.warning("cannot write the MLflow journal %s (%s); %d item(s) kept in memory", self.journal.url,
                        e, len(items))
            return None

    def _journal_pending(self) -> None:
        """(lock held) The waiting items become a journaled batch."""
        if self._pending:
            items = list(self._pending)
            self._pending.clear()
            self._batches.append([self._write(items), items])

    def _run(self) -> None:
        pause = RETRY_FIRST_S
        while True:
            with self._cond:
                while not (self._pending or self._batches or self._closing):
                    self._cond.wait()
                if self._closing:
                    return
                self._journal_pending()  # picked up: journaled before the first delivery attempt
                self._busy = True
                batch = self._batches[0]
            try:
                self._deliver(batch[1])
            except Exception as e:  # the server is down or refused: pause, retry (the batch is journaled)
                with self._cond:
                    self._busy = False
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning("MLflow unreachable (%s: %s); training goes on, tracking is kept%s and sent "
                                    "when the server answers", type(e).__name__, str(e).splitlines()[0][:200],
                                    f" in {self.journal.url}" if self.journal else " in memory")
                    self._cond.notify_all()
                    self._cond.wait(pause)
                pause = min(pause * 2, RETRY_MAX_S)
                continue
            with self._cond:
                self._batches.remove(batch)
                self._busy = False
                self.delivered += len(batch[1])
                if batch[0] is not None and self.journal is not None:
                    self.journal.remove(batch[0])
                if self._outage_since is not None and not self._batches:
                    log.warning("MLflow reachable again after %.0f s: buffered tracking delivered",
                                time.monotonic() - self._outage_since)
                    self._outage_since = None
                self._cond.notify_all()
            pause = RETRY_FIRST_S

    def _deliver(self, items: list[dict[str, Any]]) -> None:
        """Send items in order: consecutive metric reports as log_batch calls, the others one by one."""
        from mlflow.entities import Metric

        metrics: list[Any] = []

        def send_metrics() -> None:
            for i in range(0, len(metrics), METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i:i + METRICS_PER_BATCH])
            metrics.clear()

        for item in items:
            kind = item.get("kind", "metrics")
            if kind == "metrics":
                metrics += [Metric(k, float(v), int(item["timestamp"]), int(item["step"]))
                            for k, v in item["metrics"].items()]
                continue
            send_metrics()
            if kind == "tags":
                for k, v in item["tags"].items():
                    self.client.set_tag(self.run_id, k, v)
            elif kind == "text":
                self.client.log_text(self.run_id, item["text"], item["artifact_file"])
            elif kind == "image" and item.get("key"):
                self._deliver_keyed_image(item)
            elif kind == "image":
                directory, _, name = item["artifact_file"].rpartition("/")
                with tempfile.TemporaryDirectory() as d:
                    (Path(d) / name).write_bytes(base64.b64decode(item["png"]))
                    self.client.log_artifact(self.run_id, str(Path(d) / name), directory or None)
            elif kind == "datasets":
                self.client.log_inputs(self.run_id, datasets=[dataset_input(d) for d in item["datasets"]])
        send_metrics()

    def _deliver_keyed_image(self, item: dict[str, Any]) -> None:
        """An image of the run's image view: MLflow's ``log_image(key=, step=, timestamp=)`` (the files
        ``images/<key>+step+<step>+…`` that the run page scrubs through by step). A delivery retried after a
        failure half-way may leave a second copy of that step's image: the UI then shows either."""
        with Image.open(io.BytesIO(base64.b64decode(item["png"]))) as image:
            image.load()
            self.client.log_image(self.run_id, image, key=item["key"], step=int(item["step"]),
                                  timestamp=int(item["timestamp"]), synchronous=True)


def bounded_http_requests() -> dict[str, str | None]:
    """Short MLflow HTTP timeouts and retries for this process (an explicit setting in the environment
    wins); returns what to restore with ``restore_environment``."""
    wanted = {"MLFLOW_HTTP_REQUEST_TIMEOUT": HTTP_TIMEOUT_S, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": HTTP_RETRIES,
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": HTTP_BACKOFF}
    before = {k: os.environ.get(k) for k in wanted}
    for k, v in wanted.items():
        os.environ.setdefault(k, v)
    return before


def restore_environment(before: dict[str, str | None]) -> None:
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def png_item(image: Any, artifact_file: str | None = None, *, key: str | None = None,
             step: int | None = None) -> dict[str, Any]:
    """An image item: a PIL image or (H, W[, C]) uint8 / float array, as PNG bytes; either an artifact file
    (``artifact_file``) or an image of the run's image view keyed by ``key`` at training step ``step``."""
    if (artifact_file is None) == (key is None):
        raise ValueError("an image item needs exactly one of artifact_file or key")
    if key is not None and not IMAGE_KEY.fullmatch(key):  # refused now: the outbox would retry it forever
        raise ValueError(f"image key {key!r}: MLflow takes letters, digits, _ - . / and spaces only")


    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    if key is not None:
        return {"kind": "image", "key": key, "step": int(step or 0), "timestamp": int(time.time() * 1000),
                "png": png}
    return {"kind": "image", "artifact_file": artifact_file, "png": png}
