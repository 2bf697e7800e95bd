"""Local leaderboard (md, csv, html, png) and W&B leaderboard run / report from a folder of result.json files.

``python -m bench leaderboard RESULTS_DIR [--out DIR] [--wandb] [--wandb-report]``

Rows follow RobustBench's entry fields. Several seeds of one configuration (same method, dataset, backbone and
resolved config apart from the seed) make one row with mean ± sample std (ddof=1) and n.

Like with like: rows are ranked only within a comparison group -- the same data set (for cross-domain few-shot
results, the target data set), the same task (supervised, or few-shot ways and shots) and the same threat model
and eps. Each group gets its own table (md, html, console) and its own Pareto panel. Within a group each row
is compared with the group's baseline (``rft`` for supervised groups, ``pmf`` for few-shot groups) by Welch's
t-test on the per-seed robust accuracies; "better" means p < 0.05 and a higher mean, and the test is only run
when both sides have n >= 2.

The headline "robust" accuracy of a row is AutoAttack when every seed has it, else PGD; for few-shot rows it is
the episodic adversarial accuracy (and "clean" the episodic clean accuracy).
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import html
import json
import math
import os
import sys
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

BASELINES = {"supervised": "rft", "fewshot": "pmf"}
ALPHA = 0.05
# config keys that differ between seeds/trials of one configuration without changing it
_NON_CONFIG_KEYS = {"seed", "out", "out_dir", "output_dir", "results_dir", "run_id", "trial_id", "trial_name",
                    "name", "wandb", "wandb_group", "wandb_project", "sweep", "sweep_name", "resume",
                    # speed switches (bench.config.NON_SEMANTIC): they do not change a result
                    "num_workers", "eval_batch_size", "channels_last", "compile"}

# (key, header, kind) -- kind: "acc" (mean±std fraction), "num", "str"
COLUMNS = [
    ("rank", "rank", "num"),
    ("group", "group", "str"),
    ("dataset", "dataset", "str"),
    ("method", "method", "str"),
    ("backbone", "backbone", "str"),
    ("clean_acc", "clean", "acc"),
    ("robust_acc", "robust", "acc"),
    ("robust_metric", "robust metric", "str"),
    ("pgd_acc", "PGD", "acc"),
    ("pgd_steps", "PGD steps", "num"),
    ("eps", "eps", "num"),
    ("autoattack_acc", "AutoAttack", "acc"),
    ("autoattack_version", "AA version", "str"),
    ("n_eval", "n_eval", "num"),
    ("fs_setting", "few-shot", "str"),
    ("fs_clean_acc", "FS clean", "acc"),
    ("fs_clean_ci95", "FS clean ±ci95", "num"),
    ("fs_adv_acc", "FS adv", "acc"),
    ("fs_adv_ci95", "FS adv ±ci95", "num"),
    ("fs_autoattack_acc", "FS AutoAttack", "acc"),
    ("wall_s", "wall s", "num"),
    ("images_per_s", "images/s", "num"),
    ("device", "device", "str"),
    ("n", "n", "num"),
    ("seeds", "seeds", "str"),
    ("selected", "selected settings", "str"),
    ("vs_baseline", "vs baseline", "str"),
    ("p_value", "p", "num"),
    ("pareto", "Pareto", "str"),
    ("config_hash", "config hash", "str"),
]


# ----------------------------------------------------------------------------------------------- loading
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    return None


def config_hash_without_seed(config: dict) -> str:
    """Hash of the resolved config without the seed (and run bookkeeping keys): the seed-grouping key."""
    clean = {k: v for k, v in (config or {}).items() if k not in _NON_CONFIG_KEYS}
    blob = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


# A sweep's AMT member cache (bench.sweep.MEMBERS_DIR): members are parts of AMT trials, not entries.
_MEMBER_CACHE = "_members"
# Folders whose copies of trial files are not entries: W&B's runs and Tune's storage (checkpoints of trials
# that also have their own folder, bench.sweep.driver).
_NOT_ENTRIES = ("wandb", "_tune")


def _in_ignored_folder(path: Path, results_dir: Path) -> bool:
    return any(part in _NOT_ENTRIES for part in path.relative_to(results_dir).parts[:-1])


def _is_pool_member(path: Path, results_dir: Path) -> bool:
    """True for files under ``<amt trial>/members/`` (bench.sweep.amt_pool), the trial folder holding pool.json,
    and under a sweep's member cache."""
    parts = path.relative_to(results_dir).parts
    if _MEMBER_CACHE in parts[:-1]:
        return True
    for i, part in enumerate(parts[:-1]):
        if part == "members":
            trial = results_dir.joinpath(*parts[:i])
            if (trial / "pool.json").exists() or (trial / "args.yaml").exists():
                return True
    return False


def load_results(results_dir: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """All valid result.json under ``results_dir`` (recursive) and the problems found, as (path, reason).

    A trial folder that holds trial outputs (metrics.jsonl / params.json) but no result.json is reported as
    missing. Results with ``"status": "error"`` are reported and skipped.
    """
    results_dir = Path(results_dir)
    records: list[dict] = []
    problems: list[tuple[str, str]] = []
    if not results_dir.exists():
        return records, [(str(results_dir), "results folder does not exist")]
    found_dirs = set()
    for path in sorted(results_dir.rglob("result.json")):
        if _in_ignored_folder(path, results_dir):
            continue
        if _is_pool_member(path, results_dir):  # AMT pool members are parts of one AMT trial, not entries
            found_dirs.add(path.parent)
            continue
        found_dirs.add(path.parent)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append((str(path), f"unreadable or not JSON: {exc}"))
            continue
        if not isinstance(data, dict):
            problems.append((str(path), "not a JSON object"))
            continue
        if data.get("status", "ok") not in ("ok", None):
            problems.append((str(path), f"trial status {data.get('status')!r}: {str(data.get('error', ''))[:200]}"))
            continue
        missing = [k for k in ("method", "dataset") if not isinstance(data.get(k), str) or not data.get(k)]
        if missing:
            problems.append((str(path), f"missing field(s) {', '.join(missing)}"))
            continue
        if data.get("stage") == "validation":  # a candidate without test (merge search): not an entry
            continue
        metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
        fewshot = data.get("fewshot") if isinstance(data.get("fewshot"), dict) else {}
        if _num(metrics.get("clean_acc")) is None and _num(fewshot.get("clean_acc")) is None:
            problems.append((str(path), "no clean accuracy in metrics or fewshot"))
            continue
        data["_path"] = str(path)
        records.append(data)
    for marker in ("args.yaml", "metrics.jsonl"):  # files a trial (bench.trial) writes into its folder
        for m in sorted(results_dir.rglob(marker)):
            d = m.parent
            if _in_ignored_folder(m, results_dir) or d in found_dirs or _is_pool_member(m, results_dir):
                continue
            found_dirs.add(d)
            problems.append((str(d / "result.json"), "missing (trial folder without result.json: unfinished or killed)"))
    return records, problems


def expand_targets(records: list[dict]) -> list[dict]:
    """One record per (trial, target data set) for cross-domain few-shot results.

    ``fewshot_targets`` in result.json holds one few-shot block per target data set, as a mapping
    ``{target: block}`` or a list of blocks naming theirs (``dataset`` or ``target``). Each becomes a record whose
    data set is the target (what its accuracy was measured on) and whose ``fewshot`` is that block; the
    source data set is kept as ``source_dataset``. The trial's own row stays as it is.
    """
    out: list[dict] = []
    for rec in records:
        targets = rec.get("fewshot_targets")
        # bench.trial's cross-domain result: ``fewshot`` is its first target's block, not a source row
        if not (isinstance(targets, dict) and rec["dataset"] not in targets
                and any(rec.get("fewshot") == b for b in targets.values())):
            out.append(rec)
        if isinstance(targets, dict):
            items = [(str(k), v) for k, v in targets.items()]
        elif isinstance(targets, list):
            items = [(str(b.get("dataset") or b.get("target") or ""), b) for b in targets if isinstance(b, dict)]
        else:
            continue
        for target, block in items:
            if not target or not isinstance(block, dict) or _num(block.get("clean_acc")) is None:
                continue
            if target == rec["dataset"] and isinstance(rec.get("fewshot"), dict):
                continue  # the in-domain block is the trial's own row already
            target_rec = {k: v for k, v in rec.items() if k not in ("metrics", "fewshot", "fewshot_targets")}
            target_rec.update(dataset=target, source_dataset=rec["dataset"], fewshot=block)
            out.append(target_rec)
    return out


def _selected_settings(rec: dict) -> str | None:
    """The settings a per-domain search selected for this result (bench.sweep.merge_search), as text."""
    sel = rec.get("merge_selection")
    if not isinstance(sel, dict) or not isinstance(sel.get("settings"), dict):
        return None
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sel["settings"].items())


# ----------------------------------------------------------------------------------------------- rows
def _kind(rec: dict) -> str:
    return "fewshot" if _num(_get(rec, "fewshot", "adv_acc")) is not None or (
        _num(_get(rec, "fewshot", "clean_acc")) is not None and _num(_get(rec, "metrics", "clean_acc")) is None
    ) else "supervised"


def _stats(values: list) -> tuple[float | None, float | None, list[float]]:
    vals = [v for v in (_num(x) for x in values) if v is not None]
    if not vals:
        return None, None, []
    mean = sum(vals) / len(vals)
    std = None
    if len(vals) >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return mean, std, vals


def _common(values: list) -> Any:
    vals = [v for v in values if v is not None and v != ""]
    uniq = list(OrderedDict.fromkeys(json.dumps(v, sort_keys=True, default=str) for v in vals))
    if not uniq:
        return None
    if len(uniq) == 1:
        return vals[0]
    return "/".join(str(json.loads(u)) for u in uniq)


def _robust_values(recs: list[dict], kind: str) -> tuple[list, str]:
    if kind == "fewshot":
        return [_get(r, "fewshot", "adv_acc") for r in recs], "few-shot adv"
    aa = [_get(r, "metrics", "autoattack_acc") for r in recs]
    if all(_num(v) is not None for v in aa):
        return aa, "AutoAttack"
    pgd = [_get(r, "metrics", "pgd_acc") for r in recs]
    if any(_num(v) is not None for v in pgd):
        return pgd, "PGD"
    return [None] * len(recs), ""


def _task(rec: dict, kind: str) -> str:
    """"supervised", or the few-shot setting ("5-way 1-shot")."""
    if kind != "fewshot":
        return "supervised"
    ways, shots = _get(rec, "fewshot", "ways"), _get(rec, "fewshot", "shots")
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    ways = ways if ways is not None else cfg.get("ways")
    shots = shots if shots is not None else cfg.get("shots")
    return f"{ways if ways is not None else '?'}-way {shots if shots is not None else '?'}-shot"


def _eps(rec: dict) -> float | None:
    for block in ("metrics", "fewshot", "config"):
        v = _num(_get(rec, block, "eps"))
        if v is not None:
            return v
    return None


def _threat(rec: dict) -> str:
    """The threat model of the robust numbers: norm and eps (every attack in the suite is L-inf)."""
    eps = _eps(rec)
    norm = str(_get(rec, "config", "norm") or "Linf")
    return f"{norm} eps {_fmt_eps(eps) if eps is not None else '?'}"


def comparison_group(rec: dict) -> tuple[str, str, str]:
    """(data set, task, threat model): rows are ranked and compared only within one such group."""
    return rec["dataset"], _task(rec, _kind(rec)), _threat(rec)


def group_label(group: tuple[str, str, str]) -> str:
    return " · ".join(group)


def group_records(records: list[dict]) -> list[dict]:
    """Aggregate records into rows (one per configuration across seeds), without rank/significance."""
    groups: dict[tuple, list[dict]] = OrderedDict()
    for rec in expand_targets(records):
        cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
        key = (comparison_group(rec), rec["method"], str(rec.get("backbone") or ""), _kind(rec),
               config_hash_without_seed(cfg), str(rec.get("source_dataset") or ""))
        groups.setdefault(key, []).append(rec)
    rows = []
    for (group, method, backbone, kind, ghash, source), recs in groups.items():
        dataset, task, threat = group
        row: dict[str, Any] = {"dataset": dataset, "method": method, "backbone": backbone, "kind": kind,
                               "group_hash": ghash, "task": task, "threat": threat, "group": group_label(group),
                               "_group": group, "source_dataset": source or None}
        for name in ("clean_acc", "pgd_acc", "autoattack_acc"):
            m, s, _ = _stats([_get(r, "metrics", name) for r in recs])
            row[name], row[name + "_std"] = m, s
        for name in ("pgd_steps", "eps", "autoattack_version", "n_eval"):
            row[name] = _common([_get(r, "metrics", name) for r in recs])
        for name in ("clean_acc", "adv_acc", "autoattack_acc"):
            m, s, _ = _stats([_get(r, "fewshot", name) for r in recs])
            row["fs_" + name], row["fs_" + name + "_std"] = m, s
            row["fs_" + name.replace("_acc", "") + "_ci95"] = _stats(
                [_get(r, "fewshot", name.replace("_acc", "_ci95")) for r in recs])[0]
        ways, shots, eps_ = (_common([_get(r, "fewshot", k) for r in recs]) for k in ("ways", "shots", "episodes"))
        row["fs_setting"] = f"{ways}-way {shots}-shot ×{eps_}" if ways is not None else None
        if kind == "fewshot":
            row["clean_acc"], row["clean_acc_std"] = row["fs_clean_acc"], row["fs_clean_acc_std"]
        rvals, rname = _robust_values(recs, kind)
        row["robust_acc"], row["robust_acc_std"], row["_robust_samples"] = _stats(rvals)
        row["robust_metric"] = rname
        row["wall_s"] = _stats([_get(r, "cost", "wall_s") for r in recs])[0]
        row["images_per_s"] = _stats([_get(r, "cost", "images_per_s") for r in recs])[0]
        row["device"] = _common([_get(r, "cost", "device") for r in recs])
        row["selected"] = _common([_selected_settings(r) for r in recs])
        row["n"] = len(recs)
        seeds = [r.get("seed") if r.get("seed") is not None else _get(r, "config", "seed") for r in recs]
        row["seeds"] = ",".join(str(s) for s in seeds if s is not None)
        trial_hashes = {str(r.get("config_hash")) for r in recs if r.get("config_hash")}
        # result.json's config_hash leaves the seed out already; else the hash of the config without the seed
        row["config_hash"] = trial_hashes.pop() if len(trial_hashes) == 1 else ghash
        row["trial_config_hashes"] = ",".join(str(r.get("config_hash", "")) for r in recs)
        sweeps = _common([_get(r, "sweep", "name") for r in recs])
        row["sweep"] = sweeps
        row["ids"] = ",".join(str(r.get("id", "")) for r in recs)
        row["paths"] = [r["_path"] for r in recs]
        rows.append(row)
    return rows


def welch(a: list[float], b: list[float]) -> tuple[float | None, float | None]:
    """Welch's t-test (t, p) of a vs b, or (None, None) when either side has fewer than 2 values."""
    if len(a) < 2 or len(b) < 2:
        return None, None
    from scipy import stats
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


def finish_rows(rows: list[dict]) -> list[dict]:
    """Rank within each comparison group, significance vs the group's baseline, Pareto membership within the
    group; sorted by group (data set, task, threat), then rank."""
    by_group: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by_group[r["_group"]].append(r)
    out = []
    for group in sorted(by_group):
        rs = by_group[group]
        rs.sort(key=lambda r: (-(r["robust_acc"] if r["robust_acc"] is not None else -1.0),
                               -(r["clean_acc"] if r["clean_acc"] is not None else -1.0), r["method"]))
        for i, r in enumerate(rs, 1):
            r["rank"] = i
        # baseline per kind: the baseline method's best-ranked row in this group
        for r in rs:
            base_name = BASELINES[r["kind"]]
            bases = [b for b in rs if b["method"] == base_name and b["kind"] == r["kind"]]
            r["t_stat"], r["p_value"] = None, None
            if r["method"] == base_name:
                r["vs_baseline"] = "baseline"
                continue
            if not bases:
                r["vs_baseline"] = f"no {base_name}"
                continue
            base = bases[0]
            a, b = r["_robust_samples"], base["_robust_samples"]
            if len(a) < 2 or len(b) < 2:
                r["vs_baseline"] = "n<2"
                continue
            t, p = welch(a, b)
            r["t_stat"], r["p_value"] = t, p
            if p is None:
                r["vs_baseline"] = "n.s."
            elif p < ALPHA:
                r["vs_baseline"] = "better" if r["robust_acc"] > base["robust_acc"] else "worse"
            else:
                r["vs_baseline"] = "n.s."
        pts = [(r["clean_acc"], r["robust_acc"]) for r in rs]
        ok = [i for i, (x, y) in enumerate(pts) if x is not None and y is not None]
        front = pareto_front([pts[i] for i in ok])
        for r in rs:
            r["pareto"] = ""
        for i, f in zip(ok, front):
            rs[i]["pareto"] = "yes" if f else ""
        out.extend(rs)
    return out


# ----------------------------------------------------------------------------------------------- formatting
def _fmt_acc(mean: Any, std: Any, pct: bool = True) -> str:
    if mean is None:
        return "–"
    s = f"{100 * mean:.2f}" if pct else f"{mean:.4f}"
    if std is not None:
        s += f" ± {100 * std:.2f}" if pct else f" ± {std:.4f}"
    return s


def _fmt_num(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if v != 0 and abs(v) < 0.01:
            return f"{v:.2g}"
        return f"{v:.4g}"
    return str(v)


def _fmt_eps(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1:
        k = v * 255
        for denom in (1, 2, 4):  # 8/255, 0.5/255, 0.25/255
            if abs(k * denom - round(k * denom)) < 1e-4 * denom:
                return f"{round(k)}/255" if denom == 1 else f"{round(k * denom) / denom:g}/255"
    return _fmt_num(v)


def row_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The finished rows split by comparison group, in order: (label, rows)."""
    out: dict[str, list[dict]] = OrderedDict()
    for r in rows:
        out.setdefault(r["group"], []).append(r)
    return list(out.items())


def _cell(row: dict, key: str, kind: str) -> str:
    if key == "eps":
        return _fmt_eps(row.get(key))
    if kind == "acc":
        return _fmt_acc(row.get(key), row.get(key + "_std"))
    if key in ("fs_clean_ci95", "fs_adv_ci95") and row.get(key) is not None:
        return f"{100 * row[key]:.2f}"
    if key == "p_value" and row.get(key) is not None:
        return f"{row[key]:.3g}"
    return _fmt_num(row.get(key))


def _visible_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Drop columns that are empty in every row (e.g. few-shot columns for a supervised-only board)."""
    keep = []
    for key, head, kind in COLUMNS:
        if key in ("rank", "dataset", "method", "clean_acc", "robust_acc", "n", "vs_baseline") or any(
                r.get(key) not in (None, "") for r in rows):
            keep.append((key, head, kind))
    return keep


CSV_FIELDS = ["group", "rank", "dataset", "task", "threat", "source_dataset", "method", "backbone", "kind",
              "clean_acc", "clean_acc_std", "robust_acc",
              "robust_acc_std", "robust_metric", "pgd_acc", "pgd_acc_std", "pgd_steps", "eps", "autoattack_acc",
              "autoattack_acc_std", "autoattack_version", "n_eval", "fs_setting", "fs_clean_acc",
              "fs_clean_acc_std", "fs_clean_ci95", "fs_adv_acc", "fs_adv_acc_std", "fs_adv_ci95", "wall_s",
              "images_per_s", "device", "n", "seeds", "vs_baseline", "t_stat", "p_value", "pareto", "config_hash",
              "trial_config_hashes", "sweep", "ids"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


def write_md(rows: list[dict], path: Path, problems: list[tuple[str, str]], images: list[str]) -> None:
    lines = ["# Leaderboard", "",
             "One table per comparison group (data set · task · threat model and eps): rows are ranked and "
             "compared only within their group. "
             "Accuracies in %, mean ± sample std over seeds (n). Robust = AutoAttack when every seed has it, "
             f"else PGD; few-shot rows use episodic accuracies. \"vs baseline\": Welch's t-test on robust "
             f"accuracy against `{BASELINES['supervised']}` (supervised) / `{BASELINES['fewshot']}` (few-shot) in "
             f"the same group, p < {ALPHA}, only when both n ≥ 2.", ""]
    for label, group_rows in row_groups(rows):
        cols = [c for c in _visible_columns(group_rows) if c[0] != "group"]
        lines += [f"## {label}", ""]
        lines.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in group_rows:
            lines.append("| " + " | ".join(_cell(r, k, kd).replace("|", "\\|") for k, _, kd in cols) + " |")
        lines.append("")
    if images:
        lines += [""] + [f"![{Path(i).stem}]({Path(i).name})" for i in images]
    if problems:
        lines += ["", "## Skipped results", ""] + [f"- `{p}`: {why}" for p, why in problems]
    path.write_text("\n".join(lines) + "\n")


_HTML_JS = r"""
function makeSortable(table) {
  var state = {col: -1, asc: true};
  function key(td) {
    var v = td.getAttribute('data-sort');
    if (v === null || v === '') return null;
    var f = parseFloat(v);
    return isNaN(f) ? v.toLowerCase() : f;
  }
  function sortBy(col) {
    var asc = state.col === col ? !state.asc : true;
    state = {col: col, asc: asc};
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (r, i) { r._i = i; });
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === null && y === null) return a._i - b._i;
      if (x === null) return 1;            /* empty cells last in both directions */
      if (y === null) return -1;
      var c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      if (c === 0) return a._i - b._i;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    var ths = table.tHead.rows[0].cells;
    for (var i = 0; i < ths.length; i++) {
      ths[i].setAttribute('aria-sort', i === col ? (asc ? 'ascending' : 'descending') : 'none');
    }
  }
  var ths = table.tHead.rows[0].cells;
  for (var i = 0; i < ths.length; i++) {
    (function (i) { ths[i].addEventListener('click', function () { sortBy(i); }); })(i);
  }
  return sortBy;
}
/* one sortable table per comparison group; sortLeaderboard(col, g) sorts group g's table (default the first) */
var sorters = Array.prototype.map.call(document.querySelectorAll('table.leaderboard'), makeSortable);
window.sortLeaderboard = function (col, g) { sorters[g || 0](col); };
"""

_HTML_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
td.s{text-align:left} tr.pareto td:first-child{font-weight:bold}
td.better{background:#d9f2d9} td.worse{background:#f7d6d6}
img{max-width:100%;margin-top:1em}
"""


def _html_table(index: int, label: str, rows: list[dict]) -> list[str]:
    cols = [c for c in _visible_columns(rows) if c[0] != "group"]
    out = [f"<h2>{html.escape(label)}</h2>",
           f"<table class='leaderboard' id='leaderboard-{index}' data-group='{html.escape(label, quote=True)}'>"
           "<thead><tr>"]
    out += [f"<th data-key='{html.escape(k)}'>{html.escape(h)}</th>" for k, h, _ in cols]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cls = " class='pareto'" if r.get("pareto") else ""
        out.append(f"<tr{cls} data-method='{html.escape(str(r['method']))}'>")
        for k, _, kd in cols:
            v = r.get(k)
            sort = "" if v is None else (repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                         else str(v))
            tdcls = []
            if kd == "str":
                tdcls.append("s")
            if k == "vs_baseline" and v in ("better", "worse"):
                tdcls.append(v)
            c = f" class='{' '.join(tdcls)}'" if tdcls else ""
            out.append(f"<td{c} data-sort='{html.escape(sort, quote=True)}'>{html.escape(_cell(r, k, kd))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return out


def write_html(rows: list[dict], path: Path, problems: list[tuple[str, str]], images: list[Path]) -> None:
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<title>Robust LoRA leaderboard</title>", f"<style>{_HTML_CSS}</style></head><body>",
           "<h1>Robust LoRA leaderboard</h1>",
           "<p>One table per comparison group (data set · task · threat model and eps): rows are ranked and "
           "compared only within their group. Accuracies in %, mean ± sample std over seeds. Click a column "
           "header to sort (again to reverse). vs baseline: Welch's t-test within the group, p &lt; 0.05, "
           "both n ≥ 2.</p>"]
    for gi, (label, group_rows) in enumerate(row_groups(rows)):
        out += _html_table(gi, label, group_rows)
    for img in images:
        try:
            b64 = base64.b64encode(Path(img).read_bytes()).decode()
            out.append(f"<h2>{html.escape(Path(img).stem)}</h2><img alt='{html.escape(Path(img).stem)}' "
                       f"src='data:image/png;base64,{b64}'>")
        except OSError:
            pass
    if problems:
        out.append("<h2>Skipped results</h2><ul>")
        out += [f"<li><code>{html.escape(p)}</code>: {html.escape(w)}</li>" for p, w in problems]
        out.append("</ul>")
    out.append(f"<script>{_HTML_JS}</script></body></html>")
    path.write_text("\n".join(out))


def print_table(rows: list[dict], problems: list[tuple[str, str]], file=None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except Exception:  # pragma: no cover
        print("\n".join(" | ".join(_cell(r, k, kd) for k, _, kd in _visible_columns(rows)) for r in rows), file=file)
        return
    console = Console(file=file, width=max(160, Console(file=file).width))
    keys = ["rank", "method", "backbone", "clean_acc", "robust_acc", "robust_metric", "pgd_acc",
            "autoattack_acc", "fs_adv_acc", "n", "vs_baseline", "p_value", "pareto", "wall_s"]
    for label, group_rows in row_groups(rows):  # one table per comparison group
        cols = [c for c in _visible_columns(group_rows) if c[0] in keys]
        t = Table(title=f"{label} (accuracy %, mean ± std over seeds)")
        for k, h, kd in cols:
            t.add_column(h, justify="left" if kd == "str" else "right")
        for r in group_rows:
            t.add_row(*[_cell(r, k, kd) for k, _, kd in cols])
        console.print(t)
    if not rows:
        console.print("Leaderboard: no results")
    for p, why in problems:
        console.print(f"[yellow]skipped[/yellow] {p}: {why}")


# ----------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pareto(rows: list[dict], path: Path) -> bool:
    """One panel per comparison group (its Pareto front is the group's)."""
    groups = [(label, [r for r in rs if r["clean_acc"] is not None and r["robust_acc"] is not None])
              for label, rs in row_groups(rows)]
    groups = [(label, rs) for label, rs in groups if rs]
    if not groups:
        return False
    plt = _plt()
    ncol = min(3, len(groups))
    nrow = -(-len(groups) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4.5 * nrow), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (ds, rs) in zip(axes.flat, groups):
        methods = sorted({r["method"] for r in rs})
        cmap = plt.get_cmap("tab10")
        for mi, m in enumerate(methods):
            pts = [r for r in rs if r["method"] == m]
            ax.errorbar([100 * r["clean_acc"] for r in pts], [100 * r["robust_acc"] for r in pts],
                        xerr=[100 * (r["clean_acc_std"] or 0) for r in pts],
                        yerr=[100 * (r["robust_acc_std"] or 0) for r in pts],
                        fmt="o", color=cmap(mi % 10), label=m, capsize=2, alpha=0.85)
        front = sorted([r for r in rs if r.get("pareto")], key=lambda r: r["clean_acc"])
        if front:
            ax.plot([100 * r["clean_acc"] for r in front], [100 * r["robust_acc"] for r in front], "k--", lw=1,
                    label="Pareto front")
            ax.scatter([100 * r["clean_acc"] for r in front], [100 * r["robust_acc"] for r in front], s=160,
                       facecolors="none", edgecolors="k", linewidths=1.2)
        metrics = sorted({r["robust_metric"] for r in rs if r["robust_metric"]})
        ax.set_title(ds, fontsize=9)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy (%) [{', '.join(metrics)}]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


_SCHEDULE_KEYS = ("lambda1", "lambda2", "lambda", "eta", "lam1", "lam2")


def plot_curves(records: list[dict], path: Path) -> bool:
    """Per sweep: validation robust accuracy (top) and λ/η (bottom) per epoch, one line per trial."""
    by_sweep: dict[str, list[dict]] = OrderedDict()
    for rec in records:
        hist = rec.get("history")
        if not isinstance(hist, list) or not any(isinstance(h, dict) for h in hist):
            continue
        by_sweep.setdefault(str(_get(rec, "sweep", "name") or "(no sweep)"), []).append(rec)
    if not by_sweep:
        return False
    plt = _plt()
    n = len(by_sweep)
    fig, axes = plt.subplots(2, n, figsize=(6 * n, 7), squeeze=False)
    from matplotlib.ticker import MaxNLocator
    for ci, (sweep, recs) in enumerate(by_sweep.items()):
        ax1, ax2 = axes[0][ci], axes[1][ci]
        ax3 = ax2.twinx()  # η: the learning rate, on its own axis
        any_sched = False
        for rec in recs:
            hist = [h for h in rec["history"] if isinstance(h, dict)]
            label = str(_get(rec, "sweep", "trial_id") or rec.get("id") or rec["method"])
            label = f"{rec['method']}:{label}"[:40]
            ep = [h.get("epoch", i) for i, h in enumerate(hist)]
            ys = [_num(h.get("val_pgd_acc")) for h in hist]
            if any(y is not None for y in ys):
                ax1.plot([e for e, y in zip(ep, ys) if y is not None], [100 * y for y in ys if y is not None],
                         marker=".", label=label)
            for k in _SCHEDULE_KEYS:
                vs = [_num(h.get(k)) for h in hist]
                if any(v is not None for v in vs):
                    any_sched = True
                    ax2.plot([e for e, v in zip(ep, vs) if v is not None], [v for v in vs if v is not None],
                             marker=".", label=f"{label} {k}")
            lrs = [_num(h.get("lr")) for h in hist]
            if any(v is not None for v in lrs):
                ax3.plot([e for e, v in zip(ep, lrs) if v is not None], [v for v in lrs if v is not None],
                         ls=":", marker="x", label=f"{label} η")
        ax1.set_title(f"sweep {sweep}: validation robust accuracy")
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("val PGD acc (%)")
        ax1.grid(alpha=0.3)
        if ax1.lines:
            ax1.legend(fontsize=6)
        ax2.set_title("λ (solid, left) / η learning rate (dotted, right)" if any_sched or ax3.lines
                      else "no λ/η logged")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("λ")
        ax3.set_ylabel("η (lr)")
        ax2.grid(alpha=0.3)
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax2.lines or ax3.lines:
            h2, l2 = ax2.get_legend_handles_labels()
            h3, l3 = ax3.get_legend_handles_labels()
            ax2.legend(h2 + h3, l2 + l3, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def _record_robust(rec: dict) -> float | None:
    if _kind(rec) == "fewshot":
        return _num(_get(rec, "fewshot", "adv_acc"))
    aa = _num(_get(rec, "metrics", "autoattack_acc"))
    return aa if aa is not None else _num(_get(rec, "metrics", "pgd_acc"))


def swept_settings(records: list[dict]) -> list[str]:
    keys: list[str] = []
    for rec in records:
        sw = _get(rec, "sweep", "swept")
        if isinstance(sw, dict):
            for k in sw:
                if k not in keys:
                    keys.append(str(k))
    return keys


def plot_params(records: list[dict], path: Path) -> bool:
    keys = swept_settings(records)
    if not keys:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(rec["sweep"]["swept"][k], _record_robust(rec), rec["method"]) for rec in records
               if isinstance(_get(rec, "sweep", "swept"), dict) and k in rec["sweep"]["swept"]
               and _record_robust(rec) is not None]
        numeric = all(_num(x) is not None for x, _, _ in pts)
        cats = sorted({str(x) for x, _, _ in pts})
        for m in sorted({m for _, _, m in pts}):
            mp = [(x, y) for x, y, mm in pts if mm == m]
            xs = [float(x) if numeric else cats.index(str(x)) for x, _ in mp]
            ax.scatter(xs, [100 * y for _, y in mp], label=m, alpha=0.8)
        if not numeric:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=30, fontsize=7)
        elif pts and min(float(x) for x, _, _ in pts) > 0 and \
                max(float(x) for x, _, _ in pts) / min(float(x) for x, _, _ in pts) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel("robust accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- W&B
def table_columns_and_data(rows: list[dict]) -> tuple[list[str], list[list]]:
    cols = [c for c in CSV_FIELDS]
    data = []
    for r in rows:
        data.append([r.get(c) if not isinstance(r.get(c), (list, dict)) else json.dumps(r.get(c)) for c in cols])
    return cols, data


def log_wandb_leaderboard(rows: list[dict], out_dir: Path, pareto_png: Path | None, *,
                          group: str | None = None) -> list[str]:
    """A leaderboard run (job_type "leaderboard") logging a wandb.Table of the rows and the Pareto plot."""
    from bench.report import tracking
    notes: list[str] = []
    try:
        import wandb
        run, mode, notes = tracking.open_run(out_dir, run_id=None, name=f"leaderboard-{group or 'results'}",
                                             group=group, tags=["leaderboard"], job_type="leaderboard",
                                             config={"results": str(out_dir), "n_rows": len(rows)}, resume=None)
        if run is None:
            return notes + ["leaderboard not logged to W&B"]
        try:
            cols, data = table_columns_and_data(rows)
            payload: dict[str, Any] = {"leaderboard": wandb.Table(columns=cols, data=data)}
            if pareto_png is not None and Path(pareto_png).exists():
                payload["pareto"] = wandb.Image(str(pareto_png))
            run.log(payload)
            for r in rows:
                if r.get("rank") == 1:  # the best of each comparison group
                    run.summary[f"best/{r['group']}/method"] = r["method"]
                    run.summary[f"best/{r['group']}/robust_acc"] = r["robust_acc"]
        except Exception as exc:
            notes.append(f"W&B leaderboard logging failed: {exc!r}")
        run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        run.finish()
        if mode == "offline" and run_dir is not None:
            tracking.wait_flushed(run_dir)
            notes.append(f"leaderboard run saved offline; upload later with: wandb sync {run_dir}")
    except Exception as exc:
        notes.append(f"W&B leaderboard run failed: {exc!r}")
    return notes


def build_report(rows: list[dict], records: list[dict], *, project: str | None = None,
                 entity: str | None = None):
    """The W&B report (wandb_workspaces.reports.v2.Report) comparing the runs of the results folder."""
    import wandb_workspaces.reports.v2 as wr
    from bench.report import tracking

    project = project or tracking._project()
    entity = entity if entity is not None else (os.environ.get("WANDB_ENTITY") or "")
    groups = sorted({str(_get(r, "sweep", "name")) for r in records if _get(r, "sweep", "name")})

    def runset(name: str, dataset: str | None = None, groupby: list[str] | None = None):
        kw: dict[str, Any] = dict(entity=entity, project=project, name=name)
        if dataset is not None:
            kw["filters"] = f"Config('dataset') = '{dataset}'"
        if groupby:
            kw["groupby"] = groupby
        return wr.Runset(**kw)

    blocks: list[Any] = [
        wr.H1(text="Adversarially robust LoRA fine-tuning: leaderboard"),
        wr.P(text=f"{len(rows)} configurations from {len(records)} trials"
                  + (f" (sweeps: {', '.join(groups)})" if groups else "")
                  + ". Robust accuracy is AutoAttack where computed, else PGD; few-shot rows use episodic "
                    "adversarial accuracy."),
        wr.H2(text="Leaderboard table"),
        wr.PanelGrid(runsets=[runset("leaderboard runs")],
                     panels=[wr.WeavePanelSummaryTable(table_name="leaderboard")]),
        wr.H2(text="Clean vs robust accuracy per data set"),
    ]
    for ds in sorted({r["dataset"] for r in rows}):
        fewshot = all(r["kind"] == "fewshot" for r in rows if r["dataset"] == ds)
        if fewshot:  # episodic methods: the trial summary holds the few-shot accuracies
            pairs = [("few-shot clean vs adversarial", "fewshot/clean_acc", "fewshot/adv_acc")]
        else:
            pairs = [("clean vs AutoAttack", "clean_acc", "autoattack_acc"), ("clean vs PGD", "clean_acc", "pgd_acc")]
        blocks.append(wr.H3(text=ds))
        blocks.append(wr.PanelGrid(
            runsets=[runset(f"{ds} runs", dataset=ds)],
            panels=[wr.ScatterPlot(title=f"{ds}: {t}", x=wr.SummaryMetric(x), y=wr.SummaryMetric(y))
                    for t, x, y in pairs]))
    swept = swept_settings(records)
    pc_cols = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in swept]
    pc_cols += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("pgd_acc")),
                wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric("val_pgd_acc"))]
    blocks += [
        wr.H2(text="Swept settings against robust accuracy"),
        wr.PanelGrid(runsets=[runset("sweep trials")],
                     panels=[wr.ParallelCoordinatesPlot(title="swept settings vs robust accuracy",
                                                        columns=pc_cols)]),
        wr.H2(text="Runs grouped by method"),
        wr.PanelGrid(runsets=[runset("by method", groupby=["config.method"])],
                     panels=[wr.LinePlot(title="validation robust accuracy", x="epoch", y=["val_pgd_acc"]),
                             wr.BarPlot(title="final robust accuracy", metrics=[wr.SummaryMetric("pgd_acc")]),
                             wr.RunComparer()]),
    ]
    return wr.Report(project=project, entity=entity, title="Robust LoRA leaderboard",
                     description="Built by `bench leaderboard --wandb-report`.", blocks=blocks)


def report_spec(report) -> dict:
    model = report._to_model()
    return json.loads(model.model_dump_json(by_alias=True, exclude_none=True))


def make_wandb_report(rows: list[dict], records: list[dict], out_dir: Path) -> list[str]:
    """Build the report; save it when W&B is configured online, else write its specification as JSON."""
    from bench.report import tracking
    notes: list[str] = []
    try:
        report = build_report(rows, records)
    except Exception as exc:
        return [f"W&B report could not be built: {exc!r}"]
    spec_path = Path(out_dir) / "wandb_report.json"
    if tracking.wanted_mode() == "online":
        try:
            report.save()
            notes.append(f"W&B report saved: {report.url}")
            return notes
        except Exception as exc:
            notes.append(f"W&B report save failed ({exc!r}); writing its specification instead")
    try:
        spec = report_spec(report)
        spec_path.write_text(json.dumps({"format": "wandb_workspaces.reports.v2 ReportViewspec",
                                         "saved": False, "report": spec}, indent=1))
        notes.append(f"W&B report specification written to {spec_path} (save it when online with "
                     f"`bench.report.leaderboard.save_report_spec`)")
    except Exception as exc:
        notes.append(f"W&B report specification could not be written: {exc!r}")
    return notes


def load_report_spec(path: Path):
    """Rebuild the Report from a specification written offline (call ``.save()`` on it once online)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import internal
    data = json.loads(Path(path).read_text())
    model = internal.ReportViewspec.model_validate(data["report"])
    return wr.Report._from_model(model)


def save_report_spec(path: Path, entity: str | None = None) -> str:
    report = load_report_spec(path)
    if entity:
        report.entity = entity
    report.save()
    return report.url


# ----------------------------------------------------------------------------------------------- main
def build_leaderboard(results_dir: Path, out_dir: Path | None = None, *, wandb_log: bool = False,
                      wandb_report: bool = False, console: bool = True, group: str | None = None,
                      problems: list | None = None, notes: list | None = None) -> list[dict]:
    """Build the leaderboard of ``results_dir`` into ``out_dir`` (default: ``results_dir``); return the rows.

    ``problems`` / ``notes``, when given, collect the skipped files (path, reason) and W&B notes.
    """
    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    records, probs = load_results(results_dir)
    if problems is not None:
        problems.extend(probs)
    rows = finish_rows(group_records(records))
    images: list[Path] = []
    for name, fn, arg in (("pareto.png", plot_pareto, rows), ("curves.png", plot_curves, records),
                          ("params.png", plot_params, records)):
        p = out_dir / name
        try:
            if fn(arg, p):
                images.append(p)
        except Exception as exc:  # a plot never breaks the table
            probs.append((str(p), f"plot failed: {exc!r}"))
    write_csv(rows, out_dir / "leaderboard.csv")
    write_md(rows, out_dir / "leaderboard.md", probs, [str(i) for i in images])
    write_html(rows, out_dir / "leaderboard.html", probs, images)
    msgs: list[str] = []
    if group is None:
        sweeps = {str(_get(r, "sweep", "name")) for r in records if _get(r, "sweep", "name")}
        group = sweeps.pop() if len(sweeps) == 1 else None
    if wandb_log:
        msgs += log_wandb_leaderboard(rows, out_dir, out_dir / "pareto.png" if (out_dir / "pareto.png") in images
                                      else None, group=group)
    if wandb_report:
        msgs += make_wandb_report(rows, records, out_dir)
    if notes is not None:
        notes.extend(msgs)
    if console:
        print_table(rows, probs)
        for m in msgs:
            print(m)
        print(f"leaderboard written to {out_dir} (leaderboard.md/.csv/.html, "
              + ", ".join(i.name for i in images) + ")")
    for r in rows:
        r.pop("_robust_samples", None)
        r.pop("_group", None)
    return rows


def _cmd(args: argparse.Namespace) -> int:
    results = Path(args.results_dir)
    if not results.is_dir():
        print(f"results folder {results} does not exist", file=sys.stderr)
        return 2
    rows = build_leaderboard(results, Path(args.out) if args.out else None, wandb_log=args.wandb,
                             wandb_report=args.wandb_report, console=True)
    if not rows:
        print(f"no valid result.json under {results}", file=sys.stderr)
        return 1
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("leaderboard", help="leaderboard (md/csv/html/png, optional W&B) from result.json files",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results_dir", metavar="RESULTS_DIR", help="folder searched recursively for result.json")
    p.add_argument("--out", default=None, help="output folder (default: RESULTS_DIR)")
    p.add_argument("--wandb", action="store_true", help="log a leaderboard run (wandb.Table + Pareto plot)")
    p.add_argument("--wandb-report", dest="wandb_report", action="store_true",
                   help="build a W&B report (saved when online, else its specification in the out folder)")
    p.set_defaults(func=_cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = parser.parse_args(["leaderboard", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
