"""Cosine-ProtoNet meta-training: PMF (``pmf``) and its LoRA-only form (``protonet_lora``), plus PMF's test-time
fine-tuning on the augmented support, shared by every episodic method built on this module.

- ``pmf`` (Hu et al., CVPR 2022, hushell/pmf_cvpr22): meta-trains the WHOLE backbone plus the classifier's
  scale and bias with ProtoNet episodes, and is reported with test-time fine-tuning ("finetune" deploy).
- ``protonet_lora``: the same episodes on an SVD-initialised LoRA of a frozen backbone (only LoRA factors and
  the scale train): AMT's pipeline without the adversarial queries, the weight perturbation and the pool,
  i.e. AMT's clean ablation. ``methods/amt.py`` builds on it.

ProtoNet head: prototypes are the mean clean support features; logits = scale * (cos(f(x), c_k) + bias),
scale learnable, initialised 10; bias learnable with ``learn_bias`` (PMF), else fixed at 0 (AMT).

Test-time fine-tuning (``test_time_ft_steps`` > 0; PMF's ``ProtoNet_Finetune``): per episode, a copy of the
backbone's weights is trained with Adam (betas 0.9/0.999, no weight decay) for ``test_time_ft_steps`` steps on
the cross-entropy of DiffAugment'ed support images against prototypes of the clean support recomputed with the
current weights; scale and bias stay. The copy is a parameter dictionary for ``torch.func.functional_call``:
the trained model is never edited, so nothing carries over from one episode to the next. The augmentation
draws are the episode's own, from (``seed``, the episode's key) (``methods/episode_rng.py``): episodes get
different draws (PMF's global generator advances across episodes too), and a rerun of an episode repeats them.
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
from methods.episode_rng import FINETUNE, EpisodeKey, EpisodeRandomness
from methods.lora_svd import apply_svd_lora
from methods.merge import diff_augment
from methods.registry import register_method

ADAPTER_FORMAT = "amt-lora-v1"


@dataclass
class ProtoNetConfig(EpisodicConfig):
    """What every cosine-ProtoNet method shares: schedule, head, test-time fine-tuning."""

    TRAINS_ON_ATTACKS = False  # clean episodes (AMT, which attacks its queries, says True)

    # paper settings (AMT, NeurIPS 2024)
    epochs: int = 30
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: int = 5  # linear warm-up, then cosine to min_lr (per step)
    min_lr: float = 0.0
    scale_init: float = 10.0
    learn_bias: bool = False
    freeze_norm: bool = True  # the frozen backbone's BatchNorm keeps its running statistics during meta-tuning
    select_metric: str = "val_fewshot_acc"
    # the authors' code (AMT's and PMF's utils/args.py): 2000 training episodes per epoch, 120 validation
    # episodes per source, training episodes augmented (RandomResizedCrop(128), ColorJitter(0.4), flip; test
    # Resize(146)+CenterCrop(128))
    episodes_per_epoch: int = 2000
    val_episodes: int = 120
    transform: str = "amt128"
    # test-time fine-tuning on the episode's augmented support (PMF's "finetune" deploy, AMT-FT); 0 steps = off
    test_time_ft_steps: int = 0
    test_time_ft_lr: float = 1e-4
    test_time_ft_aug_p: float = 0.9  # DiffAugment (colour + translation) probability per step

    def validate(self) -> None:
        super().validate()
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be >= 0")
        if self.test_time_ft_steps < 0 or self.test_time_ft_lr < 0:
            raise ValueError(f"test_time_ft_steps={self.test_time_ft_steps} and test_time_ft_lr="
                             f"{self.test_time_ft_lr} must be >= 0")
        if not 0.0 <= self.test_time_ft_aug_p <= 1.0:
            raise ValueError(f"test_time_ft_aug_p={self.test_time_ft_aug_p} must be in [0, 1]")


@dataclass
class ProtoNetLoRAConfig(ProtoNetConfig):
    rank: int = 8
    lora_alpha: float | None = None  # None: alpha = rank (scale 1), as the reference
    target_modules: str = "auto"  # regex over encoder module names; auto: ViT qkv/proj/fc1/fc2, else layer* convs
    qkv_mode: str = "merged"  # merged: one rank-r LoRA per q, k, v block (reference); fused: one across qkv (PEFT)
    adapter_path: str | None = None  # where the selected epoch's LoRA is saved (pool members set it)

    def validate(self) -> None:
        super().validate()
        if self.rank <= 0:
            raise ValueError(f"rank={self.rank} must be positive")
        if self.qkv_mode not in ("merged", "fused"):
            raise ValueError(f"qkv_mode={self.qkv_mode!r}; valid: merged, fused")


@dataclass
class PMFConfig(ProtoNetConfig):
    """PMF's Meta-Dataset ImageNet-only recipe (README and utils/args.py of hushell/pmf_cvpr22): SGD momentum
    0.9, no weight decay, lr 5e-4, 100 epochs, 5 warm-up epochs, cosine to 1e-6; the whole backbone, the
    scale and the bias train; deployed with 100 fine-tuning steps at lr 1e-4 (its Meta-Dataset command)."""

    epochs: int = 100
    min_lr: float = 1e-6
    learn_bias: bool = True
    freeze_norm: bool = False  # the whole backbone trains, normalisation statistics included
    test_time_ft_steps: int = 100
    test_time_ft_lr: float = 1e-4


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
        # Episodes are classified against prototypes of features: the backbone's linear head is never used, so
        # it is frozen rather than left in the optimizer and counted as trained.
        if isinstance(getattr(backbone, "head", None), nn.Module):
            freeze(backbone.head)
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


def finetune_on_support(model: ProtoNet, support_x: torch.Tensor, support_y: torch.Tensor, ways: int, *,
                        steps: int, lr: float, aug_p: float, scale: torch.Tensor, bias: torch.Tensor,
                        overrides: dict[str, torch.Tensor] | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """PMF's test-time fine-tuning: a copy of every backbone weight (``overrides`` first, e.g. a merged
    pool's) trained for ``steps`` Adam steps on the augmented support; returns the copy as overrides for
    ``functional_call``. ``model`` itself is not modified."""
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update(overrides or {})
    trained = {n: t.detach().clone().requires_grad_(True) for n, t in state.items()
               if n.startswith("backbone.") and t.is_floating_point()}
    opt = torch.optim.Adam(list(trained.values()), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    n = len(support_x)
    scale, bias = scale.detach().float(), bias.detach().float()
    with eval_mode(model), torch.enable_grad():
        for _ in range(steps):
            aug = diff_augment(support_x, generator, aug_p, mean=getattr(model.backbone, "mean", None),
                               std=getattr(model.backbone, "std", None))  # on normalised inputs, as PMF
            feats = torch.func.functional_call(model, {**state, **trained}, (torch.cat([support_x, aug]),),
                                               strict=False).float()
            # prototypes from the clean support under the current weights, gradient through them (as PMF)
            logits = cosine_logits(feats[n:], prototypes(feats[:n], support_y, ways), scale, bias)
            loss = F.cross_entropy(logits, support_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {**state, **{k: v.detach() for k, v in trained.items()}}


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


class ProtoNetMethod(Method):
    """Episodic cosine-ProtoNet training (clean episodes) and evaluation; subclasses say what trains."""

    Config = ProtoNetConfig
    episodic = True

    def __init__(self, cfg: ProtoNetConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        self.model = ProtoNet(backbone, cfg.scale_init, cfg.learn_bias, cfg.freeze_norm)
        self._steps_per_epoch = cfg.episodes_per_epoch
        self._ft_rng = EpisodeRandomness(cfg.seed)  # test-time fine-tuning's draws, per episode

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

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def episode_classifier(self, support_x: torch.Tensor, support_y: torch.Tensor, *,
                           episode: EpisodeKey | None = None) -> nn.Module:
        device = next(self.model.parameters()).device
        support_x, support_y = support_x.to(device), support_y.to(device).long()
        ways = int(support_y.max()) + 1
        return self.build_classifier(support_x, support_y, ways, self.model.scale_cls, self.model.bias,
                                     episode=episode)

    def build_classifier(self, support_x: torch.Tensor, support_y: torch.Tensor, ways: int, scale, bias,
                         overrides: dict[str, torch.Tensor] | None = None, *,
                         episode: EpisodeKey | None = None) -> ProtoClassifier:
        """The episode's classifier over ``overrides`` (None: the model's weights), fine-tuned on the
        augmented support first when ``test_time_ft_steps`` > 0, with the draws of ``episode`` (its key;
        None: the next draws of a generator that advances from call to call, ``methods/episode_rng.py``)."""
        cfg = self.cfg
        if cfg.test_time_ft_steps > 0 and cfg.test_time_ft_lr > 0:
            gen = self._ft_rng.generator(episode, FINETUNE)
            overrides = finetune_on_support(self.model, support_x, support_y, ways, steps=cfg.test_time_ft_steps,
                                            lr=cfg.test_time_ft_lr, aug_p=cfg.test_time_ft_aug_p,
                                            scale=torch.as_tensor(scale), bias=torch.as_tensor(bias),
                                            overrides=overrides, generator=gen)
        with torch.no_grad(), eval_mode(self.model):
            if overrides is None:
                feats = self.model(support_x)
            else:
                feats = torch.func.functional_call(self.model, overrides, (support_x,), strict=False)
        return ProtoClassifier(self.model, prototypes(feats.float(), support_y, ways), scale, bias,
                               overrides=overrides)

    def eval_model(self) -> nn.Module:
        return self.model

    def summary(self) -> dict[str, Any]:
        return {"history": self.history,
                "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad)}


@register_method("pmf")
class PMF(ProtoNetMethod):
    """PMF: ProtoNet meta-training of the whole backbone with the head's scale and bias; deployed with
    test-time fine-tuning on each episode's augmented support."""

    Config = PMFConfig


@register_method("protonet_lora")
class ProtoNetLoRA(ProtoNetMethod):
    """ProtoNet meta-tuning of an SVD-initialised LoRA on a frozen backbone (clean episodes): AMT's clean
    ablation, and the base AMT builds on."""

    Config = ProtoNetLoRAConfig

    def __init__(self, cfg: ProtoNetLoRAConfig, backbone: nn.Module, num_classes: int):
        freeze(backbone)
        self.lora_layers = apply_svd_lora(backbone.encoder, r=cfg.rank, alpha=cfg.lora_alpha,
                                          target_modules=cfg.target_modules, qkv_mode=cfg.qkv_mode)
        super().__init__(cfg, backbone, num_classes)

    def end_epoch(self, epoch: int, val: dict[str, float]):
        decision = super().end_epoch(epoch, val)
        if self.cfg.adapter_path and (decision.is_best or val.get(self.cfg.select_metric) is None):
            self.save_adapter(self.cfg.adapter_path)
        return decision

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
        return {**super().summary(), "lora_layers": len(self.lora_layers)}
