"""The few-shot test evaluation of a finished episodic trial, sharded by episodes as Ray tasks (``bench evaluate
RUN_DIR [--shards K]`` of an amt or pmf row).

Everything random in test episode i is a function of (the sampler's seed, i): its images
(``EpisodeSampler.sample``), the classifier's draws (``episode=(sampler seed, i)``: AMT's merge scoring and
trimming, PMF's fine-tuning, ``methods/episode_rng.py``) and AutoAttack's (``seed + i``); PGD has no random
start. Shard k gets the contiguous episodes ``[a_k, b_k)`` of every test domain; the driver concatenates the
per-episode flags in episode order. K shards therefore give the per-query flags of one process evaluating
all episodes (on the same kind of device and kernels), and so the same means and intervals.

A shard is a Ray task (``bench.sharded_eval``'s progress counter, attempt log and Ray start-up) holding its
folder ``WORK/episodes-START-STOP/``: one file of per-query flags per finished episode and test domain, and a
line per attempt. A shard whose worker dies is retried (``max_retries``) and reloads the episodes it finished:
only the rest run again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from bench.files import atomic_write_json
from bench.sharded_eval import ATTEMPTS, _Progress, shard_ranges, wait_for_shards

SHARD_DIR = "episodes-{:06d}-{:06d}"  # a shard's folder, by its episode range: another K reuses what fits
EPISODE_FILE = "{target}-{index:06d}.json"  # one finished episode's per-query flags in one test domain


def build_method(recipe, state: dict[str, torch.Tensor] | None, init_seed: int, device: torch.device):
    """The trial's method as its test evaluation had it: built under the trial's seed (the initial weights of
    what no checkpoint holds, e.g. the base weights under an AMT pool's adapters, are the seed's), then the
    selected weights (None: a merging trial, whose pool is loaded from its config's ``pool_dir``)."""
    from bench.trial import seed_everything

    seed_everything(init_seed)
    method = recipe.build_method()
    if state is not None:
        method.model.load_state_dict(state)  # strictly: weights that do not fit are an error
    method.model.to(device).eval()
    return method


def weights_digest(method) -> str:
    """What a saved episode is valid for, on the weights' side: the network and any pool members."""
    h = hashlib.blake2b(digest_size=16)
    tensors = list(method.model.state_dict().values())
    for member in getattr(method, "members", []):
        tensors += [member["tensors"][k] for k in sorted(member["tensors"])]
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint(digest: str, cfg, device: torch.device) -> str:
    settings = {"weights": digest, "config": cfg.to_dict(), "device": str(device), "torch": torch.__version__}
    return hashlib.blake2b(json.dumps(settings, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def fewshot_shard(recipe, state, cfg, *, init_seed: int, data_root: str | None, shard: int, start: int, stop: int,
                  shard_dir: str, threads: int | None = None, use_gpu: bool = False, progress=None) -> dict[str, Any]:
    """One shard, in whatever process runs it: rebuild the method, then the per-query flags of test episodes
    ``[start, stop)`` of every test domain, reloading the episodes an earlier attempt finished."""
    from bench.fewshot import episode_flags
    from bench.evaluate import fp32_eval
    from bench.tasks import EpisodicTask
    from data_shards.manifest import read_manifest
    from data_shards.paths import dataset_dir

    t0 = time.time()
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
    folder = Path(shard_dir)
    folder.mkdir(parents=True, exist_ok=True)
    method = build_method(recipe, state, init_seed, device)
    fingerprint = _fingerprint(weights_digest(method), cfg, device)
    ds_dir = dataset_dir(cfg.dataset, data_root)
    samplers = EpisodicTask(cfg, ds_dir, read_manifest(ds_dir), device=device, data_root=data_root).test_samplers()
    paths = {(name, i): folder / EPISODE_FILE.format(target=name.replace("/", "_"), index=i)
             for name in samplers for i in range(start, stop)}
    saved = {key: _load_episode(path, fingerprint) for key, path in paths.items()}
    attempt = {"time": t0, "pid": os.getpid(), "host": socket.gethostname(), "device": str(device),
               "resumed_episodes": sum(v is not None for v in saved.values())}
    with open(folder / ATTEMPTS, "a") as f:  # one line per attempt: a retried shard shows two
        f.write(json.dumps(attempt) + "\n")

    flags: dict[str, list[dict[str, list[bool]]]] = {}
    with fp32_eval(method.model):
        for name, sampler in samplers.items():
            flags[name] = []
            for i in range(start, stop):
                episode = saved[name, i]
                if episode is None:
                    computed = episode_flags(method, sampler.sample(i), (sampler.seed, i), cfg, attack=True,
                                             autoattack=cfg.fewshot_autoattack, device=device)
                    episode = {k: v.tolist() for k, v in computed.items()}
                    atomic_write_json(paths[name, i], {"fingerprint": fingerprint, "flags": episode}, indent=None)
                flags[name].append(episode)
                if progress is not None:
                    progress.add.remote(len(episode["clean"]))
    return {"shard": shard, "range": [start, stop], "episodes": stop - start, "flags": flags,
            "shape": {name: {"ways": s.ways, "shots": s.shots, "sampler_seed": s.seed} for name, s in samplers.items()},
            "wall_s": time.time() - t0, "device": str(device), "host": attempt["host"], "pid": attempt["pid"],
            "threads": torch.get_num_threads(), "resumed_episodes": attempt["resumed_episodes"]}


def _load_episode(path: Path, fingerprint: str) -> dict[str, list[bool]] | None:
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    return saved["flags"] if saved.get("fingerprint") == fingerprint else None  # other weights or settings: redo


def sharded_fewshot(recipe, state, cfg, *, init_seed: int, shards: int, work_dir: str | Path,
                    data_root: str | Path | None = None, address: str | None = None, cpus_per_shard: float = 1,
                    gpus_per_shard: float = 0, max_retries: int = 3, progress: bool = True
                    ) -> tuple[dict[str, list[dict[str, torch.Tensor]]], dict[str, dict], dict[str, Any]]:
    """Per-query flags of test episodes ``0..cfg.episodes-1`` of every test domain ({name: one dict of flags
    per episode, in order}), each domain's ways, shots and sampler seed, and a report of the shards. One
    shard without ``address`` runs in this process (same code and folder, no Ray start-up); else ``shards``
    Ray tasks on the running Ray, or ``ray.init(address)`` (None: a local one)."""
    t0 = time.time()
    work_dir = Path(work_dir)
    ranges = shard_ranges(cfg.episodes, 1, shards)  # contiguous episode ranges, as even as can be
    common = dict(init_seed=init_seed, data_root=str(data_root) if data_root is not None else None)
    if len(ranges) == 1 and address is None:
        (a, b), = ranges
        outs = [fewshot_shard(recipe, state, cfg, **common, shard=0, start=a, stop=b,
                              shard_dir=str(work_dir / SHARD_DIR.format(a, b)), use_gpu=gpus_per_shard > 0)]
        t_ray = t0
    else:
        outs, t_ray = _on_ray(recipe, state, cfg, ranges, common, work_dir, address=address,
                              cpus_per_shard=cpus_per_shard, gpus_per_shard=gpus_per_shard, max_retries=max_retries,
                              progress=progress)
    flags = {name: [{k: torch.tensor(v, dtype=torch.bool) for k, v in episode.items()}
                    for out in outs for episode in out["flags"][name]]
             for name in outs[0]["flags"]}
    assert all(len(episodes) == cfg.episodes for episodes in flags.values())
    wall = time.time() - t0
    per_shard = []
    for out in outs:
        attempts_path = work_dir / SHARD_DIR.format(*out["range"]) / ATTEMPTS
        per_shard.append({k: out[k] for k in ("shard", "range", "episodes", "wall_s", "device", "host", "threads",
                                              "resumed_episodes")}
                         | {"attempts": len(attempts_path.read_text().splitlines())})
    report = {"shards": len(ranges), "in_process": len(ranges) == 1 and address is None, "unit": "episodes",
              "cpus_per_shard": cpus_per_shard, "gpus_per_shard": gpus_per_shard, "max_retries": max_retries,
              "wall_s": wall, "ray_init_s": t_ray - t0, "slowest_shard_s": max(o["wall_s"] for o in outs),
              "episodes_per_s": cfg.episodes * len(flags) / wall, "per_shard": per_shard, "work_dir": str(work_dir)}
    report["overhead_s"] = wall - report["slowest_shard_s"]  # Ray start-up, scheduling, transfers, merging
    atomic_write_json(work_dir / "shards.json", report)
    return flags, outs[0]["shape"], report


def _on_ray(recipe, state, cfg, ranges, common, work_dir: Path, *, address, cpus_per_shard, gpus_per_shard,
            max_retries, progress) -> tuple[list[dict], float]:
    """The shards as Ray tasks; their outputs in shard order and when Ray was up."""
    import ray

    if not ray.is_initialized():  # as a sweep starts it: the suite's code travels to every node
        from bench.sweep.driver import _init_ray, _trial_env

        _init_ray(address, None, _trial_env())
    t_ray = time.time()
    counter = ray.remote(num_cpus=0)(_Progress).remote()
    state_ref = ray.put({k: v.detach().cpu() for k, v in state.items()} if state is not None else None)
    task = ray.remote(fewshot_shard).options(num_cpus=cpus_per_shard, num_gpus=gpus_per_shard,
                                             max_retries=max_retries, retry_exceptions=False)
    pending = [task.remote(recipe, state_ref, cfg, **common, shard=k, start=a, stop=b,
                           shard_dir=str(work_dir / SHARD_DIR.format(a, b)), threads=max(1, math.ceil(cpus_per_shard)),
                           use_gpu=gpus_per_shard > 0, progress=counter)
               for k, (a, b) in enumerate(ranges)]
    ordered = wait_for_shards(pending, counter, desc=f"few-shot evaluation in {len(pending)} shards",
                              progress=progress, counts=("episodes", "queries"))
    return ordered, t_ray
