"""Few-shot evaluation of episodic methods: clean, PGD and (optionally) AutoAttack accuracy on novel-class
episodes, with 95% intervals.

The suite's robust protocol (the AMT/PMF code has no adversarial test; this is ours): per episode the method
builds ``episode_classifier(support_x, support_y)`` from the clean support (for AMT with a pool, the
test-time merged network, prototypes from the clean support); the queries are classified clean and, with
``attack``, under L-inf PGD-k (``eval_pgd_steps``, ``eval_step_size`` or eps/4, ``eps``, no random start,
any misclassified iterate counts) on the queries only, and, with ``autoattack`` (``fewshot_autoattack``: apgd-ce, standard, plus, rand), under the
official AutoAttack (pyautoattack) on the queries of the same classifier. The support set is never attacked.
The interval is ``1.96 * std / sqrt(episodes)`` over the per-episode accuracies with torch's unbiased std,
as the AMT reference code computes it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from bench.evaluate import attack_name, fp32_eval, make_autoattack, pgd_step
from bench.reliability import FewshotReliability
from methods.attacks import eval_mode, pgd_linf_robust


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
                       device, seed: int = 0) -> torch.Tensor:
    """Per query: right clean and under the official AutoAttack (``version`` apgd-ce, standard, plus or rand)
    on one episode's classifier. The targeted attacks target all ``ways - 1`` other classes (AutoAttack's 9
    assume 10 or more)."""
    adversary = make_autoattack(clf, eps=eps, version=version, device=device, seed=seed, n_classes=ways)
    _, y_adv = adversary.run_standard_evaluation(qx, qy, batch_size=len(qx))
    return y_adv.eq(qy)  # AutoAttack starts from its clean predictions: a wrong one stays wrong


def episode_flags(method, episode, key: tuple[int, int], cfg, *, attack: bool, autoattack: str, device,
                  reliability=None) -> dict[str, torch.Tensor]:
    """Per query of one episode (``episode``: support x, y, query x, y; ``key``: (sampler seed, episode
    index)): ``clean`` (right clean), ``pgd`` (with ``attack``) and ``autoattack`` (unless ``autoattack`` is
    off), each attack's flags right clean too, and ``robust``, their conjunction. A function of the weights,
    the episode, ``key`` and ``cfg`` alone: the classifier's draws come from ``key``, AutoAttack's from
    ``cfg.seed + index``. Call it inside ``fp32_eval(method.model)``."""
    sx, sy, qx, qy = episode
    sx, sy, qx, qy = sx.to(device), sy.to(device).long(), qx.to(device), qy.to(device).long()
    ways = int(sy.max()) + 1
    clf = method.episode_classifier(sx, sy, episode=key)
    with eval_mode(clf), fp32_eval(clf):
        with torch.no_grad():
            clean = clf(qx).argmax(1) == qy
        flags = {"clean": clean}
        pgd_ok = aa_ok = trace = None
        if attack:
            trace = [] if reliability is not None else None
            _, pgd_ok = pgd_linf_robust(clf, qx, qy, eps=cfg.eps, step_size=pgd_step(cfg), steps=cfg.eval_pgd_steps,
                                        random_start=False, loss_trace=trace)
            flags["pgd"] = clean & pgd_ok
        if autoattack != "off":
            aa_ok = episode_autoattack(clf, qx, qy, eps=cfg.eps, version=autoattack, ways=ways, device=device,
                                       seed=cfg.seed + key[1])
            flags["autoattack"] = clean & aa_ok
        flags["robust"] = clean.clone()
        for name in ("pgd", "autoattack"):
            if name in flags:
                flags["robust"] &= flags[name]
        if reliability is not None:
            reliability.episode(clf, qx, qy, clean, pgd_ok, trace, aa_ok)
    return {k: v.cpu() for k, v in flags.items()}


def fewshot_block(episodes: Sequence[dict[str, torch.Tensor]], cfg, *, ways: int, shots: int,
                  autoattack: str) -> dict[str, Any]:
    """result.json's ``fewshot`` block from the per-query flags of each episode (:func:`episode_flags`), in
    episode order: per flag the mean of the episodes' accuracies and its 95% interval."""
    acc = {name: [f[name].float().mean().item() for f in episodes] for name in episodes[0]}
    out: dict[str, Any] = {"ways": ways, "shots": shots, "episodes": len(episodes)}
    out["clean_acc"], out["clean_ci95"] = mean_ci95(acc["clean"])
    if "pgd" in acc:
        out["adv_acc"], out["adv_ci95"] = mean_ci95(acc["pgd"])
        out.update(pgd_steps=cfg.eval_pgd_steps, pgd_step_size=pgd_step(cfg), pgd_restarts=1, eps=cfg.eps)
    if "autoattack" in acc:
        out["autoattack_acc"], out["autoattack_ci95"] = mean_ci95(acc["autoattack"])
        out["autoattack_version"] = autoattack
        out["eps"] = cfg.eps
    if "pgd" in acc or "autoattack" in acc:
        out["robust_acc"], out["robust_ci95"] = mean_ci95(acc["robust"])
        out["robust_attack"] = (attack_name("autoattack", cfg, autoattack) if "autoattack" in acc
                                else attack_name("pgd", cfg))
    return out


def evaluate_fewshot(method, sampler, n_episodes: int, cfg, *, attack: bool, device="cpu",
                     progress: bool = True, autoattack: str | None = None) -> dict[str, Any]:
    """Accuracy over episodes ``0..n_episodes-1`` of ``sampler`` (fractions); PGD with ``attack``;
    AutoAttack with ``autoattack`` (a version, or None: ``cfg.fewshot_autoattack`` when ``attack``).

    Per query, an attack counts it robust only if it is right clean too; ``robust_acc`` is the per-query
    conjunction of every attack that ran (AutoAttack's name in ``robust_attack`` when it ran, else PGD's).
    Weights are evaluated in fp32 whatever the training dtype."""
    if n_episodes <= 0:
        raise ValueError("n_episodes must be positive")
    if autoattack is None:
        autoattack = getattr(cfg, "fewshot_autoattack", "off") if attack else "off"
    device = torch.device(device)
    # the indicators of the query attack (bench/reliability.py), for the test evaluation (attack on)
    reliability = FewshotReliability(cfg) if attack and getattr(cfg, "reliability", "off") != "off" else None
    model = getattr(method, "model", None)  # the classifiers are built from it: in fp32 too
    flags, ways, shots = [], None, None
    with fp32_eval(model) if model is not None else contextlib.nullcontext():
        for i in tqdm(range(n_episodes), desc="few-shot" + (" PGD" if attack else ""), leave=False,
                      disable=not progress):
            episode = _episode(sampler, i)
            if ways is None:
                ways, shots = int(episode[1].max()) + 1, int((episode[1] == 0).sum())
            flags.append(episode_flags(method, episode, (getattr(sampler, "seed", 0), i), cfg, attack=attack,
                                       autoattack=autoattack, device=device, reliability=reliability))
    ways, shots = getattr(sampler, "ways", ways), getattr(sampler, "shots", shots)
    out = fewshot_block(flags, cfg, ways=ways, shots=shots, autoattack=autoattack)
    if reliability is not None:
        out["reliability"] = reliability.block()
    return out
