"""``bench sweep FILE.yaml``: the command and the Tune run: the sweep's trials (each one ``bench run`` with
sampled settings, bench.sweep.trainables) on a Ray cluster, then its results (bench.sweep.results).

* Trials write ``RESULTS/<method>_s<seed>_<trial id>/`` (bench.sweep.folders) and report every epoch to
  Tune with their folder as the checkpoint, so ASHA can stop bad trials and a lost trial restarts from its
  last epoch. Trials with ``resources.workers > 1`` run a Ray Train ``TorchTrainer`` inside the Tune trial.
* Code travels with Ray's runtime_env (``py_modules``: the suite's packages), so worker nodes need the
  suite's dependencies installed but not its source. ``--storage`` (a path every node sees, or an object
  store URI such as ``s3://bucket/prefix``) is Tune's storage: trials then run in a node-local folder and
  every report's files (checkpoints, history.json, result.json) travel through it into ``RESULTS``
  (bench.sweep.callbacks), so nodes need no shared disk. Without it, storage is ``RESULTS/_tune`` and trials
  write ``RESULTS`` directly (one node, or ``RESULTS`` on a shared file system).
* Tune's own state lives in ``RESULTS/_tune/<name>``; ``--resume`` restores it: finished trials are not
  rerun, unfinished and errored ones continue from their checkpoints.
* A trial that raises writes ``result.json`` with ``"status": "error"`` and re-raises, so Tune records the
  error and the other trials go on.
* At the end the leaderboard of ``RESULTS`` is built and printed.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.files import atomic_write_json
from bench.sweep.folders import TUNE_DIR, trial_folder
from bench.sweep.trainables import OBJECTIVE, sweep_trial

FIRST_PHASE_SUFFIX = "-prerequisites"  # Tune's name of a sweep's first phase (bench.sweep.phases)
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
    p.set_defaults(func=run, on_interrupt=_interrupted)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C ended a Tune run: Tune stopped its trials and saved the sweep's state (``--resume`` continues)."""


def _resume_argv(argv: list[str]) -> list[str]:
    """The command line that continues the interrupted sweep: the same one, with --resume, without --overwrite."""
    out = [a for a in argv if a != "--overwrite"]
    return out if "--resume" in out else out + ["--resume"]


def _interrupted(args, argv: list[str]) -> str:
    results = getattr(args, "resolved_results", None) or args.results or "its results folder"
    return (f"interrupted; finished trials are in {results}, Tune saved the others' progress; continue with: "
            f"bench {shlex.join(_resume_argv(argv))}")


def _sigint_marker(signum, frame):
    raise KeyboardInterrupt


def _fit_or_interrupt(tuner):
    """``tuner.fit()``, raising SweepInterrupted when Ctrl-C stopped it. Tune catches SIGINT itself (it stops the
    trials and saves the experiment, then returns as if done) and, having handled one, puts back the handler it
    found: ours, which it otherwise leaves replaced by its own. That is how an interrupted run is told apart."""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()
    previous = signal.signal(signal.SIGINT, _sigint_marker)
    try:
        grid = tuner.fit()
        # (with TUNE_DISABLE_SIGINT_HANDLER=1 Tune installs nothing and Ctrl-C raises through the marker)
        interrupted = (signal.getsignal(signal.SIGINT) is _sigint_marker
                       and not int(os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") or 0))
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise SweepInterrupted
    return grid


def run(args) -> int:
    print(f"bench sweep: {args.file}: loading", flush=True)  # the first line, before seconds of imports
    from bench.sweep.space import load_sweep

    # relative paths mean the folder the command started in, for --check and for every trial (run in Tune's)
    spec = load_sweep(args.file).with_absolute_paths()
    if args.gpus_per_trial is not None:
        if args.gpus_per_trial < 0:
            raise ValueError(f"--gpus-per-trial {args.gpus_per_trial:g} must be >= 0")
        spec.gpus = float(args.gpus_per_trial)
    if args.workers_per_trial is not None:
        if args.workers_per_trial < 1:
            raise ValueError(f"--workers-per-trial {args.workers_per_trial} must be >= 1")
        spec.workers = args.workers_per_trial
    if args.check:
        from bench.sweep.phases import check
        from bench.sweep.space import check_trial_inputs

        check(spec)
        check_trial_inputs(spec, resolve_data_root(args.data_root))  # what run_sweep checks before Ray starts
        print(f"{spec.path}: ok, {spec.n_trials()} trials of {', '.join(spec.methods)} on "
              f"{', '.join(spec.datasets())}, every config resolved, shards and backbone weights found"
              + (" (merge search: validation-only candidates; the best per target domain is tested once)"
                 if spec.merge_search else ""))
        return 0
    results = (args.results or Path("results") / spec.name).resolve()
    if args.overwrite and not args.resume and results.exists():
        if not (results / "sweep.json").exists():
            raise ValueError(f"--overwrite: {results} does not look like a sweep's results folder (no sweep.json)")
        shutil.rmtree(results)
    from bench.files import check_writable

    args.resolved_results = results
    check_writable(results, "results folder")  # one line now, not tracebacks from every trial later
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


def _dirname_creator(trial, points: list[dict] | None = None) -> str:
    """Tune's name and folder of a trial. A planned trial's settings are its point's (bench.sweep.phases):
    Tune names a trial before it resolves the settings read from the point."""
    from bench.sweep.phases import POINT

    config = trial.config
    if points is not None and isinstance(config.get(POINT), int):
        config = {**config, **points[config[POINT]]}
    return Path(trial_folder(config, trial.trial_id)).name


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
        # a Ray of our own on this machine: its "Token authentication is enabled" notice is for cluster admins
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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
    # trials run Ray's copy of the packages (no .git, no lock): the driver's commit, changes and lock for their
    # result.json provenance
    from bench.provenance import driver_env

    env.update(driver_env())
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
    storage_path, exists, plan = _prepare(spec, results, data_root, resume, storage)
    _quiet_tune(verbose)
    env = _trial_env()
    if spec.gpus == 0:  # CPU trials (Ray hides the GPUs from them): DeepSpeed need not detect, and warn about, it
        env.setdefault("DS_ACCELERATOR", "cpu")
    started = _init_ray(address, num_cpus, env)
    import ray

    try:
        if spec.gpus > 0 and not ray.cluster_resources().get("GPU"):
            print(f"bench sweep: the Ray cluster has no GPU; running with gpus=0 instead of {spec.gpus:g} per "
                  f"{'worker' if spec.workers > 1 else 'trial'}", flush=True)
            spec.gpus = 0.0
        _leave_room_for_eval_shards(spec, ray.cluster_resources())
        ctx = _sweep_context(spec, results, data_root, storage_path, node_local=storage is not None)
        fit = _tune_runner(spec, ctx, storage_path, resume=resume, exists=exists, verbose=verbose, t_start=t_start)
        if plan is None:
            from bench.sweep.space import tune_param_space

            print(f"bench sweep: {spec.name}: {spec.n_trials()} trials ({', '.join(spec.methods)}) -> {results}",
                  flush=True)
            grid = fit(spec.name, spec.n_trials(), param_space=tune_param_space(spec), scheduler=_scheduler(spec),
                       search_alg=_searcher(spec), num_samples=spec.num_samples, time_budget_s=spec.time_budget_s)
        else:
            grid = _two_phases(spec, plan, ctx, results, fit, t_start)
        if spec.merge_search:
            _test_selected_merges(spec, results, ctx, grid)
    finally:
        if started:
            ray.shutdown()
    return _finish(spec, grid, results, t_start, leaderboard=leaderboard, wandb_log=wandb_log, verbose=verbose)


def _prepare(spec, results: Path, data_root: Path, resume: bool, storage: str | None):
    """Before Ray starts: every trial's inputs checked, the sweep's Tune runs found (for ``--resume``) or
    refused (a new sweep into an old one), the plan of runs needed first, and ``sweep.json``. Returns
    (Tune's storage path, {Tune run name: exists}, the plan or None)."""
    from bench.sweep.phases import make_plan
    from bench.sweep.space import check_trial_inputs

    spec.with_absolute_paths()  # (done already by `bench sweep`; for callers of run_sweep)
    check_trial_inputs(spec, data_root)  # what each trial's start checks, before Ray starts (as --check does)
    storage_path = _storage(results, storage)
    names = [spec.name, spec.name + FIRST_PHASE_SUFFIX]
    exists = {n: _experiment_exists(storage_path, n) for n in names}
    if any(exists.values()) and not resume:
        raise ValueError(f"{storage_path.rstrip('/')}/{spec.name} already holds sweep {spec.name!r}; pass --resume "
                         f"to continue it, or --results DIR / --storage for a new one")
    if resume and not any(exists.values()):
        raise ValueError(f"nothing to resume: {storage_path.rstrip('/')}/{spec.name} does not exist")
    plan = make_plan(spec, results, resume)  # None unless trials need runs first (AMT pools)
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(results / "sweep.json", _spec_record(spec, data_root))
    return storage_path, exists, plan


def _quiet_tune(verbose: int) -> None:
    """Ray's and Tune's routine output off (ProgressLines says what a user follows); verbose=2 keeps Tune's."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # Tune's own result.json stays out of RESULTS
    # Tune's new console output prints a configuration box and a results path at any verbosity; the legacy
    # reporter at verbose=0 prints nothing (ProgressLines says what a user follows). verbose=2: Tune's own tables.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1" if verbose >= 2 else "0")
    # Noise a user does not need: Tune warns at every forced experiment snapshot (one per trial checkpoint
    # with num_to_keep=1: over 100 lines in a smoke run) and logs each result file it writes.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's own result.json/progress.csv are switched off (see above); its "could not fetch metrics" is noise.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if verbose < 2:
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
        # its Ctrl-C notices ("Stop signal received", "resume with Tuner.restore(...)"): the CLI's one line
        # says what to do instead (SweepInterrupted)
        logging.getLogger("ray.tune.tune").setLevel(logging.ERROR)


def _sweep_context(spec, results: Path, data_root: Path, storage_path: str, *, node_local: bool) -> dict[str, Any]:
    """What every trial of the sweep is handed (``sweep_trial``'s ``ctx``): plain data."""
    return {"results": str(results), "data_root": str(data_root), "name": spec.name,
            "space_keys": sorted(spec.space), "metrics": {m: spec.metric_for(m) for m in spec.methods},
            "spec_fixed": {m: spec.overrides(m, 0, {}, per_dataset=False) for m in spec.methods},
            "per_dataset": {m: {d: spec.dataset_overrides(m, d) for d in spec.per_dataset} for m in spec.methods},
            "workers": spec.workers, "cpus": spec.cpus, "gpus": spec.gpus,
            "storage": storage_path, "node_local": node_local, "max_failures": spec.max_failures,
            "merge_search": spec.merge_search}


def _tune_runner(spec, ctx: dict, storage_path: str, *, resume: bool, exists: dict[str, bool], verbose: int,
                 t_start: float):
    """``fit(name, n_trials, points=None, **tune_config)``: one Tune run (restored when ``--resume`` finds it)
    of ``sweep_trial`` with ``ctx``; ``points``: the planned trials it runs (bench.sweep.phases), else the
    sweep's space (``param_space`` in ``tune_config``)."""
    from ray import tune

    from bench.sweep.callbacks import ProgressLines, ResultFileCallback
    from bench.sweep.phases import points_space

    def fit(name: str, n_trials: int, points: list[dict] | None = None, **tune_config):
        trainable = tune.with_resources(tune.with_parameters(sweep_trial, ctx=ctx), _trial_resources(spec))
        if resume and exists[name]:
            tuner = tune.Tuner.restore(f"{storage_path.rstrip('/')}/{name}", trainable=trainable,
                                       resume_unfinished=True, resume_errored=True)
        else:
            from ray.tune import CheckpointConfig, FailureConfig, RunConfig

            param_space = points_space(points) if points is not None else tune_config.pop("param_space")
            namer = functools.partial(_dirname_creator, points=points)
            tuner = tune.Tuner(
                trainable, param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=OBJECTIVE, mode=spec.mode, max_concurrent_trials=spec.max_concurrent_trials,
                    trial_dirname_creator=namer, trial_name_creator=namer, **tune_config),
                run_config=RunConfig(
                    name=name, storage_path=storage_path, verbose=verbose if verbose >= 2 else 0,
                    failure_config=FailureConfig(max_failures=spec.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=1),
                    callbacks=[ResultFileCallback(ctx["results"], fetch=ctx["node_local"], storage=storage_path)]
                    + ([ProgressLines(n_trials, t_start)] if verbose == 1 else [])))
        return _fit_or_interrupt(tuner)

    return fit


def _test_selected_merges(spec, results: Path, ctx: dict, grid) -> None:
    """A merge search's test of each selected setting, once the candidates' result.json are there."""
    from bench.sweep.merge_search import SelectionError
    from bench.sweep.results import _test_merge_selections, wait_for_result_files

    try:  # the candidates' result.json first (see _finish), then select among them
        wait_for_result_files(results, [Path(r.path).name for r in grid if r.path and not r.error])
        _test_merge_selections(spec, results, ctx)
    except SelectionError as exc:  # the candidates stay; the leaderboard says what is missing
        print(f"bench sweep: {spec.name}: no test of a selected setting: {exc}", flush=True)


def _finish(spec, grid, results: Path, t_start: float, *, leaderboard: bool, wandb_log: bool,
            verbose: int) -> dict[str, Any]:
    """After Tune: the trials' result.json awaited, the summary, the leaderboard and the W&B upload hint."""
    from bench.sweep.results import _leaderboard, summarize, wait_for_result_files

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
    if verbose >= 1:
        from bench.report.tracking import offline_runs, sync_command

        n_runs = len(offline_runs(results))
        if n_runs:
            print(f"bench sweep: {n_runs} offline W&B runs; upload them with: {sync_command(results)}", flush=True)
    return summary


def _largest_eval_shards(spec) -> int:
    """The most evaluation shards any trial of ``spec`` asks for (fixed, per method, per data set, searched)."""
    values = [spec.fixed.get("eval_shards")]
    values += [block.get("eval_shards") for block in spec.per_method.values()]
    for block in spec.per_dataset.values():
        values += [block.get("eval_shards")]
        values += [sub.get("eval_shards") for sub in block.values() if isinstance(sub, dict)]
    if "eval_shards" in spec.space:
        _, args = spec.space["eval_shards"]
        values += [v for v in (args if isinstance(args, (list, tuple)) else [args])]
    return max([int(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)] or [1])


def _leave_room_for_eval_shards(spec, cluster: dict) -> None:
    """Cap the trials run at once so that an evaluation shard always finds a CPU beside them: a trial with
    ``eval_shards > 1`` runs its shards on the cluster's free CPUs while it holds its own
    (bench.sharded_eval._outside_the_trial), so concurrent trials holding every CPU would each wait for the
    others' shards forever. (A cluster that cannot fit a shard beside even one trial needs no cap: the
    shards then run in the trial's process.)"""
    shards = _largest_eval_shards(spec)
    if shards <= 1:
        return
    per_trial = spec.cpus * max(1, spec.workers)
    shard_cpus = 1.0  # bench.sharded_eval.sharded_flags' cpus_per_shard, as trials call it
    fit = int((cluster.get("CPU", 0) - shard_cpus) // per_trial) if per_trial > 0 else 0
    if fit < 1 or (spec.max_concurrent_trials is not None and spec.max_concurrent_trials <= fit):
        return
    spec.max_concurrent_trials = fit
    print(f"bench sweep: at most {fit} trial(s) at a time, so that their evaluation shards (eval_shards up to "
          f"{shards}) find a free CPU beside them ({cluster.get('CPU', 0):g} CPUs, {per_trial:g} per trial)",
          flush=True)


def _trial_resources(spec):
    """Per-trial resources: one share, or for a multi-worker trial a token bundle (the Ray Train workers it
    drives hold the shares)."""
    from ray.tune import PlacementGroupFactory

    if spec.workers > 1:
        return PlacementGroupFactory([{"CPU": 0, "memory": 1}])  # a PG needs a non-empty bundle
    return PlacementGroupFactory([{"CPU": spec.cpus, **({"GPU": spec.gpus} if spec.gpus else {})}])


def _two_phases(spec, plan: dict, ctx: dict, results: Path, fit, t_start: float):
    """A sweep whose trials need runs first (bench.sweep.phases): phase 1 runs the distinct runs the planned
    trials need, as ordinary trials in ``RESULTS/_prerequisites/``; phase 2 runs the planned trials, each
    assembled by its method from the phase-1 folders. Returns phase 2's results."""
    from bench.prerequisites import PREREQUISITES_DIR
    from bench.sweep.phases import run_points

    from ray.tune.schedulers import FIFOScheduler

    ctx["prerequisites"] = plan["runs"]
    ctx["prerequisites_dir"] = str(results / PREREQUISITES_DIR)
    runs, trials = run_points(plan), plan["trials"]
    print(f"bench sweep: {spec.name}: {len(runs)} runs needed first, then {len(trials)} trials "
          f"({', '.join(spec.methods)}) -> {results}", flush=True)
    budget = spec.time_budget_s
    # every run is needed whole by some trial: none is stopped early (FIFO), whatever the sweep's scheduler
    first = fit(spec.name + FIRST_PHASE_SUFFIX, len(runs), points=runs,
                scheduler=FIFOScheduler(), num_samples=1, time_budget_s=budget)
    failed = [r.config.get("prerequisite") for r in first if r.error]
    if failed:
        print(f"bench sweep: {spec.name}: {len(failed)} runs needed first failed ({', '.join(failed)}); "
              f"the trials that need them fail too", flush=True)
    if ctx["node_local"]:  # phase-2 trials on other nodes fetch the runs' folders from Tune's storage
        ctx["prerequisite_checkpoints"] = {r.config["prerequisite"]: r.checkpoint.path for r in first
                                           if r.checkpoint is not None}
    if budget is not None:
        budget = max(1.0, budget - (time.time() - t_start))
    return fit(spec.name, len(trials), points=trials, scheduler=_scheduler(spec),
               num_samples=1, time_budget_s=budget)


def _spec_record(spec, data_root: Path) -> dict:
    return {"name": spec.name, "file": str(spec.path), "methods": spec.methods, "dataset": spec.dataset,
            "backbone": spec.backbone, "fixed": spec.fixed, "per_method": spec.per_method,
            "space": {k: {d: a} for k, (d, a) in spec.space.items()}, "scheduler": spec.scheduler,
            "search": spec.search, "num_samples": spec.num_samples, "seeds": spec.seeds,
            "resources": {"cpus": spec.cpus, "gpus": spec.gpus, "workers": spec.workers},
            "data_root": str(data_root)}


if __name__ == "__main__":  # pragma: no cover
    from bench.cli import main

    sys.exit(main(["sweep", *sys.argv[1:]]))
