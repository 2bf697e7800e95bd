"""Runs a trial needs first (``Method.prerequisite_runs``), read the same way by ``bench run`` and a sweep:
each run's config and folder name, whether it finished, and the assembly of the trial once all have.

A run's folder is named by its config (``<method>-<hash>-s<seed>``, the hash over every field but the
speed switches), so trials that need the same run find it in the same folder and it is trained once.
Runs are validation-only trials (no test evaluation): their ``result.json`` has ``"stage": "validation"``.

Paths inside a run's or an assembled trial's own folder are recorded relative to it (``RUN_DIR``, e.g. a
member's ``{run_dir}/adapter.pt``, a merging trial's ``pool_dir: {run_dir}/.``) and filled in only when the
trial builds its method (``in_run_dir``): a folder restored on another node (no shared disk, Tune's
``--storage``) or moved whole is the same run, with the same args.yaml and config hash.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.config import config_hash, resolve_config, with_overrides
from methods import get_method
from methods.base import RUN_DIR, BaseConfig

PREREQUISITES_DIR = "_prerequisites"  # under a results folder or a `bench run` folder; not leaderboard entries


@dataclass(frozen=True)
class PrerequisiteRun:
    name: str  # its folder's name
    method: str
    config: dict[str, Any]  # the resolved config, RUN_DIR not yet replaced

    def resolved(self) -> BaseConfig:
        """The run's config, as recorded in whichever folder it runs (``RUN_DIR`` kept)."""
        return resolve_config(self.method, {k: v for k, v in self.config.items() if k != "method"})


def in_run_dir(cfg: BaseConfig, run_dir: str | Path) -> BaseConfig:
    """``cfg`` with ``RUN_DIR`` in its string fields replaced by ``run_dir`` (absolute): the config the
    method reads; the recorded one keeps ``RUN_DIR``."""
    recorded = {k: v for k, v in cfg.to_dict().items() if k != "method"}
    filled = {k: _fill(v, str(Path(run_dir).resolve())) for k, v in recorded.items()}
    return cfg if filled == recorded else resolve_config(cfg.method, filled)


def _in_run_dir_form(value: Any, run_dir: Path) -> Any:
    """A path under ``run_dir`` as ``RUN_DIR[/relative]``; anything else as it is."""
    if not isinstance(value, str) or not value or RUN_DIR in value:
        return value
    path = Path(value).resolve()
    if path == run_dir:  # not RUN_DIR alone: config values are read as YAML, where "{run_dir}" is a mapping
        return f"{RUN_DIR}/."
    if path.is_relative_to(run_dir):
        return f"{RUN_DIR}/{path.relative_to(run_dir).as_posix()}"
    return value


def _fill(value: Any, run_dir: str) -> Any:
    if isinstance(value, str):
        return value.replace(RUN_DIR, run_dir)
    if isinstance(value, list):
        return [_fill(v, run_dir) for v in value]
    return value


def prerequisite_runs(cfg: BaseConfig) -> list[PrerequisiteRun]:
    """The runs ``cfg``'s trial needs first, in the method's order."""
    runs = []
    for overrides in get_method(cfg.method).prerequisite_runs(cfg):
        run_cfg = with_overrides(cfg, overrides)
        if get_method(cfg.method).prerequisite_runs(run_cfg):
            raise ValueError(f"{cfg.method}: a prerequisite run may not need runs of its own ({overrides})")
        name = f"{cfg.method}-{config_hash(run_cfg, ignore=('speed',))}-s{run_cfg.seed}"
        runs.append(PrerequisiteRun(name, cfg.method, run_cfg.to_dict()))
    return runs


def finished_result(run_dir: str | Path) -> dict | None:
    """A run's result when it finished (an ok result.json), else None."""
    try:
        result = json.loads((Path(run_dir) / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("status") == "ok" else None


def assemble(cfg: BaseConfig, root: str | Path, out_dir: str | Path) -> BaseConfig:
    """The trial to run once ``cfg``'s prerequisite runs finished in ``root/<name>``: the method's
    ``assemble`` overrides applied to ``cfg`` (``cfg`` itself when it needs no runs), paths under
    ``out_dir`` in ``RUN_DIR`` form."""
    runs = prerequisite_runs(cfg)
    if not runs:
        return cfg
    finished = []
    for run in runs:
        run_dir = Path(root) / run.name
        result = finished_result(run_dir)
        if result is None:
            raise RuntimeError(f"prerequisite run {run_dir} did not finish (no ok result.json)")
        finished.append((result, run_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = get_method(cfg.method).assemble(cfg, finished, out_dir)
    # what the method wrote into the trial's folder is recorded relative to it (the folder may move)
    overrides = {k: _in_run_dir_form(v, out_dir.resolve()) for k, v in overrides.items()}
    assembled = with_overrides(cfg, overrides)
    if prerequisite_runs(assembled):
        raise ValueError(f"{cfg.method}.assemble left a config that still needs runs first")
    return assembled
