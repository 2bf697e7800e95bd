"""TWINS (two-wing BN) and the Vanilla RFT schedule, as the TWINS authors' scripts run them (fast, CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.backbones import create_backbone
from bench.engine import PlainEngine
from methods import get_method
from methods.baselines import RFTConfig, step_lr
from methods.base import TrainContext
from methods.twins import TWINS, TWINSConfig, TwoWingBatchNorm2d, two_wing_layers, wing


def make(**overrides):
    torch.manual_seed(0)
    backbone = create_backbone("tiny_cnn", 4)
    with torch.no_grad():  # "pre-trained" statistics and affine that differ from a fresh BN's
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    original = copy.deepcopy(backbone)
    kw = dict(train_attack_steps=2, batch_size=8, lr=0.05, weight_decay=0.0)
    kw.update(overrides)
    cfg = TWINSConfig(**kw)
    cfg.validate()
    method = TWINS(cfg, backbone, 4)
    return method, PlainEngine(method.model, method.make_optimizer()), original


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)


def buffers(model, name):
    return {n: b.detach().clone() for n, b in model.named_buffers() if n.endswith(name)}


def test_registered_with_the_authors_defaults():
    assert get_method("twins") is TWINS
    cfg = TWINSConfig()
    want = dict(twins_lambda=1.0, twins_batch="halves", twins_frozen_affine="separate", lr=0.003,
                weight_decay=1e-5, epochs=60, train_attack_steps=10, eval_checkpoint="last", batch_size=128)
    assert {k: getattr(cfg, k) for k in want} == want


@pytest.mark.parametrize("field,value", [("twins_batch", "both"), ("twins_frozen_affine", "tied"),
                                         ("twins_lambda", -1.0), ("eval_checkpoint", "best")])
def test_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        TWINSConfig(**{field: value}).validate()


def test_every_bn_gets_two_wings_and_they_agree_at_init():
    method, _, original = make()
    assert method.n_two_wing == 7 == len(two_wing_layers(method.model))  # stem + 2 blocks x (bn1, bn2, shortcut)
    assert not any(type(m) is nn.BatchNorm2d for m in method.model.modules())
    x, _ = data()
    method.model.eval()
    original.eval()
    with torch.no_grad():
        adaptive = method.model(x)
        with wing(method.model, "frozen"):
            frozen = method.model(x)
    assert torch.allclose(adaptive, original(x), atol=1e-6) and torch.allclose(frozen, adaptive, atol=1e-6)
    # the adaptive wing keeps BN's state-dict keys, so checkpoints of the plain network load into it
    keys = set(method.model.state_dict())
    assert set(original.state_dict()) <= keys


@pytest.mark.parametrize("twins_batch", ["halves", "full"])
@pytest.mark.parametrize("frozen_affine", ["separate", "shared"])
def test_step_frozen_stats_stay_adaptive_stats_move_wings_differ(twins_batch, frozen_affine):
    method, engine, original = make(twins_batch=twins_batch, twins_frozen_affine=frozen_affine)
    frozen_before = {**buffers(method.model, "frozen_mean"), **buffers(method.model, "frozen_var")}
    running_before = {**buffers(method.model, "running_mean"), **buffers(method.model, "running_var")}
    params_before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    for seed in range(2):
        method.train_step(engine, data(seed=seed), TrainContext(steps_per_epoch=2))
    frozen_after = {**buffers(method.model, "frozen_mean"), **buffers(method.model, "frozen_var")}
    running_after = {**buffers(method.model, "running_mean"), **buffers(method.model, "running_var")}
    assert all(torch.equal(frozen_before[n], frozen_after[n]) for n in frozen_before)  # pre-trained, kept
    pre = {n: b for n, b in original.named_buffers() if n.endswith(("running_mean", "running_var"))}
    assert all(torch.equal(frozen_after[n.replace("running_", "frozen_")], b) for n, b in pre.items())
    assert all(not torch.equal(running_before[n], running_after[n]) for n in running_before)  # batch statistics
    moved = {n for n, p in method.model.named_parameters() if not torch.equal(params_before[n], p.detach())}
    assert any("conv" in n for n in moved) and "head.weight" in moved
    frozen_affine_params = {n for n, _ in method.model.named_parameters() if ".frozen_" in n}
    if frozen_affine == "separate":  # the authors': the frozen wing's own affine pair, trained
        assert frozen_affine_params and frozen_affine_params <= moved
    else:
        assert not frozen_affine_params
    x, _ = data(seed=5)
    method.model.eval()
    with torch.no_grad():
        adaptive = method.eval_model()(x)
        with wing(method.model, "frozen"):
            frozen = method.model(x)
    assert not torch.allclose(adaptive, frozen, atol=1e-4)
    assert all(m.wing == "adaptive" for m in two_wing_layers(method.model))  # the resting state


@pytest.mark.parametrize("twins_batch,twins_lambda", [("halves", 1.0), ("halves", 0.4), ("full", 0.4)])
def test_loss_is_lambda_frozen_plus_adaptive(twins_batch, twins_lambda):
    """loss = λ_twins·CE(frozen wing) + CE(adaptive wing); halves: the first half of the batch through the
    frozen wing, the second through the adaptive wing (batch statistics of that half alone)."""
    # eps=0: the attack returns its input, so both wings see the clean batch
    method, engine, _ = make(twins_batch=twins_batch, twins_lambda=twins_lambda, eps=0.0)
    twin = copy.deepcopy(method.model)
    x, y = data()
    logs = method.train_step(engine, (x, y), TrainContext(steps_per_epoch=1))
    twin.train()
    n = 4 if twins_batch == "halves" else 8
    with torch.no_grad():
        with wing(twin, "frozen"):
            frozen = F.cross_entropy(twin(x[:n]), y[:n])
        adaptive = F.cross_entropy(twin(x[-n:]), y[-n:])
    assert logs["loss_frozen"] == pytest.approx(frozen.item(), rel=1e-5)
    assert logs["loss_adaptive"] == pytest.approx(adaptive.item(), rel=1e-5)
    assert logs["train_loss"] == pytest.approx(twins_lambda * frozen.item() + adaptive.item(), rel=1e-5)


def test_frozen_wing_never_updates_in_train_mode():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
    two = TwoWingBatchNorm2d(bn).train()
    x = torch.randn(6, 3, 4, 4) * 2 + 1
    two.wing = "frozen"
    out = two(x)
    assert torch.equal(two.frozen_mean, torch.full((3,), 0.3)) and torch.equal(two.running_mean, bn.running_mean)
    want = (x - 0.3) / torch.sqrt(torch.ones(3).view(1, 3, 1, 1) + two.eps)
    assert torch.allclose(out, want, atol=1e-5)


# --- the Vanilla RFT schedule (TWINS scripts: MultiStepLR x0.1 at epochs 30 and 50 of 60) ----------------------
def torch_multistep(lr, milestones, epochs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("overrides", [
    dict(lr_milestone_epochs=[30, 50]),  # the paper preset names the epochs
    dict(),  # the default fractions 0.5, 0.83 of 60 epochs land on the same epochs
])
def test_rft_multistep_schedule(overrides):
    cfg = RFTConfig(epochs=60, lr=0.003, **overrides)
    got = [step_lr(cfg, e) for e in range(60)]
    assert got == pytest.approx(torch_multistep(0.003, [30, 50], 60))
    assert got[29] == pytest.approx(0.003) and got[30] == pytest.approx(3e-4) and got[50] == pytest.approx(3e-5)


@pytest.mark.parametrize("method_name", ["rft", "twins"])
def test_start_epoch_sets_the_scheduled_lr_and_last_epoch_is_evaluated(method_name):
    cls = get_method(method_name)
    cfg = cls.Config(epochs=6, lr=0.1, lr_milestone_epochs=[2, 4])
    method = cls(cfg, create_backbone("tiny_cnn", 4), 4)
    method.make_optimizer()
    lrs, decisions = [], []
    for epoch in range(6):
        lrs.append(method.start_epoch(TrainContext(epoch=epoch))["lr"])
        decisions.append(method.end_epoch(epoch, {"val_pgd_acc": 0.5 - 0.01 * epoch}))
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert not any(d.is_best for d in decisions)  # no selection: the bench evaluates the last epoch's model
    method = cls(cls.Config(eval_checkpoint="best_val"), create_backbone("tiny_cnn", 4), 4)
    method.make_optimizer()
    assert method.end_epoch(0, {"val_pgd_acc": 0.4}).is_best
