"""The DeepSpeed engine every trial trains through, and checkpoints that survive a kill.

On CPU DeepSpeed uses its "cpu" accelerator with gloo; on GPUs NCCL. A single-process trial sets up its
own rendezvous on a free port, so two trials on one node never collide.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """Without these DeepSpeed looks for mpi4py; torchrun and Ray Train set them for multi-process runs."""
    if "RANK" in os.environ and "MASTER_PORT" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))


def world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def trial_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def ds_config(cfg, world_size: int) -> dict[str, Any]:
    micro = max(1, cfg.batch_size // world_size)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bool(cfg.bf16)},
        # SGD (the papers' optimizer) is a client optimizer DeepSpeed has not "tested" with ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, optimizer: torch.optim.Optimizer, cfg):
    """``deepspeed.initialize`` with the method's client optimizer; ZeRO stage and bf16 from the config."""
    ensure_dist_env()
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    _, world_size = world()
    if cfg.bf16:
        # DeepSpeed casts parameters only; BN running statistics must follow or CPU kernels refuse the mix.
        model.to(torch.bfloat16)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, world_size))
    return engine


class PlainEngine:
    """The part of a DeepSpeed engine a method uses, in plain PyTorch: for unit tests and for timing a
    method's own cost without DeepSpeed's bookkeeping. ``forward`` may replace the module's (compiled)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, forward=None):
        self.module, self.optimizer = module, optimizer
        self._forward = forward or module

    def __call__(self, x):
        return self._forward(x)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def load_module_state(engine, state: dict[str, torch.Tensor]) -> None:
    """Load weights into the engine's module and into the ZeRO/bf16 fp32 master copy, if there is one."""
    engine.module.load_state_dict(state)
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if callable(refresh):  # ZeRO 1/2 and bf16 keep fp32 partitions that would otherwise overwrite the load
        refresh()


def cfg_bf16(engine) -> bool:
    return bool(getattr(engine, "bfloat16_enabled", lambda: False)())


# --- checkpoints ---------------------------------------------------------------------------------------

def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill leaves the previous checkpoint intact


def checkpoint_path(ckpt_dir: Path, tag: str) -> Path:
    rank, _ = world()
    return Path(ckpt_dir) / f"{tag}.rank{rank}.pt"


def save_checkpoint(engine, method, ckpt_dir: Path, tag: str, epoch: int, extra: dict | None = None) -> Path:
    """Model weights, client-optimizer state and the method's schedule state, loadable with weights_only."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "model": {k: v.detach().cpu() for k, v in engine.module.state_dict().items()},
        "epoch": epoch,
        # plain data as JSON text so that weights_only loading never needs pickle globals
        "method": json.dumps(method.state_dict()),
        "extra": json.dumps(extra or {}),
    }
    if engine.zero_optimization_stage() == 0 and not cfg_bf16(engine):
        state["optimizer"] = method.optimizer.state_dict()
    path = checkpoint_path(ckpt_dir, tag)
    _atomic_save(state, path)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["method"] = json.loads(state["method"])
    state["extra"] = json.loads(state.get("extra", "{}"))
    return state


def restore(engine, method, state: dict[str, Any]) -> None:
    load_module_state(engine, state["model"])
    method.load_state_dict(state["method"])
    if "optimizer" in state:
        method.optimizer.load_state_dict(state["optimizer"])
