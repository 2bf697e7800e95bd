"""Shards checked against their manifest's sha256 before anything reads them.

A changed byte anywhere in a shard (an image, a label) fails the read with the shard named, in one line
(:class:`ShardError`), instead of training on it silently. Each file is hashed at most once per process; a
stamp file beside the shards (``_verified.json``: size, mtime and manifest sha256 of each file found good)
lets the next process (the next trial of a sweep) skip re-hashing a file whose size and mtime did not change.
A shard folder that is not writable gets no stamp: every process then hashes once.

Remote shards (URLs, ``pipe:`` commands) are not verified here: that would fetch every shard once more;
``bench shards check`` verifies them where they are stored.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .paths import is_remote
from .reader import ShardError
from .writer import sha256_file

STAMP = "_verified.json"
# absolute path -> (size, mtime_ns, sha256) of files verified by this process
_VERIFIED: dict[str, tuple[int, int, str]] = {}


def _identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _read_stamp(ds_dir: Path) -> dict:
    try:
        stamp = json.loads((ds_dir / STAMP).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: hash again
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _write_stamp(ds_dir: Path, stamp: dict) -> None:
    tmp = ds_dir / f"{STAMP}.{os.getpid()}.tmp"  # one per process: two trials may stamp at once
    try:
        tmp.write_text(json.dumps(stamp, indent=0, sort_keys=True))
        os.replace(tmp, ds_dir / STAMP)
    except OSError:  # a read-only shard folder: verification still happened, only its memory is lost
        tmp.unlink(missing_ok=True)


def verify_split(ds_dir, info: dict, split: str, shards: int | None = None) -> None:
    """Raise :class:`ShardError` (one line, naming the shard) unless every shard of ``split`` (its first
    ``shards`` ones: those a reader of the first N samples opens) is present and has the manifest's sha256."""
    if is_remote(ds_dir) or "{}" in str(ds_dir) or split not in info.get("splits", {}):
        return
    d = Path(ds_dir)
    s = info["splits"][split]
    stamp, stamped = None, False
    for name in s["shards"][:shards]:
        path = d / name
        want = (s.get("sha256") or {}).get(name)
        if want is None:
            raise ShardError(f"manifest {d / '_info.json'} has no sha256 for shard {path}; rebuild the shards "
                             f"(python -m bench shards make NAME)")
        try:
            size, mtime = _identity(path)
        except OSError:
            raise ShardError(f"missing shard {path} (listed in {d / '_info.json'})") from None
        key = str(path.resolve())
        if _VERIFIED.get(key) == (size, mtime, want):
            continue
        if stamp is None:
            stamp = _read_stamp(d)
        if stamp.get(name) == [size, mtime, want]:
            _VERIFIED[key] = (size, mtime, want)
            continue
        got = sha256_file(path)
        if got != want:
            raise ShardError(f"shard {path} differs from its manifest (sha256 {got[:12]}..., manifest "
                             f"{want[:12]}...): changed or damaged since it was written; rebuild it or run "
                             f"python -m bench shards check")
        _VERIFIED[key] = (size, mtime, want)
        stamp[name] = [size, mtime, want]
        stamped = True
    if stamped:
        _write_stamp(d, stamp)
