"""Atomic file writes, the one helper every part of bench uses for files a kill must not leave half-written
(result.json, checkpoints, manifests, AutoAttack state): write a temporary file beside the target, then
``os.replace`` it over the target, so a reader sees the old file or the new one, never half of either."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_json", "check_writable"]


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path, e.g. ``lambda p: torch.save(obj, p)``)
    to ``path`` atomically. The temporary name carries host and pid: writers on several nodes or processes
    sharing a folder never write the same temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{socket.gethostname()}.{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as JSON (numbers such as numpy or torch scalars through ``float``, anything else through ``str``)."""
    def default(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return str(v)
    return atomic_write(path, json.dumps(obj, indent=indent, default=default))


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Raise ValueError, one line naming ``folder``, when it cannot be created or written; checked by really
    creating it and a probe file in it (permission bits say nothing for root, and a read-only mount or a
    path under a file fails only when tried). Called before any work, so a bad --out costs nothing."""
    folder = Path(folder)
    probe = folder / f".bench-write-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"cannot write the {what} {folder}: {exc.strerror or exc}") from None
    return folder
