"""``bench run`` end to end on the embedded default: result.json, errors before work, resume after a kill."""
from __future__ import annotations

import json
import re
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "max_train_samples=64", "--set", "n_eval=32", "--set", "n_val=32", "--set", "batch_size=32",
        "--set", "train_attack_steps=2", "--set", "eval_pgd_steps=3", "--set", "val_pgd_steps=2"]


def bench(*args, env=None, **kw):
    e = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", **(env or {}))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "bench", *args], env=e, capture_output=True, text=True,
                          timeout=900, **kw)


def test_run_rft_writes_complete_result(shards_root, tmp_path):
    out = tmp_path / "rft"
    p = bench("run", "--method", "rft", "--dataset", "digits", "--backbone", "cifar_resnet18_aa",
              "--data-root", str(shards_root), "--out", str(out), "--no-progress", "--set", "epochs=1",
              "--set", "autoattack_version=apgd-ce", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    for key in ("id", "method", "dataset", "backbone", "seed", "config", "config_hash", "metrics", "cost",
                "versions"):
        assert key in r, key
    m = r["metrics"]
    assert set(m) == {"clean_acc", "pgd_acc", "pgd_steps", "pgd_step_size", "pgd_restarts", "eps", "autoattack_acc",
                      "autoattack_version", "robust_acc", "robust_attack", "n_eval"}
    assert 0 <= m["robust_acc"] <= min(m["autoattack_acc"], m["pgd_acc"]) <= m["clean_acc"] <= 1
    assert m["n_eval"] == 32 and m["pgd_steps"] == 3 and m["robust_attack"] == "AutoAttack apgd-ce"
    assert m["autoattack_version"] == "apgd-ce"
    assert set(r["cost"]) == {"wall_s", "train_s", "eval_s", "device", "images_per_s"}
    assert set(r["versions"]) == {"torch", "timm", "peft", "ray", "deepspeed", "bench"}
    assert yaml.safe_load((out / "args.yaml").read_text())["epochs"] == 1
    assert list((out / "wandb").glob("offline-run-*")), "an offline W&B run lands beside the result"


def test_autoattack_off_leaves_metric_absent(shards_root, tmp_path):
    out = tmp_path / "ft"
    p = bench("run", "--method", "ft", "--backbone", "tiny_cnn", "--data-root", str(shards_root), "--out", str(out),
              "--no-progress", "--set", "epochs=1", "--set", "autoattack_version=off", *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert "autoattack_acc" not in m and "autoattack_version" not in m and "pgd_acc" in m


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'; valid:"),
    (["--method", "rft", "--set", "eps=8"], "eps=8 is above 16/255 (pixel scale): did you mean eps=8/255?"),
    (["--method", "rft", "--set", "eps=1"], "did you mean eps=1/255? set allow_large_eps=true to run it as given"),
    (["--method", "rft", "--set", "epochs=0"], "epochs=0 must be >= 1 (0 would evaluate an untrained head)"),
    # (the other range checks, in process: tests/test_foundation.py RANGE_CASES)
    (["--method", "rft", "--backbone", "tiny_cnn@weights/none.pt"], "weights file {cwd}/weights/none.pt does not exist"),
    (["--method", "rft", "--set", "epoch=1"], "unknown config field 'epoch'"),
    (["--method", "rft", "--dataset", "cifar77"], "no shards for data set 'cifar77'"),
    (["--method", "rft", "--backbone", "resnet_nope"], "unknown backbone 'resnet_nope'"),
])
def test_bad_input_is_one_line_error_before_work(shards_root, tmp_path, args, message):
    out = tmp_path / "bad"
    p = bench("run", *args, "--data-root", str(shards_root), "--out", str(out), cwd=tmp_path)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message.format(cwd=tmp_path) in lines[0], p.stderr
    assert not (out / "result.json").exists()


def test_rerun_with_other_config_keeps_existing_run(shards_root, tmp_path):
    out = tmp_path / "keep"
    out.mkdir()
    (out / "args.yaml").write_text(yaml.safe_dump({"method": "ft", "epochs": 7}))
    (out / "result.json").write_text("{\"precious\": true}")
    p = bench("run", "--method", "ft", "--backbone", "tiny_cnn", "--data-root", str(shards_root), "--out", str(out),
              "--set", "epochs=1")
    assert p.returncode == 2 and "holds a run with another config" in p.stderr
    assert json.loads((out / "result.json").read_text()) == {"precious": True}


def test_killed_trial_resumes_from_last_checkpoint(shards_root, tmp_path):
    out = tmp_path / "resume"
    args = ["run", "--method", "ft", "--backbone", "tiny_cnn", "--data-root", str(shards_root), "--out", str(out),
            "--no-progress", "--set", "epochs=4", "--set", "autoattack_version=off", *TINY]
    e = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    history = out / "history.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(json.loads(history.read_text())) >= 2:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = json.loads(history.read_text())
    assert 2 <= len(before) < 4, "the kill must land mid-run"
    assert not (out / "result.json").exists()
    p = bench(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    after = json.loads(history.read_text())
    assert [h["epoch"] for h in after] == [0, 1, 2, 3]
    # the epochs finished before the kill are kept as they were, not re-run
    done = len(before)
    assert after[:done - 1] == before[:done - 1]
    assert json.loads((out / "result.json").read_text())["status"] == "ok"


@pytest.mark.slow
def test_trial_killed_during_autoattack_resumes_the_evaluation(shards_root, tmp_path):
    out = tmp_path / "aa"
    args = ["run", "--method", "ft", "--backbone", "tiny_cnn", "--data-root", str(shards_root), "--out", str(out),
            "--no-progress", "--set", "epochs=1", "--set", "autoattack_version=apgd-ce", *TINY,
            "--set", "eval_batch_size=2", "--set", "eval_pgd_steps=1"]  # AutoAttack in batches of 2
    e = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], env=e, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    state_path = out / "autoattack_state.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not state_path.exists():
        time.sleep(0.02)  # the state appears when AutoAttack starts (clean flags, no batch attacked yet)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = json.loads(state_path.read_text())
    assert killed["done"] == [] and not (out / "result.json").exists(), "the kill must land mid-evaluation"
    p = bench(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    # the rerun skips training (last checkpoint) and finds the state: same model, same samples
    assert f"AutoAttack resumes from {state_path}: no attack done" in p.stdout, p.stdout
    final = json.loads(state_path.read_text())
    assert final["done"] == ["apgd-ce"]
    assert not any(f and not k for f, k in zip(final["robust"], killed["robust"]))  # robust only if clean
    m = json.loads((out / "result.json").read_text())["metrics"]
    assert m["autoattack_acc"] == sum(final["robust"]) / len(final["robust"]) <= m["clean_acc"]


@pytest.mark.parametrize("engine_setting", ["zero_stage=2", "bf16=true", "bf16_autocast=true", "channels_last=true",
                                            "channels_last=true zero_stage=2"])
def test_engine_settings_run_end_to_end(shards_root, tmp_path, engine_setting):
    out = tmp_path / "engine"
    p = bench("run", "--method", "rft", "--backbone", "tiny_cnn", "--data-root", str(shards_root), "--out", str(out),
              "--no-progress", "--set", "epochs=2", "--set", "autoattack_version=off", *TINY,
              *[a for kv in engine_setting.split() for a in ("--set", kv)])
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    for kv in engine_setting.split():
        assert r["config"][kv.split("=")[0]] in (2, True)
    assert len(r["history"]) == 2 and 0 <= r["metrics"]["pgd_acc"] <= r["metrics"]["clean_acc"]


@pytest.mark.parametrize("enabled, native, dtype", [
    (False, True, "torch.float32"),
    (True, True, "torch.bfloat16"),  # a CPU with bf16 instructions
    (True, False, "torch.float32"),  # without them bf16 is slower than fp32: fp32, with a warning
])
def test_train_autocast_runs_convolutions_in_bf16(enabled, native, dtype, monkeypatch):
    import warnings

    import torch

    from bench import engine
    from bench.backbones import create_backbone
    from methods.base import BaseConfig

    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(engine, "_warned_bf16_fallback", False)
    model = create_backbone("tiny_cnn", 10)
    seen = []
    hook = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
        lambda mod, inp, out: seen.append(str(out.dtype)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the fallback warns once, not per step
            with engine.train_autocast(BaseConfig(bf16_autocast=enabled), torch.device("cpu")):
                loss = torch.nn.functional.cross_entropy(model(torch.rand(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    fallback = [w for w in caught if "no bf16 instructions" in str(w.message)]
    assert len(fallback) == (1 if enabled and not native else 0)
    loss.backward()
    hook.remove()
    assert seen == [dtype] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights (and their grads) stay fp32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("flags, native", [("fpu avx512f avx512bw", False), ("avx512f avx512_bf16", True),
                                           ("amx_tile amx_bf16", True), ("avx512_bf16x", False)])
def test_cpu_has_native_bf16_reads_cpu_flags(flags, native):
    from bench.engine import cpu_has_native_bf16

    assert cpu_has_native_bf16(f"processor\t: 0\nflags\t\t: {flags}\n") is native


# --- the first hour: Ctrl-C, unwritable folders, lean run folders ------------------------------------------
def test_ctrl_c_is_one_line_and_the_rerun_resumes(shards_root, tmp_path):
    """SIGINT to the whole process group (what Ctrl-C sends) after the first epoch: one line naming what was
    saved and the command that resumes, exit 130, no traceback; the rerun says it resumes and finishes. The
    finished run keeps best.pt and drops DeepSpeed's epoch checkpoints (keep_checkpoints: none, the default)."""
    out = tmp_path / "ctrl c"
    # epochs enough that the interrupt lands mid-run even when a loaded machine delays it by seconds (with 3
    # epochs a busy CI machine once finished the run before the signal arrived)
    EPOCHS = 12
    args = ["run", "--method", "ft", "--backbone", "tiny_cnn", "--data-root", str(shards_root), "--out", str(out),
            "--set", f"epochs={EPOCHS}", "--set", "autoattack_version=off", *TINY]
    e = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "BENCH_DEBUG"):
        e.pop(k, None)
    t0 = time.time()
    # SIGINT at its default in the child, as under a shell: an ignored SIGINT is inherited across exec, and an
    # earlier in-process Ray/Tune test of the session can leave this pytest process ignoring it (in CI the
    # child then ran all its epochs and exited 0)
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.readline()
    assert first.startswith("bench run: ft on digits (tiny_cnn): loading") and time.time() - t0 < 60, first
    lines = []  # without a terminal, progress is plain lines, one per epoch
    while proc.poll() is None:
        lines.append(proc.stdout.readline())
        if lines[-1].startswith(f"ft on digits: epoch 1/{EPOCHS} "):
            break
    assert "val_pgd_acc" in lines[-1], lines
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("bench run: interrupted; epochs 1-"), stderr
    assert "Traceback" not in stderr + stdout and "\x1b[" not in stderr + stdout
    again = said[0].split("resume with: ")[1]
    assert shlex.split(again)[1:] == args  # the command as given, quoted (the folder has a space)
    assert not (out / "result.json").exists()

    p = bench(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(rf"ft on digits: resuming from epoch \d+/{EPOCHS}", p.stdout), p.stdout
    assert [h["epoch"] for h in json.loads((out / "result.json").read_text())["history"]] == list(range(EPOCHS))
    assert sorted(f.name for f in (out / "checkpoints").iterdir()) == ["best.pt"]
    assert "bench wandb-sync " in p.stdout, p.stdout[-3000:]


def test_unwritable_out_is_one_line_before_work(shards_root, tmp_path):
    """The tests run as root, for whom a chmod-ed folder stays writable: the honest unwritable --out here is a
    path under a regular file (bench.files.check_writable tries a real write, so it also catches read-only
    mounts and, for other users, permissions)."""
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    p = bench("run", "--method", "ft", "--backbone", "tiny_cnn", "--data-root", str(shards_root), "--out", str(out),
              "--set", "epochs=1")
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"bench run: error: cannot write the run folder {out}: "), p.stderr


@pytest.mark.parametrize("method, keep, epochs_left, latest", [("ft", "last", ["epoch0001"], "epoch0001"),
                                                               ("ft", "all", ["epoch0000", "epoch0001"], "epoch0001"),
                                                               ("ft", "none", [], None),
                                                               ("rft", "none", [], None)])
def test_finished_trial_keeps_checkpoints_as_configured(shards_root, tmp_path, method, keep, epochs_left, latest):
    """best.pt, the weights the test evaluated, always stays: rft evaluates its last epoch (no selection), whose
    weights are then written to best.pt too."""
    import torch

    from bench.config import resolve_config
    from bench.trial import run_trial

    cfg = resolve_config(method, {"backbone": "tiny_cnn", "epochs": 2, "max_train_samples": 64, "n_eval": 32,
                                "n_val": 32, "batch_size": 32, "autoattack_version": "off", "eval_pgd_steps": 1,
                                "val_pgd_steps": 1, "keep_checkpoints": keep})
    out = tmp_path / keep
    result = run_trial(cfg, out, data_root=shards_root, progress=False, track=False)
    ckpt = out / "checkpoints"
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == epochs_left
    best = torch.load(ckpt / "best.pt", weights_only=True)
    if method == "rft":  # eval_checkpoint=last: nothing selected, the last epoch evaluated and kept
        assert result["method_summary"]["selected_epoch"] is None and best["epoch"] == 1
    assert ((ckpt / "latest").read_text() if (ckpt / "latest").exists() else None) == latest
    assert (out / "result.json").is_file() and (out / "history.json").is_file()
