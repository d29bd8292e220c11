"""Write the shards of a plan: deterministic tar files, atomic, resumable, in parallel processes.

    plan = plan_shards(source, shard_maxcount=1000, seed=0, image_options=ImageOptions(resize=160))
    prepare_destination(plan, dest)             # DEST writable? same plan as an earlier run there?
    write_shards(plan, dest, indices=range(0, 10), workers=4)   # any subset, in any process
    manifest = finalize(plan, dest)             # once every shard exists

Samples are laid out as sharding/layout.py describes. Tar headers are fixed and image encoding is
deterministic, so shard i's bytes depend only on the plan: a resumed run, a run with another worker
count, or Ray tasks writing index ranges give identical files.

Each shard is published atomically: the tar is built under a temporary name, its record
(``_parts/<split>-NNNNNN.json``: sample rows, rejects, sha256) is written, then the tar is renamed
(uploaded) to its final name. A shard is finished when both exist and the size matches the record;
finished shards are skipped on resume.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sharding.images import ImageOptions, RejectedImage, check_pillow_is_strict, prepare_image
from sharding.lock import DestLock
from sharding.layout import SHARD_MTIME, TAR_FORMAT, TAR_MODE, TAR_OWNER, sample_json
from sharding.manifest import SUMMARY_NAME, Manifest, read_manifest, write_manifest
from sharding.plan import ShardPlan, ShardSpec
from sharding.sources import Source
from sharding.storage import Destination, DestinationError, naming

log = logging.getLogger(__name__)

PLAN_RECORD = "_parts/plan.json"
SHARD_FILE = re.compile(r"^[A-Za-z0-9_-]+-\d{6}\.tar$")
HASH_CHUNK = 1 << 20  # bytes per read when hashing a finished tar


@dataclass
class ShardResult:
    """The record of one written shard (also stored as ``_parts/<name>.json``)."""

    index: int
    split: str
    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str
    sample_rows: list[dict] = field(default_factory=list)
    rejected_rows: list[dict] = field(default_factory=list)

    def shard_row(self) -> dict:
        return {"name": self.name, "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256,
                "first_key": self.first_key, "last_key": self.last_key}


@dataclass
class WriteReport:
    written: list[int] = field(default_factory=list)  # shard indices written by this call
    skipped: list[int] = field(default_factory=list)  # already finished (resume)
    samples: int = 0  # samples written by this call
    rejected: int = 0  # samples rejected by this call
    bytes: int = 0  # shard bytes written by this call
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return (self.samples + self.rejected) / self.seconds if self.seconds > 0 else 0.0


class PlanMismatchError(DestinationError):
    """DEST holds shards of a different plan (other source, options or seed)."""


# ----------------------------------------------------------------------------------------------
# One shard
# ----------------------------------------------------------------------------------------------
def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with the fixed header of sharding/layout.py (no clock, no user lookup)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), SHARD_MTIME, TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = TAR_OWNER
    tar.addfile(info, io.BytesIO(data))


def add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """Members in sorted extension order (cls, jpg|png, json), as WebDataset's TarWriter orders them."""
    for ext in sorted(members):
        add_member(tar, f"{key}.{ext}", members[ext])


def write_shard(source: Source, spec: ShardSpec, dest: Destination, image_options: ImageOptions,
                label_names: dict[int, str], on_sample: Callable[[], object] | None = None) -> ShardResult:
    """Decode/convert every item of `spec`, write the tar atomically, return (and store) its record."""
    check_pillow_is_strict()
    tmp = dest.local_tmp_path(spec.name)
    sample_rows: list[dict[str, Any]] = []
    rejected_rows: list[dict[str, Any]] = []
    try:
        with open(tmp, "wb") as stream, tarfile.open(fileobj=stream, mode="w|", format=TAR_FORMAT) as tar:
            for item in spec.items:
                try:
                    img = prepare_image(source.read(item), image_options)
                except Exception as exc:  # one bad file never stops the job: it is listed as rejected
                    reason = exc.reason if isinstance(exc, RejectedImage) else \
                        f"unexpected decoder error: {type(exc).__name__}: {exc}"
                    if not isinstance(exc, RejectedImage):
                        log.warning("rejecting %s: %s", item.source, reason)
                    rejected_rows.append({"split": spec.split, "key": item.key, "source": item.source,
                                          "reason": reason, "stage": "decode"})
                else:
                    label_name = label_names[item.label]
                    add_sample(tar, item.key, {img.ext: img.data, "cls": str(item.label).encode(),
                                               "json": sample_json(item.source, label_name, img.width, img.height)})
                    sample_rows.append({
                        "key": item.key, "shard": spec.name, "label": item.label, "label_name": label_name,
                        "source": item.source, "ext": img.ext, "bytes": len(img.data),
                        "sha256": hashlib.sha256(img.data).hexdigest(), "width": img.width,
                        "height": img.height, "converted": img.converted})
                if on_sample is not None:
                    on_sample()
        digest, size = hashlib.sha256(), 0
        with open(tmp, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        result = ShardResult(spec.index, spec.split, spec.name, len(sample_rows), size, digest.hexdigest(),
                             sample_rows[0]["key"] if sample_rows else "",
                             sample_rows[-1]["key"] if sample_rows else "", sample_rows, rejected_rows)
        # Record first, tar last: a tar under its final name always has its record.
        dest.write_bytes_atomic(spec.part_name, json.dumps(asdict(result)).encode())
        dest.commit_file(tmp, spec.name)
    except OSError as exc:  # a full disk, a quota: name the file being written
        raise naming(exc, tmp) from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    return result


def finished_result(spec: ShardSpec, dest: Destination) -> ShardResult | None:
    """The stored record of `spec` if its tar exists with the recorded size, else None."""
    size = dest.size(spec.name)
    if size is None:
        return None
    try:
        record = json.loads(dest.read_bytes(spec.part_name))
    except FileNotFoundError:
        return None
    result = ShardResult(**record)
    return result if result.bytes == size and result.index == spec.index else None


# ----------------------------------------------------------------------------------------------
# Many shards
# ----------------------------------------------------------------------------------------------
def prepare_destination(plan: ShardPlan, dest: Destination, overwrite: bool = False) -> None:
    """Check DEST is writable and holds nothing but (a partial run of) this plan; record the plan.

    With `overwrite`, shards, manifest and records of another plan are deleted first.
    """
    dest.check_writable()
    try:
        previous = json.loads(dest.read_bytes(PLAN_RECORD))
    except FileNotFoundError:
        previous = None
    foreign = [n for n in dest.listdir() if SHARD_FILE.match(n) or n == SUMMARY_NAME]
    same = previous is not None and previous.get("fingerprint") == plan.fingerprint
    if not same and (previous is not None or foreign):
        if not overwrite:
            what = "a different plan (other source, options or seed)" if previous else "shards of another run"
            raise PlanMismatchError(f"DEST {dest.url!r} already holds {what}; use an empty DEST or --overwrite")
        for name in foreign:
            dest.remove(name)
        for sub in ("_parts", "manifest"):
            for name in dest.listdir(sub):
                if not name.startswith("."):  # the lock and its holders' records stay (sharding/lock.py)
                    dest.remove(f"{sub}/{name}")
    if not same:
        dest.write_bytes_atomic(PLAN_RECORD, json.dumps(
            {"fingerprint": plan.fingerprint, "options": plan.options(), "num_shards": len(plan.shards)},
            sort_keys=True, indent=2).encode())


def write_shards(plan: ShardPlan, dest: Destination, indices=None, *, workers: int = 1,
                 progress: bool = False) -> WriteReport:
    """Write the shards `indices` of `plan` (default: all), skipping finished ones.

    workers > 1 runs whole shards in that many spawned processes. Call `prepare_destination` once
    before (fan-out drivers do it once for all their tasks).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and dest.is_memory:
        raise DestinationError("memory:// destinations live in one process; use workers=1")
    wanted = [plan.shards[i] for i in (range(len(plan.shards)) if indices is None else indices)]
    report = WriteReport()
    todo = []
    for spec in wanted:
        if finished_result(spec, dest) is not None:
            report.skipped.append(spec.index)
        else:
            todo.append(spec)
    start = time.perf_counter()
    bar = tqdm(total=sum(len(s.items) for s in todo), unit="img", desc="shard", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)

    def account(result: ShardResult) -> None:
        report.written.append(result.index)
        report.samples += result.samples
        report.rejected += len(result.rejected_rows)
        report.bytes += result.bytes
        bar.set_postfix(shards=len(report.written), rejected=report.rejected, refresh=False)

    try:
        if workers == 1 or len(todo) <= 1:
            for spec in todo:
                account(write_shard(plan.source, spec, dest, plan.image_options, plan.label_names,
                                    on_sample=lambda: bar.update(1)))
        else:
            ctx = multiprocessing.get_context("spawn")  # fork is unsafe with fsspec's I/O threads
            with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx,
                                        initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
                # Each task is one whole shard; only its own items travel to the worker.
                futures = {pool.submit(write_shard, plan.source, spec, dest, plan.image_options,
                                       plan.label_names): spec for spec in todo}
                for future in cf.as_completed(futures):
                    account(future.result())
                    bar.update(len(futures[future].items))
    finally:
        bar.close()
    report.written.sort()
    report.seconds = time.perf_counter() - start
    return report


PARENT_POLL_S = 1.0


def exit_with_parent(parent_pid: int) -> None:
    """Pool-worker initializer: end this worker when the process that started it is gone (killed with
    SIGKILL, say). A spawned worker holds both ends of the pool's task queue, so it never sees the parent's
    end close and would otherwise wait for work forever."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=watch, name="cscctrl-parent-watch", daemon=True).start()


def collect_results(plan: ShardPlan, dest: Destination) -> tuple[list[ShardResult], list[int]]:
    """Records of the finished shards, and the indices of unfinished ones."""
    results, missing = [], []
    for spec in plan.shards:
        result = finished_result(spec, dest)
        if result is None:
            missing.append(spec.index)
        else:
            results.append(result)
    return results, missing


def finalize(plan: ShardPlan, dest: Destination, remove_temporaries: bool = True) -> Manifest:
    """Write the manifest from the shard records; every shard of the plan must be finished. A job that may
    share DEST with others (a shard range) leaves temporaries alone (``remove_temporaries=False``)."""
    results, missing = collect_results(plan, dest)
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(plan.shards)} shards are not written yet "
                           f"(e.g. indices {missing[:10]}); run write_shards for them first")
    if remove_temporaries:
        dest.remove_stale_temporaries()
    shard_rows: dict[str, list[dict]] = {split: [] for split in plan.splits}
    sample_rows: dict[str, list[dict]] = {split: [] for split in plan.splits}
    rejected = [{"split": r.split, "key": "", "source": r.source, "reason": r.reason, "stage": "list"}
                for r in plan.listed_rejects]
    for result in results:
        shard_rows[result.split].append(result.shard_row())
        sample_rows[result.split].extend(result.sample_rows)
        rejected.extend(result.rejected_rows)
    write_manifest(dest, options=plan.options(), fingerprint=plan.fingerprint, classes=plan.classes,
                   shard_rows=shard_rows, sample_rows=sample_rows, rejected_rows=rejected)
    return read_manifest(dest.url, dest.storage_options)


def shard_source(plan: ShardPlan, dest: Destination, *, workers: int = 1, progress: bool = False,
                 overwrite: bool = False) -> tuple[Manifest, WriteReport]:
    """The whole job in one process tree: prepare DEST, write every shard, write the manifest (holding DEST's
    lock: sharding/lock.py)."""
    dest.check_writable()
    with DestLock(dest, exclusive=True):
        prepare_destination(plan, dest, overwrite=overwrite)
        dest.remove_stale_temporaries()
        report = write_shards(plan, dest, workers=workers, progress=progress)
        return finalize(plan, dest), report
