"""Tiny rft trials under DeepSpeed, one per case, run alone or under torchrun (every rank runs this).

    resume_trial.py SHARDS OUT_ROOT MODE EPOCHS KILL_AFTER CASE [CASE ...]     CASE: STAGE:BF16, e.g. 3:1

MODE ``run``: each case's trial runs into OUT_ROOT/zSTAGE_bfBF16 (resuming whatever checkpoint is there).
MODE ``stop``: each case's trial is stopped right after epoch KILL_AFTER's checkpoint and report: the
cases but the last by an exception (the next case goes on in this process), the last by SIGKILL of every
rank (nothing cleans up). A trial that reaches its last epoch writes, from rank 0, ``last_weights.pt``:
the full weights after that epoch (gathered from every rank under ZeRO-3).
"""
import os
import signal
import sys
from pathlib import Path

import torch

from bench.config import resolve_config
from bench.engine import full_state_dict
from bench.trial import Trial, check_inputs


class Stop(Exception):
    pass


def case_dir(root: Path, case: str) -> Path:
    stage, bf16 = case.split(":")
    return root / f"z{stage}_bf{bf16}"


def run_case(shards: str, root: Path, case: str, epochs: int, stop_after: int | None, kill: bool) -> None:
    stage, bf16 = case.split(":")
    cfg = resolve_config("rft", {
        "dataset": "digits", "backbone": "tiny_cnn", "seed": 3, "epochs": epochs, "zero_stage": int(stage),
        "bf16": bf16 == "1", "max_train_samples": 32, "batch_size": 16, "n_val": 16, "n_eval": 16, "image_size": 16,
        "train_attack_steps": 1, "val_pgd_steps": 1, "eval_pgd_steps": 1, "autoattack_version": "off",
        "lr": 0.05, "shuffle_buffer": 64, "keep_checkpoints": "last"})
    out = case_dir(root, case)
    trial = None

    def on_epoch(row, ckpt_dir):
        if row["epoch"] == epochs - 1:
            state = full_state_dict(trial.engine)  # every rank takes part (ZeRO-3 gathers)
            if state is not None:
                torch.save(state, out / "last_weights.pt")
        if row["epoch"] == stop_after:
            if kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise Stop

    trial = Trial(cfg, out, check_inputs(cfg, shards), progress=False, epoch_callback=on_epoch, run_id=None,
                  group=None, sweep=None, track=False)
    try:
        trial.run()
    except Stop:
        pass


if __name__ == "__main__":
    shards, root, mode, epochs, kill_after, *cases = sys.argv[1:]
    for i, case in enumerate(cases):
        run_case(shards, Path(root), case, int(epochs), int(kill_after) if mode == "stop" else None,
                 kill=mode == "stop" and i == len(cases) - 1)
