"""The test evaluation sharded by samples as Ray tasks (``bench evaluate --shards K``, ``eval_shards`` in a
trial's config).

The evaluation's batches are fixed index ranges (batch k: samples ``[k * B, (k + 1) * B)``, B =
``eval_batch_size``) and every random draw of the clean, PGD and AutoAttack passes is a function of (seed,
global batch index) alone (``bench.evaluate.restart_seed``, ``autoattack_seed``). Shard k gets the whole
batches ``[a_k, b_k)``; the driver concatenates the shards' per-sample flags in index order. The result is
therefore the flags of one process evaluating all batches, bit for bit, on the same kind of device and
kernels (the tests check it); only where each batch runs changes.

A shard is a Ray task (``num_cpus``, ``num_gpus`` fractional allowed, ``max_retries``) holding its own
folder ``WORK/samples-START-STOP/``: its clean and PGD flags once computed, its resumable AutoAttack state and a line
per attempt. A shard whose worker dies is retried (elsewhere on a cluster) and resumes from that folder:
no finished batch runs again. The weights go to the object store once (``ray.put`` of the state dict);
each shard rebuilds the network from a :class:`bench.eval_target.ModelRecipe`.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from bench.evaluate import (AUTOATTACK_STATE, _fingerprint, autoattack_flags, clean_flags, pgd_flags, pgd_step)
from bench.files import atomic_write_json

SHARD_DIR = "samples-{:06d}-{:06d}"  # a shard's folder, by its sample range: another K reuses what fits
PASSES = "clean_pgd_flags.json"  # a shard's clean and PGD flags, kept so a retried shard skips them
ATTEMPTS = "attempts.jsonl"


def shard_ranges(n: int, batch_size: int, shards: int) -> list[tuple[int, int]]:
    """Sample index ranges ``[start, stop)`` of ``shards`` shards holding whole batches of ``batch_size``, as
    even as batches allow (at most one shard per batch)."""
    if n <= 0:
        raise ValueError("no samples to evaluate")
    if shards < 1:
        raise ValueError(f"shards={shards} must be >= 1")
    n_batches = math.ceil(n / batch_size)
    shards = min(shards, n_batches)
    bounds = [k * n_batches // shards for k in range(shards + 1)]
    return [(bounds[k] * batch_size, min(bounds[k + 1] * batch_size, n)) for k in range(shards)]


class _Progress:
    """A counter the shards add their finished batches to (a Ray actor: works across nodes)."""

    def __init__(self):
        self.batches = self.samples = 0

    def add(self, samples: int) -> None:
        self.batches += 1
        self.samples += samples

    def read(self) -> tuple[int, int]:
        return self.batches, self.samples


def evaluate_shard(recipe, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg, *,
                   shard: int, first_index: int, shard_dir: str, threads: int | None = None,
                   use_gpu: bool = False, progress=None) -> dict[str, Any]:
    """One shard, in whatever process runs it: rebuild the network, then the clean, PGD and AutoAttack
    flags of samples ``[first_index, first_index + len(x))``, resuming from ``shard_dir``."""
    t0 = time.time()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    folder = Path(shard_dir)
    folder.mkdir(parents=True, exist_ok=True)
    aa_path = folder / AUTOATTACK_STATE
    resumed = None
    if aa_path.exists():
        aa = json.loads(aa_path.read_text())
        resumed = {"attacks_done": aa.get("done"), "attack": aa.get("attack"), "pending": len(aa.get("pending", []))}
    attempt = {"time": t0, "pid": os.getpid(), "host": socket.gethostname(), "device": str(device),
               "resumed_autoattack": resumed}
    with open(folder / ATTEMPTS, "a") as f:  # one line per attempt: a retried shard shows two
        f.write(json.dumps(attempt) + "\n")

    model = recipe.build_with(state).to(device)
    bs = cfg.eval_batch_size
    passes = _cached_passes(folder / PASSES, model, x, y, cfg, device, first_index)
    flags = dict(passes)
    if cfg.autoattack_version != "off":
        on_batch = (lambda n: progress.add.remote(n)) if progress is not None else None
        flags["autoattack"] = autoattack_flags(model, x, y, eps=cfg.eps, version=cfg.autoattack_version,
                                               batch_size=bs, device=device, seed=cfg.seed, state_path=aa_path,
                                               clean=passes["clean"], first_index=first_index, on_batch=on_batch)
    return {"shard": shard, "range": [first_index, first_index + len(x)], "samples": len(x),
            "flags": {k: v.tolist() for k, v in flags.items()}, "wall_s": time.time() - t0,
            "device": str(device), "host": attempt["host"], "pid": attempt["pid"],
            "threads": torch.get_num_threads()}


def _cached_passes(path: Path, model, x, y, cfg, device, first_index: int) -> dict[str, torch.Tensor]:
    """The clean and PGD flags of the shard, from ``path`` when an earlier attempt computed them for the
    same weights, samples and settings."""
    fingerprint = _fingerprint(model, x, y, device=device, first_index=first_index, eps=cfg.eps,
                               pgd_steps=cfg.eval_pgd_steps, pgd_step=pgd_step(cfg), restarts=cfg.eval_pgd_restarts,
                               batch_size=cfg.eval_batch_size, seed=cfg.seed)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            return {k: torch.tensor(v, dtype=torch.bool) for k, v in saved["flags"].items()}
    bs = cfg.eval_batch_size
    out = {"clean": clean_flags(model, x, y, bs, device)}
    if cfg.eval_pgd_steps > 0:
        out["pgd"] = pgd_flags(model, x, y, eps=cfg.eps, step_size=pgd_step(cfg), steps=cfg.eval_pgd_steps,
                               restarts=cfg.eval_pgd_restarts, batch_size=bs, device=device, seed=cfg.seed,
                               clean=out["clean"], first_index=first_index)
    atomic_write_json(path, {"fingerprint": fingerprint, "flags": {k: v.tolist() for k, v in out.items()}},
                      indent=None)
    return out


def sharded_flags(recipe, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg, *,
                  shards: int, work_dir: str | Path, cpus_per_shard: float = 1, gpus_per_shard: float = 0,
                  address: str | None = None, max_retries: int = 3, progress: bool = True,
                  threads_per_shard: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-sample flags of the clean, PGD and AutoAttack passes ``cfg`` asks for (as
    ``bench.evaluate.evaluate_flags``), computed by ``shards`` Ray tasks; and a report of the shards (ranges,
    attempts, wall time each, the driver's wall time and overhead).

    Ray: the running session if there is one (inside a Tune trial), else ``ray.init(address)`` (None: a
    local one). ``threads_per_shard``: torch threads in each shard (default: ``cpus_per_shard`` rounded up)."""
    import ray
    from tqdm.auto import tqdm

    t0 = time.time()
    work_dir = Path(work_dir)
    ranges = shard_ranges(len(x), cfg.eval_batch_size, shards)
    if not ray.is_initialized():  # as a sweep starts it: the suite's code travels to every node
        from bench.sweep.driver import _init_ray, _trial_env

        _init_ray(address, None, _trial_env())
    t_ray = time.time()
    counter = ray.remote(num_cpus=0)(_Progress).remote()
    state_ref = ray.put({k: v.detach().cpu() for k, v in state.items()})
    threads = threads_per_shard or max(1, math.ceil(cpus_per_shard))
    task = ray.remote(evaluate_shard).options(num_cpus=cpus_per_shard, num_gpus=gpus_per_shard,
                                              max_retries=max_retries, retry_exceptions=False)
    refs = [task.remote(recipe, state_ref, x[a:b].clone(), y[a:b].clone(), cfg, shard=k, first_index=a,
                        shard_dir=str(work_dir / SHARD_DIR.format(a, b)), threads=threads, use_gpu=gpus_per_shard > 0,
                        progress=counter)
            for k, (a, b) in enumerate(ranges)]
    results: dict[int, dict] = {}
    bar = tqdm(total=len(refs), desc=f"evaluation in {len(refs)} shards", unit="shard", disable=not progress)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        for ref in done:
            out = ray.get(ref)
            results[out["shard"]] = out
            bar.update(1)
        batches, samples = ray.get(counter.read.remote())
        bar.set_postfix(autoattack_batches=batches, attacked=samples)
    bar.close()
    ray.kill(counter)

    ordered = [results[k] for k in range(len(ranges))]
    flags = {name: torch.tensor(sum((r["flags"][name] for r in ordered), []), dtype=torch.bool)
             for name in ordered[0]["flags"]}
    assert all(len(f) == len(x) for f in flags.values())
    wall = time.time() - t0
    per_shard = []
    for r in ordered:
        attempts_path = work_dir / SHARD_DIR.format(*r["range"]) / ATTEMPTS
        attempts = len(attempts_path.read_text().splitlines()) if attempts_path.exists() else None
        per_shard.append({k: r[k] for k in ("shard", "range", "samples", "wall_s", "device", "host", "threads")}
                         | {"attempts": attempts})
    report = {"shards": len(ranges), "batch_size": cfg.eval_batch_size, "cpus_per_shard": cpus_per_shard,
              "gpus_per_shard": gpus_per_shard, "max_retries": max_retries, "wall_s": wall,
              "ray_init_s": t_ray - t0, "slowest_shard_s": max(r["wall_s"] for r in ordered),
              "images_per_s": len(x) / wall, "per_shard": per_shard, "work_dir": str(work_dir)}
    report["overhead_s"] = wall - report["slowest_shard_s"]  # Ray start-up, scheduling, transfers, merging
    atomic_write_json(work_dir / "shards.json", report)
    return flags, report


def evaluate_sharded(recipe, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg, *,
                     shards: int, work_dir: str | Path, address: str | None = None, **ray_options
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`sharded_flags`, except one shard without a cluster address: then the shard runs in this
    process (same code and folder, no Ray start-up)."""
    if shards > 1 or address is not None:
        return sharded_flags(recipe, state, x, y, cfg, shards=shards, work_dir=work_dir, address=address,
                             **ray_options)
    t0 = time.time()
    (a, b), = shard_ranges(len(x), cfg.eval_batch_size, 1)
    out = evaluate_shard(recipe, state, x, y, cfg, shard=0, first_index=a,
                         shard_dir=str(Path(work_dir) / SHARD_DIR.format(a, b)),
                         use_gpu=ray_options.get("gpus_per_shard", 0) > 0)
    wall = time.time() - t0
    report = {"shards": 1, "in_process": True, "batch_size": cfg.eval_batch_size, "wall_s": wall,
              "slowest_shard_s": out["wall_s"], "overhead_s": wall - out["wall_s"], "images_per_s": len(x) / wall,
              "per_shard": [{k: out[k] for k in ("shard", "range", "samples", "wall_s", "device", "host", "threads")}],
              "work_dir": str(work_dir)}
    atomic_write_json(Path(work_dir) / "shards.json", report)
    return {k: torch.tensor(v, dtype=torch.bool) for k, v in out["flags"].items()}, report
