"""AMT (Adversarial Meta-Tuning, NeurIPS 2024): adversarial ProtoNet meta-tuning of an SVD-initialised LoRA
pool, with test-time merging of the pool per episode.

One trial trains one pool member at one attack strength (``member_eps``, in /255 units); ``bench``'s
pool runner (``bench/amt_pool.py``) trains ``pool_size`` members as separate trials and writes a pool
manifest; a trial with ``pool_dir`` set merges the members per test episode (``methods/merge.py``).

Training step (Algorithm 1, the reference code's order):
1. adversarial queries: the pyramid patch attack maximising KL(p(x_adv) || p(x)) in eval mode, only the
   queries attacked, prototypes from the clean support;
2. weight perturbation on the LoRA factors (AWP-style, "on singular values and vectors"): the gradient of
   the loss at the current point gives, per LoRA tensor, ``delta = eta1 * ||w|| * g / ||g||`` (the reference's
   proxy SGD step rescaled to ||w||/||d||); ``w += delta`` in place under no_grad, before any forward that
   autograd keeps;
3. loss CE(f(x_q), y) + lambda_adv * KL(p(x_adv) || p(x_q)) at the perturbed point; ``engine.backward``,
   ``engine.step``; the perturbation is removed after the step.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from methods.attacks import eval_mode
from methods.base import TrainContext
from methods.merge import diff_augment, merge_weights, merged_overrides, support_score
from methods.pmf import ProtoNetLoRA, ProtoNetLoRAConfig, episode_to, prototypes
from methods.registry import register_method

log = logging.getLogger(__name__)


@dataclass
class AMTConfig(ProtoNetLoRAConfig):
    lambda_adv: float = 6.0  # weight of the KL term (TRADES-style beta)
    train_attack_steps: int = 2  # pyramid attack steps during meta-tuning (paper: 2)
    train_step_frac: float = 0.1  # attack step = frac * member eps (paper: eps/10)
    pyramid_grids: list[int] = field(default_factory=lambda: [4, 8, 0])  # grid sizes; 0 = full resolution
    pyramid_mults: list[float] = field(default_factory=lambda: [20.0, 10.0, 1.0])
    awp_eta: float = 1e-4  # eta1: relative size of the LoRA weight perturbation; 0 switches it off
    # pool: one member per attack strength, eps in /255 units (0.01/255 ... 8/255)
    pool_size: int = 4
    pool_eps: list[float] = field(default_factory=lambda: [0.01, 0.1, 6.0, 8.0])
    member_eps: float | None = None  # set for one member's trial (/255 units); None with pool_dir None: train a pool
    pool_dir: str | None = None  # a pool manifest (pool.json) or its folder: merge its members at test time
    # test-time merging
    merge_top_k: int = 2
    merge_lambda: float = 0.5  # intra/inter blend of the member score, in [0, 1]
    merge_beta: float = 6.0  # temperature of w = exp(beta (s - 1)), in [1, 12]
    trim_rho: float = 1.0  # fraction of the rank kept by singular-value trimming of merged weights; 1 = off
    trim_modules: str = ".*"  # regex over adapted layer names that trimming applies to
    merge_aug_p: float = 0.9  # DiffAugment probability for support scoring
    merge_seed: int = 1234

    def validate(self) -> None:
        super().validate()
        if self.pool_size <= 0 or self.pool_size > len(self.pool_eps):
            raise ValueError(f"pool_size={self.pool_size} must be in 1..len(pool_eps)={len(self.pool_eps)}")
        if len(self.pyramid_grids) != len(self.pyramid_mults):
            raise ValueError("pyramid_grids and pyramid_mults must have the same length")
        if not 0.0 <= self.merge_lambda <= 1.0:
            raise ValueError(f"merge_lambda={self.merge_lambda} must be in [0, 1]")
        if not 0.0 < self.trim_rho <= 1.0:
            raise ValueError(f"trim_rho={self.trim_rho} must be in (0, 1]")
        if self.merge_top_k <= 0:
            raise ValueError(f"merge_top_k={self.merge_top_k} must be positive")
        for e in self.pool_eps + ([self.member_eps] if self.member_eps is not None else []):
            if not 0.0 <= e <= 255.0:
                raise ValueError(f"pool/member eps {e} must be in [0, 255] (/255 units, e.g. 8 for 8/255)")


# Fields that shape only the pool's assembly, merging and test evaluation, never one member's training:
# members whose configs differ only here are the same member (bench/amt_pool.py caches them by the rest).
POOL_ONLY_FIELDS = ("pool_size", "pool_eps", "member_eps", "pool_dir", "adapter_path", "merge_top_k",
                    "merge_lambda", "merge_beta", "trim_rho", "trim_modules", "merge_aug_p", "merge_seed",
                    "episodes", "n_eval", "eval_pgd_steps", "autoattack_version", "test_time_ft_steps",
                    "test_time_ft_lr", "test_time_ft_aug_p", "target_datasets")


def pool_eps_list(cfg: AMTConfig) -> list[float]:
    """The members' eps (/255 units): all of ``pool_eps`` when it has ``pool_size`` entries, else
    ``pool_size`` entries spread evenly over it (pool_size 2 of [0.01, 0.1, 6, 8] -> [0.01, 8])."""
    eps = list(cfg.pool_eps)
    if cfg.pool_size >= len(eps):
        return eps
    if cfg.pool_size == 1:
        return [eps[-1]]
    idx = [round(i * (len(eps) - 1) / (cfg.pool_size - 1)) for i in range(cfg.pool_size)]
    return [eps[i] for i in idx]


def kl_div(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)), mean over the batch."""
    logp = F.log_softmax(p_logits.float(), 1)
    logq = F.log_softmax(q_logits.float(), 1)
    return (logp.exp() * (logp - logq)).sum(1).mean()


class _no_param_grad:
    def __init__(self, module: nn.Module):
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(True)
        return False


def pyramid_attack(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, clean_logits: torch.Tensor,
                   *, eps: float, steps: int, step_size: float, grids=(4, 8, 0), mults=(20.0, 10.0, 1.0),
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Pyramid patch attack maximising KL(p(x_adv) || p(x)) (untargeted; only the gradient of x_adv's deltas).

    One delta per grid (g x g patches, 0 = full resolution), upsampled (nearest) and multiplied by its
    multiplier; every grid is clamped to [-eps, eps] after each sign step, and (unlike the reference, whose sum
    of multiplied grids can reach (20+10+1) * eps) the summed perturbation is projected onto the eps-ball and
    [0, 1]. Deltas start small and random (a KL gradient is zero at x_adv = x). The caller picks the mode
    and freezes parameters. Returns a detached tensor.
    """
    x = x.detach()
    if steps <= 0 or eps <= 0:
        return x.clone()
    B, C, H, W = x.shape
    clean_logits = clean_logits.detach()
    deltas = []
    for g, m in zip(grids, mults):
        size = (H, W) if g == 0 else (min(g, H), min(g, W))
        d = (torch.rand(B, C, *size, generator=generator) * 2 - 1) * (0.1 * eps / m)
        deltas.append(d.to(x))

    def compose(ds):
        total = sum(m * (d if d.shape[-2:] == (H, W) else F.interpolate(d, size=(H, W), mode="nearest"))
                    for d, m in zip(ds, mults))
        return (x + total.clamp(-eps, eps)).clamp(0.0, 1.0)

    for _ in range(steps):
        for d in deltas:
            d.requires_grad_(True)
        loss = kl_div(logits_fn(compose(deltas)), clean_logits)
        grads = torch.autograd.grad(loss, deltas)
        with torch.no_grad():
            deltas = [(d + step_size * g.sign()).clamp(-eps, eps) for d, g in zip(deltas, grads)]
    with torch.no_grad():
        return compose(deltas).detach()


def _updates_module_in_place(engine) -> bool:
    """Whether ``engine.step`` updates the module's parameters in place (plain fp32, ZeRO 0). With ZeRO >= 1
    or bf16/fp16 the optimizer steps an fp32 master copy and copies it back, which drops the perturbation."""
    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    low = getattr(engine, "bfloat16_enabled", lambda: False)() or getattr(engine, "fp16_enabled", lambda: False)()
    return stage == 0 and not low


@register_method("amt")
class AMT(ProtoNetLoRA):
    """Adversarial meta-tuning of one LoRA pool member; with ``pool_dir``, test-time merging of the pool."""

    Config = AMTConfig
    episodic = True
    pool: ClassVar[bool] = True  # bench trains a pool (bench/amt_pool.py) unless member_eps or pool_dir is set

    def __init__(self, cfg: AMTConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        self.train_eps = (cfg.member_eps / 255.0) if cfg.member_eps is not None else cfg.eps
        self.members: list[dict[str, Any]] = []  # loaded pool members (test-time merging)
        self.last_merge: list[float] | None = None
        self._merge_sum: list[float] | None = None  # running sum of merge weights over episodes (summary)
        self._merge_n = 0
        self._warned_zero3 = False
        self._gen = torch.Generator().manual_seed(cfg.seed)
        if cfg.pool_dir:
            self.load_pool(cfg.pool_dir)

    # --- training -----------------------------------------------------------------------------------
    def start_epoch(self, ctx):
        # the attack's noise is a function of (seed, epoch): a trial resumed at this epoch replays it
        self._gen.manual_seed(self.cfg.seed * 100_003 + ctx.epoch)
        return super().start_epoch(ctx)

    def adversarial_queries(self, module, sx, sy, qx, ways) -> torch.Tensor:
        cfg = self.cfg
        with eval_mode(module), _no_param_grad(module):
            with torch.no_grad():
                protos = prototypes(module(sx).float(), sy, ways)
                clean = module.logits(module(qx), protos)
            return pyramid_attack(lambda z: module.logits(module(z), protos), qx, clean, eps=self.train_eps,
                                  steps=cfg.train_attack_steps, step_size=cfg.train_step_frac * self.train_eps,
                                  grids=cfg.pyramid_grids, mults=cfg.pyramid_mults, generator=self._gen)

    def adv_loss(self, feats, n_s, n_q, sy, qy, ways, module):
        fs, fq, fa = feats[:n_s], feats[n_s:n_s + n_q], feats[n_s + n_q:]
        protos = prototypes(fs.float(), sy, ways)
        logits, logits_adv = module.logits(fq, protos), module.logits(fa, protos)
        ce = F.cross_entropy(logits, qy)
        kl = kl_div(logits_adv, logits)
        return ce + self.cfg.lambda_adv * kl, ce, kl, logits

    def lora_params(self, module) -> list[torch.nn.Parameter]:
        return [p for n, p in module.named_parameters() if p.requires_grad and ("lora_A" in n or "lora_B" in n)]

    def weight_perturbation(self, module, x_all, n_s, n_q, sy, qy, ways) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """AWP on the LoRA factors: per tensor ``eta1 * ||w|| * g/||g||`` along the loss gradient, added in
        place (no graph holds the parameters at this point). Returns (param, delta) pairs to remove later."""
        params = self.lora_params(module)
        loss = self.adv_loss(module(x_all), n_s, n_q, sy, qy, ways, module)[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        applied = []
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                gn = g.norm()
                if gn > 0:
                    d = self.cfg.awp_eta * p.norm() * g / gn
                    p.add_(d)
                    applied.append((p, d))
        return applied

    @property
    def needs_training(self) -> bool:
        return not self.members  # a merging trial only evaluates its trained pool

    def train_step(self, engine, batch, ctx: TrainContext) -> dict[str, float]:
        cfg = self.cfg
        if self.members:  # a merging trial evaluates the trained pool; it has nothing of its own to train
            return {}
        self.set_lr(self.lr_at(ctx.epoch, ctx.step, ctx.steps_per_epoch))
        sx, sy, qx, qy = episode_to(batch, ctx.device)
        ways = int(sy.max()) + 1
        module = engine.module  # gradients outside engine.backward must not go through engine(x)
        x_adv = self.adversarial_queries(module, sx, sy, qx, ways)
        x_all = torch.cat([sx, qx, x_adv])
        perturbation = []
        if cfg.awp_eta > 0:
            if getattr(engine, "zero_optimization_stage", lambda: 0)() >= 3:
                if not self._warned_zero3:
                    log.warning("AMT: weight perturbation is off under ZeRO-3 (parameters are partitioned)")
                    self._warned_zero3 = True
            else:
                perturbation = self.weight_perturbation(module, x_all, len(sx), len(qx), sy, qy, ways)
        loss, ce, kl, logits = self.adv_loss(engine(x_all), len(sx), len(qx), sy, qy, ways, module)
        engine.backward(loss)
        engine.step()
        if perturbation and _updates_module_in_place(engine):
            with torch.no_grad():  # the step moved w + delta; take delta back off
                for p, d in perturbation:
                    p.sub_(d)
        return {"train_loss": loss.item(), "train_ce": ce.item(), "train_kl": kl.item(),
                "train_acc": (logits.argmax(1) == qy).float().mean().item(), "lr": self.current_lr()}

    def save_adapter(self, path, **meta):
        meta.setdefault("eps", self.cfg.member_eps)
        return super().save_adapter(path, **meta)

    # --- the pool -----------------------------------------------------------------------------------
    def load_pool(self, pool_json: str | Path) -> list[dict[str, Any]]:
        """Load the members of a pool manifest (``pool.json`` or its folder) for test-time merging."""
        path = Path(pool_json)
        if path.is_dir():
            path = path / "pool.json"
        manifest = json.loads(path.read_text())
        params = dict(self.model.named_parameters())
        self.members = []
        for member in manifest["members"]:
            adapter = Path(member["adapter"])
            if not adapter.is_absolute():
                adapter = path.parent / adapter
            payload = torch.load(adapter, map_location="cpu", weights_only=True)
            tensors = payload["tensors"]
            missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
            if missing:
                raise ValueError(f"pool member {adapter} does not fit this model: missing {missing[:3]}")
            self.check_residual(payload, adapter)
            self.members.append({"eps": member.get("eps"), "adapter": str(adapter), "tensors": tensors})
        return self.members

    def _member_states(self, device) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in m["tensors"].items()} for m in self.members]

    @torch.no_grad()
    def episode_classifier(self, support_x: torch.Tensor, support_y: torch.Tensor) -> nn.Module:
        if not self.members:
            return super().episode_classifier(support_x, support_y)
        cfg = self.cfg
        device = next(self.model.parameters()).device
        support_x, support_y = support_x.to(device), support_y.to(device).long()
        ways = int(support_y.max()) + 1
        root, prefix = self.model.backbone.encoder, "backbone.encoder."
        states = self._member_states(device)
        gen = torch.Generator().manual_seed(cfg.merge_seed)
        with eval_mode(self.model):
            if len(states) == 1:
                weights = torch.ones(1)
            else:
                scores = []
                for state in states:
                    ov = merged_overrides(root, [state], [1.0], prefix=prefix)
                    f_clean = torch.func.functional_call(self.model, ov, (support_x,), strict=False).float()
                    aug = diff_augment(support_x, gen, cfg.merge_aug_p)
                    f_aug = torch.func.functional_call(self.model, ov, (aug,), strict=False).float()
                    scores.append(support_score(f_clean, f_aug, support_y, ways, cfg.merge_lambda))
                weights = merge_weights(torch.tensor(scores), cfg.merge_beta, cfg.merge_top_k)
            ov = merged_overrides(root, states, weights.tolist(), prefix=prefix, rho=cfg.trim_rho,
                                  trim_pattern=cfg.trim_modules)
        self.last_merge = weights.tolist()
        self._merge_sum = [a + b for a, b in zip(self._merge_sum or [0.0] * len(weights), self.last_merge)]
        self._merge_n += 1
        scale = sum(float(w) * s["scale_cls"] for w, s in zip(weights, states))
        bias = sum(float(w) * s.get("bias", torch.zeros(1)).to(device) for w, s in zip(weights, states))
        return self.build_classifier(support_x, support_y, ways, scale, bias, overrides=ov)  # AMT-FT: test_time_ft_steps

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.members:
            out["pool"] = [{"eps": m["eps"], "adapter": m["adapter"]} for m in self.members]
            out["merge"] = {"top_k": self.cfg.merge_top_k, "lambda": self.cfg.merge_lambda,
                            "beta": self.cfg.merge_beta, "trim_rho": self.cfg.trim_rho}
            if self._merge_n:  # mean weight of each member over the episodes merged so far
                out["merge"]["mean_weights"] = [w / self._merge_n for w in self._merge_sum]
        else:
            out["train_eps"] = self.train_eps
        return out
