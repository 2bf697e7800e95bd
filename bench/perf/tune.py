"""Ray Tune's cost on this machine: per-trial overhead against the same trial run directly, throughput of
1 vs 2 concurrent trials, and the time from ``bench sweep`` start to the first trial running.

``tune_benchmark(quick)`` returns a JSON-able dict; ``python -m bench.perf.tune [--quick]`` prints it.
The trial is ``rft`` on the embedded digits with the tiny_cnn backbone; quick mode uses ~10 s trials
(under 2 minutes in all), full mode ~30 s trials as the issue asks.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _budget(quick: bool) -> dict:
    if quick:
        return {"epochs": 1, "max_train_samples": 256, "n_eval": 64, "n_val": 32, "train_attack_steps": 1,
                "eval_pgd_steps": 2, "val_pgd_steps": 1, "autoattack_version": "off", "batch_size": 64}
    return {"epochs": 3, "max_train_samples": 1024, "n_eval": 256, "n_val": 64, "train_attack_steps": 3,
            "eval_pgd_steps": 5, "val_pgd_steps": 2, "autoattack_version": "off", "batch_size": 64}


def _shards_root(work: Path) -> Path:
    root = Path(os.environ.get("BENCH_SHARDS", ROOT / "shards"))
    if (root / "digits" / "_info.json").exists():
        return root.resolve()
    from data_shards.digits import make_digits

    make_digits(work / "shards")
    return (work / "shards").resolve()


def _sweep_file(work: Path, name: str, budget: dict, lrs: list[float], concurrent: int) -> Path:
    doc = {"name": name, "methods": ["rft"], "dataset": "digits", "backbone": "tiny_cnn", "fixed": budget,
           "space": {"lr": {"grid": lrs}}, "max_concurrent_trials": concurrent, "max_failures": 0,
           "resources": {"cpus": 1}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _direct(work: Path, shards: Path, budget: dict) -> float:
    """The trial as `bench run` in its own process: wall time of the command."""
    cmd = [sys.executable, "-m", "bench", "run", "--method", "rft", "--backbone", "tiny_cnn", "--no-progress",
           "--out", str(work / "direct"), "--data-root", str(shards), "--set", "lr=0.01"]
    for k, v in budget.items():
        cmd += ["--set", f"{k}={v}"]
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"), OMP_NUM_THREADS="1")
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return time.time() - t0


def _sweep(work: Path, shards: Path, name: str, budget: dict, lrs: list[float], concurrent: int) -> dict:
    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep

    spec = load_sweep(_sweep_file(work, name, budget, lrs, concurrent))
    res = work / name
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # `bench perf` prints its JSON on stdout
        summary = run_sweep(spec, res, data_root=shards, leaderboard=False, verbose=0, num_cpus=2)
    wall = time.time() - t0
    starts = []
    for f in res.glob("*/attempts.jsonl"):
        starts += [json.loads(line)["time"] for line in f.read_text().splitlines()]
    trial_wall = [json.loads(p.read_text()).get("cost", {}).get("wall_s") for p in res.glob("*/result.json")]
    return {"wall_s": wall, "n_trials": summary["n_trials"], "n_ok": summary["n_ok"],
            "first_trial_s": (min(starts) - t0) if starts else None,
            "trial_wall_s": [w for w in trial_wall if w is not None]}


def tune_benchmark(quick: bool = True) -> dict:
    os.environ.setdefault("WANDB_MODE", "offline")
    budget = _budget(quick)
    out: dict = {"quick": quick, "trial": {"method": "rft", "backbone": "tiny_cnn", **budget}}
    with tempfile.TemporaryDirectory(prefix="bench_perf_tune_") as tmp:
        work = Path(tmp)
        shards = _shards_root(work)
        direct = _direct(work, shards, budget)
        one = _sweep(work, shards, "one", budget, [0.01], 1)
        out["direct_s"] = round(direct, 2)
        out["tune_one_trial_s"] = round(one["wall_s"], 2)
        out["tune_overhead_ratio"] = round(one["wall_s"] / direct, 3)
        out["sweep_start_to_first_trial_s"] = None if one["first_trial_s"] is None else round(one["first_trial_s"], 2)
        n = 2 if quick else 4
        lrs = [0.01 * (i + 1) for i in range(n)]
        seq = _sweep(work, shards, "seq", budget, lrs, 1)
        par = _sweep(work, shards, "par", budget, lrs, 2)
        out["throughput"] = {
            "trials": n,
            "concurrent_1_trials_per_min": round(60 * seq["n_ok"] / seq["wall_s"], 2),
            "concurrent_2_trials_per_min": round(60 * par["n_ok"] / par["wall_s"], 2),
            "speedup_2_vs_1": round(seq["wall_s"] / par["wall_s"], 3),
            "wall_s": {"concurrent_1": round(seq["wall_s"], 1), "concurrent_2": round(par["wall_s"], 1)},
        }
        out["notes"] = ("tune_one_trial_s includes starting and stopping a local Ray; direct_s includes Python and "
                        "DeepSpeed start-up of `bench run`; 2 CPUs: 2 concurrent trials share the cores")
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(tune_benchmark(quick="--quick" in sys.argv), indent=2))
