"""The manifest: the single source of truth about a shard set (parquet tables + a JSON summary).

Layout under DEST::

    {split}-000000.tar ...            the shards
    manifest.json                     summary: source, options, per-split counts, classes, rejects
    manifest/{split}-samples.parquet  one row per sample: key, shard, label, label_name, source,
                                      ext, bytes, sha256, width, height, converted
    manifest/{split}-shards.parquet   one row per shard: name, samples, bytes, sha256, first_key, last_key
    manifest/classes.parquet          label, name (wnid / folder / photo), description
    manifest/rejected.parquet         split, key, source, reason, stage ('list' | 'decode')
    _parts/                           per-shard records of a run in progress (kept for re-finalising)

``manifest.json`` is written last, so its presence means the shard set is complete. Readers take
sample counts from the manifest and never count shards themselves.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from sharding.sources import ClassInfo
from sharding.storage import Destination

MANIFEST_FORMAT = "cscctrl-shards/1"
SUMMARY_NAME = "manifest.json"
DIGEST_HEX_DIGITS = 32  # Manifest.digest: 128 bits, within MLflow's 36-character dataset digest

SAMPLE_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("label", pa.int64()), ("label_name", pa.string()),
    ("source", pa.string()), ("ext", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("converted", pa.bool_()),
])
SHARD_SCHEMA = pa.schema([
    ("name", pa.string()), ("samples", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("first_key", pa.string()), ("last_key", pa.string()),
])
CLASS_SCHEMA = pa.schema([("label", pa.int64()), ("name", pa.string()), ("description", pa.string())])
REJECT_SCHEMA = pa.schema([("split", pa.string()), ("key", pa.string()), ("source", pa.string()),
                           ("reason", pa.string()), ("stage", pa.string())])


class ManifestError(ValueError):
    """No manifest at the URL, or one this version cannot read (missing or damaged tables)."""


REPAIR_HINT = ("Run the same `cscctrl shard SOURCE DEST` command again to rewrite the manifest from the shard "
               "records in DEST/_parts, or restore DEST from a copy")


def samples_name(split: str) -> str:
    return f"manifest/{split}-samples.parquet"


def shards_name(split: str) -> str:
    return f"manifest/{split}-shards.parquet"


def table_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    """Parquet bytes of `rows` (zstd-compressed), built in an Arrow buffer."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_table(dest: Destination, name: str) -> pa.Table:
    """A parquet table, read from an Arrow-owned copy of the file's bytes on the calling thread.

    Arrow may release its input on a pool thread after read_table returns; were that input a Python
    object (bytes, a file), the release would need the GIL, and a pool thread caught by interpreter
    shutdown aborts the process ("terminate called without an active exception").
    A missing or unreadable table is a ManifestError naming it.
    """
    try:
        data = dest.read_bytes(name)
        buf = pa.allocate_buffer(len(data))
        pa.FixedSizeBufferWriter(buf).write(data)
        return pq.read_table(pa.BufferReader(buf), use_threads=False, pre_buffer=False)
    except FileNotFoundError as exc:
        raise ManifestError(f"{dest.url}/{name} is missing: the manifest is incomplete. {REPAIR_HINT}") from exc
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"{dest.url}/{name} is not a readable parquet table ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}). {REPAIR_HINT}") from exc


def reason_category(reason: str) -> str:
    """'corrupt or truncated image: image file is truncated ...' -> 'corrupt or truncated image'."""
    return reason.split(":", 1)[0].strip()


@dataclass
class ShardInfo:
    name: str
    url: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str


@dataclass
class Manifest:
    """What `read_manifest(url)` returns: shard URLs and counts per split, classes, summary."""

    url: str
    summary: dict
    classes: list[ClassInfo]
    shards: dict[str, list[ShardInfo]]
    storage_options: dict = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        """Split names in the source's order (train, val, unseen, ...)."""
        return list(self.shards)

    @property
    def num_classes(self) -> int:
        """Size of the class index (all splits)."""
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def num_classes_in(self, split: str) -> int:
        """max label + 1 over the split's samples: the k to train a multiclass model on `split`."""
        return int(self._split(split)["num_classes"])

    def shard_infos(self, split: str) -> list[ShardInfo]:
        self._split(split)
        return list(self.shards[split])

    def shard_urls(self, split: str) -> list[str]:
        return [s.url for s in self.shard_infos(split)]

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["samples"])

    def num_shards(self, split: str) -> int:
        self._split(split)
        return len(self.shards[split])

    def digest(self, split: str) -> str:
        """The split's content digest: the first DIGEST_HEX_DIGITS hex digits of the SHA-256 of its shard
        table as JSON, ``[[name, samples, sha256], …]`` in shard order (no spaces). Two shard sets have
        equal digests exactly when they list the same shard files with the same bytes; where they are stored
        plays no part. (MLflow's dataset digest, pipeline/datasets.py.)"""
        rows = [[s.name, s.samples, s.sha256] for s in self.shard_infos(split)]
        text = json.dumps(rows, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_HEX_DIGITS]

    def _split(self, split: str) -> dict:
        if split not in self.summary["splits"]:
            raise KeyError(f"split {split!r} not in the manifest at {self.url}; it has {self.splits}")
        return self.summary["splits"][split]

    def _destination(self) -> Destination:
        return Destination(self.url, self.storage_options)

    def samples(self, split: str) -> pa.Table:
        """The per-sample table of `split` (read on demand)."""
        self._split(split)
        return read_table(self._destination(), samples_name(split))

    def rejected(self) -> pa.Table:
        return read_table(self._destination(), "manifest/rejected.parquet")


def write_manifest(dest: Destination, *, options: dict, fingerprint: str, classes: list[ClassInfo],
                   shard_rows: dict[str, list[dict]], sample_rows: dict[str, list[dict]],
                   rejected_rows: list[dict]) -> dict:
    """Write the parquet tables, then ``manifest.json`` (last: it marks completion). Returns the summary."""
    for split in shard_rows:
        dest.write_bytes_atomic(samples_name(split), table_bytes(sample_rows[split], SAMPLE_SCHEMA))
        dest.write_bytes_atomic(shards_name(split), table_bytes(shard_rows[split], SHARD_SCHEMA))
    dest.write_bytes_atomic("manifest/classes.parquet", table_bytes(
        [{"label": c.label, "name": c.name, "description": c.description} for c in classes], CLASS_SCHEMA))
    dest.write_bytes_atomic("manifest/rejected.parquet", table_bytes(rejected_rows, REJECT_SCHEMA))
    splits = {}
    for split, rows in shard_rows.items():
        labels = [r["label"] for r in sample_rows[split]]
        splits[split] = {"samples": sum(r["samples"] for r in rows), "shards": len(rows),
                         "bytes": sum(r["bytes"] for r in rows),
                         "num_classes": (max(labels) + 1) if labels else 0,
                         "classes_present": len(set(labels))}
    summary = {
        "format": MANIFEST_FORMAT, "fingerprint": fingerprint, "options": options, "splits": splits,
        "split_order": list(shard_rows),
        "num_classes": len(classes),
        "rejected": {"total": len(rejected_rows),
                     "by_reason": dict(sorted(Counter(reason_category(r["reason"]) for r in rejected_rows).items()))},
    }
    dest.write_bytes_atomic(SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n")
    return summary


def read_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    """Read ``url/manifest.json`` and the per-split shard tables (not the per-sample tables)."""
    dest = Destination(url, storage_options or {})
    try:
        summary = json.loads(dest.read_bytes(SUMMARY_NAME))
    except FileNotFoundError as exc:
        raise ManifestError(f"no {SUMMARY_NAME} at {url!r}: not a shard set, or `cscctrl shard` has not "
                            "finished writing it") from exc
    except IsADirectoryError as exc:
        raise ManifestError(f"{url}/{SUMMARY_NAME} is a folder, not the manifest file") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{url}/{SUMMARY_NAME} is not valid JSON ({exc}). {REPAIR_HINT}") from exc
    if not isinstance(summary, dict) or summary.get("format") != MANIFEST_FORMAT:
        found = summary.get("format") if isinstance(summary, dict) else type(summary).__name__
        raise ManifestError(f"{url}/{SUMMARY_NAME}: format {found!r}, expected {MANIFEST_FORMAT!r}")
    try:
        classes = [ClassInfo(int(r["label"]), r["name"], r["description"])
                   for r in read_table(dest, "manifest/classes.parquet").to_pylist()]
        shards = {}
        for split in summary["split_order"]:
            rows = read_table(dest, shards_name(split)).to_pylist()
            shards[split] = [ShardInfo(r["name"], dest.url_of(r["name"]), int(r["samples"]), int(r["bytes"]),
                                       r["sha256"], r["first_key"], r["last_key"]) for r in rows]
            if "samples" not in summary["splits"][split]:
                raise KeyError(f"splits.{split}.samples")
    except (KeyError, TypeError) as exc:
        raise ManifestError(f"{url}/{SUMMARY_NAME} or its tables lack the field {exc}. {REPAIR_HINT}") from exc
    return Manifest(dest.url, summary, classes, shards, storage_options or {})


def holds_plan(url: str, fingerprint: str) -> bool:
    """Whether ``url`` holds a finished shard set of the plan with this fingerprint (False if none is there)."""
    try:
        return read_manifest(url).summary.get("fingerprint") == fingerprint
    except (FileNotFoundError, ManifestError):
        return False
