"""The contract every registered method keeps, checked for each name in ``methods.list_methods()``: a new
method is covered by adding its module.

1. One training step moves the parameters the method trains (every parameter in its optimizer) and no other:
   frozen parameters (``requires_grad=False``) stay as they were.
2. The method's state survives the checkpoint round trip a trial makes (``save_checkpoint`` of weights,
   optimizer and ``method.state_dict()`` as JSON; ``load_latest`` into a freshly built method with other
   initial weights): the state comes back equal, and the next epoch's step gives bit-identical parameters.
3. A trial stopped after epoch 0 (an exception from the epoch callback, as tests/test_resume.py stops its
   cases) and run again resumes from that epoch's checkpoint and ends as one that ran straight through:
   the same result.json (timings aside) and the same final weights, exactly.

Cheap on purpose: tiny_cnn at 16 pixels, a few images or 2-way episodes, 1-step attacks; checks 1-2 use
bench's PlainEngine (the checkpoint interface of DeepSpeed's), check 3 the real path, ``run_trial`` under
DeepSpeed in this process. Budgets a method's config lacks are skipped (the tables apply what fits), so a
new method needs no entry here unless its defaults are expensive.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from bench.backbones import create_backbone
from bench.config import config_fields, resolve_config
from bench.engine import (LATEST, PlainEngine, _deepspeed_safe_globals, epoch_tag, load_latest,
                          save_checkpoint)
from bench.trial import epoch_seed, run_trial, seed_everything
from data_shards.episodes import EpisodeSampler
from data_shards.reader import load_split
from methods import get_method, list_methods
from methods.base import Episode, TrainContext

METHODS = list_methods()
IMAGE_SIZE = 16

# Tiny budgets, each applied where the method's config has the field (methods differ in what they have).
TINY = {
    "dataset": "digits", "backbone": "tiny_cnn", "seed": 5, "epochs": 2, "image_size": IMAGE_SIZE,
    "max_train_samples": 16, "batch_size": 8, "eval_batch_size": 16, "n_val": 8, "n_eval": 8, "shuffle_buffer": 16,
    # lr 0.05: one step must move a parameter by more than float32 rounding (a ProtoNet scale of 10 at AMT's
    # 5e-4 may not)
    "lr": 0.05, "train_attack_steps": 1, "val_pgd_steps": 1, "eval_pgd_steps": 1, "autoattack_version": "off",
    "keep_checkpoints": "last",  # the resume test compares the last epoch's DeepSpeed weights of finished trials
    # episodic methods: 2-way 1-shot episodes with 2 queries per class
    "ways": 2, "shots": 1, "queries": 2, "episodes_per_epoch": 2, "episodes": 2, "val_episodes": 1,
    "test_time_ft_steps": 1,  # PMF deploys with 100 per episode
    # low-rank adapters of tiny rank
    "rank": 2, "r_nat": 2,
    # AutoLoRa's η rule decides after every epoch from the second on (a halving and a reload of the best
    # checkpoint here), so that its state is exercised within two epochs
    "lr_checkpoint_every": 1,
    # a pool method's trial trains one member (a pool is several trials)
    "member_eps": 8.0,
}


def tiny_config(method: str):
    fields = config_fields(get_method(method).Config)
    return resolve_config(method, {k: v for k, v in TINY.items() if k in fields})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as tests/test_resume.py gives its trials: on a shared 2-core machine two OpenMP
    threads spin against each other (measured: an AMT step 11 s at 2 threads, 0.2 s at 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(shards_root) -> Path:
    return shards_root / "digits"


@functools.lru_cache(maxsize=None)
def train_batches(digits: Path, episodic: bool, transform: str, ways: int, shots: int, queries: int) -> list:
    """Two training batches (episodes from the base classes), read once per module for all methods."""
    if episodic:
        sampler = EpisodeSampler(digits, "train", [0, 1, 2, 3, 4], ways, shots, queries, seed=0,
                                 image_size=IMAGE_SIZE, transform=transform)
        return [Episode(*sampler.sample(i)) for i in range(2)]
    x, y = load_split(digits, "train", max_samples=16, image_size=IMAGE_SIZE, transform=transform)
    return [(x[:8], y[:8]), (x[8:], y[8:])]


class Case:
    """One method built on tiny_cnn with its optimizer in a PlainEngine, and the data a step needs."""

    def __init__(self, method: str, digits: Path, init_seed: int = 0):
        cfg = self.cfg = tiny_config(method)
        cls = get_method(method)
        self.episodic = cls.episodic
        num_classes = cfg.ways if cls.episodic else 10
        torch.manual_seed(init_seed)
        self.method = cls(cfg, create_backbone(cfg.backbone, num_classes, image_size=IMAGE_SIZE), num_classes)
        self.engine = PlainEngine(self.method.model, self.method.make_optimizer())
        self.batches = train_batches(digits, cls.episodic, cfg.transform, *(
            (cfg.ways, cfg.shots, cfg.queries) if cls.episodic else (0, 0, 0)))
        # validation figures as end_epoch receives them (the selection metric and clean accuracy)
        self.val = {"val_fewshot_acc" if cls.episodic else "val_clean_acc": 0.75, cfg.select_metric: 0.5}

    def _passes(self):
        return iter(self.batches)  # a pass over the training data (AutoLoRa measures its λ on one)

    def epoch(self, epoch: int, end: bool = True):
        """What a trial does in one epoch, on one batch: seed, start_epoch, a train step, end_epoch."""
        seed_everything(epoch_seed(self.cfg.seed, epoch))
        ctx = TrainContext(epoch=epoch, step=0, steps_per_epoch=1, device=torch.device("cpu"),
                           train_batches=self._passes,
                           augmented_train_batches=None if self.episodic else self._passes)
        self.method.start_epoch(ctx)
        self.method.model.train()
        logs = self.method.train_step(self.engine, self.batches[epoch % 2], ctx)
        if end:
            self.method.end_epoch(epoch, dict(self.val))
        return logs

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.method.model.named_parameters()}


def _json(obj):
    """As the checkpoint stores method state: JSON text (tuples become lists)."""
    return json.loads(json.dumps(obj, default=float))


# --- 1. one step moves what trains, and only that ------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_one_step_moves_the_trained_parameters_only(method, digits):
    case = Case(method, digits)
    named = dict(case.method.model.named_parameters())
    in_optimizer = {id(p) for g in case.engine.optimizer.param_groups for p in g["params"]}
    trained = {n for n, p in named.items() if id(p) in in_optimizer}
    frozen = {n for n, p in named.items() if not p.requires_grad}
    assert trained, f"{method}: the optimizer holds no parameter of the model"
    assert not trained & frozen, f"{method}: frozen parameters in the optimizer: {sorted(trained & frozen)[:5]}"
    before = case.params()
    case.epoch(0, end=False)
    moved = {n for n, p in named.items() if not torch.equal(p.detach(), before[n])}
    assert not moved - trained, f"{method}: parameters outside the optimizer moved: {sorted(moved - trained)[:5]}"
    assert not trained - moved, f"{method}: trained parameters that one step left as they were: " \
                                f"{sorted(trained - moved)[:8]}"
    # the method leaves the flags as it found them (AutoLoRa routes gradients by toggling them per forward)
    assert {n for n, p in named.items() if not p.requires_grad} == frozen


# --- 2. the method's state survives a checkpoint round trip --------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_state_survives_a_checkpoint_round_trip(method, digits, tmp_path):
    a = Case(method, digits)
    a.epoch(0)
    save_checkpoint(a.engine, tmp_path, 0, {"epoch": 0, "method": a.method.state_dict()})
    b = Case(method, digits, init_seed=1)  # other initial weights, no momentum, no method state
    assert any(not torch.equal(v, b.params()[k]) for k, v in a.params().items())
    client = load_latest(b.engine, tmp_path)
    b.method.load_state_dict(client["method"])
    assert _json(b.method.state_dict()) == _json(a.method.state_dict())
    for name, value in a.params().items():
        torch.testing.assert_close(b.params()[name], value, rtol=0, atol=0, msg=name)
    a.epoch(1)
    b.epoch(1)  # identical only if weights, momentum and schedule state all came back
    assert _json(b.method.state_dict()) == _json(a.method.state_dict())
    for name, value in a.params().items():
        torch.testing.assert_close(b.params()[name], value, rtol=0, atol=0, msg=name)


# --- 3. a resumed trial ends as one that ran straight through ------------------------------------------
class Stop(Exception):
    pass


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The module weights of the newest checkpoint (DeepSpeed's model-states file of ``latest``)."""
    ckpt = out / "checkpoints"
    (states,) = (ckpt / (ckpt / LATEST).read_text().strip()).glob("*model_states.pt")
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(states, map_location="cpu", weights_only=True)["module"]


def _comparable(result: dict) -> dict:
    out = {k: v for k, v in result.items() if k not in ("cost", "provenance")}  # timings, argv and capture time differ
    if "reliability" in out:  # the indicators' own time
        out["reliability"] = {k: v for k, v in out["reliability"].items() if k != "seconds"}
    return out


@pytest.mark.parametrize("method", METHODS)
def test_resumed_trial_ends_as_straight_one(method, shards_root, tmp_path):
    cfg = tiny_config(method)
    straight = run_trial(cfg, tmp_path / "straight", data_root=shards_root, progress=False, track=False)

    def stop_after_epoch0(row, ckpt_dir):
        if row["epoch"] == 0:
            raise Stop  # after epoch 0's checkpoint and history, before any later work

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        run_trial(cfg, out, data_root=shards_root, progress=False, track=False, epoch_callback=stop_after_epoch0)
    assert not (out / "result.json").exists()
    assert (out / "checkpoints" / LATEST).read_text() == epoch_tag(0)
    epochs_run = []
    resumed = run_trial(cfg, out, data_root=shards_root, progress=False, track=False,
                        epoch_callback=lambda row, ckpt: epochs_run.append(row["epoch"]))
    assert epochs_run == [1], "the second run must resume after epoch 0, not start again"
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    assert _comparable(resumed) == _comparable(straight)
    a, b = _final_weights(tmp_path / "straight"), _final_weights(out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
