"""PMF baseline: ProtoNet meta-tuning of an SVD-initialised LoRA on a frozen backbone, clean episodes only.

This is AMT's pipeline without the adversarial query set, the weight perturbation and the pool (PMF,
Hu et al. CVPR 2022, meta-trains a cosine ProtoNet; here, as in AMT, only LoRA factors and the
classifier scale are tuned). ``methods/amt.py`` builds on this module.

ProtoNet head: prototypes are the mean clean support features; logits = scale * (cos(f(x), c_k) + bias),
scale learnable, initialised 10; bias fixed at 0 unless ``learn_bias``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods.attacks import eval_mode
from methods.base import EpisodicConfig, Method, TrainContext, freeze
from methods.lora_svd import apply_svd_lora
from methods.registry import register_method

ADAPTER_FORMAT = "amt-lora-v1"


@dataclass
class PMFConfig(EpisodicConfig):
    # paper settings (AMT, NeurIPS 2024; the same for its PMF row)
    epochs: int = 30
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: int = 5  # linear warm-up, then cosine to min_lr (per step)
    min_lr: float = 0.0
    rank: int = 8
    lora_alpha: float | None = None  # None: alpha = rank (scale 1), as the reference
    target_modules: str = "auto"  # regex over encoder module names; auto: ViT qkv/proj/fc1/fc2, else layer* convs
    qkv_mode: str = "merged"  # merged: one rank-r LoRA per q, k, v block (reference); fused: one across qkv (PEFT)
    scale_init: float = 10.0
    learn_bias: bool = False
    freeze_norm: bool = True  # the frozen backbone's BatchNorm keeps its running statistics during meta-tuning
    select_metric: str = "val_fewshot_acc"
    adapter_path: str | None = None  # where the selected epoch's LoRA is saved (pool members set it)

    def validate(self) -> None:
        super().validate()
        if self.rank <= 0:
            raise ValueError(f"rank={self.rank} must be positive")
        if self.qkv_mode not in ("merged", "fused"):
            raise ValueError(f"qkv_mode={self.qkv_mode!r}; valid: merged, fused")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")


def prototypes(feats: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    onehot = F.one_hot(labels, ways).to(feats.dtype)
    return (onehot.t() @ feats) / onehot.sum(0).clamp_min(1).unsqueeze(1)


def cosine_logits(feats: torch.Tensor, protos: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    cos = F.normalize(feats.float(), dim=-1) @ F.normalize(protos.float(), dim=-1).t()
    return scale * (cos + bias)


class ProtoNet(nn.Module):
    """The trained module: backbone (LoRA inside) + the ProtoNet scale. ``forward(x)`` gives features."""

    def __init__(self, backbone: nn.Module, scale_init: float = 10.0, learn_bias: bool = False,
                 freeze_norm: bool = True):
        super().__init__()
        self.backbone = backbone
        # shape [1], not scalars: DeepSpeed's parameter broadcast cannot view 0-dim tensors
        self.scale_cls = nn.Parameter(torch.full((1,), float(scale_init)))
        self.bias = nn.Parameter(torch.zeros(1), requires_grad=learn_bias)
        self.freeze_norm = freeze_norm

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_norm:  # frozen backbone: normalisation layers keep their statistics
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._NormBase):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(x)

    def logits(self, feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        return cosine_logits(feats, protos, self.scale_cls, self.bias)


class ProtoClassifier(nn.Module):
    """Query images -> logits over an episode's ways, against fixed prototypes.

    ``overrides`` (parameter name -> tensor) run the model through ``torch.func.functional_call``
    (test-time merged weights) without editing it.
    """

    def __init__(self, model: ProtoNet, protos: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 overrides: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("protos", protos.detach())
        self.register_buffer("scale", torch.as_tensor(scale).detach().float())
        self.register_buffer("bias_", torch.as_tensor(bias).detach().float())
        self.overrides = overrides

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.overrides is None:
            return self.model(x)
        return torch.func.functional_call(self.model, self.overrides, (x,), strict=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.features(x), self.protos, self.scale, self.bias_)


def warmup_cosine(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``lr`` to ``min_lr`` over the rest."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t))


def episode_to(episode, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sx, sy, qx, qy = episode
    return sx.to(device), sy.to(device).long(), qx.to(device), qy.to(device).long()


@register_method("pmf")
class PMF(Method):
    """ProtoNet meta-tuning of LoRA (clean), the baseline AMT is compared with."""

    Config = PMFConfig
    episodic = True

    def __init__(self, cfg: PMFConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        freeze(backbone)
        self.lora_layers = apply_svd_lora(backbone.encoder, r=cfg.rank, alpha=cfg.lora_alpha,
                                          target_modules=cfg.target_modules, qkv_mode=cfg.qkv_mode)
        self.model = ProtoNet(backbone, cfg.scale_init, cfg.learn_bias, cfg.freeze_norm)
        self._steps_per_epoch = cfg.episodes_per_epoch

    # --- schedule -----------------------------------------------------------------------------------
    def lr_at(self, epoch: int, step: int, steps_per_epoch: int | None = None) -> float:
        spe = max(1, steps_per_epoch or self._steps_per_epoch)
        # warm-up never takes the whole run: with fewer epochs than warm-up epochs it is shortened
        warm_epochs = min(self.cfg.warmup_epochs, max(0, self.cfg.epochs - 1))
        return warmup_cosine(epoch * spe + step, self.cfg.epochs * spe, warm_epochs * spe, self.cfg.lr,
                             self.cfg.min_lr)

    def start_epoch(self, ctx: TrainContext) -> dict[str, float]:
        if ctx.steps_per_epoch:
            self._steps_per_epoch = ctx.steps_per_epoch
        self.set_lr(self.lr_at(ctx.epoch, 0))
        return {"lr": self.current_lr()}

    # --- training -----------------------------------------------------------------------------------
    def episode_loss(self, feats_s, sy, feats_q, qy, ways, model: ProtoNet):
        logits = model.logits(feats_q, prototypes(feats_s, sy, ways))
        return F.cross_entropy(logits, qy), logits

    def train_step(self, engine, batch, ctx: TrainContext) -> dict[str, float]:
        self.set_lr(self.lr_at(ctx.epoch, ctx.step, ctx.steps_per_epoch))
        sx, sy, qx, qy = episode_to(batch, ctx.device)
        ways = int(sy.max()) + 1
        feats = engine(torch.cat([sx, qx]))
        loss, logits = self.episode_loss(feats[:len(sx)], sy, feats[len(sx):], qy, ways, engine.module)
        engine.backward(loss)
        engine.step()
        return {"train_loss": loss.item(), "train_acc": (logits.argmax(1) == qy).float().mean().item(),
                "lr": self.current_lr()}

    def end_epoch(self, epoch: int, val: dict[str, float]):
        decision = super().end_epoch(epoch, val)
        if self.cfg.adapter_path and (decision.is_best or val.get(self.cfg.select_metric) is None):
            self.save_adapter(self.cfg.adapter_path)
        return decision

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def episode_classifier(self, support_x: torch.Tensor, support_y: torch.Tensor) -> nn.Module:
        device = next(self.model.parameters()).device
        support_x, support_y = support_x.to(device), support_y.to(device).long()
        ways = int(support_y.max()) + 1
        with eval_mode(self.model):
            protos = prototypes(self.model(support_x).float(), support_y, ways)
        return ProtoClassifier(self.model, protos, self.model.scale_cls, self.model.bias)

    def eval_model(self) -> nn.Module:
        return self.model

    # --- adapters -----------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (LoRA factors, scale, bias) keyed by ``self.model`` parameter names."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()
                if p.requires_grad or n in ("scale_cls", "bias")}

    def save_adapter(self, path: str | Path, **meta: Any) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": ADAPTER_FORMAT, "method": self.name, "rank": self.cfg.rank,
                   "lora_layers": list(self.lora_layers), "residual": self.residual_fingerprint(), "meta": meta,
                   "tensors": self.adapter_state()}
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    def residual_fingerprint(self) -> list[float]:
        """Norms of the frozen residual weights W_res: adapters only make sense on the residual they were
        trained on (the same backbone, targets, rank and SVD init)."""
        from methods.lora_svd import lora_sites, site_keys

        enc = self.model.backbone.encoder
        return [float(enc.get_parameter(site_keys(n, m)["W"]).detach().float().norm())
                for n, m in lora_sites(enc).items()]

    def check_residual(self, payload: dict, path) -> None:
        saved = payload.get("residual")
        if saved is None:
            return
        mine = self.residual_fingerprint()
        if len(saved) != len(mine) or any(abs(a - b) > 1e-3 * max(1.0, abs(b)) for a, b in zip(saved, mine)):
            raise ValueError(f"{path} was trained on another backbone residual (different weights, targets "
                             f"or rank); its LoRA does not apply to this model")

    def load_adapter(self, path: str | Path) -> dict[str, Any]:
        """Load a saved adapter into ``self.model`` (returns the payload)."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"{path} is not an adapter file ({ADAPTER_FORMAT})")
        self.check_residual(payload, path)
        params = dict(self.model.named_parameters())
        missing = [n for n in params if params[n].requires_grad and n not in payload["tensors"]]
        if missing:
            raise ValueError(f"{path} does not fit this model: {len(missing)} missing tensors, e.g. {missing[:3]}")
        with torch.no_grad():
            for n, t in payload["tensors"].items():
                if n not in params:
                    raise ValueError(f"{path}: tensor {n} has no place in this model (different backbone/targets?)")
                params[n].copy_(t)
        return payload

    def summary(self) -> dict[str, Any]:
        return {"history": self.history, "lora_layers": len(self.lora_layers),
                "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}
