"""Training an AMT pool: one ordinary ``amt`` trial per attack strength, then a pool manifest.

The steps are split so that any runner can execute the members: :func:`plan_pool` says what each member
trial is (its config overrides, where it trains, where the pool keeps its adapter), a runner executes them
(:func:`sequential_runner` here, one after the other; ``bench.sweep.pool`` runs them as parallel Ray tasks
inside a sweep trial), :func:`write_manifest` records the results. :func:`run_pool` chains the three.

Member cache: with ``cache_dir`` a member trains in ``cache_dir/eps<e>_<key>/`` where ``key`` hashes every
config field that shapes its training (not the merge, pool-assembly or test fields of
``methods.amt.POOL_ONLY_FIELDS``). Pools that differ only in merge settings (β, λ, top-k, ρ ...) or that
share some attack strengths reuse the trained members instead of retraining them. A member's training is
claimed with a lock file, so two trials needing the same member at once train it once.

``pool.json``::

    {"format": "amt-pool-v1", "pool_size": P, "config_hash": ..., "eps_units": "1/255",
     "members": [{"index": i, "eps": e, "adapter": "members/member_0_eps0.01/adapter.pt", "key": ...,
                  "out_dir": ..., "trained_in": ..., "result": {...}}]}

Adapter paths are relative to the manifest's folder (the pool keeps its own copy of each adapter), so a
pool folder can be moved whole.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from methods.amt import POOL_ONLY_FIELDS, pool_eps_list

POOL_FORMAT = "amt-pool-v1"
ADAPTER_FILE = "adapter.pt"
# Speed switches do not change what a member learns (seed does, so it stays in the key).
_SPEED_FIELDS = ("num_workers", "eval_batch_size", "channels_last", "compile")


@dataclass
class MemberSpec:
    index: int
    eps: float  # /255 units
    out_dir: Path  # the pool's record of the member (its adapter copy and result.json)
    train_dir: Path | None = None  # where it trains; None: out_dir (no cache)
    key: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.train_dir is None:
            self.train_dir = self.out_dir

    @property
    def adapter(self) -> Path:
        return self.out_dir / ADAPTER_FILE

    @property
    def trained_adapter(self) -> Path:
        return self.train_dir / ADAPTER_FILE


RunMember = Callable[[dict, Path], dict]
Runner = Callable[[Sequence[MemberSpec], RunMember], list]


def member_overrides(cfg, eps: float, train_dir: Path) -> dict[str, Any]:
    """Config overrides turning a pool config into member ``eps``'s config. Pool-only fields go back to
    their defaults, so every pool that needs this member gives it the same config (and ``args.yaml``)."""
    defaults = {f.name: getattr(type(cfg)(), f.name) for f in fields(cfg) if f.name in POOL_ONLY_FIELDS}
    return {**defaults, "member_eps": float(eps), "adapter_path": str(train_dir / ADAPTER_FILE), "pool_dir": None}


def member_key(cfg, eps: float) -> str:
    """Hash of what a member's training depends on: the config minus pool-only and speed fields, plus eps."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in POOL_ONLY_FIELDS and k not in _SPEED_FIELDS}
    d["member_eps"] = float(eps)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan_pool(cfg, out_dir: str | Path, cache_dir: str | Path | None = None) -> list[MemberSpec]:
    """One member per eps of the pool (``pool_eps_list``); with ``cache_dir`` members train in the cache."""
    out_dir = Path(out_dir)
    specs = []
    for i, eps in enumerate(pool_eps_list(cfg)):
        key = member_key(cfg, eps)
        mdir = out_dir / "members" / f"member_{i}_eps{eps:g}"
        tdir = Path(cache_dir) / f"eps{eps:g}_{key}" if cache_dir is not None else mdir
        specs.append(MemberSpec(i, float(eps), mdir, tdir, key, member_overrides(cfg, eps, tdir)))
    return specs


def finished_result(spec: MemberSpec) -> dict | None:
    """The member's result when its training finished (adapter and an ok result.json), else None."""
    done = spec.train_dir / "result.json"
    if not (spec.trained_adapter.is_file() and done.is_file()):
        return None
    try:
        result = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("status") == "ok" else None


class MemberLock:
    """An exclusive claim on training one member: ``fcntl.flock`` on ``<train_dir>.lock``.

    Hand-written on the standard library because the locking package is not a dependency here; flock is
    released by the kernel when its holder dies, so a killed trial never leaves a member claimed."""

    def __init__(self, spec: MemberSpec):
        self.path = spec.train_dir.with_name(spec.train_dir.name + ".lock")
        self.fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def sequential_runner(specs: Sequence[MemberSpec], run_member: RunMember) -> list[dict]:
    """Run the members one after the other; a member that finished before (here or in the cache) is reused."""
    results = []
    for spec in specs:
        with MemberLock(spec):
            result = finished_result(spec)
            if result is None:
                spec.train_dir.mkdir(parents=True, exist_ok=True)
                result = run_member(dict(spec.overrides), spec.train_dir)
        results.append(result)
    return results


def _brief(result: dict | None) -> dict:
    if not isinstance(result, dict):
        return {}
    return {k: result[k] for k in ("id", "fewshot", "config_hash", "history", "cost") if k in result}


def collect_member(spec: MemberSpec) -> None:
    """Give the pool its own copy of a member trained elsewhere (the cache): adapter and result.json."""
    if spec.train_dir == spec.out_dir or not spec.trained_adapter.is_file():
        return
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_FILE, "result.json"):
        src = spec.train_dir / name
        if src.is_file():
            tmp = spec.out_dir / f".{name}.tmp"
            shutil.copy2(src, tmp)
            os.replace(tmp, spec.out_dir / name)


def write_manifest(cfg, out_dir: str | Path, specs: Sequence[MemberSpec], results: Sequence[dict | None]) -> Path:
    """Check every member left its adapter and write ``out_dir/pool.json``; returns its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        collect_member(spec)
    missing = [str(s.adapter) for s in specs if not s.adapter.is_file()]
    if missing:
        raise FileNotFoundError(f"pool members left no adapter (did they train >= 1 epoch?): {missing}")
    members = []
    for spec, res in zip(specs, list(results) + [None] * (len(specs) - len(results))):
        members.append({"index": spec.index, "eps": spec.eps, "key": spec.key,
                        "adapter": str(spec.adapter.resolve().relative_to(out_dir.resolve())),
                        "out_dir": str(spec.out_dir), "trained_in": str(spec.train_dir), "result": _brief(res)})
    try:
        from bench.config import config_hash

        chash = config_hash(cfg)
    except Exception:  # noqa: BLE001 - the hash is informative only
        chash = None
    manifest = {"format": POOL_FORMAT, "pool_size": len(specs), "eps_units": "1/255", "config_hash": chash,
                "members": members}
    path = out_dir / "pool.json"
    tmp = out_dir / ".pool.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)
    return path


def run_pool(cfg, out_dir: str | Path, run_member: RunMember, *, runner: Runner | None = None,
             cache_dir: str | Path | None = None) -> Path:
    """Train the pool's members (``run_member(overrides, member_train_dir) -> result``), write the manifest."""
    specs = plan_pool(cfg, out_dir, cache_dir)
    results = (runner or sequential_runner)(specs, run_member)
    return write_manifest(cfg, out_dir, specs, results)
