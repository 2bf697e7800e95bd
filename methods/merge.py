"""AMT's test-time merging of a LoRA pool (Algorithm 2; the reference's ``protonet_merge.forward_router``).

Per episode: one DiffAugment draw of the support, shared by every member; each member p is scored on it
(augmented support against its clean-support prototypes, ``s_p = lam * intra - (1 - lam) * inter``), weighted ``w_p = exp(beta (s_p - 1))`` over the
top-k members and renormalised, and the network runs with ``W = W_res + sum_p w_p s B_p A_p`` at every
adapted layer, optionally with singular-value trimming (rank ``floor(rho * min(m, n))``) of the merged
weights, exact or the authors' randomised ``torch.svd_lowrank``.

Nothing here edits the model: merged weights are parameter overrides for ``torch.func.functional_call``.
"""
from __future__ import annotations

import math
import re
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from methods.episode_rng import seeded_global_rng
from methods.lora_svd import lora_sites, site_delta, site_keys


def merge_weights(scores: torch.Tensor, beta: float, top_k: int) -> torch.Tensor:
    """``w = exp(beta (s - 1))`` kept on the top-k scores, renormalised to sum 1 (zeros elsewhere)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    k = max(1, min(int(top_k), scores.numel()))
    idx = scores.topk(k).indices
    logits = beta * (scores[idx] - 1.0)
    w = torch.zeros_like(scores)
    w[idx] = torch.softmax(logits, 0)  # exp(beta(s-1)) / sum: the same, computed stably
    return w.float()


TRIM_SVDS = ("exact", "lowrank")


def trim_rank(W: torch.Tensor, rho: float, svd: str = "exact", seed: int | None = None) -> torch.Tensor:
    """Rank ``q = floor(rho * min(m, n))`` approximation of ``W`` (convs over (out, in*k*k)); rho >= 1: ``W``.

    ``svd="exact"``: the best rank-q approximation (``torch.linalg.svd``). ``"lowrank"``: the authors'
    ``torch.svd_lowrank(W, q=q, niter=2)`` in fp32 (their layers_merge.py ``svd_trim``): randomised and
    without oversampling, so not the best rank-q approximation (a 3-7% larger residual) and different from
    draw to draw. It draws from torch's global generator of ``W``'s device: with ``seed``, seeded with it
    for this call and restored after (``seeded_global_rng``); None: as that generator stands.
    """
    if svd not in TRIM_SVDS:
        raise ValueError(f"svd={svd!r}; valid: {', '.join(TRIM_SVDS)}")
    if rho >= 1.0:
        return W
    W2 = W.reshape(W.shape[0], -1).float()
    q = max(1, int(math.floor(rho * min(W2.shape))))
    if svd == "exact":
        U, S, Vh = torch.linalg.svd(W2, full_matrices=False)
        return ((U[:, :q] * S[:q]) @ Vh[:q]).reshape(W.shape).to(W.dtype)
    with seeded_global_rng(seed, W.device) if seed is not None else nullcontext():
        U, S, V = torch.svd_lowrank(W2, q=q, niter=2)
    return ((U * S) @ V.mT).reshape(W.shape).to(W.dtype)


def merged_overrides(root: torch.nn.Module, members: list[dict[str, torch.Tensor]], weights,
                     prefix: str = "", rho: float = 1.0, trim_pattern: str = ".*", svd: str = "exact",
                     svd_seed: int | None = None) -> dict[str, torch.Tensor]:
    """Parameter overrides (names relative to the module ``functional_call`` runs) realising the merge.

    ``root`` is the module holding the LoRA sites; ``prefix`` is its name inside the called module;
    ``members`` are member states keyed like the called module's parameters. Each site's base weight
    becomes ``W_res + sum_p w_p delta_p`` (trimmed when rho < 1 and the site matches ``trim_pattern``)
    and its LoRA ``B`` becomes zero, so the LoRA branch adds nothing. ``svd`` is ``trim_rank``'s; with
    "lowrank" and ``svd_seed``, the global generator is seeded once for the whole merge and the trimmed
    layers draw one after the other in site order, as the authors' single forward does.
    """
    weights = [float(w) for w in weights]
    out: dict[str, torch.Tensor] = {}
    seeded = svd == "lowrank" and rho < 1.0 and svd_seed is not None
    device = next(iter(root.parameters())).device
    with seeded_global_rng(svd_seed, device) if seeded else nullcontext():
        for name, m in lora_sites(root).items():
            keys = {k: prefix + v for k, v in site_keys(name, m).items()}
            W = root.get_parameter(site_keys(name, m)["W"]).detach()
            merged = W.clone()
            for w, state in zip(weights, members):
                if w != 0.0:
                    merged = merged + w * site_delta(m, state[keys["A"]].to(W), state[keys["B"]].to(W))
            if rho < 1.0 and re.fullmatch(trim_pattern, name):
                merged = trim_rank(merged, rho, svd)
            out[keys["W"]] = merged
            out[keys["B"]] = torch.zeros_like(root.get_parameter(site_keys(name, m)["B"]))
    return out


def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.9,
                 mean=None, std=None, translation: float = 0.125) -> torch.Tensor:
    """The authors' DiffAugment of a batch (``types=['color', 'translation']``): with probability ``p`` (one
    coin for the whole batch) a horizontal flip of the whole batch with probability 1/2, then per sample
    brightness, saturation, contrast and a translation with zero padding.

    The authors augment normalised inputs; ``x`` here is in pixel space, so it is normalised with ``mean``
    and ``std`` (per channel; None: 0 and 1), augmented, and mapped back: the same images the authors'
    network sees (brightness adds U(-0.5, 0.5) std per channel; padding is the mean colour). No clamp to
    [0, 1], as theirs has none.
    """
    n = x.shape[0]
    g = dict(generator=generator, device="cpu")

    def r(*shape):
        return torch.rand(*shape, **g).to(x)

    if float(torch.rand((), **g)) >= p:
        return x
    mean = torch.as_tensor(0.0 if mean is None else mean).to(x).reshape(1, -1, 1, 1)
    std = torch.as_tensor(1.0 if std is None else std).to(x).reshape(1, -1, 1, 1)
    y = (x - mean) / std
    if float(torch.rand((), **g)) < 0.5:
        y = y.flip(3)
    y = y + (r(n, 1, 1, 1) - 0.5)
    m = y.mean(1, keepdim=True)
    y = (y - m) * (r(n, 1, 1, 1) * 2) + m
    m = y.mean([1, 2, 3], keepdim=True)
    y = (y - m) * (r(n, 1, 1, 1) + 0.5) + m
    H, W = x.shape[-2:]
    sh, sw = int(H * translation + 0.5), int(W * translation + 0.5)
    tx = torch.randint(-sh, sh + 1, (n,), **g)
    ty = torch.randint(-sw, sw + 1, (n,), **g)
    padded = F.pad(y, [1, 1, 1, 1])
    rows = (torch.arange(H).view(1, H, 1) + tx.view(n, 1, 1) + 1).clamp(0, H + 1).to(x.device)
    cols = (torch.arange(W).view(1, 1, W) + ty.view(n, 1, 1) + 1).clamp(0, W + 1).to(x.device)
    bidx = torch.arange(n, device=x.device).view(n, 1, 1)
    y = padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2)
    return y * std + mean


def support_score(feats_clean: torch.Tensor, feats_aug: torch.Tensor, support_y: torch.Tensor, ways: int,
                  lam: float) -> float:
    """``lam * intra - (1 - lam) * inter``, class-balanced: intra is the mean over classes of the mean cosine
    of a class's augmented support to its own clean prototype; inter the same for the mean cosine to the
    other ways' prototypes (equal to plain means when every class has the same number of shots)."""
    onehot = F.one_hot(support_y, ways).to(feats_clean)
    counts = onehot.sum(0)
    protos = (onehot.t() @ feats_clean) / counts.clamp_min(1).unsqueeze(1)
    cos = F.normalize(feats_aug, dim=-1) @ F.normalize(protos, dim=-1).t()  # [Ns, ways]
    present = counts > 0

    def class_mean(per_sample):
        return ((onehot.t() @ per_sample) / counts.clamp_min(1))[present].mean()

    intra = class_mean((cos * onehot).sum(1))
    inter = class_mean((cos * (1 - onehot)).sum(1) / (ways - 1)) if ways > 1 else cos.new_zeros(())
    return float(lam * intra - (1 - lam) * inter)
