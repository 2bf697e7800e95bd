"""Few-shot evaluation of episodic methods: clean and PGD accuracy on novel-class episodes, with 95% intervals.

Per episode the method builds ``episode_classifier(support_x, support_y)`` (for AMT with a pool, the
test-time merged network); the queries are classified clean and, with ``attack``, under L-inf PGD on the
queries only (the support set is never attacked). The interval is ``1.96 * std / sqrt(episodes)`` over the
per-episode accuracies (population std, numpy's default, as the PMF/AMT reference code computes it).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from methods.attacks import eval_mode, pgd_linf


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and ``1.96 * std / sqrt(n)`` (population std); (nan, nan) for no values."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return mean, 1.96 * std / math.sqrt(n)


def _episode(sampler, i: int):
    ep = sampler.sample(i)
    return tuple(ep)


def evaluate_fewshot(method, sampler, n_episodes: int, cfg, *, attack: bool, device="cpu",
                     progress: bool = True) -> dict[str, Any]:
    """Accuracy over episodes ``0..n_episodes-1`` of ``sampler`` (fractions); adversarial with ``attack``."""
    if n_episodes <= 0:
        raise ValueError("n_episodes must be positive")
    device = torch.device(device)
    clean, adv = [], []
    ways = shots = None
    for i in tqdm(range(n_episodes), desc="few-shot" + (" PGD" if attack else ""), leave=False,
                  disable=not progress):
        sx, sy, qx, qy = _episode(sampler, i)
        sx, sy, qx, qy = sx.to(device), sy.to(device).long(), qx.to(device), qy.to(device).long()
        ways = int(sy.max()) + 1 if ways is None else ways
        shots = int((sy == 0).sum()) if shots is None else shots
        clf = method.episode_classifier(sx, sy)
        with eval_mode(clf):
            with torch.no_grad():
                clean.append((clf(qx).argmax(1) == qy).float().mean().item())
            if attack:
                x_adv = pgd_linf(clf, qx, qy, eps=cfg.eps, step_size=cfg.eval_step_size,
                                 steps=cfg.eval_pgd_steps, random_start=False)
                with torch.no_grad():
                    adv.append((clf(x_adv).argmax(1) == qy).float().mean().item())
    out: dict[str, Any] = {"ways": getattr(sampler, "ways", ways), "shots": getattr(sampler, "shots", shots),
                           "episodes": n_episodes}
    out["clean_acc"], out["clean_ci95"] = mean_ci95(clean)
    if attack:
        out["adv_acc"], out["adv_ci95"] = mean_ci95(adv)
        out["pgd_steps"] = cfg.eval_pgd_steps
        out["eps"] = cfg.eps
    return out
