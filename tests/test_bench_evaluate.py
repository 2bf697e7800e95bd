"""``bench evaluate`` and the sharded evaluation: shards give one process's flags (apgd-ce and standard), a
shard whose worker is SIGKILLed resumes to the same flags without redoing finished batches, and a trial's own
AutoAttack agrees with ``bench evaluate`` of its weights; both kinds of result.json rank in the leaderboard;
the shards' merged reliability inputs give one process's reliability block; shards of a trial in a placement
group never wait for the CPUs the trial holds."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.eval_target import ModelRecipe
from bench.evaluate import autoattack_flags, evaluate_flags
from bench.sharded_eval import ATTEMPTS, SHARD_DIR, shard_ranges, sharded_flags

ROOT = Path(__file__).resolve().parents[1]


def test_shard_ranges_hold_whole_batches():
    assert shard_ranges(10, 3, 2) == [(0, 6), (6, 10)]  # batches [0,3) [3,6) | [6,9) [9,10)
    assert shard_ranges(10, 3, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shard_ranges(4, 8, 3) == [(0, 4)]  # never more shards than batches
    with pytest.raises(ValueError, match="no samples"):
        shard_ranges(0, 8, 2)


def test_batches_are_index_ranges_whatever_the_slice():
    """A slice starting at a batch boundary gives the flags of the same samples in the whole evaluation
    (batch k is seeded by its global index): the property sharding rests on, without Ray."""
    model, x, y = _tiny_setup(8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a busy 2-core machine: minutes instead of seconds
    try:
        whole = autoattack_flags(model, x, y, eps=8 / 255, version="apgd-ce", batch_size=2)
        tail = autoattack_flags(model, x[4:], y[4:], eps=8 / 255, version="apgd-ce", batch_size=2, first_index=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole[4:], tail) and 0 < int(whole.sum()) < 8
    with pytest.raises(ValueError, match="not a multiple"):
        autoattack_flags(model, x[3:], y[3:], eps=8 / 255, version="apgd-ce", batch_size=2, first_index=3)


# --------------------------------------------------------------------------------------- with a local Ray
def _worker_hook():
    """Runs in every Ray worker at start: logs each finished AutoAttack batch to the control folder and,
    when ``kill_after`` is there, SIGKILLs the first worker that finishes that many batches (once)."""
    ctl = Path(os.environ["BENCH_TEST_CTL"])

    class KillAfterBatches(logging.Handler):
        batches = 0

        def emit(self, record):
            if "batch done" not in record.getMessage():
                return
            self.batches += 1
            with open(ctl / "batches.log", "a") as f:
                f.write(f"{os.getpid()}\n")
            limit = ctl / "kill_after"
            if limit.exists() and self.batches >= int(limit.read_text()):
                try:
                    os.close(os.open(ctl / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
                os.kill(os.getpid(), signal.SIGKILL)

    ours = logging.getLogger("bench.evaluate")
    ours.setLevel(logging.DEBUG)
    ours.addHandler(KillAfterBatches())


@pytest.fixture(scope="module")
def ray_2cpu(tmp_path_factory):
    import ray
    from ray import cloudpickle

    ctl = tmp_path_factory.mktemp("ctl")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels by value to the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "BENCH_TEST_CTL": str(ctl)},
                          "worker_process_setup_hook": _worker_hook})
    yield ctl
    ray.shutdown()


def _tiny_setup(n: int):
    """tiny_cnn on ``n`` random 8x8 images labelled with its own predictions (all right clean)."""
    torch.manual_seed(0)
    model = ModelRecipe(kind="backbone", backbone="tiny_cnn", image_size=8).build()
    x = torch.rand(n, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _cfg(version: str, batch_size: int = 2):
    from bench.config import resolve_config

    return resolve_config("rft", {"eps": "8/255", "eval_batch_size": batch_size, "autoattack_version": version,
                                  "eval_pgd_steps": 2})


def _one_thread_flags(model, x, y, cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a shard (one CPU each)
    try:
        return evaluate_flags(model, x, y, cfg, progress=False)
    finally:
        torch.set_num_threads(threads)


# standard runs four attacks (square: 5000 queries) on the points left: minutes on the shared 2-core VM
@pytest.mark.parametrize("version,n", [("apgd-ce", 8), pytest.param("standard", 4, marks=pytest.mark.slow)])
def test_two_shards_give_one_shard_and_one_process_flags(ray_2cpu, tmp_path, version, n):
    model, x, y = _tiny_setup(n)
    cfg = _cfg(version)
    reference = _one_thread_flags(model, x, y, cfg)
    assert 0 < int(reference["autoattack"].sum()) < n, "the test needs some samples broken and some robust"
    recipe = ModelRecipe(kind="backbone", backbone="tiny_cnn", image_size=8)
    one, report1 = sharded_flags(recipe, model.state_dict(), x, y, cfg, shards=1, work_dir=tmp_path / "k1",
                                 progress=False)
    two, report2 = sharded_flags(recipe, model.state_dict(), x, y, cfg, shards=2, work_dir=tmp_path / "k2",
                                 progress=False)
    assert report1["shards"] == 1 and report2["shards"] == 2
    assert [s["range"] for s in report2["per_shard"]] == [[0, n // 2], [n // 2, n]]
    for name in ("clean", "pgd", "autoattack"):
        assert one[name].tolist() == reference[name].tolist(), name
        assert two[name].tolist() == reference[name].tolist(), name
    assert json.loads((tmp_path / "k2" / "shards.json").read_text())["shards"] == 2


def test_killed_shard_resumes_to_the_same_flags(ray_2cpu, tmp_path):
    ctl = ray_2cpu
    model, x, y = _tiny_setup(8)
    cfg = _cfg("apgd-ce")
    recipe = ModelRecipe(kind="backbone", backbone="tiny_cnn", image_size=8)
    (ctl / "batches.log").unlink(missing_ok=True)
    reference, _ = sharded_flags(recipe, model.state_dict(), x, y, cfg, shards=2, work_dir=tmp_path / "ref",
                                 progress=False)
    batches_uninterrupted = len((ctl / "batches.log").read_text().splitlines())
    assert batches_uninterrupted == 4  # 8 samples, all right clean, in batches of 2

    (ctl / "batches.log").unlink()
    (ctl / "kill_after").write_text("1")  # the first worker to finish a batch dies right after its state is saved
    try:
        flags, report = sharded_flags(recipe, model.state_dict(), x, y, cfg, shards=2, work_dir=tmp_path / "kill",
                                      progress=False)
    finally:
        (ctl / "kill_after").unlink()
    assert (ctl / "killed").exists()
    (ctl / "killed").unlink()
    assert flags["autoattack"].tolist() == reference["autoattack"].tolist()
    attempts = {tuple(s["range"]): s["attempts"] for s in report["per_shard"]}
    assert sorted(attempts.values()) == [1, 2]  # the killed shard ran again, the other once
    killed = next(r for r, a in attempts.items() if a == 2)
    lines = (tmp_path / "kill" / SHARD_DIR.format(*killed) / ATTEMPTS).read_text().splitlines()
    second = json.loads(lines[1])["resumed_autoattack"]
    assert second == {"attacks_done": [], "attack": "apgd-ce", "pending": 2}  # 1 of its 2 batches was done
    # nothing finished ran twice: as many batches in all as the uninterrupted evaluation
    assert len((ctl / "batches.log").read_text().splitlines()) == batches_uninterrupted


class _TrialLike:
    """A Ray actor in a placement group that captures its child tasks, as a Tune trial is: it runs a
    sharded evaluation and says which processes its shards ran in."""

    def evaluate(self, work_dir: str):
        model, x, y = _tiny_setup(8)
        torch.set_num_threads(1)
        flags, _ = sharded_flags(ModelRecipe(kind="backbone", backbone="tiny_cnn", image_size=8), model.state_dict(),
                                 x, y, _cfg("apgd-ce"), shards=2, work_dir=work_dir, progress=False)
        pids = {json.loads(line)["pid"] for f in Path(work_dir).glob("samples-*/" + ATTEMPTS)
                for line in f.read_text().splitlines()}
        return flags["autoattack"].tolist(), pids, os.getpid()


@pytest.mark.parametrize("trial_cpus", [1, 2])
def test_shards_of_a_trial_in_a_placement_group_never_wait_for_its_cpus(ray_2cpu, tmp_path, trial_cpus):
    """Ray puts a trial's tasks in the trial's own bundle, whose CPU the trial holds: its shards leave the
    group and take the free CPU (trial with 1 of 2 CPUs), or, with no CPU beside the trial (2 of 2), run in
    the trial's process; the same flags either way."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    model, x, y = _tiny_setup(8)
    reference = _one_thread_flags(model, x, y, _cfg("apgd-ce"))["autoattack"].tolist()
    pg = placement_group([{"CPU": trial_cpus}])
    ray.get(pg.ready(), timeout=60)
    try:
        in_group = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)  # as Tune's
        trial = ray.remote(_TrialLike).options(num_cpus=trial_cpus, scheduling_strategy=in_group).remote()
        flags, shard_pids, trial_pid = ray.get(trial.evaluate.remote(str(tmp_path / "k2")), timeout=300)
    finally:
        remove_placement_group(pg)
    assert flags == reference
    assert (trial_pid in shard_pids) == (trial_cpus == 2), (shard_pids, trial_pid)


# standard (26 s at load 5): Square's check compares the whole run's accuracy after each attack, merged
@pytest.mark.parametrize("version,n", [("apgd-ce", 7), ("standard", 5)])
def test_sharded_reliability_equals_one_process(ray_2cpu, tmp_path, version, n):
    """The shards' merged reliability inputs (PGD loss, AutoAttack's accuracy after each attack, its
    warnings) are one process's, so the row's reliability block from 2 shards equals an unsharded one:
    verdicts and every indicator's value, the extra attacks' budget curve included."""
    from bench.reliability import evaluate_with_reliability, row_reliability

    model, x, y = _tiny_setup(n)  # odd n in batches of 2: shards of unequal size, accuracies not k/2^m
    cfg = _cfg(version)
    cfg.reliability_n = n - 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a shard (one CPU each)
    try:
        reference_details: dict = {}
        evaluate_flags(model, x, y, cfg, progress=False, details=reference_details)
        _, reference = evaluate_with_reliability(model, x, y, cfg, n_classes=10, progress=False)
        details: dict = {}
        flags, report = sharded_flags(ModelRecipe(kind="backbone", backbone="tiny_cnn", image_size=8),
                                      model.state_dict(), x, y, cfg, shards=2, work_dir=tmp_path / "k2",
                                      progress=False, details=details)
        assert report["shards"] == 2
        sharded = row_reliability(model, x, y, flags, details, cfg, n_classes=10,
                                  eval_forwards=report["eval_forwards"])
    finally:
        torch.set_num_threads(threads)
    assert 0 < int(flags["autoattack"].sum()) < n, "the test needs some samples broken and some robust"
    assert torch.equal(details["pgd_loss"], reference_details["pgd_loss"])
    assert details["autoattack"]["accuracy"] == reference_details["autoattack"]["accuracy"]  # exact floats
    attacks = {"apgd-ce": ["apgd-ce"], "standard": ["apgd-ce", "apgd-t", "fab-t", "square"]}[version]
    assert list(details["autoattack"]["accuracy"]) == ["clean", *attacks]
    # forwards: one process's plus the second shard's one-sample class-count probe
    assert report["eval_forwards"] == reference["eval_forwards"] + 1
    assert sharded["verdict"] == reference["verdict"] and sharded["fired"] == reference["fired"]
    assert sharded["subset_n"] == reference["subset_n"] == n - 2
    assert sharded["curve"] == reference["curve"]
    assert sharded["indicators"] == reference["indicators"]
    assert {"steps_convergence", "restarts_convergence", "budget_unbounded", "incomplete_optimisation",
            "pgd_vs_autoattack", "aa_zero_gradients"} <= set(sharded["indicators"])
    assert ("aa_square" in sharded["indicators"]) == (version == "standard")


@pytest.mark.slow
def test_bench_evaluate_of_a_trial_and_a_backbone_rank_in_the_leaderboard(ray_2cpu, tmp_path, shards_root):
    """A tiny rft trial (its own AutoAttack in its process), then ``bench evaluate RUN_DIR --shards 2`` of its
    weights: the same per-sample AutoAttack flags; and ``--backbone cifar_resnet18_aa``: a backbone row."""
    from bench.cli import main

    run_dir = tmp_path / "runs" / "rft"
    # 8 steps at a high lr: a few test samples right, and at eps 0.25/255 some of them robust
    budget = ["epochs=1", "max_train_samples=256", "batch_size=32", "lr=0.05", "n_eval=16", "n_val=8",
              "train_attack_steps=1", "eval_pgd_steps=2", "val_pgd_steps=1", "autoattack_version=apgd-ce",
              "eval_batch_size=4", "eps=0.25/255"]
    cmd = [sys.executable, "-m", "bench", "run", "--method", "rft", "--backbone", "cifar_resnet18_aa",
           "--data-root", str(shards_root), "--out", str(run_dir), "--no-progress"]
    for item in budget:
        cmd += ["--set", item]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # one thread, as a shard
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    trained = json.loads((run_dir / "result.json").read_text())
    in_trial = json.loads((run_dir / "autoattack_state.json").read_text())["robust"]

    assert main(["evaluate", str(run_dir), "--shards", "2", "--data-root", str(shards_root), "--no-progress"]) == 0
    result = json.loads((run_dir / "result.json").read_text())
    merged = []
    for a, b in shard_ranges(16, 4, 2):
        merged += json.loads((run_dir / "eval_shards" / SHARD_DIR.format(a, b) / "autoattack_state.json")
                             .read_text())["robust"]
    assert merged == in_trial  # the trial's AutoAttack and bench evaluate's, per sample
    for key in ("clean_acc", "pgd_acc", "autoattack_acc", "robust_acc"):
        assert result["metrics"][key] == trained["metrics"][key], key
    by = result["metrics"]["evaluated_by"]
    assert trained["metrics"]["clean_acc"] > 0, "the comparison needs samples right clean"
    assert by["command"] == "bench evaluate" and by["shards"] == 2 and by["n_eval"] == 16
    assert result["metrics_history"] == [trained["metrics"]]
    # the sharded re-evaluation's reliability block is the trial's (the same weights and flags)
    assert result["reliability"]["verdict"] == trained["reliability"]["verdict"]
    assert result["reliability"]["indicators"] == trained["reliability"]["indicators"]
    assert len(result["cost"]["evaluate"]["per_shard"]) == 2

    backbone_dir = tmp_path / "runs" / "backbone"
    assert main(["evaluate", "--backbone", "cifar_resnet18_aa", "--dataset", "digits", "--n-eval", "12",
                 "--autoattack", "apgd-ce", "--eps", "0.25/255", "--pgd-steps", "2", "--set", "eval_batch_size=4",
                 "--shards", "2", "--data-root", str(shards_root), "--out", str(backbone_dir), "--no-progress"]) == 0
    row = json.loads((backbone_dir / "result.json").read_text())
    assert row["method"] == "backbone" and row["status"] == "ok" and row["metrics"]["n_eval"] == 12
    assert 0 <= row["metrics"]["robust_acc"] <= row["metrics"]["clean_acc"] <= 1
    assert row["reliability"]["verdict"] in ("ok", "suspect") and row["reliability"]["n"] == 12

    from bench.report.results import load_results

    records, problems = load_results(tmp_path / "runs")
    assert sorted(r["method"] for r in records) == ["backbone", "rft"] and not problems
    assert main(["leaderboard", str(tmp_path / "runs")]) == 0
    board = (tmp_path / "runs" / "leaderboard.csv").read_text()
    assert "backbone" in board and "rft" in board


def test_bad_requests_fail_in_one_line(tmp_path, capsys):
    from bench.cli import main

    assert main(["evaluate"]) == 2
    assert "give a trial folder" in capsys.readouterr().err
    assert main(["evaluate", "--backbone", "cifar_resnet18_aa"]) == 2
    assert "--backbone needs --dataset" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no result.json" in capsys.readouterr().err


def test_eval_shards_in_a_sweep_file_is_a_speed_setting(tmp_path):
    from bench.config import config_hash, resolve_config
    from bench.sweep.space import load_sweep

    path = tmp_path / "s.yaml"
    path.write_text("methods: [rft]\nbackbone: tiny_cnn\nfixed: {eval_shards: 2, epochs: 1}\n")
    spec = load_sweep(path)
    cfg = resolve_config("rft", spec.overrides("rft", 0, {}))
    assert cfg.eval_shards == 2
    # the flags do not depend on it, so neither does the config's identity
    assert config_hash(cfg) == config_hash(resolve_config("rft", {**spec.overrides("rft", 0, {}), "eval_shards": 1}))
    path.write_text("methods: [rft]\nfixed: {eval_shards: 0}\n")
    with pytest.raises(ValueError, match="eval_shards=0 must be >= 1"):
        load_sweep(path)


@pytest.mark.parametrize("folders, said", [
    ((), "nothing finished yet"),
    (("eval_shards",), "finished batches are kept in {d}/eval_shards"),
    (("eval_episodes",), "finished episodes are kept in {d}/eval_episodes"),
])
def test_ctrl_c_line_names_what_is_kept_and_the_command_that_resumes(tmp_path, folders, said):
    import argparse

    from bench.cli.evaluate import _interrupted

    run_dir = tmp_path / "a trial"
    for name in folders:
        (run_dir / name).mkdir(parents=True)
    argv = ["evaluate", str(run_dir), "--shards", "2"]
    line = _interrupted(argparse.Namespace(run_dir=run_dir), argv)
    assert line == f"interrupted; {said.format(d=run_dir)}; resume with: bench evaluate '{run_dir}' --shards 2"
