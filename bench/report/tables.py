"""The leaderboard as tables: leaderboard.csv (every row field, raw numbers), leaderboard.md (one markdown table
per comparison group) and the console (one rich table per group), each written from a pandas frame."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.files import atomic_write
from bench.report.formats import CSV_FIELDS, cells_frame, group_columns, row_groups
from bench.report.stats import ALPHA, BASELINES

# the console shows fewer columns than the files (a terminal is narrow)
CONSOLE_KEYS = ("rank", "method", "backbone", "clean_acc", "robust_acc", "robust_metric", "reliability", "pgd_acc",
                "autoattack_acc", "fs_adv_acc", "n", "vs_baseline", "p_value", "pareto", "wall_s")


def rows_frame(rows: list[dict]) -> pd.DataFrame:
    """The finished rows as a frame with the csv columns (raw values, None for missing)."""
    return pd.DataFrame([{k: r.get(k) for k in CSV_FIELDS} for r in rows], columns=CSV_FIELDS, dtype=object)


def write_csv(rows: list[dict], path: Path) -> None:
    atomic_write(path, rows_frame(rows).to_csv(index=False, na_rep=""))


def markdown_table(cells: pd.DataFrame) -> list[str]:
    """A frame of cell texts as a pipe table (tabulate, which ``DataFrame.to_markdown`` needs, is not a
    dependency); a "|" inside a cell is escaped."""
    def line(values) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"
    return [line(cells.columns), "|" + "|".join("---" for _ in cells.columns) + "|",
            *(line(values) for values in cells.itertuples(index=False))]


def write_md(rows: list[dict], path: Path, problems: list[tuple[str, str]], images: list[str]) -> None:
    lines = ["# Leaderboard", "",
             "One table per comparison group (data set · task · threat model and eps): rows are ranked and "
             "compared only within their group. "
             "Accuracies in %, mean ± sample std over seeds (n). Robust = AutoAttack when every seed has it, "
             f"else PGD; few-shot rows use episodic accuracies. \"vs baseline\": Welch's t-test on robust "
             f"accuracy against `{BASELINES['supervised']}` (supervised) / `{BASELINES['fewshot']}` (few-shot) in "
             f"the same group, p < {ALPHA}, only when both n ≥ 2. \"reliability\": `suspect` when an indicator of attack "
             f"failure fired (named; docs/reliability.md says what each means and what to do), `ok` when none did.", ""]
    for label, group_rows in row_groups(rows):
        lines += [f"## {label}", "", *markdown_table(cells_frame(group_rows, group_columns(group_rows))), ""]
    if images:
        lines += [""] + [f"![{Path(i).stem}]({Path(i).name})" for i in images]
    if problems:
        lines += ["", "## Skipped results", ""] + [f"- `{p}`: {why}" for p, why in problems]
    atomic_write(path, "\n".join(lines) + "\n")


def print_table(rows: list[dict], problems: list[tuple[str, str]], file=None) -> None:
    """One rich table per comparison group on the console, then the skipped files."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, width=max(160, Console(file=file).width))
    for label, group_rows in row_groups(rows):
        cols = group_columns(group_rows, CONSOLE_KEYS)
        t = Table(title=f"{label} (accuracy %, mean ± std over seeds)")
        for _, head, kind in cols:
            t.add_column(head, justify="left" if kind == "str" else "right")
        for values in cells_frame(group_rows, cols).itertuples(index=False):
            t.add_row(*values)
        console.print(t)
    if not rows:
        console.print("Leaderboard: no results")
    for p, why in problems:
        console.print(f"[yellow]skipped[/yellow] {p}: {why}")
