"""Where a sweep's trials write in the results folder, and how a trial folder is copied over another."""
from __future__ import annotations

import shutil
from pathlib import Path

from bench.files import atomic_write

TUNE_DIR = "_tune"  # Tune's own state (and, without --storage, its checkpoints): not results


def trial_dir_name(method: str, seed: int, trial_id: str) -> str:
    return f"{method}_s{seed}_{trial_id}"


def trial_folder(config: dict, trial_id: str) -> str:
    """A Tune trial's folder, relative to the results folder: a run other trials need first
    (bench.sweep.phases) is named by its config, under ``_prerequisites/``, so they find it there."""
    if config.get("prerequisite"):
        from bench.prerequisites import PREREQUISITES_DIR  # (imports torch: not at `bench --help` time)

        return f"{PREREQUISITES_DIR}/{config['prerequisite']}"
    return trial_dir_name(config.get("method", "trial"), config.get("seed", 0), trial_id)


def merge_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst``, each file replaced atomically; the epoch folders (and ``latest``) of
    ``dst/checkpoints`` that ``src`` no longer has are removed (``latest`` moved on, or the trial ended)."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            atomic_write(dst / f.relative_to(src), lambda tmp, f=f: shutil.copy2(f, tmp))
    if (src / "checkpoints").is_dir():
        if not (src / "checkpoints" / "latest").exists():  # pruned at the trial's end (keep_checkpoints)
            (dst / "checkpoints" / "latest").unlink(missing_ok=True)
        for old in (dst / "checkpoints").glob("epoch*"):
            if not (src / "checkpoints" / old.name).exists():
                shutil.rmtree(old, ignore_errors=True)
