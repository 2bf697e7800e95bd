"""One trial end to end: data, backbone, method, DeepSpeed engine; train; select; evaluate; report.

``run_trial`` is what ``bench run`` calls and what every Ray Tune trial calls, so a sweep's trial and a
hand-run trial are the same code path and write the same ``result.json``.
"""
from __future__ import annotations

import copy
import json
import os
import random
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from bench.backbones import check_backbone, create_backbone
from bench.config import config_hash, save_config
from bench.engine import (BEST, broadcast_, build_engine, full_state_dict, load_best, load_full_state,
                          load_latest, save_best, save_checkpoint, sync_buffers, train_autocast, trial_device,
                          world)
from bench.evaluate import clean_accuracy, pgd_accuracy, robust_metrics
from data_shards.manifest import read_manifest
from data_shards.paths import dataset_dir
from data_shards.reader import load_split, make_loader
from data_shards.transforms import output_size
from methods import get_method
from methods.attacks import eval_mode
from methods.base import BaseConfig, Episode, TrainContext

EpochCallback = Callable[[dict[str, Any], "Path | None"], None]  # (row, checkpoint folder or None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of everything random in epoch ``epoch`` (augmentation, attacks' random starts): a function of
    (seed, epoch) alone, so a trial resumed at that epoch replays it exactly."""
    return seed * 100_003 + epoch


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name, dist in (("torch", "torch"), ("timm", "timm"), ("peft", "peft"), ("ray", "ray"),
                       ("deepspeed", "deepspeed"), ("bench", "robust-lora-bench")):
        try:
            out[name] = md.version(dist)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def write_json_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def check_inputs(cfg: BaseConfig, data_root: str | Path | None) -> Path:
    """Everything that can be wrong with the request, checked before any work starts."""
    ds_dir = dataset_dir(cfg.dataset, data_root)
    manifest = read_manifest(ds_dir)
    check_backbone(cfg.backbone)
    method_cls = get_method(cfg.method)
    needed = ("train", "test") if method_cls.episodic else ("train", "val", "test")
    missing = [s for s in needed if s not in manifest["splits"]]
    if missing:
        raise ValueError(f"data set {cfg.dataset!r} ({ds_dir}) has no {'/'.join(missing)} split")
    for target in getattr(cfg, "target_datasets", None) or []:
        if "test" not in read_manifest(dataset_dir(target, data_root))["splits"]:
            raise ValueError(f"target data set {target!r} has no test split")
    return ds_dir


def run_trial(cfg: BaseConfig, out_dir: str | Path, *, data_root: str | Path | None = None,
              progress: bool = True, epoch_callback: EpochCallback | None = None, run_id: str | None = None,
              group: str | None = None, sweep: dict | None = None, track: bool = True,
              evaluate: bool = True, prerequisites_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one trial into ``out_dir`` and return its result (also written to ``out_dir/result.json``).

    A trial whose method needs runs first (``Method.prerequisite_runs``, e.g. an ``amt`` pool's members)
    runs them here, one after the other, into ``prerequisites_dir`` (default ``out_dir/_prerequisites``;
    finished runs found there are reused), then the trial the method assembles from them."""
    out_dir = Path(out_dir)
    ds_dir = check_inputs(cfg, data_root)
    if is_pool_config(cfg):
        cfg = train_pool(cfg, out_dir, data_root=data_root, progress=progress, group=group, track=track,
                         root=prerequisites_dir)
    return Trial(cfg, out_dir, ds_dir, progress=progress, epoch_callback=epoch_callback, run_id=run_id,
                 group=group, sweep=sweep, track=track, evaluate=evaluate, data_root=data_root).run()


def train_pool(cfg: BaseConfig, out_dir: str | Path, *, data_root=None, progress: bool = True,
               group: str | None = None, track: bool = True, root: str | Path | None = None) -> BaseConfig:
    """Run ``cfg``'s prerequisite runs (those not finished before) one after the other in ``root/<name>``
    (default ``out_dir/_prerequisites``), then return the trial the method assembles from them (AMT: the
    merging trial over the pool manifest it wrote into ``out_dir``)."""
    from filelock import FileLock

    from bench.prerequisites import PREREQUISITES_DIR, assemble, finished_result, prerequisite_runs

    root = Path(root) if root is not None else Path(out_dir) / PREREQUISITES_DIR
    for run in prerequisite_runs(cfg):
        run_dir = root / run.name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        # runs in a shared folder (--pool-cache) may be wanted by two `bench run`s at once: trained once
        with FileLock(str(run_dir) + ".lock"):
            if finished_result(run_dir) is None:
                # its own test evaluation would be thrown away: the trial that needs it is evaluated.
                # Its run id is its config's (the run's identity), so a reused run keeps one W&B run.
                run_trial(run.resolved(run_dir), run_dir, data_root=data_root, progress=progress, group=group,
                          track=track, evaluate=False)
    return assemble(cfg, root, out_dir)


def is_pool_config(cfg: BaseConfig) -> bool:
    """True when ``cfg``'s trial needs runs first (``Method.prerequisite_runs``; e.g. an ``amt`` pool)."""
    return bool(get_method(cfg.method).prerequisite_runs(cfg))


class Trial:
    def __init__(self, cfg, out_dir: Path, ds_dir: Path, *, progress, epoch_callback, run_id, group, sweep,
                 track, evaluate=True, data_root=None):
        self.evaluate, self.data_root = evaluate, data_root
        self.cfg, self.out_dir, self.ds_dir = cfg, out_dir, ds_dir
        self.progress, self.epoch_callback, self.group, self.sweep, self.track = (
            progress, epoch_callback, group, sweep, track)
        self.hash = config_hash(cfg)
        self.run_id = run_id or f"{cfg.method}-{cfg.dataset}-{self.hash}-s{cfg.seed}"
        self.rank, self.world_size = world()
        self.device = trial_device()
        self.ckpt_dir = out_dir / "checkpoints"

    # --- set-up ----------------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> dict | None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        args = self.out_dir / "args.yaml"
        if args.exists():
            import yaml

            old = yaml.safe_load(args.read_text())
            if config_hash(old) != self.hash or old.get("seed") != self.cfg.seed:
                raise ValueError(f"{self.out_dir} holds a run with another config (args.yaml); "
                                 f"use another --out or remove it")
            done = self.out_dir / "result.json"
            if done.exists():
                result = json.loads(done.read_text())
                if result.get("status") == "ok":
                    return result  # finished before: nothing to redo
        elif self.rank == 0:
            save_config(self.cfg, args)
        return None

    def _build(self):
        cfg = self.cfg
        manifest = read_manifest(self.ds_dir)
        self.manifest = manifest
        num_classes = self.num_classes = cfg.ways if self.method_cls.episodic else manifest["num_classes"]
        backbone = self._new_backbone()
        self.method = self.method_cls(cfg, backbone, num_classes)
        model = self.method.model.to(self.device)  # channels_last weights: build_engine decides
        optimizer = self.method.make_optimizer()
        if self.method.needs_training:
            self.engine = build_engine(model, optimizer, cfg)
        else:  # a merge-only trial evaluates a trained pool: DeepSpeed's set-up would be its largest cost
            from bench.engine import PlainEngine

            self.engine = PlainEngine(model, optimizer)

    def _new_backbone(self):
        cfg = self.cfg
        return create_backbone(cfg.backbone, self.num_classes, pretrained=cfg.pretrained,
                               image_size=output_size(cfg.transform, self.manifest, cfg.image_size)[0],
                               input_resize=cfg.input_resize)

    def _data(self):
        cfg = self.cfg
        per_rank = max(1, cfg.batch_size // self.world_size)
        cap = cfg.max_train_samples  # the reader caps the whole split, then splits it by node and worker
        if self.method_cls.episodic:
            from data_shards.episodes import EpisodeSampler

            fewshot = self.manifest.get("fewshot", {})
            base = cfg.base_classes or fewshot.get("base_classes") or list(range(self.manifest["num_classes"]))
            novel = cfg.novel_classes or fewshot.get("novel_classes") or base
            self.train_sampler = EpisodeSampler(self.ds_dir, "train", base, cfg.ways, cfg.shots, cfg.queries,
                                                seed=cfg.seed, image_size=cfg.image_size, transform=cfg.transform,
                                                augment=cfg.augment)
            self.val_sampler = self._val_sampler(base)
            self.test_sampler = EpisodeSampler(self.ds_dir, "test", novel, cfg.ways, cfg.shots, cfg.queries,
                                               seed=cfg.seed + 10_000, image_size=cfg.image_size,
                                               transform=cfg.transform)
            self.targets = self._targets(novel)
            self.steps_per_epoch = cfg.episodes_per_epoch
            return
        self.train_loader = make_loader(self.ds_dir, "train", per_rank, train=True, augment=cfg.augment,
                                        image_size=cfg.image_size, shuffle_buffer=cfg.shuffle_buffer,
                                        max_samples=cap, num_workers=cfg.num_workers, seed=cfg.seed,
                                        transform=cfg.transform)
        self.steps_per_epoch = len(self.train_loader)
        if self.world_size > 1:
            # Ranks may hold unequal shares of the shards: all take the smallest step count, or the
            # gradient all-reduce of the rank with more batches would wait forever.
            import torch.distributed as dist

            steps = torch.tensor([self.steps_per_epoch])
            dist.all_reduce(steps, op=dist.ReduceOp.MIN)
            self.steps_per_epoch = int(steps.item())
        self.val = load_split(self.ds_dir, "val", max_samples=cfg.n_val, image_size=cfg.image_size,
                              transform=cfg.transform)

    def _targets(self, novel) -> list[dict]:
        """The test domains: name, test sampler, validation sampler (None: no usable val split). Without
        ``target_datasets``: the source's novel classes, validated on the training data's held-out episodes.
        A named target uses its own test split and, for per-domain selection, its own val split, over its
        manifest's novel classes (the source's ``novel_classes`` for the source itself), else all its classes."""
        from data_shards.episodes import EpisodeSampler
        from data_shards.paths import dataset_dir

        cfg = self.cfg
        if not cfg.target_datasets:
            return [{"name": cfg.dataset, "test": self.test_sampler, "val": self.val_sampler}]
        out = []
        for name in cfg.target_datasets:
            if name == cfg.dataset:
                ds_dir, manifest, classes = self.ds_dir, self.manifest, novel
            else:
                ds_dir = dataset_dir(name, self.data_root)
                manifest = read_manifest(ds_dir)
                classes = manifest.get("fewshot", {}).get("novel_classes") or list(range(manifest["num_classes"]))
            test = EpisodeSampler(ds_dir, "test", classes, cfg.ways, cfg.shots, cfg.queries,
                                  seed=cfg.seed + 10_000, image_size=cfg.image_size, transform=cfg.transform)
            out.append({"name": name, "test": test, "val": self._val_sampler(classes, ds_dir, manifest)})
        return out

    def _val_sampler(self, classes, ds_dir=None, manifest=None):
        """Validation episodes come from a held-out (val) split, never the test set: the training data's,
        or a target data set's."""
        from data_shards.episodes import EpisodeSampler

        cfg = self.cfg
        ds_dir, manifest = ds_dir or self.ds_dir, manifest or self.manifest
        split = manifest["splits"].get("val")
        if split is None:
            return None
        counts: dict[int, int] = {}
        for shard_labels in split.get("labels", []):
            for label in shard_labels:
                counts[label] = counts.get(label, 0) + 1
        usable = [c for c in classes if counts.get(c, 0) >= cfg.shots + 1]
        if len(usable) < cfg.ways:
            return None
        queries = max(1, min(cfg.queries, min(counts[c] for c in usable) - cfg.shots))
        return EpisodeSampler(ds_dir, "val", usable, cfg.ways, cfg.shots, queries, seed=1234,
                              image_size=cfg.image_size, transform=cfg.transform)

    def _train_batches(self):
        cfg = self.cfg
        loader = make_loader(self.ds_dir, "train", cfg.eval_batch_size, train=False, image_size=cfg.image_size,
                             max_samples=cfg.max_train_samples, transform=cfg.transform)
        for x, y in loader:
            yield x.to(self.device), y.to(self.device)

    def _augmented_train_batches(self):
        # The training loader's own pipeline (augmentation, per-rank share) on a separate shuffle stream, so
        # that these passes leave the training epochs' data order as it is.
        if getattr(self, "_aug_loader", None) is None:
            self._aug_loader = copy.copy(self.train_loader)
            self._aug_loader.seed = self.train_loader.seed + 7919
        # each pass a function of (seed, epoch, pass within the epoch), so a resumed epoch replays it
        self._aug_loader.set_epoch(self._epoch * 1_000 + self._aug_passes)
        self._aug_passes += 1
        for x, y in self._aug_loader:
            yield x.to(self.device), y.to(self.device)

    # --- one epoch -------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        self._epoch, self._aug_passes = epoch, 0
        ctx = TrainContext(epoch=epoch, steps_per_epoch=self.steps_per_epoch, device=self.device,
                           train_batches=self._train_batches,
                           augmented_train_batches=None if self.method_cls.episodic else self._augmented_train_batches)
        logs = dict(self.method.start_epoch(ctx))
        self.engine.module.train()
        sums: dict[str, float] = {}
        n_steps = 0
        if self.method_cls.episodic:
            batches = (self.train_sampler.sample(epoch * cfg.episodes_per_epoch + i)
                       for i in range(cfg.episodes_per_epoch))
        else:
            self.train_loader.set_epoch(epoch)  # shard order, shuffle and augmentation of this epoch
            batches = iter(self.train_loader)
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.progress or self.rank != 0)
        for step, batch in enumerate(bar):
            if step >= self.steps_per_epoch:
                break
            ctx.step = step
            batch = [t.to(self.device) for t in batch]
            if cfg.channels_last:
                batch = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch]
            batch = Episode(*batch) if self.method_cls.episodic else tuple(batch)
            with train_autocast(cfg, self.device):
                step_logs = self.method.train_step(self.engine, batch, ctx)
            self.images_seen += (len(batch[0]) + len(batch[2]) if self.method_cls.episodic else len(batch[0])) \
                * self.world_size
            for k, v in step_logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_steps += 1
            if "train_loss" in step_logs:
                bar.set_postfix(loss=f"{step_logs['train_loss']:.3f}")
        logs.update({k: v / max(1, n_steps) for k, v in sums.items()})
        return logs

    def _validate(self, adversarial: bool = False, sampler=None) -> dict[str, float]:
        cfg = self.cfg
        if self.method_cls.episodic:
            sampler = sampler or self.val_sampler
            if sampler is None:
                return {}
            from dataclasses import replace

            from bench.fewshot import evaluate_fewshot

            attack = adversarial and cfg.val_pgd_steps > 0  # PGD-val_pgd_steps on the validation queries
            out = evaluate_fewshot(self.method, sampler, cfg.val_episodes,
                                   replace(cfg, eval_pgd_steps=cfg.val_pgd_steps), attack=attack,
                                   device=self.device, progress=False, autoattack="off")
            val = {"val_fewshot_acc": out["clean_acc"]}
            if attack:
                val["val_fewshot_pgd_acc"] = out["adv_acc"]
            return val
        model = self.method.eval_model()
        x, y = self.val
        val = {"val_clean_acc": clean_accuracy(model, x, y, cfg.eval_batch_size, self.device)}
        if cfg.val_pgd_steps > 0:
            val["val_pgd_acc"] = pgd_accuracy(model, x, y, eps=cfg.eps, step_size=cfg.eval_step_size,
                                              steps=cfg.val_pgd_steps, batch_size=cfg.eval_batch_size,
                                              device=self.device)
        return val

    # --- the whole trial -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.method_cls = get_method(cfg.method)
        done = self._prepare_out_dir()
        if done is not None:
            return done
        seed_everything(cfg.seed)
        t0 = time.time()
        self._build()
        self._data()
        start_epoch, self.images_seen, train_s = 0, 0, 0.0
        resumed = load_latest(self.engine, self.ckpt_dir)  # weights and optimizer state, on every rank
        if resumed is not None:  # a killed trial resumes after its last finished epoch
            self.method.load_state_dict(resumed["method"])
            start_epoch = resumed["epoch"] + 1
            self.images_seen, train_s = resumed["images_seen"], resumed["train_s"]
        tracker = None
        if self.track and self.rank == 0:
            from bench.report.tracking import start_run

            tracker = start_run(cfg.to_dict(), self.out_dir, run_id=self.run_id, name=self.run_id,
                                group=self.group, tags=[cfg.method, cfg.dataset, cfg.backbone],
                                job_type=cfg.method)
        history = list(resumed["history"]) if resumed is not None else []
        bar = tqdm(desc=f"{cfg.method} on {cfg.dataset}", initial=start_epoch, total=cfg.epochs, unit="epoch",
                   disable=not self.progress or self.rank != 0)
        for epoch in range(start_epoch, cfg.epochs if self.method.needs_training else start_epoch):
            seed_everything(epoch_seed(cfg.seed, epoch))
            t_epoch = time.time()
            logs = self._train_epoch(epoch)
            train_s += time.time() - t_epoch
            sync_buffers(self.engine)  # what the checkpoint keeps is what every rank goes on with
            # every rank decides on rank 0's validation figures (BN statistics may differ between ranks),
            # so that all take the same collective steps below
            val = self._from_rank0(self._validate())
            decision = self.method.end_epoch(epoch, val)
            row = {"epoch": epoch, **logs, **val, "lr": logs.get("lr", self.method.current_lr())}
            history.append(row)
            if decision.is_best:
                save_best(self.engine, self.ckpt_dir, epoch)
            has_best = float((self.ckpt_dir / BEST).exists())
            if decision.reload_best and self._from_rank0({"best": has_best})["best"]:
                best = load_best(self.ckpt_dir) if self.rank == 0 else None
                load_full_state(self.engine, best["model"] if best else None)
            stop = decision.stop or epoch == cfg.epochs - 1
            save_checkpoint(self.engine, self.ckpt_dir, epoch,
                            {"epoch": epoch, "method": self.method.state_dict(), "images_seen": self.images_seen,
                             "train_s": train_s, "history": history})
            if self.rank == 0:
                write_json_atomic(history, self.out_dir / "history.json")
            if tracker is not None:
                tracker.log(row, step=epoch)
            if self.epoch_callback is not None:
                self.epoch_callback(row, self.ckpt_dir)
            bar.set_postfix({k: f"{v:.3f}" for k, v in val.items()})
            bar.update(1)
            if stop:
                break
        bar.close()
        if not self.method.needs_training and not history:
            # A merging trial trains nothing but is still selected on validation (the sweep's objective):
            # validation episodes of what it evaluates, from the held-out training data.
            row = {"epoch": 0, **self._validate_targets()}
            history.append(row)
            if self.rank == 0:
                write_json_atomic(history, self.out_dir / "history.json")
            if tracker is not None:
                tracker.log(row, step=0)
            if self.epoch_callback is not None:
                self.epoch_callback(row, None)
        # evaluate the checkpoint that validation selected, else the last weights
        best = load_best(self.ckpt_dir) if self.rank == 0 else None
        selected_epoch = best["epoch"] if best else None
        if self.engine.zero_optimization_partition_weights():
            # ZeRO-3: each rank holds a partition of the weights and a forward needs every rank; all take
            # part in gathering the full weights (unless rank 0 has them in best.pt), then rank 0 alone
            # evaluates a plain copy of the method holding them
            if not self._from_rank0({"best": float(best is not None)})["best"]:
                best = {"model": full_state_dict(self.engine)}
            if self.rank == 0:
                self.method = self._plain_method(best["model"])
        elif best is not None:
            self.engine.module.load_state_dict(best["model"])
        if self.rank != 0:  # rank 0 alone evaluates and reports
            return {"status": "ok", "rank": self.rank, "history": history}
        seed_everything(epoch_seed(cfg.seed, cfg.epochs))  # the same attacks however many epochs ran here
        t_eval = time.time()
        # without its test evaluation a trial is a validation-only candidate (a pool member, a merge-search
        # setting): the leaderboard skips it
        result = self._evaluate() if self.evaluate else {**self._identity(), "stage": "validation"}
        eval_s = time.time() - t_eval
        cost = {"wall_s": time.time() - t0, "train_s": train_s, "eval_s": eval_s,
                "device": _device_name(self.device),
                "images_per_s": self.images_seen / train_s if train_s > 0 else None}
        pool = _pool_cost(cfg)
        if pool:  # a merging trial costs its pool's training too (summed: the cost of the result from scratch)
            cost.update(pool=pool, wall_s=cost["wall_s"] + pool["wall_s"], train_s=train_s + pool["train_s"])
        result.update({
            "cost": cost,
            "history": history,
            "method_summary": {**self.method.summary(), "selected_epoch": selected_epoch},
            "status": "ok",
        })
        if self.rank == 0:
            write_json_atomic(result, self.out_dir / "result.json")
        if tracker is not None:
            for note in tracker.finish(_flat_summary(result)) or []:
                print(note)
        return result

    def _validate_targets(self) -> dict[str, float]:
        """Validation of every test domain (per-domain selection, e.g. of merge settings): keys suffixed
        ``@<target>``; the unsuffixed keys are the first target's. Without ``target_datasets``: ``_validate``."""
        if not getattr(self.cfg, "target_datasets", None):
            return self._validate(adversarial=True)
        row: dict[str, float] = {}
        for target in self.targets:
            val = self._validate(adversarial=True, sampler=target["val"]) if target["val"] is not None else {}
            if not row:
                row.update(val)
            row.update({f"{k}@{target['name']}": v for k, v in val.items()})
        return row

    def _from_rank0(self, values: dict[str, float]) -> dict[str, float]:
        """``values`` as rank 0 has them (same keys on every rank)."""
        if self.world_size == 1 or not values:
            return values
        keys = sorted(values)
        t = broadcast_(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64))
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _plain_method(self, state: dict[str, torch.Tensor]):
        """A copy of the trial's method outside DeepSpeed (no ZeRO-3 hooks), holding the full weights
        ``state`` and the method's own state."""
        cfg = self.cfg
        method = self.method_cls(cfg, self._new_backbone(), self.num_classes)
        method.load_state_dict(self.method.state_dict())
        model = method.model.to(self.device)
        if cfg.bf16:  # as build_engine: the trained weights are bf16
            model.to(torch.bfloat16)
        model.load_state_dict(state)
        return method

    def _identity(self) -> dict[str, Any]:
        cfg = self.cfg
        result: dict[str, Any] = {
            "id": self.run_id, "method": cfg.method, "dataset": cfg.dataset, "backbone": cfg.backbone,
            "seed": cfg.seed, "config": cfg.to_dict(), "config_hash": self.hash, "versions": versions(),
        }
        if self.sweep:
            result["sweep"] = self.sweep
        return result

    def _evaluate(self) -> dict[str, Any]:
        cfg = self.cfg
        result = self._identity()
        if self.method_cls.episodic:
            from bench.fewshot import evaluate_fewshot

            blocks = {t["name"]: evaluate_fewshot(self.method, t["test"], cfg.episodes, cfg, attack=True,
                                                  device=self.device, progress=self.progress)
                      for t in self.targets}
            result["fewshot"] = next(iter(blocks.values()))  # the first (primary) target's
            if cfg.target_datasets:
                result["fewshot_targets"] = blocks
        else:
            x, y = load_split(self.ds_dir, "test", max_samples=cfg.n_eval, image_size=cfg.image_size,
                              transform=cfg.transform)
            result["metrics"] = robust_metrics(self.method.eval_model(), x, y, cfg, device=self.device,
                                               progress=self.progress and self.rank == 0,
                                               state_dir=self.out_dir)  # a killed evaluation resumes
        return result


def _pool_cost(cfg) -> dict[str, Any] | None:
    """Summed training cost of the members of ``cfg.pool_dir``'s pool manifest (None without a pool)."""
    pool_dir = getattr(cfg, "pool_dir", None)
    if not pool_dir:
        return None
    path = Path(pool_dir)
    path = path / "pool.json" if path.is_dir() else path
    try:
        members = json.loads(path.read_text())["members"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    costs = [(m.get("result") or {}).get("cost") or {} for m in members]
    return {"members": len(members), "wall_s": sum(float(c.get("wall_s") or 0) for c in costs),
            "train_s": sum(float(c.get("train_s") or 0) for c in costs)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def _flat_summary(result: dict) -> dict[str, float]:
    out = {}
    for block in ("metrics", "fewshot", "cost"):
        for k, v in (result.get(block) or {}).items():
            if isinstance(v, (int, float)):
                out[f"{block}/{k}"] = v
    return out


def write_error_result(cfg: BaseConfig, out_dir: Path, exc: BaseException, sweep: dict | None = None) -> dict:
    """A trial that raised is recorded with its error, so a sweep's other trials and the leaderboard go on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"id": f"{cfg.method}-{cfg.dataset}-{config_hash(cfg)}-s{cfg.seed}", "method": cfg.method,
              "dataset": cfg.dataset, "backbone": cfg.backbone, "seed": cfg.seed, "config": cfg.to_dict(),
              "config_hash": config_hash(cfg), "status": "error", "error": f"{type(exc).__name__}: {exc}",
              "traceback": traceback.format_exc()}
    if sweep:
        result["sweep"] = sweep
    write_json_atomic(result, out_dir / "result.json")
    return result
