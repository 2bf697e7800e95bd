"""AutoLoRa: the pieces that pin the method down (fast), and `bench run` end to end."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods import get_method
from methods import lora as L
from methods.autolora import AutoLoRa, AutoLoRaConfig, AutoLRSchedule, kl_term, lambdas
from methods.base import TrainContext

from bench.engine import PlainEngine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMS = ["reference", "peft"]
PLACEMENTS = ["reference", "all_blocks"]


# --- a tiny ResNet-like ImageClassifier (same attributes as bench's) ------------------------------------
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)  # stem: no LoRA
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 12, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.layer1(torch.relu(self.bn1(self.conv1(x))))).flatten(1)


class TinyClassifier(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(12, num_classes)

    def features(self, x):
        return self.encoder(x)

    def forward(self, x):
        return self.head(self.features(x))




def make(form="reference", **overrides):
    torch.manual_seed(0)
    backbone = TinyClassifier()
    original = copy.deepcopy(backbone)
    kw = dict(lora_form=form, weight_decay=0.0, train_attack_steps=2, batch_size=8, lr=0.1)
    kw.update(overrides)
    cfg = AutoLoRaConfig(**kw)
    cfg.validate()
    method = AutoLoRa(cfg, backbone, 4)
    opt = method.make_optimizer()
    return method, PlainEngine(method.model, opt), original


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def perturb_lora(method, std=0.05):
    with torch.no_grad():
        for p in L.lora_parameters(method.model):
            p.normal_(0, std)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(before, model, pred):
    return {n for n, p in model.named_parameters() if pred(n) and not torch.equal(before[n], p.detach())}


def is_lora(n):
    return L.is_lora_param(n)


def is_head(n):
    return n.startswith("head.")


# --- registration and wiring ----------------------------------------------------------------------------
def test_registered_with_paper_defaults():
    cls = get_method("autolora")
    assert cls is AutoLoRa
    cfg = cls.Config()
    expected = dict(r_nat=8, lora_alpha=1.0, lora_form="reference", lora_placement="reference",
                    lambda_data="train_augmented", lambda2_max=6.0, lambda_updates_per_epoch=1,
                    lr=0.01, lr_checkpoint_every=4, rho=0.75, lr_min=1e-5, epochs=60, eval_pgd_steps=10,
                    momentum=0.9, weight_decay=1e-4, batch_size=128, train_attack_steps=10)
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("field,value", [("lora_form", "loralib"), ("r_nat", 0), ("rho", 1.5),
                                         ("lambda_updates_per_epoch", 0), ("lr_stall_rule", "x"),
                                         ("lora_placement", "last"), ("lambda_data", "test")])
def test_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        AutoLoRaConfig(**{field: value}).validate()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("placement,shapes", [("all_blocks", [(8, 12, 3), (12, 12, 3), (8, 12, 1)]),
                                              ("reference", [(8, 12, 3), (12, 12, 3)])])  # no 1x1 shortcut
def test_targets_and_param_counts(form, placement, shapes):
    method, _, _ = make(form, lora_placement=placement)
    convs = ["encoder.layer1.0.conv1", "encoder.layer1.0.conv2", "encoder.layer1.0.shortcut.0"]
    assert method.lora_names == convs[:len(shapes)]
    r = 8
    # reference: A (r k, in k) + B (out k, r k) per conv; peft: A conv in->r (k x k) + B conv r->out (1 x 1)
    ref = sum(r * k * cin * k + cout * k * r * k for cin, cout, k in shapes)
    peft = sum(cin * r * k * k + r * cout for cin, cout, k in shapes)
    counts = method.param_counts
    assert counts["lora_reference_form"] == ref and counts["lora_peft_form"] == peft
    assert counts["lora"] == (ref if form == "reference" else peft)
    assert method.summary()["params"] == counts


def test_reference_form_shapes_and_init():
    method, _, _ = make("reference")
    layer = [m for m in L.lora_layers(method.model)][0]  # conv1: 8 -> 12, 3x3
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.shape == (8 * 3, 8 * 3) and b.shape == (12 * 3, 8 * 3)
    assert torch.count_nonzero(b) == 0
    torch.manual_seed(0)
    big = nn.Conv2d(64, 64, 3, bias=False)
    holder = nn.Sequential(big)
    L.add_lora(holder, form="reference", target_modules=r"0")
    a = holder[0].lora_A["default"].weight
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1.0) < 0.02  # N(0, 1) as the reference
    assert layer.scaling["default"] == pytest.approx(1 / 8)


@pytest.mark.parametrize("name,pattern,count", [
    ("resnet18", "resnet", 19),  # timm: layerN.M.conv1/conv2 + downsample.0
    ("resnet50", "resnet", 16 * 3 + 4),  # bottlenecks conv1/2/3 + downsample.0
    ("vit_tiny_patch16_224", "vit", 12 * 4),  # attn.qkv, attn.proj, mlp.fc1, mlp.fc2
])
def test_target_patterns_on_timm(name, pattern, count):
    timm = pytest.importorskip("timm")
    from methods.autolora import TARGET_ALIASES

    model = nn.Module()
    model.encoder = timm.create_model(name, pretrained=False, num_classes=0)
    names = L.add_lora(model, form="reference", target_modules=TARGET_ALIASES[pattern])
    assert len(names) == count
    assert not any(n.endswith(("encoder.conv1", "head", "fc")) for n in names)


# --- where the LoRA branch acts (lora_placement) ---------------------------------------------------------
def _stage_convs(prefix, blocks, convs):
    return [f"{prefix}layer{s}.{b}.conv{c}" for s, b in enumerate(blocks, 1) for c in range(1, convs + 1)]


def _build(name):
    if name == "cifar_resnet18_aa":  # the embedded backbone: pyautoattack's CIFAR ResNet-18 (encoder.layerN.M)
        from bench.backbones import create_backbone

        return create_backbone(name, 10)
    timm = pytest.importorskip("timm")
    model = nn.Module()
    model.encoder = timm.create_model(name, pretrained=False, num_classes=0)  # no weights needed
    return model


@pytest.mark.parametrize("name,placement,want", [
    # the authors' code: the convs of the last block of each stage, never the 1x1 projection
    ("cifar_resnet18_aa", "reference", _stage_convs("encoder.", [1, 1, 1, 1], 2)),  # 8 convs
    ("resnet18", "reference", _stage_convs("encoder.", [1, 1, 1, 1], 2)),  # 8 convs
    ("resnet50", "reference", _stage_convs("encoder.", [2, 3, 5, 2], 3)),  # layer1.2 layer2.3 layer3.5 layer4.2: 12
    # every block conv and the projection shortcuts
    # every block conv and the 1x1 projection shortcuts: (block convs, projections)
    ("cifar_resnet18_aa", "all_blocks", (16, 3)),
    ("resnet18", "all_blocks", (16, 3)),
    ("resnet50", "all_blocks", (16 * 3, 4)),  # 52, as the bench did before lora_placement
])
def test_lora_placement_module_lists(name, placement, want):
    model = _build(name)
    names = L.add_lora(model, form="reference", target_modules=L.RESNET_TARGETS, placement=placement)
    if isinstance(want, list):
        assert names == want
    else:
        projections = [n for n in names if n.endswith(("shortcut.0", "downsample.0"))]
        assert (len(names) - len(projections), len(projections)) == want


def test_reference_placement_refuses_non_resnets():
    timm = pytest.importorskip("timm")
    model = nn.Module()
    model.encoder = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16)
    with pytest.raises(ValueError, match="lora_placement=all_blocks"):
        L.add_lora(model, target_modules=L.VIT_TARGETS, placement="reference")


# zero_init_last=False: timm zeroes each block's last BN scale at random init, which would cut the LoRA
# convs of the residual branch (all a reference placement adapts) off the loss.
@pytest.mark.parametrize("name,targets,kwargs", [("resnet18", "resnet", {"zero_init_last": False}),
                                                  ("vit_tiny_patch16_224", "vit", {"img_size": 16})])
def test_one_step_on_timm_backbones(name, targets, kwargs):
    """The method is not tied to the tiny net: one step on a timm ResNet (BN) and a timm ViT (LayerNorm)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    encoder = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    backbone = TinyClassifier()
    backbone.encoder = encoder
    backbone.head = nn.Linear(encoder.num_features, 4)
    cfg = AutoLoRaConfig(target_modules=targets, train_attack_steps=1, batch_size=4, weight_decay=0.0,
                         lora_placement="reference" if targets == "resnet" else "all_blocks")
    method = AutoLoRa(cfg, backbone, 4)
    engine = PlainEngine(method.model, method.make_optimizer())
    before = step_with(method, engine, lambda1=0.5, lambda2=1.0)
    assert moved(before, method.model, is_lora) and moved(before, method.model, lambda n: "base_layer" in n)


# --- branches -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_main_branch_equals_backbone_and_branches_agree_at_init(form):
    method, _, original = make(form)
    x, _ = data()
    method.model.eval()
    original.eval()
    with torch.no_grad():
        main = method.eval_model()(x)
        with method.lora_branch():
            lora_out = method.model(x)
        assert torch.allclose(main, original(x), atol=1e-6)
        assert torch.allclose(lora_out, main, atol=1e-6)  # B = 0 at init
        perturb_lora(method)
        assert torch.allclose(method.eval_model()(x), original(x), atol=1e-6)  # W alone, whatever BA is
        with method.lora_branch():
            assert not torch.allclose(method.model(x), original(x), atol=1e-5)
    assert not L.adapters_enabled(method.model)  # the resting state is the main branch
    assert all(p.requires_grad for p in method.model.parameters())  # toggling leaves flags as found


@pytest.mark.parametrize("form", FORMS)
def test_reference_forward_matches_delta_weight(form):
    """The LoRA branch of a conv is conv(x, W + ΔW) with ΔW from get_delta_weight (merge agrees)."""
    method, _, _ = make(form)
    perturb_lora(method)
    layer = L.lora_layers(method.model)[0]
    x = torch.rand(2, 8, 8, 8)
    with method.lora_branch(), torch.no_grad():
        out = layer(x)
        base = layer.get_base_layer()
        want = F.conv2d(x, base.weight + layer.get_delta_weight("default"), None, base.stride, base.padding)
    assert torch.allclose(out, want, atol=1e-5)


# --- gradient routing -----------------------------------------------------------------------------------
def step_with(method, engine, lambda1, lambda2):
    method.lambda1, method.lambda2 = lambda1, lambda2
    x, y = data(method.cfg.batch_size)
    before = snapshot(method.model)
    logs = method.train_step(engine, (x, y), TrainContext(steps_per_epoch=1))
    assert all(math.isfinite(v) for v in logs.values())
    return before


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("form", FORMS)
def test_natural_term_trains_only_lora_and_head(form, placement):
    method, engine, _ = make(form, lora_placement=placement)
    before = step_with(method, engine, lambda1=1.0, lambda2=0.0)
    m = method.model
    assert moved(before, m, is_lora)  # B moves (A's gradient is 0 while B = 0)
    assert moved(before, m, is_head)
    assert not moved(before, m, lambda n: not is_lora(n) and not is_head(n))  # base convs, stem, BN affine
    # a second step: now B != 0, so A moves too
    before = step_with(method, engine, lambda1=1.0, lambda2=0.0)
    assert {n.split(".lora_")[1][0] for n in moved(before, m, is_lora)} == {"A", "B"}
    assert not moved(before, m, lambda n: not is_lora(n) and not is_head(n))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("form", FORMS)
def test_adversarial_term_leaves_lora_unchanged(form, placement):
    method, engine, _ = make(form, lora_placement=placement)
    perturb_lora(method)
    before = step_with(method, engine, lambda1=0.0, lambda2=0.0)
    m = method.model
    assert not moved(before, m, is_lora)
    base_moved = moved(before, m, lambda n: not is_lora(n) and not is_head(n))
    assert any("bn" in n for n in base_moved)  # BN affine learns from the adversarial term
    assert any(n.startswith("encoder.conv1") for n in base_moved)  # stem too
    assert any("base_layer" in n for n in base_moved)  # the adapted convs' W
    assert moved(before, m, is_head)


@pytest.mark.parametrize("form", FORMS)
def test_kl_term_reaches_both_branches(form):
    """Gradients of the KL alone: LoRA (through the natural logits) and W/BN (through the adversarial)."""
    method, engine, _ = make(form)
    perturb_lora(method)
    m = method.model
    x, y = data()
    m.train()
    method._route_natural()
    with method.lora_branch():
        nat = m(x)
    method._route_adversarial()
    adv = m(x + 0.03)
    method._route_all()
    kl_term(adv, nat, 8).backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if is_lora(n))
    assert all(grads[n] is not None for n in grads if "base_layer" in n or "bn" in n)


# --- λ --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("acc,lambda2_max,want", [(0.0, 6.0, (1.0, 0.0)), (1.0, 6.0, (0.0, 6.0)),
                                                  (0.25, 6.0, (0.75, 1.5)), (0.9, 4.0, (0.1, 3.6))])
def test_lambdas(acc, lambda2_max, want):
    assert lambdas(acc, lambda2_max) == pytest.approx(want)


def test_lambdas_from_the_lora_branch_clean_accuracy():
    method, _, _ = make("reference")
    perturb_lora(method)
    batches = [data(8, s) for s in range(3)]
    method.model.train()
    with torch.no_grad(), method.lora_branch():
        method.model.eval()
        correct = sum((method.model(x).argmax(1) == y).sum().item() for x, y in batches)
    method.model.train()
    acc = correct / 24
    ctx = TrainContext(epoch=0, steps_per_epoch=3, augmented_train_batches=lambda: iter(batches))
    logs = method.start_epoch(ctx)
    assert logs["lora_train_acc"] == pytest.approx(acc)
    assert (method.lambda1, method.lambda2) == pytest.approx((1 - acc, 6 * acc))
    assert method.model.training  # eval mode only during the measurement


def test_lambda_updates_per_epoch():
    method, engine, _ = make("reference", lambda_updates_per_epoch=4, lambda_data="train_clean")
    calls = []
    batches = [data(8, s) for s in range(2)]

    def train_batches():
        calls.append(1)
        return iter(batches)

    ctx = TrainContext(epoch=0, steps_per_epoch=8, train_batches=train_batches)
    method.start_epoch(ctx)
    for step in range(8):
        ctx.step = step
        method.train_step(engine, data(), ctx)
    assert len(calls) == 4  # start + steps 2, 4, 6
    assert [r["step"] for r in method.lambda_log] == [0, 2, 4, 6]


def _counting(batches, calls, name):
    def source():
        calls.append(name)
        return iter(batches)

    return source


@pytest.mark.parametrize("lambda_data,source", [("train_augmented", "augmented"), ("train_clean", "clean")])
def test_lambda_data_source(lambda_data, source):
    """λ is measured on the loader lambda_data names: the augmented training loader (the authors') or clean."""
    method, _, _ = make("reference", lambda_data=lambda_data)
    perturb_lora(method)
    calls = []
    aug, clean = [data(8, 0)], [data(8, 1)]
    ctx = TrainContext(epoch=0, steps_per_epoch=1, augmented_train_batches=_counting(aug, calls, "augmented"),
                       train_batches=_counting(clean, calls, "clean"))
    method.start_epoch(ctx)
    want = method.lora_branch_accuracy(aug if source == "augmented" else clean)
    assert calls == [source] and method.lambda_log[-1]["lora_train_acc"] == pytest.approx(want)
    with pytest.raises(ValueError, match="augmented_train_batches" if source == "augmented" else "train_batches"):
        other, _, _ = make("reference", lambda_data=lambda_data)
        other.start_epoch(TrainContext(epoch=0, steps_per_epoch=1))


def test_lambda_measured_after_validation_before_reload():
    """As the authors' code: before epoch 1, then at each epoch's end after validation on the weights the
    epoch ended with (the bench reloads the best checkpoint only after end_epoch returns); not again at the
    next epoch's start, and not after the last epoch."""
    method, _, _ = make("reference", epochs=5, lr=0.01)
    calls = []
    batches = [data(8, s) for s in range(2)]
    for epoch, v in enumerate([0.5, 0.4, 0.45, 0.44, 0.43]):  # halves and asks for a reload after epoch 5
        ctx = TrainContext(epoch=epoch, steps_per_epoch=1, augmented_train_batches=_counting(batches, calls, "aug"))
        method.start_epoch(ctx)
        perturb_lora(method)  # "training" changes the LoRA branch during the epoch
        acc_now = method.lora_branch_accuracy(batches)
        d = method.end_epoch(epoch, {"val_clean_acc": 0.9, "val_pgd_acc": v})
        if epoch < 4:
            assert method.lambda_log[-1]["lora_train_acc"] == pytest.approx(acc_now)
            assert method.lambda_log[-1]["when"] == "after_validation" and method.lambda_epoch == epoch + 1
    assert d.reload_best
    assert len(calls) == 5  # before epoch 1 + after epochs 1-4
    assert [r["epoch"] for r in method.lambda_log] == [0, 1, 2, 3, 4]
    assert [r["lambda1"] for r in method.epoch_log] == [r["lambda1"] for r in method.lambda_log]
    # a resumed method (state from the 'last' checkpoint) keeps the λ measured for its next epoch
    other, _, _ = make("reference", epochs=6)
    state = method.state_dict()
    state["lambda_epoch"] = 5
    other.load_state_dict(json.loads(json.dumps(state)))
    other.start_epoch(TrainContext(epoch=5, steps_per_epoch=1,
                                   augmented_train_batches=_counting(batches, calls, "aug")))
    assert len(calls) == 5 and other.lambda1 == method.lambda1


# --- KL -------------------------------------------------------------------------------------------------
def test_kl_value_by_hand():
    adv = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)  # log_softmax: log 0.5 each
    nat = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64,
                       requires_grad=True)  # softmax (.75, .25), (.5, .5)
    # sum over the batch of KL(p_nat || p_adv) = .75 ln 1.5 + .25 ln .5 + 0, divided by the configured batch 4
    want = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 4
    got = kl_term(adv, nat, batch_size=4)
    assert got.item() == pytest.approx(want, rel=1e-12)  # float64: the formula, exactly
    # float32, as training runs it: the two terms cancel to 0.13 of their size, so each rounding of the
    # logs weighs ~8x; measured 7.8e-7 relative off (7 ulps), which rel=1e-6 would only just have passed
    assert kl_term(adv.float(), nat.detach().float(), batch_size=4).item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert nat.grad is not None and nat.grad.abs().sum() > 0  # the natural target is not detached


# --- learning-rate rule ---------------------------------------------------------------------------------
def run_curve(values, **kw):
    s = AutoLRSchedule(**kw)
    return s, [s.step(v) for v in values]


@pytest.mark.parametrize("curve,halved_at", [
    ([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], []),  # rising: nothing
    ([0.5, 0.4, 0.45, 0.44, 0.43], [5]),  # 1 rise of 4 < 0.75*4: halve at the first checkpoint
    ([0.1, 0.2, 0.3, 0.25, 0.35], []),  # 3 rises of 4 = 0.75*4: keep
    # enough rises but the best (epoch 1) has not moved since the previous checkpoint: stalled at 9
    ([0.9, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], [9]),
])
def test_lr_rule_halves(curve, halved_at):
    s, decisions = run_curve(curve)
    got = [i + 1 for i, d in enumerate(decisions) if d.reload_best]
    assert got == halved_at
    assert s.lr == pytest.approx(0.01 / 2 ** len(halved_at))
    assert not any(d.stop for d in decisions)


def test_lr_rule_reload_and_best():
    s, d = run_curve([0.5, 0.4, 0.45, 0.44, 0.43])
    assert [x.is_best for x in d] == [True, False, False, False, False]
    assert d[-1].reload_best and s.best_epoch == 1 and s.events[-1]["reason"] == "few_rises"


def test_lr_rule_stops_below_lr_min():
    s, d = run_curve([0.5] * 60)  # flat: halves at every checkpoint 5, 9, ..., 41
    stops = [i + 1 for i, x in enumerate(d) if x.stop]
    assert stops[0] == 41  # 0.01 / 2**10 < 1e-5
    assert s.lr == pytest.approx(0.01 / 2 ** 14)  # it would go on if the trial did not stop
    s, d = run_curve([0.5] * 13, lr0=4e-5)
    assert [x.stop for x in d] == [False] * 12 + [True]  # 2e-5 at 5, 1e-5 at 9 (not < 1e-5), 5e-6 at 13


def test_lr_stall_rule_paper_vs_reference():
    # halved at 5 (few rises); then 4 rises, none above the best of epoch 1
    curve = [0.9, 0.5, 0.4, 0.3, 0.2, 0.3, 0.4, 0.5, 0.6]
    paper, dp = run_curve(curve, stall_rule="paper")
    ref, dr = run_curve(curve, stall_rule="reference")
    assert [i + 1 for i, x in enumerate(dp) if x.reload_best] == [5]  # η was just halved: give it a window
    assert [i + 1 for i, x in enumerate(dr) if x.reload_best] == [5, 9]  # the authors' code halves again


def test_schedule_state_roundtrip():
    s, _ = run_curve([0.5, 0.4, 0.45, 0.44, 0.43, 0.5])
    t = AutoLRSchedule()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t.state_dict() == s.state_dict()


def test_end_epoch_sets_lr_and_records_trajectories():
    method, engine, _ = make("reference", lr=0.01)
    batches = [data(8, 0)]
    for epoch, v in enumerate([0.5, 0.4, 0.45, 0.44, 0.43]):
        method.start_epoch(TrainContext(epoch=epoch, steps_per_epoch=1,
                                        augmented_train_batches=lambda: iter(batches)))
        d = method.end_epoch(epoch, {"val_clean_acc": 0.9, "val_pgd_acc": v})
    assert d.reload_best and method.current_lr() == pytest.approx(0.005)
    summary = json.loads(json.dumps(method.summary()))
    assert summary["lr"] == [0.01] * 5 and len(summary["lambda1"]) == len(summary["lambda2"]) == 5
    assert summary["selected_epoch"] == 0 and summary["val_pgd_acc"] == [0.5, 0.4, 0.45, 0.44, 0.43]
    other, _, _ = make("reference", lr=0.01)
    other.load_state_dict(json.loads(json.dumps(method.state_dict())))
    assert other.current_lr() == pytest.approx(0.005) and other.summary() == method.summary()


# --- through the DeepSpeed engine (one process, own interpreter: it sets up torch.distributed) -------------
DS_SCRIPT = r"""
import copy, sys, torch
sys.path.insert(0, %(tests)r)
from test_autolora import TinyClassifier, PlainEngine, data, perturb_lora
from methods.autolora import AutoLoRa, AutoLoRaConfig
from methods.base import TrainContext
from bench.engine import build_engine

def run(stage, lambda1, lambda2):
    torch.manual_seed(0)
    cfg = AutoLoRaConfig(weight_decay=0.0, train_attack_steps=2, batch_size=8, lr=0.1, zero_stage=stage,
                         lora_placement=%(placement)r)
    m = AutoLoRa(cfg, TinyClassifier(), 4)
    perturb_lora(m)
    opt = m.make_optimizer()
    engine = PlainEngine(m.model, opt) if stage is None else build_engine(m.model, opt, cfg)
    m.lambda1, m.lambda2 = lambda1, lambda2
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    for seed in range(2):
        torch.manual_seed(seed)
        m.train_step(engine, data(), TrainContext(steps_per_epoch=2))
    return before, {n: p.detach().clone() for n, p in m.model.named_parameters()}

for stage in (0, 2):
    for l1, l2 in ((1.0, 0.0), (0.0, 0.0), (0.4, 3.0)):
        b0, plain = run(None, l1, l2)
        b1, ds = run(stage, l1, l2)
        diff = max((plain[n] - ds[n]).abs().max().item() for n in plain)
        lora_moved = any(not torch.equal(b1[n], ds[n]) for n in ds if ".lora_" in n)
        base_moved = any(not torch.equal(b1[n], ds[n]) for n in ds if ".lora_" not in n and not n.startswith("head."))
        print("RESULT", stage, l1, l2, diff, lora_moved, base_moved)
"""


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_deepspeed_engine_matches_plain_step(tmp_path, placement):
    """ZeRO 0 and 2: two AutoLoRa steps through DeepSpeed give the plain-PyTorch weights, and the routing
    holds (natural term only: base unchanged; adversarial term only: LoRA unchanged), under either placement."""
    env = _env(tmp_path)
    script = DS_SCRIPT % {"tests": str(Path(__file__).parent), "placement": placement}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("RESULT")]
    assert len(rows) == 6
    for stage, l1, l2, diff, lora_moved, base_moved in rows:
        assert float(diff) < 1e-5, (stage, l1, l2, diff)
        if (l1, l2) == ("1.0", "0.0"):
            assert lora_moved == "True" and base_moved == "False"
        if (l1, l2) == ("0.0", "0.0"):
            assert lora_moved == "False" and base_moved == "True"
        if (l1, l2) == ("0.4", "3.0"):
            assert lora_moved == "True" and base_moved == "True"


# --- end to end through `bench run` ---------------------------------------------------------------------
def _env(tmp_path):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _ensure_digits(env):
    subprocess.run([sys.executable, "-m", "bench", "shards", "make", "digits"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True)


RUN_ARGS = ["--method", "autolora", "--dataset", "digits", "--backbone", "cifar_resnet18_aa",
            "--set", "epochs=1", "--set", "max_train_samples=64", "--set", "n_eval=32",
            "--set", "autoattack_version=off", "--set", "n_val=32", "--set", "train_attack_steps=2",
            "--set", "val_pgd_steps=2", "--set", "eval_pgd_steps=2", "--set", "batch_size=32"]


def _check_result(out):
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "ok" and result["method"] == "autolora"
    s = result["method_summary"]
    assert len(s["lambda1"]) == len(s["lambda2"]) == len(s["lr"]) == 1
    assert s["lr"] == [0.01] and 0.0 <= s["lambda1"][0] <= 1.0
    assert s["lambda2"][0] == pytest.approx(6 * (1 - s["lambda1"][0]))
    assert s["selected_epoch"] == 0
    # the reference placement: the two convs of the last block of each of the 4 stages
    assert s["params"]["lora_targets"] == 8 and s["params"]["lora"] == s["params"]["lora_reference_form"]
    assert s["lora_placement"] == "reference" and s["lambda_data"] == "train_augmented"
    assert [m["when"] for m in s["lambda_measurements"]] == ["start"]
    assert 0.0 <= result["metrics"]["clean_acc"] <= 1.0 and 0.0 <= result["metrics"]["pgd_acc"] <= 1.0
    return result


def test_bench_run_end_to_end(tmp_path):
    env = _env(tmp_path)
    _ensure_digits(env)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "bench", "run", *RUN_ARGS, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    _check_result(out)


# The reader caps the split, then splits its shards between ranks: each rank must get the same number of
# batches, so the run takes exactly two full digits shards (500 samples each: max_train_samples=1000).
# With fewer shards than ranks, or unequal shares, a rank runs out of batches first and DeepSpeed's
# gradient all-reduce on the other rank fails ("Connection closed by peer").
ZERO2_ARGS = ["--method", "autolora", "--dataset", "digits", "--backbone", "cifar_resnet18_aa",
              "--set", "epochs=1", "--set", "max_train_samples=1000", "--set", "batch_size=64",
              "--set", "n_eval=32", "--set", "n_val=32", "--set", "autoattack_version=off",
              "--set", "train_attack_steps=1", "--set", "val_pgd_steps=1", "--set", "eval_pgd_steps=1",
              "--set", "zero_stage=2", "--no-progress"]


@pytest.mark.slow
def test_bench_run_zero2_two_processes(tmp_path):
    env = _env(tmp_path)
    _ensure_digits(env)
    out = tmp_path / "run_zero2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "bench", "run", *ZERO2_ARGS, "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    result = _check_result(out)
    assert result["config"]["zero_stage"] == 2


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
