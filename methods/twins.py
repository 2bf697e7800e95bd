"""TWINS (Liu et al., CVPR 2023): robust fine-tuning with two-wing normalisation; the TWINS column of
AutoLoRa's Table 2. Settings and their sources: docs/autolora.md (Baselines of Table 2).

Read from the authors' code (ziquanliu/CVPR2023-TWINS, ``TWINS_cifar``/``TWINS_high_res_data``:
train.sh, train-TWINS-AT.py, robustness/imagenet_models/resnet.py, robustness/model_utils.py):

- every BatchNorm becomes two wings that share the conv weights (and the whole network but the BN layers):
  the **frozen wing** normalises with the pre-trained running statistics, always, and never updates them;
  the **adaptive wing** is an ordinary BN: batch statistics in training, running statistics (which it
  updates) in evaluation. In their code the frozen wing has its own affine parameters, initialised from the
  pre-trained ones and trained (they are in the optimizer; ``twins_frozen_affine=separate``);
  ``shared`` makes both wings use one affine pair.
- one PGD-10 batch (eval mode, i.e. the adaptive wing's running statistics, uniform random start) is split
  in halves: the first half goes through the frozen wing, the second through the adaptive wing, in one
  forward (``twins_batch=halves``); ``full`` gives each wing the whole batch (two forwards).
- loss ``twins_lambda · CE(frozen half) + CE(adaptive half)``; λ_twins 1.0 on CIFAR, 0.4 on the 224-pixel
  sets in their scripts.
- the adaptive wing is what is attacked, validated and evaluated; the schedule is Vanilla RFT's (same
  scripts: lr 0.003, MultiStepLR x0.1 at epochs 30 and 50 of 60, weight decay 1e-5 CIFAR / 1e-3 others),
  and the last epoch's model is evaluated.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from methods.baselines import RFTConfig, _WholeNetwork, attack_in_eval_mode
from methods.base import TrainContext
from methods.registry import register_method

TWINS_BATCH = ("halves", "full")
TWINS_FROZEN_AFFINE = ("separate", "shared")
WINGS = ("adaptive", "frozen", "split")


class TwoWingBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d (the adaptive wing: its own parameters, buffers and state-dict keys) plus a frozen wing:
    the pre-trained running statistics as buffers that nothing updates, and, with ``separate_affine``, its own
    affine pair initialised from the pre-trained one.

    ``wing`` picks what ``forward`` does: ``adaptive`` (plain BN), ``frozen``, or ``split`` (the first
    ``n_frozen`` samples through the frozen wing, the rest through the adaptive wing, in one call)."""

    def __init__(self, bn: nn.BatchNorm2d, separate_affine: bool = True):
        if bn.running_mean is None or not bn.affine:
            raise ValueError("TWINS needs BatchNorm layers with running statistics and affine parameters")
        w = bn.weight
        super().__init__(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=True,
                         track_running_stats=True, device=w.device, dtype=w.dtype)
        self.load_state_dict(bn.state_dict())
        self.training = bn.training
        self.register_buffer("frozen_mean", bn.running_mean.detach().clone())
        self.register_buffer("frozen_var", bn.running_var.detach().clone())
        if separate_affine:
            self.frozen_weight = nn.Parameter(bn.weight.detach().clone())
            self.frozen_bias = nn.Parameter(bn.bias.detach().clone())
        else:
            self.frozen_weight = self.frozen_bias = None
        self.wing = "adaptive"
        self.n_frozen = 0

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.frozen_weight is None else self.frozen_weight
        bias = self.bias if self.frozen_bias is None else self.frozen_bias
        # training=False: normalise with the stored statistics and leave them as they are, in any mode
        return F.batch_norm(x, self.frozen_mean, self.frozen_var, weight, bias, False, 0.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wing == "adaptive":
            return super().forward(x)
        if self.wing == "frozen":
            return self.forward_frozen(x)
        n = self.n_frozen
        return torch.cat([self.forward_frozen(x[:n]), super().forward(x[n:])])

    def extra_repr(self) -> str:
        affine = "separate" if self.frozen_weight is not None else "shared"
        return super().extra_repr() + f", two wings, frozen affine {affine}"


def add_two_wings(model: nn.Module, separate_affine: bool = True) -> int:
    """Replace every BatchNorm2d of ``model`` in place by a :class:`TwoWingBatchNorm2d` built from it (its
    current statistics become the frozen wing's). Returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(parent, name, TwoWingBatchNorm2d(child, separate_affine))
                count += 1
    if count == 0:
        raise ValueError(f"TWINS needs BatchNorm2d layers; {type(model).__name__} has none")
    return count


def two_wing_layers(model: nn.Module) -> list[TwoWingBatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, TwoWingBatchNorm2d)]


@contextmanager
def wing(model: nn.Module, which: str, n_frozen: int = 0):
    """Run ``model`` with every two-wing BN set to ``which`` (see :class:`TwoWingBatchNorm2d`), then go back
    to the adaptive wing, the resting state."""
    if which not in WINGS:
        raise ValueError(f"wing={which!r}; valid: {', '.join(WINGS)}")
    layers = two_wing_layers(model)
    for m in layers:
        m.wing, m.n_frozen = which, n_frozen
    try:
        yield model
    finally:
        for m in layers:
            m.wing, m.n_frozen = "adaptive", 0


@dataclass
class TWINSConfig(RFTConfig):
    method: str = "twins"
    twins_lambda: float = 1.0  # weight of the frozen wing's loss; their scripts: 1.0 CIFAR, 0.4 224-pixel sets
    twins_batch: str = "halves"  # one of TWINS_BATCH
    twins_frozen_affine: str = "separate"  # one of TWINS_FROZEN_AFFINE

    def validate(self) -> None:
        super().validate()
        if self.twins_lambda < 0:
            raise ValueError(f"twins_lambda={self.twins_lambda} must be >= 0")
        if self.twins_batch not in TWINS_BATCH:
            raise ValueError(f"twins_batch={self.twins_batch!r}; valid: {', '.join(TWINS_BATCH)}")
        if self.twins_frozen_affine not in TWINS_FROZEN_AFFINE:
            raise ValueError(f"twins_frozen_affine={self.twins_frozen_affine!r}; "
                             f"valid: {', '.join(TWINS_FROZEN_AFFINE)}")


@register_method("twins")
class TWINS(_WholeNetwork):
    """Adversarial fine-tuning of the whole network through a frozen and an adaptive BN wing."""

    Config = TWINSConfig

    def __init__(self, cfg: TWINSConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        self.n_two_wing = add_two_wings(backbone.encoder if hasattr(backbone, "encoder") else backbone,
                                        separate_affine=cfg.twins_frozen_affine == "separate")

    def train_step(self, engine, batch, ctx: TrainContext) -> dict[str, float]:
        cfg = self.cfg
        x, y = batch
        # the model rests in the adaptive wing: the attack (eval mode) uses its running statistics
        x_adv = attack_in_eval_mode(engine, x, y, cfg)
        engine.module.train()
        if cfg.twins_batch == "halves":
            n = len(x) // 2
            if n == 0:
                raise ValueError("twins_batch=halves needs batches of at least 2 samples")
            with wing(engine.module, "split", n_frozen=n):
                logits = engine(x_adv)
            frozen_logits, frozen_y = logits[:n], y[:n]
            adaptive_logits, adaptive_y = logits[n:], y[n:]
        else:
            with wing(engine.module, "frozen"):
                frozen_logits = engine(x_adv)
            adaptive_logits = engine(x_adv)
            frozen_y = adaptive_y = y
        loss_frozen = F.cross_entropy(frozen_logits, frozen_y)
        loss_adaptive = F.cross_entropy(adaptive_logits, adaptive_y)
        loss = cfg.twins_lambda * loss_frozen + loss_adaptive
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            return {"train_loss": loss.item(), "loss_frozen": loss_frozen.item(),
                    "loss_adaptive": loss_adaptive.item(),
                    "train_adv_acc_frozen": (frozen_logits.argmax(1) == frozen_y).float().mean().item(),
                    "train_adv_acc_adaptive": (adaptive_logits.argmax(1) == adaptive_y).float().mean().item()}

    def summary(self):
        return {**super().summary(), "two_wing_bn_layers": self.n_two_wing,
                "twins_batch": self.cfg.twins_batch, "twins_frozen_affine": self.cfg.twins_frozen_affine}
