"""AMT (Adversarial Meta-Tuning, NeurIPS 2024): adversarial ProtoNet meta-tuning of an SVD-initialised LoRA
pool, with test-time merging of the pool per episode.

One trial trains one pool member at one attack strength (``member_eps``, in /255 units). A pool trial
(neither ``member_eps`` nor ``pool_dir``) declares its members as runs needed first
(``prerequisite_runs``, ``methods/amt_pool.py``); ``bench`` trains them as ordinary trials, then
``assemble`` writes the pool manifest and the trial, now with ``pool_dir`` set, merges the members per
test episode (``methods/merge.py``).

Training step (Algorithm 1, the authors' code's order):
1. adversarial queries: the pyramid patch attack maximising KL(p_clean || p_adv) in eval mode, only the
   queries attacked, prototypes from the clean support;
2. support features at the current weights w (kept for the loss), then the weight perturbation on the LoRA
   factors (AWP-style, "on singular values and vectors"): the gradient of the query-path loss at w with the
   prototypes detached (the authors' ``calc_awp(supp_f.detach(), ...)``) gives, per LoRA tensor,
   ``delta = eta1 * ||w|| * g / ||g||`` (their proxy SGD step rescaled to ||w||/||d||);
3. loss CE(f(x_q), y) + lambda_adv * KL(p_clean || p_adv), the queries at w + delta (parameter overrides,
   the weights themselves never move), the support at w; ``engine.backward``, ``engine.step``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from methods.attacks import eval_mode
from methods.amt_pool import member_runs, pool_eps_list, write_manifest  # noqa: F401 (pool_eps_list: API)
from methods.base import TrainContext, setting
from methods.episode_rng import MERGE_AUGMENT, MERGE_TRIM, EpisodeKey, EpisodeRandomness
from methods.merge import TRIM_SVDS, diff_augment, merge_weights, merged_overrides, support_score
from methods.pmf import ProtoNetLoRA, ProtoNetLoRAConfig, episode_to, prototypes
from methods.registry import register_method

log = logging.getLogger(__name__)


# The paper's text and the released code's defaults disagree on the training budget; which one produced the
# published numbers is not recorded in the release (its configs/ folder is missing). Both are offered.
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"epochs": 30, "lr": 5e-4, "train_attack_steps": 2, "train_step_frac": 0.1},
    "code": {"epochs": 100, "lr": 5e-5, "train_attack_steps": 10, "train_step_frac": 0.0},  # step 2/255
}
PYRAMID_PROJECTIONS = ("reference", "projected")


@dataclass
class AMTConfig(ProtoNetLoRAConfig):
    TRAINS_ON_ATTACKS = True  # adversarial queries: pyramid_attack with 0 steps would leave them clean
    # recipe: "paper" (the paper's text: 30 epochs, lr 5e-4, 2 attack steps of eps/10) or "code" (the released
    # code's defaults: 100 epochs, lr 5e-5, 10 attack steps of 2/255); the four fields below left None take it.
    recipe: str = "paper"
    epochs: int | None = None
    lr: float | None = None
    train_attack_steps: int | None = None  # pyramid attack steps during meta-tuning
    train_step_frac: float | None = None  # attack step = frac * member eps; 0: the absolute train_step_size
    lambda_adv: float = 6.0  # weight of the KL term (TRADES-style beta)
    pyramid_grids: list[int] = field(default_factory=lambda: [4, 8, 0])  # grid sizes; 0 = full resolution
    pyramid_mults: list[float] = field(default_factory=lambda: [20.0, 10.0, 1.0])
    # reference: each grid clamped to +-eps, the sum of the scaled grids not projected (up to 31 eps, the
    # authors' code; the published numbers come from it); projected: the sum also projected onto the eps-ball
    pyramid_projection: str = "reference"
    awp_eta: float = 1e-4  # eta1: relative size of the LoRA weight perturbation; 0 switches it off
    # pool: one member per attack strength, eps in /255 units (0.01/255 ... 8/255). Role "pool": these fields
    # shape only the pool's assembly, merging and test evaluation, never one member's training, so members
    # whose configs differ only here are the same member (methods/amt_pool.py gives them one config).
    pool_size: int = setting(4, role="pool")
    pool_eps: list[float] = setting(role="pool", default_factory=lambda: [0.01, 0.1, 6.0, 8.0])
    member_eps: float | None = setting(None, role="pool",
                                       doc="set for one member's trial (/255 units); None with pool_dir None: "
                                           "train a pool")
    pool_dir: str | None = setting(None, role="pool",
                                   doc="a pool manifest (pool.json) or its folder: merge its members at test time")
    # test-time merging
    merge_top_k: int = setting(2, role="pool")
    merge_lambda: float = setting(0.5, role="pool", doc="intra/inter blend of the member score, in [0, 1]")
    merge_beta: float = setting(6.0, role="pool", doc="temperature of w = exp(beta (s - 1)), in [1, 12]")
    trim_rho: float = setting(1.0, role="pool", doc="fraction of the rank kept by singular-value trimming of "
                                                    "merged weights; 1 = off")
    trim_modules: str = setting(".*", role="pool", doc="regex over adapted layer names that trimming applies to")
    trim_svd: str = setting("exact", role="pool",
                            doc="trimming's SVD: exact (the best rank-q approximation) or lowrank (the authors' "
                                "randomised torch.svd_lowrank, niter 2, seeded per episode from merge_seed)")
    merge_aug_p: float = setting(0.9, role="pool", doc="DiffAugment probability for support scoring")
    merge_seed: int = setting(1234, role="pool", doc="seed of the merge's per-episode draws (augmentation, "
                                                     "lowrank trimming), mixed with each episode's key")
    # Inherited fields that only the merged pool's test evaluation reads (a member is trained and validated
    # without them): redeclared with the inherited default, role "pool".
    adapter_path: str | None = setting(ProtoNetLoRAConfig.adapter_path, role="pool")
    episodes: int = setting(ProtoNetLoRAConfig.episodes, role="pool")
    n_eval: int | None = setting(ProtoNetLoRAConfig.n_eval, role="pool")
    eval_pgd_steps: int = setting(ProtoNetLoRAConfig.eval_pgd_steps, role="pool")
    autoattack_version: str = setting(ProtoNetLoRAConfig.autoattack_version, role="pool")
    test_time_ft_steps: int = setting(ProtoNetLoRAConfig.test_time_ft_steps, role="pool")
    test_time_ft_lr: float = setting(ProtoNetLoRAConfig.test_time_ft_lr, role="pool")
    test_time_ft_aug_p: float = setting(ProtoNetLoRAConfig.test_time_ft_aug_p, role="pool")
    target_datasets: list[str] | None = setting(ProtoNetLoRAConfig.target_datasets, role="pool")
    fewshot_autoattack: str = setting(ProtoNetLoRAConfig.fewshot_autoattack, role="pool")

    def __post_init__(self) -> None:
        for name, value in RECIPES.get(self.recipe, RECIPES["paper"]).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}; valid: {', '.join(RECIPES)}")
        super().validate()
        if self.pyramid_projection not in PYRAMID_PROJECTIONS:
            raise ValueError(f"pyramid_projection={self.pyramid_projection!r}; valid: {', '.join(PYRAMID_PROJECTIONS)}")
        if self.train_step_frac < 0:
            raise ValueError(f"train_step_frac={self.train_step_frac} must be >= 0 (0: absolute train_step_size)")
        if self.pool_size <= 0 or self.pool_size > len(self.pool_eps):
            raise ValueError(f"pool_size={self.pool_size} must be in 1..len(pool_eps)={len(self.pool_eps)}")
        if len(self.pyramid_grids) != len(self.pyramid_mults):
            raise ValueError("pyramid_grids and pyramid_mults must have the same length")
        if not 0.0 <= self.merge_lambda <= 1.0:
            raise ValueError(f"merge_lambda={self.merge_lambda} must be in [0, 1]")
        if not 0.0 < self.trim_rho <= 1.0:
            raise ValueError(f"trim_rho={self.trim_rho} must be in (0, 1]")
        if self.trim_svd not in TRIM_SVDS:
            raise ValueError(f"trim_svd={self.trim_svd!r}; valid: {', '.join(TRIM_SVDS)}")
        if self.merge_top_k <= 0:
            raise ValueError(f"merge_top_k={self.merge_top_k} must be positive")
        for e in self.pool_eps + ([self.member_eps] if self.member_eps is not None else []):
            if not 0.0 <= e <= 255.0:
                raise ValueError(f"pool/member eps {e} must be in [0, 255] (/255 units, e.g. 8 for 8/255)")


def kl_clean_adv(adv_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv) summed over classes, mean over the queries: the authors'
    ``KLDivLoss(reduction="sum")(log_softmax(adv), softmax(clean)) / B``. The gradient flows through both."""
    log_p_adv = F.log_softmax(adv_logits.float(), 1)
    log_p_clean = F.log_softmax(clean_logits.float(), 1)
    return (log_p_clean.exp() * (log_p_clean - log_p_adv)).sum() / adv_logits.shape[0]


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
                   projection: str = "reference", generator: torch.Generator | None = None) -> torch.Tensor:
    """Pyramid patch attack maximising KL(p_clean || p_adv) (untargeted; only the gradient of the deltas).

    One delta per grid (g x g patches, 0 = full resolution), upsampled (nearest) and multiplied by its
    multiplier; every grid is clamped to [-eps, eps] after each sign step. ``projection="reference"`` (the
    authors' code) adds the sum of the scaled grids as it is, so a pixel can move by up to sum(mults) * eps
    (31 eps with 20, 10, 1) before the [0, 1] clamp: a wider threat model than the nominal eps.
    ``"projected"`` also projects the sum onto the eps-ball. Pixel-space eps here equals the authors'
    eps/std on normalised inputs. Deltas start small and random (the KL gradient is zero at x_adv = x, and
    the authors' default init "random" is not one their code accepts). The caller picks the mode and
    freezes parameters. Returns a detached tensor.
    """
    if projection not in PYRAMID_PROJECTIONS:
        raise ValueError(f"projection={projection!r}; valid: {', '.join(PYRAMID_PROJECTIONS)}")
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
        if projection == "projected":
            total = total.clamp(-eps, eps)
        return (x + total).clamp(0.0, 1.0)

    for _ in range(steps):
        for d in deltas:
            d.requires_grad_(True)
        loss = kl_clean_adv(logits_fn(compose(deltas)), clean_logits)
        grads = torch.autograd.grad(loss, deltas)
        with torch.no_grad():
            deltas = [(d + step_size * g.sign()).clamp(-eps, eps) for d, g in zip(deltas, grads)]
    with torch.no_grad():
        return compose(deltas).detach()


def lora_factors(module: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA factors by name (what the weight perturbation moves; the authors' ``'lora' in name``
    tensors of two or more dimensions)."""
    return [(n, p) for n, p in module.named_parameters()
            if p.requires_grad and ("lora_A" in n or "lora_B" in n) and p.dim() > 1]


def perturbation_fidelity(params: dict[str, torch.Tensor], delta: dict[str, torch.Tensor],
                          dtype: torch.dtype) -> float:
    """Cosine between the perturbation realised in ``dtype``, round(w + delta) - round(w), and delta itself,
    over all tensors: 1 in fp32; near 0 when delta is below the precision's resolution and what is left is
    rounding noise (bf16 resolves ~3.9e-3 relative, eta1 = 1e-4 is far below it)."""
    dot = n_real = n_delta = 0.0
    for n, d in delta.items():
        w = params[n].detach().float()
        real = (w + d).to(dtype).float() - w.to(dtype).float()
        dot += float((real * d).sum())
        n_real += float(real.pow(2).sum())
        n_delta += float(d.pow(2).sum())
    return dot / math.sqrt(n_real * n_delta) if n_real > 0 and n_delta > 0 else float(n_delta == 0)


@register_method("amt")
class AMT(ProtoNetLoRA):
    """Adversarial meta-tuning of one LoRA pool member; with ``pool_dir``, test-time merging of the pool."""

    Config = AMTConfig
    episodic = True

    @classmethod
    def prerequisite_runs(cls, cfg: AMTConfig) -> list[dict[str, Any]]:
        """A pool trial's members, one per eps of ``pool_eps_list`` (none for a member or a trained pool)."""
        return member_runs(cfg)

    @classmethod
    def assemble(cls, cfg: AMTConfig, finished: list[tuple[dict, Path]], out_dir: Path) -> dict[str, Any]:
        """The pool manifest over the trained members, in the trial's folder: the trial merges that pool."""
        return {"pool_dir": str(write_manifest(cfg, finished, out_dir).parent)}

    def __init__(self, cfg: AMTConfig, backbone: nn.Module, num_classes: int):
        super().__init__(cfg, backbone, num_classes)
        self.train_eps = (cfg.member_eps / 255.0) if cfg.member_eps is not None else cfg.eps
        self.members: list[dict[str, Any]] = []  # loaded pool members (test-time merging)
        self.last_merge: list[float] | None = None
        self._merge_sum: list[float] | None = None  # running sum of merge weights over episodes (summary)
        self._merge_n = 0
        self._warned_zero3 = False
        self._warned_bf16 = False
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self._merge_rng = EpisodeRandomness(cfg.merge_seed)  # the merge's draws, per episode
        if cfg.pool_dir:
            self.load_pool(cfg.pool_dir)

    # --- training -----------------------------------------------------------------------------------
    def start_epoch(self, ctx):
        # the attack's noise is a function of (seed, epoch): a trial resumed at this epoch replays it
        self._gen.manual_seed(self.cfg.seed * 100_003 + ctx.epoch)
        return super().start_epoch(ctx)

    def attack_step_size(self) -> float:
        """eps/10 as the paper (``train_step_frac`` of the member eps), or the absolute ``train_step_size``
        (the released code's 2/255) when the fraction is 0."""
        frac = self.cfg.train_step_frac
        return frac * self.train_eps if frac else self.cfg.train_step_size

    def adversarial_queries(self, module, sx, sy, qx, ways) -> torch.Tensor:
        cfg = self.cfg
        with eval_mode(module), _no_param_grad(module):
            with torch.no_grad():
                protos = prototypes(module(sx).float(), sy, ways)
                clean = module.logits(module(qx), protos)
            return pyramid_attack(lambda z: module.logits(module(z), protos), qx, clean, eps=self.train_eps,
                                  steps=cfg.train_attack_steps, step_size=self.attack_step_size(),
                                  grids=cfg.pyramid_grids, mults=cfg.pyramid_mults,
                                  projection=cfg.pyramid_projection, generator=self._gen)

    def query_loss(self, fq, fa, protos, qy, module):
        """CE(f(x_q), y) + lambda_adv * KL(p_clean || p_adv) against ``protos``; (loss, ce, kl, clean logits)."""
        logits, logits_adv = module.logits(fq, protos), module.logits(fa, protos)
        ce = F.cross_entropy(logits, qy)
        kl = kl_clean_adv(logits_adv, logits)
        return ce + self.cfg.lambda_adv * kl, ce, kl, logits

    def weight_perturbation(self, module, xq, protos, qy) -> dict[str, torch.Tensor]:
        """AWP on the LoRA factors, per tensor ``eta1 * ||w|| * g / ||g||`` (fp32) with g the gradient of the
        query-path loss at the current weights and ``protos`` fixed (detached): the authors'
        ``calc_awp(supp_f.detach(), ...)``. ``xq`` is the clean queries then the adversarial ones."""
        named = lora_factors(module)
        feats = module(xq)
        n_q = len(qy)
        loss = self.query_loss(feats[:n_q], feats[n_q:], protos.detach(), qy, module)[0]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        delta = {}
        for (n, p), g in zip(named, grads):
            if g is None:
                continue
            g = g.detach().float()
            gn = g.norm()
            if gn > 0:
                delta[n] = (self.cfg.awp_eta * p.detach().float().norm() / gn) * g
        return delta

    def compute_dtype(self, engine) -> torch.dtype:
        if getattr(engine, "bfloat16_enabled", lambda: False)() or self.cfg.bf16 or self.cfg.bf16_autocast:
            return torch.bfloat16
        return torch.float32

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
        xq = torch.cat([qx, x_adv])
        logs: dict[str, float] = {}
        awp = cfg.awp_eta > 0
        if awp and getattr(engine, "zero_optimization_stage", lambda: 0)() >= 3:
            awp = False
            if not self._warned_zero3:
                log.warning("AMT: weight perturbation is off under ZeRO-3 (parameters are partitioned)")
                self._warned_zero3 = True
        if awp:
            # The authors' order: support features at w (kept, with their graph, for the loss), the proxy
            # gradient on the query path with those prototypes detached, then the queries at w + delta.
            fs = engine(sx)
            delta = self.weight_perturbation(module, xq, prototypes(fs.detach().float(), sy, ways), qy)
            params = dict(lora_factors(module))
            dtype = self.compute_dtype(engine)
            if dtype != torch.float32:
                logs["awp_cos"] = perturbation_fidelity(params, delta, dtype)
                if not self._warned_bf16:
                    log.warning("AMT: under bf16 the weight perturbation (awp_eta=%g) is mostly rounded away: "
                                "the realised one has cosine %.2f with the intended one (bf16 resolves ~3.9e-3 "
                                "relative); train in fp32 for the paper's eta1", cfg.awp_eta, logs["awp_cos"])
                    self._warned_bf16 = True
            # w + delta as parameter overrides: the gradient reaches w, and nothing has to be taken back off
            # after the step (DeepSpeed's bf16/ZeRO master copies never see it).
            overrides = {n: params[n] + d.to(params[n].dtype) for n, d in delta.items()}
            fqa = torch.func.functional_call(module, overrides, (xq,), strict=False)
        else:
            feats = engine(torch.cat([sx, xq]))
            fs, fqa = feats[:len(sx)], feats[len(sx):]
        protos = prototypes(fs.float(), sy, ways)
        loss, ce, kl, logits = self.query_loss(fqa[:len(qx)], fqa[len(qx):], protos, qy, module)
        engine.backward(loss)
        engine.step()
        return {"train_loss": loss.item(), "train_ce": ce.item(), "train_kl": kl.item(),
                "train_acc": (logits.argmax(1) == qy).float().mean().item(), "lr": self.current_lr(), **logs}

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
            # "adapter" as the manifest records it (relative to its folder): this node's path of a pool
            # restored from Tune's storage would reach result.json's method_summary
            self.members.append({"eps": member.get("eps"), "adapter": member["adapter"], "tensors": tensors})
        return self.members

    def _member_states(self, device) -> list[dict[str, torch.Tensor]]:
        return [{k: v.to(device) for k, v in m["tensors"].items()} for m in self.members]

    @torch.no_grad()
    def episode_classifier(self, support_x: torch.Tensor, support_y: torch.Tensor, *,
                           episode: EpisodeKey | None = None) -> nn.Module:
        """The merged pool's classifier for one episode. Its random draws (the scoring's augmentation, the
        lowrank trimming, AMT-FT's fine-tuning) are the episode's own, from (``merge_seed`` or ``seed``, the
        episode's key): a rerun of the episode repeats them; None: a generator that advances from call to
        call, as the authors' global one (``methods/episode_rng.py``)."""
        if not self.members:
            return super().episode_classifier(support_x, support_y, episode=episode)
        cfg = self.cfg
        device = next(self.model.parameters()).device
        support_x, support_y = support_x.to(device), support_y.to(device).long()
        ways = int(support_y.max()) + 1
        root, prefix = self.model.backbone.encoder, "backbone.encoder."
        states = self._member_states(device)
        with eval_mode(self.model):
            if len(states) == 1:
                weights = torch.ones(1)
            else:
                # one augmentation draw per episode, shared by every member
                gen = self._merge_rng.generator(episode, MERGE_AUGMENT)
                backbone = self.model.backbone
                aug = diff_augment(support_x, gen, cfg.merge_aug_p, mean=getattr(backbone, "mean", None),
                                   std=getattr(backbone, "std", None))
                scores = []
                for state in states:
                    ov = merged_overrides(root, [state], [1.0], prefix=prefix)
                    f_clean = torch.func.functional_call(self.model, ov, (support_x,), strict=False).float()
                    f_aug = torch.func.functional_call(self.model, ov, (aug,), strict=False).float()
                    scores.append(support_score(f_clean, f_aug, support_y, ways, cfg.merge_lambda))
                weights = merge_weights(torch.tensor(scores), cfg.merge_beta, cfg.merge_top_k)
            lowrank = cfg.trim_svd == "lowrank" and cfg.trim_rho < 1.0
            ov = merged_overrides(root, states, weights.tolist(), prefix=prefix, rho=cfg.trim_rho,
                                  trim_pattern=cfg.trim_modules, svd=cfg.trim_svd,
                                  svd_seed=self._merge_rng.seed_for(episode, MERGE_TRIM) if lowrank else None)
        self.last_merge = weights.tolist()
        self._merge_sum = [a + b for a, b in zip(self._merge_sum or [0.0] * len(weights), self.last_merge)]
        self._merge_n += 1
        scale = sum(float(w) * s["scale_cls"] for w, s in zip(weights, states))
        bias = sum(float(w) * s.get("bias", torch.zeros(1)).to(device) for w, s in zip(weights, states))
        return self.build_classifier(support_x, support_y, ways, scale, bias, overrides=ov,  # AMT-FT: test_time_ft_steps
                                     episode=episode)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        if self.members:
            out["pool"] = [{"eps": m["eps"], "adapter": m["adapter"]} for m in self.members]
            out["merge"] = {"top_k": self.cfg.merge_top_k, "lambda": self.cfg.merge_lambda,
                            "beta": self.cfg.merge_beta, "trim_rho": self.cfg.trim_rho,
                            "trim_svd": self.cfg.trim_svd}
            if self._merge_n:  # mean weight of each member over the episodes merged so far
                out["merge"]["mean_weights"] = [w / self._merge_n for w in self._merge_sum]
        else:
            out["train_eps"] = self.train_eps
        return out
