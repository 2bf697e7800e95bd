"""AMT, PMF and the LoRA ProtoNet: SVD-initialised LoRA, test-time merging, the pyramid attack, meta-tuning,
test-time fine-tuning, few-shot evaluation, the pool, and ``bench run --method amt/pmf`` end to end on the
embedded default."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bench.backbones import create_backbone
from bench.config import resolve_config
from bench.fewshot import evaluate_fewshot, mean_ci95
from methods import get_method
from methods.amt import AMT, AMTConfig, kl_clean_adv, pool_eps_list, pyramid_attack
from methods.attacks import eval_mode
from methods.base import Episode, TrainContext
from methods.episode_rng import FINETUNE, MERGE_AUGMENT, MERGE_TRIM, EpisodeRandomness, episode_seed
from methods.lora_svd import apply_svd_lora, lora_sites, site_keys, site_weight
from methods.merge import merge_weights, merged_overrides, trim_rank
from methods.pmf import PMF, ProtoNetLoRA, prototypes

from bench.engine import PlainEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]




def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=0).eval()


def tiny_cnn():
    torch.manual_seed(0)
    return create_backbone("tiny_cnn", 5).eval()


def episode(seed=0, ways=3, shots=2, queries=3, size=32):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(ways * shots, 3, size, size, generator=g)
    qx = torch.rand(ways * queries, 3, size, size, generator=g)
    return Episode(sx, torch.arange(ways).repeat_interleave(shots), qx, torch.arange(ways).repeat_interleave(queries))


def make_method(name="amt", **over):
    lora = {"rank": 4} if name != "pmf" else {}  # pmf trains the whole backbone: no LoRA fields
    cfg = resolve_config(name, {**lora, "epochs": 1, "episodes_per_epoch": 4, "warmup_epochs": 0, **over})
    torch.manual_seed(0)
    return get_method(name)(cfg, create_backbone("tiny_cnn", 5), 5)


# --- SVD / PiSSA init -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, qkv_mode, expected_type", [
    ("vit", "merged", "MergedQKVLoRA"),  # the reference's form: one rank-r LoRA per q, k, v block
    ("vit", "fused", "Linear"),  # PEFT's PiSSA across the fused qkv
    ("cnn", "merged", "Conv2d"),  # our SVD init over (out, in*k*k)
])
def test_svd_init_reproduces_weights_and_outputs(kind, qkv_mode, expected_type):
    net = tiny_vit() if kind == "vit" else tiny_cnn().encoder
    original = copy.deepcopy(net)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        y0 = original(x)
    names = apply_svd_lora(net, r=4, qkv_mode=qkv_mode)
    sites = lora_sites(net)
    assert set(sites) == set(names) and names
    for n, m in sites.items():
        torch.testing.assert_close(site_weight(m), original.get_submodule(n).weight, atol=1e-5, rtol=0)
    first = sites[names[0]]
    assert type(first).__name__ == expected_type
    if expected_type == "MergedQKVLoRA":
        assert first.lora_A.shape == (3, 4, 192) and first.lora_B.shape == (3, 192, 4)
    with torch.no_grad():
        torch.testing.assert_close(net(x), y0, atol=1e-4, rtol=1e-4)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_svd_factors_are_top_singular_directions():
    net = tiny_cnn().encoder
    W = net.layer1[0].conv1.weight.detach().clone()
    apply_svd_lora(net, r=4)
    m = lora_sites(net)["layer1.0.conv1"]
    delta = site_weight(m) - m.get_base_layer().weight
    S = torch.linalg.svdvals(W.reshape(W.shape[0], -1))
    torch.testing.assert_close(torch.linalg.svdvals(delta.reshape(W.shape[0], -1))[:4], S[:4], atol=1e-5, rtol=1e-5)


# --- merging ----------------------------------------------------------------------------------------
def random_members(method, n, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = method.adapter_state()
    out = []
    for _ in range(n):
        out.append({k: v + scale * torch.randn(v.shape, generator=g) * (v.std() if v.numel() > 1 else 1)
                    for k, v in base.items()})
    return out


def test_merge_one_member_at_weight_one_equals_that_member():
    method = make_method()
    members = random_members(method, 2)
    enc = method.model.backbone.encoder
    x = torch.rand(4, 3, 32, 32)
    for weights in ([1.0], [1.0, 0.0], [0.0, 1.0]):
        k = int(np.argmax(weights))
        ov = merged_overrides(enc, members[:len(weights)], weights, prefix="backbone.encoder.")
        with torch.no_grad():
            merged = torch.func.functional_call(method.model.eval(), ov, (x,), strict=False)
            ref = copy.deepcopy(method)
            with torch.no_grad():
                for n, p in ref.model.named_parameters():
                    if n in members[k]:
                        p.copy_(members[k][n])
            torch.testing.assert_close(merged, ref.model.eval()(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("a", [0.0, 0.25, 0.5, 0.9])
def test_merge_with_weights_summing_to_one_is_linear_in_the_deltas(a):
    method = make_method()
    m1, m2 = random_members(method, 2)
    enc, prefix = method.model.backbone.encoder, "backbone.encoder."
    ov = merged_overrides(enc, [m1, m2], [a, 1 - a], prefix=prefix)
    ov1 = merged_overrides(enc, [m1], [1.0], prefix=prefix)
    ov2 = merged_overrides(enc, [m2], [1.0], prefix=prefix)
    for name, m in lora_sites(enc).items():
        key = prefix + site_keys(name, m)["W"]
        torch.testing.assert_close(ov[key], a * ov1[key] + (1 - a) * ov2[key], atol=1e-5, rtol=1e-5)
        assert not ov[prefix + site_keys(name, m)["B"]].any()  # the LoRA branch is off in the merged net


def test_trimming_with_rho_one_changes_nothing_and_trims_otherwise():
    method = make_method()
    members = random_members(method, 2)
    enc = method.model.backbone.encoder
    plain = merged_overrides(enc, members, [0.5, 0.5], prefix="backbone.encoder.")
    trimmed = merged_overrides(enc, members, [0.5, 0.5], prefix="backbone.encoder.", rho=1.0)
    for k in plain:
        assert torch.equal(plain[k], trimmed[k])
    W = torch.randn(12, 8)
    assert trim_rank(W, 1.0) is W
    assert torch.linalg.matrix_rank(trim_rank(W, 0.5)) == 4
    conv = torch.randn(6, 3, 3, 3)
    assert trim_rank(conv, 0.5).shape == conv.shape


def test_exact_trimming_is_the_best_rank_q_approximation_as_before():
    W = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    previous = (U[:, :4] * S[:4]) @ Vh[:4]  # trim_rank's formula before trim_svd existed
    assert torch.equal(trim_rank(W, 0.5), previous) and torch.equal(trim_rank(W, 0.5, "exact", seed=3), previous)
    assert float((W - previous).norm() ** 2) == pytest.approx(float((S[4:] ** 2).sum()), rel=1e-5)  # Eckart-Young
    with pytest.raises(ValueError, match="svd='randomized'; valid: exact, lowrank"):
        trim_rank(W, 0.5, "randomized")


@pytest.mark.parametrize("shape, rho", [((12, 8), 0.5), ((6, 3, 3, 3), 0.5), ((40, 24), 0.25)])
def test_lowrank_trimming_is_torch_svd_lowrank_with_the_same_seed(shape, rho):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    W2 = W.reshape(shape[0], -1)
    q = int(rho * min(W2.shape))
    state = torch.get_rng_state()
    got = trim_rank(W, rho, "lowrank", seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global generator is left as it was
    torch.manual_seed(7)
    U, S, V = torch.svd_lowrank(W2, q=q, niter=2)  # the authors' call (layers_merge.py svd_trim)
    torch.testing.assert_close(got, (U @ torch.diag(S) @ V.T).reshape(shape), atol=1e-6, rtol=1e-6)
    assert torch.linalg.matrix_rank(got.reshape(shape[0], -1)) == q
    assert not torch.allclose(got, trim_rank(W, rho, "lowrank", seed=8), atol=1e-3)  # another draw, another result
    assert float((W - got).norm()) >= float((W - trim_rank(W, rho)).norm()) - 1e-5  # not the best rank q


def test_lowrank_merge_seeds_once_and_trims_the_layers_one_after_the_other():
    method = make_method()
    members = random_members(method, 2)
    enc, prefix = method.model.backbone.encoder, "backbone.encoder."
    plain = merged_overrides(enc, members, [0.5, 0.5], prefix=prefix)
    got = merged_overrides(enc, members, [0.5, 0.5], prefix=prefix, rho=0.5, svd="lowrank", svd_seed=11)
    torch.manual_seed(11)  # one seed, then the global generator advances layer after layer (the authors' forward)
    for name, m in lora_sites(enc).items():
        key = prefix + site_keys(name, m)["W"]
        torch.testing.assert_close(got[key], trim_rank(plain[key], 0.5, "lowrank"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scores, beta, k, expected_nonzero", [
    ([0.9, 0.5, 0.7, 0.1], 6.0, 2, [0, 2]),
    ([0.2, 0.3], 1.0, 2, [0, 1]),
    ([0.2, 0.3, 0.1], 12.0, 1, [1]),
    ([0.2, 0.3], 1.0, 5, [0, 1]),  # k above the pool size: all members
])
def test_merge_weights_are_exp_beta_s_minus_one_over_top_k(scores, beta, k, expected_nonzero):
    w = merge_weights(torch.tensor(scores), beta, k)
    assert torch.nonzero(w).flatten().tolist() == expected_nonzero
    assert math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    raw = torch.tensor([math.exp(beta * (scores[i] - 1)) for i in expected_nonzero])
    torch.testing.assert_close(w[expected_nonzero], (raw / raw.sum()).float())


# --- the KL term ------------------------------------------------------------------------------------
def reference_kl(adv_logits, clean_logits):
    """The authors' term: KLDivLoss(sum)(log_softmax(adv), softmax(clean)) over the batch size."""
    import torch.nn.functional as F

    return nn.KLDivLoss(reduction="sum")(F.log_softmax(adv_logits, 1), F.softmax(clean_logits, 1)) / len(adv_logits)


def fixed_logits(seed=0, n=6, ways=5):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(n, ways, generator=g)).requires_grad_(), (3 * torch.randn(n, ways, generator=g)).requires_grad_()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_is_the_reference_formula_in_value_and_gradient(seed):
    adv, clean = fixed_logits(seed)
    ours = kl_clean_adv(adv, clean)
    ref = reference_kl(adv, clean)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    g_ours = torch.autograd.grad(ours, [adv, clean])
    g_ref = torch.autograd.grad(ref, [adv, clean])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert g_ours[1].abs().sum() > 0  # the gradient reaches the clean logits too
    reverse = kl_clean_adv(clean, adv)  # KL(p_adv || p_clean), the direction this suite used before
    assert not torch.allclose(ours, reverse, rtol=1e-3)


def test_amt_query_loss_is_ce_plus_lambda_reference_kl():
    import torch.nn.functional as F

    method = make_method("amt", lambda_adv=6.0)
    g = torch.Generator().manual_seed(0)
    fq, fa = torch.randn(6, 8, generator=g).requires_grad_(), torch.randn(6, 8, generator=g).requires_grad_()
    protos, qy = torch.randn(3, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, ce, kl, logits = method.query_loss(fq, fa, protos, qy, method.model)
    model = method.model
    ref = F.cross_entropy(model.logits(fq, protos), qy) + 6.0 * reference_kl(model.logits(fa, protos),
                                                                              model.logits(fq, protos))
    torch.testing.assert_close(loss, ref)
    for a, b in zip(torch.autograd.grad(loss, [fq, fa]), torch.autograd.grad(ref, [fq, fa])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- the pyramid attack -----------------------------------------------------------------------------
def colour_episode(seed=0, ways=3, shots=2, queries=3, size=32):
    """Class k is a flat colour (0.8 in channel k, 0.2 elsewhere) plus +-0.1 uniform noise. The random
    tiny_cnn maps uniform-noise images of every class to nearly the same feature (cosine logits all within
    ~1e-3 of 10, so an attack's KL is float32 rounding noise); these colours keep the clean logits of a
    query >= 1.4 apart and a 2/255 attack's KL near 1e-4, far above any CPU kernel's rounding."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.full((ways, 3), 0.2)
    colours[torch.arange(ways), torch.arange(ways) % 3] = 0.8

    def images(n):
        y = torch.arange(ways).repeat_interleave(n)
        return colours[y, :, None, None] + 0.2 * (torch.rand(len(y), 3, size, size, generator=g) - 0.5), y

    (sx, sy), (qx, qy) = images(shots), images(queries)
    return Episode(sx, sy, qx, qy)


def attack_setup():
    method = make_method()
    model = method.model.eval()
    sx, sy, qx, qy = colour_episode()
    with torch.no_grad():
        protos = prototypes(model(sx), sy, 3)
        clean = model.logits(model(qx), protos)
    spread = clean.max(1).values - clean.min(1).values
    assert (clean.argmax(1) == qy).all() and spread.min() > 1.0, clean  # the classes really separate

    def fn(z):
        return model.logits(model(z), protos)

    return fn, qx, clean


def kl64(adv_logits, clean_logits):
    """The KL term in float64 (kl_clean_adv computes in float32): the values compared are exact to ~1e-15."""
    return reference_kl(adv_logits.double(), clean_logits.double()).item()


@pytest.mark.parametrize("eps, grids, mults, projection, bound", [
    (8 / 255, [4, 8, 0], [20.0, 10.0, 1.0], "projected", 1.0),
    (2 / 255, [4, 8, 0], [20.0, 10.0, 1.0], "projected", 1.0),
    (2 / 255, [4, 8, 0], [20.0, 10.0, 1.0], "reference", 31.0),  # the sum of the scaled grids: up to 31 eps
    (8 / 255, [0], [1.0], "reference", 1.0),
])
def test_pyramid_attack_bounds_and_raises_kl(eps, grids, mults, projection, bound):
    fn, qx, clean = attack_setup()
    g = torch.Generator().manual_seed(0)
    start = pyramid_attack(fn, qx, clean, eps=eps, steps=0, step_size=eps / 10)
    adv = pyramid_attack(fn, qx, clean, eps=eps, steps=5, step_size=eps / 10, grids=grids, mults=mults,
                         projection=projection, generator=g)
    assert torch.equal(start, qx)  # steps=0 returns a copy of x: no arithmetic, exact
    moved = (adv - qx).abs().max()
    assert moved <= bound * eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    if bound > 1:  # the reference threat model is wider than the nominal eps
        assert moved > 2 * eps
    # a random-sign perturbation that moves every pixel as far as the attack's largest move
    sign = torch.randint(0, 2, qx.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = (qx + moved * sign).clamp(0, 1)
    with torch.no_grad():
        kl_adv, kl_noise = kl64(fn(adv), clean), kl64(fn(noise), clean)
    # measured (AVX-512, AVX2 and default kernels alike): kl_adv 1.2e-4 (2/255 projected) to 1.8e-2 (the
    # reference's 31 eps), kl_noise 20x (reference) to 2500x smaller; the kernels change kl_adv by < 1e-6
    assert kl_adv > 3e-5, kl_adv
    assert kl_adv > 5 * kl_noise, (kl_adv, kl_noise)  # the gradient's direction, not just the size, counts


def test_pyramid_projections_agree_on_one_unscaled_grid_and_differ_otherwise():
    fn, qx, clean = attack_setup()
    kw = dict(eps=4 / 255, steps=3, step_size=0.4 / 255)
    single = [pyramid_attack(fn, qx, clean, grids=[0], mults=[1.0], projection=p,
                             generator=torch.Generator().manual_seed(1), **kw) for p in ("reference", "projected")]
    # exact, not close: with one grid of multiplier 1 the projection's clamp is the identity on a delta
    # already clamped to [-eps, eps], so both run the same operations on the same numbers
    assert torch.equal(*single)
    multi = [pyramid_attack(fn, qx, clean, projection=p, generator=torch.Generator().manual_seed(1), **kw)
             for p in ("reference", "projected")]
    assert (multi[0] - multi[1]).abs().max() > kw["eps"]  # the reference goes past eps, the projection does not
    with pytest.raises(ValueError, match="projection"):
        pyramid_attack(fn, qx, clean, projection="sum", **kw)


# --- meta-tuning --------------------------------------------------------------------------------------
def query_ce(method, ep):
    import torch.nn.functional as F

    with torch.no_grad():
        clf = method.episode_classifier(ep.support_x, ep.support_y)
        return F.cross_entropy(clf.eval()(ep.query_x), ep.query_y).item()


# Episodes where each method's clean loss has room to fall far above float32 rounding (measured on the 2-core
# Sapphire Rapids VM: pmf 1.0987 -> 1.0976 on noise; protonet_lora and amt 0.379 -> 0.024 on colours). AMT's
# members at 8/255 trade clean loss for robustness (it rises on colours, and falls by 2e-6 on noise): 0.5/255.
@pytest.mark.parametrize("name, over, make_episode", [
    ("pmf", {}, episode),
    ("protonet_lora", {}, colour_episode),
    ("amt", {"member_eps": 0.5}, colour_episode),
    ("amt", {"member_eps": 0.5, "awp_eta": 0.0}, colour_episode),
])
def test_meta_tuning_steps_lower_the_loss_on_a_fixed_episode(name, over, make_episode):
    method = make_method(name, lr=0.05, **over)
    engine = PlainEngine(method.model, method.make_optimizer())
    ep = make_episode()
    before = query_ce(method, ep)
    method.model.train()
    for step in range(4):
        logs = method.train_step(engine, ep, TrainContext(epoch=0, step=step, steps_per_epoch=4))
        assert math.isfinite(logs["train_loss"])
    assert query_ce(method, ep) < before - 5e-4


def test_weight_perturbation_leaves_the_weights_unchanged():
    """lr 0: the perturbation lives in parameter overrides, so nothing has to be taken back off."""
    method = make_method("amt", lr=0.0, momentum=0.0, member_eps=8.0, awp_eta=0.1)
    engine = PlainEngine(method.model, method.make_optimizer())
    before = {n: p.detach().clone() for n, p in method.model.named_parameters() if p.requires_grad}
    method.train_step(engine, episode(), TrainContext(epoch=0, step=0, steps_per_epoch=4))
    for n, p in method.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[n], atol=1e-6, rtol=0)


def awp_reference(method, ep, eta, x_adv):
    """The authors' step written out with two copies of the model: support features at w, the proxy gradient
    of the query path with the prototypes detached, delta = eta ||w|| g/||g||, queries at w + delta; returns
    (delta, gradient of the final loss per LoRA factor)."""
    from methods.amt import lora_factors

    sx, sy, qx, qy = ep
    at_w = copy.deepcopy(method.model).train()
    names = [n for n, _ in lora_factors(at_w)]
    fs = at_w(sx)
    protos = prototypes(fs.detach().float(), sy, 3)
    fq = at_w(torch.cat([qx, x_adv]))
    proxy = method.query_loss(fq[:len(qx)], fq[len(qx):], protos, qy, at_w)[0]
    grads = torch.autograd.grad(proxy, [at_w.get_parameter(n) for n in names])
    delta = {n: eta * at_w.get_parameter(n).detach().norm() / g.norm() * g for n, g in zip(names, grads)}
    at_wd = copy.deepcopy(method.model).train()
    with torch.no_grad():
        for n in names:
            at_wd.get_parameter(n).add_(delta[n])
    fqa = at_wd(torch.cat([qx, x_adv]))
    loss = method.query_loss(fqa[:len(qx)], fqa[len(qx):], prototypes(fs.float(), sy, 3), qy, at_w)[0]
    g_w = torch.autograd.grad(loss, [at_w.get_parameter(n) for n in names], retain_graph=True)
    g_wd = torch.autograd.grad(loss, [at_wd.get_parameter(n) for n in names])
    return delta, {n: a + b for n, a, b in zip(names, g_w, g_wd)}


def test_weight_perturbation_and_step_follow_the_authors_order():
    """One SGD step (lr 1, no momentum) moves each LoRA factor by minus the gradient of the loss with the
    support at w and the queries at w + delta, delta from the query path with detached prototypes."""
    eta = 0.05
    method = make_method("amt", lr=1.0, momentum=0.0, member_eps=8.0, awp_eta=eta)
    ep = episode()
    method.model.train()
    state = method._gen.get_state()
    x_adv = method.adversarial_queries(method.model, ep.support_x, ep.support_y, ep.query_x, 3)
    method._gen.set_state(state)
    delta, grad = awp_reference(method, ep, eta, x_adv)
    protos = prototypes(method.model(ep.support_x).detach().float(), ep.support_y, 3)
    ours = method.weight_perturbation(method.model, torch.cat([ep.query_x, x_adv]), protos, ep.query_y)
    assert set(ours) == set(delta)
    for n in delta:
        torch.testing.assert_close(ours[n], delta[n], atol=1e-7, rtol=1e-4)
    before = {n: method.model.get_parameter(n).detach().clone() for n in grad}
    engine = PlainEngine(method.model, method.make_optimizer())
    method.train_step(engine, ep, TrainContext(epoch=0, step=0, steps_per_epoch=4))
    for n, g in grad.items():
        torch.testing.assert_close(method.model.get_parameter(n).detach(), before[n] - g, atol=1e-5, rtol=1e-4)


def test_weight_perturbation_is_measured_under_bf16():
    """eta1 = 1e-4 is below bf16's resolution (~3.9e-3 relative): what survives rounding is mostly noise
    (cosine with the intended perturbation far from 1), and a bf16 run logs that cosine."""
    from methods.amt import perturbation_fidelity

    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(64, 64, generator=g)}
    for eta, dtype, low, high in [(1e-4, torch.float32, 0.999, 1.001), (1e-4, torch.bfloat16, -0.5, 0.5),
                                  (1e-1, torch.bfloat16, 0.99, 1.001)]:
        d = {"a": eta * w["a"].norm() * torch.randn(64, 64, generator=g) / 64}
        assert low <= perturbation_fidelity(w, d, dtype) <= high, (eta, dtype)
    method = make_method("amt", member_eps=8.0, bf16_autocast=True)
    engine = PlainEngine(method.model, method.make_optimizer())
    logs = method.train_step(engine, episode(), TrainContext(epoch=0, step=0, steps_per_epoch=4))
    assert -1.0 <= logs["awp_cos"] < 0.9
    fp32 = make_method("amt", member_eps=8.0)
    logs = fp32.train_step(PlainEngine(fp32.model, fp32.make_optimizer()), episode(),
                           TrainContext(epoch=0, step=0, steps_per_epoch=4))
    assert "awp_cos" not in logs


def test_lr_schedule_warms_up_then_cosine():
    method = make_method("pmf", epochs=10, warmup_epochs=2, lr=1.0)
    lrs = [method.lr_at(e, s, 4) for e in range(10) for s in range(4)]
    assert lrs[0] == pytest.approx(1 / 8) and lrs[7] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[8:], lrs[9:])) and lrs[-1] < 0.01


def test_configs_carry_the_paper_defaults():
    c = AMTConfig()
    assert (c.rank, c.lora_alpha, c.lr, c.epochs, c.warmup_epochs, c.momentum, c.weight_decay) == \
        (8, None, 5e-4, 30, 5, 0.9, 0.0)
    assert (c.lambda_adv, c.train_attack_steps, c.train_step_frac, c.awp_eta, c.pool_size) == (6.0, 2, 0.1, 1e-4, 4)
    assert c.pool_eps == [0.01, 0.1, 6.0, 8.0] and c.merge_top_k == 2 and c.trim_rho == 1.0
    assert c.scale_init == 10.0 and c.select_metric == "val_fewshot_acc"
    # the authors' code: 2000 training episodes per epoch, 120 validation episodes, augmented 128-pixel episodes
    assert (c.episodes_per_epoch, c.val_episodes, c.transform, c.pyramid_projection) == (2000, 120, "amt128", "reference")
    assert get_method("amt") is AMT and get_method("pmf") is PMF and get_method("protonet_lora") is ProtoNetLoRA
    assert AMT.episodic and PMF.episodic and ProtoNetLoRA.episodic and c.test_time_ft_steps == 0
    p = get_method("pmf").Config()  # hushell/pmf_cvpr22: README (Meta-Dataset, ImageNet only) and utils/args.py
    assert (p.lr, p.epochs, p.warmup_epochs, p.min_lr, p.momentum, p.weight_decay, p.learn_bias) == \
        (5e-4, 100, 5, 1e-6, 0.9, 0.0, True)
    assert (p.test_time_ft_steps, p.test_time_ft_lr, p.test_time_ft_aug_p) == (100, 1e-4, 0.9)


# --- PMF: whole-backbone meta-training, test-time fine-tuning ------------------------------------------
def _backbone_weights(method):
    return {n: p.detach().clone() for n, p in method.model.backbone.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("name, moves_backbone", [("pmf", True), ("protonet_lora", False)])
def test_pmf_meta_trains_the_whole_backbone_protonet_lora_only_its_lora(name, moves_backbone):
    method = make_method(name, lr=0.05)
    engine = PlainEngine(method.model, method.make_optimizer())
    before = _backbone_weights(method)
    bias0 = method.model.bias.detach().clone()
    method.model.train()
    for step in range(2):
        method.train_step(engine, episode(), TrainContext(epoch=0, step=step, steps_per_epoch=2))
    moved = [n for n, p in method.model.backbone.named_parameters() if n in before and
             not torch.equal(p.detach(), before[n])]
    assert bool(moved) == moves_backbone, moved[:3]
    assert (not torch.equal(method.model.bias.detach(), bias0)) == moves_backbone  # PMF learns the bias


def _logits(clf, x):
    with torch.no_grad(), eval_mode(clf):  # as evaluate_fewshot runs it (BatchNorm statistics stay)
        return clf(x)


def _support_loss(clf, ep):
    import torch.nn.functional as F

    return F.cross_entropy(_logits(clf, ep.support_x), ep.support_y).item()


@pytest.mark.parametrize("name, over", [("pmf", {}), ("protonet_lora", {}), ("amt", {"member_eps": 8.0})])
def test_test_time_finetuning_fits_the_support_and_does_not_leak(name, over):
    ep, other = episode(0), episode(1)
    plain = make_method(name, test_time_ft_steps=0, **over)
    tuned = make_method(name, test_time_ft_steps=8, test_time_ft_lr=1e-3, **over)  # DiffAugment p = 0.9
    # without augmentation the objective is the support loss itself (random-noise images do not survive
    # DiffAugment's colour shifts, so only this variant must lower it)
    unaugmented = make_method(name, test_time_ft_steps=8, test_time_ft_lr=1e-3, test_time_ft_aug_p=0.0, **over)
    weights = {n: p.detach().clone() for n, p in tuned.model.state_dict().items()}
    clf0 = plain.episode_classifier(ep.support_x, ep.support_y, episode=(0, 0))
    clf1 = tuned.episode_classifier(ep.support_x, ep.support_y, episode=(0, 0))
    assert not torch.allclose(_logits(clf0, ep.query_x), _logits(clf1, ep.query_x))  # the classifier changed
    fitted = unaugmented.episode_classifier(ep.support_x, ep.support_y, episode=(0, 0))
    assert _support_loss(fitted, ep) < _support_loss(clf0, ep) - 0.05  # and fits its support better
    # nothing carries over: the model is untouched, and an episode's classifier is the same after another
    tuned.episode_classifier(other.support_x, other.support_y, episode=(0, 1))
    for n, t in tuned.model.state_dict().items():
        assert torch.equal(t, weights[n]), n
    again = tuned.episode_classifier(ep.support_x, ep.support_y, episode=(0, 0))
    assert torch.equal(_logits(again, ep.query_x), _logits(clf1, ep.query_x))


@pytest.mark.parametrize("over, expected", [
    ({}, (30, 5e-4, 2, 0.1)),  # the paper's text
    ({"recipe": "code"}, (100, 5e-5, 10, 0.0)),  # the released code's defaults (absolute 2/255 steps)
    ({"recipe": "code", "epochs": 3, "lr": 0.01}, (3, 0.01, 10, 0.0)),  # explicit fields win over the recipe
])
def test_recipe_fills_the_fields_left_unset(over, expected):
    c = resolve_config("amt", over)
    assert (c.epochs, c.lr, c.train_attack_steps, c.train_step_frac) == expected
    method = AMT(c, create_backbone("tiny_cnn", 5), 5)
    method.train_eps = 8 / 255
    assert method.attack_step_size() == pytest.approx(0.8 / 255 if c.train_step_frac else 2 / 255)


@pytest.mark.parametrize("over, match", [
    ({"recipe": "authors"}, "recipe"),
    ({"pyramid_projection": "sum"}, "pyramid_projection"),
    ({"fewshot_autoattack": "fast"}, "fewshot_autoattack"),
    ({"fewshot_autoattack": "standard", "ways": 3}, "ways >= 4"),
    ({"trim_svd": "randomized"}, "trim_svd='randomized'; valid: exact, lowrank"),
])
def test_bad_amt_settings_fail_in_one_line(over, match):
    from bench.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        resolve_config("amt", over)


@pytest.mark.parametrize("size, expected", [(4, [0.01, 0.1, 6.0, 8.0]), (2, [0.01, 8.0]), (1, [8.0]),
                                            (3, [0.01, 6.0, 8.0])])
def test_pool_eps_spread_over_the_list(size, expected):
    assert pool_eps_list(AMTConfig(pool_size=size)) == expected


# --- few-shot evaluation --------------------------------------------------------------------------------
class _Constant(nn.Module):
    """Always predicts way 0."""

    def __init__(self, ways):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(ways))

    def forward(self, x):
        return self.w.unsqueeze(0).expand(len(x), -1) + torch.eye(len(self.w))[0] + 0 * x.flatten(1).sum(1, keepdim=True)


class _Method:
    def __init__(self):
        self.keys = []  # the episode keys evaluate_fewshot passed

    def episode_classifier(self, sx, sy, *, episode=None):
        self.keys.append(episode)
        return _Constant(int(sy.max()) + 1)


class _Sampler:
    """Episode i: query labels chosen so that predicting way 0 is right on a known fraction."""
    ways, shots = 2, 1

    def __init__(self, fractions):
        self.fractions = fractions

    def sample(self, i):
        n = 10
        k = int(round(self.fractions[i] * n))
        qy = torch.tensor([0] * k + [1] * (n - k))
        return torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), torch.rand(n, 3, 8, 8), qy


@pytest.mark.parametrize("fractions", [[0.5, 0.5, 0.5], [0.2, 0.6, 1.0, 0.4], [1.0]])
def test_evaluate_fewshot_mean_and_ci_formula(fractions):
    cfg = AMTConfig(eval_pgd_steps=2)
    out = evaluate_fewshot(_Method(), _Sampler(fractions), len(fractions), cfg, attack=True, progress=False)
    assert out["ways"] == 2 and out["shots"] == 1 and out["episodes"] == len(fractions)
    assert out["clean_acc"] == pytest.approx(np.mean(fractions))
    # torch's unbiased std, as the reference; one episode has no spread to estimate: interval 0
    std = np.std(fractions, ddof=1) if len(fractions) > 1 else 0.0
    assert out["clean_ci95"] == pytest.approx(1.96 * std / np.sqrt(len(fractions)))
    assert 0 <= out["adv_acc"] <= 1 and "adv_ci95" in out
    clean_only = evaluate_fewshot(_Method(), _Sampler(fractions), len(fractions), cfg, attack=False, progress=False)
    assert "adv_acc" not in clean_only and "adv_ci95" not in clean_only


def test_mean_ci95_edge_cases():
    assert mean_ci95([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_ci95([]))


def test_evaluate_fewshot_on_a_method_attack_lowers_accuracy():
    method = make_method("amt")

    class S:
        ways, shots = 3, 2

        def sample(self, i):
            return episode(i)

    cfg = method.cfg
    out = evaluate_fewshot(method, S(), 2, cfg, attack=True, progress=False)
    assert 0 <= out["adv_acc"] <= out["clean_acc"] <= 1


# --- adapters and the pool ----------------------------------------------------------------------------
def test_adapter_round_trip_and_residual_check(tmp_path):
    method = make_method("amt", member_eps=6.0)
    members = random_members(method, 1)
    with torch.no_grad():
        for n, p in method.model.named_parameters():
            if n in members[0]:
                p.copy_(members[0][n])
    path = method.save_adapter(tmp_path / "a.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["meta"]["eps"] == 6.0 and "scale_cls" in payload["tensors"]
    other = make_method("amt")
    other.load_adapter(path)
    for n, t in payload["tensors"].items():
        torch.testing.assert_close(other.model.get_parameter(n).detach(), t)
    wrong = make_method("amt", rank=2)  # another residual: refused
    with pytest.raises(ValueError):
        wrong.load_adapter(path)


def _train_members(cfg, root):
    """Each prerequisite run of ``cfg`` (a pool member) trained one step in ``root/r<i>``, as bench would."""
    from methods.base import RUN_DIR

    finished = []
    for i, overrides in enumerate(AMT.prerequisite_runs(cfg)):
        run_dir = root / f"r{i}"
        overrides = {**overrides, "adapter_path": overrides["adapter_path"].replace(RUN_DIR, str(run_dir))}
        m = make_method("amt", **{k: v for k, v in overrides.items() if k != "rank"})
        engine = PlainEngine(m.model, m.make_optimizer())
        m.train_step(engine, episode(i + 1), TrainContext(epoch=0, step=0, steps_per_epoch=1))
        m.end_epoch(0, {"val_fewshot_acc": 0.5})  # the selected epoch saves the adapter
        finished.append(({"id": f"member{i}", "status": "ok"}, run_dir))
    return finished


def test_pool_members_are_runs_needed_first_and_assemble_writes_the_manifest(tmp_path):
    ep = episode(3)
    cfg = AMTConfig(pool_size=2, rank=4)
    assert [r["member_eps"] for r in AMT.prerequisite_runs(cfg)] == [0.01, 8.0]
    out = tmp_path / "trial"
    overrides = AMT.assemble(cfg, _train_members(cfg, tmp_path / "runs"), out)
    assert overrides == {"pool_dir": str(out.resolve())}
    manifest = json.loads((out / "pool.json").read_text())
    assert [m["eps"] for m in manifest["members"]] == [0.01, 8.0]
    for m in manifest["members"]:  # trained outside the trial's folder: the pool holds copies, relative paths
        assert (out / m["adapter"]).is_file() and not Path(m["adapter"]).is_absolute()
        assert m["trained_in"] == f"../runs/r{m['index']}"  # (the runs and the trial lie in one folder)
    assert AMT.prerequisite_runs(resolve_config("amt", {"pool_dir": str(out)})) == []  # a trained pool: none
    assert AMT.prerequisite_runs(resolve_config("amt", {"member_eps": 8.0})) == []  # a member: none

    merged = make_method("amt", pool_dir=overrides["pool_dir"])
    assert len(merged.members) == 2
    clf = merged.episode_classifier(ep.support_x, ep.support_y)
    w = merged.last_merge
    assert len(w) == 2 and sum(w) == pytest.approx(1.0)
    with torch.no_grad():
        logits = clf.eval()(ep.query_x)
    assert logits.shape == (9, 3) and torch.isfinite(logits).all()
    # a pool of one member merges to exactly that member
    one = dict(manifest, members=manifest["members"][:1])
    (out / "one.json").write_text(json.dumps(one))
    single = make_method("amt", pool_dir=str(out / "one.json"))
    plain = make_method("amt")
    plain.load_adapter(out / one["members"][0]["adapter"])
    with torch.no_grad():
        a = single.episode_classifier(ep.support_x, ep.support_y).eval()(ep.query_x)
        b = plain.episode_classifier(ep.support_x, ep.support_y).eval()(ep.query_x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with pytest.raises(FileNotFoundError, match="left no adapter"):  # a member that never saved one
        AMT.assemble(cfg, [({}, tmp_path / "runs" / "r0"), ({}, tmp_path / "nowhere")], tmp_path / "t2")


@pytest.mark.parametrize("change, same_member", [
    ({"merge_beta": 2.0}, True), ({"merge_lambda": 0.1}, True), ({"merge_top_k": 1}, True),
    ({"trim_rho": 0.5}, True), ({"trim_svd": "lowrank"}, True), ({"episodes": 7}, True), ({"pool_size": 2}, True), ({"channels_last": True}, True),
    ({"rank": 2}, False), ({"lambda_adv": 1.0}, False), ({"seed": 1}, False), ({"epochs": 3}, False),
    ({"lr": 0.1}, False), ({"backbone": "cifar_resnet18_aa"}, False),
])
def test_a_members_run_ignores_only_pool_settings(change, same_member):
    """bench names (and shares) a run by its config: a member's is the same for pools that differ only in
    pool settings, and differs with anything that shapes its training."""
    from bench.prerequisites import prerequisite_runs

    def names(cfg):
        return {r.config["member_eps"]: r.name for r in prerequisite_runs(cfg)}

    base = names(resolve_config("amt", {"backbone": "tiny_cnn"}))
    other = names(resolve_config("amt", {"backbone": "tiny_cnn", **change}))
    assert (base[8.0] == other[8.0]) is same_member
    assert len(set(base.values())) == 4  # one run per eps


def test_pools_share_the_members_they_have_in_common():
    """Pools that differ in merge settings and pool size need the same runs for their common strengths."""
    from bench.prerequisites import prerequisite_runs

    a = prerequisite_runs(resolve_config("amt", {"pool_size": 2, "merge_beta": 3.0, "rank": 4}))
    b = prerequisite_runs(resolve_config("amt", {"pool_size": 4, "merge_beta": 9.0, "merge_top_k": 1, "rank": 4}))
    assert {r.name for r in a} < {r.name for r in b} and len({r.name for r in b}) == 4
    assert [r.config for r in a] == [r.config for r in b if r.name in {x.name for x in a}]


# --- end to end -------------------------------------------------------------------------------------
def bench(*args):
    e = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="offline")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "bench", *args], env=e, capture_output=True, text=True,
                          timeout=900)


# image_size 32: the amt128 transform at the digits' stored size (a cheap stand-in, not the paper's 128)
EPISODIC = ["--set", "epochs=1", "--set", "episodes_per_epoch=2", "--set", "episodes=4", "--set", "val_episodes=1",
            "--set", "eval_pgd_steps=1", "--set", "queries=3", "--set", "image_size=32"]


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("pmf", ["--set", "test_time_ft_steps=2"]),
                                           ("amt", ["--set", "pool_size=2", "--set", "rank=4"])])
def test_bench_run_episodic_end_to_end(shards_root, tmp_path, method, extra):
    out = tmp_path / method
    p = bench("run", "--method", method, "--dataset", "digits", "--backbone", "cifar_resnet18_aa",
              "--data-root", str(shards_root), "--out", str(out), "--no-progress", *EPISODIC, *extra)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "result.json").read_text())
    fs = r["fewshot"]
    assert fs["episodes"] == 4 and fs["ways"] == 5 and fs["shots"] == 1
    for key in ("clean_acc", "clean_ci95", "adv_acc", "adv_ci95"):
        assert key in fs and 0 <= fs[key] <= 1
    if method == "amt":
        pool = json.loads((out / "pool.json").read_text())
        assert [m["eps"] for m in pool["members"]] == [0.01, 8.0]
        assert all((out / m["adapter"]).is_file() for m in pool["members"])


DS_AWP = """
import sys, torch
from bench.backbones import create_backbone
from bench.config import resolve_config
from bench.engine import build_engine
from methods import get_method
from methods.base import Episode, TrainContext
stage, bf16 = int(sys.argv[1]), sys.argv[2] == "1"
cfg = resolve_config("amt", {"rank": 4, "lr": 0.0, "momentum": 0.0, "member_eps": 8.0, "awp_eta": 0.1,
                             "zero_stage": stage, "bf16": bf16, "warmup_epochs": 0, "epochs": 1})
torch.manual_seed(0)
m = get_method("amt")(cfg, create_backbone("tiny_cnn", 5), 5)
eng = build_engine(m.model, m.make_optimizer(), cfg)
before = {n: p.detach().float().clone() for n, p in eng.module.named_parameters() if p.requires_grad}
g = torch.Generator().manual_seed(0)
dt = torch.bfloat16 if bf16 else torch.float32
ep = Episode(torch.rand(6, 3, 32, 32, generator=g).to(dt), torch.arange(3).repeat_interleave(2),
             torch.rand(9, 3, 32, 32, generator=g).to(dt), torch.arange(3).repeat_interleave(3))
def change():
    return max((p.detach().float() - before[n]).abs().max().item() for n, p in eng.module.named_parameters()
               if p.requires_grad and "lora" in n)
m.train_step(eng, ep, TrainContext(epoch=0, step=0, steps_per_epoch=1))
unchanged = change()
m.cfg.lr = 0.1  # a real step: the gradient through the w + delta overrides reaches the LoRA factors
m.train_step(eng, ep, TrainContext(epoch=0, step=0, steps_per_epoch=1))
print(unchanged, change())
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage, bf16", [(0, False), (1, False), (2, False), (0, True)])
def test_weight_perturbation_under_deepspeed(stage, bf16):
    """lr 0: the parameters after a DeepSpeed step equal those before (the perturbation is an override, never
    in the weights or in ZeRO's/bf16's fp32 master copy); lr > 0: the step reaches the LoRA factors."""
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    p = subprocess.run([sys.executable, "-c", DS_AWP, str(stage), "1" if bf16 else "0"], env=e,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    unchanged, moved = map(float, p.stdout.strip().splitlines()[-1].split())
    assert unchanged < 1e-6 and moved > 1e-4


# --- merge scoring: the authors' DiffAugment, one draw per episode, class-balanced scores ----------------
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])


def test_diff_augment_works_on_normalised_inputs():
    from methods.merge import diff_augment

    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m, s = MEAN.view(1, 3, 1, 1), STD.view(1, 3, 1, 1)
    for seed in range(4):
        pixel = diff_augment(x, torch.Generator().manual_seed(seed), 1.0, mean=MEAN, std=STD)
        normalised = diff_augment((x - m) / s, torch.Generator().manual_seed(seed), 1.0)
        torch.testing.assert_close(pixel, normalised * s + m, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(pixel, diff_augment(x, torch.Generator().manual_seed(seed), 1.0), atol=1e-3)


def test_diff_augment_one_coin_and_one_flip_per_batch():
    from methods.merge import diff_augment

    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    applied = [not torch.equal(diff_augment(x, torch.Generator().manual_seed(s), 0.5), x) for s in range(40)]
    assert 8 <= sum(applied) <= 32  # the coin is per batch: all or nothing, about half the time
    for s in range(40):
        out = diff_augment(x, torch.Generator().manual_seed(s), 0.5)
        changed = (out != x).flatten(1).any(1)
        assert changed.all() or not changed.any()
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(6, 3, 8, 8)  # grey, brighter to the right
    flips = []
    for s in range(40):  # colour ops keep the left/right order of a grey ramp; a flip reverses it
        out = diff_augment(ramp, torch.Generator().manual_seed(s), 1.0, translation=0.0)
        right_brighter = out[..., -1].mean((1, 2)) > out[..., 0].mean((1, 2))
        assert right_brighter.all() or not right_brighter.any()
        flips.append(not bool(right_brighter[0]))
    assert 8 <= sum(flips) <= 32


def test_support_score_is_class_balanced():
    from methods.merge import support_score

    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 0, 1, 2, 2])  # unequal shots
    clean, aug = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    protos = torch.stack([clean[y == k].mean(0) for k in range(3)])
    cos = torch.nn.functional.normalize(aug, dim=1) @ torch.nn.functional.normalize(protos, dim=1).t()
    intra = np.mean([cos[y == k, k].mean().item() for k in range(3)])
    inter = np.mean([cos[y == k][:, [j for j in range(3) if j != k]].mean().item() for k in range(3)])
    for lam in (0.0, 0.6, 1.0):
        assert support_score(clean, aug, y, 3, lam) == pytest.approx(lam * intra - (1 - lam) * inter, abs=1e-6)


def test_merge_scores_every_member_on_one_shared_augmentation_draw():
    from methods.merge import diff_augment, merged_overrides, support_score

    method = make_method("amt", merge_top_k=3, merge_beta=6.0)
    members = random_members(method, 3, scale=0.2)
    method.members = [{"eps": e, "adapter": "", "tensors": t} for e, t in zip([0.1, 6.0, 8.0], members)]
    sx, sy = episode(3).support_x, episode(3).support_y
    method.episode_classifier(sx, sy, episode=(1234, 5))
    backbone, enc = method.model.backbone, method.model.backbone.encoder
    gen = torch.Generator().manual_seed(episode_seed(method.cfg.merge_seed, (1234, 5), MERGE_AUGMENT))
    aug = diff_augment(sx, gen, method.cfg.merge_aug_p, mean=backbone.mean, std=backbone.std)
    scores = []
    with torch.no_grad():
        for m in members:
            ov = merged_overrides(enc, [m], [1.0], prefix="backbone.encoder.")
            f = [torch.func.functional_call(method.model.eval(), ov, (z,), strict=False) for z in (sx, aug)]
            scores.append(support_score(f[0], f[1], sy, 3, method.cfg.merge_lambda))
    expected = merge_weights(torch.tensor(scores), 6.0, 3)
    torch.testing.assert_close(torch.tensor(method.last_merge), expected, atol=1e-5, rtol=1e-4)


# --- per-episode randomness: AMT's merge draws, PMF's fine-tuning draws (methods/episode_rng.py) -----------
@pytest.mark.parametrize("a, b", [
    ((1234, (1234, 0), 0), (1234, (1234, 1), 0)),  # the next episode
    ((1234, (1234, 0), 0), (1234, (11234, 0), 0)),  # the same index of another sampler (validation vs test)
    ((1234, (1234, 0), 0), (1234, (1234, 0), 1)),  # another stream of the same episode
    ((1234, (1234, 0), 0), (0, (1234, 0), 0)),  # another seed
    ((5, (), 0), (5, (0,), 0)),  # SeedSequence pads with zeros: the length word keeps these apart
    ((5, (2**32,), 0), (5, (0, 1), 0)),  # ... and splits big integers into 32-bit words: the fixed width does
    ((0, (1_000_003,), 0), (1, (0,), 0)),  # where seed * 1_000_003 + episode would collide
])
def test_episode_seeds_differ_between_keys(a, b):
    assert episode_seed(*a) != episode_seed(*b)


def test_episode_seed_is_pinned_and_in_range():
    # pinned: a change of the mixing changes every episode's draws, hence every AMT/PMF result
    assert episode_seed(1234, 7) == episode_seed(1234, (7,)) == 6120834123166468323
    assert all(0 <= episode_seed(s, k) < 2**63 for s, k in [(2**70, (-1, 3)), (-5, 0), (0, ())])


def test_without_a_key_the_draws_advance_from_call_to_call():
    a, b = EpisodeRandomness(7), EpisodeRandomness(7)
    first, second = (torch.rand(3, generator=a.generator(None, MERGE_AUGMENT)) for _ in range(2))
    assert not torch.equal(first, second)  # episodes differ, as under the authors' global generator
    assert torch.equal(first, torch.rand(3, generator=b.generator(None, MERGE_AUGMENT)))  # reproducible from the start
    s1, s2 = a.seed_for(None, MERGE_TRIM), a.seed_for(None, MERGE_TRIM)
    assert s1 != s2 and s1 == b.seed_for(None, MERGE_TRIM)
    # a keyed episode ignores what ran before it
    assert torch.equal(torch.rand(3, generator=a.generator((0, 4), FINETUNE)),
                       torch.rand(3, generator=EpisodeRandomness(7).generator((0, 4), FINETUNE)))
    assert a.seed_for((0, 4), MERGE_TRIM) == episode_seed(7, (0, 4), MERGE_TRIM)


def test_evaluate_fewshot_passes_the_sampler_seed_and_the_episode_index():
    method, sampler = _Method(), _Sampler([0.5, 0.5, 0.5])
    sampler.seed = 11234
    evaluate_fewshot(method, sampler, 3, AMTConfig(), attack=False, progress=False)
    assert method.keys == [(11234, 0), (11234, 1), (11234, 2)]


def _pool_method(n_members=3, **over):
    method = make_method("amt", merge_top_k=3, **over)
    members = random_members(method, n_members, scale=0.2)
    method.members = [{"eps": e, "adapter": "", "tensors": t} for e, t in zip([0.1, 6.0, 8.0], members)]
    return method


@pytest.mark.parametrize("key_a, key_b, same", [
    ((1234, 0), (1234, 0), True),  # a rerun of the episode, other episodes in between
    ((1234, 0), (1234, 1), False),  # the next episode (before: the same draw for every episode)
    ((1234, 0), (11234, 0), False),  # the same index of another sampler
    (None, None, False),  # no key: the generator advances
])
def test_merge_scoring_draw_is_the_episodes_own(monkeypatch, key_a, key_b, same):
    import methods.amt as amt_module

    method = _pool_method(merge_aug_p=1.0)  # always augmented: different draws give different images
    real, seen = amt_module.diff_augment, []
    monkeypatch.setattr(amt_module, "diff_augment", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    sx, sy = episode(3).support_x, episode(3).support_y
    method.episode_classifier(sx, sy, episode=key_a)
    aug_a, w_a = seen[-1], method.last_merge
    method.episode_classifier(episode(4).support_x, episode(4).support_y, episode=(99, 99))
    method.episode_classifier(sx, sy, episode=key_b)
    aug_b, w_b = seen[-1], method.last_merge
    assert torch.equal(aug_a, aug_b) is same
    if same:
        assert w_a == w_b


def test_merge_draws_over_episodes_augment_about_p_and_flip_about_half():
    from methods.merge import diff_augment

    rng = EpisodeRandomness(1234)
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(4, 3, 8, 8)  # a flip reverses its left/right order
    applied = flipped = 0
    for i in range(200):
        out = diff_augment(ramp, rng.generator((11234, i), MERGE_AUGMENT), 0.9, translation=0.0)
        if not torch.equal(out, ramp):
            applied += 1
            flipped += bool(out[0, :, :, -1].mean() < out[0, :, :, 0].mean())
    assert 165 <= applied <= 195 and 0.35 <= flipped / applied <= 0.65  # before: 200 and 200, or 0 and 0


@pytest.mark.parametrize("trim_svd, key_b, same", [
    ("lowrank", (1234, 0), True),  # a rerun repeats the random projections
    ("lowrank", (1234, 1), False),  # another episode, another draw
    ("exact", (1234, 1), True),  # the exact SVD draws nothing
])
def test_trimming_of_an_episode(trim_svd, key_b, same):
    method = _pool_method(n_members=1, trim_rho=0.5, trim_svd=trim_svd)  # one member: weight 1, no scoring draw
    sx, sy = episode(3).support_x, episode(3).support_y
    enc, prefix = method.model.backbone.encoder, "backbone.encoder."
    a = method.episode_classifier(sx, sy, episode=(1234, 0)).overrides
    method.episode_classifier(sx, sy, episode=(99, 99))
    b = method.episode_classifier(sx, sy, episode=key_b).overrides
    keys = [prefix + site_keys(n, m)["W"] for n, m in lora_sites(enc).items()]
    assert all(torch.equal(a[k], b[k]) for k in keys) is same
    # the trimmed weights are the untrimmed merge's, trimmed as trim_rank does with the episode's seed
    plain = merged_overrides(enc, [method.members[0]["tensors"]], [1.0], prefix=prefix)
    torch.manual_seed(episode_seed(method.cfg.merge_seed, (1234, 0), MERGE_TRIM))
    for k in keys:
        torch.testing.assert_close(a[k], trim_rank(plain[k], 0.5, trim_svd), atol=1e-5, rtol=1e-5)
    assert method.summary()["merge"]["trim_svd"] == trim_svd


@pytest.mark.parametrize("name, over", [("pmf", {}), ("amt", {"member_eps": 8.0})])
@pytest.mark.parametrize("key_a, key_b, same", [
    ((0, 0), (0, 0), True),  # a rerun of the episode, another episode in between
    ((0, 0), (0, 1), False),  # the next episode (before: the same 100 draws for every episode)
    ((1234, 0), (10000, 0), False),  # the same index of another sampler
    (None, None, False),  # no key: the generator advances
])
def test_finetuning_draws_are_the_episodes_own(name, over, key_a, key_b, same):
    ep, other = episode(0), episode(1)
    method = make_method(name, test_time_ft_steps=2, test_time_ft_lr=1e-3, test_time_ft_aug_p=1.0, **over)
    a = _logits(method.episode_classifier(ep.support_x, ep.support_y, episode=key_a), ep.query_x)
    method.episode_classifier(other.support_x, other.support_y, episode=(5, 5))
    b = _logits(method.episode_classifier(ep.support_x, ep.support_y, episode=key_b), ep.query_x)
    assert torch.equal(a, b) is same


def test_trim_svd_is_a_pool_setting_and_the_paper_preset_uses_the_authors_lowrank():
    from bench.sweep.space import load_sweep
    from methods.base import field_roles

    assert field_roles(AMTConfig)["trim_svd"] == "pool" and AMTConfig().trim_svd == "exact"
    spec = load_sweep(ROOT / "tune_spaces" / "paper_amt.yaml")
    assert resolve_config("amt", spec.overrides("amt", 0, {})).trim_svd == "lowrank"


# --- AutoAttack on the episodes' queries -----------------------------------------------------------------
@pytest.mark.slow
def test_fewshot_autoattack_is_recorded_with_its_interval():
    """A classifier whose output ignores the input cannot be attacked: AutoAttack accuracy equals clean."""
    fractions = [0.2, 1.0]
    cfg = AMTConfig(eval_pgd_steps=1, fewshot_autoattack="apgd-ce", ways=2)
    out = evaluate_fewshot(_Method(), _Sampler(fractions), len(fractions), cfg, attack=True, progress=False)
    assert out["autoattack_version"] == "apgd-ce"
    assert out["autoattack_acc"] == pytest.approx(np.mean(fractions))
    assert out["autoattack_ci95"] == pytest.approx(1.96 * np.std(fractions, ddof=1) / np.sqrt(len(fractions)))
    off = evaluate_fewshot(_Method(), _Sampler(fractions), len(fractions), cfg, attack=True, progress=False,
                           autoattack="off")
    assert "autoattack_acc" not in off and "autoattack_ci95" not in off


@pytest.mark.slow
def test_fewshot_standard_autoattack_on_a_five_way_episode():
    method = make_method("amt", ways=5, fewshot_autoattack="standard", eval_pgd_steps=2)

    class S:
        ways, shots = 5, 2

        def sample(self, i):
            return episode(i, ways=5, queries=2)

    out = evaluate_fewshot(method, S(), 1, method.cfg, attack=True, progress=False)
    assert out["autoattack_version"] == "standard"
    assert 0 <= out["autoattack_acc"] <= out["clean_acc"] <= 1
