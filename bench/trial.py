"""One trial end to end: data, backbone, method, DeepSpeed engine; train; select; evaluate; report.

``run_trial`` is what ``bench run`` calls and what every Ray Tune trial calls, so a sweep's trial and a
hand-run trial are the same code path and write the same ``result.json``.
"""
from __future__ import annotations

import json
import random
import sys
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
                          load_latest, prune_checkpoints, save_best, save_checkpoint, sync_buffers, train_autocast,
                          trial_device, world)
from bench.files import atomic_write_json
from bench.prerequisites import in_run_dir

from bench.report.tracking import reliability_summary
from bench.tasks import task_for
from data_shards.manifest import read_manifest
from data_shards.paths import dataset_dir
from data_shards.transforms import output_size
from methods import get_method
from methods.base import BaseConfig

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


def check_inputs(cfg: BaseConfig, data_root: str | Path | None) -> Path:
    """Everything that can be wrong with the request, checked before any work starts."""
    ds_dir = dataset_dir(cfg.dataset, data_root)
    manifest = read_manifest(ds_dir)
    check_backbone(cfg.backbone)
    needed = task_for(get_method(cfg.method)).required_splits
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
              evaluate: bool = True, prerequisites_dir: str | Path | None = None,
              label: str | None = None) -> dict[str, Any]:
    """Run one trial into ``out_dir`` and return its result (also written to ``out_dir/result.json``).

    A trial whose method needs runs first (``Method.prerequisite_runs``, e.g. an ``amt`` pool's members)
    runs them here, one after the other, into ``prerequisites_dir`` (default ``out_dir/_prerequisites``;
    finished runs found there are reused), then the trial the method assembles from them. ``label`` names the
    trial in progress bars and lines (default: ``trial_label(cfg)``)."""
    out_dir = Path(out_dir)
    ds_dir = check_inputs(cfg, data_root)
    if is_pool_config(cfg):
        cfg = train_pool(cfg, out_dir, data_root=data_root, progress=progress, group=group, track=track,
                         root=prerequisites_dir)
    return Trial(cfg, out_dir, ds_dir, progress=progress, epoch_callback=epoch_callback, run_id=run_id,
                 group=group, sweep=sweep, track=track, evaluate=evaluate, data_root=data_root, label=label).run()


def trial_label(cfg: BaseConfig, member: tuple[int, int] | None = None) -> str:
    """What progress bars and lines call a trial: ``amt member 1/2 (eps 8/255) on digits`` for a pool
    member (``member``: its index and the pool size), ``amt (merged pool) on digits``, ``rft on digits``."""
    what = cfg.method
    member_eps = getattr(cfg, "member_eps", None)
    if member_eps is not None or member is not None:
        what += " member" + (f" {member[0]}/{member[1]}" if member else "")
        what += f" (eps {member_eps:g}/255)" if member_eps is not None else ""
    elif getattr(cfg, "pool_dir", None):
        what += " (merged pool)"
    return f"{what} on {cfg.dataset}"


def train_pool(cfg: BaseConfig, out_dir: str | Path, *, data_root=None, progress: bool = True,
               group: str | None = None, track: bool = True, root: str | Path | None = None) -> BaseConfig:
    """Run ``cfg``'s prerequisite runs (those not finished before) one after the other in ``root/<name>``
    (default ``out_dir/_prerequisites``), then return the trial the method assembles from them (AMT: the
    merging trial over the pool manifest it wrote into ``out_dir``)."""
    from filelock import FileLock

    from bench.prerequisites import PREREQUISITES_DIR, assemble, finished_result, prerequisite_runs

    root = Path(root) if root is not None else Path(out_dir) / PREREQUISITES_DIR
    runs = prerequisite_runs(cfg)
    for i, run in enumerate(runs, 1):
        run_dir = root / run.name
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        # runs in a shared folder (--pool-cache) may be wanted by two `bench run`s at once: trained once
        with FileLock(str(run_dir) + ".lock"):
            if finished_result(run_dir) is None:
                # its own test evaluation would be thrown away: the trial that needs it is evaluated.
                # Its run id is its config's (the run's identity), so a reused run keeps one W&B run.
                run_cfg = run.resolved()
                run_trial(run_cfg, run_dir, data_root=data_root, progress=progress, group=group,
                          track=track, evaluate=False, label=trial_label(run_cfg, member=(i, len(runs))))
    return assemble(cfg, root, out_dir)


def is_pool_config(cfg: BaseConfig) -> bool:
    """True when ``cfg``'s trial needs runs first (``Method.prerequisite_runs``; e.g. an ``amt`` pool)."""
    return bool(get_method(cfg.method).prerequisite_runs(cfg))


class Trial:
    """One trial's recipe: set up or resume, train epoch by epoch (validate, select, checkpoint, report),
    evaluate the selected weights, write result.json. What it trains on and is measured on is its task's
    (``bench/tasks.py``: supervised or episodic)."""

    def __init__(self, cfg, out_dir: Path, ds_dir: Path, *, progress, epoch_callback, run_id, group, sweep,
                 track, evaluate=True, data_root=None, label=None):
        self.evaluate, self.data_root = evaluate, data_root
        self.label = label or trial_label(cfg)
        # a terminal gets progress bars; a log file or pipe plain lines (a bar there is cursor codes)
        shown = progress and world()[0] == 0
        self.bars, self.lines = shown and sys.stderr.isatty(), shown and not sys.stderr.isatty()
        self.cfg, self.out_dir, self.ds_dir = cfg, out_dir, ds_dir
        self.run_cfg = in_run_dir(cfg, out_dir)
        self.progress, self.epoch_callback, self.group, self.sweep, self.track = (
            progress, epoch_callback, group, sweep, track)
        self.hash = config_hash(cfg)
        self.run_id = run_id or f"{cfg.method}-{cfg.dataset}-{self.hash}-s{cfg.seed}"
        self.rank, self.world_size = world()
        self.device = trial_device()
        self.ckpt_dir = out_dir / "checkpoints"
        self.method_cls = get_method(cfg.method)

    # --- the whole trial -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        done = self._prepare_out_dir()
        if done is not None:
            return done
        seed_everything(cfg.seed)
        t0 = time.time()
        self._build()
        self.task.open()
        history = self._resume()  # a killed trial resumes after its last finished epoch
        if self.start_epoch and self.rank == 0:
            print(f"{self.label}: resuming from epoch {self.start_epoch + 1}/{cfg.epochs} ({self.start_epoch} done, "
                  f"checkpoint in {self.ckpt_dir})", flush=True)
        self.tracker = self._start_tracking()
        if self.lines and self.start_epoch < cfg.epochs and self.method.needs_training:
            print(f"{self.label}: training epochs {self.start_epoch + 1}-{cfg.epochs} "
                  f"({self.task.steps_per_epoch} steps each)", flush=True)
        self.bar = bar = tqdm(desc=self.label, initial=self.start_epoch, total=cfg.epochs, unit="epoch",
                              disable=not self.bars)
        for epoch in range(self.start_epoch, cfg.epochs if self.method.needs_training else self.start_epoch):
            val, stop = self._epoch(epoch, history)
            bar.set_postfix({k: f"{v:.3f}" for k, v in val.items()})
            bar.update(1)
            if stop:
                break
        bar.close()
        if not self.method.needs_training and not history:
            # A merging trial trains nothing but is still selected on validation (the sweep's objective):
            # validation of what it evaluates, from held-out data.
            history.append({"epoch": 0, **self.task.validate_targets(self.method)})
            self._report_epoch(history, history[-1], None)
        selected_epoch = self._load_selected(history)
        if self.rank != 0:  # rank 0 alone evaluates and reports
            return {"status": "ok", "rank": self.rank, "history": history}
        seed_everything(epoch_seed(cfg.seed, cfg.epochs))  # the same attacks however many epochs ran here
        t_eval = time.time()
        result = self._identity()
        if self.evaluate:
            if self.progress:
                print(f"{self.label}: testing the selected weights ({_attacks(cfg)})", flush=True)
            result.update(self.task.evaluate(self.method, progress=self.bars, state_dir=self.out_dir))
        else:  # a validation-only candidate (a pool member, a merge-search setting): the leaderboard skips it
            result["stage"] = "validation"
        result.update(cost=self._cost(t0, eval_s=time.time() - t_eval), history=history,
                      method_summary={**self.method.summary(), "selected_epoch": selected_epoch}, status="ok")
        atomic_write_json(self.out_dir / "result.json", result)
        # finished: a rerun returns result.json, so the epoch checkpoints only serve keep_checkpoints' uses
        prune_checkpoints(self.ckpt_dir, cfg.keep_checkpoints)
        if self.tracker is not None:
            for note in self.tracker.finish(_flat_summary(result)) or []:
                print(note)
            if self.tracker.sync_hint and not self.sweep:  # a sweep prints one command for all its runs
                print(self.tracker.sync_hint)
        return result

    # --- set-up ----------------------------------------------------------------------------------------
    def _prepare_out_dir(self) -> dict | None:
        """The result of a finished run in ``out_dir`` (nothing to redo), else None after checking that a
        started run there has this config."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        args = self.out_dir / "args.yaml"
        if args.exists():
            if holds_other_run(self.out_dir, self.cfg):
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
        """The task, the method (backbone included) and the engine that trains it."""
        cfg = self.cfg
        self.manifest = read_manifest(self.ds_dir)
        self.task = task_for(self.method_cls)(cfg, self.ds_dir, self.manifest, device=self.device,
                                              world_size=self.world_size, data_root=self.data_root)
        # the method reads paths in this folder ({run_dir}/...) as they are here; args.yaml keeps the placeholder
        self.method = self.method_cls(self.run_cfg, self._new_backbone(), self.task.num_classes)
        model = self.method.model.to(self.device)  # channels_last weights: build_engine decides
        optimizer = self.method.make_optimizer()
        if self.method.needs_training:
            self.engine = build_engine(model, optimizer, cfg)
        else:  # a merge-only trial evaluates a trained pool: DeepSpeed's set-up would be its largest cost
            from bench.engine import PlainEngine

            self.engine = PlainEngine(model, optimizer)

    def _new_backbone(self):
        cfg = self.cfg
        return create_backbone(cfg.backbone, self.task.num_classes, pretrained=cfg.pretrained,
                               image_size=output_size(cfg.transform, self.manifest, cfg.image_size)[0],
                               input_resize=cfg.input_resize)

    def _resume(self) -> list[dict]:
        """Weights, optimizer state (on every rank), method state and counters of the last finished epoch, if
        any; returns the history so far."""
        self.start_epoch, self.images_seen, self.train_s = 0, 0, 0.0
        resumed = load_latest(self.engine, self.ckpt_dir)
        if resumed is None:
            return []
        self.method.load_state_dict(resumed["method"])
        self.start_epoch = resumed["epoch"] + 1
        self.images_seen, self.train_s = resumed["images_seen"], resumed["train_s"]
        return list(resumed["history"])

    def _start_tracking(self):
        if not self.track or self.rank != 0:
            return None
        from bench.report.tracking import run_name, start_run

        cfg = self.cfg
        swept = (self.sweep or {}).get("swept") or {}
        # the W&B run's config carries the provenance too (the sidecar files' sha256, not their text)
        return start_run({**cfg.to_dict(), "provenance": self._provenance()}, self.out_dir, run_id=self.run_id,
                         name=run_name(cfg.to_dict(), swept), group=self.group, tags=[cfg.method, cfg.dataset, cfg.backbone], job_type=cfg.method)

    # --- one epoch -------------------------------------------------------------------------------------
    def _epoch(self, epoch: int, history: list[dict]) -> tuple[dict[str, float], bool]:
        """Train, validate, select and checkpoint epoch ``epoch``; returns (its validation, stop here)."""
        cfg = self.cfg
        seed_everything(epoch_seed(cfg.seed, epoch))
        t_epoch = time.time()
        logs = self._train_epoch(epoch)
        self.train_s += time.time() - t_epoch
        sync_buffers(self.engine)  # what the checkpoint keeps is what every rank goes on with
        # every rank decides on rank 0's validation figures (BN statistics may differ between ranks),
        # so that all take the same collective steps below
        self._say(f"{self.label}: validating epoch {epoch + 1}/{cfg.epochs} ({_attacks(cfg, val=True)})")
        val = self._from_rank0(self.task.validate(self.method))
        self.bar.set_description_str(self.label)
        decision = self.method.end_epoch(epoch, val)
        row = {"epoch": epoch, **logs, **val, "lr": logs.get("lr", self.method.current_lr())}
        history.append(row)
        if decision.is_best:
            save_best(self.engine, self.ckpt_dir, epoch)
        has_best = float((self.ckpt_dir / BEST).exists())
        if decision.reload_best and self._from_rank0({"best": has_best})["best"]:
            best = load_best(self.ckpt_dir) if self.rank == 0 else None
            load_full_state(self.engine, best["model"] if best else None)
        save_checkpoint(self.engine, self.ckpt_dir, epoch,
                        {"epoch": epoch, "method": self.method.state_dict(), "images_seen": self.images_seen,
                         "train_s": self.train_s, "history": history},
                        keep_previous=cfg.keep_checkpoints == "all")
        self._report_epoch(history, row, self.ckpt_dir)
        if self.lines:  # after the checkpoint: the line means the epoch is saved
            shown = {k: v for k, v in row.items() if k == "train_loss" or k.startswith("val_")}
            print(f"{self.label}: epoch {epoch + 1}/{cfg.epochs} " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()),
                  flush=True)
        return val, decision.stop or epoch == cfg.epochs - 1

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, steps = self.cfg, self.task.steps_per_epoch
        ctx = self.task.train_context(epoch)
        logs = dict(self.method.start_epoch(ctx))
        self.engine.module.train()
        sums: dict[str, float] = {}
        n_steps = 0
        bar = tqdm(self.task.train_batches(epoch), total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   leave=False, disable=not self.bars)
        for step, batch in enumerate(bar):
            if step >= steps:
                break
            ctx.step = step
            batch = self.task.batch(batch)
            with train_autocast(cfg, self.device):
                step_logs = self.method.train_step(self.engine, batch, ctx)
            self.images_seen += self.task.images(batch) * self.world_size
            for k, v in step_logs.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n_steps += 1
            if "train_loss" in step_logs:
                bar.set_postfix(loss=f"{step_logs['train_loss']:.3f}")
        logs.update({k: v / max(1, n_steps) for k, v in sums.items()})
        return logs

    def _say(self, text: str) -> None:
        """What the trial is doing now: the epoch bar's description in a terminal, else a line."""
        if self.bars:
            self.bar.set_description_str(text)
        elif self.lines:
            print(text, flush=True)

    def _report_epoch(self, history: list[dict], row: dict[str, Any], ckpt_dir: Path | None) -> None:
        """history.json, the tracker and the caller's callback (a sweep's report to Tune) learn of ``row``."""
        if self.rank == 0:
            atomic_write_json(self.out_dir / "history.json", history)
        if self.tracker is not None:
            self.tracker.log(row, step=row["epoch"])
        if self.epoch_callback is not None:
            self.epoch_callback(row, ckpt_dir)

    # --- after training --------------------------------------------------------------------------------
    def _load_selected(self, history: list[dict]) -> int | None:
        """Load the weights of the epoch that validation selected (else keep the last); returns that epoch.
        Without a selection (a method that evaluates its last epoch, e.g. rft's eval_checkpoint=last) the
        last epoch's weights are written to best.pt all the same: the weights the test evaluates are the one
        file a finished trial keeps (keep_checkpoints: none), for a later `bench evaluate`."""
        best = load_best(self.ckpt_dir) if self.rank == 0 else None
        selected_epoch = best["epoch"] if best else None
        if (self.method.needs_training and history
                and not self._from_rank0({"best": float(best is not None)})["best"]):
            save_best(self.engine, self.ckpt_dir, history[-1]["epoch"])  # every rank takes part (ZeRO-3)
            best = load_best(self.ckpt_dir) if self.rank == 0 else None
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
        return selected_epoch

    def _cost(self, t0: float, eval_s: float) -> dict[str, Any]:
        cost = {"wall_s": time.time() - t0, "train_s": self.train_s, "eval_s": eval_s,
                "device": _device_name(self.device),
                "images_per_s": self.images_seen / self.train_s if self.train_s > 0 else None}
        pool = _pool_cost(self.run_cfg)
        if pool:  # a merging trial costs its pool's training too (summed: the cost of the result from scratch)
            cost.update(pool=pool, wall_s=cost["wall_s"] + pool["wall_s"], train_s=self.train_s + pool["train_s"])
        return cost

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
        method = self.method_cls(cfg, self._new_backbone(), self.task.num_classes)
        method.load_state_dict(self.method.state_dict())
        model = method.model.to(self.device)
        model.load_state_dict(state)  # bf16 weights load into the fp32 copy: the test evaluates in fp32
        return method

    def _identity(self) -> dict[str, Any]:
        cfg = self.cfg
        result: dict[str, Any] = {
            "id": self.run_id, "method": cfg.method, "dataset": cfg.dataset, "backbone": cfg.backbone,
            "seed": cfg.seed, "config": cfg.to_dict(), "config_hash": self.hash, "versions": versions(),
            "provenance": self._provenance(),
        }
        if self.sweep:
            result["sweep"] = self.sweep
        return result

    def _provenance(self) -> dict[str, Any]:
        """What this trial ran from (bench/provenance.py), taken once, when first asked (at the start of tracking,
        else when result.json is written)."""
        if getattr(self, "_provenance_block", None) is None:
            from bench.provenance import capture

            self._provenance_block = capture(self.cfg, self.out_dir, self.data_root)
        return self._provenance_block


def _attacks(cfg, val: bool = False) -> str:
    """What validation or the test attacks, for progress lines: ``clean, PGD-10 at eps 8/255, AutoAttack standard``."""
    steps = cfg.val_pgd_steps if val else cfg.eval_pgd_steps
    parts = ["clean"] + ([f"PGD-{steps} at eps {cfg.eps * 255:g}/255"] if steps > 0 else [])
    if not val and cfg.autoattack_version != "off" and not get_method(cfg.method).episodic:
        parts.append(f"AutoAttack {cfg.autoattack_version}")
    return ", ".join(parts)


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
    out.update(reliability_summary(result.get("reliability")))  # the indicators, beside the numbers they judge
    return out


def holds_other_run(out_dir: Path, cfg: BaseConfig) -> bool:
    """True when ``out_dir`` holds a run (its args.yaml) of another config or seed than ``cfg``."""
    args = Path(out_dir) / "args.yaml"
    if not args.exists():
        return False
    import yaml

    old = yaml.safe_load(args.read_text()) or {}
    return config_hash(old) != config_hash(cfg) or old.get("seed") != cfg.seed


def write_error_result(cfg: BaseConfig, out_dir: Path, exc: BaseException, sweep: dict | None = None) -> dict:
    """A trial that raised is recorded with its error, so a sweep's other trials and the leaderboard go on;
    never into a folder holding another config's run (that run's result.json stays)."""
    result = {"id": f"{cfg.method}-{cfg.dataset}-{config_hash(cfg)}-s{cfg.seed}", "method": cfg.method,
              "dataset": cfg.dataset, "backbone": cfg.backbone, "seed": cfg.seed, "config": cfg.to_dict(),
              "config_hash": config_hash(cfg), "status": "error", "error": f"{type(exc).__name__}: {exc}",
              "traceback": traceback.format_exc()}
    if sweep:
        result["sweep"] = sweep
    try:
        other = holds_other_run(out_dir, cfg)
    except Exception:  # an unreadable args.yaml: leave the folder as it is rather than hide the trial's error
        other = True
    if not other:
        atomic_write_json(out_dir / "result.json", result)  # (atomic_write makes the folder)
    return result
