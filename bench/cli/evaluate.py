"""``bench evaluate``: robust evaluation of a finished trial's weights or of any backbone, sharded by samples or
by episodes.

``bench evaluate RUN_DIR`` re-evaluates the weights the trial selected and updates RUN_DIR/result.json: a
supervised trial on its test samples (``metrics``), a few-shot (episodic) trial on its test episodes
(``fewshot``, for AMT the pool and merge the trial used); ``bench evaluate --backbone NAME --dataset D``
evaluates a backbone with its own classifier and writes a result.json of method "backbone" that ranks in the
same leaderboard. ``--shards K`` runs the evaluation as K Ray tasks, by samples (bench/sharded_eval.py) or by
episodes (bench/sharded_fewshot.py), whose flags equal one process's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

BACKBONE_METHOD = "backbone"  # the method name of a backbone's result.json (no training)


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="robust evaluation of a trial's weights or of a backbone, sharded as Ray tasks",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="bench evaluate RUN_DIR | --backbone NAME[@weights] --dataset D [--shards K]")
    p.add_argument("run_dir", nargs="?", type=Path, help="a finished trial's folder (its result.json is updated)")
    p.add_argument("--backbone", help="evaluate this backbone with its own head instead: a registered backbone, "
                                      "a timm name, or NAME@/path/to/weights")
    p.add_argument("--dataset", help="data set (with --backbone; a trial evaluates on its own)")
    p.add_argument("--out", type=Path, help="with --backbone: the folder of its result.json "
                                            "(default runs/backbone-NAME-DATASET-HASH-sSEED)")
    p.add_argument("--autoattack", choices=("standard", "plus", "rand", "apgd-ce", "off"),
                   help="AutoAttack version (default: the trial's autoattack_version, for a few-shot trial its "
                        "fewshot_autoattack, on each episode's queries; with --backbone standard)")
    p.add_argument("--n-eval", type=int, help="first N test samples (default: the trial's n_eval; all); "
                                              "supervised trials and backbones")
    p.add_argument("--episodes", type=int, help="a few-shot trial's test episodes 0..N-1 (default: the trial's)")
    p.add_argument("--eps", help="L-inf radius, e.g. 8/255 (default: the trial's)")
    p.add_argument("--pgd-steps", type=int, help="PGD steps of the PGD pass, 0: none (default: the trial's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other evaluation field (eval_batch_size, eval_pgd_restarts, seed, ...)")
    p.add_argument("--shards", type=int, default=1, help="Ray tasks, each a slice of whole evaluation batches, "
                                                         "or of a few-shot trial's episodes (1 without --address: "
                                                         "in this process)")
    p.add_argument("--address", help="Ray cluster address (e.g. auto); default: a local Ray")
    p.add_argument("--gpus-per-shard", type=float, default=0.0, help="GPUs per shard, fractions allowed")
    p.add_argument("--cpus-per-shard", type=float, default=1.0)
    p.add_argument("--max-retries", type=int, default=3, help="retries of a shard whose worker died")
    p.add_argument("--data-root", type=Path, default=None, help="shards root (default: $BENCH_SHARDS or ./shards)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, on_interrupt=_interrupted)


# where an evaluation keeps what it finished, per shard: AutoAttack batches (by samples) or episodes
STATE_DIRS = {"eval_shards": "finished batches", "eval_episodes": "finished episodes"}


def _interrupted(args, argv: list[str]) -> str:
    """What Ctrl-C left: the finished batches or episodes (kept in the state folder, reused when the same
    settings run again) and the command that resumes."""
    import shlex

    folder = args.run_dir or getattr(args, "resolved_out", None)
    kept = [f"{what} are kept in {Path(folder) / name}" for name, what in STATE_DIRS.items()
            if folder is not None and (Path(folder) / name).is_dir()]
    where = "; ".join(kept) or "nothing finished yet"
    return f"interrupted; {where}; resume with: bench {shlex.join(argv)}"


def _check_args(args) -> None:
    if (args.run_dir is None) == (args.backbone is None):
        raise ValueError("give a trial folder (RUN_DIR) or --backbone NAME --dataset D, not both or neither")
    if args.backbone is not None and not args.dataset:
        raise ValueError("--backbone needs --dataset")
    if args.run_dir is not None and (args.dataset or args.out):
        raise ValueError("--dataset and --out go with --backbone; a trial is evaluated on its data set, in its folder")
    if args.backbone is not None and args.episodes is not None:
        raise ValueError("--episodes goes with a few-shot trial's RUN_DIR; a backbone is evaluated on test samples "
                         "(--n-eval)")
    if args.episodes is not None and args.episodes < 1:
        raise ValueError(f"--episodes {args.episodes} must be >= 1")
    if args.shards < 1:
        raise ValueError(f"--shards {args.shards} must be >= 1")
    if args.gpus_per_shard < 0 or args.cpus_per_shard <= 0 or args.max_retries < 0:
        raise ValueError("--gpus-per-shard, --max-retries must be >= 0 and --cpus-per-shard > 0")


def _overrides(args, default_autoattack: str | None) -> dict:
    from bench.config import parse_set_args

    out = parse_set_args(args.overrides)
    for key, value in (("autoattack_version", args.autoattack or default_autoattack), ("n_eval", args.n_eval),
                       ("eps", args.eps), ("eval_pgd_steps", args.pgd_steps)):
        if value is not None:
            out[key] = value
    return out


def _base_config(values: dict):
    """A BaseConfig (the fields every method understands) from strings, as ``resolve_config`` coerces them."""
    from bench.config import ConfigError, _coerce, config_fields, parse_value
    from methods.base import BaseConfig

    fields = config_fields(BaseConfig)
    kept = {}
    for key, raw in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config field {key!r}; valid: {', '.join(sorted(fields))}")
        value = raw if fields[key] is str and isinstance(raw, str) else parse_value(raw)
        kept[key] = _coerce(key, value, fields[key])
    cfg = BaseConfig(**{**kept, "method": BACKBONE_METHOD})
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def run(args) -> int:
    _check_args(args)
    if args.run_dir is not None:
        return _evaluate_trial(args)
    return _evaluate_backbone(args)


# ------------------------------------------------------------------------------------------------- a trial
def _evaluate_trial(args) -> int:
    from bench.config import resolve_config, with_overrides
    from bench.eval_target import ModelRecipe, trial_weights
    from bench.files import atomic_write_json
    from bench.tasks import SupervisedTask, task_for
    from data_shards.manifest import read_manifest
    from data_shards.paths import dataset_dir
    from data_shards.transforms import output_size
    from methods import get_method

    run_dir = args.run_dir
    result_path = run_dir / "result.json"
    if not result_path.exists():
        raise FileNotFoundError(f"{run_dir}: no result.json (not a finished trial folder)")
    result = json.loads(result_path.read_text())
    if result.get("status") != "ok" or result.get("stage") == "validation":
        raise ValueError(f"{run_dir}: not a finished, evaluated trial (status {result.get('status')!r}"
                         f"{', validation-only candidate' if result.get('stage') else ''})")
    trained = resolve_config(result["method"], {k: v for k, v in result["config"].items() if k != "method"})
    if task_for(get_method(trained.method)) is not SupervisedTask:
        return _evaluate_fewshot_trial(args, result, trained)
    if args.episodes is not None:
        raise ValueError(f"{run_dir}: --episodes counts few-shot test episodes; {trained.method} is a supervised "
                         f"trial (its test samples: --n-eval)")
    cfg = with_overrides(trained, _overrides(args, None))
    ds_dir = dataset_dir(cfg.dataset, args.data_root)
    manifest = read_manifest(ds_dir)
    state, method_state, source = trial_weights(run_dir)
    recipe = ModelRecipe(kind="method", backbone=trained.backbone, num_classes=manifest["num_classes"],
                         image_size=output_size(trained.transform, manifest, trained.image_size)[0],
                         config=trained.to_dict(), method_state=method_state)
    recipe.build_with(state)  # weights that do not fit the rebuilt network: an error before any work
    print(f"evaluating {source}")
    metrics, cost, reliability = _evaluate(args, recipe, state, ds_dir, cfg, run_dir / "eval_shards")
    metrics["evaluated_by"]["weights"] = source
    previous = result.get("metrics") or {}
    result["metrics"] = {**previous, **metrics}  # what was not recomputed stays
    if previous:
        result.setdefault("metrics_history", []).append(previous)
    result.setdefault("cost", {})["evaluate"] = cost
    if reliability is not None:  # the indicators of the metrics just written (the old ones went with them)
        result["reliability"] = reliability
    atomic_write_json(result_path, result)
    _show(result, result_path)
    return 0


def _evaluate_fewshot_trial(args, result: dict, trained) -> int:
    """A finished episodic trial (amt, pmf): its selected weights (an AMT merging trial: its pool, merged per
    episode as the trial did) on its test episodes, every test domain; updates ``fewshot`` (and
    ``fewshot_targets``) of its result.json."""
    from dataclasses import replace

    import torch

    from bench.config import with_overrides
    from bench.eval_target import ModelRecipe, trial_weights
    from bench.fewshot import fewshot_block
    from bench.files import atomic_write_json
    from bench.prerequisites import in_run_dir
    from bench.sharded_fewshot import build_method, sharded_fewshot
    from data_shards.manifest import read_manifest
    from data_shards.paths import dataset_dir
    from data_shards.transforms import output_size

    run_dir = args.run_dir
    if args.n_eval is not None:
        raise ValueError(f"{run_dir}: --n-eval counts test samples; {trained.method} is a few-shot trial, "
                         f"evaluated on test episodes (--episodes N)")
    overrides = _overrides(args, None)
    if "autoattack_version" in overrides:  # on the episodes' queries: the few-shot field
        overrides["fewshot_autoattack"] = overrides.pop("autoattack_version")
    if args.episodes is not None:
        overrides["episodes"] = args.episodes
    cfg = in_run_dir(with_overrides(trained, overrides), run_dir)  # {run_dir} in pool_dir: this folder
    ds_dir = dataset_dir(cfg.dataset, args.data_root)
    manifest = read_manifest(ds_dir)
    recipe = ModelRecipe(kind="method", backbone=cfg.backbone, num_classes=cfg.ways,
                         image_size=output_size(cfg.transform, manifest, cfg.image_size)[0], config=cfg.to_dict())
    try:
        state, method_state, source = trial_weights(run_dir)
        recipe = replace(recipe, method_state=method_state)
    except FileNotFoundError:
        state = None  # a merging trial trains nothing and keeps no checkpoint: its weights are its pool's
    method = build_method(recipe, state, trained.seed, device=torch.device("cpu"))
    if state is None:
        if method.needs_training:
            raise FileNotFoundError(f"{run_dir}: no checkpoints/best.pt (nor a last-epoch checkpoint) to evaluate")
        members = getattr(method, "members", [])
        source = f"the pool of {Path(cfg.pool_dir).resolve()} ({len(members)} members), merged per episode"
    del method  # built here to fail before any work on weights or a pool that do not fit
    print(f"evaluating {source} on {cfg.episodes} test episodes")
    flags, shapes, report = sharded_fewshot(recipe, state, cfg, init_seed=trained.seed, shards=args.shards,
                                            work_dir=run_dir / "eval_episodes", data_root=args.data_root,
                                            address=args.address, cpus_per_shard=args.cpus_per_shard,
                                            gpus_per_shard=args.gpus_per_shard, max_retries=args.max_retries,
                                            progress=not args.no_progress)
    blocks = {}
    for name, episodes in flags.items():
        block = fewshot_block(episodes, cfg, ways=shapes[name]["ways"], shots=shapes[name]["shots"],
                              autoattack=cfg.fewshot_autoattack)
        block["evaluated_by"] = {
            "command": "bench evaluate", "options": _options(args), "shards": report["shards"],
            "address": args.address, "metrics": sorted(block), "episodes": cfg.episodes,
            "queries_per_episode": len(episodes[0]["clean"]), "sampler_seed": shapes[name]["sampler_seed"],
            "eps": cfg.eps, "eval_pgd_steps": cfg.eval_pgd_steps, "fewshot_autoattack": cfg.fewshot_autoattack,
            "seed": cfg.seed, "weights": source, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        blocks[name] = block
    primary = next(iter(blocks))
    previous = result.get("fewshot") or {}
    result["fewshot"] = {**previous, **blocks[primary]}  # what was not recomputed stays
    if previous:
        result.setdefault("fewshot_history", []).append(previous)
    if cfg.target_datasets:
        targets = result.get("fewshot_targets") or {}
        result["fewshot_targets"] = {**targets, **{n: {**targets.get(n, {}), **b} for n, b in blocks.items()}}
    result.setdefault("cost", {})["evaluate"] = report
    atomic_write_json(run_dir / "result.json", result)
    _show(result, run_dir / "result.json", block="fewshot")
    return 0


# ---------------------------------------------------------------------------------------------- a backbone
def _evaluate_backbone(args) -> int:
    import torch

    from bench.config import config_hash
    from bench.eval_target import ModelRecipe
    from bench.files import atomic_write_json
    from bench.trial import versions
    from data_shards.manifest import read_manifest
    from data_shards.paths import dataset_dir
    from data_shards.transforms import output_size

    cfg = _base_config({**_overrides(args, "standard"), "dataset": args.dataset, "backbone": args.backbone})
    ds_dir = dataset_dir(cfg.dataset, args.data_root)
    manifest = read_manifest(ds_dir)
    if "test" not in manifest["splits"]:
        raise ValueError(f"data set {cfg.dataset!r} ({ds_dir}) has no test split")
    recipe = ModelRecipe(kind="backbone", backbone=cfg.backbone,
                         image_size=output_size(cfg.transform, manifest, cfg.image_size)[0],
                         input_resize=cfg.input_resize)
    torch.manual_seed(cfg.seed)  # a backbone without weights (tiny_cnn) is the seed's random network
    model = recipe.build()
    classes = model.head.out_features
    if classes != manifest["num_classes"]:
        raise ValueError(f"backbone {cfg.backbone!r} has a {classes}-class head and {cfg.dataset!r} "
                         f"{manifest['num_classes']} classes: its own head cannot be scored on these labels")
    print(f"note: {cfg.backbone}'s own {classes}-class head is scored against {cfg.dataset}'s labels "
          f"(its class i counts as label i)")
    out = args.out or Path("runs") / f"{BACKBONE_METHOD}-{cfg.backbone.split('@')[0]}-{cfg.dataset}-" \
                                     f"{config_hash(cfg)}-s{cfg.seed}"
    args.resolved_out = Path(out)  # for the Ctrl-C line
    t0 = time.time()
    metrics, cost, reliability = _evaluate(args, recipe, model.state_dict(), ds_dir, cfg, Path(out) / "eval_shards")
    metrics["evaluated_by"]["head"] = f"the backbone's own classifier ({classes} classes)"
    result = {"id": f"{BACKBONE_METHOD}-{cfg.backbone}-{cfg.dataset}-{config_hash(cfg)}-s{cfg.seed}",
              "method": BACKBONE_METHOD, "dataset": cfg.dataset, "backbone": cfg.backbone, "seed": cfg.seed,
              "config": cfg.to_dict(), "config_hash": config_hash(cfg), "metrics": metrics,
              "cost": {"wall_s": time.time() - t0, "train_s": 0.0, "eval_s": cost["wall_s"],
                       "device": cost["per_shard"][0]["device"], "evaluate": cost},
              "versions": versions(), "status": "ok"}
    if reliability is not None:
        result["reliability"] = reliability
    result_path = Path(out) / "result.json"
    atomic_write_json(result_path, result)
    _show(result, result_path)
    return 0


# ------------------------------------------------------------------------------------------------- shared
def _evaluate(args, recipe, state, ds_dir: Path, cfg, work_dir: Path) -> tuple[dict, dict, dict | None]:
    """The metrics block (with ``evaluated_by``), the evaluation's cost, sharded as asked, and the row's
    reliability block (None when ``reliability`` is off): the shards' merged inputs, indicators computed here."""
    import torch

    from bench.evaluate import metrics_from_flags
    from bench.reliability import row_reliability
    from bench.sharded_eval import evaluate_sharded
    from data_shards.manifest import read_manifest
    from data_shards.reader import load_split

    x, y = load_split(ds_dir, "test", max_samples=cfg.n_eval, image_size=cfg.image_size, transform=cfg.transform)
    details = {} if cfg.reliability != "off" else None
    flags, report = evaluate_sharded(recipe, state, x, y, cfg, shards=args.shards, work_dir=work_dir,
                                     address=args.address, cpus_per_shard=args.cpus_per_shard,
                                     gpus_per_shard=args.gpus_per_shard, max_retries=args.max_retries,
                                     progress=not args.no_progress, details=details)
    reliability = None
    if details is not None:
        device = torch.device("cuda" if args.gpus_per_shard > 0 and torch.cuda.is_available() else "cpu")
        reliability = row_reliability(recipe.build_with(state).to(device), x, y, flags, details, cfg,
                                      n_classes=read_manifest(ds_dir)["num_classes"],
                                      eval_forwards=report["eval_forwards"], device=device)
    metrics = metrics_from_flags(flags, cfg)
    metrics["evaluated_by"] = {
        "command": "bench evaluate", "options": _options(args), "shards": report["shards"], "address": args.address,
        "metrics": sorted(k for k in metrics if k != "evaluated_by"), "n_eval": len(x), "eps": cfg.eps,
        "autoattack_version": cfg.autoattack_version, "eval_pgd_steps": cfg.eval_pgd_steps,
        "eval_batch_size": cfg.eval_batch_size, "seed": cfg.seed, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                         time.gmtime())}
    return metrics, report, reliability


def _options(args) -> dict:
    """The command's options as given (``sys.argv`` is another program's when ``bench.cli.main`` is called)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("func", "command")}


def _show(result: dict, path: Path, block: str = "metrics") -> None:
    shown = {k: v for k, v in result[block].items() if k != "evaluated_by"}
    print(json.dumps(shown, indent=2))
    print(f"wrote {path}")
