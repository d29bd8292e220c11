"""Who is writing a local DEST: an advisory lock, so that two shard jobs never delete each other's work.

A job that writes every shard of a plan (``cscctrl shard SOURCE DEST``) removes the temporaries a killed
run left behind, so it must be alone: it holds the lock of ``DEST/_parts/.lock`` exclusively. Jobs that
write shard ranges (``--shards 0:100``, the fan-out on one machine) hold it shared: they coexist with each
other and leave temporaries alone. A job that cannot get the lock stops at once with the holders' process
ids, hosts, start times and command lines (``_parts/.holder-<host>-<pid>.json``, written by each holder).
The lock is ``flock(2)``: the kernel releases it when its holder exits, however it exits, so a killed job
never leaves a stale lock (a stale holder file is recognised by its dead process and ignored).

Object stores need no lock: temporaries are built in the local temp dir and a shard is one upload, so
concurrent identical jobs write identical objects.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from sharding.storage import Destination, DestinationError

LOCK_FILE = "_parts/.lock"


class DestinationBusy(DestinationError):
    """Another shard job holds DEST's lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DestLock:
    """``with DestLock(dest, exclusive=True): ...`` (no-op for destinations that are not local folders)."""

    def __init__(self, dest: Destination, exclusive: bool) -> None:
        self.dest, self.exclusive = dest, exclusive
        self._fd: int | None = None
        self._holder: Path | None = None

    def __enter__(self) -> DestLock:
        if not self.dest.is_local:
            return self
        parts = Path(self.dest.path("_parts"))
        parts.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.dest.path(LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise DestinationBusy(self._busy_message()) from None
        host, pid = socket.gethostname(), os.getpid()
        self._holder = parts / f".holder-{host}-{pid}.json"
        self._holder.write_text(json.dumps({
            "pid": pid, "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "mode": "all shards" if self.exclusive else "a shard range", "command": " ".join(sys.argv)}))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._holder is not None:
            self._holder.unlink(missing_ok=True)
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holders(self) -> list[dict]:
        """The live holders' records (same host: the process must exist; other hosts: taken as live)."""
        out = []
        here = socket.gethostname()
        for path in sorted(Path(self.dest.path("_parts")).glob(".holder-*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("host") != here or _alive(int(record.get("pid", 0))):
                out.append(record)
        return out

    def _busy_message(self) -> str:
        holders = self.holders()
        who = "; ".join(f"process {h['pid']} on {h['host']} since {h['started']} writing {h['mode']}: {h['command']}"
                        for h in holders) or "another process (its record is gone)"
        want = "all shards" if self.exclusive else "a shard range"
        return (f"DEST {self.dest.url!r} is being written by {who}. This job ({want}) would "
                f"{'delete its temporaries' if self.exclusive else 'race with it'}: wait for it to finish (or stop "
                f"it), then run this command again; finished shards are kept")
