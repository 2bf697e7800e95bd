"""AMT's pool as runs needed first (``Method.prerequisite_runs`` / ``Method.assemble``): which member trials a
pool needs, one per attack strength, and the pool manifest (``pool.json``) the merging trial reads.

A member's config is the pool's with ``member_eps`` set and every field of role "pool" (merge, pool-assembly
and test settings) back at its default, so pools that differ only in merge settings (β, λ, top-k, ρ ...) or
that share attack strengths need the same members, and ``bench`` trains each once.

``pool.json``::

    {"format": "amt-pool-v1", "pool_size": P, "config_hash": ..., "eps_units": "1/255",
     "members": [{"index": i, "eps": e, "adapter": "members/member_0_eps0.01/adapter.pt", "key": ...,
                  "out_dir": "members/member_0_eps0.01", "trained_in": ..., "result": {...}}]}

``adapter`` and ``out_dir`` are relative to the manifest's folder: the pool keeps its own copy of each member
trained outside it, so a pool folder can be moved whole, or restored on another node from Tune's storage.
``trained_in`` (the member's run folder) is a record only; nothing reads it. It is relative to the manifest's
folder too when both lie in one folder (a sweep's RESULTS, a ``bench run`` folder, or a node's copy of a
sweep's folders fetched from Tune's storage: there the node-local path would name a folder that RESULTS never
sees, while ``../_prerequisites/<run>`` holds in RESULTS as on the node), else absolute (a shared pool cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

from methods.base import RUN_DIR, field_roles

POOL_FORMAT = "amt-pool-v1"
ADAPTER_FILE = "adapter.pt"


def pool_eps_list(cfg) -> list[float]:
    """The members' eps (/255 units): all of ``pool_eps`` when it has ``pool_size`` entries, else
    ``pool_size`` entries spread evenly over it (pool_size 2 of [0.01, 0.1, 6, 8] -> [0.01, 8])."""
    eps = list(cfg.pool_eps)
    if cfg.pool_size >= len(eps):
        return eps
    if cfg.pool_size == 1:
        return [eps[-1]]
    idx = [round(i * (len(eps) - 1) / (cfg.pool_size - 1)) for i in range(cfg.pool_size)]
    return [eps[i] for i in idx]


def member_overrides(cfg, eps: float) -> dict[str, Any]:
    """Config overrides turning a pool config into member ``eps``'s config: pool-role fields at their
    defaults (every pool that needs this member gives it the same config), the adapter in the run's folder."""
    roles = field_roles(cfg)
    defaults = type(cfg)()
    out = {f.name: getattr(defaults, f.name) for f in fields(cfg) if roles[f.name] == "pool"}
    return {**out, "member_eps": float(eps), "adapter_path": f"{RUN_DIR}/{ADAPTER_FILE}", "pool_dir": None}


def member_runs(cfg) -> list[dict[str, Any]]:
    """The pool's members as prerequisite runs; none for a member's own trial or a trained pool's."""
    if cfg.pool_dir is not None or cfg.member_eps is not None:
        return []
    return [member_overrides(cfg, eps) for eps in pool_eps_list(cfg)]


def _brief(result: dict | None) -> dict:
    if not isinstance(result, dict):
        return {}
    return {k: result[k] for k in ("id", "fewshot", "config_hash", "history", "cost") if k in result}


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def _config_hash(cfg) -> str:
    """The same hash as bench's config_hash (seed and speed switches left out); informative only."""
    roles = field_roles(cfg)
    kept = {k: v for k, v in cfg.to_dict().items() if roles.get(k) not in ("seed", "speed")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _trained_in(run_dir: Path, out_dir: Path) -> str:
    if run_dir.is_relative_to(out_dir.parent):
        return Path(os.path.relpath(run_dir, out_dir)).as_posix()
    return str(run_dir)


def write_manifest(cfg, finished: list[tuple[dict, Path]], out_dir: str | Path) -> Path:
    """``out_dir/pool.json`` over the finished members (``(result, run folder)`` in ``pool_eps_list`` order);
    a member trained outside ``out_dir`` is copied into ``out_dir/members/``. Returns the manifest's path."""
    out_dir = Path(out_dir).resolve()
    eps_list = pool_eps_list(cfg)
    if len(finished) != len(eps_list):
        raise ValueError(f"a pool of {len(eps_list)} members got {len(finished)} finished runs")
    missing = [str(Path(d) / ADAPTER_FILE) for _, d in finished if not (Path(d) / ADAPTER_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"pool members left no adapter (did they train >= 1 epoch?): {missing}")
    members = []
    for i, ((result, run_dir), eps) in enumerate(zip(finished, eps_list)):
        run_dir = Path(run_dir).resolve()
        keep = run_dir
        if not run_dir.is_relative_to(out_dir):
            keep = out_dir / "members" / f"member_{i}_eps{eps:g}"
            for name in (ADAPTER_FILE, "result.json"):
                if (run_dir / name).is_file():
                    _copy_atomic(run_dir / name, keep / name)
        members.append({"index": i, "eps": float(eps), "key": run_dir.name,
                        "adapter": str((keep / ADAPTER_FILE).relative_to(out_dir)),
                        "out_dir": keep.relative_to(out_dir).as_posix(), "trained_in": _trained_in(run_dir, out_dir),
                        "result": _brief(result)})
    manifest = {"format": POOL_FORMAT, "pool_size": len(members), "eps_units": "1/255",
                "config_hash": _config_hash(cfg), "members": members}
    path = out_dir / "pool.json"
    tmp = path.with_name(f".pool.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)
    return path
