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
               "bench.report.leaderboard", "bench.perf", "bench.cli.wandb_sync")
INTERRUPTED = 130  # the shell's exit status of a command ended by Ctrl-C (128 + SIGINT)


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


def _own_wandb_service() -> None:
    """Forget a W&B service inherited from the process that started this one (``WANDB_SERVICE`` names the
    pid that owns it): runs in a borrowed service outlive this process, so after a Ctrl-C or a kill the
    trial's run id stays claimed there and the resume's ``wandb.init`` fails with "run ID ... is in use"."""
    token = os.environ.get("WANDB_SERVICE", "")
    parts = token.split("-")
    if token and not (len(parts) > 1 and parts[1] == str(os.getpid())):
        os.environ.pop("WANDB_SERVICE", None)


def main(argv: list[str] | None = None) -> int:
    _own_wandb_service()
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    from bench.logs import quiet_routine_output

    quiet_routine_output()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        # Ctrl-C: one line saying what was kept and how to go on (BENCH_DEBUG=1 shows the traceback)
        if os.environ.get("BENCH_DEBUG"):
            raise
        _close_bars()
        say = getattr(args, "on_interrupt", None)
        try:
            line = say(args, argv) if say else "interrupted"
        except Exception:  # noqa: BLE001 - the message must not become a traceback itself
            line = "interrupted"
        print(f"\nbench {args.command}: {line}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except (ValueError, FileNotFoundError, KeyError, PermissionError) as e:
        if os.environ.get("BENCH_DEBUG"):
            raise
        if isinstance(e, PermissionError) and e.filename:
            msg = f"cannot write {e.filename}: {e.strerror}"
        else:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"bench {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _close_bars() -> None:
    """Progress bars left open by the interrupted work close now, not over the message below them."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
    except Exception:  # noqa: BLE001
        pass


if __name__ == "__main__":
    raise SystemExit(main())
