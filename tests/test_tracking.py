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
    run.finish({"metrics": {"clean_acc": 0.9, "pgd_acc": 0.35}, "cost": {"wall_s": 1.5}})
    assert run.sync_hint == f"W&B run saved offline; upload it with: bench wandb-sync {out}"

    # the run lands beside result.json
    run_dir = run.run_dir
    assert run_dir is not None and run_dir.parent == out / "wandb" and run_dir.name.endswith("trial0001")
    recs = _records(run_dir)
    runrec = [r.run for r in recs if r.WhichOneof("record_type") == "run"][0]
    assert runrec.run_id == "trial0001" and runrec.run_group == "smoke" and runrec.job_type == "autolora"
    assert list(runrec.tags) == ["autolora", "digits", "resnet18"]
    hist = _history(recs)
    # namespaced as W&B users expect: validation under val/, training (loss, lr, λ) under train/
    assert [h["val/pgd_acc"] for h in hist] == [0.2, 0.4, 0.3]
    assert [h["train/loss"] for h in hist] == [1.0, 0.5, 1 / 3] and [h["train/lambda1"] for h in hist][0] == 1.0
    assert not [k for h in hist for k in h if "_" in k.split("/")[0] and not k.startswith("_")], hist
    assert [h["epoch"] for h in hist] == [0, 1, 2]
    metric_defs = [r.metric for r in recs if r.WhichOneof("record_type") == "metric"]
    pgd = [m for m in metric_defs if m.name == "val/pgd_acc"][0]
    assert pgd.summary.max and pgd.step_metric == "epoch"
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    assert summary["test/clean_acc"] == 0.9 and summary["test/pgd_acc"] == 0.35 and summary["cost/wall_s"] == 1.5
    assert "clean_acc" not in summary and "pgd_acc" not in summary  # test metrics never bare beside val/

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
    run.finish({"metrics": {"clean_acc": 0.8}})
    assert "bench wandb-sync" in run.sync_hint
    assert [h["val/pgd_acc"] for h in _history(_records(run.run_dir))] == [0.2, 0.4, 0.3]
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


# (config's select_metric, the W&B metric that should summarise as its best, another that keeps its last)
SELECTION_CASES = [
    (None, "val/pgd_acc", "val/fewshot_acc"),  # the BaseConfig default
    ("val_pgd_acc", "val/pgd_acc", "val/clean_acc"),  # autolora, rft, amt
    ("val_fewshot_acc", "val/fewshot_acc", "val/pgd_acc"),  # pmf
    ("val_clean_acc", "val/clean_acc", "val/pgd_acc"),  # vanilla fine-tuning
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
    assert summary["test/clean_acc"] == 0.9


def test_run_name_says_method_dataset_seed_and_swept_settings():
    config = {"method": "autolora", "dataset": "digits", "seed": 2, "lr": 0.01, "rank": 8}
    assert tracking.run_name(config, {"method": "autolora", "seed": 2, "lr": 0.01, "rank": 8}) == \
        "autolora-digits-s2-lr=0.01-rank=8"
    assert tracking.run_name(config) == "autolora-digits-s2"  # a `bench run`: nothing swept
    member = {"method": "amt", "dataset": "digits", "seed": 0, "member_eps": 8.0}
    assert tracking.run_name(member, {"method": "amt", "seed": 0, "prerequisite": "amt-1a2b-s0"}) == \
        "amt-digits-s0-member-eps=8"


def test_resumed_trial_continues_its_run_and_one_command_syncs_every_run(tmp_path, capsys):
    """A trial started twice (killed after epoch 1, resumed) writes one offline folder per start, both with its
    run id (resume="allow"), the second going on from epoch 2: `wandb sync` appends them into one run. The
    sync command lists every run of a results folder with a space in its path, Tune's copies left out."""
    import shlex

    from bench.cli import main

    results = tmp_path / "my results"
    out = results / "rft_s0_abc12_00000"
    config = {"method": "rft", "dataset": "digits", "seed": 0, "lr": 0.05}
    name = tracking.run_name(config, {"method": "rft", "seed": 0, "lr": 0.05})
    for start, epochs in ((0, 2), (2, 3)):  # the first start ends without finish(): killed
        run = tracking.start_run(config, out, run_id="abc12_00000", name=name, group="smoke", tags=["rft"],
                                 job_type="rft")
        for e in range(start, epochs):
            run.log(_epochs()[e], step=e)
        if epochs == 3:
            run.finish({"metrics": {"clean_acc": 0.9}})
        else:
            tracking.close_service()
    runs = tracking.offline_runs(results)
    assert len(runs) == 2 and all(r.parent == out / "wandb" for r in runs)
    starts = []
    for r in runs:
        recs = _records(r)
        (runrec,) = [x.run for x in recs if x.WhichOneof("record_type") == "run"]
        assert runrec.run_id == "abc12_00000" and runrec.display_name == "rft-digits-s0-lr=0.05"
        assert runrec.run_group == "smoke"
        starts.append([h["epoch"] for h in _history(recs)])
    assert starts == [[0, 1], [2]]  # the resumed start goes on where the first stopped, in the same run

    copy = results / "_tune" / "smoke" / "trial" / "wandb"  # an old sweep's Tune checkpoint copy
    copy.mkdir(parents=True)
    (copy / runs[0].name).mkdir()
    (copy / runs[0].name / "run-x.wandb").write_bytes(b"")
    assert tracking.offline_runs(results) == runs

    hint = run.sync_hint.split("upload it with: ")[1]
    assert shlex.split(hint) == ["bench", "wandb-sync", str(out)]  # quoted: the path has a space
    assert main(["wandb-sync", str(results), "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    argv = shlex.split(printed)
    assert argv[1] == "sync" and argv[2:] == [str(r) for r in runs]


def test_wandb_sync_of_a_folder_without_runs_is_one_line(tmp_path, capsys):
    from bench.cli import main

    assert main(["wandb-sync", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no offline W&B runs under" in err[0]


@pytest.mark.parametrize("token, kept", [
    ("3-{other}-unix-/tmp/wandb-x/socket", False),  # inherited from a parent: its runs outlive a Ctrl-C here
    ("3-{own}-unix-/tmp/wandb-x/socket", True),     # started by this process (a bench call made in-process)
    ("", True),
])
def test_a_bench_process_owns_its_wandb_service(monkeypatch, token, kept):
    import os

    from bench.cli import _own_wandb_service

    value = token.format(own=os.getpid(), other=os.getpid() + 1)
    monkeypatch.setenv("WANDB_SERVICE", value)
    _own_wandb_service()
    assert os.environ.get("WANDB_SERVICE") == (value if kept else None)
