"""Routine output of the libraries under the suite, filtered at its source (their loggers, their warning
filters, their environment switches), so that what a user sees is the suite's progress and the warnings
that need them. The suite's own warnings (e.g. bf16_autocast's fallback) are untouched; BENCH_DEBUG=1
keeps everything."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings


def quiet_routine_output() -> None:
    """Called once per process that runs trials (the CLI, each Ray trial process). Imports nothing heavy."""
    if os.environ.get("BENCH_DEBUG"):
        return
    # torch: "No CUDA runtime is found, using CUDA_HOME=..." when DeepSpeed loads its CPU op
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Ray: its INFO lines and the one-per-worker deduplication notices; Tune's per-result INFO lines
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed/torch deprecation notices about their own internals (nothing a user can change)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"deepspeed(\.|$)")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"deepspeed(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed(\.|$)")


def cpu_only_deepspeed(cuda: bool) -> None:
    """Without a GPU, tell DeepSpeed so before it is imported: it otherwise probes for one and warns
    "Setting accelerator to CPU" on every run."""
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


@contextlib.contextmanager
def deepspeed_prints():
    """DeepSpeed's set-up prints "DeepSpeed ... built successfully" (a bare print, no logger) on every
    run: swallowed here (BENCH_DEBUG=1 shows it); errors still raise."""
    if os.environ.get("BENCH_DEBUG"):
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield
