"""Baselines: vanilla robust fine-tuning (``rft``, AutoLoRa's "Vanilla RFT") and clean fine-tuning (``ft``).

Both train the whole network (backbone and new head) with SGD; the learning rate drops by 10x at
``lr_milestones`` (fractions of the epochs), the usual robust fine-tuning protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from methods.attacks import eval_mode, pgd_linf
from methods.base import BaseConfig, Method, TrainContext
from methods.registry import register_method


@dataclass
class RFTConfig(BaseConfig):
    lr: float = 0.01
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.83])  # epochs 30 and 50 of 60
    lr_decay: float = 0.1


@dataclass
class FTConfig(RFTConfig):
    select_metric: str = "val_clean_acc"


class _WholeNetwork(Method):
    def start_epoch(self, ctx: TrainContext) -> dict[str, float]:
        passed = sum(ctx.epoch >= m * self.cfg.epochs for m in self.cfg.lr_milestones)
        self.set_lr(self.cfg.lr * self.cfg.lr_decay ** passed)
        return {"lr": self.current_lr()}

    def inputs(self, engine, x, y):
        return x

    def train_step(self, engine, batch, ctx: TrainContext) -> dict[str, float]:
        x, y = batch
        x_train = self.inputs(engine, x, y)
        loss = F.cross_entropy(engine(x_train), y)
        engine.backward(loss)
        engine.step()
        return {"train_loss": loss.item()}


@register_method("rft")
class RFT(_WholeNetwork):
    """Vanilla robust fine-tuning: every weight trained on PGD adversarial examples (Madry et al.)."""

    Config = RFTConfig

    def inputs(self, engine, x, y):
        # The attack runs through engine.module (DeepSpeed refuses gradients outside engine.backward)
        # in eval mode, as the AutoLoRa reference does; the training forward then runs in train mode.
        with eval_mode(engine.module):
            return pgd_linf(engine.module, x, y, eps=self.cfg.eps, step_size=self.cfg.train_step_size,
                            steps=self.cfg.train_attack_steps, random_start=True)


@register_method("ft")
class FT(_WholeNetwork):
    """Clean fine-tuning: the non-robust reference point."""

    Config = FTConfig
