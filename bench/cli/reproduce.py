"""``bench reproduce RUN_DIR``: re-run a trial from its result.json alone and compare every metric.

The trial's method, resolved config (seed included), data and backbone come from RUN_DIR/result.json; it runs
through ``bench run``'s code path (``bench.trial.run_trial``) into ``--out`` (default RUN_DIR/_reproduce: a
folder named ``_...`` is not a leaderboard entry, and the original run is never touched). Before any work the
recorded provenance is checked against the present -- code commit and uncommitted changes, lock file, each data
set's manifest and shard files, backbone weights -- and each difference is one line; the run then goes ahead
only with ``--force``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPRODUCE_DIR = "_reproduce"
REPORT_FILE = "reproduce.json"


def add_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="re-run a trial from its result.json and compare its metrics",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished trial's folder (holds result.json)")
    p.add_argument("--out", type=Path, default=None, help=f"folder of the re-run (default: RUN_DIR/{REPRODUCE_DIR})")
    p.add_argument("--data-root", type=Path, default=None,
                   help="shards root (default: the one recorded in result.json's provenance)")
    p.add_argument("--force", action="store_true", help="re-run even when code, lock, data or weights differ")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def load_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"no result.json in {run_dir}")
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if result.get("status") != "ok" or not isinstance(result.get("config"), dict):
        raise ValueError(f"{path} is not a finished trial (status {result.get('status')!r})")
    return result


def trial_config(result: dict[str, Any], run_dir: Path):
    """The trial's resolved config. A pool that the trial trained itself (amt: ``pool_dir`` inside RUN_DIR) is
    trained again: the config goes back to the one ``bench run`` was given."""
    from bench.config import resolve_config

    values = {k: v for k, v in result["config"].items() if k != "method"}
    pool_dir = values.get("pool_dir")
    if pool_dir and Path(pool_dir).resolve().is_relative_to(Path(run_dir).resolve()):
        values["pool_dir"] = None
    return resolve_config(result["method"], values)


def metric_values(result: dict[str, Any]) -> dict[str, float]:
    """Every number of ``metrics``, ``fewshot`` and the per-target few-shot blocks, by dotted name."""
    out: dict[str, float] = {}
    blocks = [("metrics", result.get("metrics")), ("fewshot", result.get("fewshot"))]
    targets = result.get("fewshot_targets")
    if isinstance(targets, dict):
        blocks += [(f"fewshot@{t}", b) for t, b in targets.items()]
    for prefix, block in blocks:
        for k, v in (block or {}).items() if isinstance(block, dict) else ():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}.{k}"] = float(v)
    return out


def compare(recorded: dict[str, Any], reproduced: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric in either result: recorded, reproduced and their difference (None where absent)."""
    a, b = metric_values(recorded), metric_values(reproduced)
    rows = []
    for name in [*a, *[n for n in b if n not in a]]:
        ra, rb = a.get(name), b.get(name)
        diff = rb - ra if ra is not None and rb is not None else None
        rows.append({"metric": name, "recorded": ra, "reproduced": rb, "diff": diff,
                     "same": diff == 0})
    return rows


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.6g}"


def print_comparison(rows: list[dict[str, Any]], differed: list[tuple[str, str]], file=None) -> None:
    file = file or sys.stdout
    if differed:
        print(f"inputs that differed from the recorded run (--force): {', '.join(sorted({k for k, _ in differed}))}",
              file=file)
    width = max([len("metric"), *(len(r["metric"]) for r in rows)])
    print(f"{'metric':<{width}}  {'recorded':>12}  {'reproduced':>12}  {'difference':>12}", file=file)
    for r in rows:
        diff = "–" if r["diff"] is None else ("0" if r["diff"] == 0 else f"{r['diff']:+.6g}")
        print(f"{r['metric']:<{width}}  {_fmt(r['recorded']):>12}  {_fmt(r['reproduced']):>12}  {diff:>12}",
              file=file)
    same = sum(r["same"] for r in rows)
    print(f"{same}/{len(rows)} metrics identical", file=file)


def run(args) -> int:
    from bench.files import atomic_write_json
    from bench.provenance import differences
    from bench.trial import check_inputs, run_trial

    run_dir = Path(args.run_dir)
    result = load_run(run_dir)
    prov = result.get("provenance")
    cfg = trial_config(result, run_dir)
    data_root = args.data_root or (prov or {}).get("data_root")
    out = Path(args.out) if args.out is not None else run_dir / REPRODUCE_DIR
    if out.resolve() == run_dir.resolve():
        raise ValueError(f"--out {out} is the original run's folder; give another")
    if not isinstance(prov, dict):
        differed = [("provenance", f"{run_dir / 'result.json'} has no provenance: nothing to check the present "
                                   f"against")]
    else:
        check_inputs(cfg, data_root)  # the data set and backbone exist at all: one line from main() if not
        differed = differences(prov, cfg, data_root)
    if differed and not args.force:
        for _, line in differed:
            print(f"bench reproduce: {line}", file=sys.stderr)
        print("bench reproduce: not reproducing a run whose inputs differ; --force runs it anyway", file=sys.stderr)
        return 2
    for _, line in differed:
        print(f"warning: {line}", file=sys.stderr)
    if (out / "result.json").is_file() and json.loads((out / "result.json").read_text()).get("status") == "ok":
        print(f"{out} holds a finished reproduction: compared as it is (remove it to run again)", file=sys.stderr)
    reproduced = run_trial(cfg, out, data_root=data_root, progress=not args.no_progress,
                           run_id=f"{result.get('id') or cfg.method}-reproduce")
    rows = compare(result, reproduced)
    print_comparison(rows, differed)
    atomic_write_json(out / REPORT_FILE, {"run_dir": str(run_dir.resolve()), "out": str(out.resolve()),
                                          "differed": [{"input": k, "line": v} for k, v in differed],
                                          "metrics": rows, "identical": all(r["same"] for r in rows)})
    print(f"wrote {out / 'result.json'} and {out / REPORT_FILE}")
    return 0
