"""Few-shot evaluation of episodic methods: clean, PGD and (optionally) AutoAttack accuracy on novel-class
episodes, with 95% intervals.

The suite's robust protocol (the AMT/PMF code has no adversarial test; this is ours): per episode the method
builds ``episode_classifier(support_x, support_y)`` from the clean support (for AMT with a pool, the
test-time merged network, prototypes from the clean support); the queries are classified clean and, with
``attack``, under L-inf PGD-k (``eval_pgd_steps``, ``eval_step_size``, ``eps``, no random start) on the
queries only, and, with ``autoattack`` (``fewshot_autoattack``: apgd-ce, standard, plus, rand), under the
official AutoAttack (pyautoattack) on the queries of the same classifier. The support set is never attacked.
The interval is ``1.96 * std / sqrt(episodes)`` over the per-episode accuracies with torch's unbiased std,
as the AMT reference code computes it.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from methods.attacks import eval_mode, pgd_linf


def mean_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and ``1.96 * std / sqrt(n)`` (unbiased std, ``torch.std``); (nan, nan) for no values, and an
    interval of 0 for one value (no spread to estimate)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    std = float(t.std()) if n > 1 else 0.0
    return float(t.mean()), 1.96 * std / math.sqrt(n)


def _episode(sampler, i: int):
    ep = sampler.sample(i)
    return tuple(ep)


def episode_autoattack(clf, qx: torch.Tensor, qy: torch.Tensor, *, eps: float, version: str, ways: int,
                       device, seed: int = 0) -> float:
    """Query accuracy of one episode's classifier under the official AutoAttack (``version`` apgd-ce,
    standard, plus or rand). The targeted attacks target all ``ways - 1`` other classes (AutoAttack's 9
    assume 10 or more)."""
    import logging

    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    if version == "apgd-ce":
        adversary = AutoAttack(clf, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce"], device=device,
                               seed=seed)
    else:
        adversary = AutoAttack(clf, norm="Linf", eps=eps, version=version, device=device, seed=seed)
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, ways - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, ways - 1)
    with eval_mode(clf):
        x_adv, _ = adversary.run_standard_evaluation(qx, qy, batch_size=len(qx))
        with torch.no_grad():
            return (clf(x_adv).argmax(1) == qy).float().mean().item()


def evaluate_fewshot(method, sampler, n_episodes: int, cfg, *, attack: bool, device="cpu",
                     progress: bool = True, autoattack: str | None = None) -> dict[str, Any]:
    """Accuracy over episodes ``0..n_episodes-1`` of ``sampler`` (fractions); PGD with ``attack``;
    AutoAttack with ``autoattack`` (a version, or None: ``cfg.fewshot_autoattack`` when ``attack``)."""
    if n_episodes <= 0:
        raise ValueError("n_episodes must be positive")
    if autoattack is None:
        autoattack = getattr(cfg, "fewshot_autoattack", "off") if attack else "off"
    device = torch.device(device)
    clean, adv, aa = [], [], []
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
        if autoattack != "off":
            aa.append(episode_autoattack(clf, qx, qy, eps=cfg.eps, version=autoattack, ways=ways, device=device,
                                         seed=cfg.seed + i))
    out: dict[str, Any] = {"ways": getattr(sampler, "ways", ways), "shots": getattr(sampler, "shots", shots),
                           "episodes": n_episodes}
    out["clean_acc"], out["clean_ci95"] = mean_ci95(clean)
    if attack:
        out["adv_acc"], out["adv_ci95"] = mean_ci95(adv)
        out["pgd_steps"] = cfg.eval_pgd_steps
        out["eps"] = cfg.eps
    if aa:
        out["autoattack_acc"], out["autoattack_ci95"] = mean_ci95(aa)
        out["autoattack_version"] = autoattack
        out["eps"] = cfg.eps
    return out
