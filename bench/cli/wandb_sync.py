"""``bench wandb-sync RESULTS``: upload every offline W&B run of a results folder (a sweep's or a trial's).

``wandb sync`` wants run folders, which sit one level below each trial's ``wandb/``; this finds them
(``bench.report.tracking.offline_runs``, Tune's ``_tune`` left out) and passes them all to one ``wandb sync``,
which appends the folders of a resumed trial (one per start, same run id) into one run, in start order.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("wandb-sync", help="upload every offline W&B run under a results or run folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("results", type=Path, help="a results folder (bench sweep) or a run folder (bench run --out)")
    p.add_argument("--project", default=None, help="upload into this project (default: the runs' own)")
    p.add_argument("--entity", default=None, help="upload into this entity (default: your default entity)")
    p.add_argument("--dry-run", action="store_true", help="print the wandb command and stop")
    p.set_defaults(func=run)


def wandb_sync_argv(runs: list[Path], project: str | None = None, entity: str | None = None) -> list[str]:
    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    argv = [exe, "sync"]
    if project:
        argv += ["--project", project]
    if entity:
        argv += ["--entity", entity]
    return argv + [str(r) for r in runs]


def run(args) -> int:
    from bench.report.tracking import offline_runs

    if not args.results.is_dir():
        raise FileNotFoundError(f"{args.results} is not a folder")
    runs = offline_runs(args.results)
    if not runs:
        raise ValueError(f"no offline W&B runs under {args.results} (they sit in <trial>/wandb/offline-run-*)")
    argv = wandb_sync_argv(runs, args.project, args.entity)
    print(f"bench wandb-sync: {len(runs)} offline run folder(s) under {args.results}", flush=True)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    return subprocess.call(argv)
