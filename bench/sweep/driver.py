"""``bench sweep FILE.yaml``: a Ray Tune sweep of trials, each one ``bench run`` with sampled settings.

* A trial is :func:`bench.trial.run_trial` (same code path, same ``result.json``) in
  ``RESULTS/<method>_s<seed>_<trial id>/``; it reports every epoch to Tune (train loss, validation metrics,
  lr, λ ...) with the epoch's checkpoint folder, so ASHA can stop bad trials and a lost trial restarts from
  its last epoch.
* Trials with ``resources.workers > 1`` run a Ray Train ``TorchTrainer`` inside the Tune trial (the
  Train-inside-Tune pattern of Ray >= 2.43): every worker runs ``run_trial`` under DeepSpeed in Ray's
  worker environment (its torch backend sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
  and joins the process group), every rank saves its part of DeepSpeed's checkpoint, one worker per node
  reports the trial's folder, rank 0's metrics reach Tune through ``TuneReportCallback``; the trainer
  retries failed workers from the last checkpoint (``FailureConfig``).
* Code travels with Ray's runtime_env (``py_modules``: the suite's packages), so worker nodes need the
  suite's dependencies installed but not its source. ``--storage`` (a path every node sees, or an object
  store URI such as ``s3://bucket/prefix``) is Tune's storage: trials then run in a node-local folder and
  every report's files (checkpoints, history.json, result.json) travel through it into ``RESULTS``, so
  nodes need no shared disk. Without it, storage is ``RESULTS/_tune`` and trials write ``RESULTS`` directly
  (one node, or ``RESULTS`` on a shared file system).
* Tune's own state lives in ``RESULTS/_tune/<name>``; ``--resume`` restores it: finished trials are not
  rerun, unfinished and errored ones continue from their checkpoints.
* A trial that raises writes ``result.json`` with ``"status": "error"`` and re-raises, so Tune records the
  error and the other trials go on.
* At the end the leaderboard of ``RESULTS`` is built and printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

OBJECTIVE = "objective"  # the key every trial reports its validation metric under (per-method metric names differ)
TUNE_DIR = "_tune"
MEMBERS_DIR = "_members"  # AMT pool members, shared by the sweep's amt trials (bench.sweep.pool)
PACKAGES = ("bench", "methods", "data_shards")  # the suite's code, shipped to every node (runtime_env py_modules)
# Environment a trial process needs from the driver (a remote cluster's workers do not inherit it).
PROPAGATE_ENV = ("WANDB_MODE", "WANDB_SILENT", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY",
                 "TORCH_EXTENSIONS_DIR", "BENCH_SHARDS", "BENCH_DEBUG", "OMP_NUM_THREADS")


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune sweep from a tune_spaces/*.yaml file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("file", type=Path, help="sweep file (tune_spaces/*.yaml)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address ('auto' joins the running cluster); default: start Ray locally")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --results")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous sweep's --results folder (one holding sweep.json) and start afresh")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="override resources.gpus (per worker when workers > 1); fractions allowed")
    p.add_argument("--workers-per-trial", type=int, default=None, help="override resources.workers")
    p.add_argument("--results", type=Path, default=None, help="results folder (default: results/<sweep name>)")
    p.add_argument("--storage", default=None,
                   help="Tune's storage for nodes without a shared disk: a path all nodes see, or a URI "
                        "(s3://..., gs://...); trials' files reach --results through it (default: --results/_tune)")
    p.add_argument("--data-root", type=Path, default=None, help="shards root (default: $BENCH_SHARDS or ./shards)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a locally started Ray (default: all)")
    p.add_argument("--no-leaderboard", action="store_true")
    p.add_argument("--wandb", action="store_true", help="also log the leaderboard to W&B")
    p.add_argument("--check", action="store_true", help="validate the file, print the trial count and stop")
    p.set_defaults(func=run)


def run(args) -> int:
    from bench.sweep.space import load_sweep

    spec = load_sweep(args.file)
    if args.gpus_per_trial is not None:
        if args.gpus_per_trial < 0:
            raise ValueError(f"--gpus-per-trial {args.gpus_per_trial:g} must be >= 0")
        spec.gpus = float(args.gpus_per_trial)
    if args.workers_per_trial is not None:
        if args.workers_per_trial < 1:
            raise ValueError(f"--workers-per-trial {args.workers_per_trial} must be >= 1")
        spec.workers = args.workers_per_trial
    if args.check:
        print(f"{spec.path}: ok, {spec.n_trials()} trials of {', '.join(spec.methods)} on "
              f"{', '.join(spec.datasets())}, every config resolved"
              + (" (merge search: validation-only candidates; the best per target domain is tested once)"
                 if spec.merge_search else ""))
        return 0
    results = (args.results or Path("results") / spec.name).resolve()
    if args.overwrite and not args.resume and results.exists():
        if not (results / "sweep.json").exists():
            raise ValueError(f"--overwrite: {results} does not look like a sweep's results folder (no sweep.json)")
        shutil.rmtree(results)
    summary = run_sweep(spec, results, address=args.address, resume=args.resume, data_root=args.data_root,
                        num_cpus=args.num_cpus, leaderboard=not args.no_leaderboard, wandb_log=args.wandb,
                        storage=args.storage)
    # 1 when a trial failed: the sweep still ran the others and built the leaderboard from them
    return 1 if summary["n_error"] or any(v in ("error", "unreadable") for v in summary["result_files"].values()) else 0


# ------------------------------------------------------------------------------------------- the driver

def resolve_data_root(data_root: str | Path | None) -> Path:
    """Absolute shards root: Ray workers run in other folders."""
    root = data_root or os.environ.get("BENCH_SHARDS") or "shards"
    return Path(root).expanduser().resolve()


def trial_dir_name(method: str, seed: int, trial_id: str) -> str:
    return f"{method}_s{seed}_{trial_id}"


def _dirname_creator(trial) -> str:
    cfg = trial.config
    return trial_dir_name(cfg.get("method", "trial"), cfg.get("seed", 0), trial.trial_id)


def _param_space(spec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {
        "method": tune.grid_search(spec.methods) if len(spec.methods) > 1 else spec.methods[0],
        "seed": tune.grid_search(spec.seeds) if len(spec.seeds) > 1 else spec.seeds[0],
    }
    for key, (dist, args) in spec.space.items():
        space[key] = {
            "grid": lambda a: tune.grid_search(a),
            "choice": lambda a: tune.choice(a),
            "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a),
        }[dist](args)
    return space


def _scheduler(spec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s["type"] == "fifo":
        return FIFOScheduler()
    epochs = _max_epochs(spec)
    # +1: a trial's last report (its final result) must never be cut by the scheduler's max_t.
    return ASHAScheduler(time_attr="training_iteration", max_t=s.get("max_t", epochs + 1),
                         grace_period=s.get("grace_period", 1), reduction_factor=s.get("reduction_factor", 2),
                         brackets=s.get("brackets", 1))


def _max_epochs(spec) -> int:
    from bench.config import resolve_config

    best = 1
    for m in spec.methods:
        cfg = resolve_config(m, spec.overrides(m, spec.seeds[0], {}))
        best = max(best, int(cfg.epochs))
    if "epochs" in spec.space:
        dist, args = spec.space["epochs"]
        best = max(best, int(max(args)))
    return best


def _searcher(spec):
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.seeds[0])
    return None  # random / grid (BasicVariantGenerator)


def _init_ray(address: str | None, num_cpus: int | None, env: dict[str, str]):
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": env, "py_modules": _code_modules()}
    # WARNING: Ray's INFO lines (instance start, one per uploaded code package) tell a user nothing actionable.
    common = dict(runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    if address:
        ray.init(address=address, **common)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **common)
    return True


def _code_modules() -> list[str]:
    """The suite's package folders: Ray uploads them once per sweep and puts them on every worker's path,
    on every node, whatever the node's file system holds."""
    repo = Path(__file__).resolve().parents[2]
    return [str(repo / name) for name in PACKAGES]


def _trial_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in PROPAGATE_ENV if k in os.environ}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    # DeepSpeed's compiled op, built once: beside the driver's code unless TORCH_EXTENSIONS_DIR says where
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "torch_extensions"))
    env["BENCH_IN_SWEEP"] = "1"
    return env


def _storage(results: Path, storage: str | None) -> str:
    """Tune's storage_path: ``storage`` as given (URI, or a path made absolute), else RESULTS/_tune."""
    if storage is None:
        return str(results / TUNE_DIR)
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _experiment_exists(storage: str, name: str) -> bool:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else Path(storage).as_uri())
    return fs.get_file_info(f"{path.rstrip('/')}/{name}").type != pyarrow.fs.FileType.NotFound


def run_sweep(spec, results: str | Path, *, address: str | None = None, resume: bool = False,
              data_root: str | Path | None = None, num_cpus: int | None = None, leaderboard: bool = True,
              wandb_log: bool = False, verbose: int = 1, storage: str | None = None) -> dict[str, Any]:
    """Run (or ``resume``) the sweep ``spec`` into ``results``; return a summary dict.

    ``verbose``: 0 silent, 1 one line per trial start, epoch and end (:class:`ProgressLines`), 2 Tune's own
    status tables and result boxes besides. ``storage``: Tune's storage (see the module's docstring)."""
    t_start = time.time()
    results = Path(results).resolve()
    data_root = resolve_data_root(data_root)
    from data_shards.paths import dataset_dir

    dataset_dir(spec.dataset, data_root)  # fails early, with its own message, when the shards are missing
    storage_path = _storage(results, storage)
    exp_dir = f"{storage_path.rstrip('/')}/{spec.name}"
    exists = _experiment_exists(storage_path, spec.name)
    if exists and not resume:
        raise ValueError(f"{exp_dir} already holds sweep {spec.name!r}; pass --resume to continue it, "
                         f"or --results DIR / --storage for a new one")
    if resume and not exists:
        raise ValueError(f"nothing to resume: {exp_dir} does not exist")
    results.mkdir(parents=True, exist_ok=True)
    (results / "sweep.json").write_text(json.dumps(_spec_record(spec, data_root), indent=2, default=str))

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # Tune's own result.json stays out of RESULTS
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    # Noise a user does not need: Tune warns at every forced experiment snapshot (one per trial checkpoint
    # with num_to_keep=1: over 100 lines in a smoke run) and logs each result file it writes.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    env = _trial_env()
    if spec.gpus == 0:  # CPU trials (Ray hides the GPUs from them): DeepSpeed need not detect, and warn about, it
        env.setdefault("DS_ACCELERATOR", "cpu")
    started = _init_ray(address, num_cpus, env)
    import logging

    # Tune's own result.json/progress.csv are switched off (see above); its "could not fetch metrics" is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if verbose < 2:
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    import ray
    from ray import tune

    try:
        if spec.gpus > 0 and not ray.cluster_resources().get("GPU"):
            print(f"bench sweep: the Ray cluster has no GPU; running with gpus=0 instead of {spec.gpus:g} per "
                  f"{'worker' if spec.workers > 1 else 'trial'}", flush=True)
            spec.gpus = 0.0
        ctx = {"results": str(results), "data_root": str(data_root), "name": spec.name,
               "members": str(results / MEMBERS_DIR),
               "space_keys": sorted(spec.space), "metrics": {m: spec.metric_for(m) for m in spec.methods},
               "spec_fixed": {m: spec.overrides(m, 0, {}, per_dataset=False) for m in spec.methods},
               "per_dataset": {m: {d: spec.dataset_overrides(m, d) for d in spec.per_dataset} for m in spec.methods},
               "workers": spec.workers, "cpus": spec.cpus, "gpus": spec.gpus,
               "storage": storage_path, "node_local": storage is not None, "max_failures": spec.max_failures,
               "merge_search": spec.merge_search}
        ctx["pool_parallel"] = _pool_parallel(spec, ray.cluster_resources())
        trainable = tune.with_parameters(sweep_trial, ctx=ctx)
        trainable = tune.with_resources(trainable, _trial_resources(spec, ctx))
        if resume:
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            from ray.tune import CheckpointConfig, FailureConfig, RunConfig

            tuner = tune.Tuner(
                trainable, param_space=_param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=OBJECTIVE, mode=spec.mode, scheduler=_scheduler(spec), search_alg=_searcher(spec),
                    num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent_trials,
                    time_budget_s=spec.time_budget_s, trial_dirname_creator=_dirname_creator,
                    trial_name_creator=_dirname_creator),
                run_config=RunConfig(
                    name=spec.name, storage_path=storage_path, verbose=verbose if verbose >= 2 else 0,
                    failure_config=FailureConfig(max_failures=spec.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                    callbacks=[ResultFileCallback(str(results), fetch=ctx["node_local"], storage=storage_path)]
                    + ([ProgressLines(spec.n_trials(), t_start)] if verbose == 1 else [])))
        print(f"bench sweep: {spec.name}: {spec.n_trials()} trials ({', '.join(spec.methods)}) -> {results}",
              flush=True)
        grid = tuner.fit()
        if spec.merge_search:
            from bench.sweep.merge_search import SelectionError

            try:  # the candidates' result.json first (see below), then select among them
                wait_for_result_files(results, [Path(r.path).name for r in grid if r.path and not r.error])
                _test_merge_selections(spec, results, ctx)
            except SelectionError as exc:  # the candidates stay; the leaderboard says what is missing
                print(f"bench sweep: {spec.name}: no test of a selected setting: {exc}", flush=True)
    finally:
        if started:
            ray.shutdown()
    # Tune calls a trial finished when its last report arrives; the trial wrote result.json just before, but
    # on a multi-node cluster that file may become visible to this driver later (another node's write to a
    # shared disk, a trial still exiting): wait for them, so the summary and the console leaderboard see the
    # same trials as the files (and as a later `bench leaderboard`).
    late = wait_for_result_files(results, [Path(r.path).name for r in grid if r.path and not r.error])
    if late:
        print(f"bench sweep: no result.json yet for {', '.join(late)}", flush=True)
    summary = summarize(grid, results, spec, time.time() - t_start)
    if leaderboard:
        _leaderboard(results, wandb_log)
    return summary


def wait_for_result_files(results: Path, trial_names: list[str], timeout_s: float = 60.0) -> list[str]:
    """Wait until each ``results/<trial>/result.json`` exists and parses; return the trials still missing."""
    deadline = time.monotonic() + timeout_s
    missing = list(trial_names)
    while True:
        still = []
        for name in missing:
            try:
                json.loads((Path(results) / name / "result.json").read_text())
            except (OSError, ValueError):
                still.append(name)
        missing = still
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(0.5)


def _test_merge_selections(spec, results: Path, ctx: dict) -> None:
    """A merge search's second step: per target, the candidate that validated best is tested once
    (bench.sweep.merge_search), each test a Ray task with one trial's resources."""
    import ray

    from bench.sweep.merge_search import load_candidates, select, test_selected
    from bench.sweep.pool import _merge_trial, task_options

    selections = select(load_candidates(results, spec.name), sorted(spec.space))
    task = ray.remote(_merge_trial).options(**task_options(spec.cpus, spec.gpus))
    kwargs = {"data_root": ctx["data_root"], "progress": False, "group": spec.name, "track": True,
              "sweep": {"name": spec.name, "stage": "test of the per-target selection"}}

    def run(cfg, out_dir):
        return ray.get(task.remote(cfg, str(out_dir), kwargs))

    for sel in selections:
        print(f"bench sweep: {spec.name}: {sel['target']}: selected {sel['settings']} "
              f"({sel['metric']} {sel['value']:.4f} of {sel['candidates']} candidates); testing it", flush=True)
    test_selected(selections, results, run)


def _pool_parallel(spec, cluster: dict) -> int:
    """How many AMT pool members one trial may train at once: as many as the cluster holds trials."""
    caps = [8]
    if spec.cpus > 0:
        caps.append(int(cluster.get("CPU", 1) // spec.cpus))
    if spec.gpus > 0:
        caps.append(int(cluster.get("GPU", 1) // spec.gpus))
    return max(1, min(caps))


def _trial_resources(spec, ctx: dict):
    """Per-trial resources: a function of the trial's config, because an AMT pool trial reserves one
    bundle per member it trains at once (bench.sweep.pool) besides its own empty head bundle."""
    from ray.tune import PlacementGroupFactory

    per = {"CPU": spec.cpus, **({"GPU": spec.gpus} if spec.gpus else {})}

    def resources(config: dict):
        from bench.trial import is_pool_config

        cfg, *_ = _trial_setup(config, ctx, "resources")
        if is_pool_config(cfg):  # members are one-worker tasks of one `resources` share each
            from methods.amt import pool_eps_list

            parallel = max(1, min(len(pool_eps_list(cfg)), ctx["pool_parallel"]))
            return PlacementGroupFactory([{}] + [dict(per)] * parallel)
        if spec.workers > 1:  # the Tune trial only drives a TorchTrainer; the workers hold the resources
            return PlacementGroupFactory([{"CPU": 0, "memory": 1}])  # a PG needs a non-empty bundle
        return PlacementGroupFactory([per])

    return resources


def _spec_record(spec, data_root: Path) -> dict:
    return {"name": spec.name, "file": str(spec.path), "methods": spec.methods, "dataset": spec.dataset,
            "backbone": spec.backbone, "fixed": spec.fixed, "per_method": spec.per_method,
            "space": {k: {d: a} for k, (d, a) in spec.space.items()}, "scheduler": spec.scheduler,
            "search": spec.search, "num_samples": spec.num_samples, "seeds": spec.seeds,
            "resources": {"cpus": spec.cpus, "gpus": spec.gpus, "workers": spec.workers},
            "data_root": str(data_root)}


def summarize(grid, results: Path, spec, wall_s: float) -> dict[str, Any]:
    """Per-trial status from the result.json files (the source of truth), printed as one block."""
    rows = []
    for r in grid:
        trial_id = Path(r.path).name if r.path else "?"
        status = "error" if r.error else "ok"
        rows.append({"trial": trial_id, "status": status, "error": str(r.error).splitlines()[0] if r.error else None,
                     OBJECTIVE: (r.metrics or {}).get(OBJECTIVE)})
    files = {}
    for path in sorted(results.glob("*/result.json")):
        try:
            files[path.parent.name] = json.loads(path.read_text()).get("status", "ok")
        except (OSError, json.JSONDecodeError):
            files[path.parent.name] = "unreadable"
    n_ok = sum(1 for s in files.values() if s == "ok")
    summary = {"name": spec.name, "results": str(results), "n_trials": len(rows), "n_ok": n_ok,
               "n_error": sum(1 for r in rows if r["status"] == "error"), "wall_s": round(wall_s, 1),
               "trials": rows, "result_files": files}
    (results / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"bench sweep: {spec.name}: {n_ok}/{len(rows)} trials ok, {summary['n_error']} errors, "
          f"{wall_s:.0f} s; results in {results}", flush=True)
    for name, status in files.items():
        if status != "ok":
            print(f"  {name}: {status}")
    return summary


def _leaderboard(results: Path, wandb_log: bool) -> None:
    try:
        from bench.report.leaderboard import build_leaderboard
    except ImportError as e:
        print(f"bench sweep: no leaderboard ({e})")
        return
    build_leaderboard(results, wandb_log=wandb_log, console=True)
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------- callbacks

try:
    from ray.tune import Callback as _TuneCallback
except Exception:  # noqa: BLE001 - Ray missing: the module still imports for `bench --help`
    _TuneCallback = object


class ResultFileCallback(_TuneCallback):
    """With ``fetch`` (trials run in node-local folders), each checkpoint a trial reports (its folder:
    checkpoints, history.json, finally result.json) is copied from Tune's storage into RESULTS/<trial>.
    A trial that ends without a result.json (stopped by ASHA, lost with its node) gets one saying why."""

    def __init__(self, results: str, fetch: bool = False, storage: str | None = None):
        self.results, self.fetch, self.storage = results, fetch, storage

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if self.fetch and checkpoint is not None:
            self._fetch(trial, checkpoint)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # a multi-worker trial's checkpoints are Ray Train's, named in its reports (TuneReportCallback)
        path = result.get("checkpoint_path")
        if self.fetch and path:
            import pyarrow.fs
            from ray import tune

            uri = self.storage if "://" in self.storage else Path(self.storage).as_uri()
            self._fetch(trial, tune.Checkpoint(path, filesystem=pyarrow.fs.FileSystem.from_uri(uri)[0]))

    def _fetch(self, trial, checkpoint) -> None:
        out = Path(self.results) / trial_dir_name(trial.config.get("method", "trial"), trial.config.get("seed", 0),
                                                  trial.trial_id)
        staging = out.with_name(f".{out.name}.fetch")
        shutil.rmtree(staging, ignore_errors=True)
        checkpoint.to_directory(str(staging))
        _merge_tree(staging, out)
        shutil.rmtree(staging, ignore_errors=True)

    def _write(self, trial, status: str, reason: str) -> None:
        out = Path(self.results) / trial_dir_name(trial.config.get("method", "trial"), trial.config.get("seed", 0),
                                                  trial.trial_id)
        path = out / "result.json"
        if path.exists() or not (out.exists() or self.fetch):
            return
        out.mkdir(parents=True, exist_ok=True)
        cfg = trial.config
        rec = {"id": trial.trial_id, "method": cfg.get("method"), "seed": cfg.get("seed"), "status": status,
               "error": reason, "sweep": {"trial_id": trial.trial_id}, "last_result": _jsonable(trial.last_result)}
        tmp = path.with_name(".result.json.tmp")
        tmp.write_text(json.dumps(rec, indent=2, default=str))
        os.replace(tmp, path)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trial, "stopped", "stopped early by the scheduler")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trial, "error", "trial failed without writing a result (see Tune's error file)")


class ProgressLines(_TuneCallback):
    """What a user follows during a sweep: one line per trial start, finished epoch, end and error."""

    def __init__(self, n_trials: int, t_start: float):
        self.n_trials, self.t_start, self.n_done = n_trials, t_start, 0

    def _say(self, text: str) -> None:
        print(f"[{time.time() - self.t_start:6.0f} s] {text}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._say(f"{trial.trial_id}: started ({trial.config.get('method')}, seed {trial.config.get('seed')})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "done_result" in result:  # the final report: test metrics
            tests = [f"{k[5:]} {result[k]:.3f}" for k in ("test_clean_acc", "test_pgd_acc", "test_autoattack_acc",
                                                            "test_adv_acc") if k in result]
            self._say(f"{trial.trial_id}: tested: {', '.join(tests) or 'done'}")
            return
        vals = [f"{k} {v:.3f}" for k, v in result.items()
                if k.startswith("val_") and isinstance(v, (int, float)) and not isinstance(v, bool)]
        epoch = result.get("epoch")
        self._say(f"{trial.trial_id}: epoch {int(epoch) if epoch is not None else '?'}"
                  + (f" train_loss {result['train_loss']:.3f}" if "train_loss" in result else "")
                  + (", " + ", ".join(vals) if vals else ""))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.n_done += 1
        self._say(f"{trial.trial_id}: finished ({self.n_done}/{self.n_trials} trials done)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.n_done += 1
        self._say(f"{trial.trial_id}: FAILED ({self.n_done}/{self.n_trials}); error file: {trial.error_file}")


def _merge_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst``, each file replaced atomically; the epoch folders of ``dst/checkpoints``
    that ``src`` no longer has are removed (``latest`` moved on)."""
    for f in sorted(src.rglob("*")):
        if f.is_file():
            target = dst / f.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.copy2(f, tmp)
            os.replace(tmp, target)
    if (src / "checkpoints").is_dir():
        for old in (dst / "checkpoints").glob("epoch*"):
            if not (src / "checkpoints" / old.name).exists():
                shutil.rmtree(old, ignore_errors=True)


def _jsonable(d: dict | None) -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out


# ------------------------------------------------------------------------------------------- the trial

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
        _merge_tree(Path(src), out_dir)


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
    from bench.config import resolve_config

    method, seed = config["method"], int(config["seed"])
    sampled = {k: config[k] for k in ctx["space_keys"]}
    fixed = ctx["spec_fixed"][method]
    dataset = sampled.get("dataset", fixed.get("dataset"))
    overrides = {**fixed, **ctx.get("per_dataset", {}).get(method, {}).get(dataset, {}), **sampled, "seed": seed}
    name = trial_dir_name(method, seed, trial_id)
    out_dir = Path(out_dir) if out_dir is not None else Path(ctx["results"]) / name
    swept = {"method": method, "seed": seed, **sampled}
    sweep_info = {"name": ctx["name"], "trial_id": trial_id, "swept": swept}
    cfg = resolve_config(method, overrides)
    return cfg, out_dir, sweep_info, ctx["metrics"][method]


def _quiet_trial_logs() -> None:
    """Informational lines every trial process would forward to the driver; warnings and errors stay."""
    import logging

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Checkpoint successfully created" per epoch
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU


def sweep_trial(config: dict, ctx: dict) -> None:
    """The Tune trainable: one trial of the sweep."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    _quiet_trial_logs()
    name = trial_dir_name(config["method"], int(config["seed"]), trial_id)
    cfg, out_dir, sweep_info, metric = _trial_setup(config, ctx, trial_id, _trial_out_dir(ctx, name))
    from bench.trial import is_pool_config, run_trial, write_error_result

    if is_pool_config(cfg):
        return _pool_trial(ctx, trial_id, cfg, out_dir, sweep_info, metric)
    if ctx["workers"] > 1:
        return _multi_worker_trial(config, ctx, trial_id, cfg, out_dir)

    _restore_checkpoint(tune.get_checkpoint(), out_dir)
    _log_attempt(out_dir)

    def on_epoch(row: dict, ckpt_dir: Path | None) -> None:
        tune.report(_report_metrics(row, metric), checkpoint=_report_dir(out_dir) if ckpt_dir is not None else None)

    try:
        result = run_trial(cfg, out_dir, data_root=ctx["data_root"], progress=False, epoch_callback=on_epoch,
                           run_id=trial_id, group=ctx["name"], sweep=sweep_info, track=True,
                           evaluate=not ctx.get("merge_search"))  # merge-search candidates: validation only
    except Exception as exc:
        write_error_result(cfg, out_dir, exc, sweep=sweep_info)
        raise
    finally:
        from bench.report.tracking import close_service

        close_service()
    # Test metrics, in the last result Tune keeps (and the only report of a trial that was already done);
    # the folder goes with it, so that result.json reaches RESULTS through the storage.
    tune.report(_final_metrics(result, metric), checkpoint=_report_dir(out_dir) if ctx.get("node_local") else None)


def _pool_trial(ctx: dict, trial_id: str, cfg, out_dir: Path, sweep_info: dict, metric: str) -> None:
    """An AMT pool trial: members as parallel Ray tasks (cached across the sweep's trials), then the merged
    pool's validation and test evaluation; one report to Tune (see bench.sweep.pool)."""
    from ray import tune

    from bench.sweep.pool import run_pool_trial
    from bench.trial import write_error_result

    _log_attempt(out_dir)
    try:
        result = run_pool_trial(cfg, out_dir, data_root=ctx["data_root"], cpus=ctx["cpus"], gpus=ctx["gpus"],
                                cache=Path(ctx["members"]), run_id=trial_id, group=ctx["name"], sweep=sweep_info,
                                evaluate=not ctx.get("merge_search"))
    except Exception as exc:
        write_error_result(cfg, out_dir, exc, sweep=sweep_info)
        raise
    tune.report(_final_metrics(result, metric), checkpoint=_report_dir(out_dir) if ctx.get("node_local") else None)


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
    from bench.trial import run_trial, write_error_result

    rank = rt.get_context().get_world_rank()
    # one worker per node reports the trial's folder, which on that node holds every local rank's part of
    # DeepSpeed's checkpoint; Ray Train merges the nodes' parts into one checkpoint in the storage
    reports_dir = local_rank() == 0
    if reports_dir:
        _restore_checkpoint(rt.get_checkpoint(), out_dir)

    def on_epoch(row: dict, ckpt_dir: Path | None) -> None:
        ckpt = rt.Checkpoint.from_directory(str(out_dir)) if ckpt_dir is not None and reports_dir else None
        rt.report(_report_metrics(row, metric), checkpoint=ckpt)

    try:
        result = run_trial(cfg, out_dir, data_root=ctx["data_root"], progress=False, epoch_callback=on_epoch,
                           run_id=trial_id, group=ctx["name"], sweep=sweep_info, track=True)
    except Exception as exc:
        if rank == 0:
            write_error_result(cfg, out_dir, exc, sweep=sweep_info)
        raise
    # every worker reports once more (Ray Train counts reports per worker); rank 0's metrics are Tune's,
    # and its folder, now with result.json, is the last checkpoint
    ckpt = rt.Checkpoint.from_directory(str(out_dir)) if reports_dir else None
    rt.report(_final_metrics(result, metric) if rank == 0 else {OBJECTIVE: float("nan")}, checkpoint=ckpt)


if __name__ == "__main__":  # pragma: no cover
    from bench.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
