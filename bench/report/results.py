"""Reading a results folder: the valid result.json files (and why the others were skipped), one record per
cross-domain few-shot target, and what a record is (kind, task, threat model, comparison group)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench.report.formats import fmt_eps


def get(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, None where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def num(v: Any) -> float | None:
    """A finite number as float, else None (booleans are not numbers here)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v) if math.isfinite(float(v)) else None
    return None


# ----------------------------------------------------------------------------------------------- skip rules
# Folders whose result.json files are not entries: W&B's runs; any folder named "_..." (Tune's storage
# `_tune`, a sweep's AMT member cache `_members`, the prerequisite runs of a two-phase sweep `_prerequisites`).
_NOT_ENTRIES = ("wandb",)
# A single `bench run` AMT trial keeps its pool members in `<trial>/members/` (bench.sweep.amt_pool).
_TRIAL_MEMBERS = "members"
_TRIAL_MARKERS = ("pool.json", "args.yaml")  # files that make a folder a trial folder


def skipped_folder(path: Path, results_dir: Path) -> bool:
    """True when ``path`` lies in a folder whose files are parts of other entries, not entries themselves."""
    parts = path.relative_to(results_dir).parts[:-1]
    if any(p in _NOT_ENTRIES or p.startswith("_") for p in parts):
        return True
    for i, part in enumerate(parts):
        if part == _TRIAL_MEMBERS:
            trial = results_dir.joinpath(*parts[:i])
            if any((trial / m).exists() for m in _TRIAL_MARKERS):
                return True
    return False


def _problem(data: Any) -> str | None:
    """Why a parsed result.json is not an entry, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("status", "ok") not in ("ok", None):
        return f"trial status {data.get('status')!r}: {str(data.get('error', ''))[:200]}"
    missing = [k for k in ("method", "dataset") if not isinstance(data.get(k), str) or not data.get(k)]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    bad = _bad_accuracy(data)  # before the check below: a text clean accuracy is named as such
    if bad is not None:
        return bad
    if num(get(data, "metrics", "clean_acc")) is None and num(get(data, "fewshot", "clean_acc")) is None \
            and data.get("stage") != "validation":
        return "no clean accuracy in metrics or fewshot"
    return None


def _accuracy_blocks(data: dict):
    """(name, block) of every block of accuracies: metrics, fewshot, and each cross-domain target's."""
    yield "metrics", data.get("metrics")
    yield "fewshot", data.get("fewshot")
    targets = data.get("fewshot_targets")
    if isinstance(targets, dict):
        yield from ((f"fewshot_targets.{k}", b) for k, b in targets.items())
    elif isinstance(targets, list):
        yield from ((f"fewshot_targets[{i}]", b) for i, b in enumerate(targets))


def _bad_accuracy(data: dict) -> str | None:
    """Why an accuracy (a ``*_acc`` field) of a result cannot be ranked: a fraction in [0, 1] is expected
    (result.json's schema); percentages would rank first at 8984%, NaN and text would show as blanks."""
    for block_name, block in _accuracy_blocks(data):
        if block is None:
            continue
        if not isinstance(block, dict):
            return f"{block_name} is not a JSON object"
        for key, v in block.items():
            if not key.endswith("_acc"):
                continue
            where = f"{block_name}.{key}={v!r}"
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                return f"{where} is not a number (accuracies are fractions in [0, 1]; one not computed is absent)"
            if not math.isfinite(v):
                return f"{where} is not a finite number (accuracies are fractions in [0, 1])"
            if not 0.0 <= v <= 1.0:
                hint = " (a percentage? accuracies are fractions)" if 1.0 < v <= 100.0 else ""
                return f"{where} is outside [0, 1]{hint}"
        clean = block.get("clean_acc")
        for key in ("pgd_acc", "autoattack_acc", "adv_acc", "robust_acc"):
            if isinstance(clean, (int, float)) and isinstance(block.get(key), (int, float)) and block[key] > clean + 1e-9:
                # a sample is robust only if it is right clean: this row was counted the old way (re-evaluate it)
                return (f"{block_name}.{key}={block[key]:.4f} is above clean_acc={clean:.4f} (a sample is robust only "
                        f"if it is right clean; re-run its evaluation)")
    return None


def load_results(results_dir: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """All valid result.json under ``results_dir`` (recursive) and the problems found, as (path, reason).

    A trial folder that holds trial outputs (args.yaml / metrics.jsonl) but no result.json is reported as
    missing. Results with ``"status": "error"`` are reported and skipped; validation-stage candidates (merge
    search, no test numbers) are skipped silently.
    """
    results_dir = Path(results_dir)
    records: list[dict] = []
    problems: list[tuple[str, str]] = []
    if not results_dir.exists():
        return records, [(str(results_dir), "results folder does not exist")]
    found_dirs = set()
    for path in sorted(results_dir.rglob("result.json")):
        if skipped_folder(path, results_dir):
            continue
        found_dirs.add(path.parent)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append((str(path), f"unreadable or not JSON: {exc}"))
            continue
        why = _problem(data)
        if why is not None:
            problems.append((str(path), why))
            continue
        if data.get("stage") == "validation":  # a candidate without test (merge search): not an entry
            continue
        data["_path"] = str(path)
        records.append(data)
    for marker in ("args.yaml", "metrics.jsonl"):  # files a trial (bench.trial) writes into its folder
        for m in sorted(results_dir.rglob(marker)):
            d = m.parent
            if d in found_dirs or skipped_folder(m, results_dir):
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
            if not target or not isinstance(block, dict) or num(block.get("clean_acc")) is None:
                continue
            if target == rec["dataset"] and isinstance(rec.get("fewshot"), dict):
                continue  # the in-domain block is the trial's own row already
            target_rec = {k: v for k, v in rec.items()
                          if k not in ("metrics", "fewshot", "fewshot_targets", "reliability", "reliability_targets")}
            target_rec.update(dataset=target, source_dataset=rec["dataset"], fewshot=block)
            own = get(rec, "reliability_targets", target)  # the target's own indicators, never the source's
            if isinstance(own, dict):
                target_rec["reliability"] = own
            out.append(target_rec)
    return out


# ----------------------------------------------------------------------------------------------- one record
def selected_settings(rec: dict) -> str | None:
    """The settings a per-domain search selected for this result (bench.sweep.merge_search), as text."""
    sel = rec.get("merge_selection")
    if not isinstance(sel, dict) or not isinstance(sel.get("settings"), dict):
        return None
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sel["settings"].items())


def record_kind(rec: dict) -> str:
    """"fewshot" for episodic results, else "supervised"."""
    return "fewshot" if num(get(rec, "fewshot", "adv_acc")) is not None or (
        num(get(rec, "fewshot", "clean_acc")) is not None and num(get(rec, "metrics", "clean_acc")) is None
    ) else "supervised"


def record_task(rec: dict, kind: str) -> str:
    """"supervised", or the few-shot setting ("5-way 1-shot")."""
    if kind != "fewshot":
        return "supervised"
    ways, shots = get(rec, "fewshot", "ways"), get(rec, "fewshot", "shots")
    cfg = rec.get("config") if isinstance(rec.get("config"), dict) else {}
    ways = ways if ways is not None else cfg.get("ways")
    shots = shots if shots is not None else cfg.get("shots")
    return f"{ways if ways is not None else '?'}-way {shots if shots is not None else '?'}-shot"


def record_eps(rec: dict) -> float | None:
    for block in ("metrics", "fewshot", "config"):
        v = num(get(rec, block, "eps"))
        if v is not None:
            return v
    return None


def record_threat(rec: dict) -> str:
    """The threat model of the robust numbers and the attack that measured them: norm, eps and the row's
    headline attack ("Linf eps 8/255 · AutoAttack standard"), so a group never ranks AutoAttack against PGD."""
    eps = record_eps(rec)
    norm = str(get(rec, "config", "norm") or "Linf")
    threat = f"{norm} eps {fmt_eps(eps) if eps is not None else '?'}"
    attack = record_attack(rec)
    return f"{threat} · {attack}" if attack else threat


def comparison_group(rec: dict) -> tuple[str, str, str]:
    """(data set, task, threat model): rows are ranked and compared only within one such group."""
    return rec["dataset"], record_task(rec, record_kind(rec)), record_threat(rec)


def group_label(group: tuple[str, str, str]) -> str:
    return " · ".join(group)


def _robust_block(rec: dict) -> str:
    return "fewshot" if record_kind(rec) == "fewshot" else "metrics"


def record_robust(rec: dict) -> float | None:
    """One trial's headline robust accuracy: ``robust_acc`` (per sample, right clean and under every attack
    that ran); for a result.json written before it existed, AutoAttack's, else PGD's (few-shot: PGD's)."""
    block = _robust_block(rec)
    robust = num(get(rec, block, "robust_acc"))
    if robust is not None:
        return robust
    if block == "fewshot":
        return num(get(rec, "fewshot", "adv_acc"))
    aa = num(get(rec, "metrics", "autoattack_acc"))
    return aa if aa is not None else num(get(rec, "metrics", "pgd_acc"))


def record_robust_ci95(rec: dict) -> float | None:
    """A few-shot row's 95% interval of its headline robust accuracy (None for supervised rows)."""
    if _robust_block(rec) != "fewshot":
        return None
    ci = num(get(rec, "fewshot", "robust_ci95"))
    return ci if ci is not None else num(get(rec, "fewshot", "adv_ci95"))


def record_attack(rec: dict) -> str | None:
    """The name of the attack behind a row's headline robust accuracy ("AutoAttack standard", "PGD-20")."""
    block = _robust_block(rec)
    name = get(rec, block, "robust_attack")
    if isinstance(name, str) and name:
        return name
    if block == "metrics" and num(get(rec, "metrics", "autoattack_acc")) is not None:
        return f"AutoAttack {get(rec, 'metrics', 'autoattack_version')}"
    steps = get(rec, block, "pgd_steps")
    if num(get(rec, block, "pgd_acc" if block == "metrics" else "adv_acc")) is not None:
        return f"PGD-{steps}" if steps is not None else "PGD"
    return None


def record_reliability(rec: dict) -> tuple[str | None, list[str]]:
    """A trial's reliability verdict ("ok", "suspect"; None when not computed) and the indicators that fired."""
    block = rec.get("reliability")
    if not isinstance(block, dict) or block.get("verdict") not in ("ok", "suspect"):
        return None, []
    return block["verdict"], [str(f) for f in block.get("fired") or []]


def record_curve(rec: dict) -> dict | None:
    """A trial's robustness curve (bench/reliability.py: robust accuracy at eps x 0.25..4 and unbounded)."""
    curve = get(rec, "reliability", "curve")
    if not isinstance(curve, dict) or not isinstance(curve.get("eps"), list) \
            or not isinstance(curve.get("robust_acc"), list) or len(curve["eps"]) != len(curve["robust_acc"]):
        return None
    return curve


def swept_settings(records: list[dict]) -> list[str]:
    """The settings a sweep varied (``sweep.swept`` in result.json), in first-seen order."""
    keys: list[str] = []
    for rec in records:
        sw = get(rec, "sweep", "swept")
        if isinstance(sw, dict):
            for k in sw:
                if k not in keys:
                    keys.append(str(k))
    return keys
