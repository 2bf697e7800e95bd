"""`bench leaderboard`: the leaderboard of a folder of result.json files -- md, csv, html, png, and optionally a W&B
leaderboard run and report -- built from the modules beside this one (results, stats, tables, page, plots,
wandb_report).

``python -m bench leaderboard RESULTS_DIR [--out DIR] [--wandb] [--wandb-report]``

Rows follow RobustBench's entry fields. Several seeds of one configuration (same method, dataset, backbone and
``bench.config.config_hash`` of the resolved config: seed and speed switches left out) make one row with mean ±
sample std (ddof=1) and n.

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
import sys
from pathlib import Path


def build_leaderboard(results_dir: Path, out_dir: Path | None = None, *, wandb_log: bool = False,
                      wandb_report: bool = False, console: bool = True, group: str | None = None,
                      problems: list | None = None, notes: list | None = None) -> list[dict]:
    """Build the leaderboard of ``results_dir`` into ``out_dir`` (default: ``results_dir``); return the rows.

    ``problems`` / ``notes``, when given, collect the skipped files (path, reason) and W&B notes.
    """
    # imported here: every `bench` command imports this module for its parser, and pandas/matplotlib are slow
    from bench.report.formats import attach_provenance
    from bench.report.page import write_html
    from bench.report.plots import plot_curves, plot_params, plot_pareto, plot_robustness_curve
    from bench.report.results import get, load_results
    from bench.report.stats import finish_rows, group_records
    from bench.report.tables import print_table, write_csv, write_md
    from bench.report.wandb_report import log_wandb_leaderboard, make_wandb_report

    results_dir = Path(results_dir)
    out_dir = Path(out_dir) if out_dir is not None else results_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    records, probs = load_results(results_dir)
    if problems is not None:
        problems.extend(probs)
    rows = finish_rows(group_records(records))
    attach_provenance(rows, records)
    images: list[Path] = []
    for name, fn, arg in (("pareto.png", plot_pareto, rows), ("curves.png", plot_curves, records),
                          ("params.png", plot_params, records),
                          ("robustness_curve.png", plot_robustness_curve, records)):
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
        sweeps = {str(get(r, "sweep", "name")) for r in records if get(r, "sweep", "name")}
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
    print(f"bench leaderboard: reading {results}", file=sys.stderr, flush=True)  # pandas and the plots take seconds
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
