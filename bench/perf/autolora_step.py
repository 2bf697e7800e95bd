"""Performance of one AutoLoRa training step (``bench perf --only autolora_step``).

One step = PGD-``train_attack_steps`` on the main branch (input gradient only, eval mode) + the LoRA
branch's forward on x + the main branch's forward on x_adv + one backward + the optimizer step. Measured in
the same process as its parts on the same network and batch:

- ``fwd``: forward (eval mode, no grad);
- ``fwd_input_grad``: forward + backward to the input only (``torch.autograd.grad(loss, x)`` with the
  parameters frozen): what one attack iteration must cost;
- ``fwd_full_backward``: forward + backward to every parameter (train mode).

The floor of a step is ``steps x fwd_input_grad + 2 x fwd_full_backward`` (two training forwards, one
backward through both graphs). Variants (channels_last, fused SGD, torch.compile, bf16 autocast on GPU)
are measured the same way and reported as speed-ups over the plain fp32 eager step; the ones that win are
config switches (``channels_last``, ``fused_optimizer``, ``compile``). ``warmup_s`` is each variant's first
step (for compile variants: dynamo + inductor compilation of the attack and the two training branches;
``warmup_parts_s`` the parts' first calls, which compile two more graphs). Compilation reuses inductor's
on-disk cache (``TORCHINDUCTOR_CACHE_DIR``): point it at an empty folder to time a cold compile.
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from bench.engine import PlainEngine, cpu_has_native_bf16
from methods.attacks import eval_mode
from methods.autolora import AutoLoRa, AutoLoRaConfig, _Timer
from methods.base import TrainContext

BACKBONE = "cifar_resnet18_aa"


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _build(variant: dict, batch: int, device: torch.device):
    from bench.backbones import create_backbone

    torch.manual_seed(0)
    cfg = AutoLoRaConfig(batch_size=batch, channels_last=variant.get("channels_last", False),
                         fused_optimizer=variant.get("fused_optimizer", False),
                         input_resize=variant.get("input_resize"))
    backbone = create_backbone(BACKBONE, num_classes=10, input_resize=cfg.input_resize)
    method = AutoLoRa(cfg, backbone.to(device), 10)
    opt = method.make_optimizer()
    # in place, as build_engine does for cfg.compile: the attack (through engine.module) is compiled too
    engine = PlainEngine(method.model, opt, compile=bool(variant.get("compile")))
    method.lambda1, method.lambda2 = 0.5, 3.0  # λ as after a measurement; the values do not change the cost
    return method, engine, cfg


def _part_fns(method, engine, x, y) -> dict[str, Callable[[], None]]:
    model = engine.module

    def fwd():
        with torch.no_grad(), eval_mode(model):
            model(x)

    def fwd_input_grad():
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            with eval_mode(model):
                xa = x.detach().clone().requires_grad_(True)
                torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        finally:
            for p in params:
                p.requires_grad_(True)

    def fwd_full_backward():
        model.train()
        F.cross_entropy(model(x), y).backward()
        method.optimizer.zero_grad(set_to_none=True)

    return {"fwd_s": fwd, "fwd_input_grad_s": fwd_input_grad, "fwd_full_backward_s": fwd_full_backward}


def _step_runner(method, engine, x, y, autocast):
    ctx = TrainContext(steps_per_epoch=1)

    def one():
        with autocast():
            method.train_step(engine, (x, y), ctx)

    return one


def _timed(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def autolora_step_benchmark(quick: bool = False) -> dict[str, Any]:
    """Variants are built up front and timed round-robin (one step of each per round), so a machine shared
    with other work slows them alike; medians over the rounds are reported."""
    import os

    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, steps = 32, 10
    reps = 2 if quick else 3
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    variants: dict[str, dict] = {"fp32_eager": {}, "channels_last": {"channels_last": True},
                                 "fused_sgd": {"fused_optimizer": True}}
    if not quick:
        variants["channels_last+fused_sgd"] = {"channels_last": True, "fused_optimizer": True}
    # torch.compile: in the full run on every device (BENCH_PERF_COMPILE=0 skips it). On the project's
    # 2-core CPU (torch 2.14) the cold compile of the graphs one variant needs takes about a minute
    # (warmup_s).
    if not quick and os.environ.get("BENCH_PERF_COMPILE", "1") != "0":
        variants["compile"] = {"compile": True}
        variants["compile+channels_last"] = {"compile": True, "channels_last": True}
    # bf16 autocast, measured here rather than quoted: it pays on GPUs and on CPUs with bf16 instructions
    # (AVX512-BF16 / AMX); elsewhere it is slower than fp32 and the trial falls back to fp32 (bench.engine).
    # The benchmark times real bf16 autocast either way, so the ratio it reports is this machine's.
    native_bf16 = device.type == "cuda" or cpu_has_native_bf16()
    if device.type == "cuda" or not quick:
        variants["bf16_autocast"] = {"bf16_autocast": True}
        variants["bf16_autocast+channels_last"] = {"bf16_autocast": True, "channels_last": True}
    with_parts = {"fp32_eager", "channels_last"} if quick else set(variants)

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda"
                           else f"cpu x{torch.get_num_threads()}",
                           "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                           "backbone": BACKBONE, "batch": batch, "attack_steps": steps, "rounds": reps,
                           "native_bf16": native_bf16, "variants": {}}
    runners: dict[str, dict] = {}
    for name, variant in variants.items():
        try:
            method, engine, cfg = _build(variant, batch, device)
            xv = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
            if variant.get("bf16_autocast"):
                def autocast():
                    return torch.autocast(device.type, dtype=torch.bfloat16)
            else:
                autocast = nullcontext
            step = _step_runner(method, engine, xv, y, autocast)
            warmup = _timed(step)  # warm-up (and compilation)
            parts = _part_fns(method, engine, xv, y) if name in with_parts else {}
            t_parts = time.perf_counter()
            for fn in parts.values():
                with autocast():
                    fn()
            runners[name] = {"method": method, "step": step, "autocast": autocast, "parts": parts,
                             "times": [], "split": {}, "part_times": {k: [] for k in parts},
                             "warmup_s": warmup, "warmup_parts_s": time.perf_counter() - t_parts}
        except Exception as e:  # a variant the platform cannot run (e.g. no compiler) is reported, not fatal
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}"}
    for _ in range(reps):
        for name, r in runners.items():
            r["method"].timer = _Timer()
            r["times"].append(_timed(r["step"]))
            for k, v in r["method"].timer.totals.items():
                r["split"].setdefault(k, []).append(v)
            r["method"].timer = None
            for k, fn in r["parts"].items():
                with r["autocast"]():
                    r["part_times"][k].append(_timed(fn))
    for name, r in runners.items():
        row: dict[str, Any] = {"step_s": statistics.median(r["times"]),
                               "split_s": {k: statistics.median(v) for k, v in r["split"].items()},
                               "warmup_s": r["warmup_s"], "warmup_parts_s": r["warmup_parts_s"]}
        row["split_s"]["data_wait"] = 0.0  # resident tensors here; the loader is benchmarked in bench.perf.loader
        if r["parts"]:
            parts = {k: statistics.median(v) for k, v in r["part_times"].items()}
            row["parts_s"] = parts
            row["floor_s"] = steps * parts["fwd_input_grad_s"] + 2 * parts["fwd_full_backward_s"]
            row["ratio_to_floor"] = row["step_s"] / row["floor_s"]
        out["variants"][name] = row
    base = out["variants"].get("fp32_eager")
    if base and "step_s" in base:
        for row in out["variants"].values():
            if "step_s" in row:
                row["speedup_vs_fp32_eager"] = base["step_s"] / row["step_s"]
        p = base["parts_s"]
        out.update(step_s=base["step_s"], split_s=base["split_s"], floor_s=base["floor_s"],
                   ratio_to_floor=base["ratio_to_floor"])
        # Epoch-level extras per training sample, paper setting: one clean pass (eval, no grad) over the
        # training data for λ; PGD-10 + a clean pass over the validation split (5% of the data, so 5/95 of
        # the training split's size).
        per = 1.0 / batch
        train = base["step_s"] * per
        lam = p["fwd_s"] * per
        val = (5 / 95) * (steps * p["fwd_input_grad_s"] + 2 * p["fwd_s"]) * per
        total = train + lam + val
        out["epoch_shares"] = {"train_steps": train / total, "lambda_clean_pass": lam / total,
                               "validation_pgd10": val / total}
        bf16 = out["variants"].get("bf16_autocast", {})
        if "speedup_vs_fp32_eager" in bf16:  # this machine's bf16 / fp32 ratio (> 1: bf16 is faster)
            out["bf16_autocast_speedup"] = bf16["speedup_vs_fp32_eager"]
            out["bf16_autocast_used_by_trials"] = native_bf16  # else train_autocast trains in fp32
        out["winners"] = sorted((n for n, r in out["variants"].items()
                                 if r.get("speedup_vs_fp32_eager", 0) > 1.05 and n != "fp32_eager"),
                                key=lambda n: -out["variants"][n]["speedup_vs_fp32_eager"])
    out["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    out["wall_s"] = round(time.time() - t_start, 1)
    return out


if __name__ == "__main__":  # python -m bench.perf.autolora_step [--quick]
    import json
    import sys

    print(json.dumps(autolora_step_benchmark(quick="--quick" in sys.argv), indent=2, default=float))
