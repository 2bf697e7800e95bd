"""The prepared device check (scripts/gpu_check.sh) cannot rot: it runs here as it would on a lent GPU, on the
CPU (``--device cpu --dry-run``: tiny budgets, CUDA checks skipped) and with imports limited to what the bare
GPU image has plus the wheel list (tests/bare_image/sitecustomize.py), so a change that breaks a step, or
that makes a trial import something the image lacks (Ray, W&B), fails here."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BARE_IMAGE = ["torch", "torchvision", "timm", "peft", "pandas", "scipy", "pyyaml", "tqdm", "scikit-learn"]


def _steps_module():
    spec = importlib.util.spec_from_file_location("gpu_check_steps", ROOT / "scripts" / "gpu_check_steps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wheel_list_is_pinned_by_the_lock():
    steps = _steps_module()
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check_steps.py"), "wheels",
                          str(ROOT / "requirements.lock")], capture_output=True, text=True, check=True).stdout
    locked = steps.locked_versions(ROOT / "requirements.lock")
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert "deepspeed==" + locked["deepspeed"] in lines and "pyautoattack==" + locked["pyautoattack"] in lines
    assert lines["pydantic-core==" + locked["pydantic-core"]] == "binary"
    assert not any(s.startswith(("ray==", "wandb==")) for s in lines)  # left out by design


# About 2 minutes of CPU (1 min 50 s measured, user + sys): shards, 6 tiny trials, 6 engines, the loader
# benchmark; 12.5 min of wall time on the shared VM at load 30-40, hence the generous budget
@pytest.mark.slow
def test_dry_run_on_cpu_with_the_bare_image_imports(tmp_path):
    out = tmp_path / "check"
    needed = [name for name, _ in _steps_module().NEEDED]
    env = dict(os.environ, PYTHON=sys.executable, BENCH_BARE_IMAGE=",".join(BARE_IMAGE + needed),
               PYTHONPATH=str(ROOT / "tests" / "bare_image"))
    env.pop("OUT", None)
    # rft (supervised), amt (a pool of 2 members, then the merge) and a method that does not exist: its two
    # runs fail, and nothing else may fail because of them
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--dry-run",
                           "--out", str(out), "--work", str(tmp_path / "work"),
                           "--methods", "rft,amt,no_such_method", "--budget", "900"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1000)
    summary = json.loads((out / "summary.json").read_text())
    logs = {p.name: p.read_text()[-1500:] for p in (out / "logs").glob("*.log")}
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failed runs make the check fail, at the end
    assert summary["failed_steps"] == ["run_no_such_method_fp32", "run_no_such_method_bf16"], (summary, logs)
    assert "unknown method 'no_such_method'" in logs["run_no_such_method_fp32.log"]
    assert summary["dry_run"] and summary["wall_s"] <= 900
    assert summary["steps"]["perf_paper_step"]["skipped"].startswith("dry-run")
    assert summary["steps"]["install"]["rc"] == 0 and "nothing missing" in logs["install.log"]
    assert summary["versions"]["cuda_available"] is False  # --device cpu hides any GPU

    for name in ("rft/fp32", "rft/bf16"):
        run = summary["runs"][name]
        assert run["status"] == "ok" and 0 <= run["pgd_acc"] <= run["clean_acc"] <= 1
        assert run["device"].startswith("cpu")
    for name in ("amt/fp32", "amt/bf16"):
        run = summary["runs"][name]
        assert run["status"] == "ok" and 0 <= run["adv_acc"] <= run["clean_acc"] <= 1
        assert (out / "runs" / name.replace("/", "-") / "pool.json").is_file()
    bf16 = json.loads((out / "runs" / "rft-bf16" / "result.json").read_text())
    assert bf16["config"]["bf16_autocast"] is True

    engines = summary["engines"]
    assert set(engines) == {"plain", "zero0", "zero1", "zero2", "zero3", "zero2_bf16"}
    for name, row in engines.items():
        assert "error" not in row and len(row["losses"]) == 3, (name, row)
    for name in ("zero0", "zero1", "zero2", "zero3"):  # DeepSpeed in fp32 trains exactly what plain SGD does
        assert engines[name]["max_loss_diff_vs_plain"] < 1e-3, engines
    assert engines["plain"]["losses"][-1] < engines["plain"]["losses"][0]

    loader = json.loads((out / "perf_loader.json").read_text())["loader"]
    assert loader["rows"] and all(r["shards_images_per_s"] > 0 for r in loader["rows"] if "shards_images_per_s" in r)
    targets = summary["perf"]["targets"]
    assert len(targets) == 3 and all(t["value"] is None and t["met"] is None for t in targets.values())


def test_bad_arguments_fail_in_one_line(tmp_path):
    for args, message in ((["--device", "tpu"], "--device must be cuda or cpu"),
                          (["--budget", "ten"], "--budget must be whole seconds"),
                          (["--bogus"], "unknown argument --bogus")):
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path / "x"), *args],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
