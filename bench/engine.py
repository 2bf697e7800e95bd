"""The DeepSpeed engine every trial trains through, and checkpoints that survive a kill.

On CPU DeepSpeed uses its "cpu" accelerator with gloo; on GPUs NCCL. A single-process trial sets up its
own rendezvous on a free port, so two trials on one node never collide.

``compile=True`` compiles the module in place (``nn.Module.compile``), so ``engine(x)`` and
``engine.module(x)`` (the attacks' forward) both run compiled, and state-dict keys stay as they are.
"""
from __future__ import annotations

import contextlib

import json
import os
import socket
import warnings
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
    channels_last = getattr(cfg, "channels_last", False)
    if channels_last:  # DeepSpeed's first broadcast views each parameter as bytes, which needs contiguous memory
        model.to(memory_format=torch.contiguous_format)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, world_size))
    if channels_last and cfg.zero_stage == 0 and not cfg.bf16:
        # Only here does DeepSpeed keep the parameters themselves (ZeRO and bf16 make them views of flat
        # buffers, which a format change would detach). Elsewhere the channels_last inputs alone select
        # the NHWC kernels, at the cost of reordering the weights per call.
        engine.module.to(memory_format=torch.channels_last)
    if getattr(cfg, "compile", False):
        # DeepSpeed's engine.compile() (0.19.8, no DeepCompile configured) calls self.module.compile(backend=
        # the accelerator's, inductor on CPU and CUDA): an in-place compile of the module's __call__, so the
        # attacks' engine.module(x) is compiled as well as engine(x), and checkpoints keep their keys. Used
        # rather than torch.compile(model) so that DeepSpeed knows (engine.is_compiled) and picks the backend.
        _allow_recompiles()
        engine.compile()
    return engine


# Graphs one compiled model needs: dynamo guards on grad mode, train/eval, each LoRA layer's
# ``disable_adapters`` and every parameter's ``requires_grad``, so AutoLoRa's toggles make a fixed set of
# variants (λ pass, attack, natural branch, adversarial branch, clean validation), each compiled at most
# twice (static batch, then batch-dynamic after the first other batch size): about 10, above dynamo's
# default limit of 8, past which a new variant silently runs eager. Toggling again reuses the cache.
RECOMPILE_LIMIT = 16


def _allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo.config as dc

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dc, name, max(getattr(dc, name), limit))


def compile_module(module: nn.Module) -> nn.Module:
    """Compile ``module`` in place as DeepSpeed's ``engine.compile()`` does: ``module(x)`` then runs the
    compiled ``__call__`` (hooks included); parameters, buffers and state-dict keys are unchanged."""
    _allow_recompiles()
    module.compile()
    return module


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU reports bf16 instructions (AVX512-BF16 or AMX), where oneDNN has bf16 kernels."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "avx512_bf16" in flags or "amx_bf16" in flags


_warned_bf16_fallback = False


def train_autocast(cfg, device: torch.device):
    """The context a training step runs in: bf16 autocast with ``cfg.bf16_autocast`` (fp32 weights and
    optimizer; convolutions and matmuls in bf16, on GPUs and on CPUs with bf16 instructions), else none.
    Evaluation never runs under it, so reported accuracies are fp32 attacks on the trained weights.

    On a CPU without bf16 instructions autocast emulates bf16 and is slower than fp32 (measured: rft at
    6 images/s against about 14 in fp32 on a 2-core AVX512F machine), so the step falls back to fp32 there,
    with a one-line warning."""
    global _warned_bf16_fallback
    if not getattr(cfg, "bf16_autocast", False):
        return contextlib.nullcontext()
    if device.type == "cpu" and not cpu_has_native_bf16():
        if not _warned_bf16_fallback:
            warnings.warn("bf16_autocast: this CPU has no bf16 instructions (avx512_bf16/amx_bf16), where bf16 "
                          "is slower than fp32; training in fp32", RuntimeWarning, stacklevel=2)
            _warned_bf16_fallback = True
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class PlainEngine:
    """The part of a DeepSpeed engine a method uses, in plain PyTorch: for unit tests and for timing a
    method's own cost without DeepSpeed's bookkeeping. ``compile=True`` compiles the module in place, as
    :func:`build_engine` does; ``forward`` may replace the module's forward for ``engine(x)`` only."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, forward=None, compile: bool = False):
        if compile:
            compile_module(module)
        self.module, self.optimizer = module, optimizer
        # not ``forward or module``: bool() of a compiled (OptimizedModule) Sequential-like wrapper calls len()
        self._forward = module if forward is None else forward

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
