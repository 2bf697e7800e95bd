"""What a sweep does once Tune's run ends: wait for the trials' result files, test a merge search's selected
settings, summarise the trials' status and build the leaderboard."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.files import atomic_write_json
from bench.sweep.trainables import OBJECTIVE

def wait_for_result_files(results: Path, trial_names: list[str], timeout_s: float = 60.0) -> list[str]:
    """Wait until each ``results/<trial>/result.json`` exists and parses; return the trials still missing."""
    deadline = time.monotonic() + timeout_s
    missing = list(trial_names)
    while True:
        still = []
        for name in missing:
            try:
                json.loads((Path(results) / name / "result.json").read_text())
            except (OSError, ValueError):
                still.append(name)
        missing = still
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.5)


def _test_merge_selections(spec, results: Path, ctx: dict) -> None:
    """A merge search's second step: per target, the candidate that validated best is tested once
    (bench.sweep.merge_search), each test a Ray task with one trial's resources."""
    import ray

    from bench.sweep.merge_search import load_candidates, select, test_selected
    selections = select(load_candidates(results, spec.name), sorted(spec.space))
    task = ray.remote(_test_trial).options(num_cpus=spec.cpus, num_gpus=spec.gpus, max_retries=0)
    kwargs = {"data_root": ctx["data_root"], "progress": False, "group": spec.name, "track": True,
              "sweep": {"name": spec.name, "stage": "test of the per-target selection"}}

    def run(cfg, out_dir):
        return ray.get(task.remote(cfg, str(out_dir), kwargs))

    for sel in selections:
        print(f"bench sweep: {spec.name}: {sel['target']}: selected {sel['settings']} "
              f"({sel['metric']} {sel['value']:.4f} of {sel['candidates']} candidates); testing it", flush=True)
    test_selected(selections, results, run)


def _test_trial(cfg, out_dir: str, kwargs: dict) -> dict:
    """A selected setting's test evaluation (a Ray task)."""
    from bench.report.tracking import close_service
    from bench.trial import run_trial

    try:
        return run_trial(cfg, out_dir, **kwargs)
    finally:
        close_service()


def summarize(grid, results: Path, spec, wall_s: float) -> dict[str, Any]:
    """Per-trial status from the result.json files (the source of truth), printed as one block."""
    rows = []
    for r in grid:
        trial_id = Path(r.path).name if r.path else "?"
        status = "error" if r.error else "ok"
        rows.append({"trial": trial_id, "status": status, "error": str(r.error).splitlines()[0] if r.error else None,
                     OBJECTIVE: (r.metrics or {}).get(OBJECTIVE)})
    files = {}
    for path in sorted(results.glob("*/result.json")):
        try:
            files[path.parent.name] = json.loads(path.read_text()).get("status", "ok")
        except (OSError, json.JSONDecodeError):
            files[path.parent.name] = "unreadable"
    n_ok = sum(1 for s in files.values() if s == "ok")
    summary = {"name": spec.name, "results": str(results), "n_trials": len(rows), "n_ok": n_ok,
               "n_error": sum(1 for r in rows if r["status"] == "error"), "wall_s": round(wall_s, 1),
               "trials": rows, "result_files": files}
    atomic_write_json(results / "sweep_summary.json", summary)
    print(f"bench sweep: {spec.name}: {n_ok}/{len(rows)} trials ok, {summary['n_error']} errors, "
          f"{wall_s:.0f} s; results in {results}", flush=True)
    for name, status in files.items():
        if status != "ok":
            print(f"  {name}: {status}")
    return summary


def _leaderboard(results: Path, wandb_log: bool) -> None:
    try:
        from bench.report.leaderboard import build_leaderboard
    except ImportError as e:
        print(f"bench sweep: no leaderboard ({e})")
        return
    build_leaderboard(results, wandb_log=wandb_log, console=True)
    sys.stdout.flush()
