"""AMT pool members as parallel Ray tasks of a sweep's ``amt`` trial.

Tune trials cannot wait on other trials, so a pool's members are not Tune trials of their own: the ``amt``
trial reserves a placement group (an empty head bundle for itself plus one bundle per member it may run at
once, see ``bench.sweep.driver``), trains every member that is not already in the sweep's member cache as a Ray task
in one of those bundles (the members of one pool run in parallel, on any node of the cluster), and once all
of them finished runs the merging trial (test-time merging, validation and test few-shot evaluation) as one
more task there. Each member is an ordinary ``bench run`` of its own (``run_trial``: its own folder,
result.json, checkpoints, W&B run in the sweep's group), so a killed member resumes from its last epoch.

Members that another trial is training (the cache's lock file) are waited for instead of trained twice.
A member that fails lets the running ones finish (they stay cached), then fails the ``amt`` trial, which Tune
retries (``max_failures``): the retry finds the finished members in the cache.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from bench.files import atomic_write, atomic_write_json
from bench.sweep.amt_pool import ADAPTER_FILE, MemberLock, MemberSpec, RunMember, finished_result

def _train_member(run_member: RunMember, overrides: dict, train_dir: str) -> tuple[dict, bytes]:
    """One member's training (a Ray task). The adapter travels back with the result: the pool's node may
    not see ``train_dir`` when the results folder is not on a shared file system."""
    from bench.report.tracking import close_service

    try:
        result = run_member(overrides, Path(train_dir))
    finally:
        close_service()
    return result, (Path(train_dir) / ADAPTER_FILE).read_bytes()


def task_options(cpus: float, gpus: float) -> dict[str, Any]:
    """Ray options of a task that runs in the calling trial's placement group when it has one."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus, "max_retries": 0}
    pg = get_current_placement_group()
    if pg is not None:
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    return opts


def ray_member_runner(cpus: float, gpus: float, poll_s: float = 2.0):
    """A ``bench.sweep.amt_pool`` runner that trains the members as Ray tasks of ``cpus``/``gpus`` each."""

    def runner(specs: Sequence[MemberSpec], run_member: RunMember) -> list[dict]:
        import ray

        task = ray.remote(_train_member).options(**task_options(cpus, gpus))
        results: list[dict | None] = [None] * len(specs)
        waiting = list(range(len(specs)))
        locks: dict[int, MemberLock] = {}
        running: dict[Any, int] = {}
        errors: list[str] = []
        try:
            while (waiting and not errors) or running:
                for i in list(waiting if not errors else []):
                    spec = specs[i]
                    done = finished_result(spec)
                    if done is not None:
                        results[i] = done
                        waiting.remove(i)
                        continue
                    lock = MemberLock(spec)
                    if not lock.acquire(blocking=False):
                        continue  # another trial is training it: look again later
                    done = finished_result(spec)  # it may have finished while we looked
                    if done is not None:
                        lock.release()
                        results[i] = done
                        waiting.remove(i)
                        continue
                    spec.train_dir.mkdir(parents=True, exist_ok=True)
                    locks[i] = lock
                    running[task.remote(run_member, dict(spec.overrides), str(spec.train_dir))] = i
                    waiting.remove(i)
                if not running:
                    time.sleep(poll_s)
                    continue
                ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
                for ref in ready:
                    i = running.pop(ref)
                    spec = specs[i]
                    try:
                        result, adapter = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - reported with the member's name below
                        errors.append(f"pool member {spec.index} (eps {spec.eps:g}/255, {spec.train_dir}): "
                                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}")
                        continue
                    finally:
                        locks.pop(i).release()
                    if not spec.trained_adapter.is_file():  # trained on a node whose disk we do not see
                        atomic_write(spec.trained_adapter, adapter)
                        atomic_write_json(spec.train_dir / "result.json", result)
                    results[i] = result
        finally:
            for lock in locks.values():
                lock.release()
        if errors:
            raise RuntimeError("; ".join(errors))
        return results

    return runner


def _merge_trial(cfg, out_dir: str, kwargs: dict) -> dict:
    from bench.report.tracking import close_service
    from bench.trial import run_trial

    try:
        return run_trial(cfg, out_dir, **kwargs)
    finally:
        close_service()


def run_pool_trial(cfg, out_dir: Path, *, data_root: str, cpus: float, gpus: float, cache: Path,
                   run_id: str, group: str, sweep: dict, evaluate: bool = True) -> dict:
    """An ``amt`` sweep trial: members as parallel tasks (cached), then the merging trial as one task."""
    import ray

    from bench.trial import train_pool

    merge_cfg = train_pool(cfg, out_dir, data_root=data_root, progress=False, group=group, track=True,
                           runner=ray_member_runner(cpus, gpus), cache=cache)
    kwargs = {"data_root": data_root, "progress": False, "run_id": run_id, "group": group, "sweep": sweep,
              "track": True, "evaluate": evaluate}
    task = ray.remote(_merge_trial).options(**task_options(cpus, gpus))
    return ray.get(task.remote(merge_cfg, str(out_dir), kwargs))
