"""Re-read every shard against the manifest and say which ones are missing, truncated or altered.

Per shard (streamed once, never loaded whole):
    missing    the object does not exist
    truncated  fewer bytes than the manifest says, or the tar ends before its end-of-archive
    altered    sha256 of the file differs, or its samples differ from the manifest's per-sample table
               (count, keys, labels or image sha256), or it holds refused member names
    ok         bytes, sha256 and every sample as recorded
"""
from __future__ import annotations

import hashlib
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tqdm.auto import tqdm

from sharding.layout import IMAGE_KEYS, is_unsafe_member, split_member_name
from sharding.manifest import Manifest, read_manifest
from sharding.storage import Destination

Status = Literal["ok", "missing", "truncated", "altered"]
STATUSES: tuple[Status, ...] = ("ok", "missing", "truncated", "altered")
READ_CHUNK = 1 << 20  # bytes


@dataclass
class ShardCheck:
    split: str
    name: str
    status: Status
    detail: str = ""


@dataclass
class VerifyReport:
    url: str
    checks: list[ShardCheck] = field(default_factory=list)
    samples_checked: int = 0

    @property
    def ok(self) -> bool:
        return all(c.status == "ok" for c in self.checks)

    @property
    def problems(self) -> list[ShardCheck]:
        return [c for c in self.checks if c.status != "ok"]

    def counts(self) -> dict[str, int]:
        n = Counter(c.status for c in self.checks)
        return {s: n.get(s, 0) for s in STATUSES}

    def summary_line(self) -> str:
        c = self.counts()
        return (f"verify {self.url}: {len(self.checks)} shards, {c['ok']} ok, {c['missing']} missing, "
                f"{c['truncated']} truncated, {c['altered']} altered ({self.samples_checked} samples checked)")


class _HashingReader:
    """File wrapper that hashes and counts every byte read through it."""

    def __init__(self, f) -> None:
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(READ_CHUNK):
            pass


def _read_samples(reader: _HashingReader) -> tuple[dict[str, dict[str, bytes]], list[str], Exception | None]:
    """Members grouped by key ({key: {ext: data}}), refused member names, and the tar error if any."""
    samples: dict[str, dict[str, bytes]] = {}
    unsafe: list[str] = []
    try:
        # typeshed's _Fileobj asks for write/seek/tell too, but stream mode "r|" only calls fileobj.read()
        with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
            for info in tar:
                if is_unsafe_member(info.name):
                    unsafe.append(info.name)
                    continue
                if not info.isreg():
                    continue
                key, ext = split_member_name(info.name)
                member = tar.extractfile(info)
                assert member is not None  # a regular file (isreg() above) has its data
                samples.setdefault(key, {})[ext] = member.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        return samples, unsafe, exc
    return samples, unsafe, None


def _compare_samples(found: dict[str, dict[str, bytes]], expected: list[dict]) -> list[str]:
    """Differences between the samples read and the manifest rows of one shard."""
    problems = []
    want = {r["key"]: r for r in expected}
    missing = sorted(set(want) - set(found))
    extra = sorted(set(found) - set(want))
    if missing:
        problems.append(f"{len(missing)} samples missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected samples (e.g. {extra[0]})")
    changed = []
    for key in sorted(set(want) & set(found)):
        row, members = want[key], found[key]
        image = next((members[k] for k in IMAGE_KEYS if k in members), None)
        if image is None or hashlib.sha256(image).hexdigest() != row["sha256"] \
                or members.get("cls", b"").decode("ascii", "replace") != str(row["label"]):
            changed.append(key)
    if changed:
        problems.append(f"{len(changed)} samples changed (e.g. {changed[0]})")
    return problems


def check_shard(dest: Destination, split: str, info, expected_rows: list[dict]) -> ShardCheck:
    """Stream one shard once: size, sha256 and per-sample content against the manifest. A shard that
    cannot be opened or read (a folder in its place, no permission, an I/O error) is altered, with the
    reason."""
    try:
        size = dest.size(info.name)
        if size is None:
            return ShardCheck(split, info.name, "missing", "no such object")
        with dest.open(info.name) as f:
            reader = _HashingReader(f)
            found, unsafe, error = _read_samples(reader)
            reader.drain()
    except OSError as exc:
        return ShardCheck(split, info.name, "altered", f"cannot be read: {type(exc).__name__}: {exc.strerror or exc}")
    if size < info.bytes:
        detail = f"{size} of {info.bytes} bytes" + (f"; tar error: {error}" if error else "")
        return ShardCheck(split, info.name, "truncated", detail)
    problems = []
    if reader.sha256.hexdigest() != info.sha256:
        problems.append(f"sha256 {reader.sha256.hexdigest()[:12]}… != manifest {info.sha256[:12]}…")
    if size != info.bytes:
        problems.append(f"{size} bytes, manifest says {info.bytes}")
    if error is not None:
        problems.append(f"tar error: {error}")
    if unsafe:
        problems.append(f"{len(unsafe)} members with absolute or '..' paths (e.g. {unsafe[0]!r})")
    if len(found) != info.samples:
        problems.append(f"{len(found)} samples, manifest says {info.samples}")
    problems += _compare_samples(found, expected_rows)
    if problems:
        return ShardCheck(split, info.name, "altered", "; ".join(problems))
    return ShardCheck(split, info.name, "ok")


def verify_shards(url: str | Manifest, *, progress: bool = False, storage_options: dict | None = None) -> VerifyReport:
    """Check every shard of every split listed in the manifest at `url`."""
    manifest = url if isinstance(url, Manifest) else read_manifest(url, storage_options)
    dest = Destination(manifest.url, storage_options or manifest.storage_options)
    report = VerifyReport(manifest.url)
    total = sum(len(manifest.shard_infos(s)) for s in manifest.splits)
    with tqdm(total=total, unit="shard", desc="verify", disable=not progress, dynamic_ncols=True) as bar:
        for split in manifest.splits:
            rows_by_shard: dict[str, list[dict]] = {}
            for row in manifest.samples(split).select(["key", "shard", "label", "sha256"]).to_pylist():
                rows_by_shard.setdefault(row["shard"], []).append(row)
            for info in manifest.shard_infos(split):
                check = check_shard(dest, split, info, rows_by_shard.get(info.name, []))
                report.checks.append(check)
                if check.status == "ok":
                    report.samples_checked += info.samples
                bar.update(1)
                bar.set_postfix(problems=len(report.problems), refresh=False)
    return report
