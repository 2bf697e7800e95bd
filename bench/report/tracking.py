"""Weights & Biases tracking for one trial, with a local copy that never loses a metric.

Offline by default: a run goes online only when the user configured W&B (``WANDB_API_KEY`` set or
``WANDB_MODE=online``). If ``wandb.init`` times out or fails (no network, bad key, service down) the run
falls back to offline mode; if that fails too, tracking continues with the local file only. Every dict
passed to :meth:`TrackedRun.log` and the final summary are appended to ``out_dir/metrics.jsonl`` before W&B
sees them, so the trial's numbers survive whatever happens to W&B. Nothing in this module raises into the
trial.

Environment:
- ``BENCH_WANDB_INIT_TIMEOUT``: seconds ``wandb.init`` may take online (default 20) before falling back.
- ``BENCH_WANDB=off``: do not use W&B at all (local metrics.jsonl only).
- ``WANDB_PROJECT``: project name (default ``robust-lora-bench``).
"""
from __future__ import annotations

import json
import math
import os
import shlex
import time
import warnings
from pathlib import Path
from typing import Any

DEFAULT_PROJECT = "robust-lora-bench"
DEFAULT_INIT_TIMEOUT = 20.0
METRICS_FILE = "metrics.jsonl"


def _project() -> str:
    return os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def wandb_configured() -> bool:
    """True when the user asked for online W&B: an API key is set or WANDB_MODE=online."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        return False
    return bool(os.environ.get("WANDB_API_KEY")) or mode == "online"


def wanted_mode() -> str:
    """The W&B mode to try first: "online" when configured, "disabled" when BENCH_WANDB=off, else "offline"."""
    if os.environ.get("BENCH_WANDB", "").strip().lower() in ("off", "0", "false", "no", "disabled"):
        return "disabled"
    if os.environ.get("WANDB_MODE", "").strip().lower() == "disabled":
        return "disabled"
    return "online" if wandb_configured() else "offline"


def init_timeout() -> float:
    try:
        return float(os.environ.get("BENCH_WANDB_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT))
    except ValueError:
        return DEFAULT_INIT_TIMEOUT


def _jsonable(value: Any) -> Any:
    """Plain-JSON version of a value (numbers, strings, lists, dicts); tensors/numpy become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _jsonable(item())
        except Exception:
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return _jsonable(tolist())
        except Exception:
            pass
    return str(value)


def _flat_numbers(d: dict, prefix: str = "") -> dict:
    """Nested dict -> flat {"a/b": value} of W&B-friendly scalars/strings (for summaries)."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_numbers(v, key + "/"))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = v
        else:
            out[key] = _jsonable(v)
    return out


def history_key(key: str) -> str:
    """A per-epoch metric's W&B name, namespaced as W&B users expect: ``val_pgd_acc`` -> ``val/pgd_acc``,
    ``train_loss`` -> ``train/loss``, anything else a training step logs (lr, λ...) -> ``train/lr``;
    ``epoch`` (the step metric) and already-namespaced keys stay."""
    if key == "epoch" or "/" in key:
        return key
    for prefix in ("val", "train", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1:]}"
    return f"train/{key}"


# result.json's blocks in a run summary: the test metrics under test/ (few-shot ones as test/fewshot_*)
SUMMARY_PREFIX = {"metrics": "test/", "fewshot": "test/fewshot_", "cost": "cost/"}


def summary_key(key: str) -> str:
    """The W&B summary name of a trial's final figure: ``metrics/clean_acc`` -> ``test/clean_acc``,
    ``fewshot/adv_acc`` -> ``test/fewshot_adv_acc``, ``cost/wall_s`` stays."""
    block, sep, name = key.partition("/")
    if sep and block in SUMMARY_PREFIX:
        return SUMMARY_PREFIX[block] + name.replace("/", "_")
    return key


def summary_items(summary: dict | None) -> dict:
    """Flat W&B summary of a trial's final metrics (result.json's blocks, nested or already flat
    ``"metrics/clean_acc"``), named by :func:`summary_key`: ``test/clean_acc``, ``test/pgd_acc``,
    ``test/fewshot_adv_acc``, ``cost/wall_s``. The W&B report built by ``bench leaderboard --wandb-report``
    relies on these names."""
    return {summary_key(k): v for k, v in _flat_numbers(_jsonable(dict(summary or {}))).items()}


def reliability_summary(block: dict | None) -> dict:
    """A row's reliability indicators (result.json's ``reliability``) as flat W&B summary keys:
    ``reliability/verdict`` ("ok" or "suspect"), ``reliability/suspect`` (0/1, to filter and plot),
    ``reliability/fired`` (the indicators that fired, comma-separated), and per indicator its value
    (``reliability/<name>``; a check's yes/no as 0/1) and ``reliability/<name>/fired`` (0/1)."""
    if not isinstance(block, dict) or "verdict" not in block:
        return {}
    out: dict = {"reliability/verdict": block["verdict"], "reliability/suspect": int(block["verdict"] == "suspect"),
                 "reliability/fired": ",".join(block.get("fired") or []), "reliability/mode": block.get("mode")}
    for name, ind in (block.get("indicators") or {}).items():
        value = ind.get("value")
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            out[f"reliability/{name}"] = value
        out[f"reliability/{name}/fired"] = int(ind.get("verdict") == "fired")
    return out


def wait_flushed(run_dir: Path | None, timeout: float | None = None) -> bool:
    """Wait (bounded) until an offline run's ``run-*.wandb`` log ends with its exit record.

    ``run.finish()`` can return before the wandb service has written the log out; a worker process killed
    right after a trial would then leave a truncated run. ``BENCH_WANDB_FLUSH_TIMEOUT`` (default 15 s).
    """
    if run_dir is None:
        return False
    if timeout is None:
        try:
            timeout = float(os.environ.get("BENCH_WANDB_FLUSH_TIMEOUT", 15))
        except ValueError:
            timeout = 15.0
    deadline = time.time() + timeout
    while True:
        try:
            for f in Path(run_dir).glob("run-*.wandb"):
                recs = read_wandb_file(f)
                if recs and recs[-1].WhichOneof("record_type") == "exit":
                    return True
        except Exception:
            pass
        if time.time() >= deadline:
            return False
        time.sleep(0.1)


def read_metrics(out_dir: Path) -> list[dict]:
    """The records of ``out_dir/metrics.jsonl`` (``{"kind": "history"|"summary", ...}``), malformed lines skipped."""
    path = Path(out_dir) / METRICS_FILE
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class TrackedRun:
    """One trial's tracking: a W&B run (online, offline or none) plus ``metrics.jsonl``."""

    def __init__(self, out_dir: Path, run: Any, mode: str, notes: list[str], run_id: str):
        self.out_dir = Path(out_dir)
        self.run = run
        self.mode = mode  # "online" | "offline" | "none"
        self.run_id = run_id
        self.notes = list(notes)
        self.failed_logs = 0
        self.n_logged = 0
        self._finished = False
        self.sync_hint: str | None = None  # the command that uploads this trial's offline run(s), once finished
        self.metrics_path = self.out_dir / METRICS_FILE
        self._run_dir: Path | None = None
        try:
            if run is not None and getattr(run, "dir", None):
                self._run_dir = Path(run.dir).parent
        except Exception:
            pass

    # -- local copy -------------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as fh:
                fh.write(json.dumps(_jsonable(record)) + "\n")
        except Exception as exc:  # never raise into the trial
            self.notes.append(f"could not write {self.metrics_path}: {exc!r}")

    @property
    def run_dir(self) -> Path | None:
        """The W&B run folder (``.../wandb/offline-run-...`` or ``run-...``), if any."""
        return self._run_dir

    # -- API ----------------------------------------------------------------------------------------------
    def log(self, metrics: dict, step: int) -> None:
        """Log one per-epoch record (``step`` is the epoch). Always kept in metrics.jsonl."""
        try:
            record = dict(metrics)
            record.setdefault("epoch", step)
            self._append({"kind": "history", "step": int(step), "time": time.time(), **record})
            self.n_logged += 1
            if self.run is None or self._finished:
                return
            try:
                # step=epoch: the segments of a resumed run (one offline folder per start) line up when synced
                self.run.log({history_key(k): v for k, v in _flat_numbers(_jsonable(record)).items()},
                             step=int(step))
            except Exception as exc:
                self.failed_logs += 1
                if self.failed_logs == 1:
                    self.notes.append(f"W&B log failed at step {step}: {exc!r}; continuing with metrics.jsonl")
        except Exception as exc:
            try:
                self.notes.append(f"tracking log error: {exc!r}")
            except Exception:
                pass

    def finish(self, summary: dict) -> list[str]:
        """Write final metrics into the run summary and close it. Returns human-readable notes."""
        notes = self.notes
        try:
            if self._finished:
                return list(notes)
            self._finished = True
            self._append({"kind": "summary", "time": time.time(), **dict(summary or {})})
            if self.run is not None:
                try:
                    for k, v in summary_items(summary).items():
                        self.run.summary[k] = v
                except Exception as exc:
                    notes.append(f"W&B summary update failed: {exc!r}; summary kept in metrics.jsonl")
                    self.failed_logs += 1
                try:
                    self.run.finish(exit_code=0)
                except Exception as exc:
                    notes.append(f"W&B finish failed: {exc!r}")
                    self.failed_logs += 1
            if self.failed_logs:
                notes.append(
                    f"{self.failed_logs} W&B call(s) failed; all metrics are in {self.metrics_path}")
            run_dir = self.run_dir
            if self.mode == "offline" and run_dir is not None:
                if not wait_flushed(run_dir):
                    notes.append(f"W&B offline log {run_dir} not flushed yet; metrics.jsonl has every metric")
                self.sync_hint = f"W&B run saved offline; upload it with: {sync_command(self.out_dir)}"
            elif self.mode == "none":
                notes.append(f"no W&B run; metrics are in {self.metrics_path}")
        except Exception as exc:
            notes.append(f"tracking finish error: {exc!r}")
        return list(notes)


def run_name(config: dict, swept: dict | None = None) -> str:
    """A trial's W&B display name: method, data set, seed, then the settings its sweep varies
    (``autolora-digits-s0-lr=0.01-rank=8``) and, for an AMT pool member, its attack strength."""
    parts = [str(config.get("method")), str(config.get("dataset")), f"s{config.get('seed', 0)}"]
    for key, value in sorted((swept or {}).items()):
        if key in ("method", "seed", "prerequisite"):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    if config.get("member_eps") is not None:
        parts.append(f"member-eps={config['member_eps']:g}")
    return "-".join(parts)


# W&B's folders of offline runs (``offline-run-<time>-<id>``) and a folder never holding results (Tune's state)
OFFLINE_RUN_GLOB = "offline-run-*"
NOT_RESULTS = ("_tune",)


def offline_runs(root: Path) -> list[Path]:
    """Every offline W&B run under ``root`` (a trial's folder or a sweep's results folder), in start order.
    A resumed trial has one per start, with the same run id: ``wandb sync`` appends them into one run."""
    root = Path(root)
    found = [p for p in root.rglob(OFFLINE_RUN_GLOB)
             if p.is_dir() and any(p.glob("run-*.wandb"))
             and not any(part in NOT_RESULTS for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.name)  # the name starts with the start time


def sync_command(root: Path) -> str:
    """The shell command that uploads every offline run under ``root`` (quoted for any path)."""
    return f"bench wandb-sync {shlex.quote(str(root))}"


def _init(wandb: Any, mode: str, kwargs: dict, timeout: float | None) -> Any:
    settings = {"silent": True, "console": "off", "reinit": "create_new"}
    if timeout is not None:
        settings["init_timeout"] = timeout
    return wandb.init(mode=mode, settings=wandb.Settings(**settings), **kwargs)


# The validation metric that selects the checkpoint unless a config names another (methods.base.BaseConfig), and
# how selection ranks it: methods.base.selection_key keeps the epoch with its largest value.
DEFAULT_SELECT_METRIC = "val_pgd_acc"
SELECT_MODE = "max"


def _define_metrics(run: Any, select_metric: str = DEFAULT_SELECT_METRIC, select_mode: str = SELECT_MODE) -> None:
    """Per-epoch metrics against ``epoch``; the run summary of the selection metric is its best value (the one
    of the epoch selection keeps), not the last epoch's; other metrics summarise as their last value."""
    run.define_metric("epoch")
    run.define_metric("*", step_metric="epoch")
    run.define_metric(history_key(select_metric), step_metric="epoch", summary=select_mode)
    run.define_metric(history_key("train_loss"), step_metric="epoch", summary="min")


def open_run(out_dir: Path, *, run_id: str | None, name: str | None, group: str | None, tags: list[str],
             job_type: str, config: dict | None = None, resume: str | None = "allow") -> tuple[Any, str, list[str]]:
    """``wandb.init`` with the suite's policy; returns ``(run or None, mode, notes)``; never raises.

    mode is "online", "offline" or "none". Online is tried only when the user configured W&B, with a short
    init timeout (``BENCH_WANDB_INIT_TIMEOUT``); any failure falls back to offline, then to none.
    """
    out_dir = Path(out_dir)
    notes: list[str] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except Exception as exc:
        notes.append(f"could not create {out_dir}: {exc!r}")
    mode = wanted_mode()
    if mode == "disabled":
        return None, "none", notes + ["W&B disabled (BENCH_WANDB=off or WANDB_MODE=disabled)"]
    try:
        import wandb
    except Exception as exc:
        return None, "none", notes + [f"wandb not importable: {exc!r}"]

    kwargs = dict(
        project=_project(), entity=os.environ.get("WANDB_ENTITY") or None, config=_jsonable(dict(config or {})),
        dir=str(out_dir), id=run_id, name=name, group=group, tags=[str(t)[:64] for t in tags if t],
        job_type=job_type,
    )
    if resume and run_id:
        kwargs["resume"] = resume
    run = None
    used = mode
    saved_mode = os.environ.get("WANDB_MODE")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "online":
            try:
                run = _init(wandb, "online", kwargs, init_timeout())
            except Exception as exc:
                notes.append(f"W&B online init failed ({type(exc).__name__}: {str(exc)[:200]}); "
                             "falling back to offline")
                run = None
                try:  # the failed run's id stays claimed in the wandb service: restart the service
                    wandb.teardown()
                except Exception:
                    pass
        if run is None:
            used = "offline"
            try:
                # an env WANDB_MODE=online would override the argument in some versions: pin it for this call
                os.environ["WANDB_MODE"] = "offline"
                run = _init(wandb, "offline", kwargs, None)
            except Exception as exc:
                notes.append(f"W&B offline init failed ({type(exc).__name__}: {str(exc)[:200]}); "
                             "metrics kept only locally")
                run, used = None, "none"
            finally:
                if saved_mode is None:
                    os.environ.pop("WANDB_MODE", None)
                else:
                    os.environ["WANDB_MODE"] = saved_mode
    return run, used, notes


def start_run(config: dict, out_dir: Path, *, run_id: str, name: str, group: str | None,
              tags: list[str], job_type: str) -> TrackedRun:
    """Start tracking a trial; never raises.

    The W&B run lands in ``out_dir/wandb/`` beside result.json, with id ``run_id`` (``resume="allow"``: a
    restarted trial continues the same run), ``group`` (the sweep name), ``job_type`` (the method) and ``tags``.
    Per-epoch metrics use ``epoch`` as step metric; the method's selection metric (``config["select_metric"]``,
    e.g. ``val_pgd_acc``, ``val_fewshot_acc`` for pmf) summarises as its best value.
    """
    try:
        run, used, notes = open_run(out_dir, run_id=run_id, name=name, group=group, tags=list(tags or []),
                                    job_type=job_type, config=config, resume="allow")
        if run is not None:
            try:
                _define_metrics(run, str((config or {}).get("select_metric") or DEFAULT_SELECT_METRIC))
            except Exception as exc:
                notes.append(f"W&B define_metric failed: {exc!r}")
        return TrackedRun(out_dir, run, used, notes, run_id)
    except Exception as exc:  # pragma: no cover - last resort, tracking must never break a trial
        return TrackedRun(out_dir, None, "none", [f"tracking start error: {exc!r}"], run_id)

def read_wandb_file(path: Path) -> list[Any]:
    """Decode the records of a ``run-*.wandb`` transaction log (LevelDB log format with a W&B header).

    Returns ``wandb_internal_pb2.Record`` messages; used by the tests and to inspect offline runs without a
    server. Stops quietly at a truncated tail (a run that was killed mid-write).
    """
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    block = 32768
    header = 7  # ":W&B" + magic (2 bytes) + version (1 byte)
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    records, pos, pending = [], header, b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        chunk = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # FULL
            pending = b""
            payloads = [chunk]
        elif kind == 2:  # FIRST
            pending, payloads = chunk, []
        elif kind == 3:  # MIDDLE
            pending, payloads = pending + chunk, []
        elif kind == 4:  # LAST
            payloads, pending = [pending + chunk], b""
        else:
            break
        for payload in payloads:
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception:
                return records
            records.append(rec)
    return records


def close_service() -> None:
    """Close W&B's service process now. In a Ray worker (a sweep trial or task) this must happen before
    Ray reuses or ends the process: an atexit teardown then meets a closed socket and prints a traceback."""
    try:
        import wandb

        wandb.teardown()
    except Exception:  # noqa: BLE001 - nothing to close, or W&B not installed
        pass
