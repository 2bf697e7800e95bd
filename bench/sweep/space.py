"""The schema of ``tune_spaces/*.yaml`` and its validation, done before Ray starts.

A sweep file::

    name: smoke                        # default: the file's stem
    methods: [rft, ft]                 # or ``method: rft``
    dataset: digits
    backbone: cifar_resnet18_aa
    fixed: {epochs: 2, n_eval: 64}     # settings of every trial (checked against every method's Config)
    per_method: {amt: {pool_size: 2}}  # settings of one method's trials
    per_dataset:                       # settings of one data set's trials (the top-level or a swept dataset);
      cifar10: {input_resize: 224, rft: {weight_decay: 1.0e-5}}   # a method's name: that method's only
    space:                             # the search space; a key may be any config field of every method
      lr: {loguniform: [1.0e-3, 1.0e-1]}
      rank: {choice: [4, 8]}           # grid, choice (lists); uniform, loguniform, randint ([low, high])
    scheduler: asha                    # fifo | asha, or {type: asha, grace_period: 1, reduction_factor: 2}
    search: random                     # random | optuna
    num_samples: 1                     # samples of the space per (method, seed, grid point)
    metric: val_pgd_acc                # default: val_pgd_acc, val_fewshot_acc for episodic methods
    mode: max                          # max | min
    seeds: [0]
    resources: {cpus: 1, gpus: 0, workers: 1}   # per trial (per worker when workers > 1); gpus may be 0.5
    max_concurrent_trials: 2
    max_failures: 1                    # Tune retries a failed trial this often (from its last checkpoint)
    time_budget_s: 600                 # whole sweep; null: no limit

Every error is one line: ``FILE: KEY: what is wrong; valid: ...``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TOP_KEYS = ("name", "method", "methods", "dataset", "backbone", "fixed", "per_method", "per_dataset", "space",
            "scheduler",
            "search", "num_samples", "metric", "mode", "seeds", "resources", "max_concurrent_trials",
            "max_failures", "time_budget_s", "description", "merge_search")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("fifo", "asha")
SCHEDULER_KEYS = ("type", "grace_period", "reduction_factor", "max_t", "brackets")
SEARCHERS = ("random", "optuna")
MODES = ("max", "min")
RESOURCE_KEYS = ("cpus", "gpus", "workers")
# Keys the sweep sets itself; they may not appear in fixed/space.
RESERVED = ("method",)


class SweepError(ValueError):
    """A one-line, user-facing error in a sweep file."""


@dataclass
class SweepSpec:
    path: Path
    name: str
    methods: list[str]
    dataset: str
    backbone: str
    fixed: dict[str, Any] = field(default_factory=dict)
    per_method: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)
    space: dict[str, tuple[str, list]] = field(default_factory=dict)  # key -> (distribution, args)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"type": "fifo"})
    search: str = "random"
    num_samples: int = 1
    metric: str | None = None  # None: per method (val_pgd_acc / val_fewshot_acc)
    mode: str = "max"
    seeds: list[int] = field(default_factory=lambda: [0])
    cpus: float = 1.0
    gpus: float = 0.0
    workers: int = 1
    max_concurrent_trials: int | None = None
    max_failures: int = 1
    time_budget_s: float | None = None
    merge_search: bool = False  # amt trials are merge-only candidates; the best per target is tested (bench.sweep.merge_search)

    def metric_for(self, method: str) -> str:
        """The validation metric a trial of ``method`` reports as the sweep's objective."""
        if self.metric:
            return self.metric
        from methods import get_method

        return "val_fewshot_acc" if getattr(get_method(method), "episodic", False) else "val_pgd_acc"

    def overrides(self, method: str, seed: int, sampled: dict[str, Any], per_dataset: bool = True
                  ) -> dict[str, Any]:
        """The ``resolve_config`` overrides of one trial: fixed < per_method < per_dataset < sampled
        (``per_dataset=False``: without the data set's own settings, for a trial to add them itself)."""
        dataset = sampled.get("dataset", self.dataset)
        own = self.dataset_overrides(method, dataset) if per_dataset else {}
        return {"dataset": self.dataset, "backbone": self.backbone, **self.fixed,
                **self.per_method.get(method, {}), **own, **sampled, "seed": seed}

    def dataset_overrides(self, method: str, dataset: str) -> dict[str, Any]:
        """``per_dataset`` settings of ``method``'s trials on ``dataset``: the shared ones, then the method's."""
        block = self.per_dataset.get(str(dataset), {})
        shared = {k: v for k, v in block.items() if k not in self.methods}
        return {**shared, **block.get(method, {})}

    def with_absolute_paths(self, cwd: str | Path | None = None) -> "SweepSpec":
        """The relative local paths of every setting (backbone weights, shard folders, pool folders) made
        absolute against ``cwd`` (default: the current folder), in place: trials run in Tune's folders, so
        the driver resolves them once, as the user meant them. Returns ``self``."""
        from bench.config import PATH_FIELDS, absolute_path, absolute_paths

        def block(b: dict) -> dict:
            out = absolute_paths({k: v for k, v in b.items() if k not in self.methods}, cwd)
            out.update({m: absolute_paths(v, cwd) for m, v in b.items() if m in self.methods and isinstance(v, dict)})
            return out

        self.backbone = absolute_path("backbone", self.backbone, cwd)
        self.dataset = absolute_path("dataset", self.dataset, cwd)
        self.fixed = absolute_paths(self.fixed, cwd)
        self.per_method = {m: absolute_paths(b, cwd) for m, b in self.per_method.items()}
        self.per_dataset = {str(absolute_path("dataset", d, cwd)): block(b) for d, b in self.per_dataset.items()}
        self.space = {k: (dist, [absolute_path(k, v, cwd) for v in args] if k in PATH_FIELDS and dist in
                          ("grid", "choice") else args) for k, (dist, args) in self.space.items()}
        return self

    def backbones(self) -> list[str]:
        """The backbones the trials run: the swept grid/choice values, or the top-level one."""
        dist_args = self.space.get("backbone")
        return [str(b) for b in dist_args[1]] if dist_args else [self.backbone]

    def datasets(self) -> list[str]:
        """The data sets the trials run on: the swept grid/choice values, or the top-level one."""
        dist_args = self.space.get("dataset")
        return [str(d) for d in dist_args[1]] if dist_args else [self.dataset]

    def n_trials(self) -> int:
        grid = 1
        for dist, args in self.space.values():
            if dist == "grid":
                grid *= len(args)
        return len(self.methods) * len(self.seeds) * grid * self.num_samples


def _fail(path: Path, key: str, msg: str) -> SweepError:
    return SweepError(f"{path}: {key}: {msg}")


def _num(path, key, v, *, integer=False, positive=False, nonneg=False):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and integer:
        ok = float(v).is_integer()
    if not ok:
        raise _fail(path, key, f"{v!r} is not {'an integer' if integer else 'a number'}")
    if positive and v <= 0:
        raise _fail(path, key, f"{v!r} must be > 0")
    if nonneg and v < 0:
        raise _fail(path, key, f"{v!r} must be >= 0")
    return int(v) if integer else float(v)


def _parse_dist(path: Path, key: str, spec: Any) -> tuple[str, list]:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise _fail(path, where, f"expected one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, "
                                 f"got {spec!r}")
    (dist, args), = spec.items()
    if dist not in DISTRIBUTIONS:
        raise _fail(path, where, f"unknown distribution {dist!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise _fail(path, f"{where}.{dist}", f"expected a non-empty list, got {args!r}")
    if dist in ("grid", "choice"):
        return dist, list(args)
    if len(args) != 2:
        raise _fail(path, f"{where}.{dist}", f"expected [low, high], got {args!r}")
    from bench.config import parse_value

    lo, hi = (parse_value(a) for a in args)
    integer = dist == "randint"
    lo = _num(path, f"{where}.{dist}", lo, integer=integer)
    hi = _num(path, f"{where}.{dist}", hi, integer=integer)
    if not lo < hi:
        raise _fail(path, f"{where}.{dist}", f"low {lo:g} must be < high {hi:g}")
    if dist == "loguniform" and lo <= 0:
        raise _fail(path, f"{where}.{dist}", f"low {lo:g} must be > 0 for a log scale")
    return dist, [lo, hi]


def _probe_values(dist: str, args: list) -> list:
    """Values that must all resolve: every listed value, or both ends of a range."""
    if dist in ("grid", "choice"):
        return args
    if dist == "randint":  # Tune's randint excludes high
        return [args[0], args[1] - 1]
    return args


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; raises :class:`SweepError` (one line) on the first problem. Each step
    below checks one part of the file, in the order a reader meets them."""
    path = Path(path)
    raw = _read_sweep_file(path)
    methods = _parse_methods(path, raw)
    spec = _new_spec(path, raw, methods)
    space_raw = _parse_settings(path, raw, spec)
    for key, dspec in space_raw.items():  # the search space
        spec.space[str(key)] = _parse_dist(path, str(key), dspec)
    _parse_search(path, raw, spec)
    _parse_resources(path, raw, spec)
    _parse_merge_search(path, raw, spec)
    _check_configs(spec)
    return spec


def _read_sweep_file(path: Path) -> dict:
    """The file's top-level mapping, its keys known."""
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SweepError(f"{path}: not a text (UTF-8) sweep file (byte {e.start}); expected YAML") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise SweepError(f"{path}: not valid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping of settings at the top level")
    for key in raw:
        if key not in TOP_KEYS:
            raise _fail(path, str(key), f"unknown key; valid: {', '.join(TOP_KEYS)}")
    return raw


def _parse_methods(path: Path, raw: dict) -> list[str]:
    """``method:`` or ``methods:``: registered names, each once."""
    from methods import list_methods

    if "method" in raw and "methods" in raw:
        raise _fail(path, "method", "give either method or methods, not both")
    methods = raw.get("methods", raw.get("method"))
    if methods is None:
        raise _fail(path, "methods", f"missing; valid: {', '.join(list_methods())}")
    methods = [methods] if isinstance(methods, str) else methods
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise _fail(path, "methods", f"expected a method name or a list of them; valid: {', '.join(list_methods())}")
    for m in methods:
        if m not in list_methods():
            raise _fail(path, "methods", f"unknown method {m!r}; valid: {', '.join(list_methods())}")
    if len(set(methods)) != len(methods):
        raise _fail(path, "methods", "a method is listed twice")
    return methods


def _new_spec(path: Path, raw: dict, methods: list[str]) -> SweepSpec:
    """The spec with its name, methods, data set and backbone."""
    spec = SweepSpec(path=path, name=str(raw.get("name") or path.stem), methods=methods,
                     dataset=str(raw.get("dataset", "digits")), backbone=str(raw.get("backbone", "cifar_resnet18_aa")))
    if not spec.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise _fail(path, "name", f"{spec.name!r}: use letters, digits, '-', '_' and '.' only")
    return spec


def _parse_settings(path: Path, raw: dict, spec: SweepSpec) -> dict:
    """``fixed``, ``per_method`` and ``per_dataset`` into ``spec``, none of them setting what the sweep sets;
    returns the raw ``space`` mapping (checked for the same)."""
    methods = spec.methods
    for section in ("fixed", "per_method", "per_dataset", "space"):
        if raw.get(section) is not None and not isinstance(raw[section], dict):
            raise _fail(path, section, f"expected a mapping, got {raw[section]!r}")
    spec.fixed = dict(raw.get("fixed") or {})
    per_method = dict(raw.get("per_method") or {})
    for m, block in per_method.items():
        if m not in methods:
            raise _fail(path, f"per_method.{m}", f"not a method of this sweep; valid: {', '.join(methods)}")
        if not isinstance(block, dict):
            raise _fail(path, f"per_method.{m}", f"expected a mapping, got {block!r}")
    spec.per_method = {m: dict(b) for m, b in per_method.items()}
    per_dataset = dict(raw.get("per_dataset") or {})
    for d, block in per_dataset.items():
        if not isinstance(block, dict):
            raise _fail(path, f"per_dataset.{d}", f"expected a mapping, got {block!r}")
        for m in methods:
            if m in block and not isinstance(block[m], dict):
                raise _fail(path, f"per_dataset.{d}.{m}", f"expected a mapping of {m}'s settings, got {block[m]!r}")
    spec.per_dataset = {str(d): dict(b) for d, b in per_dataset.items()}
    per_dataset_keys = [k for b in spec.per_dataset.values() for k, v in b.items() if k not in methods] + \
        [k for b in spec.per_dataset.values() for m in methods for k in b.get(m, {})]
    space_raw = dict(raw.get("space") or {})
    for key in list(spec.fixed) + [k for b in spec.per_method.values() for k in b] + per_dataset_keys + \
            list(space_raw):
        if key in RESERVED:
            raise _fail(path, str(key), "set by the sweep (use methods:)")
    for key in ("dataset", "backbone", "seed"):  # top-level keys; dataset and backbone may also be swept
        if key in per_dataset_keys:
            raise _fail(path, f"per_dataset: {key}", "not settable per data set")
        if key in spec.fixed or (key == "seed" and key in space_raw):
            raise _fail(path, f"fixed.{key}" if key in spec.fixed else f"space.{key}",
                        f"use the top-level key {key + 's' if key == 'seed' else key}:")
    return space_raw


def _parse_search(path: Path, raw: dict, spec: SweepSpec) -> None:
    """Scheduler, searcher, samples, metric, mode and seeds."""
    methods = spec.methods
    sched = raw.get("scheduler", "fifo")
    if isinstance(sched, str):
        sched = {"type": sched}
    if not isinstance(sched, dict):
        raise _fail(path, "scheduler", f"expected a name or a mapping; valid: {', '.join(SCHEDULERS)}")
    for k in sched:
        if k not in SCHEDULER_KEYS:
            raise _fail(path, f"scheduler.{k}", f"unknown key; valid: {', '.join(SCHEDULER_KEYS)}")
    if sched.get("type", "fifo") not in SCHEDULERS:
        raise _fail(path, "scheduler.type", f"{sched.get('type')!r}; valid: {', '.join(SCHEDULERS)}")
    sched.setdefault("type", "fifo")
    for k in ("grace_period", "max_t", "brackets"):
        if k in sched:
            sched[k] = _num(path, f"scheduler.{k}", sched[k], integer=True, positive=True)
    if "reduction_factor" in sched:
        sched["reduction_factor"] = _num(path, "scheduler.reduction_factor", sched["reduction_factor"])
        if sched["reduction_factor"] <= 1:
            raise _fail(path, "scheduler.reduction_factor", f"{sched['reduction_factor']:g} must be > 1")
    spec.scheduler = sched
    spec.search = raw.get("search", "random")
    if spec.search not in SEARCHERS:
        raise _fail(path, "search", f"{spec.search!r}; valid: {', '.join(SEARCHERS)}")
    spec.num_samples = _num(path, "num_samples", raw.get("num_samples", 1), integer=True, positive=True)
    spec.metric = raw.get("metric")
    if spec.metric is not None and not isinstance(spec.metric, str):
        raise _fail(path, "metric", f"expected a metric name, e.g. val_pgd_acc, got {spec.metric!r}")
    spec.mode = raw.get("mode", "max")
    if spec.mode not in MODES:
        raise _fail(path, "mode", f"{spec.mode!r}; valid: {', '.join(MODES)}")
    seeds = raw.get("seeds", [0])
    seeds = [seeds] if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds:
        raise _fail(path, "seeds", f"expected a list of integers, got {seeds!r}")
    spec.seeds = [_num(path, "seeds", s, integer=True, nonneg=True) for s in seeds]
    if len(set(spec.seeds)) != len(spec.seeds):
        raise _fail(path, "seeds", "a seed is listed twice")
    if spec.search == "optuna":
        if len(methods) > 1 or len(spec.seeds) > 1:
            raise _fail(path, "search", "optuna searches one method with one seed; split the file or use random")
        grids = [k for k, (d, _) in spec.space.items() if d == "grid"]
        if grids:
            raise _fail(path, f"space.{grids[0]}", "grid is not supported with search: optuna; use choice")
        if not spec.space:
            raise _fail(path, "space", "search: optuna needs a search space")


def _parse_resources(path: Path, raw: dict, spec: SweepSpec) -> None:
    """Per-trial CPUs, GPUs and workers, concurrency, retries and the time budget."""
    res = raw.get("resources") or {}
    if not isinstance(res, dict):
        raise _fail(path, "resources", f"expected a mapping with keys {', '.join(RESOURCE_KEYS)}")
    for k in res:
        if k not in RESOURCE_KEYS:
            raise _fail(path, f"resources.{k}", f"unknown key; valid: {', '.join(RESOURCE_KEYS)}")
    spec.cpus = _num(path, "resources.cpus", res.get("cpus", 1), positive=True)
    spec.gpus = _num(path, "resources.gpus", res.get("gpus", 0), nonneg=True)
    if spec.gpus > 1 and not float(spec.gpus).is_integer():
        raise _fail(path, "resources.gpus", f"{spec.gpus:g}: fractions are allowed below 1 only")
    spec.workers = _num(path, "resources.workers", res.get("workers", 1), integer=True, positive=True)
    mct = raw.get("max_concurrent_trials")
    spec.max_concurrent_trials = None if mct is None else _num(path, "max_concurrent_trials", mct, integer=True,
                                                              positive=True)
    spec.max_failures = _num(path, "max_failures", raw.get("max_failures", 1), integer=True, nonneg=True)
    tb = raw.get("time_budget_s")
    spec.time_budget_s = None if tb is None else _num(path, "time_budget_s", tb, positive=True)


def _parse_merge_search(path: Path, raw: dict, spec: SweepSpec) -> None:
    """``merge_search: true``: a merge-only space over methods that merge, on one worker."""
    methods = spec.methods
    merge_search = raw.get("merge_search", False)
    if not isinstance(merge_search, bool):
        raise _fail(path, "merge_search", f"expected true or false, got {merge_search!r}")
    if merge_search:
        from bench.sweep.merge_search import check_space

        reason = check_space(list(spec.space), methods)
        if reason:
            raise _fail(path, "merge_search", reason)
        if spec.workers > 1:
            raise _fail(path, "merge_search", "merge-only trials run on one worker; set resources.workers: 1")
    spec.merge_search = merge_search


def _check_configs(spec: SweepSpec) -> None:
    """Every trial's config must resolve: unknown fields and bad values are caught here, per method."""
    from bench.config import ConfigError, config_fields, resolve_config
    from methods import get_method

    for m in spec.methods:
        fields = config_fields(get_method(m).Config)
        sections = [("fixed", spec.fixed), (f"per_method.{m}", spec.per_method.get(m, {})),
                    ("space", {k: None for k in spec.space})]
        for d, block in spec.per_dataset.items():
            sections += [(f"per_dataset.{d}", {k: v for k, v in block.items() if k not in spec.methods}),
                         (f"per_dataset.{d}.{m}", block.get(m, {}))]
        for section, block in sections:
            for key in block:
                if key not in fields:
                    raise _fail(spec.path, f"{section}.{key}",
                                f"unknown config field for method {m}; valid: {', '.join(sorted(fields))}")
        base = {k: _first(d, a) for k, (d, a) in spec.space.items()}
        try:
            resolve_config(m, spec.overrides(m, spec.seeds[0], base))
            for dataset in spec.datasets():  # every data set's own settings resolve too
                resolve_config(m, spec.overrides(m, spec.seeds[0], {**base, "dataset": dataset}))
        except ConfigError as e:
            raise _fail(spec.path, f"method {m}", str(e)) from None
        for key, (dist, args) in spec.space.items():
            for value in _probe_values(dist, args):
                try:
                    resolve_config(m, spec.overrides(m, spec.seeds[0], {**base, key: value}))
                except ConfigError as e:
                    raise _fail(spec.path, f"space.{key}", f"value {value!r} for method {m}: {e}") from None


def check_trial_inputs(spec: SweepSpec, data_root: str | Path | None) -> int:
    """What the start of each trial checks (bench.trial.check_inputs: shards and their splits, target data
    sets, backbone and its weights), for every method, data set and backbone of the sweep, before Ray
    starts. Raises :class:`SweepError` (one line) on the first problem; returns the number of configs checked."""
    from bench.config import resolve_config
    from bench.trial import check_inputs

    base = {k: _first(d, a) for k, (d, a) in spec.space.items()}
    n = 0
    for m in spec.methods:
        for dataset in spec.datasets():
            for backbone in spec.backbones():
                cfg = resolve_config(m, spec.overrides(m, spec.seeds[0], {**base, "dataset": dataset,
                                                                          "backbone": backbone}))
                try:
                    check_inputs(cfg, data_root)
                except (ValueError, FileNotFoundError, KeyError) as e:
                    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
                    raise _fail(spec.path, f"method {m}, dataset {dataset}, backbone {backbone}", msg) from None
                n += 1
    return n


def _first(dist: str, args: list) -> Any:
    if dist in ("grid", "choice"):
        return args[0]
    if dist == "randint":
        return args[0]
    if dist == "loguniform":
        return math.sqrt(args[0] * args[1])
    return (args[0] + args[1]) / 2


def tune_param_space(spec) -> dict[str, Any]:
    """The sweep's search space as Ray Tune's ``param_space``: methods and seeds on a grid, each ``space``
    entry as its Tune distribution."""
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
