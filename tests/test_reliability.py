"""Reliability indicators (bench/reliability.py): they catch a failed attack and pass a working one, and the
leaderboard shows them (column, csv, HTML meaning, robustness_curve.png)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import resolve_config
from bench.reliability import (autoattack_checks, evaluate_with_reliability, extra_forwards_per_sample,
                               incomplete_optimisation, pgd_vs_autoattack, quick_forwards, subset_size,
                               unavailable_gradients)
from methods.attacks import pgd_linf

EPS = 0.1  # on 8x8 digits in [0, 1]: a robust MLP keeps about half the test set


@pytest.fixture(scope="module")
def digits8():
    """scikit-learn's 8x8 digits in [0, 1]: 600 training and 200 test images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    return (x[:600], y[:600]), (x[1400:1600], y[1400:1600])


@pytest.fixture(scope="module")
def robust_mlp(digits8):
    """An MLP adversarially trained (PGD-3 at eps 0.1) for 8 epochs: robust, with working gradients (seconds)."""
    torch.manual_seed(0)
    (x, y), _ = digits8
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 100):
            xb, yb = x[perm[i:i + 100]], y[perm[i:i + 100]]
            loss = F.cross_entropy(model(pgd_linf(model, xb, yb, eps=EPS, step_size=EPS / 4, steps=3)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


class Quantised(nn.Module):
    """``model`` behind a non-differentiable input quantisation (4 grey levels): every input gradient is
    exactly zero, so a gradient attack never moves, and robust accuracy equals clean accuracy at any eps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def _evaluate(model, data, **overrides):
    x, y = data
    cfg = resolve_config("ft", {"allow_large_eps": True, "eps": EPS, "eval_pgd_steps": 10, "autoattack_version": "off", "eval_batch_size": 200,
                                "reliability_n": 100, **overrides})
    return evaluate_with_reliability(model, x, y, cfg, n_classes=10, progress=False)


def test_masked_gradients_are_suspect_by_several_indicators(robust_mlp, digits8):
    flags, rel = _evaluate(Quantised(robust_mlp), digits8[1])
    assert torch.equal(flags["pgd"], flags["clean"])  # the attack did nothing: robust = clean
    assert rel["verdict"] == "suspect"
    ind = rel["indicators"]
    # the reasons a masked model must be caught for: zero gradients, and an unbounded attack that fails
    assert ind["unavailable_gradients"]["verdict"] == "fired" and ind["unavailable_gradients"]["value"] == 1.0
    assert ind["aa_zero_gradients"]["verdict"] == "fired"
    assert ind["budget_unbounded"]["verdict"] == "fired" and ind["budget_unbounded"]["value"] > 0.8
    assert len(rel["fired"]) >= 2
    curve = rel["curve"]
    assert curve["robust_acc"][-1] == curve["clean_acc"]  # flat at clean accuracy, even unbounded


def test_the_same_model_without_the_masking_is_ok(robust_mlp, digits8):
    flags, rel = _evaluate(robust_mlp, digits8[1])
    assert 0.3 < flags["pgd"].float().mean() < flags["clean"].float().mean()  # robust, but not trivially
    assert rel["verdict"] == "ok", rel["fired"]
    ind = rel["indicators"]
    assert ind["unavailable_gradients"]["value"] == 0.0 and ind["budget_unbounded"]["value"] <= 0.1
    curve = rel["curve"]["robust_acc"]
    assert curve == sorted(curve, reverse=True) and curve[-1] == 0.0  # falls with eps, to 0 unbounded
    assert set(ind) >= {"aa_randomized", "aa_softmax_output", "aa_dynamic", "incomplete_optimisation",
                        "steps_convergence", "restarts_convergence", "budget_monotone"}


def test_too_few_steps_fire_incomplete_optimisation_and_convergence(robust_mlp, digits8):
    """PGD-2 with a small step stops while its loss still rises: a free and an extra-attack indicator see it."""
    _, rel = _evaluate(robust_mlp, digits8[1], eval_pgd_steps=2, eval_step_size=EPS / 8)
    assert rel["indicators"]["incomplete_optimisation"]["verdict"] == "fired"
    assert rel["indicators"]["steps_convergence"]["verdict"] == "fired"


def test_quick_mode_runs_no_extra_attack(robust_mlp, digits8):
    _, rel = _evaluate(Quantised(robust_mlp), digits8[1], reliability="quick")
    assert "curve" not in rel and "budget_unbounded" not in rel["indicators"]
    assert rel["verdict"] == "suspect" and {"unavailable_gradients", "aa_zero_gradients"} <= set(rel["fired"])
    _, none = _evaluate(robust_mlp, digits8[1], reliability="off")
    assert none is None


def test_saturated_softmax_output_is_caught(robust_mlp, digits8):
    """A head that outputs probabilities: AutoAttack's softmax check fires."""
    model = nn.Sequential(robust_mlp, nn.Softmax(dim=1))
    _, rel = _evaluate(model, digits8[1], reliability="quick")
    assert rel["indicators"]["aa_softmax_output"]["verdict"] == "fired"


def test_autoattack_above_pgd_by_more_than_one_sample_fires():
    pgd = torch.tensor([1, 0, 0, 0, 1], dtype=torch.bool)
    assert pgd_vs_autoattack(pgd, torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool))["verdict"] == "ok"  # one sample
    out = pgd_vs_autoattack(pgd, torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool))
    assert out["verdict"] == "fired" and out["value"] == 2


def test_incomplete_optimisation_reads_the_running_maximum_of_the_last_tenth():
    steps = torch.arange(21, dtype=torch.float32)
    flat_end = torch.cat([steps[:11], torch.full((10,), 10.0)])  # rose, then a plateau: converged
    rising = steps.clone()  # still rising at the end
    falling_end = torch.cat([steps[:19], torch.tensor([5.0, 5.0])])  # dropped: the running max holds
    loss = torch.stack([flat_end, rising, falling_end])
    out = incomplete_optimisation(loss, torch.tensor([True, True, True]))
    assert out["window"] == 2 and out["value"] == pytest.approx(1 / 3) and out["verdict"] == "fired"
    out = incomplete_optimisation(loss, torch.tensor([True, False, True]))  # only robust samples count
    assert out["value"] == 0.0 and out["verdict"] == "ok"


def test_unavailable_gradients_counts_only_samples_the_attack_failed_on():
    grads = torch.stack([torch.zeros(3), torch.ones(3), torch.zeros(3)])
    assert unavailable_gradients(grads, torch.tensor([False, True, False]))["verdict"] == "ok"
    out = unavailable_gradients(grads, torch.tensor([True, True, False]))
    assert out["value"] == 0.5 and out["verdict"] == "fired"


def test_square_check_uses_the_whole_runs_per_attack_accuracies(robust_mlp, digits8):
    x, y = digits8[1]
    grads = torch.ones_like(x)
    kw = dict(device="cpu", attacks=["apgd-ce", "apgd-t", "fab-t", "square"], targets=(9, 9))
    fine = autoattack_checks(robust_mlp, x, y, grads, **kw,
                             attack_accuracy={"clean": 0.9, "apgd-ce": 0.5, "apgd-t": 0.48, "fab-t": 0.48, "square": 0.48})
    assert fine["aa_square"]["verdict"] == "ok" and fine["aa_n_classes"]["verdict"] == "ok"
    masked = autoattack_checks(robust_mlp, x, y, grads, **kw,
                               attack_accuracy={"clean": 0.9, "apgd-ce": 0.5, "apgd-t": 0.48, "fab-t": 0.48,
                                                "square": 0.40})
    assert masked["aa_square"]["verdict"] == "fired" and masked["aa_square"]["value"] == pytest.approx(0.08)


def test_autoattack_run_reports_its_per_attack_accuracies_and_the_row_checks_them(robust_mlp, digits8):
    x, y = digits8[1]
    _, rel = _evaluate(robust_mlp, (x[:40], y[:40]), autoattack_version="apgd-ce", reliability="quick")
    assert rel["indicators"]["pgd_vs_autoattack"]["verdict"] == "ok"
    assert "aa_n_classes" in rel["indicators"] and "aa_square" not in rel["indicators"]  # no Square in apgd-ce
    softmax = nn.Sequential(robust_mlp, nn.Softmax(dim=1))
    _, rel = _evaluate(softmax, (x[:40], y[:40]), autoattack_version="apgd-ce", reliability="quick")
    assert any("probability distribution" in w for w in rel["autoattack_warnings"])  # AutoAttack's own, kept


def test_default_subset_keeps_extra_attacks_within_a_quarter_of_the_evaluation():
    cfg = resolve_config("ft", {"eval_pgd_steps": 20, "autoattack_version": "off"})
    per_sample = extra_forwards_per_sample(cfg)
    n, why = subset_size(cfg, 1000, eval_forwards=1000 * 200)
    total = lambda k: k * per_sample + quick_forwards(1000)  # noqa: E731  (the quick indicators count too)
    assert total(n) <= 0.25 * 1000 * 200 < total(n + 1) and "25%" in why
    cfg.reliability_n = 50
    assert subset_size(cfg, 1000, 10) == (50, "reliability_n")


def _result(tmp_path, name, method, seed, verdict, fired, curve=True):
    rel = {"mode": "full", "verdict": verdict, "fired": fired,
           "indicators": {f: {"value": 1.0, "threshold": 0.0, "verdict": "fired"} for f in fired}}
    if curve:
        rel["curve"] = {"eps": [0.25, 0.5, 1.0, 2.0, 4.0, 1.0], "robust_acc": [0.8, 0.6, 0.4, 0.2, 0.1, 0.0],
                        "clean_acc": 0.9, "chance": 0.1}
    r = {"id": name, "method": method, "dataset": "digits", "backbone": "b", "seed": seed,
         "config": {"method": method, "seed": seed}, "status": "ok", "reliability": rel,
         "metrics": {"clean_acc": 0.9, "pgd_acc": 0.4, "robust_acc": 0.4, "robust_attack": "PGD-10", "eps": 1 / 255,
                     "n_eval": 100}}
    (tmp_path / name).mkdir()
    (tmp_path / name / "result.json").write_text(json.dumps(r))


def test_leaderboard_shows_reliability_and_writes_the_robustness_curve(tmp_path):
    from bench.report.leaderboard import build_leaderboard

    _result(tmp_path, "rft0", "rft", 0, "ok", [])
    _result(tmp_path, "rft1", "rft", 1, "ok", [])
    _result(tmp_path, "amt0", "autolora", 0, "suspect", ["budget_unbounded"])
    _result(tmp_path, "amt1", "autolora", 1, "ok", [])
    rows = build_leaderboard(tmp_path, console=False)
    by = {r["method"]: r for r in rows}
    assert by["rft"]["reliability"] == "ok" and by["rft"]["reliability_suspect_seeds"] == "0/2"
    assert by["autolora"]["reliability"] == "suspect" and by["autolora"]["reliability_fired"] == "budget_unbounded"
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| reliability |" in md and "suspect (1/2 seeds): budget_unbounded" in md
    csv = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert "reliability_fired" in csv[0] and any("budget_unbounded" in line for line in csv[1:])
    page = (tmp_path / "leaderboard.html").read_text()
    assert "<td class='s suspect'" in page and "an unbounded attack left more than chance accuracy" in page
    png = tmp_path / "robustness_curve.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_no_curve_no_robustness_plot(tmp_path):
    from bench.report.leaderboard import build_leaderboard

    _result(tmp_path, "rft0", "rft", 0, "ok", [], curve=False)
    build_leaderboard(tmp_path, console=False)
    assert not (tmp_path / "robustness_curve.png").exists()
    assert "| ok |" in (tmp_path / "leaderboard.md").read_text()


class _Episodes:
    """A few-shot 'method' and sampler: every episode's classifier is ``model``, its queries 40 test digits."""

    ways, shots = 10, 1

    def __init__(self, model, data):
        self.model, self.data = model, data

    def episode_classifier(self, sx, sy, **_):
        return self.model

    def sample(self, i):
        x, y = self.data
        q = slice(40 * i, 40 * (i + 1))
        return x[:10], torch.arange(10), x[q], y[q]


def test_fewshot_rows_get_their_query_attacks_indicators(robust_mlp, digits8):
    from bench.fewshot import evaluate_fewshot

    cfg = resolve_config("pmf", {"allow_large_eps": True, "eps": EPS, "eval_pgd_steps": 10, "test_time_ft_steps": 0})
    episodes = _Episodes(Quantised(robust_mlp), digits8[1])
    masked = evaluate_fewshot(episodes, episodes, 3, cfg, attack=True, progress=False)["reliability"]
    assert masked["verdict"] == "suspect" and masked["mode"] == "quick" and masked["n"] == 120
    assert {"unavailable_gradients", "aa_zero_gradients"} <= set(masked["fired"])
    episodes = _Episodes(robust_mlp, digits8[1])
    plain = evaluate_fewshot(episodes, episodes, 3, cfg, attack=True, progress=False)["reliability"]
    assert plain["verdict"] == "ok", plain["fired"]
    assert "incomplete_optimisation" in plain["indicators"]


def test_bench_run_writes_reliability_into_result_and_wandb_summary(shards_root, tmp_path):
    """Every supervised result.json has its reliability block; the summary (W&B, metrics.jsonl) its verdict."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), WANDB_MODE="offline")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "ft"
    p = subprocess.run([sys.executable, "-m", "bench", "run", "--method", "ft", "--backbone", "tiny_cnn",
                        "--data-root", str(shards_root), "--out", str(out), "--no-progress", "--set", "epochs=1",
                        "--set", "max_train_samples=64", "--set", "n_eval=32", "--set", "n_val=32",
                        "--set", "eval_pgd_steps=3", "--set", "val_pgd_steps=1", "--set", "autoattack_version=off",
                        "--set", "reliability_n=16"], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rel = json.loads((out / "result.json").read_text())["reliability"]
    assert rel["mode"] == "full" and rel["subset_n"] == 16 and rel["verdict"] in ("ok", "suspect")
    assert rel["fired"] == [k for k, v in rel["indicators"].items() if v["verdict"] == "fired"]
    assert len(rel["curve"]["robust_acc"]) == 6
    summary = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
               if r.get("kind") == "summary"][-1]
    assert summary["reliability/verdict"] == rel["verdict"]
    assert summary["reliability/budget_unbounded/fired"] in (0, 1)


@pytest.mark.slow
def test_the_embedded_backbone_after_robust_fine_tuning_is_ok(shards_root, tmp_path):
    """The other half of the masked-model test on the suite's own pipeline: the embedded ResNet-18 after the
    smoke's robust fine-tuning (rft, 2 epochs of 384 images, PGD-1 at 1/255), tested with PGD-10 on 64 images
    and every indicator in full mode on them, fires none; its budget curve falls to 0 unbounded."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), WANDB_MODE="disabled")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = tmp_path / "rft"
    smoke = {"eps": 1 / 255, "train_attack_steps": 1, "train_step_size": 1.25 / 255, "val_pgd_steps": 1,
             "n_val": 64, "epochs": 2, "max_train_samples": 384, "batch_size": 16, "lr": 0.05,
             "lr_milestone_epochs": "[]", "eval_checkpoint": "last", "autoattack_version": "off",
             "n_eval": 64, "eval_pgd_steps": 10, "reliability": "full", "reliability_n": 64}
    sets = [a for k, v in smoke.items() for a in ("--set", f"{k}={v}")]
    p = subprocess.run([sys.executable, "-m", "bench", "run", "--method", "rft", "--backbone", "cifar_resnet18_aa",
                        "--data-root", str(shards_root), "--out", str(out), "--no-progress", *sets],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    rel, m = result["reliability"], result["metrics"]
    assert rel["mode"] == "full" and rel["subset_n"] == 64
    assert m["clean_acc"] > 0.6 and m["robust_acc"] > 0.3  # it learned, and robustly (chance is 0.1)
    assert rel["verdict"] == "ok" and rel["fired"] == [], rel
    assert rel["curve"]["robust_acc"][-1] <= 0.1  # the unbounded attack breaks it: the gradients work
