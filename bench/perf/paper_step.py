"""Training steps at the papers' scale and the GPU-hours they imply (``bench perf --only paper_step``).

AutoLoRa's Table 2 setting: ResNet-50 at 224 pixels, batch 128, PGD-10 training (eps 8/255, step 2/255),
LoRA on the reference placement. Measured in one process, round-robin, for AutoLoRa and RFT:

- ``fp32_eager``: the plain step;
- ``fast``: bf16 autocast + channels_last + ``torch.compile`` (the config switches ``bf16``,
  ``channels_last``, ``compile``), and its speed-up over ``fp32_eager`` (target on a GPU: at least 2x);
- the FLOPs of one step (``torch.utils.flop_counter``: forward and backward, attack included) and the
  model-FLOPs utilisation of the fastest variant against the device's dense bf16 peak (target: 40%);
- AMT's meta-tuning step at its paper budget (ViT-S/16 at 128 pixels, 5-way 5-shot, 15 queries, 2 attack
  steps) in the same two variants.

From these, ``estimate`` gives the GPU-hours of the whole Table 2 (6 data sets x {RFT, TWINS, AutoLoRa}
x 3 seeds, 60 epochs, validation PGD-10 every epoch, test PGD-10 + standard AutoAttack) and of an AMT pool
(4 members x 30 epochs x 2000 episodes). Assumptions are in ``TABLE2_SETS`` and ``estimate``'s docstring.

On a CPU the same code runs at a small batch (4, quick: 2), without compile unless ``BENCH_PERF_COMPILE=1``,
and says so: ``device`` names the CPU and ``scaled_from_batch`` the batch the estimate scales from.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F

# (train images, test images) per Table 2 data set as the suite's converters write them. Caltech-256
# (the authors' split: 150 entries per class for 257 classes, with spill-over; test: the rest) is approximate.
TABLE2_SETS = {"cifar10": (50000, 10000), "cifar100": (50000, 10000), "dtd": (3760, 1880),
               "dogs": (12000, 8580), "cub200": (5994, 5794), "caltech256": (38550, 7000)}
TABLE2_EPOCHS, TABLE2_SEEDS, VAL_FRACTION = 60, 3, 0.05
# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets; matched on the device name.
BF16_PEAK = {"H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # no meaningful tensor-core peak for a CPU
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def _supervised(method: str, variant: dict, batch: int, device: torch.device):
    """(method object, engine, batch) for a Table 2 step."""
    from bench.backbones import create_backbone
    from bench.config import resolve_config
    from bench.engine import PlainEngine
    from methods import get_method

    torch.manual_seed(0)
    cfg = resolve_config(method, {"batch_size": batch, "eps": 8 / 255, "train_attack_steps": 10,
                                  "train_step_size": 2 / 255, "channels_last": variant["channels_last"],
                                  "backbone": "madry_resnet50"})
    m = get_method(method)(cfg, create_backbone("madry_resnet50", 10), 10)
    m.model.to(device)
    opt = m.make_optimizer()
    engine = PlainEngine(m.model, opt, compile=variant["compile"])
    if hasattr(m, "lambda1"):
        m.lambda1, m.lambda2 = 0.5, 3.0  # λ as after a measurement; the values do not change the cost
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 224, 224, generator=g).to(device)
    if variant["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    return m, engine, (x, torch.randint(0, 10, (batch,), generator=g).to(device))


def _episodic(variant: dict, device: torch.device):
    """(AMT member, engine, episode) at the paper's budget."""
    from bench.backbones import create_backbone
    from bench.config import resolve_config
    from bench.engine import PlainEngine
    from methods import get_method
    from methods.base import Episode

    torch.manual_seed(0)
    cfg = resolve_config("amt", {"member_eps": 8.0, "ways": 5, "shots": 5, "queries": 15, "image_size": 128,
                                 "recipe": "paper", "backbone": "vit_small_patch16_224",
                                 "channels_last": variant["channels_last"]})
    m = get_method("amt")(cfg, create_backbone("vit_small_patch16_224", 5, image_size=128), 5)
    m.model.to(device)
    engine = PlainEngine(m.model, m.make_optimizer(), compile=variant["compile"])
    g = torch.Generator().manual_seed(0)
    sx, qx = (torch.rand(n, 3, 128, 128, generator=g).to(device) for n in (25, 75))
    labels = torch.arange(5).to(device)
    return m, engine, Episode(sx, labels.repeat_interleave(5), qx, labels.repeat_interleave(15))


def _parts(model, x, y) -> dict[str, Callable[[], None]]:
    """Per-batch costs the epoch estimate needs besides the step: a clean pass and one attack iteration."""
    from methods.attacks import eval_mode

    def fwd():
        with torch.no_grad(), eval_mode(model):
            model(x)

    def fwd_input_grad():
        with eval_mode(model):
            xa = x.detach().clone().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xa), y), xa)

    return {"fwd_s": fwd, "fwd_input_grad_s": fwd_input_grad}


# Training forwards per step, each followed by a backward to the weights (AutoLoRa: the LoRA branch on x and
# the main branch on x_adv, one backward through both).
TRAIN_FORWARDS = {"autolora": 2, "rft": 1}


def step_flops(model, x, method: str, attack_steps: int) -> float | None:
    """Model FLOPs of one step, from a counted forward: ``fwd x (2 x attack_steps + 3 x training forwards)``
    (an attack iteration is a forward and a backward to the input, about 2 forwards; a training forward and
    its backward to the weights and inputs, about 3). Counted on a forward alone because FlopCounterMode's
    module hooks refuse ``torch.autograd.grad``, which every attack iteration calls (torch 2.14)."""
    if method not in TRAIN_FORWARDS:
        return None
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return float(counter.get_total_flops()) * (2 * attack_steps + 3 * TRAIN_FORWARDS[method])


def paper_step_benchmark(quick: bool = False) -> dict[str, Any]:
    from methods.base import TrainContext

    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    batch = 128 if on_gpu else (2 if quick else 4)
    reps = (3 if quick else 5) if on_gpu else 1
    compile_ok = on_gpu or os.environ.get("BENCH_PERF_COMPILE") == "1"
    variants = {"fp32_eager": {"bf16": False, "channels_last": False, "compile": False},
                "fast": {"bf16": True, "channels_last": True, "compile": compile_ok}}
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu x{torch.get_num_threads()} (not a GPU figure)",
        "batch": batch, "image_size": 224, "backbone": "resnet50 (madry_resnet50)", "train_attack_steps": 10,
        "fast_variant": "bf16 autocast + channels_last" + (" + compile" if compile_ok else " (compile skipped on CPU)"),
        "bf16_peak_flops": device_peak(device), "steps": {}}
    ctx = TrainContext(steps_per_epoch=1)
    runs: dict[str, dict] = {}
    for method in ("autolora", "rft", "amt"):
        if method == "amt" and quick and not on_gpu:
            continue  # ViT-S at 128 px on a 2-core CPU: minutes per variant, nothing a CPU figure would show
        for vname, variant in variants.items():
            key = f"{method}/{vname}"
            try:
                m, engine, data = (_episodic(variant, device) if method == "amt"
                                   else _supervised(method, variant, batch, device))
                autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if variant["bf16"]
                            else nullcontext)

                def step(m=m, engine=engine, data=data, autocast=autocast):
                    with autocast():
                        m.train_step(engine, data, ctx)
                warmup = _timed(step)  # first step: allocation, cudnn autotune, compilation
                runs[key] = {"step": step, "times": [], "warmup_s": warmup, "method": method, "m": m,
                             "engine": engine, "data": data, "autocast": autocast}
            except Exception as e:  # a variant the platform cannot run is reported, not fatal
                out["steps"][key] = {"error": f"{type(e).__name__}: {e}"}
    for _ in range(reps):  # round-robin: a shared machine slows every variant alike
        for r in runs.values():
            r["times"].append(_timed(r["step"]))
    for key, r in runs.items():
        row: dict[str, Any] = {"step_s": statistics.median(r["times"]), "warmup_s": round(r["warmup_s"], 3)}
        if r["method"] != "amt":
            x, y = r["data"]
            row["images_per_s"] = len(x) / row["step_s"]
            for name, fn in _parts(r["engine"].module, x, y).items():
                with r["autocast"]():
                    fn()
                    row[name] = statistics.median(_timed(fn) for _ in range(max(1, reps)))
        if key.endswith("fp32_eager") and r["method"] != "amt":
            row["flops_per_step"] = step_flops(r["engine"].module, r["data"][0], r["method"], 10)
        out["steps"][key] = row
    for method in ("autolora", "rft", "amt"):
        base, fast = out["steps"].get(f"{method}/fp32_eager", {}), out["steps"].get(f"{method}/fast", {})
        if "step_s" in base and "step_s" in fast:
            fast["speedup_vs_fp32_eager"] = base["step_s"] / fast["step_s"]
            best = min(base["step_s"], fast["step_s"])
            if base.get("flops_per_step") and out["bf16_peak_flops"]:
                fast["mfu_fastest"] = base["flops_per_step"] / best / out["bf16_peak_flops"]
    out["estimate"] = estimate(out["steps"], batch)
    if not on_gpu:  # the same arithmetic on this CPU's figures: hours on this machine, not GPU-hours
        out["estimate"] = {k.replace("gpu_hours", "hours_on_this_cpu"): v for k, v in out["estimate"].items()}
    out["wall_s"] = round(time.time() - t_start, 1)
    return out


def _fastest(steps: dict, method: str) -> dict | None:
    rows = [steps.get(f"{method}/{v}", {}) for v in ("fast", "fp32_eager")]
    rows = [r for r in rows if "step_s" in r]
    return min(rows, key=lambda r: r["step_s"]) if rows else None


def estimate(steps: dict, batch: int) -> dict[str, Any]:
    """GPU-hours from measured per-batch costs, each method at its fastest variant, scaled linearly from
    ``batch`` to the paper's 128 (exact on a GPU run at 128; a CPU run only shows the arithmetic).

    Per (data set, method, seed): 60 epochs of training steps over 95% of the training images, per epoch
    PGD-10 + a clean pass over the 5% validation split, AutoLoRa's λ clean pass over the training data; at
    the end PGD-10 and standard AutoAttack on the test set. AutoAttack per test image is taken as APGD-CE
    (100 iterations) on every image, then APGD-T (9 targets x 100) and FAB-T (9 x 100) input-gradient
    iterations and Square (5000 forward queries) on the images still robust, assumed half: a rough figure.
    TWINS is costed as RFT (one PGD-10 attack and one forward/backward over the batch per step).
    AMT pool: 4 members x 30 epochs x 2000 episodes, validation 120 episodes per epoch (clean)."""
    scale = 128 / batch
    out: dict[str, Any] = {"scaled_from_batch": batch, "assumptions": "see bench/perf/paper_step.py:estimate"}
    amt = _fastest(steps, "amt")
    if amt is not None:
        # validation: 120 clean episodes per epoch, costed as a tenth of a training episode each (a guess
        # on the safe side: no attack, no backward)
        episodes = 4 * 30 * (2000 + 120 * 0.1)
        out["amt_pool_gpu_hours"] = round(episodes * amt["step_s"] / 3600, 2)
    per_method = {}
    for method in ("autolora", "rft"):
        r = _fastest(steps, method)
        if r is None or "fwd_s" not in r:
            return out
        per_method[method] = {k: r[k] / batch for k in ("step_s", "fwd_s", "fwd_input_grad_s")}  # per image
    per_method["twins"] = per_method["rft"]
    total = 0.0
    rows = {}
    for ds, (n_train, n_test) in TABLE2_SETS.items():
        for method, c in per_method.items():
            train = n_train * (1 - VAL_FRACTION) * c["step_s"]
            val = n_train * VAL_FRACTION * (10 * c["fwd_input_grad_s"] + 2 * c["fwd_s"])
            lam = n_train * c["fwd_s"] if method == "autolora" else 0.0
            aa = n_test * (100 * c["fwd_input_grad_s"] + 0.5 * (1800 * c["fwd_input_grad_s"] + 5000 * c["fwd_s"]))
            test = n_test * (10 * c["fwd_input_grad_s"] + c["fwd_s"]) + aa
            seconds = TABLE2_EPOCHS * (train + val + lam) + test
            rows[f"{ds}/{method}"] = round(seconds * TABLE2_SEEDS / 3600, 3)
            total += seconds * TABLE2_SEEDS
    out["table2_gpu_hours_by_set_method"] = rows
    out["table2_gpu_hours"] = round(total / 3600, 2)
    if scale != 1:
        out["note"] = f"per-image costs measured at batch {batch}; a batch of 128 is usually cheaper per image"
    return out


if __name__ == "__main__":  # python -m bench.perf.paper_step [--quick]
    import json
    import sys

    print(json.dumps(paper_step_benchmark(quick="--quick" in sys.argv), indent=2, default=float))
