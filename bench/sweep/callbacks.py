"""The Tune callbacks of a sweep: the result file of every trial (fetched from Tune's storage when trials run
in node-local folders; written for a trial that ended without one) and the progress lines a user follows."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.files import atomic_write_json
from bench.sweep.folders import merge_tree, trial_folder

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
        out = Path(self.results) / trial_folder(trial.config, trial.trial_id)
        staging = out.with_name(f".{out.name}.fetch")
        shutil.rmtree(staging, ignore_errors=True)
        checkpoint.to_directory(str(staging))
        merge_tree(staging, out)
        shutil.rmtree(staging, ignore_errors=True)

    def _write(self, trial, status: str, reason: str) -> None:
        out = Path(self.results) / trial_folder(trial.config, trial.trial_id)
        path = out / "result.json"
        if path.exists() or not (out.exists() or self.fetch):
            return
        out.mkdir(parents=True, exist_ok=True)
        cfg = trial.config
        rec = {"id": trial.trial_id, "method": cfg.get("method"), "seed": cfg.get("seed"), "status": status,
               "error": reason, "sweep": {"trial_id": trial.trial_id}, "last_result": _jsonable(trial.last_result)}
        atomic_write_json(path, rec)

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
        needed = trial.config.get("prerequisite")  # a run other trials need first (bench.sweep.phases)
        self._say(f"{trial.trial_id}: started ({trial.config.get('method')}, seed {trial.config.get('seed')}"
                  + (f", run needed first: {needed})" if needed else ")"))

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


def _jsonable(d: dict | None) -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
    return out
