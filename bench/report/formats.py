"""How a leaderboard value is shown: the columns (header and kind), cell text for accuracies, numbers and eps,
and the frame of cell texts one comparison group's table is written from (markdown, console, HTML)."""
from __future__ import annotations

import shlex
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pandas as pd

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
    ("reliability", "reliability", "str"),
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
    ("commit", "commit", "str"),
]
# Columns every table shows, even when empty in all its rows.
_ALWAYS = ("rank", "dataset", "method", "clean_acc", "robust_acc", "n", "vs_baseline")

# leaderboard.csv and the W&B table: every row field a reader may want, raw numbers (fractions, not %).
CSV_FIELDS = ["group", "rank", "dataset", "task", "threat", "source_dataset", "method", "backbone", "kind",
              "clean_acc", "clean_acc_std", "robust_acc",
              "robust_acc_std", "robust_metric", "reliability", "reliability_fired", "reliability_suspect_seeds",
              "pgd_acc", "pgd_acc_std", "pgd_steps", "eps", "autoattack_acc",
              "autoattack_acc_std", "autoattack_version", "n_eval", "fs_setting", "fs_clean_acc",
              "fs_clean_acc_std", "fs_clean_ci95", "fs_adv_acc", "fs_adv_acc_std", "fs_adv_ci95", "wall_s",
              "images_per_s", "device", "n", "seeds", "vs_baseline", "t_stat", "p_value", "pareto", "config_hash",
              "trial_config_hashes", "sweep", "ids", "commit"]


def attach_provenance(rows: list[dict], records: list[dict]) -> None:
    """Give each row the code it ran (``commit``: the short hash, ``+`` for uncommitted changes, seeds run
    from several commits joined by "/"; absent for results written before provenance was recorded) and its
    trials' folders (``run_dirs``, what ``bench reproduce`` takes)."""
    from bench.provenance import short_commit

    commits = {rec["_path"]: short_commit(rec.get("provenance")) for rec in records if "_path" in rec}
    for row in rows:
        paths = row.get("paths") or []
        found = list(dict.fromkeys(c for c in (commits.get(p) for p in paths) if c))
        row["commit"] = "/".join(found) or None
        row["run_dirs"] = [str(Path(p).parent.resolve()) for p in paths]


def reproduce_commands(row: dict) -> list[str]:
    """The command that re-runs each of the row's trials (one per seed)."""
    return [f"python -m bench reproduce {shlex.quote(d)}" for d in row.get("run_dirs") or []]


def fmt_acc(mean: Any, std: Any, pct: bool = True) -> str:
    if mean is None:
        return "–"
    s = f"{100 * mean:.2f}" if pct else f"{mean:.4f}"
    if std is not None:
        s += f" ± {100 * std:.2f}" if pct else f" ± {std:.4f}"
    return s


def fmt_num(v: Any) -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if v != 0 and abs(v) < 0.01:
            return f"{v:.2g}"
        return f"{v:.4g}"
    return str(v)


def fmt_eps(v: Any) -> str:
    """eps as a fraction of 255 where it is one (8/255, 0.5/255, 0.25/255), else as a number."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1:
        k = v * 255
        for denom in (1, 2, 4):
            if abs(k * denom - round(k * denom)) < 1e-4 * denom:
                return f"{round(k)}/255" if denom == 1 else f"{round(k * denom) / denom:g}/255"
    return fmt_num(v)


# What a fired reliability indicator means (bench/reliability.py; docs/reliability.md has sources and remedies).
INDICATOR_MEANINGS = {
    "aa_randomized": "AutoAttack check: the model's output changes between identical forwards (a randomized "
                     "defence); evaluate with autoattack_version=rand",
    "aa_softmax_output": "AutoAttack check: the model outputs probabilities, not logits; the attacks' losses saturate",
    "aa_zero_gradients": "AutoAttack check: some samples have an all-zero input gradient; gradient attacks cannot move them",
    "aa_dynamic": "AutoAttack check: the forward computes gradients (a dynamic defence); AutoAttack may be insufficient",
    "aa_n_classes": "AutoAttack check: too few classes for the (targeted) DLR attacks",
    "aa_square": "AutoAttack check: the black-box Square attack broke samples the white-box attacks did not "
                 "(gradient masking)",
    "unavailable_gradients": "samples the attack failed on have an exactly zero input gradient (masked gradients)",
    "incomplete_optimisation": "the attack's loss was still rising when it stopped: more steps would break more samples",
    "pgd_vs_autoattack": "AutoAttack left more samples robust than PGD: AutoAttack failed where a weaker attack worked",
    "steps_convergence": "doubling the PGD steps lowered robust accuracy: the attack had not converged",
    "restarts_convergence": "random restarts lowered robust accuracy: the attack's single run got stuck",
    "budget_monotone": "robust accuracy rose with a larger eps: the attack fails at some budgets",
    "budget_unbounded": "an unbounded attack left more than chance accuracy: the attack, not the model, failed",
}


def reliability_text(row: dict) -> str:
    """"ok", or "suspect: <indicators that fired>" (with "k/n seeds" when not every seed is suspect)."""
    verdict = row.get("reliability")
    if verdict != "suspect":
        return verdict or "–"
    seeds = row.get("reliability_suspect_seeds") or ""
    part = f" ({seeds} seeds)" if seeds and seeds.split("/")[0] != seeds.split("/")[-1] else ""
    return f"suspect{part}: " + ", ".join((row.get("reliability_fired") or "").split(";"))


def cell(row: dict, key: str, kind: str) -> str:
    """The text of one table cell."""
    if key == "reliability":
        return reliability_text(row)
    if key == "eps":
        return fmt_eps(row.get(key))
    if kind == "acc":
        return fmt_acc(row.get(key), row.get(key + "_std"))
    if key in ("fs_clean_ci95", "fs_adv_ci95") and row.get(key) is not None:
        return f"{100 * row[key]:.2f}"
    if key == "p_value" and row.get(key) is not None:
        return f"{row[key]:.3g}"
    return fmt_num(row.get(key))


def visible_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Drop columns that are empty in every row (e.g. few-shot columns for a supervised-only board)."""
    return [(key, head, kind) for key, head, kind in COLUMNS
            if key in _ALWAYS or any(r.get(key) not in (None, "") for r in rows)]


def row_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """The finished rows split by comparison group, in order: (label, rows)."""
    out: dict[str, list[dict]] = OrderedDict()
    for r in rows:
        out.setdefault(r["group"], []).append(r)
    return list(out.items())


def group_columns(rows: list[dict], keys: tuple[str, ...] | None = None) -> list[tuple[str, str, str]]:
    """The columns of one comparison group's table (the group is its title, not a column); ``keys`` limits them."""
    return [c for c in visible_columns(rows) if c[0] != "group" and (keys is None or c[0] in keys)]


def cells_frame(rows: list[dict], cols: list[tuple[str, str, str]]) -> pd.DataFrame:
    """One group's table as a frame of cell texts, headed by the column headers."""
    return pd.DataFrame([[cell(r, k, kd) for k, _, kd in cols] for r in rows],
                        columns=[h for _, h, _ in cols], dtype=object)
