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
import shutil
import socket
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.files import atomic_write


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# "<pid>:<port>" of the process that set a single-process environment below. Its children inherit the
# variables (a test process that ran a trial in-process, a sweep driver), but the port is that process's own
# rendezvous, still listening: a child must choose its own, or it fails with EADDRINUSE.
_SINGLE_PROCESS_ENV = "BENCH_SINGLE_PROCESS_DIST"


def ensure_dist_env() -> None:
    """Without these DeepSpeed looks for mpi4py; torchrun and Ray Train set them for multi-process runs."""
    owner_pid, _, owner_port = os.environ.get(_SINGLE_PROCESS_ENV, "").partition(":")
    inherited = owner_pid not in ("", str(os.getpid())) and owner_port == os.environ.get("MASTER_PORT")
    if "RANK" in os.environ and "MASTER_PORT" in os.environ and not inherited:
        return
    port = str(free_port())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ[_SINGLE_PROCESS_ENV] = f"{os.getpid()}:{port}"


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


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
    from bench.logs import cpu_only_deepspeed, deepspeed_prints

    ensure_dist_env()
    cpu_only_deepspeed(torch.cuda.is_available())
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        with deepspeed_prints():
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
    _load_weights_only(engine)
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

    # DeepSpeed's checkpoint interface, so that the functions below treat both engines alike
    def zero_optimization_stage(self) -> int:
        return 0

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def save_checkpoint(self, save_dir, tag, client_state=None, save_latest=True) -> bool:
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(), **(client_state or {})}
        atomic_write(folder / PLAIN_STATE, lambda p: torch.save(state, p))
        if save_latest:
            atomic_write(Path(save_dir) / LATEST, tag)
        return True

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, **_):
        tag = tag or (Path(load_dir) / LATEST).read_text().strip()
        path = Path(load_dir) / tag / PLAIN_STATE
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.module.load_state_dict(state.pop("module"))
        optimizer_state = state.pop("optimizer")
        if load_optimizer_states:
            self.optimizer.load_state_dict(optimizer_state)
        return str(path.parent), state


# --- checkpoints ---------------------------------------------------------------------------------------
# A trial's checkpoint folder is DeepSpeed's save_dir: one folder per finished epoch (``epoch0003/``: the
# model states and every rank's ZeRO optimizer partition, written by DeepSpeed), ``latest`` naming the newest
# complete one, and ``best.pt``, the full weights of the epoch that validation selected.
LATEST = "latest"
BEST = "best.pt"
CLIENT_KEY = "bench"  # the trial's own state inside DeepSpeed's checkpoint, as JSON text
PLAIN_STATE = "plain_state.pt"  # PlainEngine's one file per tag


def epoch_tag(epoch: int) -> str:
    return f"epoch{epoch:04d}"


def _deepspeed_safe_globals() -> list:
    """The only classes DeepSpeed 0.19 pickles into its checkpoints (ZeRO 0-3, fp32 and bf16), found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``; all three hold plain numbers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _load_weights_only(engine) -> None:
    """DeepSpeed 0.19 reads its checkpoint files through ``engine.checkpoint_engine.load``, which calls
    ``torch.load(..., weights_only=False)``: unpickling a file can run any code it names. Swap in the same
    engine loading with ``weights_only=True``, DeepSpeed's three plain-data classes allowlisted."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}")
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``t`` overwritten in place with rank ``src``'s values. Its bytes travel: gloo refuses some dtypes
    (bf16; "Invalid scalar type" for a BN layer's 0-dim int64 step counter)."""
    import torch.distributed as dist

    raw = t.detach().reshape(-1).contiguous().view(torch.uint8).clone()
    dist.broadcast(raw, src=src)
    with torch.no_grad():
        t.copy_(raw.view(t.dtype).reshape(t.shape))
    return t


def sync_buffers(engine) -> None:
    """Rank 0's buffers (BN running statistics) to every rank, as DDP does. Ranks that saw other batches
    would otherwise keep statistics of their own, which the eval-mode attacks of the next epoch use and
    which a resumed run, loading rank 0's from the checkpoint, could not reproduce."""
    _, world_size = world()
    if world_size > 1:
        for b in engine.module.buffers():
            broadcast_(b.data)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, ckpt_dir: str | Path, epoch: int, client: dict[str, Any],
                    keep_previous: bool = False) -> str:
    """Every rank calls this after epoch ``epoch``: DeepSpeed writes the weights and every rank's optimizer
    state (momentum, fp32 master copy) under the tag ``epochNNNN``, with ``client`` (plain data: the
    method's schedule state, the trial's counters) as JSON text; only then does ``latest`` move to the
    new tag, so a kill at any point leaves the previous epoch's checkpoint whole and named. The previous
    epochs' folders are then removed unless ``keep_previous`` (``keep_checkpoints: all``)."""
    ckpt_dir = Path(ckpt_dir)
    tag = epoch_tag(epoch)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={CLIENT_KEY: json.dumps(client, default=float)},
                           save_latest=False)
    # DeepSpeed's save ends in a barrier: every rank's files are complete here. (Its own ``latest`` is
    # written in place by rank 0 before that barrier, so a kill could leave it naming a partial tag.)
    if local_rank() == 0:  # one writer per node: nodes without a shared disk each keep their own folder
        atomic_write(ckpt_dir / LATEST, tag)
        if not keep_previous:
            _remove_epochs(ckpt_dir, keep=tag)
    _barrier()
    return tag


def _remove_epochs(ckpt_dir: Path, keep: str | None) -> None:
    for old in ckpt_dir.glob("epoch*"):
        if old.is_dir() and old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(ckpt_dir: str | Path, keep: str) -> None:
    """What a finished trial keeps of its epoch checkpoints (``best.pt``, the selected weights, always stays):
    ``none`` removes them and ``latest`` (a rerun returns the finished result.json; nothing resumes),
    ``last`` keeps the newest epoch (weights, optimizer and schedule state, to go on training from it),
    ``all`` keeps every epoch. ``latest`` goes first, so a kill midway never leaves it naming a removed tag."""
    ckpt_dir = Path(ckpt_dir)
    if keep == "all" or not ckpt_dir.is_dir():
        return
    latest = ckpt_dir / LATEST
    if keep == "none":
        latest.unlink(missing_ok=True)
        _remove_epochs(ckpt_dir, keep=None)
    elif keep == "last":
        _remove_epochs(ckpt_dir, keep=latest.read_text().strip() if latest.exists() else None)
    else:
        raise ValueError(f"keep_checkpoints={keep!r}; valid: none, last, all")


def load_latest(engine, ckpt_dir: str | Path) -> dict[str, Any] | None:
    """Every rank calls this right after ``build_engine``: restores weights, optimizer state and returns the
    client state of the newest complete epoch, or None when there is none."""
    latest = Path(ckpt_dir) / LATEST
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None or not client or CLIENT_KEY not in client:
        raise RuntimeError(f"checkpoint {Path(ckpt_dir) / tag} is incomplete; remove {latest} to start afresh")
    return json.loads(client[CLIENT_KEY])


def _gathered(engine, modifier_rank: int | None):
    """Under ZeRO-3 the full parameters, all-gathered from every rank's partition for the duration (every
    rank must enter); with ``modifier_rank`` set, that rank's changes reach the others on exit."""
    if not engine.zero_optimization_partition_weights():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=modifier_rank)


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The module's full weights and buffers as CPU tensors on rank 0, None on the others. Every rank
    calls this: under ZeRO-3 each holds only its partition, and gathering is a collective."""
    rank, _ = world()
    with _gathered(engine, modifier_rank=None):
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}


def load_full_state(engine, state: dict[str, torch.Tensor] | None) -> None:
    """Every rank calls this; ``state`` (full weights) is needed on rank 0 only. Rank 0's weights and
    buffers reach the other ranks, then the fp32 master copy (ZeRO and bf16) is refreshed from them."""
    import torch.distributed as dist

    rank, world_size = world()
    with _gathered(engine, modifier_rank=0):
        if rank == 0:
            engine.module.load_state_dict(state)
        if world_size > 1:
            # under ZeRO-3 the gather broadcasts rank 0's parameters on exit; buffers (BN statistics) and
            # the parameters of the other stages are sent here, in place
            zero3 = engine.zero_optimization_partition_weights()
            tensors = [b for b in engine.module.buffers()] if zero3 else list(engine.module.state_dict().values())
            for t in tensors:
                broadcast_(t.data)
    refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
    if callable(refresh):  # ZeRO and bf16 keep fp32 partitions that would otherwise overwrite the load
        refresh()


def save_best(engine, ckpt_dir: str | Path, epoch: int) -> None:
    """Every rank calls this (see :func:`full_state_dict`); rank 0 writes ``best.pt`` atomically."""
    state = full_state_dict(engine)
    if state is not None:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
        # a kill leaves the previous best.pt intact
        atomic_write(Path(ckpt_dir) / BEST, lambda p: torch.save({"epoch": epoch, "model": state}, p))


def load_best(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """``{"epoch", "model"}`` of ``best.pt``, or None; plain tensors, loaded with ``weights_only=True``."""
    path = Path(ckpt_dir) / BEST
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None
