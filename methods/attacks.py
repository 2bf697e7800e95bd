"""Attacks that methods train with (and that ``bench`` evaluates with).

Inputs live in pixel space [0, 1]; normalisation is part of the model, so eps means what papers say.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
             step_size: float = 2 / 255, steps: int = 10, random_start: bool = True,
             loss_fn=None) -> torch.Tensor:
    """L-inf PGD maximising ``loss_fn(model(x_adv), y)`` (cross-entropy by default); the last iterate.

    Only the input gets a gradient (``torch.autograd.grad`` w.r.t. ``x_adv``), so parameter ``.grad``
    fields are untouched and no parameter gradient is computed. The caller chooses the model's mode
    (the papers attack in eval mode, with BN running statistics). Returns a detached tensor in the
    eps-ball around ``x`` and in [0, 1]. Training uses this; evaluation uses :func:`pgd_linf_robust`.
    """
    return _pgd(model, x, y, eps, step_size, steps, random_start, loss_fn)[0]


def pgd_linf_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
                    steps: int, random_start: bool = False, loss_fn=None,
                    generator: torch.Generator | None = None,
                    loss_trace: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD for evaluation: ``(x_adv, robust)`` where ``robust[i]`` is True only if sample i is classified
    correctly at every point the attack visited (its start, which is ``x`` itself without ``random_start``,
    and every iterate), and ``x_adv[i]`` is the first misclassified point found (else the last iterate).
    ``generator`` (a CPU generator) draws the random start, so a restart is a function of its seed alone.

    Why not the last iterate alone: a point the attack passed through while misclassified is an adversarial
    example (AutoAttack's APGD keeps its best iterate the same way), and counting the last iterate only
    lets a sample that is wrong clean count as robust (robust accuracy above clean accuracy). The
    iterates' predictions come from the forward passes the gradient needs anyway: one extra forward in all.

    ``loss_trace``, a list, receives the per-sample cross-entropy at the start and after every step
    (``steps + 1`` CPU tensors of shape ``[len(x)]``), from those same logits: what an attack-failure
    indicator reads to see whether the loss was still rising when the attack stopped.
    """
    return _pgd(model, x, y, eps, step_size, steps, random_start, loss_fn, track=True, generator=generator,
                loss_trace=loss_trace)


def _pgd(model, x, y, eps, step_size, steps, random_start, loss_fn, track=False, generator=None, loss_trace=None):
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))
    x = x.detach()
    if random_start and steps > 0 and eps > 0:
        if generator is None:
            noise = torch.empty_like(x).uniform_(-eps, eps)
        else:
            noise = torch.empty(x.shape, dtype=x.dtype).uniform_(-eps, eps, generator=generator).to(x.device)
        x_adv = (x + noise).clamp_(0.0, 1.0)
    else:
        x_adv = x.clone()
    robust = torch.ones(len(x), dtype=torch.bool, device=x.device) if track else None
    found = x_adv.clone() if track else None  # per sample: the first misclassified point

    def record(logits, at):  # a misclassified point is an adversarial example, whatever comes after it
        wrong = (logits.argmax(1) != y) & robust
        found[wrong] = at[wrong].detach()
        robust.logical_and_(~wrong)
        if loss_trace is not None:
            loss_trace.append(F.cross_entropy(logits.detach().float(), y, reduction="none").cpu())

    # Parameters need no gradient for the attack: switching them off skips the weight-gradient kernels.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(steps if eps > 0 else 0):
            x_adv.requires_grad_(True)
            logits = model(x_adv)
            if track:
                record(logits, x_adv)
            (grad,) = torch.autograd.grad(loss_fn(logits, y), x_adv)
            with torch.no_grad():
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
        if track:
            with torch.no_grad():
                record(model(x_adv), x_adv)
                found[robust] = x_adv[robust]
    finally:
        for p in params:
            p.requires_grad_(True)
    return (found, robust) if track else (x_adv.detach(), None)


class eval_mode:
    """Context manager: put a module in eval mode and restore its previous train/eval flags after."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training
        return False
