"""The spine: config resolution, pgd_linf, AutoAttack, the DeepSpeed engine, backbones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.config import ConfigError, config_hash, resolve_config
from bench.evaluate import autoattack_accuracy, clean_accuracy, pgd_accuracy
from methods import list_methods
from methods.attacks import pgd_linf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, field, expected", [
    ({"eps": "8/255"}, "eps", 8 / 255),
    ({"epochs": "3"}, "epochs", 3),
    ({"n_eval": "null"}, "n_eval", None),
    ({"bf16": "true"}, "bf16", True),
    ({"lr_milestones": "[0.3, 0.6]"}, "lr_milestones", [0.3, 0.6]),
])
def test_set_overrides_are_typed(overrides, field, expected):
    assert getattr(resolve_config("rft", overrides), field) == pytest.approx(expected)


@pytest.mark.parametrize("method, overrides, message", [
    ("nope", {}, "unknown method 'nope'; valid: "),
    ("rft", {"epoch": "1"}, "unknown config field 'epoch'"),
    ("rft", {"eps": "8"}, "eps=8 is above 16/255 (pixel scale): did you mean eps=8/255?"),
    ("rft", {"epochs": "two"}, "epochs='two' is not a valid int"),
    ("rft", {"autoattack_version": "fast"}, "valid: standard, plus, rand, apgd-ce, off"),
])
def test_bad_config_is_one_line_error(method, overrides, message):
    with pytest.raises(ConfigError) as e:
        resolve_config(method, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method, a, b, ignore, same", [
    ("rft", {"seed": "0"}, {"seed": "1", "num_workers": "2"}, ("seed", "speed"), True),
    ("rft", {}, {"eval_batch_size": "64", "channels_last": "true", "compile": "true"}, ("seed", "speed"), True),
    ("rft", {}, {"eps": "4/255"}, ("seed", "speed"), False),
    ("rft", {"seed": "0"}, {"seed": "1"}, ("speed",), False),
    ("amt", {}, {"merge_beta": "3"}, ("seed", "speed"), False),
    ("amt", {}, {"merge_beta": "3", "episodes": "10", "target_datasets": "[digits]"}, ("speed", "pool"), True),
    ("amt", {}, {"lambda_adv": "3"}, ("speed", "pool"), False),
    ("pmf", {}, {"episodes": "10"}, ("seed", "speed"), False),
])
def test_config_hash_leaves_out_the_ignored_roles(method, a, b, ignore, same):
    ha, hb = (config_hash(resolve_config(method, o), ignore=ignore) for o in (a, b))
    assert (ha == hb) is same


# config blocks of result.json files written before fields had roles, with the config_hash recorded then
PINS = json.loads((ROOT / "tests" / "fixtures" / "config_hash_pins.json").read_text())


@pytest.mark.parametrize("pin", PINS, ids=[p["config"]["method"] for p in PINS])
def test_config_hash_of_a_recorded_config_is_unchanged(pin):
    assert config_hash(pin["config"]) == pin["config_hash"]
    # bookkeeping keys beside the fields are not part of the config
    assert config_hash({**pin["config"], "out_dir": "runs/x", "trial_id": "t1"}) == pin["config_hash"]


@pytest.mark.parametrize("method", list_methods())
def test_config_hash_is_the_hash_before_roles(method):
    """The rule before fields had roles: every field but the seed and four speed switches, by name (and the
    switches added later that never change a number: allow_large_eps, where the evaluation runs (eval_shards,
    eval_shard_gpus), what is kept on disk (keep_checkpoints), the reliability indicators (reliability,
    reliability_n): they add a block beside the metrics, never change one)."""
    import hashlib

    cfg = resolve_config(method, {"seed": "5", "num_workers": "1"})
    before = {k: v for k, v in cfg.to_dict().items()
              if k not in {"num_workers", "eval_batch_size", "channels_last", "compile", "seed", "allow_large_eps",
                           "eval_shards", "eval_shard_gpus", "keep_checkpoints", "reliability", "reliability_n"}}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert config_hash(cfg) == config_hash(cfg.to_dict()) == expected


@pytest.mark.parametrize("method, field, role", [
    ("rft", "seed", "seed"), ("rft", "eps", "result"), ("rft", "num_workers", "speed"),
    ("autolora", "eval_batch_size", "speed"), ("twins", "compile", "speed"), ("pmf", "channels_last", "speed"),
    ("pmf", "episodes", "result"), ("amt", "lambda_adv", "result"), ("amt", "epochs", "result"),
] + [("amt", name, "pool") for name in (  # AMT's merge-only settings before they were roles
    "pool_size", "pool_eps", "member_eps", "pool_dir", "adapter_path", "merge_top_k", "merge_lambda", "merge_beta",
    "trim_rho", "trim_modules", "merge_aug_p", "merge_seed", "episodes", "n_eval", "eval_pgd_steps",
    "autoattack_version", "test_time_ft_steps", "test_time_ft_lr", "test_time_ft_aug_p", "target_datasets",
    "fewshot_autoattack")])
def test_field_roles(method, field, role):
    from methods import get_method
    from methods.base import field_roles

    cls = get_method(method).Config
    assert field_roles(cls)[field] == role == field_roles(cls())[field]


def test_redeclared_field_keeps_its_role_and_amt_keeps_inherited_defaults():
    import dataclasses

    from methods.amt import AMTConfig
    from methods.base import field_roles, setting
    from methods.pmf import ProtoNetLoRAConfig

    @dataclasses.dataclass
    class Faster(AMTConfig):
        num_workers: int = 4  # a new default, no role: still a speed switch
        episodes: int = 20
        merge_beta: float = setting(6.0, role="result")  # an explicit role wins

    roles = field_roles(Faster)
    assert (roles["num_workers"], roles["episodes"], roles["merge_beta"]) == ("speed", "pool", "result")
    parent, amt = ProtoNetLoRAConfig(), AMTConfig()
    inherited = [n for n, r in field_roles(AMTConfig).items() if r == "pool" and hasattr(parent, n)]
    assert len(inherited) == 10 and all(getattr(amt, n) == getattr(parent, n) for n in inherited)
    assert list(amt.to_dict()) == list(parent.to_dict()) + [n for n in amt.to_dict() if not hasattr(parent, n)]
    with pytest.raises(ValueError, match="valid: result, seed, speed, pool"):
        setting(0, role="fast")
    with pytest.raises(ValueError, match="unknown role"):
        config_hash(amt, ignore=("pool", "speedy"))


def test_baselines_registered():
    assert {"rft", "ft"} <= set(list_methods())


def _tiny_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_pgd_raises_loss_stays_in_ball_and_computes_no_param_grads():
    model = _tiny_classifier()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    eps = 8 / 255
    x_adv = pgd_linf(model, x, y, eps=eps, step_size=2 / 255, steps=10)
    loss = nn.functional.cross_entropy
    assert loss(model(x_adv), y) > loss(model(x), y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_robust_accuracy_ordering_and_autoattack_runs():
    model = _tiny_classifier()
    x = torch.rand(32, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every sample correct when clean
    assert clean_accuracy(model, x, y) == 1.0
    pgd = pgd_accuracy(model, x, y, eps=16 / 255, step_size=4 / 255, steps=10)
    aa = autoattack_accuracy(model, x, y, eps=16 / 255, version="apgd-ce")
    assert 0.0 <= aa <= 1.0 and pgd < 1.0
    assert aa <= pgd + 0.1  # APGD is at least about as strong as PGD
    assert autoattack_accuracy(model, x, y, eps=8 / 255, version="off") is None


def test_embedded_backbone_loads_pretrained_weights():
    from bench.backbones import create_backbone

    a = create_backbone("cifar_resnet18_aa", num_classes=10)
    b = create_backbone("cifar_resnet18_aa", num_classes=10)
    # same shipped weights in both, fresh heads; features are deterministic
    x = torch.rand(2, 3, 32, 32)
    a.eval(), b.eval()
    assert torch.allclose(a.features(x), b.features(x))
    assert a.features(x).shape == (2, 512)
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("not_a_model_xyz", 10)


def _plain_step():
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    from ds_step import batch, make_model

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model.state_dict()


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.parametrize("nproc, stage", [(1, 0), (2, 2)])
def test_deepspeed_step_matches_plain_pytorch(tmp_path, nproc, stage):
    out = tmp_path / "w.pt"
    script = str(ROOT / "tests" / "scripts" / "ds_step.py")
    if nproc == 1:
        cmd = [sys.executable, script, str(out), str(stage)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), script, str(out), str(stage)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    want = _plain_step()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k


def _free_port():
    from bench.engine import free_port

    return free_port()


_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "BENCH_SINGLE_PROCESS_DIST")


@pytest.mark.parametrize("env,kept", [
    ({}, False),  # nothing set: a single-process environment with a fresh port
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "6000"}, True),  # torchrun / Ray Train
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "5555", "BENCH_SINGLE_PROCESS_DIST": "1:5555"}, False),  # inherited
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "6000", "BENCH_SINGLE_PROCESS_DIST": "1:5555"}, True),  # torchrun under bench
    ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "5555", "BENCH_SINGLE_PROCESS_DIST": "SELF:5555"}, True),  # our own
], ids=["unset", "launcher", "inherited-from-parent", "launcher-under-bench", "own"])
def test_dist_env_never_reuses_a_parent_rendezvous_port(monkeypatch, env, kept):
    """A child of a process that ran a trial in-process inherits its MASTER_PORT, which is still listening:
    reusing it fails with EADDRINUSE (seen in CI), so only a launcher's or our own environment is kept."""
    import os

    from bench.engine import ensure_dist_env

    for k in _DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v.replace("SELF", str(os.getpid())))
    before = {k: os.environ.get(k) for k in _DIST_VARS}
    ensure_dist_env()
    after = {k: os.environ.get(k) for k in _DIST_VARS}
    if kept:
        assert after == before
    else:
        assert after["MASTER_PORT"] not in (None, env.get("MASTER_PORT"))
        assert after["RANK"] == "0" and after["WORLD_SIZE"] == "1"
        assert after["BENCH_SINGLE_PROCESS_DIST"] == f"{os.getpid()}:{after['MASTER_PORT']}"


@pytest.mark.parametrize("data, read", [
    ("text ü", lambda p: p.read_text()),
    (b"\x00bytes", lambda p: p.read_bytes()),
])
def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path, data, read):
    from bench.files import atomic_write
    target = tmp_path / "sub" / "f"
    atomic_write(target, "old")
    atomic_write(target, data)
    assert read(target) == data
    assert [p.name for p in target.parent.iterdir()] == ["f"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from bench.files import atomic_write, atomic_write_json
    target = atomic_write_json(tmp_path / "r.json", {"a": 1})

    def broken(p):
        p.write_text('{"a": ')  # half written, then the writer dies
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# Values that would run silently and measure something else than asked: refused before any work, in one line.
RANGE_CASES = [
    ("rft", {"epochs": "0"}, "epochs=0 must be >= 1 (0 would evaluate an untrained head)"),
    ("rft", {"batch_size": "0"}, "batch_size=0 must be >= 1 (0 would train at batch 1 and record 0)"),
    ("rft", {"eval_batch_size": "0"}, "eval_batch_size=0 must be >= 1"),
    ("rft", {"eps": "1"}, "eps=1 is above 16/255 (pixel scale): did you mean eps=1/255? set allow_large_eps=true"),
    ("rft", {"eps": "4"}, "eps=4 is above 16/255 (pixel scale): did you mean eps=4/255? pixel scale is [0, 1]"),
    ("rft", {"eps": "32/255"}, "eps=0.12549 (32/255) is above 16/255 (pixel scale): e.g. eps=8/255; "
                               "set allow_large_eps"),
    ("rft", {"eps": "2", "allow_large_eps": "true"}, "eps=2 is above 16/255 (pixel scale): did you mean eps=2/255? "
                                                     "pixel scale is [0, 1]"),
    ("rft", {"eps": "-1/255"}, "eps=-0.00392157 must be >= 0"),
    ("rft", {"train_step_size": "2"}, "did you mean train_step_size=2/255?"),
    ("autolora", {"eval_step_size": "1"}, "did you mean eval_step_size=1/255?"),
    ("rft", {"train_attack_steps": "0"}, "train_attack_steps=0: method rft trains on its attack's examples"),
    ("twins", {"train_attack_steps": "0"}, "train_attack_steps=0: method twins trains on its attack's examples"),
    ("autolora", {"train_attack_steps": "0"}, "train_attack_steps=0: method autolora"),
    ("amt", {"train_attack_steps": "0"}, "train_attack_steps=0: method amt"),
    ("rft", {"train_attack_steps": "-1"}, "train_attack_steps=-1 must be >= 0"),
    ("rft", {"eval_pgd_steps": "0", "autoattack_version": "off"},
     "eval_pgd_steps=0 with autoattack_version=off measures no robust accuracy"),
    ("pmf", {"eval_pgd_steps": "0"}, "eval_pgd_steps=0 must be >= 1: the few-shot robust accuracy is PGD's"),
    ("rft", {"val_pgd_steps": "0"}, "val_pgd_steps=0 measures no val_pgd_acc, the select_metric; give val_pgd_steps "
                                    ">= 1, or select on clean accuracy (select_metric=val_clean_acc)"),
    ("pmf", {"ways": "1"}, "ways=1 must be >= 2"),
    ("pmf", {"val_episodes": "0"}, "val_episodes=0 must be positive"),
    ("amt", {"episodes": "0"}, "episodes=0 must be positive"),
    ("pmf", {"episodes_per_epoch": "0"}, "episodes_per_epoch=0 must be positive"),
    ("rft", {"n_eval": "0"}, "n_eval=0 must be positive or null (all)"),
    ("rft", {"shuffle_buffer": "-1"}, "shuffle_buffer=-1 must be >= 0"),
]


@pytest.mark.parametrize("method, overrides, message", RANGE_CASES)
def test_out_of_range_input_is_one_line_error(method, overrides, message):
    with pytest.raises(ConfigError) as e:
        resolve_config(method, overrides)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("method, overrides", [
    ("ft", {"train_attack_steps": "0"}),  # clean methods never attack in training
    ("pmf", {"train_attack_steps": "0"}),
    ("protonet_lora", {"train_attack_steps": "0"}),
    ("rft", {"eval_pgd_steps": "0"}),  # AutoAttack (standard) alone is the robust number
    ("ft", {"val_pgd_steps": "0"}),  # ft selects on clean accuracy
    ("rft", {"val_pgd_steps": "0", "select_metric": "val_clean_acc"}),
    ("rft", {"eps": "16/255"}),
    ("rft", {"eps": "32/255", "allow_large_eps": "true"}),
    ("rft", {"eps": "0"}),
])
def test_in_range_edge_inputs_resolve(method, overrides):
    resolve_config(method, overrides)


def test_allow_large_eps_is_left_out_of_the_hash():
    """It permits a value and never changes a number: the eps it permits is in the hash already."""
    a = resolve_config("rft", {"eps": "8/255"})
    b = resolve_config("rft", {"eps": "8/255", "allow_large_eps": "true"})
    assert config_hash(a) == config_hash(b) != config_hash(resolve_config("rft", {"eps": "4/255"}))
