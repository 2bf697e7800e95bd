"""``bench``: the command line. Each subcommand lives in its own module and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# Subcommand modules, each with ``add_parser(subparsers)``; imported lazily so ``bench run`` never pays
# for Ray and ``bench leaderboard`` never pays for DeepSpeed.
SUBCOMMANDS = ("bench.cli.shards", "bench.cli.run", "bench.cli.evaluate", "bench.cli.reproduce", "bench.sweep.driver",
               "bench.report.leaderboard", "bench.perf")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench", description="Robust LoRA fine-tuning benchmark suite")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a subcommand still under construction
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:
        if os.environ.get("BENCH_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"bench {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
