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
config switches (``channels_last``, ``fused_optimizer``, ``compile``).
"""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

from methods.attacks import eval_mode
from methods.autolora import AutoLoRa, AutoLoRaConfig, _Timer
from methods.base import TrainContext

BACKBONE = "cifar_resnet18_aa"


class _PlainEngine:
    """The engine interface (``engine(x)``, ``backward``, ``step``, ``module``) without DeepSpeed, so the
    numbers are the method's own; DeepSpeed stage 0 adds only its bookkeeping on top."""

    def __init__(self, module, forward, optimizer):
        self.module, self._forward, self.optimizer = module, forward, optimizer

    def __call__(self, x):
        return self._forward(x)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _build(variant: dict, batch: int, device: torch.device):
    from bench.backbones import create_backbone

    torch.manual_seed(0)
    cfg = AutoLoRaConfig(batch_size=batch, channels_last=variant.get("channels_last", False),
                         fused_optimizer=variant.get("fused_optimizer", False))
    backbone = create_backbone(BACKBONE, num_classes=10)
    method = AutoLoRa(cfg, backbone.to(device), 10)
    opt = method.make_optimizer()
    forward = method.model
    if variant.get("compile"):
        forward = torch.compile(method.model)
    engine = _PlainEngine(forward if variant.get("compile") else method.model, forward, opt)
    method.lambda1, method.lambda2 = 0.5, 3.0  # λ as after a measurement; the values do not change the cost
    return method, engine, cfg


def _parts(method, engine, x, y, reps: int) -> dict[str, float]:
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

    return {"fwd_s": _median_time(fwd, reps), "fwd_input_grad_s": _median_time(fwd_input_grad, reps),
            "fwd_full_backward_s": _median_time(fwd_full_backward, reps)}


def _step(method, engine, x, y, reps: int, autocast) -> dict[str, Any]:
    ctx = TrainContext(steps_per_epoch=reps + 1)

    def one():
        with autocast():
            method.train_step(engine, (x, y), ctx)

    one()  # warm-up (and compilation)
    method.timer = _Timer()
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        one()
        _sync()
        times.append(time.perf_counter() - t)
    split = {k: v / reps for k, v in method.timer.totals.items()}
    method.timer = None
    step = statistics.median(times)
    split["other"] = max(0.0, sum(times) / reps - sum(split.values()))
    split["data_wait"] = 0.0  # batches are resident tensors here; the loader is benchmarked in perf_data
    return {"step_s": step, "split_s": split}


def autolora_step_benchmark(quick: bool = False) -> dict[str, Any]:
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, steps = 32, 10
    reps = 2 if quick else 5
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)

    variants: dict[str, dict] = {"fp32_eager": {}, "channels_last": {"channels_last": True},
                                 "fused_sgd": {"fused_optimizer": True}}
    if not quick:  # compilation alone takes minutes on a small CPU
        variants["compile"] = {"compile": True}
        variants["channels_last+fused_sgd"] = {"channels_last": True, "fused_optimizer": True}
    if device.type == "cuda":
        variants["bf16_autocast"] = {"bf16_autocast": True}
        variants["bf16_autocast+channels_last"] = {"bf16_autocast": True, "channels_last": True}

    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda"
                           else f"cpu x{torch.get_num_threads()}",
                           "backbone": BACKBONE, "batch": batch, "attack_steps": steps, "reps": reps,
                           "variants": {}}
    base = None
    for name, variant in variants.items():
        try:
            method, engine, cfg = _build(variant, batch, device)
            xv = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
            if variant.get("bf16_autocast"):
                def autocast():
                    return torch.autocast(device.type, dtype=torch.bfloat16)
            else:
                autocast = nullcontext
            row: dict[str, Any] = {}
            if name in ("fp32_eager", "channels_last") or not quick:
                with autocast():
                    parts = _parts(method, engine, xv, y, reps)
                row["parts_s"] = parts
                row["floor_s"] = steps * parts["fwd_input_grad_s"] + 2 * parts["fwd_full_backward_s"]
            row.update(_step(method, engine, xv, y, reps, autocast))
            if "floor_s" in row:
                row["ratio_to_floor"] = row["step_s"] / row["floor_s"]
            if name == "fp32_eager":
                base = row
            if base is not None:
                row["speedup_vs_fp32_eager"] = base["step_s"] / row["step_s"]
            out["variants"][name] = row
        except Exception as e:  # a variant the platform cannot run (e.g. no compiler) is reported, not fatal
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}"}

    if base is not None:
        p = base["parts_s"]
        out["step_s"] = base["step_s"]
        out["split_s"] = base["split_s"]
        out["floor_s"] = base["floor_s"]
        out["ratio_to_floor"] = base["ratio_to_floor"]
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
        wins = sorted((n for n, r in out["variants"].items()
                       if r.get("speedup_vs_fp32_eager", 0) > 1.03 and n != "fp32_eager"),
                      key=lambda n: -out["variants"][n]["speedup_vs_fp32_eager"])
        out["winners"] = wins
    out["wall_s"] = round(time.time() - t_start, 1)
    return out


if __name__ == "__main__":  # python -m bench.perf_autolora [--quick]
    import json
    import sys

    print(json.dumps(autolora_step_benchmark(quick="--quick" in sys.argv), indent=2, default=float))
