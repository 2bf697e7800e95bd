"""Checkpoint selection: the selection metric, ties broken by validation clean accuracy, then the later epoch."""
from __future__ import annotations

import pytest
import torch

from methods.autolora import AutoLRSchedule
from methods.base import BaseConfig, Method, selection_key

CASES = [
    # (val_pgd_acc per epoch, val_clean_acc per epoch, selected epoch)
    pytest.param([0.0] * 4, [0.10, 0.30, 0.49, 0.45], 2, id="robust-ties-best-clean"),
    pytest.param([0.0] * 4, [0.2] * 4, 3, id="full-ties-later-epoch"),
    pytest.param([0.0, 0.0, 0.0, 0.0], [0.1, 0.4, 0.4, 0.3], 2, id="clean-tie-later-of-the-tied"),
    pytest.param([0.1, 0.3, 0.2, 0.3], [0.9, 0.5, 0.9, 0.4], 1, id="metric-first"),
    pytest.param([0.1, 0.3, 0.2, 0.3], [0.9, 0.5, 0.9, 0.6], 3, id="metric-tie-clean-decides"),
]


def selected_by_base(pgd, clean):
    method = Method(BaseConfig(select_metric="val_pgd_acc"), torch.nn.Linear(2, 2), num_classes=2)
    method.make_optimizer()
    selected = None
    for epoch, (p, c) in enumerate(zip(pgd, clean)):
        if method.end_epoch(epoch, {"val_clean_acc": c, "val_pgd_acc": p}).is_best:
            selected = epoch
    return selected


def selected_by_autolora_schedule(pgd, clean):
    schedule = AutoLRSchedule(every=100)  # no η checkpoint inside the history: selection alone
    selected = None
    for epoch, (p, c) in enumerate(zip(pgd, clean)):
        if schedule.step(p, tiebreak=c).is_best:
            selected = epoch
    assert schedule.best_epoch == selected + 1  # the schedule numbers epochs from 1
    return selected


@pytest.mark.parametrize("select", [selected_by_base, selected_by_autolora_schedule])
@pytest.mark.parametrize("pgd,clean,want", CASES)
def test_selection_breaks_ties_by_clean_then_later_epoch(select, pgd, clean, want):
    assert select(pgd, clean) == want


def test_selection_key_of_fewshot_and_missing_metric():
    assert selection_key({"val_fewshot_acc": 0.4, "val_fewshot_pgd_acc": 0.0}, "val_fewshot_pgd_acc") == (0.0, 0.4)
    assert selection_key({"val_clean_acc": 0.4}, "val_pgd_acc") is None


def test_selection_state_survives_a_restart():
    method = Method(BaseConfig(select_metric="val_pgd_acc"), torch.nn.Linear(2, 2), num_classes=2)
    method.make_optimizer()
    method.end_epoch(0, {"val_clean_acc": 0.5, "val_pgd_acc": 0.0})
    resumed = Method(BaseConfig(select_metric="val_pgd_acc"), torch.nn.Linear(2, 2), num_classes=2)
    resumed.make_optimizer()
    resumed.load_state_dict(method.state_dict())
    assert not resumed.end_epoch(1, {"val_clean_acc": 0.4, "val_pgd_acc": 0.0}).is_best  # worse clean
    assert resumed.end_epoch(2, {"val_clean_acc": 0.5, "val_pgd_acc": 0.0}).is_best  # full tie: later
