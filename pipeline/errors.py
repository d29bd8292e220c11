"""One line for every error a command can end in: what failed, which file or key, and the way out.

``describe(e)`` turns an exception into that line; ``exit_code(e)`` is 2 for errors of the input (a bad
key, value, path or file, the exit code of argparse) and 1 for everything else (a full disk, a failure
while running). ``pipeline/cli.py`` ends every command with them unless ``--debug`` asks for the
traceback. Credentials inside URLs never reach the line (``redact``).
"""
from __future__ import annotations

import errno

from pipeline.redact import redact

DEBUG_HINT = "(--debug shows the traceback)"

def _path_of(e: OSError) -> str:
    name = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        name = f"{name} -> {e.filename2}"
    return str(name)


def describe_os_error(e: OSError) -> str:
    """The path, what is wrong with it, and what to do."""
    path = _path_of(e) or "a file"
    if isinstance(e, PermissionError):
        return (f"permission denied: {path}. Give this user access to it (ls -l shows its owner and mode) or "
                f"choose another location")
    if isinstance(e, NotADirectoryError):
        return f"{path}: a part of this path is a file where a folder is expected; move that file or choose another path"
    if isinstance(e, IsADirectoryError):
        return f"{path} is a folder where a file is expected; name the file itself"
    if isinstance(e, FileExistsError):
        return f"{path} already exists and is in the way; remove it or choose another path"
    if isinstance(e, FileNotFoundError):
        return f"no such file or folder: {path}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device holding {path} ({e.strerror}). Free space or choose another "
                f"location, then run the same command again: finished work is kept and resumed")
    if e.errno == errno.EFBIG:
        return f"{path}: file too large for this file system or the process's file-size limit (ulimit -f)"
    if e.errno == errno.EROFS:
        return f"{path} is on a read-only file system; choose a writable location"
    reason = e.strerror or str(e)
    return f"{path}: {reason}" if e.filename is not None else f"{type(e).__name__}: {reason}"


PROJECT_PACKAGES = ("pipeline", "sharding", "tuning", "models")


def describe(e: BaseException) -> str:
    """One line (no traceback) for the exception ``e``."""
    if isinstance(e, MemoryError):
        return ("out of memory. Lower the sizes that set memory use (train.batch_size_per_worker, "
                "model.image_size, model.ndf, --batch-size) or use a machine with more memory")
    if isinstance(e, OSError) and (e.filename is not None or e.errno in (errno.ENOSPC, errno.EDQUOT)):
        text = describe_os_error(e)
    else:
        message = str(e).strip()
        first = message.splitlines()[0] if message else ""
        known = type(e).__module__.split(".")[0] in PROJECT_PACKAGES  # their messages name the key or file
        text = first if (known and first) else f"{type(e).__name__}: {first}" if first else type(e).__name__
    return redact(text)


INPUT_ERRORS = (ValueError, KeyError, LookupError, FileNotFoundError, PermissionError, NotADirectoryError,
                IsADirectoryError, FileExistsError)


def exit_code(e: BaseException) -> int:
    """2: the command's input is wrong (a key, value, path or file); 1: it failed while running."""
    return 2 if isinstance(e, INPUT_ERRORS) else 1
