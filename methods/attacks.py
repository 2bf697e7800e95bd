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
    """L-inf PGD maximising ``loss_fn(model(x_adv), y)`` (cross-entropy by default).

    Only the input gets a gradient (``torch.autograd.grad`` w.r.t. ``x_adv``), so parameter ``.grad``
    fields are untouched and no parameter gradient is computed. The caller chooses the model's mode
    (the papers attack in eval mode, with BN running statistics). Returns a detached tensor in the
    eps-ball around ``x`` and in [0, 1].
    """
    if steps <= 0 or eps <= 0:
        return x.detach().clone()
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))
    x = x.detach()
    if random_start:
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)
    else:
        x_adv = x.clone()
    # Parameters need no gradient for the attack: switching them off skips the weight-gradient kernels.
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = x_adv + step_size * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)
    finally:
        for p in params:
            p.requires_grad_(True)
    return x_adv.detach()


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
