"""Leaderboard statistics on a pandas frame of trials: seeds of one configuration grouped into a row (mean ±
sample std, n), rows ranked within their comparison group, Welch's t-test against the group's baseline,
Pareto front of clean vs robust accuracy."""
from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from bench.config import config_hash
from bench.report.results import (expand_targets, get, group_label, num, record_attack, record_kind, record_reliability,
                                  record_robust, record_robust_ci95, record_task, record_threat, selected_settings)

BASELINES = {"supervised": "rft", "fewshot": "pmf"}
ALPHA = 0.05

# One row per configuration: these columns of a trial together say which configuration it is.
ROW_KEY = ["dataset", "task", "threat", "method", "backbone", "kind", "group_hash", "source_dataset"]
# accuracies averaged over seeds with their sample std: frame column -> place in result.json
MEAN_STD = {"clean_acc": ("metrics", "clean_acc"), "pgd_acc": ("metrics", "pgd_acc"),
            "autoattack_acc": ("metrics", "autoattack_acc"), "fs_clean_acc": ("fewshot", "clean_acc"),
            "fs_adv_acc": ("fewshot", "adv_acc"), "fs_autoattack_acc": ("fewshot", "autoattack_acc")}
# numbers averaged without a std
MEAN_ONLY = {"fs_clean_ci95": ("fewshot", "clean_ci95"), "fs_adv_ci95": ("fewshot", "adv_ci95"),
             "fs_autoattack_ci95": ("fewshot", "autoattack_ci95"), "wall_s": ("cost", "wall_s"),
             "images_per_s": ("cost", "images_per_s")}
# settings the seeds share (several distinct values are shown joined by "/")
COMMON = {"pgd_steps": ("metrics", "pgd_steps"), "eps": ("metrics", "eps"),
          "autoattack_version": ("metrics", "autoattack_version"), "n_eval": ("metrics", "n_eval"),
          "fs_ways": ("fewshot", "ways"), "fs_shots": ("fewshot", "shots"), "fs_episodes": ("fewshot", "episodes"),
          "device": ("cost", "device"), "sweep": ("sweep", "name")}


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One frame row per trial (cross-domain few-shot targets expanded), with its row key and numbers."""
    rows = []
    for rec in expand_targets(records):  # group_hash: the config without seed, speed switches, bookkeeping
        kind = record_kind(rec)
        cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
        row: dict[str, Any] = {
            "dataset": rec["dataset"], "task": record_task(rec, kind), "threat": record_threat(rec),
            "method": rec["method"], "backbone": str(rec.get("backbone") or ""), "kind": kind,
            "group_hash": config_hash(cfg), "source_dataset": str(rec.get("source_dataset") or "")}
        row.update({col: num(get(rec, *where)) for col, where in {**MEAN_STD, **MEAN_ONLY}.items()})
        row.update({col: get(rec, *where) for col, where in COMMON.items()})
        row["robust_acc"], row["robust_metric"] = record_robust(rec), record_attack(rec) or ""
        row["fs_robust_ci95"] = record_robust_ci95(rec)
        row["selected"] = selected_settings(rec)
        row["_reliability"] = record_reliability(rec)
        row["seed"] = rec.get("seed") if rec.get("seed") is not None else cfg.get("seed")
        row["trial_config_hash"] = rec.get("config_hash")
        row["id"] = rec.get("id", "")
        row["path"] = rec["_path"]
        rows.append(row)
    frame = pd.DataFrame(rows, dtype=object)
    numbers = [*MEAN_STD, *MEAN_ONLY, "robust_acc", "fs_robust_ci95"]
    if not frame.empty:
        frame[numbers] = frame[numbers].astype(float)
    return frame


def _common(values: pd.Series) -> Any:
    """The value the seeds share, or their distinct values joined by "/"."""
    vals = [v for v in values if v is not None and v != ""]
    uniq = list(dict.fromkeys(json.dumps(v, sort_keys=True, default=str) for v in vals))
    if not uniq:
        return None
    if len(uniq) == 1:
        return vals[0]
    return "/".join(str(json.loads(u)) for u in uniq)


def _plain(v: Any) -> Any:
    """NaN -> None, numpy scalars -> Python numbers (rows go to JSON, W&B and csv)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def group_records(records: list[dict]) -> list[dict]:
    """Aggregate records into rows (one per configuration across seeds), without rank/significance."""
    frame = records_frame(records)
    if frame.empty:
        return []
    spec: dict[str, tuple] = {}
    for col in [*MEAN_STD, "robust_acc"]:
        spec[col], spec[col + "_std"] = (col, "mean"), (col, "std")  # std: ddof=1, NaN for one seed
    spec.update({col: (col, "mean") for col in [*MEAN_ONLY, "fs_robust_ci95"]})
    spec.update(n=("path", "size"), paths=("path", list), _robust_samples=("robust_acc", lambda s: s.dropna().tolist()),
                seeds=("seed", lambda s: ",".join(str(v) for v in s if v is not None)),
                trial_config_hashes=("trial_config_hash", lambda s: ",".join(str(v or "") for v in s)),
                _trial_hashes=("trial_config_hash", lambda s: sorted({str(v) for v in s if v})),
                ids=("id", lambda s: ",".join(str(v) for v in s)),
                _reliability=("_reliability", list))
    by_row = frame.groupby(ROW_KEY, sort=False, dropna=False)
    table = by_row.agg(**spec).reset_index()
    # shared settings outside agg: its result would turn whole numbers into floats (10 -> 10.0) beside a None
    for col in [*COMMON, "selected", "robust_metric"]:
        table[col] = pd.Series([_common(part[col]) for _, part in by_row], dtype=object)
    rows = []
    for rec in table.to_dict("records"):
        row = {k: _plain(v) for k, v in rec.items()}
        group = (row["dataset"], row["task"], row["threat"])
        row.update(group=group_label(group), _group=group, source_dataset=row["source_dataset"] or None)
        ways, shots, episodes = row.pop("fs_ways"), row.pop("fs_shots"), row.pop("fs_episodes")
        row["fs_setting"] = f"{ways}-way {shots}-shot ×{episodes}" if ways is not None else None
        if row["kind"] == "fewshot":
            row["clean_acc"], row["clean_acc_std"] = row["fs_clean_acc"], row["fs_clean_acc_std"]
        # result.json's config_hash (bench.config.config_hash at run time) where the seeds agree on one
        row.update(reliability_fields(row.pop("_reliability")))
        hashes = row.pop("_trial_hashes")
        row["config_hash"] = hashes[0] if len(hashes) == 1 else row["group_hash"]
        rows.append(row)
    return rows


def reliability_fields(per_seed: list[tuple[str | None, list[str]]]) -> dict:
    """A row's reliability over its seeds: ``reliability`` "ok" (every measured seed ok), "suspect" (any seed
    suspect) or None (no seed measured); ``reliability_fired``: the indicators that fired in any seed, in
    first-seen order (";"-joined); ``reliability_suspect_seeds``: "k/n" of the measured seeds."""
    measured = [(v, fired) for v, fired in per_seed if v is not None]
    if not measured:
        return {"reliability": None, "reliability_fired": None, "reliability_suspect_seeds": None}
    suspect = [fired for v, fired in measured if v == "suspect"]
    fired = list(dict.fromkeys(name for names in suspect for name in names))
    return {"reliability": "suspect" if suspect else "ok", "reliability_fired": ";".join(fired) or None,
            "reliability_suspect_seeds": f"{len(suspect)}/{len(measured)}"}


def welch(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """Welch's t-test (t, p) of a vs b, or (None, None) when either side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None, None
    import warnings

    from scipy import stats
    with warnings.catch_warnings():  # seeds that agree to the last digit: scipy warns of precision loss, and the
        warnings.simplefilter("ignore", RuntimeWarning)  # p-value below then says what it can (None if nothing)
        res = stats.ttest_ind(a, b, equal_var=False)
    t, p = float(res.statistic), float(res.pvalue)
    if not math.isfinite(p):  # zero variance on both sides
        return (t if math.isfinite(t) else None), None
    return t, p


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (clean, robust) point: True when no other point is >= on both and > on one."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y and (x2 > x or y2 > y)) for j, (x2, y2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def _vs_baseline(r: dict, group_rows: list[dict]) -> None:
    """Set ``vs_baseline``, ``t_stat`` and ``p_value`` of row ``r`` against the best-ranked baseline row."""
    base_name = BASELINES[r["kind"]]
    r["t_stat"], r["p_value"] = None, None
    if r["method"] == base_name:
        r["vs_baseline"] = "baseline"
        return
    bases = [b for b in group_rows if b["method"] == base_name and b["kind"] == r["kind"]]
    if not bases:
        r["vs_baseline"] = f"no {base_name}"
        return
    base = bases[0]
    a, b = r["_robust_samples"], base["_robust_samples"]
    if len(a) < 2 or len(b) < 2:
        r["vs_baseline"] = "n<2"
        return
    r["t_stat"], r["p_value"] = t, p = welch(a, b)
    if p is not None and p < ALPHA:
        r["vs_baseline"] = "better" if r["robust_acc"] > base["robust_acc"] else "worse"
    else:
        r["vs_baseline"] = "n.s."


def finish_rows(rows: list[dict]) -> list[dict]:
    """Rank within each comparison group, significance vs the group's baseline, Pareto membership within the
    group; sorted by group (data set, task, threat), then rank (robust, then clean accuracy, then method)."""
    if not rows:
        return []
    order = pd.DataFrame({"dataset": [r["dataset"] for r in rows], "task": [r["task"] for r in rows],
                          "threat": [r["threat"] for r in rows], "method": [r["method"] for r in rows],
                          # a missing accuracy ranks below every measured one
                          "robust": [r["robust_acc"] if r["robust_acc"] is not None else -1.0 for r in rows],
                          "clean": [r["clean_acc"] if r["clean_acc"] is not None else -1.0 for r in rows]})
    order = order.sort_values(["dataset", "task", "threat", "robust", "clean", "method"],
                              ascending=[True, True, True, False, False, True], kind="stable")
    order["rank"] = order.groupby(["dataset", "task", "threat"], sort=False).cumcount() + 1
    out = []
    for _, part in order.groupby(["dataset", "task", "threat"], sort=False):  # groups in sorted order
        rs = [rows[i] for i in part.index]
        for r, rank in zip(rs, part["rank"]):
            r["rank"] = int(rank)
        for r in rs:
            _vs_baseline(r, rs)
        pts = [(r["clean_acc"], r["robust_acc"]) for r in rs]
        ok = [i for i, (x, y) in enumerate(pts) if x is not None and y is not None]
        for r in rs:
            r["pareto"] = ""
        for i, on_front in zip(ok, pareto_front([pts[i] for i in ok])):
            rs[i]["pareto"] = "yes" if on_front else ""
        out.extend(rs)
    return out
