"""``bench run``: one trial, in this process (or in each torchrun process)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run one trial and write DIR/result.json",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", required=True, help="a registered method (see `bench run --list`)")
    p.add_argument("--dataset", default="digits", help="data set name under the shards root, or a shards folder")
    p.add_argument("--backbone", default="cifar_resnet18_aa", help="registered backbone, timm name, or NAME@weights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (repeatable), e.g. --set epochs=1 --set eps=8/255")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/METHOD-DATASET-HASH-sSEED)")
    p.add_argument("--data-root", type=Path, default=None, help="shards root (default: $BENCH_SHARDS or ./shards)")
    p.add_argument("--pool-cache", type=Path, default=None,
                   help="runs a trial needs first (amt: its pool members) go in (and are reused from) this folder, "
                        "named by their settings, so runs that differ only in merge settings share the members "
                        "(default: OUT/_prerequisites)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, on_interrupt=_interrupted)


def _interrupted(args, argv: list[str]) -> str:
    """What Ctrl-C left: the finished epochs (kept by the checkpoint) and the command that resumes after them."""
    import shlex

    out = getattr(args, "resolved_out", None)
    again = f"bench {shlex.join(argv)}" + ("" if args.out else f" --out {shlex.quote(str(out))}" if out else "")
    done = 0
    try:
        done = len(json.loads((Path(out) / "history.json").read_text())) if out else 0
    except (OSError, ValueError):
        pass
    kept = f"epochs 1-{done} are saved in {out}" if done else "no epoch finished yet"
    return f"interrupted; {kept}; resume with: {again}"


def run(args) -> int:
    # the first line, before the imports and the set-up (torch, the data, the backbone, DeepSpeed: seconds)
    print(f"bench run: {args.method} on {args.dataset} ({args.backbone}): loading", flush=True)
    from bench.config import PATH_FIELDS, absolute_paths, config_hash, parse_set_args, resolve_config, with_overrides
    from bench.files import check_writable
    from bench.trial import check_inputs, run_trial, write_error_result
    from data_shards.reader import ShardError

    overrides = parse_set_args(args.overrides)
    overrides.update(dataset=args.dataset, backbone=args.backbone)
    if args.seed is not None:
        overrides["seed"] = args.seed
    cfg = resolve_config(args.method, overrides)
    # relative paths as a sweep's trials get them: absolute, against the folder the command started in
    paths = {k: getattr(cfg, k) for k in PATH_FIELDS if hasattr(cfg, k)}
    if absolute_paths(paths) != paths:
        cfg = with_overrides(cfg, absolute_paths(paths))
    out = args.out or Path("runs") / f"{cfg.method}-{cfg.dataset}-{config_hash(cfg)}-s{cfg.seed}"
    check_inputs(cfg, args.data_root)  # bad input: main() says so in one line, before any work
    args.resolved_out = out
    check_writable(out, "run folder")
    failure = None
    try:
        result = run_trial(cfg, out, data_root=args.data_root, progress=not args.no_progress,
                           prerequisites_dir=args.pool_cache)
    except Exception as exc:
        # a trial that failed mid-way leaves its record, as it does in a sweep
        write_error_result(cfg, Path(out), exc)
        if not isinstance(exc, ShardError) or os.environ.get("BENCH_DEBUG"):
            raise
        failure = ShardError.one_line(exc)  # bad data, not a bug: no traceback (BENCH_DEBUG=1 shows it)
    if failure is not None:
        gc.collect()  # the failed trial's progress bars close (and redraw) now, not below the message
        print(f"bench run: error: {failure} (wrote {Path(out) / 'result.json'})", file=sys.stderr)
        return 1
    shown = {k: result[k] for k in ("metrics", "fewshot") if k in result}
    print(json.dumps(shown, indent=2))
    print(f"wrote {Path(out) / 'result.json'}")
    return 0
