"""Files written whole or not at all: a temp file beside the target, then ``os.replace``."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path


def write_atomic(path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then ``os.replace`` it into place.

    The temp file is created with mode 0o666 minus the umask, like a normal new file; it is removed if
    anything fails, so ``path`` is either the old file or the complete new one.
    """
    path = Path(path)
    parent = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(obj, path) -> None:
    """Write ``obj`` as indented JSON (UTF-8, trailing newline) atomically."""
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomic(path, lambda f: f.write(data))
