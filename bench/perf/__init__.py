"""``bench perf``: the performance benchmarks, as one JSON document.

Each section lives beside the code it measures (loader: the reader, autolora_step: the training step,
tune: Ray Tune's overhead, sharded_eval: AutoAttack as Ray shards, reliability: the indicators' cost against
the evaluation); this module only runs them and reports.
"""
from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
from pathlib import Path

SECTIONS = {
    "loader": ("bench.perf.loader", "loader_benchmark"),
    "autolora_step": ("bench.perf.autolora_step", "autolora_step_benchmark"),
    "tune": ("bench.perf.tune", "tune_benchmark"),
    "paper_step": ("bench.perf.paper_step", "paper_step_benchmark"),
    "sharded_eval": ("bench.perf.sharded_eval", "sharded_eval_benchmark"),
    "reliability": ("bench.perf.reliability", "reliability_benchmark"),
}


def add_parser(sub) -> None:
    p = sub.add_parser("perf", help="run the performance benchmarks and print JSON")
    p.add_argument("--only", action="append", choices=sorted(SECTIONS), help="run only these sections")
    p.add_argument("--quick", action="store_true", help="short runs (docs/perf.md gives each section's time; minutes on a 2-core CPU)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    p.set_defaults(func=run, on_interrupt=_interrupted)


def _interrupted(args, argv: list[str]) -> str:
    """Ctrl-C: nothing is printed or written, since a measurement cut short is no figure (Tune's own Ctrl-C
    handling surfaces as an interrupted sweep, bench.sweep.driver.SweepInterrupted)."""
    import shlex

    return f"interrupted; no figures recorded{f' in {args.out}' if args.out else ''}; rerun: bench {shlex.join(argv)}"


def _loader_vs_training(report: dict) -> None:
    """The loader must never be the bottleneck: compare its images/s with what the measured training steps eat
    (the 32-pixel AutoLoRa step, and the paper's ResNet-50 step against the 224-pixel JPEG rows: the target is
    at least 10x, on the machine this runs on)."""
    rows = [r for r in report.get("loader", {}).get("rows", []) if "shards_images_per_s" in r]
    out = {}
    step = report.get("autolora_step", {})
    if "step_s" in step:
        consumed = step.get("batch", 32) / step["step_s"]
        out["training_images_per_s"] = consumed
        out["rows"] = [{"image_size": r["image_size"], "workers": r["workers"],
                        "headroom": r["shards_images_per_s"] / consumed} for r in rows]
    paper = report.get("paper_step", {})
    fastest = min((r["step_s"] for k, r in paper.get("steps", {}).items() if k.startswith("autolora/")
                   and "step_s" in r), default=None)
    if fastest:
        consumed = paper["batch"] / fastest
        out["paper_step_images_per_s"] = consumed
        out["paper_rows"] = [{"workers": r["workers"], "headroom": r["shards_images_per_s"] / consumed}
                             for r in rows if r.get("image_size") == 224]
    if out and rows:
        report["loader_vs_training"] = out


def run(args: argparse.Namespace) -> int:
    print(f"bench perf: {', '.join(args.only or SECTIONS)}{' (quick)' if args.quick else ''}: loading",
          file=sys.stderr, flush=True)
    import torch

    if args.out:
        from bench.files import check_writable

        check_writable(args.out.parent, "folder of --out")
    report = {"host": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor()}}
    for name in args.only or SECTIONS:
        module_name, fn_name = SECTIONS[name]
        t0 = time.time()
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
            report[name] = fn(quick=args.quick)
        except Exception as e:  # one broken section must not hide the others' numbers
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        report[name]["section_wall_s"] = round(time.time() - t0, 2)
        print(f"perf: {name} done in {report[name]['section_wall_s']} s", file=sys.stderr)
    _loader_vs_training(report)
    text = json.dumps(report, indent=2, default=float)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0
