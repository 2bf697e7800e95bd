"""Training an AMT pool: one ordinary ``amt`` trial per attack strength, then a pool manifest.

The steps are split so that any runner can execute the members: :func:`plan_pool` says what each member
trial is (its config overrides and output folder), a runner executes them (sequentially here; the Ray
sweep runner maps them onto Ray trials), :func:`write_manifest` records the results. :func:`run_pool`
chains the three with a ``runner`` argument, which defaults to running ``run_member`` in turn.

``pool.json``::

    {"format": "amt-pool-v1", "pool_size": P, "config_hash": ..., "eps_units": "1/255",
     "members": [{"index": i, "eps": e, "adapter": "member_0_eps0.01/adapter.pt", "out_dir": ..., "result": {...}}]}

Adapter paths are relative to the manifest's folder, so a pool folder can be moved whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from methods.amt import pool_eps_list

POOL_FORMAT = "amt-pool-v1"
ADAPTER_FILE = "adapter.pt"


@dataclass
class MemberSpec:
    index: int
    eps: float  # /255 units
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def adapter(self) -> Path:
        return self.out_dir / ADAPTER_FILE


RunMember = Callable[[dict, Path], dict]
Runner = Callable[[Sequence[MemberSpec], RunMember], list]


def plan_pool(cfg, out_dir: str | Path) -> list[MemberSpec]:
    """One member per eps of the pool: overrides ``member_eps``, ``adapter_path`` and ``pool_dir=None``."""
    out_dir = Path(out_dir)
    specs = []
    for i, eps in enumerate(pool_eps_list(cfg)):
        mdir = out_dir / "members" / f"member_{i}_eps{eps:g}"
        spec = MemberSpec(i, float(eps), mdir)
        spec.overrides = {"member_eps": float(eps), "adapter_path": str(spec.adapter), "pool_dir": None}
        specs.append(spec)
    return specs


def sequential_runner(specs: Sequence[MemberSpec], run_member: RunMember) -> list[dict]:
    """Run the members one after the other; a member whose adapter and result.json exist is not rerun."""
    results = []
    for spec in specs:
        done = spec.out_dir / "result.json"
        if spec.adapter.is_file() and done.is_file():
            results.append(json.loads(done.read_text()))
            continue
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        results.append(run_member(dict(spec.overrides), spec.out_dir))
    return results


def _brief(result: dict | None) -> dict:
    if not isinstance(result, dict):
        return {}
    return {k: result[k] for k in ("id", "fewshot", "config_hash") if k in result}


def write_manifest(cfg, out_dir: str | Path, specs: Sequence[MemberSpec], results: Sequence[dict | None]) -> Path:
    """Check every member left its adapter and write ``out_dir/pool.json``; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [str(s.adapter) for s in specs if not s.adapter.is_file()]
    if missing:
        raise FileNotFoundError(f"pool members left no adapter (did they train >= 1 epoch?): {missing}")
    members = []
    for spec, res in zip(specs, list(results) + [None] * (len(specs) - len(results))):
        members.append({"index": spec.index, "eps": spec.eps,
                        "adapter": str(spec.adapter.resolve().relative_to(out_dir.resolve())),
                        "out_dir": str(spec.out_dir), "result": _brief(res)})
    try:
        from bench.config import config_hash

        chash = config_hash(cfg)
    except Exception:  # noqa: BLE001 - the hash is informative only
        chash = None
    manifest = {"format": POOL_FORMAT, "pool_size": len(specs), "eps_units": "1/255", "config_hash": chash,
                "members": members}
    path = out_dir / "pool.json"
    path.write_text(json.dumps(manifest, indent=2, default=str))
    return path


def run_pool(cfg, out_dir: str | Path, run_member: RunMember, *, runner: Runner | None = None) -> Path:
    """Train the pool's members (``run_member(overrides, member_out_dir) -> result``) and write the manifest."""
    specs = plan_pool(cfg, out_dir)
    results = (runner or sequential_runner)(specs, run_member)
    return write_manifest(cfg, out_dir, specs, results)
