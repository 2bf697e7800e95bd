"""The sharded evaluation's speed on this machine: AutoAttack images/s in one process and as 1 and 2 Ray
shards (one CPU and one torch thread each), and what the driver costs on top (Ray start-up, scheduling,
moving the weights and flags, merging).

The network is the embedded backbone (cifar_resnet18_aa, its own CIFAR-10 head) on random 32x32 images
labelled with its own predictions: every sample is right clean, so AutoAttack attacks every one (the
evaluation's worst case). Quick: 8 samples, full: 32, in 4 batches; APGD-CE (standard AutoAttack's first
attack, which every sample goes through).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path


def _warm_workers(n: int) -> float:
    """Start ``n`` Ray workers and import what a shard imports, so the timings below are not cold starts."""
    import ray

    def warm():
        import time as _t

        from bench.eval_target import ModelRecipe

        ModelRecipe(kind="backbone", backbone="cifar_resnet18_aa").build()
        _t.sleep(1.0)  # hold the worker so that the n tasks land on n workers
        return True

    t0 = time.time()
    ray.get([ray.remote(num_cpus=1)(warm).remote() for _ in range(n)])
    return time.time() - t0


def sharded_eval_benchmark(quick: bool = False) -> dict:
    import ray
    import torch

    from bench.config import resolve_config
    from bench.eval_target import ModelRecipe
    from bench.sharded_eval import evaluate_sharded, sharded_flags

    n = 8 if quick else 32
    cfg = resolve_config("rft", {"eps": "8/255", "eval_batch_size": n // 4, "autoattack_version": "apgd-ce",
                                 "eval_pgd_steps": 0})
    recipe = ModelRecipe(kind="backbone", backbone="cifar_resnet18_aa")
    model = recipe.build()
    torch.manual_seed(0)
    x = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        y = model(x).argmax(1)
    state = model.state_dict()
    out: dict = {"samples": n, "batch_size": cfg.eval_batch_size, "attack": "apgd-ce", "eps": "8/255",
                 "model": "cifar_resnet18_aa (own head)"}
    with tempfile.TemporaryDirectory() as work:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as one shard
        try:
            flags0, rep0 = evaluate_sharded(recipe, state, x, y, cfg, shards=1, work_dir=Path(work) / "in_process")
        finally:
            torch.set_num_threads(threads)
        out["in_process"] = {"wall_s": rep0["wall_s"], "images_per_s": n / rep0["wall_s"]}
        started_here = not ray.is_initialized()
        if started_here:
            t0 = time.time()
            from bench.sweep.driver import _init_ray, _trial_env

            _init_ray(None, 2, _trial_env())  # as bench evaluate starts it (and as quiet: no Ray notices)
            out["ray_init_s"] = time.time() - t0
        try:
            out["worker_warm_up_s"] = _warm_workers(2)
            for k in (1, 2):
                flags, rep = sharded_flags(recipe, state, x, y, cfg, shards=k, work_dir=Path(work) / f"k{k}",
                                           progress=False)
                out[f"shards_{k}"] = {"wall_s": rep["wall_s"], "images_per_s": rep["images_per_s"],
                                      "slowest_shard_s": rep["slowest_shard_s"], "overhead_s": rep["overhead_s"],
                                      "same_flags_as_in_process": bool(torch.equal(flags["autoattack"],
                                                                                   flags0["autoattack"]))}
        finally:
            if started_here:
                ray.shutdown()
    out["speedup_2_vs_1_shards"] = out["shards_2"]["images_per_s"] / out["shards_1"]["images_per_s"]
    # the driver's cost: a 1-shard Ray run against the same work in this process
    out["driver_overhead_s"] = out["shards_1"]["wall_s"] - out["in_process"]["wall_s"]
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(sharded_eval_benchmark(parser.parse_args().quick), indent=2))
