"""The functions Tune calls: one sweep trial (``sweep_trial``, one process or a Ray Train group of DeepSpeed
workers), each a :func:`bench.trial.run_trial` that reports every epoch (metrics and its folder as the
checkpoint) to Tune and its test metrics at the end."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bench.sweep.folders import merge_tree, trial_folder

OBJECTIVE = "objective"  # the key every trial reports its validation metric under (per-method metric names differ)

def _report_metrics(row: dict, metric: str) -> dict[str, Any]:
    out = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    value = row.get(metric)
    if value is None:  # keep Tune's metric present: fall back to what validation did compute
        value = row.get("val_clean_acc", row.get("val_fewshot_acc"))
    out[OBJECTIVE] = float(value) if value is not None else float("nan")
    out["metric_name"] = metric
    try:
        import ray

        out["node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - informative only
        pass
    return out


def _final_metrics(result: dict, metric: str) -> dict[str, Any]:
    out: dict[str, Any] = {"done_result": 1.0}
    for block in ("metrics", "fewshot"):
        for k, v in (result.get(block) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"test_{k}"] = float(v)
    hist = result.get("history") or []
    if hist:
        out.update(_report_metrics(hist[-1], metric))
    out.setdefault(OBJECTIVE, float("nan"))
    return out


def _restore_checkpoint(ckpt, out_dir: Path) -> None:
    """A trial restarted on a node that lacks its folder (no shared disk, or node-local trial folders) gets
    it back from the last checkpoint it reported to Tune's storage (the trial's folder)."""
    from bench.engine import LATEST

    if ckpt is None or (out_dir / "checkpoints" / LATEST).exists():
        return
    with ckpt.as_directory() as src:
        merge_tree(Path(src), out_dir)


def _report_dir(out_dir: Path):
    """What a report carries as its checkpoint: the trial's folder (DeepSpeed's checkpoint of the last
    epoch, best.pt, history.json, at the end result.json)."""
    from ray import tune

    return tune.Checkpoint.from_directory(str(out_dir))


def _trial_out_dir(ctx: dict, name: str) -> Path:
    """RESULTS/<trial>, or with ``--storage`` a folder of the trial's own node (Tune's trial folder there):
    its files reach RESULTS through the storage."""
    if ctx.get("node_local"):
        from ray import tune

        return Path(tune.get_context().get_trial_dir()) / name
    return Path(ctx["results"]) / name


def _log_attempt(out_dir: Path) -> None:
    """One line per start of this trial (first run, retry after a failure, resume): node and start epoch."""
    import ray

    from bench.engine import LATEST

    start_epoch = 0
    last = out_dir / "checkpoints" / LATEST
    if last.exists() and (out_dir / "history.json").exists():
        try:
            start_epoch = len(json.loads((out_dir / "history.json").read_text()))
        except (OSError, json.JSONDecodeError):
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    line = {"time": time.time(), "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "start_epoch": start_epoch, "resumed": last.exists()}
    with open(out_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def _trial_setup(config: dict, ctx: dict, trial_id: str, out_dir: str | Path | None = None):
    """A trial's config, folder, sweep record and objective metric. A first-phase trial (``prerequisite``
    in its config) is a run another trial needs (bench.sweep.phases): its config is the plan's."""
    from bench.config import resolve_config

    method, seed = config["method"], int(config["seed"])
    out_dir = Path(out_dir) if out_dir is not None else Path(ctx["results"]) / trial_folder(config, trial_id)
    if config.get("prerequisite"):
        from bench.prerequisites import PrerequisiteRun

        name = config["prerequisite"]
        cfg = PrerequisiteRun(name, method, ctx["prerequisites"][name]["config"]).resolved()
        sweep_info = {"name": ctx["name"], "trial_id": trial_id, "stage": "prerequisite",
                      "swept": {"method": method, "seed": seed, "prerequisite": name}}
        return cfg, out_dir, sweep_info, ctx["metrics"][method]
    sampled = {k: config[k] for k in ctx["space_keys"]}
    fixed = ctx["spec_fixed"][method]
    dataset = sampled.get("dataset", fixed.get("dataset"))
    overrides = {**fixed, **ctx.get("per_dataset", {}).get(method, {}).get(dataset, {}), **sampled, "seed": seed}
    swept = {"method": method, "seed": seed, **sampled}
    sweep_info = {"name": ctx["name"], "trial_id": trial_id, "swept": swept}
    cfg = resolve_config(method, overrides)
    return cfg, out_dir, sweep_info, ctx["metrics"][method]


def _assembled(cfg, ctx: dict, out_dir: Path):
    """A second-phase trial's config once the runs it needs finished in the first phase (``cfg`` itself
    when it needs none): the method assembles it from their folders (AMT: writes its pool manifest)."""
    from bench.prerequisites import PREREQUISITES_DIR, assemble, finished_result, prerequisite_runs

    runs = prerequisite_runs(cfg)
    if not runs:
        return cfg
    root = Path(ctx["prerequisites_dir"])
    if ctx.get("node_local"):  # this node may not see RESULTS: the runs' folders come from Tune's storage
        root = out_dir.parent / PREREQUISITES_DIR
        for run in runs:
            path = (ctx.get("prerequisite_checkpoints") or {}).get(run.name)
            if path and finished_result(root / run.name) is None:
                _storage_checkpoint(path, ctx["storage"]).to_directory(str(root / run.name))
    return assemble(cfg, root, out_dir)


def _storage_checkpoint(path: str, storage: str):
    import pyarrow.fs
    from ray import tune

    uri = storage if "://" in storage else Path(storage).as_uri()
    return tune.Checkpoint(path, filesystem=pyarrow.fs.FileSystem.from_uri(uri)[0])


def _quiet_trial_logs() -> None:
    """Informational lines every trial process would forward to the driver; warnings and errors stay."""
    import logging

    from bench.logs import quiet_routine_output

    quiet_routine_output()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint successfully created" per epoch
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU


def sweep_trial(config: dict, ctx: dict) -> None:
    """The Tune trainable: one trial of the sweep."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    _quiet_trial_logs()
    cfg, out_dir, sweep_info, metric = _trial_setup(config, ctx, trial_id,
                                                    _trial_out_dir(ctx, trial_folder(config, trial_id)))

    if ctx["workers"] > 1:
        return _multi_worker_trial(config, ctx, trial_id, cfg, out_dir)

    _restore_checkpoint(tune.get_checkpoint(), out_dir)
    _log_attempt(out_dir)

    def on_epoch(row: dict, ckpt_dir: Path | None) -> None:
        # The folder travels as Tune's checkpoint only when it must reach RESULTS through the storage
        # (--storage: node-local trial folders). Without, the trial writes RESULTS itself, resumes from it,
        # and a Tune checkpoint would be a copy of it (W&B runs included) in RESULTS/_tune.
        ckpt = _report_dir(out_dir) if ckpt_dir is not None and ctx.get("node_local") else None
        tune.report(_report_metrics(row, metric), checkpoint=ckpt)

    try:
        result = _run(config, ctx, trial_id, cfg, out_dir, sweep_info, on_epoch, writes_error=True)
    finally:
        from bench.report.tracking import close_service

        close_service()
    # Test metrics, in the last result Tune keeps (and the only report of a trial that was already done);
    # the folder goes with it, so that result.json reaches RESULTS through the storage.
    tune.report(_final_metrics(result, metric), checkpoint=_report_dir(out_dir) if ctx.get("node_local") else None)


def _run(config: dict, ctx: dict, trial_id: str, cfg, out_dir: Path, sweep_info: dict, on_epoch,
         *, writes_error: bool) -> dict:
    """``run_trial`` on the trial's config with the runs it needed first assembled into it; a failure leaves
    an error result.json (written by one process) before it propagates to Tune."""
    from bench.trial import run_trial, write_error_result

    try:
        cfg = _assembled(cfg, ctx, out_dir)
        return run_trial(cfg, out_dir, data_root=ctx["data_root"], progress=False, epoch_callback=on_epoch,
                         run_id=trial_id, group=ctx["name"], sweep=sweep_info, track=True,
                         evaluate=_evaluates(config, ctx))
    except Exception as exc:
        if writes_error:
            write_error_result(cfg, out_dir, exc, sweep=sweep_info)
        raise


def _evaluates(config: dict, ctx: dict) -> bool:
    """Runs needed first and merge-search candidates are validation-only (no test evaluation)."""
    return not (config.get("prerequisite") or ctx.get("merge_search"))


def _multi_worker_trial(config: dict, ctx: dict, trial_id: str, cfg, out_dir: Path) -> None:
    """``workers`` DeepSpeed processes, one per Ray Train worker, driven from this Tune trial; the workers'
    reports (metrics and checkpoints, the last with result.json) reach Tune through TuneReportCallback."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": ctx["cpus"]}
    if ctx["gpus"]:
        resources["GPU"] = ctx["gpus"]
    trainer = TorchTrainer(
        train_worker_loop,
        train_loop_config={"config": dict(config), "ctx": ctx, "trial_id": trial_id, "out_dir": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=ctx["workers"], use_gpu=bool(ctx["gpus"]),
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"train_{trial_id}", storage_path=ctx["storage"],
                             # a lost worker restarts the group, which resumes from the last reported epoch
                             failure_config=FailureConfig(max_failures=ctx.get("max_failures", 0)),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def train_worker_loop(loop_cfg: dict) -> None:
    """One Ray Train worker: ``run_trial`` as this worker's rank. Ray's torch backend has set the torch
    environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and joined the process group,
    which DeepSpeed then uses as it is."""
    import ray.train as rt

    from bench.engine import local_rank

    _quiet_trial_logs()
    config, ctx, trial_id = loop_cfg["config"], loop_cfg["ctx"], loop_cfg["trial_id"]
    cfg, out_dir, sweep_info, metric = _trial_setup(config, ctx, trial_id, loop_cfg["out_dir"])

    rank = rt.get_context().get_world_rank()
    # one worker per node reports the trial's folder, which on that node holds every local rank's part of
    # DeepSpeed's checkpoint; Ray Train merges the nodes' parts into one checkpoint in the storage
    reports_dir = local_rank() == 0
    if reports_dir:
        _restore_checkpoint(rt.get_checkpoint(), out_dir)

    def on_epoch(row: dict, ckpt_dir: Path | None) -> None:
        ckpt = rt.Checkpoint.from_directory(str(out_dir)) if ckpt_dir is not None and reports_dir else None
        rt.report(_report_metrics(row, metric), checkpoint=ckpt)

    result = _run(config, ctx, trial_id, cfg, out_dir, sweep_info, on_epoch, writes_error=rank == 0)
    # every worker reports once more (Ray Train counts reports per worker); rank 0's metrics are Tune's,
    # and its folder, now with result.json, is the last checkpoint
    ckpt = rt.Checkpoint.from_directory(str(out_dir)) if reports_dir else None
    rt.report(_final_metrics(result, metric) if rank == 0 else {OBJECTIVE: float("nan")}, checkpoint=ckpt)
