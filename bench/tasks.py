"""What a trial learns and is measured on: the supervised task (batches of the data set's classes) or the
episodic one (few-shot episodes). A task owns its data (loaders, episode samplers), the training batches,
validation, the test evaluation and the count of images a step trains on; ``bench.trial.Trial`` drives
either through the same calls.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from bench.evaluate import clean_flags, metrics_from_flags, pgd_flags, pgd_step
from bench.reliability import evaluate_with_reliability
from data_shards.manifest import read_manifest
from data_shards.paths import dataset_dir
from data_shards.reader import load_split, make_loader
from methods.base import BaseConfig, Episode, Method, TrainContext


def task_for(method_cls: type[Method]) -> type[SupervisedTask | EpisodicTask]:
    return EpisodicTask if method_cls.episodic else SupervisedTask


def _plain_train_batches(cfg: BaseConfig, ds_dir: Path, device: torch.device):
    """A fresh pass over the training data without augmentation, (x, y) on ``device``."""
    loader = make_loader(ds_dir, "train", cfg.eval_batch_size, train=False, image_size=cfg.image_size,
                         max_samples=cfg.max_train_samples, transform=cfg.transform)
    for x, y in loader:
        yield x.to(device), y.to(device)


def _on_device(batch, cfg: BaseConfig, device: torch.device) -> list[torch.Tensor]:
    batch = [t.to(device) for t in batch]
    if cfg.channels_last:
        batch = [t.to(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch]
    return batch


class SupervisedTask:
    """Classification over the data set's classes: a sharded training loader (this rank's share), the val
    split for selection, the test split for PGD and AutoAttack."""

    required_splits = ("train", "val", "test")

    def __init__(self, cfg: BaseConfig, ds_dir: Path, manifest: dict, *, device: torch.device,
                 world_size: int = 1, data_root: str | Path | None = None):
        self.cfg, self.ds_dir, self.manifest = cfg, ds_dir, manifest
        self.device, self.world_size = device, world_size
        self.num_classes = manifest["num_classes"]
        self._aug_loader = None
        self._epoch = self._aug_passes = 0

    def open(self) -> None:
        cfg = self.cfg
        per_rank = max(1, cfg.batch_size // self.world_size)
        cap = cfg.max_train_samples  # the reader caps the whole split, then splits it by node and worker
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

    # --- training ------------------------------------------------------------------------------------
    def train_context(self, epoch: int) -> TrainContext:
        self._epoch, self._aug_passes = epoch, 0
        return TrainContext(epoch=epoch, steps_per_epoch=self.steps_per_epoch, device=self.device,
                            train_batches=lambda: _plain_train_batches(self.cfg, self.ds_dir, self.device),
                            augmented_train_batches=self._augmented_train_batches)

    def train_batches(self, epoch: int) -> Iterator:
        self.train_loader.set_epoch(epoch)  # shard order, shuffle and augmentation of this epoch
        return iter(self.train_loader)

    def batch(self, tensors) -> tuple[torch.Tensor, ...]:
        return tuple(_on_device(tensors, self.cfg, self.device))

    def images(self, batch) -> int:
        return len(batch[0])

    def _augmented_train_batches(self):
        # The training loader's own pipeline (augmentation, per-rank share) on a separate shuffle stream, so
        # that these passes leave the training epochs' data order as it is.
        if self._aug_loader is None:
            self._aug_loader = copy.copy(self.train_loader)
            self._aug_loader.seed = self.train_loader.seed + 7919
        # each pass a function of (seed, epoch, pass within the epoch), so a resumed epoch replays it
        self._aug_loader.set_epoch(self._epoch * 1_000 + self._aug_passes)
        self._aug_passes += 1
        for x, y in self._aug_loader:
            yield x.to(self.device), y.to(self.device)

    # --- validation and test -------------------------------------------------------------------------
    def validate(self, method: Method) -> dict[str, float]:
        cfg = self.cfg
        model = method.eval_model()
        x, y = self.val
        clean = clean_flags(model, x, y, cfg.eval_batch_size, self.device)
        val = {"val_clean_acc": clean.float().mean().item()}
        if cfg.val_pgd_steps > 0:
            val["val_pgd_acc"] = pgd_flags(model, x, y, eps=cfg.eps, step_size=pgd_step(cfg), steps=cfg.val_pgd_steps,
                                           batch_size=cfg.eval_batch_size, device=self.device, seed=cfg.seed,
                                           clean=clean).float().mean().item()
        return val

    def validate_targets(self, method: Method) -> dict[str, float]:
        """Validation of what the test evaluates (a trial that trains nothing): the val split's."""
        return self.validate(method)

    def evaluate(self, method: Method, *, progress: bool, state_dir: Path) -> dict[str, Any]:
        cfg = self.cfg
        x, y = load_split(self.ds_dir, "test", max_samples=cfg.n_eval, image_size=cfg.image_size,
                          transform=cfg.transform)
        if cfg.eval_shards > 1:
            return self._sharded_evaluation(method, x, y, progress=progress, state_dir=state_dir)
        # a killed evaluation resumes (state_dir); the reliability indicators read the same flags
        flags, reliability = evaluate_with_reliability(method.eval_model(), x, y, cfg, n_classes=self.num_classes,
                                                       device=self.device, progress=progress, state_dir=state_dir)
        out = {"metrics": metrics_from_flags(flags, cfg)}
        if reliability is not None:
            out["reliability"] = reliability
        return out

    def _sharded_evaluation(self, method: Method, x, y, *, progress: bool, state_dir: Path) -> dict[str, Any]:
        """The test evaluation as ``eval_shards`` Ray tasks (the flags one process gives; each shard resumes
        from its folder under ``state_dir/eval_shards``), and the row's reliability block: computed here, on
        the merged flags and the shards' merged PGD loss and AutoAttack accuracies, by the code and on the
        model an unsharded evaluation uses (its extra attacks run in this process, on ``reliability_n``)."""
        from bench.eval_target import ModelRecipe
        from bench.reliability import row_reliability
        from bench.sharded_eval import sharded_flags
        from data_shards.transforms import output_size

        cfg = self.cfg
        recipe = ModelRecipe(kind="method", backbone=cfg.backbone, num_classes=self.num_classes,
                             image_size=output_size(cfg.transform, self.manifest, cfg.image_size)[0],
                             config=cfg.to_dict(), method_state=method.state_dict())
        details: dict | None = {} if cfg.reliability != "off" else None
        flags, report = sharded_flags(recipe, method.eval_model().state_dict(), x, y, cfg, shards=cfg.eval_shards,
                                      work_dir=Path(state_dir) / "eval_shards", gpus_per_shard=cfg.eval_shard_gpus,
                                      progress=progress, details=details)
        metrics = metrics_from_flags(flags, cfg)
        # per-shard costs: state_dir/eval_shards/shards.json
        metrics["evaluated_by"] = {"command": "trial", "shards": report["shards"], "wall_s": report["wall_s"],
                                   "overhead_s": report["overhead_s"]}
        out = {"metrics": metrics}
        if details is not None:
            out["reliability"] = row_reliability(method.eval_model(), x, y, flags, details, cfg,
                                                 n_classes=self.num_classes, eval_forwards=report["eval_forwards"],
                                                 device=self.device)
        return out


class EpisodicTask:
    """Few-shot episodes: training episodes over the base classes, validation episodes from held-out
    (val) data, test episodes over the novel classes or each of ``target_datasets``."""

    required_splits = ("train", "test")

    def __init__(self, cfg: BaseConfig, ds_dir: Path, manifest: dict, *, device: torch.device,
                 world_size: int = 1, data_root: str | Path | None = None):
        self.cfg, self.ds_dir, self.manifest = cfg, ds_dir, manifest
        self.device, self.data_root = device, data_root
        self.num_classes = cfg.ways

    def open(self) -> None:
        from data_shards.episodes import EpisodeSampler

        cfg = self.cfg
        base, novel = self._base_novel()
        self.train_sampler = EpisodeSampler(self.ds_dir, "train", base, cfg.ways, cfg.shots, cfg.queries,
                                            seed=cfg.seed, image_size=cfg.image_size, transform=cfg.transform,
                                            augment=cfg.augment)
        self.val_sampler = self._val_sampler(base)
        self.test_sampler = self._test_sampler(self.ds_dir, novel)
        self.targets = self._targets(novel)
        self.steps_per_epoch = cfg.episodes_per_epoch

    def _base_novel(self) -> tuple[list[int], list[int]]:
        cfg, fewshot = self.cfg, self.manifest.get("fewshot", {})
        base = cfg.base_classes or fewshot.get("base_classes") or list(range(self.manifest["num_classes"]))
        return base, cfg.novel_classes or fewshot.get("novel_classes") or base

    def _test_sampler(self, ds_dir: Path, classes):
        from data_shards.episodes import EpisodeSampler

        cfg = self.cfg
        return EpisodeSampler(ds_dir, "test", classes, cfg.ways, cfg.shots, cfg.queries, seed=cfg.seed + 10_000,
                              image_size=cfg.image_size, transform=cfg.transform)

    def _target_data(self, name: str, novel) -> tuple[Path, dict, list[int]]:
        """A named test domain's folder, manifest and novel classes (the source's own for the source)."""
        if name == self.cfg.dataset:
            return self.ds_dir, self.manifest, novel
        ds_dir = dataset_dir(name, self.data_root)
        manifest = read_manifest(ds_dir)
        novel_there = manifest.get("fewshot", {}).get("novel_classes")
        return ds_dir, manifest, novel_there or list(range(manifest["num_classes"]))

    def test_samplers(self) -> dict[str, Any]:
        """The test episodes of every test domain, by name (the primary first), without opening the training
        and validation data: what ``bench evaluate`` re-evaluates a finished trial on (the trial's own)."""
        novel = self._base_novel()[1]
        names = self.cfg.target_datasets or [self.cfg.dataset]
        out = {}
        for name in names:
            ds_dir, _, classes = self._target_data(name, novel)
            out[name] = self._test_sampler(ds_dir, classes)
        return out

    def _targets(self, novel) -> list[dict]:
        """The test domains: name, test sampler, validation sampler (None: no usable val split). Without
        ``target_datasets``: the source's novel classes, validated on the training data's held-out episodes.
        A named target uses its own test split and, for per-domain selection, its own val split, over its
        manifest's novel classes (the source's ``novel_classes`` for the source itself), else all its classes."""
        cfg = self.cfg
        if not cfg.target_datasets:
            return [{"name": cfg.dataset, "test": self.test_sampler, "val": self.val_sampler}]
        out = []
        for name in cfg.target_datasets:
            ds_dir, manifest, classes = self._target_data(name, novel)
            test = self._test_sampler(ds_dir, classes)
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

    # --- training ------------------------------------------------------------------------------------
    def train_context(self, epoch: int) -> TrainContext:
        return TrainContext(epoch=epoch, steps_per_epoch=self.steps_per_epoch, device=self.device,
                            train_batches=lambda: _plain_train_batches(self.cfg, self.ds_dir, self.device))

    def train_batches(self, epoch: int) -> Iterator:
        n = self.cfg.episodes_per_epoch
        return (self.train_sampler.sample(epoch * n + i) for i in range(n))

    def batch(self, tensors) -> Episode:
        return Episode(*_on_device(tensors, self.cfg, self.device))

    def images(self, episode: Episode) -> int:
        return len(episode.support_x) + len(episode.query_x)

    # --- validation and test -------------------------------------------------------------------------
    def validate(self, method: Method, adversarial: bool = False, sampler=None) -> dict[str, float]:
        """Clean accuracy on the validation episodes, and PGD-val_pgd_steps accuracy on their queries when
        ``adversarial``; {} without usable validation data."""
        from bench.fewshot import evaluate_fewshot

        cfg = self.cfg
        sampler = sampler or self.val_sampler
        if sampler is None:
            return {}
        attack = adversarial and cfg.val_pgd_steps > 0
        out = evaluate_fewshot(method, sampler, cfg.val_episodes, replace(cfg, eval_pgd_steps=cfg.val_pgd_steps,
                                                                               reliability="off"),
                               attack=attack, device=self.device, progress=False, autoattack="off")
        val = {"val_fewshot_acc": out["clean_acc"]}
        if attack:
            val["val_fewshot_pgd_acc"] = out["adv_acc"]
        return val

    def validate_targets(self, method: Method) -> dict[str, float]:
        """Adversarial validation of every test domain (per-domain selection, e.g. of merge settings): keys
        suffixed ``@<target>``; the unsuffixed keys are the first target's. Without ``target_datasets``: the
        source's validation episodes."""
        if not self.cfg.target_datasets:
            return self.validate(method, adversarial=True)
        row: dict[str, float] = {}
        for target in self.targets:
            val = self.validate(method, adversarial=True, sampler=target["val"]) if target["val"] is not None else {}
            if not row:
                row.update(val)
            row.update({f"{k}@{target['name']}": v for k, v in val.items()})
        return row

    def evaluate(self, method: Method, *, progress: bool, state_dir: Path) -> dict[str, Any]:
        from bench.fewshot import evaluate_fewshot

        cfg = self.cfg
        blocks = {t["name"]: evaluate_fewshot(method, t["test"], cfg.episodes, cfg, attack=True, device=self.device,
                                              progress=progress)
                  for t in self.targets}
        # each block keeps its own indicators; the row's (result.json's top level) are the primary target's
        reliability = {name: block.pop("reliability", None) for name, block in blocks.items()}
        out = {"fewshot": next(iter(blocks.values()))}  # the first (primary) target's
        if next(iter(reliability.values())) is not None:
            out["reliability"] = next(iter(reliability.values()))
        if cfg.target_datasets:
            out["fewshot_targets"] = blocks
            out["reliability_targets"] = {name: r for name, r in reliability.items() if r is not None}
        return out
