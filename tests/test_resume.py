"""Resume equivalence through DeepSpeed's checkpoints: a trial stopped after epoch 0 and started again ends
with the same per-epoch losses, last-epoch weights (momentum included: epoch 1 moves from the restored
state) and test metrics as one that ran straight through; ZeRO 0-3, fp32 and bf16, one and two processes.

Each process runs its cases one after the other (tests/scripts/resume_trial.py): one process runs every
case straight through, a second stops each after epoch 0 (the last case by SIGKILL of every rank, the
others by an exception), a third resumes them all.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "resume_trial.py"
EPOCHS, STOP_AFTER = 2, 0

# (processes, ZeRO stage, bf16): all eight at one process, a subset at two
CASES = [(1, stage, bf16) for stage in (0, 1, 2, 3) for bf16 in (0, 1)] + [(2, 1, 0), (2, 3, 1)]


def _launch(nproc: int, shards: Path, root: Path, mode: str, cases: list[str]) -> subprocess.CompletedProcess:
    args = [str(shards), str(root), mode, str(EPOCHS), str(STOP_AFTER), *cases]
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        from bench.engine import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "--monitor_interval", "0.5", str(SCRIPT), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def shards16(tmp_path_factory) -> Path:
    """The digits data in 16-sample shards: the 32 training samples of a case are two shards, one per
    rank at two processes (shards are split by rank)."""
    from data_shards.digits import make_digits

    root = tmp_path_factory.mktemp("shards16")
    make_digits(root, maxcount=16)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards16) -> dict[int, tuple[Path, Path]]:
    """Per process count: (straight-through root, stopped-and-resumed root)."""
    out = {}
    for nproc in sorted({n for n, _, _ in CASES}):
        cases = [f"{s}:{b}" for n, s, b in CASES if n == nproc]
        straight, resumed = tmp_path_factory.mktemp(f"straight{nproc}"), tmp_path_factory.mktemp(f"resumed{nproc}")
        done = _launch(nproc, shards16, straight, "run", cases)
        assert done.returncode == 0, done.stderr[-4000:]
        stopped = _launch(nproc, shards16, resumed, "stop", cases)
        assert stopped.returncode != 0  # the last case was SIGKILLed
        for case in cases:  # every case stopped after epoch 0, with that epoch's checkpoint named
            d = resumed / f"z{case.replace(':', '_bf')}"
            assert not (d / "result.json").exists() and (d / "checkpoints" / "latest").read_text() == "epoch0000"
        again = _launch(nproc, shards16, resumed, "run", cases)
        assert again.returncode == 0, again.stderr[-4000:]
        out[nproc] = (straight, resumed)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("nproc,stage,bf16", CASES,
                         ids=[f"p{n}-zero{s}-{'bf16' if b else 'fp32'}" for n, s, b in CASES])
def test_resumed_trial_ends_as_straight_one(runs, nproc, stage, bf16):
    name = f"z{stage}_bf{bf16}"
    straight, resumed = (root / name for root in runs[nproc])
    a, b = (json.loads((d / "result.json").read_text()) for d in (straight, resumed))
    assert [h["epoch"] for h in b["history"]] == list(range(EPOCHS))
    tol = 1e-2 if bf16 else 1e-5  # bf16: equal up to the rounding of a reduction order
    for ha, hb in zip(a["history"], b["history"]):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=tol), (a["history"], b["history"])
        assert hb["lr"] == ha["lr"]
    assert b["metrics"] == pytest.approx(a["metrics"], abs=1 / 32 if bf16 else 1e-6)
    wa, wb = (torch.load(d / "last_weights.pt", weights_only=True) for d in (straight, resumed))
    assert wa.keys() == wb.keys()
    for k in wa:
        atol = 2e-2 if bf16 else 1e-5
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=0, atol=atol, msg=k)
    # only the newest epoch is kept (keep_checkpoints: last), and `latest` names it
    ckpt = resumed / "checkpoints"
    assert (ckpt / "latest").read_text() == f"epoch{EPOCHS - 1:04d}" and not (ckpt / "epoch0000").exists()


def test_plain_engine_checkpoint_round_trip(tmp_path):
    """PlainEngine (tests without DeepSpeed) keeps DeepSpeed's checkpoint interface: the same functions
    save and resume it, momentum included."""
    from torch import nn

    from bench.engine import PlainEngine, epoch_tag, full_state_dict, load_latest, save_checkpoint

    def make(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
        return PlainEngine(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))

    def step(engine, i):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        engine.backward(nn.functional.cross_entropy(engine(x), y))
        engine.step()

    a = make()
    for i in range(3):
        step(a, i)
    assert load_latest(a, tmp_path) is None  # nothing saved yet
    tag = save_checkpoint(a, tmp_path, 2, {"epoch": 2, "method": {"best_val": 0.5}})
    assert tag == epoch_tag(2) and (tmp_path / "latest").read_text() == tag
    b = make(seed=1)  # other initial weights, no momentum
    assert load_latest(b, tmp_path) == {"epoch": 2, "method": {"best_val": 0.5}}
    step(a, 3)
    step(b, 3)  # moves identically only if the momentum buffers came back
    for k, v in full_state_dict(a).items():
        torch.testing.assert_close(full_state_dict(b)[k], v, rtol=0, atol=0, msg=k)
