"""What one sample looks like inside a shard, shared by the writer, the reader and `verify`.

    <key>.jpg | <key>.png   image bytes (original or re-encoded; see sharding/images.py)
    <key>.cls               label as ASCII decimal digits, e.g. b"417"
    <key>.json              {"height", "label_name", "source", "width"}: sorted keys, no spaces

Keys hold no dots (WebDataset splits a member name at its first dot) and no '/'. Member headers are
fixed so that a shard's bytes depend only on its samples: mtime 2000-01-01T00:00:00Z, uid/gid 0,
uname/gname "cscctrl", mode 0444, POSIX (USTAR/PAX) format.
"""
from __future__ import annotations

import json
import tarfile

IMAGE_KEYS = ("jpg", "png", "jpeg")  # image members a reader accepts; nothing else is decoded
SHARD_MTIME = 946_684_800  # member mtime: 2000-01-01T00:00:00Z
TAR_OWNER = "cscctrl"  # uname/gname of every member (uid/gid stay 0)
TAR_MODE = 0o444
TAR_FORMAT = tarfile.PAX_FORMAT  # plain USTAR headers; a PAX record only for names over 100 bytes


def sample_json(source: str, label_name: str, width: int, height: int) -> bytes:
    """The ``.json`` member (deterministic bytes)."""
    return json.dumps({"source": source, "label_name": label_name, "width": width, "height": height},
                      sort_keys=True, separators=(",", ":")).encode()


def split_member_name(name: str) -> tuple[str, str]:
    """``n01440764_10026.jpg`` -> (key, extension), split at the first dot as WebDataset does."""
    key, _, ext = name.rpartition("/")[2].partition(".")
    prefix = name.rpartition("/")[0]
    return (f"{prefix}/{key}" if prefix else key), ext


def is_unsafe_member(name: str) -> bool:
    """Absolute paths, backslashes and '..' components are refused (only tampered shards hold them)."""
    return name.startswith("/") or "\\" in name or ".." in name.split("/")
