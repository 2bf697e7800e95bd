"""The Python steps of scripts/gpu_check.sh (and the wheel list of scripts/gpu_wheels.sh), one subcommand each:

  wheels LOCK             the distributions a bare GPU image lacks, pinned from requirements.lock (one a line)
  versions FILE           python, torch, CUDA, cuDNN, the device and the suite's packages, as JSON
  install WHEELS          pip-install (no network, no dependency resolution) the listed distributions that are
                          missing here, from the wheel folder; exit 1 when any is still missing
  engines FILE            PlainEngine and DeepSpeed ZeRO 0-3 (and ZeRO-2 bf16) in one process, on this
                          process's device: three SGD steps each on one fixed batch from the same weights
  summary DIR             DIR/summary.json from the steps' records, results and perf files; exit 1 when a
                          step failed

Only the standard library at import time: ``install`` runs before the suite's dependencies are there.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

# What `bench run` / `bench perf` import that the bare image (torch, torchvision, timm, peft, pandas, scipy,
# pyyaml, tqdm, scikit-learn and their dependencies) lacks: (distribution, binary wheel per python version).
# Ray, W&B, matplotlib and optuna are left out by design (scripts/gpu_check.sh's header says why).
NEEDED = [("webdataset", False), ("wids", False), ("braceexpand", False), ("pyautoattack", False),
          ("deepspeed", False), ("hjson", False), ("ninja", False), ("einops", False), ("msgpack", True),
          ("py-cpuinfo", False), ("pydantic", False), ("pydantic-core", True), ("annotated-types", False),
          ("typing-inspection", False)]
# The targets of docs/perf.md, read from the perf files.
TARGETS = {"fast_vs_fp32_eager": 2.0, "mfu": 0.40, "loader_headroom": 10.0}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock: Path) -> dict[str, str]:
    out = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def cmd_wheels(args) -> int:
    """``NAME==VERSION binary|any`` per needed distribution, at the lock's version."""
    locked = locked_versions(Path(args.lock))
    missing = [name for name, _ in NEEDED if _norm(name) not in locked]
    if missing:
        print(f"gpu_check_steps: error: not in {args.lock}: {', '.join(missing)}", file=sys.stderr)
        return 2
    for name, binary in NEEDED:
        print(f"{name}=={locked[_norm(name)]} {'binary' if binary else 'any'}")
    return 0


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def cmd_versions(args) -> int:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2 ** 30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
    info["packages"] = {name: _installed(name) for name in
                        ["torchvision", "timm", "peft", "numpy", "pandas", "scipy", "scikit-learn", "pyyaml",
                         "tqdm", "ray", "wandb", "matplotlib"] + [n for n, _ in NEEDED]}
    Path(args.file).write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


def cmd_install(args) -> int:
    wheels = Path(args.wheels)
    missing = [name for name, _ in NEEDED if _installed(name) is None]
    print(f"python {platform.python_version()}; needed: {', '.join(n for n, _ in NEEDED)}")
    if not missing:
        print("nothing missing: every needed distribution is installed")
        return 0
    print(f"missing: {', '.join(missing)}")
    if not wheels.is_dir():
        print(f"no wheel folder {wheels} (make it with scripts/gpu_wheels.sh and carry it)")
        return 1
    # --no-deps: exactly the missing ones, so pip never reaches for an index for what the image has
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels), *missing]
    for extra in ([], ["--break-system-packages"]):  # an image whose python is "externally managed" (PEP 668)
        print("$", " ".join(cmd + extra), flush=True)
        done = subprocess.run(cmd + extra, capture_output=True, text=True)
        print(done.stdout[-4000:], done.stderr[-4000:], sep="\n", flush=True)
        if done.returncode == 0 or "externally-managed" not in done.stderr:
            break
    md_missing = [name for name in missing if _installed(name) is None]
    if md_missing:
        print(f"still missing after the install: {', '.join(md_missing)}")
        return 1
    print("installed: " + ", ".join(f"{n}=={_installed(n)}" for n in missing))
    return 0


def _engine_rows(backbone: str, steps: int, file: Path) -> dict[str, dict]:
    import torch
    import torch.nn.functional as F

    from bench.backbones import create_backbone
    from bench.config import resolve_config
    from bench.engine import PlainEngine, build_engine, trial_device

    device = trial_device()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (16,), generator=g).to(device)
    rows: dict[str, dict] = {}
    for name, stage, bf16 in (("plain", None, False), ("zero0", 0, False), ("zero1", 1, False),
                              ("zero2", 2, False), ("zero3", 3, False), ("zero2_bf16", 2, True)):
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = create_backbone(backbone, 10, image_size=32).to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            if stage is None:
                engine = PlainEngine(model, opt)
            else:
                cfg = resolve_config("ft", {"batch_size": 16, "zero_stage": stage, "bf16": bf16,
                                            "backbone": backbone})
                engine = build_engine(model, opt, cfg)
            losses, times = [], []
            for _ in range(steps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                xb = x.to(torch.bfloat16) if bf16 else x
                loss = F.cross_entropy(engine(xb).float(), y)
                engine.backward(loss)
                engine.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                losses.append(float(loss))
            rows[name] = {"device": str(device), "losses": losses, "loss_fell": losses[-1] < losses[0],
                          "step_s": statistics.median(times[1:] or times),
                          "setup_and_steps_s": round(time.perf_counter() - t0, 2)}
            del engine, model, opt
        except Exception as e:  # one engine that fails is recorded; the others still run
            rows[name] = {"device": str(device), "error": f"{type(e).__name__}: {e}"[:2000]}
        print(name, json.dumps(rows[name]), flush=True)
        file.write_text(json.dumps(rows, indent=2))  # a timeout leaves the rows done so far
    plain = rows.get("plain", {}).get("losses")
    for name, row in rows.items():  # fp32 ZeRO stages train exactly what the plain engine trains
        if plain and "losses" in row and name != "plain" and not name.endswith("bf16"):
            row["max_loss_diff_vs_plain"] = max(abs(a - b) for a, b in zip(row["losses"], plain))
    return rows


def cmd_engines(args) -> int:
    rows = _engine_rows(args.backbone, args.steps, Path(args.file))
    Path(args.file).write_text(json.dumps(rows, indent=2))
    import torch.distributed as dist

    if dist.is_initialized():  # DeepSpeed's process group: left open, the interpreter may wait on it at exit
        dist.destroy_process_group()
    return 1 if any("error" in r for r in rows.values()) else 0


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _run_brief(result: dict | None) -> dict:
    if not isinstance(result, dict):
        return {"status": "no result.json"}
    out = {"status": result.get("status")}
    if result.get("status") != "ok":
        out["error"] = str(result.get("error", ""))[:500]
        return out
    for block in ("metrics", "fewshot"):
        for k in ("clean_acc", "pgd_acc", "adv_acc"):
            if k in (result.get(block) or {}):
                out[k] = result[block][k]
    cost = result.get("cost") or {}
    out.update({k: cost.get(k) for k in ("device", "wall_s", "train_s", "images_per_s")})
    return out


def _target(value, target: float) -> dict:
    return {"value": value, "target": target, "met": None if value is None else bool(value >= target)}


def _perf_figures(out_dir: Path) -> dict:
    loader = _read_json(out_dir / "perf_loader.json") or {}
    paper = _read_json(out_dir / "perf_paper_step.json") or {}
    report = {k: v for k, v in (("loader", loader.get("loader")), ("paper_step", paper.get("paper_step"))) if v}
    figures: dict = {"device": (paper.get("host") or loader.get("host") or {}).get("device")}
    steps = (report.get("paper_step") or {}).get("steps") or {}
    figures["paper_step"] = {k: {f: r.get(f) for f in ("step_s", "images_per_s", "speedup_vs_fp32_eager",
                                                       "mfu_fastest", "error") if f in r}
                             for k, r in steps.items()}
    if report.get("paper_step"):
        figures["batch"] = report["paper_step"].get("batch")
        figures["fast_variant"] = report["paper_step"].get("fast_variant")
        figures["estimate"] = report["paper_step"].get("estimate")
    if report.get("loader") and report.get("paper_step"):
        try:
            from bench.perf import _loader_vs_training  # the same headroom `bench perf` computes in one run

            _loader_vs_training(report)
        except Exception as e:  # noqa: BLE001 - the summary is written whatever failed
            figures["loader_vs_training_error"] = f"{type(e).__name__}: {e}"
    if report.get("loader"):
        figures["loader_rows"] = report["loader"].get("rows")
    figures["loader_vs_training"] = report.get("loader_vs_training")
    fast = steps.get("autolora/fast") or {}
    headrooms = [r["headroom"] for r in (report.get("loader_vs_training") or {}).get("paper_rows", [])]
    figures["targets"] = {
        "autolora fast (bf16 autocast + channels_last + compile) vs fp32 eager": _target(
            fast.get("speedup_vs_fp32_eager"), TARGETS["fast_vs_fp32_eager"]),
        "autolora MFU of the fastest variant": _target(fast.get("mfu_fastest"), TARGETS["mfu"]),
        "loader headroom over the paper step (best worker count, 224 px JPEG)": _target(
            max(headrooms) if headrooms else None, TARGETS["loader_headroom"]),
    }
    return figures


def cmd_summary(args) -> int:
    out_dir = Path(args.dir)
    steps = {}
    for line in (out_dir / "steps.jsonl").read_text().splitlines() if (out_dir / "steps.jsonl").exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        steps[row.pop("step")] = row
    by_design = ("dry-run", "nvidia-smi not found")
    failed = [n for n, r in steps.items()
              if (r.get("rc") not in (0, None)) or (r.get("skipped") and not r["skipped"].startswith(by_design))]
    runs = {}
    for d in sorted(p for p in (out_dir / "runs").glob("*") if p.is_dir()):
        method, _, dtype = d.name.rpartition("-")
        runs[f"{method}/{dtype}"] = _run_brief(_read_json(d / "result.json"))
    summary = {
        "device": args.device, "dry_run": bool(int(args.dry_run)), "budget_s": args.budget,
        "wall_s": round(time.time() - args.started, 1) if args.started else None,
        "ok": not failed, "failed_steps": failed, "steps": steps,
        "versions": _read_json(out_dir / "versions.json"),
        "runs": runs, "engines": _read_json(out_dir / "engines.json"), "perf": _perf_figures(out_dir),
        "left_out_by_design": {"ray": "its wheel alone is larger than the 64 MiB a device call carries: no sweep, "
                                      "no `bench perf --only tune`",
                               "wandb": "tracking off (BENCH_WANDB=off)", "matplotlib/optuna": "not part of a trial"},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps({k: summary[k] for k in ("device", "dry_run", "wall_s", "ok", "failed_steps")}))
    for name, row in runs.items():
        print(f"  {name}: {json.dumps(row)}")
    for name, t in summary["perf"]["targets"].items():
        print(f"  target {name}: {t['value']} (>= {t['target']}: {t['met']})")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check_steps.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("wheels")
    s.add_argument("lock")
    s.set_defaults(func=cmd_wheels)
    s = sub.add_parser("versions")
    s.add_argument("file")
    s.set_defaults(func=cmd_versions)
    s = sub.add_parser("install")
    s.add_argument("wheels")
    s.set_defaults(func=cmd_install)
    s = sub.add_parser("engines")
    s.add_argument("file")
    s.add_argument("--backbone", default="cifar_resnet18_aa")
    s.add_argument("--steps", type=int, default=3)
    s.set_defaults(func=cmd_engines)
    s = sub.add_parser("summary")
    s.add_argument("dir")
    s.add_argument("--device", default="cuda")
    s.add_argument("--dry-run", default="0")
    s.add_argument("--budget", type=int, default=None)
    s.add_argument("--started", type=float, default=None)
    s.set_defaults(func=cmd_summary)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
