"""The three methods of AutoLoRa's Table 2 (rft, twins, autolora) each run one epoch end to end through
`bench run` on a tiny class-folder data set at 224 pixels (CPU), with the paper preset's own settings for a
224-pixel set, and record those settings in result.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.config import resolve_config
from bench.sweep.space import load_sweep

ROOT = Path(__file__).resolve().parents[1]
# tiny budgets; the rest (transform imagenet224, λ_twins 0.4, weight decay, placement, ...) from the preset
TINY = {"epochs": 1, "batch_size": 4, "eval_batch_size": 4, "train_attack_steps": 1, "val_pgd_steps": 1,
        "eval_pgd_steps": 1, "n_eval": 4, "autoattack_version": "off", "eps": "1/255"}


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> Path:
    """2 classes x 6 images (reddish / bluish noise at 280x300), converted by the `folder` converter at 256."""
    src = tmp_path_factory.mktemp("folder_src")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "blue"]):
        (src / name).mkdir()
        for i in range(6):
            img = rng.integers(0, 120, size=(280, 300, 3), dtype=np.uint8)
            img[..., 0 if c == 0 else 2] += 120
            Image.fromarray(img).save(src / name / f"{i}.png")
    root = tmp_path_factory.mktemp("shards")
    p = subprocess.run([sys.executable, "-m", "bench", "shards", "make", "folder", "--root", str(src), "--out",
                        str(root), "--size", "256", "--workers", "1"], cwd=ROOT, env=_env(root),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return root


def _env(tmp: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp),
               OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def preset_settings(method: str) -> dict:
    """The paper preset's settings of ``method`` on a 224-pixel set (DTD's block), minus data set, backbone,
    seed and the budgets the test shrinks."""
    spec = load_sweep(ROOT / "tune_spaces" / "paper_autolora.yaml")
    settings = spec.overrides(method, 0, {"dataset": "dtd"})
    for key in ("dataset", "backbone", "seed", *TINY):
        settings.pop(key, None)
    return settings


@pytest.mark.slow
@pytest.mark.parametrize("method,recorded", [
    ("rft", {"eval_checkpoint": "last", "weight_decay": 1e-3, "lr_milestone_epochs": [30, 50]}),
    ("twins", {"twins_lambda": 0.4, "twins_batch": "halves", "weight_decay": 1e-3}),
    ("autolora", {"lora_placement": "reference", "lambda_data": "train_augmented", "lr_stall_rule": "reference"}),
])
def test_one_epoch_at_224_records_its_settings(folder_shards, tmp_path, method, recorded):
    settings = {**preset_settings(method), **TINY}
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={_text(v)}")]
    out = tmp_path / method
    cmd = [sys.executable, "-m", "bench", "run", "--method", method, "--dataset", "folder", "--backbone", "tiny_cnn",
           "--data-root", str(folder_shards), "--out", str(out), "--no-progress", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    assert r["status"] == "ok" and r["method"] == method and r["dataset"] == "folder"
    want = resolve_config(method, {**settings, "dataset": "folder", "backbone": "tiny_cnn"}).to_dict()
    assert {k: r["config"][k] for k in want if k != "seed"} == {k: v for k, v in want.items() if k != "seed"}
    assert {k: r["config"][k] for k in recorded} == recorded
    assert r["config"]["transform"] == "imagenet224" and r["config"]["input_resize"] is None
    assert len(r["history"]) == 1 and 0.0 <= r["metrics"]["clean_acc"] <= 1.0
    assert "autoattack_acc" not in r["metrics"]  # off: absent, never 0
    summary = r["method_summary"]
    if method == "autolora":
        assert summary["lora_placement"] == "reference" and summary["params"]["lora_targets"] == 4
        assert [m["when"] for m in summary["lambda_measurements"]] == ["start"]  # 1 epoch: no after-validation λ
    elif method == "twins":
        assert summary["two_wing_bn_layers"] == 7 and summary["twins_batch"] == "halves"
    else:
        assert summary["eval_checkpoint"] == "last" and summary["selected_epoch"] is None


def _text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    return str(value)
