"""The reliability indicators' cost (bench/reliability.py) against the row's evaluation they judge.

One row evaluation of a backbone at the papers' settings (eps 8/255, PGD-20, AutoAttack apgd-ce) on synthetic
32x32 images labelled with the model's own clean predictions (every sample starts correct, as on a trained
model), timed, then the default full mode (reliability_n unset: the 25% budget) and quick mode, timed. The
target: the default's seconds at most 25% of the evaluation's. The count-based share (sample-forwards, what
the default sizes its subset by) is reported beside the seconds.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch


def _row(model, x, y, cfg):
    from bench.evaluate import evaluate_flags
    from bench.reliability import ForwardCounter, row_reliability

    details: dict = {}
    t0 = time.perf_counter()
    with ForwardCounter(model) as counter:
        flags = evaluate_flags(model, x, y, cfg, progress=False, details=details)
    eval_s = time.perf_counter() - t0
    out = {"eval_s": round(eval_s, 3), "eval_forwards": counter.count}
    for mode in ("quick", "full"):
        t0 = time.perf_counter()
        block = row_reliability(model, x, y, flags, details, replace(cfg, reliability=mode), n_classes=10,
                                eval_forwards=counter.count)
        s = time.perf_counter() - t0
        out[mode] = {"s": round(s, 3), "share_of_eval": round(s / eval_s, 4), "subset_n": block.get("subset_n"),
                     "verdict": block["verdict"], "fired": block["fired"], "skipped": block.get("skipped")}
    return out


def reliability_benchmark(quick: bool = False) -> dict:
    from bench.backbones import create_backbone
    from bench.config import resolve_config
    from bench.reliability import COST_SHARE, extra_forwards_per_sample

    torch.manual_seed(0)
    backbone, n = ("tiny_cnn", 256) if quick else ("cifar_resnet18_aa", 512)
    model = create_backbone(backbone, 10).eval()
    x = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    cfg = resolve_config("ft", {"eps": 8 / 255, "eval_pgd_steps": 20, "autoattack_version": "apgd-ce",
                                "eval_batch_size": 128, "backbone": backbone})
    out = {"backbone": backbone, "n": n, "eps": cfg.eps, "pgd_steps": cfg.eval_pgd_steps,
           "autoattack": cfg.autoattack_version, "target_share": COST_SHARE,
           "extra_forwards_per_sample": extra_forwards_per_sample(cfg), **_row(model, x, y, cfg)}
    full = out["full"]
    if full["subset_n"]:
        out["full"]["forward_share"] = round(full["subset_n"] * out["extra_forwards_per_sample"]
                                             / out["eval_forwards"], 4)
    out["within_target"] = full["share_of_eval"] <= COST_SHARE
    return out
