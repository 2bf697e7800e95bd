"""Per-domain merge search: AMT's λ, β, ρ (``merge_lambda``, ``merge_beta``, ``trim_rho``) chosen per target
domain on validation episodes of that domain, then one test evaluation with the chosen settings.

A sweep file with ``merge_search: true`` makes every ``amt`` trial a merge-only *candidate*: it merges a
trained pool (``pool_dir``, or the pool the trial assembles from the members the sweep's first phase
trained, bench.sweep.phases; members are trained once, so a candidate trains nothing), validates it on each target's validation episodes
(``val_fewshot_acc@<target>``, bench.trial) and writes ``result.json`` with ``"stage": "validation"`` and no
test metrics. After the sweep, :func:`select` picks per target (and per group of candidates that differ only in
the swept settings) the candidate with the best clean validation accuracy (the paper's criterion; PGD
validation accuracy breaks ties, then the trial order), and :func:`test_selected` runs that setting's test
evaluation once, into ``RESULTS/selected/``, with the choice recorded as ``merge_selection`` in its
result.json. The leaderboard lists those test results, one row per (method, target), with the selected
settings; the candidates are not entries.

Candidates only read a trained pool by path, so a pool trained by another sweep phase or another tool works
the same (``fixed: {pool_dir: /path/to/pool}``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

SELECTED_DIR = "selected"
# Settings a merge-only search may sweep: they shape the merge and the test-time deployment, never a
# member's training (fields of role "pool" of the method's config, methods.base.ROLES).
SEARCHABLE = ("pool_size", "pool_eps", "merge_top_k", "merge_lambda", "merge_beta", "trim_rho", "trim_modules",
              "merge_aug_p", "merge_seed", "test_time_ft_steps", "test_time_ft_lr", "test_time_ft_aug_p")
# Config keys that differ between candidates of one group without being searched: each candidate merges its
# own copy of the pool (methods.amt_pool writes one manifest per trial folder).
_PER_TRIAL = ("pool_dir",)


class SelectionError(ValueError):
    """A one-line reason why no setting can be selected for a target."""


def check_space(space_keys, methods) -> str | None:
    """Why a sweep's space cannot be a merge-only search (None when it can)."""
    from methods import get_method
    from methods.base import field_roles

    def pool_fields(m):  # the method's settings that shape only its pool's merge and test (role "pool")
        return {k for k, role in field_roles(get_method(m).Config).items() if role == "pool"}

    pools = [m for m in methods if not set(SEARCHABLE) <= pool_fields(m)]
    if pools:
        return f"methods {', '.join(pools)} have no pool to merge; a merge search runs amt trials only"
    bad = [k for k in space_keys if k not in SEARCHABLE]
    if bad:
        return (f"space.{bad[0]} shapes training, not the merge; a merge-only search may sweep "
                f"{', '.join(SEARCHABLE)}")
    return None


def targets_of(config: dict) -> list[str]:
    return list(config.get("target_datasets") or [config["dataset"]])


def val_key(config: dict, target: str, metric: str = "val_fewshot_acc") -> str:
    """The history key of ``target``'s validation accuracy (bench.trial: suffixed when targets are named)."""
    return f"{metric}@{target}" if config.get("target_datasets") else metric


def load_candidates(results: str | Path, sweep_name: str | None = None) -> list[dict]:
    """The validation-only results (``"stage": "validation"``) of trials directly under ``results``."""
    out = []
    for path in sorted(Path(results).glob("*/result.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("stage") != "validation" or data.get("status") != "ok" or not data.get("history"):
            continue
        if sweep_name is not None and (data.get("sweep") or {}).get("name") != sweep_name:
            continue
        data["_dir"] = str(path.parent)
        out.append(data)
    return out


def select(candidates: list[dict], swept: list[str]) -> list[dict[str, Any]]:
    """Per group of candidates (same config apart from ``swept`` settings) and per target: the candidate with
    the best clean validation accuracy on that target's validation episodes."""
    groups: dict[str, list[dict]] = {}
    for cand in candidates:
        cfg = cand["config"]
        key = json.dumps({k: v for k, v in cfg.items() if k not in swept and k not in _PER_TRIAL},
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(cand)
    selections = []
    for cands in groups.values():
        config = cands[0]["config"]
        for target in targets_of(config):
            key, adv_key = val_key(config, target), val_key(config, target, "val_fewshot_pgd_acc")
            scored = [(c["history"][-1].get(key), c["history"][-1].get(adv_key), i, c) for i, c in enumerate(cands)]
            scored = [s for s in scored if s[0] is not None]
            if not scored:
                raise SelectionError(f"no candidate has {key}: target {target!r} needs a val split with at least "
                                     f"shots + 1 images in `ways` classes for per-domain selection")
            value, adv, _, best = max(scored, key=lambda s: (s[0], s[1] if s[1] is not None else -1.0, -s[2]))
            selections.append({
                "target": target, "metric": key, "value": value, "adv_value": adv, "candidates": len(cands),
                "settings": {k: best["config"].get(k) for k in swept},
                "trial": best.get("id"), "trial_dir": best.get("_dir"), "config": best["config"]})
    return selections


def test_config(selection: dict):
    """The resolved config of a selection's test trial: the candidate's, evaluated on its target only."""
    from bench.config import resolve_config

    config = {k: v for k, v in selection["config"].items() if k != "method"}
    if config.get("target_datasets"):
        config["target_datasets"] = [selection["target"]]
    cfg = resolve_config(selection["config"]["method"], config)
    if selection.get("trial_dir"):  # the pool the candidate assembled in its folder (pool_dir: {run_dir}/.)
        from bench.prerequisites import in_run_dir

        cfg = in_run_dir(cfg, selection["trial_dir"])
    return cfg


def test_selected(selections: list[dict], results: str | Path,
                  run: Callable[[Any, Path], dict]) -> list[dict]:
    """Run each selection's test evaluation (``run(cfg, out_dir) -> result``, e.g. bench.trial.run_trial)
    into ``results/selected/<method>_<target>_<hash>/`` and record the selection in its result.json."""
    from bench.config import config_hash
    from bench.files import atomic_write_json

    out = []
    for sel in selections:
        cfg = test_config(sel)
        out_dir = Path(results) / SELECTED_DIR / f"{cfg.method}_{sel['target']}_{config_hash(cfg)}_s{cfg.seed}"
        result = run(cfg, out_dir)
        record = {k: v for k, v in sel.items() if k != "config"}
        result = {**result, "merge_selection": record}
        atomic_write_json(out_dir / "result.json", result)
        out.append(result)
    return out
