"""Robust evaluation: clean accuracy, PGD-k accuracy and the official AutoAttack (pyautoattack).

All three run on the same first ``n_eval`` test samples, with the model in eval mode.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from methods.attacks import eval_mode, pgd_linf


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, desc: str, progress: bool):
    starts = range(0, len(x), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=not progress or len(starts) < 2):
        yield x[i:i + batch_size], y[i:i + batch_size]


@torch.no_grad()
def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                   device="cpu", progress: bool = False) -> float:
    if len(x) == 0:
        raise ValueError("no samples to evaluate")
    correct = 0
    with eval_mode(model):
        for xb, yb in _batches(x, y, batch_size, "clean", progress):
            correct += (model(xb.to(device)).argmax(1) == yb.to(device)).sum().item()
    return correct / len(x)


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                 steps: int, batch_size: int = 256, random_start: bool = False, device="cpu",
                 progress: bool = False) -> float:
    correct = 0
    with eval_mode(model):
        for xb, yb in _batches(x, y, batch_size, f"PGD-{steps}", progress):
            xb, yb = xb.to(device), yb.to(device)
            x_adv = pgd_linf(model, xb, yb, eps=eps, step_size=step_size, steps=steps, random_start=random_start)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == yb).sum().item()
    return correct / len(x)


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str,
                        batch_size: int = 256, device="cpu", seed: int = 0) -> float | None:
    """Robust accuracy under the official AutoAttack; ``version`` standard/plus/rand/apgd-ce, or off."""
    if version == "off":
        return None
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    if version == "apgd-ce":  # the cheap single-attack version, for smoke runs
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce"],
                               device=device, seed=seed)
    else:
        adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, device=device, seed=seed)
    with eval_mode(model):
        x_adv, _ = adversary.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
        return clean_accuracy(model, x_adv, y, batch_size, device)


def robust_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, device="cpu",
                   progress: bool = True) -> dict:
    """The ``metrics`` block of result.json. A metric that was not computed is absent."""
    metrics = {
        "clean_acc": clean_accuracy(model, x, y, cfg.eval_batch_size, device, progress),
        "eps": cfg.eps,
        "n_eval": len(x),
    }
    if cfg.eval_pgd_steps > 0:
        metrics["pgd_acc"] = pgd_accuracy(model, x, y, eps=cfg.eps, step_size=cfg.eval_step_size,
                                          steps=cfg.eval_pgd_steps, batch_size=cfg.eval_batch_size,
                                          device=device, progress=progress)
        metrics["pgd_steps"] = cfg.eval_pgd_steps
    aa = autoattack_accuracy(model, x, y, eps=cfg.eps, version=cfg.autoattack_version,
                             batch_size=cfg.eval_batch_size, device=device, seed=cfg.seed)
    if aa is not None:
        metrics["autoattack_acc"] = aa
        metrics["autoattack_version"] = cfg.autoattack_version
    return metrics
