"""Baselines: vanilla robust fine-tuning (``rft``, AutoLoRa's "Vanilla RFT") and clean fine-tuning (``ft``).

Both train the whole network (backbone and new head) with SGD; the learning rate drops by ``lr_decay`` at
``lr_milestone_epochs`` (or, when that is null, at ``lr_milestones``, fractions of the epochs).

``rft``'s defaults are the AutoLoRa paper's Vanilla RFT, which comes from the TWINS authors' scripts
(ziquanliu/CVPR2023-TWINS ``AT_cifar``/``AT_high_res_data``: train.sh, train-AT.py): PGD-10 adversarial
training of every weight, 60 epochs, lr 0.003 dropped x0.1 at epochs 30 and 50 (their MultiStepLR, stepped
per iteration, changes the rate at the first iteration of epochs 31 and 51), SGD momentum 0.9, weight decay
1e-5 on CIFAR (1e-3 on the 224-pixel sets: the paper preset sets it), batch 128, and the LAST epoch's model
is evaluated (their script saves ``checkpoint_final``; the best-checkpoint save is commented out).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from methods.attacks import eval_mode, pgd_linf
from methods.base import BaseConfig, EpochDecision, Method, TrainContext
from methods.registry import register_method

EVAL_CHECKPOINTS = ("last", "best_val")


@dataclass
class RFTConfig(BaseConfig):
    lr: float = 0.003
    weight_decay: float = 1e-5
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.83])  # epochs 30 and 50 of 60
    lr_milestone_epochs: list[int] | None = None  # absolute epochs (0-based index of the first decayed epoch)
    lr_decay: float = 0.1
    # which model the test evaluates: the last epoch's (the TWINS scripts) or the best on validation
    eval_checkpoint: str = "last"

    def validate(self) -> None:
        super().validate()
        if self.eval_checkpoint not in EVAL_CHECKPOINTS:
            raise ValueError(f"eval_checkpoint={self.eval_checkpoint!r}; valid: {', '.join(EVAL_CHECKPOINTS)}")
        if self.lr_milestone_epochs is not None and any(int(m) < 0 for m in self.lr_milestone_epochs):
            raise ValueError(f"lr_milestone_epochs={self.lr_milestone_epochs} must be >= 0")


@dataclass
class FTConfig(RFTConfig):
    TRAINS_ON_ATTACKS = False  # clean training: train_attack_steps is unused
    lr: float = 0.01
    weight_decay: float = 1e-4
    select_metric: str = "val_clean_acc"
    eval_checkpoint: str = "best_val"


def step_lr(cfg: RFTConfig, epoch: int) -> float:
    """The learning rate of 0-based ``epoch`` under the milestone schedule (MultiStepLR over epochs)."""
    if cfg.lr_milestone_epochs is not None:
        passed = sum(epoch >= int(m) for m in cfg.lr_milestone_epochs)
    else:
        passed = sum(epoch >= m * cfg.epochs for m in cfg.lr_milestones)
    return cfg.lr * cfg.lr_decay ** passed


class _WholeNetwork(Method):
    def start_epoch(self, ctx: TrainContext) -> dict[str, float]:
        self.set_lr(step_lr(self.cfg, ctx.epoch))
        return {"lr": self.current_lr()}

    def end_epoch(self, epoch: int, val: dict[str, float]) -> EpochDecision:
        if self.cfg.eval_checkpoint == "best_val":
            return super().end_epoch(epoch, val)
        # no checkpoint is selected: the bench evaluates the model as the last epoch left it
        self.history.append({"epoch": epoch, "lr": self.current_lr(), **val})
        return EpochDecision(is_best=False)

    def summary(self):
        return {"history": self.history, "eval_checkpoint": self.cfg.eval_checkpoint}

    def inputs(self, engine, x, y):
        return x

    def train_step(self, engine, batch, ctx: TrainContext) -> dict[str, float]:
        x, y = batch
        x_train = self.inputs(engine, x, y)
        loss = F.cross_entropy(engine(x_train), y)
        engine.backward(loss)
        engine.step()
        return {"train_loss": loss.item()}


def attack_in_eval_mode(engine, x, y, cfg: BaseConfig):
    """Training PGD as the TWINS and AutoLoRa authors run it: eval mode (BN running statistics), uniform random
    start, through engine.module (DeepSpeed refuses gradients taken outside engine.backward)."""
    with eval_mode(engine.module):
        return pgd_linf(engine.module, x, y, eps=cfg.eps, step_size=cfg.train_step_size,
                        steps=cfg.train_attack_steps, random_start=True)


@register_method("rft")
class RFT(_WholeNetwork):
    """Vanilla robust fine-tuning: every weight trained on PGD adversarial examples (Madry et al.)."""

    Config = RFTConfig

    def inputs(self, engine, x, y):
        # the training forward then runs in train mode
        return attack_in_eval_mode(engine, x, y, self.cfg)


@register_method("ft")
class FT(_WholeNetwork):
    """Clean fine-tuning: the non-robust reference point."""

    Config = FTConfig
