"""bench.report.tracking: offline W&B runs, fallback when the server cannot be reached, no metric ever lost."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from bench.report import tracking


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "BENCH_WANDB", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "wandb_dir").mkdir()


def _records(run_dir: Path):
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, files
    return tracking.read_wandb_file(files[0])


def _history(records) -> list[dict]:
    out = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return out


def _epochs(n=3):
    return [{"train_loss": 1.0 / (e + 1), "val_clean_acc": 0.5 + 0.1 * e, "val_pgd_acc": [0.2, 0.4, 0.3][e],
             "lr": 0.1 * 0.5 ** e, "lambda1": 1.0 - 0.1 * e} for e in range(n)]


def test_offline_run_history_summary_and_local_copy(tmp_path):
    out = tmp_path / "trial"
    run = tracking.start_run({"method": "autolora", "lr": 0.1, "seed": 0}, out, run_id="trial0001",
                             name="autolora-digits-0", group="smoke", tags=["autolora", "digits", "resnet18"],
                             job_type="autolora")
    assert run.mode == "offline"
    for e, m in enumerate(_epochs()):
        run.log(m, step=e)
    notes = run.finish({"metrics": {"clean_acc": 0.9, "pgd_acc": 0.35}, "cost": {"wall_s": 1.5}})
    assert any("wandb sync" in n for n in notes), notes

    # the run lands beside result.json
    run_dir = run.run_dir
    assert run_dir is not None and run_dir.parent == out / "wandb" and run_dir.name.endswith("trial0001")
    recs = _records(run_dir)
    runrec = [r.run for r in recs if r.WhichOneof("record_type") == "run"][0]
    assert runrec.run_id == "trial0001" and runrec.run_group == "smoke" and runrec.job_type == "autolora"
    assert list(runrec.tags) == ["autolora", "digits", "resnet18"]
    hist = _history(recs)
    assert [h["val_pgd_acc"] for h in hist] == [0.2, 0.4, 0.3]
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    metric_defs = [r.metric for r in recs if r.WhichOneof("record_type") == "metric"]
    pgd = [m for m in metric_defs if m.name == "val_pgd_acc"][0]
    assert pgd.summary.max and pgd.step_metric == "epoch"
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    assert summary["clean_acc"] == 0.9 and summary["pgd_acc"] == 0.35 and summary["cost/wall_s"] == 1.5

    local = tracking.read_metrics(out)
    assert [r["val_pgd_acc"] for r in local if r["kind"] == "history"] == [0.2, 0.4, 0.3]
    assert [r for r in local if r["kind"] == "summary"][0]["metrics"]["clean_acc"] == 0.9


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server_falls_back_offline_and_keeps_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("BENCH_WANDB_INIT_TIMEOUT", "4")
    assert tracking.wanted_mode() == "online"
    out = tmp_path / "trial"
    t0 = time.time()
    run = tracking.start_run({"lr": 0.1}, out, run_id="trial0002", name="t", group="g", tags=["amt"],
                             job_type="amt")
    assert time.time() - t0 < 60
    assert run.mode == "offline", run.notes
    assert any("falling back to offline" in n for n in run.notes)
    for e, m in enumerate(_epochs()):
        run.log(m, step=e)
    notes = run.finish({"metrics": {"clean_acc": 0.8}})
    assert any("wandb sync" in n for n in notes)
    assert [h["val_pgd_acc"] for h in _history(_records(run.run_dir))] == [0.2, 0.4, 0.3]
    assert len([r for r in tracking.read_metrics(out) if r["kind"] == "history"]) == 3


def test_logging_failure_mid_run_keeps_going(tmp_path):
    out = tmp_path / "trial"
    run = tracking.start_run({}, out, run_id="trial0003", name="t", group=None, tags=[], job_type="rft")
    run.log(_epochs()[0], step=0)

    def boom(*a, **k):
        raise ConnectionError("service went away")

    run.run.log = boom  # the W&B service fails mid-run
    run.log(_epochs()[1], step=1)
    run.log(_epochs()[2], step=2)
    notes = run.finish({"metrics": {"clean_acc": 0.7}})
    assert any("W&B log failed" in n for n in notes)
    assert any("2 W&B call(s) failed" in n for n in notes), notes
    local = tracking.read_metrics(out)
    assert [r["val_pgd_acc"] for r in local if r["kind"] == "history"] == [0.2, 0.4, 0.3]
    assert any(r["kind"] == "summary" for r in local)


def test_wandb_disabled_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_WANDB", "off")
    run = tracking.start_run({"x": object()}, tmp_path / "t", run_id="x", name="x", group=None, tags=[],
                             job_type="rft")
    assert run.mode == "none" and run.run is None
    run.log({"val_pgd_acc": float("nan"), "obj": object()}, step=0)
    notes = run.finish({"metrics": {"clean_acc": 0.5}})
    assert any("metrics.jsonl" in n for n in notes)
    assert len(tracking.read_metrics(tmp_path / "t")) == 2


def _final_summary(records) -> dict:
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    return summary


# (config's select_metric, the metric that should summarise as its best, another metric that keeps its last)
SELECTION_CASES = [
    (None, "val_pgd_acc", "val_fewshot_acc"),  # the BaseConfig default
    ("val_pgd_acc", "val_pgd_acc", "val_clean_acc"),  # autolora, rft, amt
    ("val_fewshot_acc", "val_fewshot_acc", "val_pgd_acc"),  # pmf
    ("val_clean_acc", "val_clean_acc", "val_pgd_acc"),  # vanilla fine-tuning
]


@pytest.mark.parametrize("select_metric,best,last", SELECTION_CASES)
def test_summary_of_selection_metric_is_its_best_epoch(tmp_path, select_metric, best, last):
    config = {"method": "m"} if select_metric is None else {"method": "m", "select_metric": select_metric}
    run = tracking.start_run(config, tmp_path / "trial", run_id="sel0001", name="t", group=None, tags=[],
                             job_type="m")
    per_epoch = [0.3, 0.5, 0.4]  # the best epoch is not the last
    for e, v in enumerate(per_epoch):
        run.log({"val_pgd_acc": v, "val_clean_acc": v, "val_fewshot_acc": v}, step=e)
    run.finish({"metrics": {"clean_acc": 0.9}})
    summary = _final_summary(_records(run.run_dir))
    assert summary[best] == {"max": 0.5}
    assert summary[last] == 0.4
    assert summary["clean_acc"] == 0.9
