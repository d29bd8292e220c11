"""The shard sets a run read, as MLflow dataset inputs (the "Datasets" panel of a run).

One dataset per (shard set, split), described by its manifest and never by reading a sample:

    name     <last component of the shard set's URL>/<split>             e.g. fmnist/train
    digest   Manifest.digest(split): SHA-256 of the split's shard table   equal digest = byte-identical shards
    source   the shard set's URL (credentials removed): type "local" for a path, "http" for http(s)://,
             else the URL's scheme (s3, gs, …)
    schema   one column per sample member: key (string), image (binary), label (long)
    profile  num_rows (samples), split, shards, bytes, num_classes, source_kind (the sharded source's kind:
             imagenet, folder, fashion-mnist, demo), manifest_fingerprint (the shard plan's)
    tag      mlflow.data.context = "training" or "evaluation"

MLflow keeps one dataset per (experiment, name, digest) and links it to a run once: logging the same split
again (a resumed run, a second evaluation) adds nothing, so runs that trained on the same shards share one
dataset and can be found through it (``search_runs`` on ``dataset.digest``, or the UI's dataset filter).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.redact import redact
from sharding.manifest import read_manifest

CONTEXTS = ("training", "evaluation")


def _source(url: str) -> tuple[str, dict[str, str]]:
    """(source type, source JSON) of a shard set URL, as MLflow's own dataset sources write them."""
    if "://" not in url or url.startswith("file://"):
        return "local", {"uri": str(Path(url.removeprefix("file://")).expanduser().resolve())}
    clean = redact(url)
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        return "http", {"url": clean}
    return scheme, {"uri": clean}


def dataset_name(url: str, split: str) -> str:
    """``<last URL component>/<split>``: 'runs/demo/shards/fmnist' [train] -> 'fmnist/train' (credentials in
    the URL removed first)."""
    clean = redact(url).rstrip("/")
    return f"{clean.rsplit('/', 1)[-1] or clean}/{split}"


def shard_dataset(url: str, split: str, context: str, manifest: Any = None) -> dict[str, Any]:
    """The dataset input of ``split`` of the shard set at ``url`` as a JSON-able dict (it waits in the
    tracking journal as it is; ``dataset_input`` makes the MLflow entity). ``manifest``: the set's Manifest
    when the caller has read it already."""
    from mlflow.types import ColSpec, Schema

    if context not in CONTEXTS:
        raise ValueError(f"dataset context {context!r}: expected one of {CONTEXTS}")
    manifest = manifest or read_manifest(url)
    counts = manifest.summary["splits"][split] if split in manifest.summary.get("splits", {}) else None
    if counts is None:
        raise KeyError(f"split {split!r} not in the manifest at {url}; it has {manifest.splits}")
    source_type, source = _source(url)
    schema = Schema([ColSpec("string", "key"), ColSpec("binary", "image"), ColSpec("long", "label")])
    profile = {"num_rows": int(counts["samples"]), "split": split, "shards": int(counts.get("shards", 0)),
               "bytes": int(counts.get("bytes", 0)), "num_classes": int(manifest.num_classes),
               "source_kind": str((manifest.summary.get("options", {}).get("source") or {}).get("kind", "")),
               "manifest_fingerprint": str(manifest.summary.get("fingerprint", ""))}
    return {"name": dataset_name(url, split), "digest": manifest.digest(split), "source_type": source_type,
            "source": json.dumps(source), "schema": json.dumps({"mlflow_colspec": schema.to_dict()}),
            "profile": json.dumps(profile), "context": context}


def dataset_input(d: dict[str, Any]) -> Any:
    """The MLflow DatasetInput of a ``shard_dataset`` dict (tagged with its context)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=d["name"], digest=d["digest"], source_type=d["source_type"], source=d["source"],
                      schema=d.get("schema"), profile=d.get("profile"))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=d["context"])])
