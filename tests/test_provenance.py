"""result.json's provenance block and ``bench reproduce``: a tiny finished ``bench run`` re-runs to identical
metrics; changed shards, another commit or lock are refused before any work (one line each, naming what
differs); a tree without git still records every field; the leaderboard shows each row's commit and command."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import provenance as P
from bench.cli import main as bench_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--method", "ft", "--backbone", "tiny_cnn", "--no-progress", "--set", "epochs=1",
        "--set", "max_train_samples=32", "--set", "n_eval=64", "--set", "n_val=16", "--set", "batch_size=16",
        "--set", "train_attack_steps=1", "--set", "eval_pgd_steps=1", "--set", "val_pgd_steps=1",
        "--set", "autoattack_version=off"]


def bench(*args, cwd=None, pythonpath=ROOT):
    env = dict(os.environ, PYTHONPATH=str(pythonpath), WANDB_MODE="offline")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", P.CODE_ENV):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "bench", *args], env=env, capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def git_head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture(scope="module")
def run_dir(shards_root, tmp_path_factory) -> Path:
    """A finished tiny ``bench run`` (alone in its results folder)."""
    out = tmp_path_factory.mktemp("runs") / "ft"
    p = bench("run", *TINY, "--data-root", str(shards_root), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_provenance_block_has_every_field(run_dir, shards_root):
    result = json.loads((run_dir / "result.json").read_text())
    prov = result["provenance"]
    assert set(prov) == set(P.FIELDS)
    assert prov["commit"] == git_head() and prov["code_from"] == "git" and prov["code_root"] == str(ROOT)
    assert isinstance(prov["dirty"], bool)
    if prov["dirty"]:  # the diff of the tree the test ran from lies beside the run, and its sha256 is recorded
        assert prov["diff_sha256"] == P.code_facts(ROOT)["diff_sha256"]
    else:
        assert prov["diff_sha256"] is None and prov["diff_file"] is None
    assert prov["lock_sha256"] == sha(ROOT / "requirements.lock")
    env_lines = (run_dir / prov["environment_file"]).read_text().splitlines()
    assert prov["environment_sha256"] == sha(run_dir / "environment.txt") and prov["packages"] == len(env_lines)
    assert any(line.startswith("torch==") for line in env_lines)
    assert prov["torch_config_sha256"] == sha(run_dir / prov["torch_config_file"])
    digits = shards_root / "digits"
    assert prov["data_root"] == str(shards_root.resolve())
    assert prov["shards"]["digits"]["dir"] == str(digits.resolve())
    assert prov["shards"]["digits"]["manifest_sha256"] == sha(digits / "_info.json")
    assert set(prov["shards"]["digits"]["splits"]) == {"train", "val", "test"}
    assert prov["weights"] == {"backbone": "tiny_cnn", "file": None, "sha256": None}  # random init
    assert prov["argv"][1:3] == ["run", "--method"] and prov["cwd"] == os.getcwd()
    from bench.engine import cpu_has_native_bf16

    assert prov["cpu"]["bf16"] == cpu_has_native_bf16() and prov["cpu"]["count"] == os.cpu_count()
    assert prov["gpu"]["count"] == 0 or prov["gpu"]["names"]
    assert prov["seeds"]["seed"] == result["seed"] == 0
    assert 0 < prov["capture_s"] < 1.0  # the budget per trial
    assert wandb_config(run_dir)["provenance"] == prov  # the W&B run's config has it too


def wandb_config(run_dir: Path) -> dict:
    """The config of the offline W&B run beside a result (decoded from its transaction log)."""
    from bench.report.tracking import read_wandb_file

    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return {i.key: json.loads(i.value_json) for r in read_wandb_file(log) if r.WhichOneof("record_type") == "run"
            for i in r.run.config.update}


def test_reproduce_gives_identical_metrics(run_dir):
    original = (run_dir / "result.json").read_bytes()
    p = bench("reproduce", str(run_dir), "--no-progress")
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((run_dir / "_reproduce" / "reproduce.json").read_text())
    names = {r["metric"] for r in report["metrics"]}
    assert {"metrics.clean_acc", "metrics.pgd_acc", "metrics.n_eval"} <= names
    assert report["identical"] and report["differed"] == []
    recorded = json.loads(original)["metrics"]
    assert recorded["clean_acc"] > 0  # a comparison of numbers that carry information
    assert json.loads((run_dir / "_reproduce" / "result.json").read_text())["metrics"] == recorded
    assert f"{len(names)}/{len(names)} metrics identical" in p.stdout
    assert (run_dir / "result.json").read_bytes() == original  # the original run is never touched


def test_changed_shard_is_refused_naming_it(run_dir, shards_root, tmp_path, capsys):
    root = tmp_path / "shards"
    shutil.copytree(shards_root / "digits", root / "digits")
    shard = root / "digits" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of one image
    shard.write_bytes(bytes(data))
    out = tmp_path / "repro"
    rc = bench_main(["reproduce", str(run_dir), "--data-root", str(root), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2
    assert err[0] == (f"bench reproduce: data digits, split train: shard train-000001.tar in {root / 'digits'} "
                      f"differs from its manifest sha256")
    assert "--force" in err[-1] and len(err) == 2
    assert not out.exists()  # refused before any work
    # a rewritten manifest names the split whose entry changed
    info = json.loads((root / "digits" / "_info.json").read_text())
    info["splits"]["test"]["shard_lengths"][0] -= 1
    (root / "digits" / "_info.json").write_text(json.dumps(info))
    assert bench_main(["reproduce", str(run_dir), "--data-root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"data digits: manifest {root / 'digits' / '_info.json'} changed since the run (split test)" in err


def test_other_commit_and_lock_are_refused_then_forced(run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    result = json.loads((run_dir / "result.json").read_text())
    result["provenance"].update(commit="0" * 40, lock_sha256="f" * 64)
    (other / "result.json").write_text(json.dumps(result))
    assert bench_main(["reproduce", str(other), "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"bench reproduce: code: commit 000000000000 recorded, {git_head()[:12]} now"
    assert err[1].startswith("bench reproduce: lock: requirements.lock sha256 ffffffffffff recorded, ")
    assert len(err) == 3 and not (other / "_reproduce").exists()
    p = bench("reproduce", str(other), "--no-progress", "--force")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "inputs that differed from the recorded run (--force): code, lock" in p.stdout
    report = json.loads((other / "_reproduce" / "reproduce.json").read_text())
    assert [d["input"] for d in report["differed"]] == ["code", "lock"] and report["identical"]


def test_provenance_survives_a_tree_without_git(shards_root, tmp_path):
    code = tmp_path / "code"
    for pkg in ("bench", "methods", "data_shards"):
        shutil.copytree(ROOT / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "run"
    p = bench("run", *TINY, "--data-root", str(shards_root), "--out", str(out), cwd=code, pythonpath=code)
    assert p.returncode == 0, p.stderr[-3000:]
    prov = json.loads((out / "result.json").read_text())["provenance"]
    assert set(prov) == set(P.FIELDS)
    assert prov["code_root"] == str(code) and prov["cwd"] == str(code)
    assert prov["commit"] == prov["dirty"] == prov["diff_sha256"] == prov["lock_sha256"] == "unknown"
    assert prov["shards"]["digits"]["manifest_sha256"] == sha(shards_root / "digits" / "_info.json")
    assert P.short_commit(prov) == "unknown"


def test_sweep_trials_take_the_drivers_code_facts(monkeypatch, tmp_path, shards_root):
    from bench.config import resolve_config

    monkeypatch.setenv(P.CODE_ENV, P.driver_env()[P.CODE_ENV])
    monkeypatch.setattr(P, "code_facts", lambda root=None: pytest.fail("a trial of a sweep asks its own tree"))
    prov = P.capture(resolve_config("ft", {"backbone": "tiny_cnn"}), tmp_path, shards_root)
    assert prov["commit"] == git_head() and prov["code_from"].startswith("sweep driver (")
    assert prov["lock_sha256"] == sha(ROOT / "requirements.lock")
    assert prov["argv"] == sys.argv and prov["cwd"] == os.getcwd()  # the driver's command, not Ray's worker's


def test_code_facts_of_a_repository_clean_changed_and_with_untracked_files(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "requirements.lock").write_text("torch==2.14.1\n")
    git("add", "a.py", "requirements.lock")
    git("commit", "-q", "-m", "one")
    clean = P.code_facts(tmp_path)
    assert clean["commit"] != "unknown" and clean["dirty"] is False and clean["diff_sha256"] is None
    assert clean["lock_sha256"] == sha(tmp_path / "requirements.lock") and P.short_commit(clean) == clean["commit"][:7]
    (tmp_path / "a.py").write_text("x = 2\n")
    changed = P.code_facts(tmp_path)
    assert changed["dirty"] is True and "+x = 2" in changed["diff"] and P.short_commit(changed).endswith("+")
    (tmp_path / "b.py").write_text("y = 1\n")
    untracked = P.code_facts(tmp_path)
    assert untracked["untracked"] == ["b.py"] and untracked["diff_sha256"] != changed["diff_sha256"]


def test_weights_are_hashed_where_they_come_from(tmp_path):
    from bench.backbones import _AA_WEIGHTS

    aa = P.weights_facts("cifar_resnet18_aa")
    assert aa["file"] == str(_AA_WEIGHTS.resolve()) and aa["sha256"] == sha(_AA_WEIGHTS)
    f = tmp_path / "w.pt"
    f.write_bytes(b"not really weights")
    assert P.weights_facts(f"tiny_cnn@{f}")["sha256"] == sha(f)
    assert P.weights_facts("resnet18", pretrained=True)["sha256"] == "unknown"


def test_leaderboard_shows_commit_and_reproduce_command(run_dir, tmp_path):
    from bench.report.leaderboard import build_leaderboard

    rows = build_leaderboard(run_dir.parent, tmp_path, console=False)
    prov = json.loads((run_dir / "result.json").read_text())["provenance"]
    commit = prov["commit"][:7] + ("+" if prov["dirty"] else "")
    assert [r["commit"] for r in rows] == [commit]  # the _reproduce folder is not a row of its own
    with open(tmp_path / "leaderboard.csv") as fh:
        assert [t["commit"] for t in csv.DictReader(fh)] == [commit]
    page = (tmp_path / "leaderboard.html").read_text()
    command = f"python -m bench reproduce {run_dir.resolve()}"
    assert f"title='{command}'" in page and f"<summary>{commit}</summary><code>{command}</code>" in page
