"""The AutoLoRa paper preset (tune_spaces/paper_autolora.yaml) and the sweep files' per_dataset settings."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bench.config import resolve_config
from bench.sweep.space import SweepError, load_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "tune_spaces" / "paper_autolora.yaml"
DATASETS = ["cifar10", "cifar100", "dtd", "dogs", "cub200", "caltech256"]


def resolved(spec, method, dataset):
    return resolve_config(method, spec.overrides(method, 0, {"dataset": dataset}))


def test_paper_preset_has_every_trial():
    spec = load_sweep(PAPER)
    assert spec.methods == ["rft", "twins", "autolora"] and spec.seeds == [0, 1, 2]
    assert spec.datasets() == DATASETS and spec.n_trials() == 3 * 6 * 3


SHARED = dict(epochs=60, batch_size=128, eps=8 / 255, train_attack_steps=10, train_step_size=2 / 255,
              eval_pgd_steps=10, val_pgd_steps=10, autoattack_version="standard", n_eval=None)
CIFAR = dict(transform="cifar", input_resize=224)
HIRES = dict(transform="imagenet224", input_resize=None)
TWINS_SCRIPTS = dict(lr=0.003, lr_milestone_epochs=[30, 50], lr_decay=0.1, eval_checkpoint="last")
AUTOLORA = dict(lr=0.01, weight_decay=1e-4, lora_placement="reference", lora_form="reference", r_nat=8,
                lambda_data="train_augmented", lr_stall_rule="reference", lr_checkpoint_every=4, rho=0.75)


@pytest.mark.parametrize("method,dataset,want", [
    ("rft", "cifar10", {**CIFAR, **TWINS_SCRIPTS, "weight_decay": 1e-5}),
    ("rft", "cifar100", {**CIFAR, **TWINS_SCRIPTS, "weight_decay": 1e-5}),
    ("rft", "caltech256", {**HIRES, **TWINS_SCRIPTS, "weight_decay": 1e-3}),
    ("twins", "cifar10", {**CIFAR, **TWINS_SCRIPTS, "weight_decay": 1e-5, "twins_lambda": 1.0,
                          "twins_batch": "halves", "twins_frozen_affine": "separate"}),
    ("twins", "dtd", {**HIRES, **TWINS_SCRIPTS, "weight_decay": 1e-3, "twins_lambda": 0.4}),
    ("twins", "cub200", {**HIRES, "weight_decay": 1e-3, "twins_lambda": 0.4}),
    ("autolora", "cifar100", {**CIFAR, **AUTOLORA}),
    ("autolora", "dogs", {**HIRES, **AUTOLORA}),
])
def test_paper_preset_settings(method, dataset, want):
    cfg = resolved(load_sweep(PAPER), method, dataset)
    got = {k: getattr(cfg, k) for k in {**SHARED, **want}}
    assert got == {**SHARED, **want}  # the same arithmetic (8/255 parsed as 8.0/255.0): exact


def test_every_paper_trial_resolves_with_its_own_data_set_settings():
    """No data set's settings leak into another's trials, on the sweep's side or the trial's."""
    from bench.sweep.trainables import _trial_setup

    spec = load_sweep(PAPER)
    ctx = {"results": "/tmp/unused", "name": spec.name, "space_keys": sorted(spec.space),
           "metrics": {m: spec.metric_for(m) for m in spec.methods},
           "spec_fixed": {m: spec.overrides(m, 0, {}, per_dataset=False) for m in spec.methods},
           "per_dataset": {m: {d: spec.dataset_overrides(m, d) for d in spec.per_dataset} for m in spec.methods}}
    for method in spec.methods:
        for dataset in spec.datasets():
            for seed in spec.seeds:
                cfg, _, _, _ = _trial_setup({"method": method, "seed": seed, "dataset": dataset}, ctx, "t")
                assert cfg.dataset == dataset and cfg.seed == seed
                assert cfg.input_resize == (224 if dataset.startswith("cifar") else None)
                assert cfg.to_dict() == resolve_config(method, spec.overrides(method, seed, {"dataset": dataset})
                                                       ).to_dict()


@pytest.mark.parametrize("text,where", [
    ("per_dataset: {digits: {nope: 1}}", "per_dataset.digits.nope"),
    ("per_dataset: {digits: {rft: {twins_lambda: 1.0}}}", "per_dataset.digits.rft.twins_lambda"),
    ("per_dataset: {digits: 3}", "per_dataset.digits"),
    ("per_dataset: {digits: {rft: 3}}", "per_dataset.digits.rft"),
    ("per_dataset: {digits: {dataset: dtd}}", "per_dataset: dataset"),
    ("per_dataset: {digits: {eps: 2.0}}", "method rft"),
])
def test_per_dataset_errors_are_one_line(tmp_path, text, where):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(f"""\
        methods: [rft, ft]
        dataset: digits
        {text}
        """))
    with pytest.raises(SweepError) as e:
        load_sweep(path)
    assert where in str(e.value) and len(str(e.value).splitlines()) == 1
