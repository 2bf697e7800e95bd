"""The plan of a sweep whose trials need runs first (``Method.prerequisite_runs``, e.g. AMT's pool members):
its trials as concrete configs, and the distinct runs they need, which Tune runs as a first phase.

To know the runs, the trials' configs must be known up front: the space is expanded here (grid and random
sampling, as Tune's basic variant generator does, seeded by the sweep's first seed) and both phases are
given as lists of points. The plan is kept in ``RESULTS/_prerequisites/plan.json`` so that ``--resume``
continues the same trials. A searcher that proposes trials as it goes (optuna) cannot be planned: a sweep
with such trials and ``search: optuna`` stops with a one-line error before any work.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.files import atomic_write_json
from bench.prerequisites import PREREQUISITES_DIR, prerequisite_runs

PLAN_FILE = "plan.json"
POINT = "point"  # the key of a planned trial's index in its Tune config


def trial_config(spec, point: dict[str, Any]):
    """The resolved config of a planned trial (its method, seed and sampled settings)."""
    from bench.config import resolve_config

    sampled = {k: v for k, v in point.items() if k not in ("method", "seed")}
    return resolve_config(point["method"], spec.overrides(point["method"], int(point["seed"]), sampled))


def needs_runs_first(spec) -> list[str]:
    """The sweep's methods whose trials (with the fixed settings) need runs first."""
    from bench.config import resolve_config
    from methods import get_method

    out = []
    for m in spec.methods:
        cfg = resolve_config(m, spec.overrides(m, spec.seeds[0], {}))
        if get_method(m).prerequisite_runs(cfg):
            out.append(m)
    return out


def check(spec) -> None:
    """A one-line error when the sweep needs a plan its searcher cannot give."""
    methods = needs_runs_first(spec)
    if methods and spec.search != "random":
        raise ValueError(f"{spec.path}: search: {spec.search} proposes trials as it goes, but {', '.join(methods)} "
                         f"trials need runs first (their pool), planned up front: use search: random")


def expand(spec) -> list[dict[str, Any]]:
    """The sweep's trials as concrete points ({method, seed, sampled settings}), in Tune's order."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    from bench.sweep.space import tune_param_space

    rng = np.random.RandomState(spec.seeds[0])
    points = []
    for _ in range(spec.num_samples):
        points.extend(variant for _, variant in generate_variants(tune_param_space(spec), random_state=rng))
    return points


def make_plan(spec, results: Path, resume: bool) -> dict[str, Any] | None:
    """The plan (``{"trials": [...], "runs": {name: {method, seed, config}}}``), None when no trial needs
    runs first. A resumed sweep reads its plan back."""
    check(spec)
    if not needs_runs_first(spec):
        return None
    path = Path(results) / PREREQUISITES_DIR / PLAN_FILE
    if resume and path.exists():
        return json.loads(path.read_text())
    trials = expand(spec)
    runs: dict[str, dict] = {}
    for point in trials:
        for run in prerequisite_runs(trial_config(spec, point)):
            runs.setdefault(run.name, {"method": run.method, "seed": run.config["seed"], "config": run.config})
    plan = {"trials": trials, "runs": runs}
    atomic_write_json(path, plan)
    return plan


def points_space(points: list[dict[str, Any]]) -> dict[str, Any]:
    """A Tune param_space giving exactly ``points``: a grid over their index, each key read from its point."""
    from ray import tune

    space: dict[str, Any] = {POINT: tune.grid_search(list(range(len(points))))}
    for key in sorted({k for p in points for k in p}):
        space[key] = tune.sample_from(lambda config, key=key: points[config[POINT]].get(key))
    return space


def run_points(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 1's points: one per distinct run ({method, seed, prerequisite: name})."""
    return [{"method": r["method"], "seed": r["seed"], "prerequisite": name} for name, r in plan["runs"].items()]
