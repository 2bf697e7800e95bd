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

With ``details`` the shards also return what the reliability indicators read (``bench.reliability
.row_reliability``): the test PGD's per-step loss, AutoAttack's robust count after each attack and its
warnings, and the evaluation's sample-forwards. Merged in index order they are one process's (the
accuracies after each attack: counts summed over shards, divided as ``Tensor.mean`` divides), so the caller
computes the row's reliability block with the same code and the same numbers as an unsharded evaluation.
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
from bench.reliability import ForwardCounter

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


class _InProcess:
    """``evaluate_shard`` called where ``.remote`` is, its result put in the object store (a shard that
    cannot run beside its trial)."""

    @staticmethod
    def remote(*args, **kw):
        import ray

        # a task's ObjectRef arguments (the weights) reach it as their values: resolve them as Ray would
        args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args]
        return ray.put(evaluate_shard(*args, **kw))


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
                   use_gpu: bool = False, progress=None, details: bool = False) -> dict[str, Any]:
    """One shard, in whatever process runs it: rebuild the network, then the clean, PGD and AutoAttack
    flags of samples ``[first_index, first_index + len(x))``, resuming from ``shard_dir``. ``details``: also
    return the shard's reliability inputs (``"details"``, see :func:`_merge_details`)."""
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
    passes, extra = _cached_passes(folder / PASSES, model, x, y, cfg, device, first_index)
    flags = dict(passes)
    aa_report: dict = {}
    with ForwardCounter(model) as aa_forwards:
        if cfg.autoattack_version != "off":
            on_batch = (lambda n: progress.add.remote(n)) if progress is not None else None
            flags["autoattack"] = autoattack_flags(model, x, y, eps=cfg.eps, version=cfg.autoattack_version,
                                                   batch_size=bs, device=device, seed=cfg.seed, state_path=aa_path,
                                                   clean=passes["clean"], first_index=first_index,
                                                   on_batch=on_batch, report=aa_report)
    out = {"shard": shard, "range": [first_index, first_index + len(x)], "samples": len(x),
           "flags": {k: v.tolist() for k, v in flags.items()}, "wall_s": time.time() - t0,
           "device": str(device), "host": attempt["host"], "pid": attempt["pid"],
           "threads": torch.get_num_threads()}
    if details:
        # counts, not the shard's accuracies: the merge divides their sum by N as one process's mean does
        counts = {name: round(acc * len(x)) for name, acc in aa_report.get("accuracy", {}).items()}
        out["details"] = {"pgd_loss": extra["pgd_loss"], "forwards": extra["forwards"] + aa_forwards.count,
                          "autoattack_counts": counts, "autoattack_warnings": aa_report.get("warnings", [])}
    return out


def _cached_passes(path: Path, model, x, y, cfg, device, first_index: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The clean and PGD flags of the shard, from ``path`` when an earlier attempt computed them for the
    same weights, samples and settings; and what the reliability indicators read of these passes
    (``pgd_loss``: the PGD's per-step loss ``[n, steps + 1]`` or None, ``forwards``: their sample-forwards)."""
    fingerprint = _fingerprint(model, x, y, device=device, first_index=first_index, eps=cfg.eps,
                               pgd_steps=cfg.eval_pgd_steps, pgd_step=pgd_step(cfg), restarts=cfg.eval_pgd_restarts,
                               batch_size=cfg.eval_batch_size, seed=cfg.seed)
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint and "forwards" in saved:  # else: written before it was kept
            loss = saved.get("pgd_loss")
            return ({k: torch.tensor(v, dtype=torch.bool) for k, v in saved["flags"].items()},
                    {"pgd_loss": torch.tensor(loss) if loss is not None else None, "forwards": saved["forwards"]})
    bs = cfg.eval_batch_size
    trace: list[torch.Tensor] = []
    with ForwardCounter(model) as counter:
        out = {"clean": clean_flags(model, x, y, bs, device)}
        if cfg.eval_pgd_steps > 0:
            out["pgd"] = pgd_flags(model, x, y, eps=cfg.eps, step_size=pgd_step(cfg), steps=cfg.eval_pgd_steps,
                                   restarts=cfg.eval_pgd_restarts, batch_size=bs, device=device, seed=cfg.seed,
                                   clean=out["clean"], first_index=first_index, loss_trace=trace)
    extra = {"pgd_loss": torch.cat(trace) if trace else None, "forwards": counter.count}
    # the loss as float32 values in JSON: a float32 printed by repr reads back to the same float32
    atomic_write_json(path, {"fingerprint": fingerprint, "flags": {k: v.tolist() for k, v in out.items()},
                             "pgd_loss": extra["pgd_loss"].tolist() if trace else None,
                             "forwards": counter.count}, indent=None)
    return out, extra


def _merge_details(ordered: list[dict], n: int) -> tuple[dict[str, Any], int]:
    """The shards' reliability inputs (in index order) as ``bench.evaluate.evaluate_flags`` gives ``details``
    for all ``n`` samples in one process, and the evaluation's sample-forwards (the shards' sum: each shard's
    AutoAttack also probes the class count with one sample)."""
    parts = [r["details"] for r in ordered]
    merged: dict[str, Any] = {}
    if parts[0]["pgd_loss"] is not None:
        merged["pgd_loss"] = torch.cat([p["pgd_loss"] for p in parts])
    if parts[0]["autoattack_counts"]:
        # robust fraction after each attack over all samples, as one process's float32 mean gives it
        accuracy = {name: (torch.tensor(float(sum(p["autoattack_counts"][name] for p in parts))) / n).item()
                    for name in parts[0]["autoattack_counts"]}
        warnings = list(dict.fromkeys(w for p in parts for w in p["autoattack_warnings"]))
        merged["autoattack"] = {"accuracy": accuracy, "warnings": warnings}
    return merged, sum(p["forwards"] for p in parts)


def sharded_flags(recipe, state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, cfg, *,
                  shards: int, work_dir: str | Path, cpus_per_shard: float = 1, gpus_per_shard: float = 0,
                  address: str | None = None, max_retries: int = 3, progress: bool = True,
                  threads_per_shard: int | None = None, details: dict | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-sample flags of the clean, PGD and AutoAttack passes ``cfg`` asks for (as
    ``bench.evaluate.evaluate_flags``), computed by ``shards`` Ray tasks; and a report of the shards (ranges,
    attempts, wall time each, the driver's wall time and overhead).

    Ray: the running session if there is one (inside a Tune trial), else ``ray.init(address)`` (None: a
    local one). ``threads_per_shard``: torch threads in each shard (default: ``cpus_per_shard`` rounded up).
    ``details``, a dict, receives the reliability inputs one process's ``evaluate_flags`` would give
    (``pgd_loss``, ``autoattack``); the report then has ``eval_forwards``."""
    import ray

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
    strategy, no_room = _outside_the_trial(cpus_per_shard, gpus_per_shard)
    if no_room:  # the same shards, one after the other in this process: the flags do not change
        print(f"evaluation shards run in the trial's process: {no_room}")
        task = _InProcess
    else:
        task = ray.remote(evaluate_shard).options(num_cpus=cpus_per_shard, num_gpus=gpus_per_shard,
                                                  max_retries=max_retries, retry_exceptions=False,
                                                  scheduling_strategy=strategy)
    refs = [task.remote(recipe, state_ref, x[a:b].clone(), y[a:b].clone(), cfg, shard=k, first_index=a,
                        shard_dir=str(work_dir / SHARD_DIR.format(a, b)), threads=threads, use_gpu=gpus_per_shard > 0,
                        progress=counter, details=details is not None)
            for k, (a, b) in enumerate(ranges)]
    ordered = wait_for_shards(refs, counter, desc=f"evaluation in {len(refs)} shards", progress=progress,
                              counts=("autoattack_batches", "attacked"))
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
    if details is not None:
        merged, report["eval_forwards"] = _merge_details(ordered, len(x))
        details.update(merged)
    atomic_write_json(work_dir / "shards.json", report)
    return flags, report


def wait_for_shards(refs: list, counter, *, desc: str, progress: bool, counts: tuple[str, str]) -> list[dict]:
    """The shard tasks' outputs in shard order, with a bar of finished shards whose postfix shows the
    ``_Progress`` actor's two counts (named ``counts``); the actor is killed at the end."""
    import ray
    from tqdm.auto import tqdm

    results: dict[int, dict] = {}
    bar = tqdm(total=len(refs), desc=desc, unit="shard", disable=not progress)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        for ref in done:
            out = ray.get(ref)
            results[out["shard"]] = out
            bar.update(1)
        bar.set_postfix(dict(zip(counts, ray.get(counter.read.remote()))))
    bar.close()
    ray.kill(counter)
    return [results[k] for k in range(len(refs))]


def _outside_the_trial(cpus_per_shard: float, gpus_per_shard: float) -> tuple[str | None, str | None]:
    """Where the shard tasks go: (Ray scheduling strategy, None), or (None, why) when no shard can ever run
    beside this process. Inside a Tune trial (a placement group) Ray puts the trial's tasks in the trial's
    own bundle by default, whose CPUs the trial's actor holds while it waits for them: the shards could never
    start (on a 2-CPU local Ray, Tune fails the trial with "No trial resources are available for launching
    the task"; an actor in a bare placement group waits forever). So they leave the trial's group
    ("DEFAULT") and take the cluster's free CPUs and GPUs, as a shard of ``bench evaluate`` does. A cluster
    without a shard's CPUs or GPUs beside the trial's bundle at all would hang too: the caller then runs the
    shards in its own process."""
    import ray
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None:
        return None, None  # Ray's default: outside any group
    held = {"CPU": 0.0, "GPU": 0.0}
    for bundle in pg.bundle_specs:
        for key in held:
            held[key] += bundle.get(key, 0)
    total = ray.cluster_resources()
    for key, need in (("CPU", cpus_per_shard), ("GPU", gpus_per_shard)):
        if need > 0 and total.get(key, 0) - held[key] < need - 1e-9:
            return None, (f"a shard needs {need:g} {key} beside this trial's {held[key]:g} and the cluster has "
                          f"{total.get(key, 0):g}")
    return "DEFAULT", None


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
    details = ray_options.get("details")
    out = evaluate_shard(recipe, state, x, y, cfg, shard=0, first_index=a,
                         shard_dir=str(Path(work_dir) / SHARD_DIR.format(a, b)),
                         use_gpu=ray_options.get("gpus_per_shard", 0) > 0, details=details is not None)
    wall = time.time() - t0
    report = {"shards": 1, "in_process": True, "batch_size": cfg.eval_batch_size, "wall_s": wall,
              "slowest_shard_s": out["wall_s"], "overhead_s": wall - out["wall_s"], "images_per_s": len(x) / wall,
              "per_shard": [{k: out[k] for k in ("shard", "range", "samples", "wall_s", "device", "host", "threads")}],
              "work_dir": str(work_dir)}
    if details is not None:
        merged, report["eval_forwards"] = _merge_details([out], len(x))
        details.update(merged)
    atomic_write_json(Path(work_dir) / "shards.json", report)
    return {k: torch.tensor(v, dtype=torch.bool) for k, v in out["flags"].items()}, report
