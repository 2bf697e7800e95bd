"""AutoLoRa (ICLR 2024): robust fine-tuning disentangled through a LoRA branch, with automated λ and
learning rate. Facts from the authors' code: ../shared/reference/autolora.md; settings: docs/autolora.md.

One network, two branches:

- LoRA branch, W + BA (adapters enabled), sees natural images;
- main branch, W alone (adapters disabled), sees PGD adversarial images; it is what is evaluated.

BN layers and the new head are shared. Gradients are routed by toggling ``requires_grad`` before each
branch's forward, with a single backward:

- natural pass: only the LoRA factors and the head (BN affine frozen, as in the reference);
- adversarial pass: everything but the LoRA factors.

Loss: λ1·CE(nat) + (1-λ1)·CE(adv) + λ2·KL(p_LoRA(x) || p_main(x_adv)) (KL sum / batch size, target not
detached, so the KL reaches both branches), λ1 = 1 - a, λ2 = λ2_max·a with a the LoRA branch's accuracy on
the (augmented, as the authors) training data, measured before epoch 1 and after each epoch's validation.
The learning rate follows :class:`AutoLRSchedule`. The LoRA branch acts where ``lora_placement`` puts it
(by default the convs of the last block of each ResNet stage, as the authors' code effectively does).

The model's resting state is the main branch (adapters disabled): ``self.model`` is what the bench
validates, evaluates, attacks and checkpoints; the LoRA branch is entered only inside this module.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods import lora as L
from methods.attacks import eval_mode, pgd_linf
from methods.auto_lr import STALL_RULES, AutoLRSchedule
from methods.base import BaseConfig, EpochDecision, Method, TrainContext, selection_key
from methods.registry import register_method

TARGET_ALIASES = {"resnet": L.RESNET_TARGETS, "vit": L.VIT_TARGETS}
# Data λ's accuracy is measured on: the augmented training loader (the authors' code) or a clean pass.
LAMBDA_DATA = ("train_augmented", "train_clean")


# --------------------------------------------------------------------------------------------------
# pure pieces (tested alone)
# --------------------------------------------------------------------------------------------------
def lambdas(acc: float, lambda2_max: float = 6.0) -> tuple[float, float]:
    """λ1 = 1 - a, λ2 = λ2_max · a, from the LoRA branch's clean training accuracy a in [0, 1]."""
    a = float(acc)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"accuracy {a} is outside [0, 1]")
    return 1.0 - a, lambda2_max * a


def kl_term(adv_logits: torch.Tensor, nat_logits: torch.Tensor, batch_size: int) -> torch.Tensor:
    """KLDivLoss(sum)(log_softmax(adv), softmax(nat)) / batch_size, as the reference: the sum over the
    batch is divided by the configured batch size, and the natural target is not detached."""
    return F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(nat_logits, dim=1), reduction="sum") / batch_size


# --------------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------------
@dataclass
class AutoLoRaConfig(BaseConfig):
    method: str = "autolora"
    # LoRA branch
    r_nat: int = 8
    lora_alpha: float = 1.0  # scale alpha / r = 1/8
    lora_form: str = "reference"  # reference (loralib conv form, as the authors) | peft (PEFT's Conv2d LoRA)
    # regex over module names (PEFT target_modules), or an alias: "resnet" (default), "vit"
    target_modules: str = L.RESNET_TARGETS
    # which matched modules get LoRA (methods/lora.py LORA_PLACEMENTS): reference = the convs of the last block
    # of each ResNet stage, as the authors' code effectively trains (Table 2); all_blocks = every matched module
    lora_placement: str = "reference"
    # automated λ
    lambda2_max: float = 6.0
    lambda_updates_per_epoch: int = 1
    lambda_data: str = "train_augmented"  # one of LAMBDA_DATA
    # automated learning rate
    lr: float = 0.01
    lr_checkpoint_every: int = 4
    rho: float = 0.75
    lr_min: float = 1e-5
    lr_stall_rule: str = "paper"  # paper | reference: see AutoLRSchedule
    epochs: int = 60
    # the paper reports PGD-10
    eval_pgd_steps: int = 10
    # speed switches (measured in bench/perf/autolora_step.py)
    fused_optimizer: bool = False

    def validate(self) -> None:
        super().validate()
        if self.lora_form not in L.LORA_FORMS:
            raise ValueError(f"lora_form={self.lora_form!r}; valid: {', '.join(L.LORA_FORMS)}")
        if self.r_nat <= 0:
            raise ValueError(f"r_nat={self.r_nat} must be positive")
        if self.lambda_updates_per_epoch < 1:
            raise ValueError(f"lambda_updates_per_epoch={self.lambda_updates_per_epoch} must be >= 1")
        if self.lr_checkpoint_every < 1:
            raise ValueError(f"lr_checkpoint_every={self.lr_checkpoint_every} must be >= 1")
        if not 0.0 < self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} must be in (0, 1]")
        if self.lambda2_max < 0:
            raise ValueError(f"lambda2_max={self.lambda2_max} must be >= 0")
        if self.lr_stall_rule not in STALL_RULES:
            raise ValueError(f"lr_stall_rule={self.lr_stall_rule!r}; valid: {', '.join(STALL_RULES)}")
        if self.lora_placement not in L.LORA_PLACEMENTS:
            raise ValueError(f"lora_placement={self.lora_placement!r}; valid: {', '.join(L.LORA_PLACEMENTS)}")
        if self.lambda_data not in LAMBDA_DATA:
            raise ValueError(f"lambda_data={self.lambda_data!r}; valid: {', '.join(LAMBDA_DATA)}")


class _Timer:
    """Optional per-phase wall clock for the performance benchmark (synchronises CUDA)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t


@contextmanager
def _nullctx(name: str):
    yield


@register_method("autolora")
class AutoLoRa(Method):
    Config = AutoLoRaConfig

    def __init__(self, cfg: AutoLoRaConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        targets = TARGET_ALIASES.get(cfg.target_modules, cfg.target_modules)
        self.lora_names = L.add_lora(backbone, form=cfg.lora_form, r=cfg.r_nat, alpha=cfg.lora_alpha,
                                     target_modules=targets, placement=cfg.lora_placement)
        L.set_adapters_enabled(backbone, False)  # resting state: the main branch
        for p in backbone.parameters():  # all trainable; routing happens per forward
            p.requires_grad_(True)
        if cfg.channels_last:
            backbone.to(memory_format=torch.channels_last)
        head_ids = {id(p) for p in backbone.head.parameters()}
        self._lora = L.lora_parameters(backbone)
        lora_ids = {id(p) for p in self._lora}
        params = list(backbone.parameters())
        self._nat_frozen = [p for p in params if id(p) not in lora_ids and id(p) not in head_ids]
        self._all = params
        n_total = L.count_params(params)
        n_lora = L.count_params(self._lora)
        self.param_counts = {
            "lora_targets": len(self.lora_names),
            "lora": n_lora,
            "lora_reference_form": L.lora_param_count(backbone, "reference", cfg.r_nat),
            "lora_peft_form": L.lora_param_count(backbone, "peft", cfg.r_nat),
            "backbone_and_head": n_total - n_lora,
            "trainable_total": n_total,
        }
        self.schedule = AutoLRSchedule(cfg.lr, cfg.lr_checkpoint_every, cfg.rho, cfg.lr_min, cfg.lr_stall_rule)
        self.lambda1: float | None = None
        self.lambda2: float | None = None
        self.lambda_log: list[dict[str, float]] = []  # every λ measurement
        self.lambda_epoch: int | None = None  # the epoch the λ in force was measured for
        self._ctx: TrainContext | None = None  # the running epoch's context (its data passes), for end_epoch
        self.epoch_log: list[dict[str, Any]] = []  # per epoch: λ, η, validation
        self.timer = None  # set to _Timer() to collect the step's split (bench/perf/autolora_step.py)

    # --- branches and routing ------------------------------------------------------------------------
    def lora_branch(self):
        """Context manager: the model runs as W + BA inside it."""
        return L.adapters(self.model, True)

    def _route_natural(self) -> None:
        for p in self._nat_frozen:
            p.requires_grad_(False)
        for p in self._lora:
            p.requires_grad_(True)

    def _route_adversarial(self) -> None:
        for p in self._nat_frozen:
            p.requires_grad_(True)
        for p in self._lora:
            p.requires_grad_(False)

    def _route_all(self) -> None:
        for p in self._all:
            p.requires_grad_(True)

    # --- optimisation --------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        kwargs = {"fused": True} if self.cfg.fused_optimizer else {}
        self.optimizer = torch.optim.SGD(self.param_groups(), lr=self.schedule.lr, momentum=self.cfg.momentum,
                                         weight_decay=self.cfg.weight_decay, **kwargs)
        return self.optimizer

    # --- λ -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def lora_branch_accuracy(self, batches) -> float:
        """Clean accuracy of the LoRA branch (eval mode) over ``batches``; summed over processes."""
        correct = torch.zeros((), dtype=torch.float64)
        total = torch.zeros((), dtype=torch.float64)
        device = None
        with eval_mode(self.model), self.lora_branch():
            for x, y in batches:
                if self.cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                device = x.device
                correct += (self.model(x).argmax(1) == y).sum().item()
                total += y.numel()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.stack([correct, total]).to(device or "cpu")
            if torch.distributed.get_backend() == "nccl" and t.device.type != "cuda":
                t = t.cuda()
            torch.distributed.all_reduce(t)
            correct, total = t[0].cpu(), t[1].cpu()
        return float(correct / total) if total > 0 else 0.0

    def update_lambdas(self, acc: float, epoch: int | None = None, step: int | None = None,
                       when: str = "start") -> None:
        self.lambda1, self.lambda2 = lambdas(acc, self.cfg.lambda2_max)
        self.lambda_epoch = epoch
        self.lambda_log.append({"epoch": epoch, "step": step, "when": when, "lora_train_acc": acc,
                                "lambda1": self.lambda1, "lambda2": self.lambda2})

    def _measure_lambdas(self, ctx: TrainContext, epoch: int, step: int, when: str) -> None:
        augmented = self.cfg.lambda_data == "train_augmented"
        source = ctx.augmented_train_batches if augmented else ctx.train_batches
        if source is None:
            field_name = "augmented_train_batches" if augmented else "train_batches"
            raise ValueError(f"AutoLoRa's λ (lambda_data={self.cfg.lambda_data}) needs ctx.{field_name}")
        self.update_lambdas(self.lora_branch_accuracy(source()), epoch, step, when)

    def _lambda_steps(self, steps_per_epoch: int) -> set[int]:
        k = self.cfg.lambda_updates_per_epoch
        return {math.floor(i * steps_per_epoch / k) for i in range(1, k)} - {0}

    def start_epoch(self, ctx: TrainContext) -> dict[str, float]:
        # Before epoch 1; later epochs use the λ measured by end_epoch, right after the previous epoch's
        # validation and before any reload of the best checkpoint, as the authors' code does.
        self._ctx = ctx
        if self.lambda_epoch != ctx.epoch or self.lambda1 is None:
            self._measure_lambdas(ctx, ctx.epoch, 0, "start")
        return {"lr": self.current_lr(), "lambda1": self.lambda1, "lambda2": self.lambda2,
                "lora_train_acc": self.lambda_log[-1]["lora_train_acc"]}

    # --- one step ------------------------------------------------------------------------------------
    def train_step(self, engine, batch, ctx: TrainContext) -> dict[str, float]:
        cfg = self.cfg
        tm = self.timer or _nullctx
        if cfg.lambda_updates_per_epoch > 1 and ctx.step in self._lambda_steps(ctx.steps_per_epoch):
            self._measure_lambdas(ctx, ctx.epoch, ctx.step, "within_epoch")
        if self.lambda1 is None:
            raise RuntimeError("λ is not measured yet: call start_epoch before train_step")
        x, y = batch
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        module = engine.module
        # PGD on the main branch (adapters are off at rest) in eval mode, input gradient only; through
        # engine.module because DeepSpeed refuses gradients taken outside engine.backward on its outputs.
        with tm("attack"):
            with eval_mode(module):
                x_adv = pgd_linf(module, x, y, eps=cfg.eps, step_size=cfg.train_step_size,
                                 steps=cfg.train_attack_steps, random_start=True)
        module.train()
        with tm("forwards"):
            self._route_natural()
            with self.lora_branch():
                nat = engine(x)
            self._route_adversarial()
            adv = engine(x_adv)
            self._route_all()
            ce_nat = F.cross_entropy(nat, y)
            ce_adv = F.cross_entropy(adv, y)
            kl = kl_term(adv, nat, self._kl_batch_size(engine))
            loss = self.lambda1 * ce_nat + (1.0 - self.lambda1) * ce_adv + self.lambda2 * kl
        with tm("backward"):
            engine.backward(loss)
        with tm("optimizer"):
            engine.step()
        with torch.no_grad():
            return {"loss": loss.item(), "ce_nat": ce_nat.item(), "ce_adv": ce_adv.item(), "kl": kl.item(),
                    "train_nat_acc": (nat.argmax(1) == y).float().mean().item(),
                    "train_adv_acc": (adv.argmax(1) == y).float().mean().item(),
                    "lambda1": self.lambda1, "lambda2": self.lambda2}

    def _kl_batch_size(self, engine) -> int:
        # The configured batch, per process: under data parallelism each process's KL sum is divided by its
        # micro-batch and the gradients are averaged, which equals the reference's one-GPU sum / batch.
        micro = getattr(engine, "train_micro_batch_size_per_gpu", None)
        if callable(micro):
            try:
                return int(micro())
            except Exception:  # noqa: BLE001 - engines without a configured micro-batch
                pass
        return int(self.cfg.batch_size)

    # --- epoch end: selection and learning rate ------------------------------------------------------
    def end_epoch(self, epoch: int, val: dict[str, float]) -> EpochDecision:
        score = val.get(self.cfg.select_metric)
        if score is None:
            raise KeyError(f"validation results lack {self.cfg.select_metric!r} (got {sorted(val)})")
        lr_used = self.current_lr() if self.optimizer is not None else self.schedule.lr
        key = selection_key(val, self.cfg.select_metric)
        decision = self.schedule.step(score, tiebreak=key[1])
        if decision.is_best:
            self.best_val = float(score)
        if self.optimizer is not None:
            self.set_lr(self.schedule.lr)
        lambdas_used = (self.lambda1, self.lambda2)
        if self._ctx is not None and not decision.stop and epoch + 1 < self.cfg.epochs:
            # λ for the next epoch on the weights this epoch ended with: the bench reloads the best checkpoint
            # (if decided) only after this returns, as the authors' code measures before its reload.
            self._measure_lambdas(self._ctx, epoch + 1, 0, "after_validation")
        row = {"epoch": epoch, "lr": lr_used, "lambda1": lambdas_used[0], "lambda2": lambdas_used[1],
               **{k: float(v) for k, v in val.items()}, "is_best": decision.is_best,
               "reload_best": decision.reload_best, "next_lr": self.schedule.lr}
        self.epoch_log.append(row)
        self.history.append(row)
        return decision

    # --- evaluation: the main branch -----------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        # Adapters are disabled at rest, so the model's forward is W alone + shared BN + head.
        return self.model

    # --- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best_val": self.best_val, "history": self.history, "schedule": self.schedule.state_dict(),
                "lambda1": self.lambda1, "lambda2": self.lambda2, "lambda_epoch": self.lambda_epoch,
                "lambda_log": self.lambda_log, "epoch_log": self.epoch_log}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.schedule.load_state_dict(state.get("schedule", {}))
        self.lambda1, self.lambda2 = state.get("lambda1"), state.get("lambda2")
        self.lambda_epoch = state.get("lambda_epoch")
        self.lambda_log = list(state.get("lambda_log", []))
        self.epoch_log = list(state.get("epoch_log", []))
        if self.optimizer is not None:
            self.set_lr(self.schedule.lr)

    def summary(self) -> dict[str, Any]:
        return {
            "lora_form": self.cfg.lora_form,
            "lora_placement": self.cfg.lora_placement,
            "lora_modules": self.lora_names,
            "lambda_data": self.cfg.lambda_data,
            "r_nat": self.cfg.r_nat,
            "params": self.param_counts,
            # per epoch (the λ in force during the epoch, the η it trained with)
            "lambda1": [r["lambda1"] for r in self.epoch_log],
            "lambda2": [r["lambda2"] for r in self.epoch_log],
            "lr": [r["lr"] for r in self.epoch_log],
            "val_pgd_acc": [r.get(self.cfg.select_metric) for r in self.epoch_log],
            "lambda_measurements": self.lambda_log,
            "lr_checkpoints": self.schedule.events,
            # the epoch (as the bench numbers them) whose checkpoint was selected
            "selected_epoch": next((r["epoch"] for r in reversed(self.epoch_log) if r["is_best"]), None),
            "best_val": self.schedule.best,
            "epochs_run": self.schedule.epoch,
            "stopped_by_lr": self.schedule.lr < self.cfg.lr_min,
            "epochs": self.epoch_log,
        }
