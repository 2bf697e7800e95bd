"""Robust accuracy counts a sample only if it is right clean and at every point the attack visited: robust
never exceeds clean, on a model where counting the last PGD iterate alone did (supervised and few-shot)."""
from __future__ import annotations

import torch
from torch import nn

from bench.config import resolve_config
from bench.evaluate import clean_flags, fp32_eval, metrics_from_flags, evaluate_flags, pgd_flags
from bench.fewshot import evaluate_fewshot
from methods.attacks import eval_mode, pgd_linf, pgd_linf_robust


class Deceptive(nn.Module):
    """Two logits ±g(m), m = mean(x): class 0 where g > 0. Below m = 0.5 the sample is wrong and the loss of
    class 0 rises with m, so PGD pushes it over 0.5, into a flat region (0.5-0.6) where it is right and stays;
    from 0.6 on the sample is right until 0.7 and PGD pushes it past 0.7, where it is wrong. Counting the
    last iterate alone, samples wrong just below 0.5 count as robust: above clean accuracy."""

    def __init__(self, classes: int = 2):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.classes = classes

    def forward(self, x):
        m = x.float().mean(dim=(1, 2, 3))
        g = torch.where(m < 0.5, -0.1 - m, torch.where(m < 0.6, torch.ones_like(m), 0.5 - 5 * (m - 0.6)))
        logits = torch.stack([g, -g], 1) * self.scale
        return torch.cat([logits, logits.new_full((len(x), self.classes - 2), -10.0)], 1)


def data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)  # images of one grey level each, spread over 0.4-0.65
    level = torch.rand(n, 1, 1, 1, generator=g) * 0.25 + 0.4
    return (level + 0.01 * torch.rand(n, 3, 4, 4, generator=g)).clamp(0, 1), torch.zeros(n, dtype=torch.long)


def last_iterate_count(model, x, y, **kw) -> float:  # the former count: the last iterate alone
    with eval_mode(model):
        x_adv = pgd_linf(model, x, y, random_start=False, **kw)
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).float().mean().item()


ATTACK = dict(eps=0.1, step_size=0.06, steps=3)


def test_last_iterate_count_exceeded_clean_and_the_flags_do_not():
    model, (x, y) = Deceptive(), data()
    clean = clean_flags(model, x, y)
    assert 0.2 < clean.float().mean() < 0.8
    assert last_iterate_count(model, x, y, **ATTACK) > clean.float().mean().item() + 0.05  # the bug, reproduced
    robust = pgd_flags(model, x, y, **ATTACK)
    assert not (robust & ~clean).any()  # robust implies clean, per sample
    assert robust.float().mean() <= clean.float().mean()
    # and the attack does break samples that are right clean
    assert robust.sum() < clean.sum()


def test_best_iterate_keeps_the_first_misclassified_point():
    model, (x, y) = Deceptive(), data(64)
    with eval_mode(model):
        x_adv, robust = pgd_linf_robust(model, x, y, **ATTACK)
        with torch.no_grad():
            fooled = model(x_adv).argmax(1) != y
    assert torch.equal(fooled, ~robust)  # every non-robust sample comes with an input that fools the model
    assert (x_adv - x).abs().max() <= ATTACK["eps"] + 1e-6


def test_restarts_only_remove_robust_samples():
    model, (x, y) = Deceptive(), data(128, seed=1)
    one = pgd_flags(model, x, y, **ATTACK, restarts=1)
    three = pgd_flags(model, x, y, **ATTACK, restarts=3, seed=5)
    assert not (three & ~one).any()
    assert torch.equal(three, pgd_flags(model, x, y, **ATTACK, restarts=3, seed=5))  # seeded: repeats


def test_restart_draws_depend_on_sample_index_not_on_batching():
    model, (x, y) = Deceptive(), data(96, seed=2)
    whole = pgd_flags(model, x, y, **ATTACK, restarts=2, seed=3, batch_size=32)
    halves = torch.cat([pgd_flags(model, x[:64], y[:64], **ATTACK, restarts=2, seed=3, batch_size=32)])
    assert torch.equal(whole[:64], halves)


def test_metrics_robust_acc_is_the_conjunction_of_every_attack():
    cfg = resolve_config("ft", {"allow_large_eps": True, "eps": 0.1, "eval_pgd_steps": 3, "eval_step_size": 0.06, "autoattack_version": "off"})
    flags = {"clean": torch.tensor([1, 1, 1, 0], dtype=torch.bool), "pgd": torch.tensor([1, 0, 1, 0], dtype=torch.bool),
             "autoattack": torch.tensor([1, 1, 0, 0], dtype=torch.bool)}
    cfg.autoattack_version = "apgd-ce"
    m = metrics_from_flags(flags, cfg)
    assert (m["clean_acc"], m["pgd_acc"], m["autoattack_acc"], m["robust_acc"]) == (0.75, 0.5, 0.5, 0.25)
    assert m["robust_attack"] == "AutoAttack apgd-ce" and m["pgd_step_size"] == 0.06 and m["pgd_restarts"] == 1


def test_supervised_metrics_never_show_robust_above_clean():
    cfg = resolve_config("ft", {"allow_large_eps": True, "eps": 0.1, "eval_pgd_steps": 3, "eval_step_size": 0.06, "autoattack_version": "apgd-ce"})
    model, (x, y) = Deceptive(classes=10), data(64, seed=3)
    m = metrics_from_flags(evaluate_flags(model, x, y, cfg, progress=False), cfg)
    assert m["pgd_acc"] <= m["clean_acc"] and m["autoattack_acc"] <= m["clean_acc"]
    assert m["robust_acc"] <= min(m["pgd_acc"], m["autoattack_acc"])


def test_eval_step_defaults_to_a_quarter_of_eps():
    cfg = resolve_config("ft", {"eps": 8 / 255})
    m = metrics_from_flags({"clean": torch.ones(2, dtype=torch.bool), "pgd": torch.ones(2, dtype=torch.bool)}, cfg)
    assert m["pgd_step_size"] == 2 / 255 and m["robust_attack"] == f"PGD-{cfg.eval_pgd_steps}"


class PeriodicEpisodes:
    """A few-shot 'method' whose classifier is the deceptive model over ``ways`` classes."""

    ways, shots = 2, 1

    def __init__(self):
        self.model = Deceptive()

    def episode_classifier(self, sx, sy, **_):
        return self.model

    def sample(self, i):
        x, y = data(32, seed=100 + i)
        return x[:2], torch.tensor([0, 1]), x, y


def test_fewshot_adversarial_accuracy_never_exceeds_clean_per_episode():
    cfg = resolve_config("pmf", {"allow_large_eps": True, "eps": 0.1, "eval_pgd_steps": 3, "eval_step_size": 0.06, "test_time_ft_steps": 0})
    method = PeriodicEpisodes()
    out = evaluate_fewshot(method, method, 6, cfg, attack=True, progress=False)
    assert out["adv_acc"] <= out["clean_acc"] and out["robust_acc"] <= out["adv_acc"]
    assert out["robust_attack"] == "PGD-3"
    # the former per-episode count exceeded clean on this model
    old = sum(last_iterate_count(method.model, *method.sample(i)[2:], **ATTACK) for i in range(6)) / 6
    assert old > out["clean_acc"]


def test_fp32_eval_evaluates_bf16_weights_in_fp32_and_restores_them():
    model = nn.Sequential(nn.Linear(4, 3)).to(torch.bfloat16)
    before = [p for p in model.parameters()]
    data_before = [p.data for p in before]
    ptrs = [p.data_ptr() for p in before]
    with fp32_eval(model):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        torch.testing.assert_close(model[0].weight, data_before[0].float())
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # the very storage back (DeepSpeed's views)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
