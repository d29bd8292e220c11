"""Credentials inside URLs are never echoed or stored.

``redact(text)`` replaces the user-info part of every URL in ``text``:
``scheme://user:secret@host/path`` -> ``scheme://***@host/path`` (``http://``, ``s3://``,
``postgresql://``, …; the user info ends at the last ``@`` before the first ``/``). The command line
writes its output through ``RedactingStream`` (pipeline/cli.py), and MLflow params and the logged config
are redacted (pipeline/tracking.py). A URL keeps working where it is used: only what is printed or
recorded is changed.
"""
from __future__ import annotations

import re
from typing import Any, TextIO

_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s'\"@]*(?:@[^/\s'\"@]*)*)@")


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@", str(text))


def redact_tree(value: Any) -> Any:
    """``redact`` applied to every string of a nested dict / list (a config tree)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value


class RedactingStream:
    """A text stream that redacts each piece of text written to it before passing it on."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
