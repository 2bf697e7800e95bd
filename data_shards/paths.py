"""Where shards live: a root folder holding one sub-folder per data set, or a remote location."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .manifest import MANIFEST

REMOTE_PREFIXES = ("http://", "https://", "pipe:", "s3://", "gs://")


def is_remote(location) -> bool:
    """A location that is not a local folder (URL base, or a `pipe:` template with `{}` for the file name)."""
    return isinstance(location, str) and location.startswith(REMOTE_PREFIXES)


def default_root() -> Path:
    """`$BENCH_SHARDS` when set, else `./shards` (absolute, so Ray workers in other cwd find it)."""
    env = os.environ.get("BENCH_SHARDS")
    return Path(env).expanduser().resolve() if env else (Path.cwd() / "shards").resolve()


def dataset_dir(name_or_path: Union[str, os.PathLike], root: Optional[Union[str, os.PathLike]] = None):
    """Resolve a data set name (under `root`) or a folder holding `_info.json` to its folder.

    Remote locations (http(s) base URLs, `pipe:` templates) are returned unchanged as strings.
    """
    if is_remote(name_or_path):
        return str(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / MANIFEST).is_file():
        return p.resolve()
    base = Path(root).expanduser().resolve() if root is not None else default_root()
    d = base / str(name_or_path)
    if not (d / MANIFEST).is_file():
        shards = sorted(d.glob("*.tar")) if d.is_dir() else []
        if shards:  # the manifest is written last: shards without it are an interrupted build or a deleted file
            raise FileNotFoundError(f"{d} holds {len(shards)} shard file(s) but no {MANIFEST} (written last by "
                                    f"`bench shards make`: the build was interrupted or the file deleted); "
                                    f"{how_to_build(str(name_or_path), base)}")
        raise FileNotFoundError(f"no shards for data set '{name_or_path}' under {base}; "
                                f"{how_to_build(str(name_or_path), base)}")
    return d


def how_to_build(name: str, base: Path) -> str:
    """The command that builds data set ``name`` under ``base``, with a converter that exists."""
    from .converters import CONVERTERS  # (heavy imports: only on this error path)

    out = f" --out {base}"  # always: the reader's shell may not have this process's $BENCH_SHARDS or cwd
    if name == "digits":
        return f"build them with: python -m bench shards make digits{out}"
    if name in CONVERTERS:
        return (f"build them with: python -m bench shards make {name} --root DIR{out} "
                f"(DIR: the data set as its publisher ships it)")
    return (f"no converter is named '{name}' (python -m bench shards list: {', '.join(sorted(CONVERTERS))}); "
            f"a class-per-folder tree converts with: python -m bench shards make folder --root DIR{out}, "
            f"then rename {base / 'folder'} to {base / name}")
