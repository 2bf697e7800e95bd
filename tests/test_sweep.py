"""Ray Tune sweeps: schema validation, ASHA, resume after a kill, error trials, a 2-node ``ray start``
cluster without a shared results folder that loses a node, a 2-worker DeepSpeed ZeRO-2 trial
(TorchTrainer inside Tune) against a 1-worker one, and a trial whose evaluation runs as 2 Ray tasks.

Local Ray with at most 2 CPUs; backbone tiny_cnn and the rft/ft baselines with tiny budgets.
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {"epochs": 2, "max_train_samples": 128, "n_eval": 64, "n_val": 32, "train_attack_steps": 1,
        "eval_pgd_steps": 2, "val_pgd_steps": 1, "autoattack_version": "off", "batch_size": 64}


def write_sweep(tmp_path: Path, name: str = "t", **kw) -> Path:
    doc = {"name": name, "methods": ["rft"], "dataset": "digits", "backbone": "tiny_cnn",
           "fixed": dict(TINY), "max_concurrent_trials": 2}
    fixed = kw.pop("fixed", None)
    if fixed:
        doc["fixed"].update(fixed)
    doc.update(kw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def results_of(results: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(results.glob("*/result.json"))}


def sweep_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "bench", "sweep", *map(str, args)]


def _env(shards_root: Path) -> dict:
    env = dict(os.environ, BENCH_SHARDS=str(shards_root), WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    return env


# ------------------------------------------------------------------------------------------- schema


@pytest.mark.parametrize("kw, cpus, cap, said", [
    ({}, 2, 2, False),                                                     # no shards: nothing to keep free
    ({"fixed": {"eval_shards": 2}}, 2, 1, True),                           # 2 trials would hold both CPUs
    ({"fixed": {"eval_shards": 2}}, 8, 2, False),                          # room already
    ({"space": {"eval_shards": {"choice": [1, 3]}}}, 2, 1, True),          # a searched value counts
    ({"per_method": {"rft": {"eval_shards": 2}}, "max_concurrent_trials": None}, 3, 2, True),
    ({"fixed": {"eval_shards": 2}, "resources": {"cpus": 2}}, 2, 2, False),  # no shard fits beside one trial:
])                                                                         # shards run in the trial's process
def test_concurrency_leaves_a_cpu_for_evaluation_shards(tmp_path, capsys, kw, cpus, cap, said):
    from bench.sweep.driver import _leave_room_for_eval_shards
    from bench.sweep.space import load_sweep

    spec = load_sweep(write_sweep(tmp_path, **kw))
    _leave_room_for_eval_shards(spec, {"CPU": float(cpus)})
    assert spec.max_concurrent_trials == cap
    assert ("find a free CPU" in capsys.readouterr().out) == said

def _err(tmp_path, text: str) -> str:
    from bench.sweep.space import SweepError, load_sweep

    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SweepError) as ei:
        load_sweep(path)
    msg = str(ei.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_schema_errors(tmp_path):
    m = _err(tmp_path, "methods: [rft]\nschedular: asha\n")
    assert "schedular" in m and "scheduler" in m  # names the key and the valid ones
    m = _err(tmp_path, "methods: [nope]\n")
    assert "nope" in m and "rft" in m
    m = _err(tmp_path, "methods: [rft]\nscheduler: hyperband\n")
    assert "hyperband" in m and "fifo, asha" in m
    m = _err(tmp_path, "methods: [rft]\nsearch: bohb\n")
    assert "random, optuna" in m
    m = _err(tmp_path, "methods: [rft]\nspace: {lr: {loguniform: [0.1, 0.01]}}\n")
    assert "space.lr.loguniform" in m and "must be <" in m
    m = _err(tmp_path, "methods: [rft]\nspace: {lr: {loguniform: [0, 0.1]}}\n")
    assert "> 0" in m
    m = _err(tmp_path, "methods: [rft]\nspace: {lr: {normal: [0, 1]}}\n")
    assert "grid, choice, uniform, loguniform, randint" in m
    m = _err(tmp_path, "methods: [rft]\nfixed: {rank: 4}\n")  # an autolora/protonet_lora field, not rft's
    assert "fixed.rank" in m and "method rft" in m and "epochs" in m
    m = _err(tmp_path, "methods: [rft]\nspace: {eps: {uniform: [0, 2]}}\n")  # eps in [0, 1]
    assert "method rft" in m and "eps=1 is above 16/255" in m and "did you mean eps=1/255?" in m
    m = _err(tmp_path, "methods: [rft]\nfixed: {autoattack_version: fast}\n")
    assert "apgd-ce" in m
    m = _err(tmp_path, "methods: [rft]\nresources: {gpu: 1}\n")
    assert "resources.gpu" in m and "cpus, gpus, workers" in m
    m = _err(tmp_path, "methods: [rft]\nresources: {gpus: -1}\n")
    assert "resources.gpus" in m
    m = _err(tmp_path, "methods: [rft]\nmode: maximize\n")
    assert "max, min" in m
    m = _err(tmp_path, "methods: [rft, ft]\nsearch: optuna\nspace: {lr: {uniform: [0.001, 0.1]}}\n")
    assert "optuna" in m
    m = _err(tmp_path, "methods: [rft]\nper_method: {amt: {pool_size: 2}}\n")
    assert "per_method.amt" in m


def test_shipped_spaces_validate():
    from bench.sweep.space import load_sweep

    smoke = load_sweep(ROOT / "tune_spaces" / "smoke.yaml")
    assert set(smoke.methods) == {"rft", "ft", "autolora", "amt", "pmf"}
    assert smoke.backbone == "cifar_resnet18_aa" and smoke.dataset == "digits"
    for f in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        spec = load_sweep(f)
        assert spec.n_trials() >= 1, f


def test_cli_check_and_error_exit(tmp_path, shards_root):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [rft]\nnum_samples: 0\n")
    out = subprocess.run([sys.executable, "-m", "bench", "sweep", str(bad)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "num_samples" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run([sys.executable, "-m", "bench", "sweep", str(ROOT / "tune_spaces" / "smoke.yaml"),
                          "--check"], capture_output=True, text=True, cwd=ROOT, timeout=120, env=_env(shards_root))
    assert out.returncode == 0 and "5 trials" in out.stdout, out.stderr


def _check(path: Path, data_root: Path, capsys) -> tuple[int, str]:
    """``bench sweep PATH --check`` in this process: (exit status, the one line it printed after its first
    "loading" line)."""
    from bench.cli import main

    rc = main(["sweep", str(path), "--check", "--data-root", str(data_root)])
    out = capsys.readouterr()
    lines = [line for line in (out.err if rc else out.out).strip().splitlines() if not line.endswith(": loading")]
    assert len(lines) == 1, lines
    return rc, lines[0]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The folder the command starts in (not the repository), holding weights/tiny.pt: a tiny_cnn checkpoint."""
    import torch

    from bench.backbones import create_backbone

    start = tmp_path / "start"
    (start / "weights").mkdir(parents=True)
    torch.save(create_backbone("tiny_cnn", 10).encoder.state_dict(), start / "weights" / "tiny.pt")
    monkeypatch.chdir(start)
    return start


# (sweep file settings, what --check says: "" = accepted) -- each as a start of the sweep would find it
CHECK_CASES = [
    ({}, ""),
    ({"backbone": "tiny_cnn@weights/tiny.pt"}, ""),  # relative, present in the folder the command started in
    ({"backbone": "tiny_cnn@weights/nope.pt"}, "weights file {start}/weights/nope.pt does not exist"),
    ({"dataset": "imagenet_subset"}, "no shards for data set 'imagenet_subset' under {root}; no converter is named "
                                     "'imagenet_subset' (python -m bench shards list: "),
    ({"dataset": "cifar10"}, "python -m bench shards make cifar10 --root DIR --out {root}"),
    ({"space": {"dataset": {"grid": ["digits", "dogs"]}}}, "dataset dogs, backbone tiny_cnn: no shards for data set "
                                                            "'dogs'"),
    ({"methods": ["pmf"], "fixed": {"target_datasets": ["digits", "cub200"]}},
     "no shards for data set 'cub200' under {root}; build them with: python -m bench shards make cub200 --root DIR"),
]


@pytest.mark.parametrize("settings, message", CHECK_CASES)
def test_check_finds_what_the_start_would(tmp_path, shards_root, elsewhere, capsys, settings, message):
    """--check refuses what a start refuses (missing shards with a converter that exists, a missing weights
    file, relative paths resolved against the folder the command started in) and accepts the rest."""
    path = write_sweep(tmp_path, **settings)
    rc, line = _check(path, shards_root, capsys)
    if not message:
        assert rc == 0 and "every config resolved, shards and backbone weights found" in line
    else:
        assert rc == 2 and message.format(start=elsewhere, root=shards_root) in line, line


def test_check_relative_paths_become_absolute_for_trials(tmp_path, shards_root, elsewhere, monkeypatch):
    """A trial runs in Tune's folder: the driver resolved the relative weights path against the folder the
    command started in, so the trial's config finds the file from anywhere."""
    from bench.config import resolve_config
    from bench.sweep.space import load_sweep
    from bench.trial import check_inputs

    spec = load_sweep(write_sweep(tmp_path, backbone="tiny_cnn@weights/tiny.pt")).with_absolute_paths()
    monkeypatch.chdir(tmp_path)  # a trial's own folder
    cfg = resolve_config("rft", spec.overrides("rft", 0, {}))
    assert cfg.backbone == f"tiny_cnn@{elsewhere / 'weights' / 'tiny.pt'}"
    check_inputs(cfg, shards_root)  # found from the trial's folder


# ------------------------------------------------------------------------------------------- sweeps

@pytest.fixture
def ray_2cpu():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"WANDB_MODE": "offline",
                                                                         "PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


def test_asha_sweep_four_trials(tmp_path, shards_root, ray_2cpu):
    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep

    path = write_sweep(tmp_path, "asha", fixed={"epochs": 3}, methods=["rft", "ft"],
                       space={"lr": {"grid": [0.001, 0.05]}},
                       scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    spec = load_sweep(path)
    assert spec.n_trials() == 4
    res = tmp_path / "res"
    summary = run_sweep(spec, res, data_root=shards_root, leaderboard=True, verbose=0)
    assert summary["n_trials"] == 4 and summary["n_error"] == 0
    files = results_of(res)
    assert len(files) == 4
    ok = [r for r in files.values() if r["status"] == "ok"]
    assert ok, files  # ASHA may stop some early; those say so
    for r in files.values():
        assert r["status"] in ("ok", "stopped")
    for r in ok:
        assert r["sweep"]["name"] == "asha" and set(r["sweep"]["swept"]) == {"method", "seed", "lr"}
        assert r["config"]["lr"] in (0.001, 0.05) and r["backbone"] == "tiny_cnn"
        assert 0 <= r["metrics"]["clean_acc"] <= 1
    assert (res / "leaderboard.md").exists()


def test_error_trial_others_finish(tmp_path, shards_root, elsewhere, ray_2cpu):
    """A trial that fails at run time leaves the others running. Both trials name their weights relative to
    the folder the sweep started in, and run in Tune's folders: the good one finds its file."""
    import torch

    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep

    # weights that exist (so the start's check passes) but do not fit: the trial fails when it builds its model
    torch.save({"not_a_layer": torch.zeros(1)}, elsewhere / "weights" / "bad.pt")
    path = write_sweep(tmp_path, "err", fixed={"epochs": 1}, max_failures=0,
                       space={"backbone": {"grid": ["tiny_cnn@weights/tiny.pt", "tiny_cnn@weights/bad.pt"]}})
    res = tmp_path / "res"
    summary = run_sweep(load_sweep(path), res, data_root=shards_root, leaderboard=True, verbose=0)
    files = results_of(res)
    assert summary["n_trials"] == 2 and summary["n_error"] == 1 and summary["n_ok"] == 1
    assert sorted(r["status"] for r in files.values()) == ["error", "ok"], files
    ok = next(r for r in files.values() if r["status"] == "ok")
    assert ok["backbone"] == f"tiny_cnn@{elsewhere / 'weights' / 'tiny.pt'}"
    err = next(r for r in files.values() if r["status"] == "error")
    assert "does not fit" in err["error"]
    assert err["sweep"]["swept"]["backbone"] == f"tiny_cnn@{elsewhere / 'weights' / 'bad.pt'}"
    assert (res / "leaderboard.md").exists()  # the leaderboard is built from the trial that finished


@pytest.mark.slow
def test_kill_and_resume(tmp_path, shards_root):
    path = write_sweep(tmp_path, "resume", fixed={"epochs": 2}, space={"lr": {"grid": [0.01, 0.02, 0.03, 0.04]}},
                       max_concurrent_trials=1)
    res = tmp_path / "res"
    env = _env(shards_root)
    proc = subprocess.Popen(sweep_cmd(path, "--results", res, "--num-cpus", "2", "--no-leaderboard"), cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first is None:
            for name, r in results_of(res).items():
                if r.get("status") == "ok":
                    first = name
            time.sleep(0.5)
        assert first, "no trial finished before the kill"
        time.sleep(2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep driver and the Ray it started
        proc.wait()
    before = results_of(res)
    assert len([r for r in before.values() if r.get("status") == "ok"]) < 4
    mtime = (res / first / "result.json").stat().st_mtime
    out = subprocess.run(sweep_cmd(path, "--results", res, "--num-cpus", "2", "--resume"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    after = results_of(res)
    assert len(after) == 4 and all(r["status"] == "ok" for r in after.values()), after
    assert (res / first / "result.json").stat().st_mtime == mtime  # the finished trial was not rerun
    assert sorted(r["config"]["lr"] for r in after.values()) == [0.01, 0.02, 0.03, 0.04]
    assert (res / "leaderboard.md").exists()


@pytest.mark.slow
def test_ray_start_cluster_without_shared_disk_and_node_loss(tmp_path, shards_root, ray_start_cluster):
    """A head (no CPUs) and a worker started with ``ray start``; the sweep's trial runs on the worker in a
    folder of that node and reaches --results only through Tune's storage (--storage). The worker is
    killed after the trial's first epoch; a new worker joins, and the trial finishes there from its
    checkpoint in the storage."""
    EPOCHS = 20
    cluster = ray_start_cluster
    cluster.start("head", 0, head=True)
    first = cluster.start("worker1", 1)
    # 20 short epochs: the kill below is timed on the node's own folder (written as an epoch ends; the storage
    # brings it to RESULTS seconds later, when on an idle machine 4 more epochs had ended)
    path = write_sweep(tmp_path, "nodes", fixed={"epochs": EPOCHS}, max_failures=3)
    res, storage = tmp_path / "res", tmp_path / "storage"
    proc = cluster.sweep(sweep_cmd(path, "--results", res, "--storage", storage, "--address", cluster.address,
                                   "--no-leaderboard", "--data-root", shards_root), cwd=ROOT)
    def epochs_on_node() -> int:  # 2 there: epoch 1's report, and its checkpoint in the storage, are done
        try:
            return max((len(json.loads(p.read_text())) for p in first.glob("session_*/artifacts/**/history.json")),
                       default=0)
        except (OSError, json.JSONDecodeError):
            return 0

    cluster.wait_for(proc, lambda: epochs_on_node() >= 2, "the trial's second epoch in the worker's own folder",
                     poll_s=0.1)
    assert cluster.kill(first) > 0
    second = cluster.start("worker2", 1)  # capacity comes back, as an autoscaler would bring it
    assert proc.wait(timeout=420) == 0, cluster.output(proc)[-4000:]
    ((name, r),) = results_of(res).items()
    assert r["status"] == "ok" and [h["epoch"] for h in r["history"]] == list(range(EPOCHS))
    # the finished trial's folder, fetched through the storage, as the trial left it (keep_checkpoints: none)
    assert (res / name / "checkpoints" / "best.pt").is_file() and not (res / name / "checkpoints" / "latest").exists()
    attempts = [json.loads(line) for line in (res / name / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) >= 2 and attempts[-1]["start_epoch"] >= 1, attempts  # resumed, not restarted
    assert attempts[0]["node_id"] != attempts[-1]["node_id"]
    assert list(second.glob("session_*/artifacts/**/result.json"))  # finished on the new worker


@pytest.fixture(scope="module")
def small_shard_root(tmp_path_factory) -> Path:
    """The digits data written in 32-sample shards, so 2 ranks get equal shares of a small subset."""
    from data_shards.digits import make_digits

    root = tmp_path_factory.mktemp("shards32")
    make_digits(root, maxcount=32)
    return root


@pytest.mark.slow
def test_two_worker_deepspeed_zero2_matches_one_worker(tmp_path, small_shard_root, ray_2cpu):
    """TorchTrainer inside the Tune trial, 2 DeepSpeed ZeRO-2 workers on CPU, against 1 worker.

    max_train_samples caps the whole split, which is then split by shard over the ranks: with 32-sample
    shards, 2 ranks read shards {0, 2} and {1, 3}, the same 128 samples as 1 rank, in global batches of 64.
    """
    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep

    fixed = {"epochs": 3, "zero_stage": 2, "augment": False, "shuffle_buffer": 1, "batch_size": 64,
             "train_attack_steps": 1, "lr": 0.01, "keep_checkpoints": "last"}
    losses = {}
    for workers, samples in ((1, 128), (2, 128)):
        path = write_sweep(tmp_path, f"w{workers}", fixed={**fixed, "max_train_samples": samples},
                           resources={"cpus": 1, "workers": workers}, max_failures=0)
        res = tmp_path / f"res{workers}"
        summary = run_sweep(load_sweep(path), res, data_root=small_shard_root, leaderboard=False, verbose=0)
        assert summary["n_error"] == 0
        ((name, r),) = results_of(res).items()
        assert r["status"] == "ok"
        losses[workers] = [h["train_loss"] for h in r["history"]]
        if workers == 2:  # every rank saved its part of DeepSpeed's checkpoint
            assert (res / name / "checkpoints" / "epoch0002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()
    assert len(losses[1]) == len(losses[2]) == 3
    for a, b in zip(losses[1], losses[2]):
        assert abs(a - b) <= 0.05 * max(abs(a), 1e-3), losses


AMT_TINY = {"epochs": 1, "episodes_per_epoch": 2, "episodes": 3, "val_episodes": 2, "queries": 3, "rank": 4,
            "warmup_epochs": 0, "pool_size": 2, "train_attack_steps": 1, "eval_pgd_steps": 1, "val_pgd_steps": 1,
            "image_size": 32}  # amt128 at the stored size


@pytest.mark.slow
def test_amt_sweep_trains_members_once_in_a_first_phase_and_resumes(tmp_path, shards_root, ray_2cpu):
    """Two AMT trials that differ only in a merge setting: phase 1 trains their 2 common members once, in
    parallel, as ordinary trials in RESULTS/_prerequisites; phase 2 merges and evaluates each trial's pool
    from them. A resumed sweep reruns nothing."""
    from bench.prerequisites import PREREQUISITES_DIR
    from bench.report.results import load_results
    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep

    path = write_sweep(tmp_path, "pool", methods=["amt"], fixed=AMT_TINY, space={"merge_top_k": {"grid": [1, 2]}})
    res = tmp_path / "res"
    summary = run_sweep(load_sweep(path), res, data_root=shards_root, leaderboard=True, verbose=0)
    assert summary["n_trials"] == 2 and summary["n_error"] == 0, summary
    members = sorted(d for d in (res / PREREQUISITES_DIR).iterdir() if d.is_dir())
    assert len(members) == 2, members  # 2 pools x 2 members, trained once each
    spans = []
    for m in members:
        r = json.loads((m / "result.json").read_text())
        assert r["status"] == "ok" and r["stage"] == "validation" and (m / "adapter.pt").is_file(), r
        assert r["sweep"]["stage"] == "prerequisite" and (m / "checkpoints").is_dir()
        end = (m / "result.json").stat().st_mtime
        spans.append((end - r["cost"]["wall_s"], end))
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans  # the two members overlapped in time
    files = results_of(res)
    assert sorted(r["config"]["merge_top_k"] for r in files.values()) == [1, 2]
    for name, r in files.items():
        assert r["status"] == "ok" and 0 <= r["fewshot"]["adv_acc"] <= 1, r
        assert r["cost"]["pool"]["members"] == 2 and r["cost"]["train_s"] >= r["cost"]["pool"]["train_s"] > 0
        val = r["history"][0]
        assert 0 <= val["val_fewshot_acc"] <= 1 and 0 <= val["val_fewshot_pgd_acc"] <= 1
        pool = json.loads((res / name / "pool.json").read_text())
        assert [m["eps"] for m in pool["members"]] == [0.01, 8.0]
        assert all((res / name / m["adapter"]).is_file() for m in pool["members"])  # the pool's own copies
        assert (res / name / "pool.json").stat().st_mtime >= max(e for _, e in spans)  # merged after training
        assert sorted((res / name / m["trained_in"]).resolve() for m in pool["members"]) == [m.resolve() for m in members]
    records, problems = load_results(res)
    assert len(records) == 2 and not problems, problems  # members are not leaderboard entries
    tune_dirs = sorted(p.name for p in (res / "_tune" / "pool").iterdir() if p.is_dir())
    assert tune_dirs == sorted(files), tune_dirs  # Tune names a planned trial as its results folder
    before = {m.name: (m / "attempts.jsonl").read_text() for m in members}
    summary = run_sweep(load_sweep(path), res, data_root=shards_root, resume=True, leaderboard=False, verbose=0)
    assert summary["n_error"] == 0 and {m.name: (m / "attempts.jsonl").read_text() for m in members} == before


def test_plan_expands_the_space_and_dedups_the_runs_needed_first(tmp_path):
    """The trials of a sweep with AMT pools are planned up front: one per grid point and sample, and the
    distinct members they need (pools that share strengths share members); optuna cannot be planned."""
    from bench.sweep.phases import make_plan, run_points
    from bench.sweep.space import load_sweep

    path = write_sweep(tmp_path, "plan", methods=["amt"], seeds=[0, 1], num_samples=2,
                       space={"merge_top_k": {"grid": [1, 2]}, "pool_size": {"grid": [2, 4]},
                              "merge_beta": {"uniform": [1.0, 12.0]}})
    spec = load_sweep(path)
    plan = make_plan(spec, tmp_path / "res", resume=False)
    assert len(plan["trials"]) == 2 * 2 * 2 * 2  # seeds x top-k x pool size x samples
    assert len({t["merge_beta"] for t in plan["trials"]}) == 16  # sampled per trial
    assert len(run_points(plan)) == 4 * 2  # 4 strengths x 2 seeds, whatever the merge settings and pool size
    assert sorted(r["config"]["member_eps"] for r in plan["runs"].values()) == [0.01, 0.01, 0.1, 0.1, 6, 6, 8, 8]
    again = make_plan(spec, tmp_path / "res", resume=True)  # a resumed sweep keeps its plan
    assert again == json.loads(json.dumps(plan))
    assert make_plan(load_sweep(write_sweep(tmp_path, "plain", methods=["rft"])), tmp_path / "r2", False) is None
    optuna = write_sweep(tmp_path, "opt", methods=["amt"], search="optuna", space={"merge_top_k": {"choice": [1, 2]}})
    with pytest.raises(ValueError, match="search: optuna .* need runs first"):
        make_plan(load_sweep(optuna), tmp_path / "r3", resume=False)


def test_driver_waits_for_late_result_files_before_the_leaderboard(tmp_path, capsys):
    """A trial Tune saw finish whose result.json appears later (another node's write reaching a shared disk)
    still makes the console leaderboard: the console shows what the files show."""
    import threading

    from bench.report.leaderboard import build_leaderboard
    from bench.sweep.results import wait_for_result_files

    rec = {"id": "x", "method": "rft", "dataset": "digits", "status": "ok",
           "metrics": {"clean_acc": 0.7, "pgd_acc": 0.3, "eps": 1 / 255}}
    late = tmp_path / "rft_s0_late"
    late.mkdir()
    timer = threading.Timer(0.6, lambda: (late / "result.json").write_text(json.dumps(rec)))
    timer.start()
    assert wait_for_result_files(tmp_path, ["rft_s0_late"], timeout_s=20) == []
    assert wait_for_result_files(tmp_path, ["never_written"], timeout_s=0.2) == ["never_written"]
    rows = build_leaderboard(tmp_path, console=True)
    printed = capsys.readouterr().out
    md = (tmp_path / "leaderboard.md").read_text()
    assert len(rows) == 1 and "│ rft" in printed and "| rft |" in md.replace("  ", " ")


def test_smoke_sets_its_own_budgets_and_threat_model():
    """The smoke's figures (README) must not move when a method's paper defaults change: every budget that
    decides its cost and its learning signal is set in the file, at eps 1/255 (supervised) and 0.5/255
    (few-shot, where PMF's clean meta-training leaves nothing at 1/255), on >= 256 test images."""
    from bench.sweep.space import load_sweep

    smoke = load_sweep(ROOT / "tune_spaces" / "smoke.yaml")
    supervised = ("epochs", "max_train_samples", "batch_size", "lr", "train_attack_steps", "eval_pgd_steps",
                  "n_eval", "autoattack_version")
    episodic = ("epochs", "episodes_per_epoch", "ways", "shots", "queries", "episodes", "eval_pgd_steps",
                "autoattack_version")
    for method in smoke.methods:
        o = smoke.overrides(method, 0, {})
        keys = episodic if method in ("amt", "pmf") else supervised
        assert all(k in o for k in keys), (method, [k for k in keys if k not in o])
        assert o["eps"] == pytest.approx(0.5 / 255 if method in ("amt", "pmf") else 1 / 255)
        n_test = o["episodes"] * o["ways"] * o["queries"] if method in ("amt", "pmf") else o["n_eval"]
        assert n_test >= 256, method


# ------------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_during_a_tune_run_is_an_interrupted_sweep(tmp_path, ray_2cpu):
    """Tune catches Ctrl-C itself: it stops the trials, saves the experiment and returns as if it had
    finished (so `bench perf` once recorded a figure of an interrupted measurement). The driver tells the
    two apart and raises; an uninterrupted run returns its results. A real Tune run, SIGINT sent to this
    process from a callback (the driver's main thread) after a trial's second result."""
    from ray import tune
    from ray.tune import RunConfig

    from bench.sweep.driver import SweepInterrupted, _fit_or_interrupt

    def trainable(config):
        for i in range(config["n"]):
            tune.report({"i": i})
            time.sleep(0.2)

    class CtrlC(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result["i"] == 1:
                os.kill(os.getpid(), signal.SIGINT)

    def tuner(name, n, callbacks):
        return tune.Tuner(trainable, param_space={"n": n},
                          run_config=RunConfig(name=name, storage_path=str(tmp_path), verbose=0, callbacks=callbacks))

    with pytest.raises(SweepInterrupted):
        _fit_or_interrupt(tuner("cut", 50, [CtrlC()]))
    grid = _fit_or_interrupt(tuner("whole", 3, []))
    assert [r.metrics["i"] for r in grid] == [2]


@pytest.mark.slow
def test_ctrl_c_ends_a_sweep_with_one_line_and_the_resume_command(tmp_path, shards_root):
    path = write_sweep(tmp_path, "ctrlc", fixed={"epochs": 3}, max_concurrent_trials=1)
    res = tmp_path / "my res"
    proc = subprocess.Popen(sweep_cmd(path, "--results", res, "--num-cpus", "2", "--no-leaderboard"), cwd=ROOT,
                            env=_env(shards_root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines = []
    while proc.poll() is None:
        lines.append(proc.stdout.readline())
        if ": epoch 0 " in lines[-1]:
            break
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: the driver and every process it started
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    said = [line for line in err.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("bench sweep: interrupted;"), err
    assert "Traceback" not in out + err
    assert said[0].endswith(f"--results {shlex.quote(str(res))} --num-cpus 2 --no-leaderboard --resume")


def _robust_flags(trial_dir: Path) -> list[bool]:
    """A trial's per-sample AutoAttack flags: its own state, or its shards' states in index order."""
    own = trial_dir / "autoattack_state.json"
    if own.exists():
        return json.loads(own.read_text())["robust"]
    flags: list[bool] = []
    for shard in sorted((trial_dir / "eval_shards").glob("samples-*")):
        flags += json.loads((shard / "autoattack_state.json").read_text())["robust"]
    return flags


def test_sweep_trial_hands_its_autoattack_to_shards(tmp_path, shards_root, ray_2cpu):
    """``eval_shards: 2`` in a sweep file: the Tune trial (1 of the 2 CPUs) submits its evaluation as 2 Ray
    tasks, which take the free CPU outside the trial's placement group (inside it they could never start:
    the trial holds its CPU, and Tune failed it). Its result.json carries the sharded evaluation and a
    reliability block equal to that of the same trial in a sweep with eval_shards: 1 (per-sample AutoAttack
    flags too); so is the block ``bench evaluate --shards 2`` writes for the latter's weights."""
    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep

    rows, dirs = {}, {}
    for shards in (2, 1):
        fixed = {"epochs": 1, "eval_shards": shards, "autoattack_version": "apgd-ce", "n_eval": 24,
                 "eval_batch_size": 8, "eps": "2/255", "reliability_n": 8}
        res = tmp_path / f"k{shards}"
        summary = run_sweep(load_sweep(write_sweep(tmp_path, f"k{shards}", fixed=fixed)), res,
                            data_root=shards_root, leaderboard=False, verbose=0)
        assert summary["n_ok"] == 1, summary
        (name, row), = results_of(res).items()
        rows[shards], dirs[shards] = (row, _robust_flags(res / name)), res / name
    (sharded, sharded_robust), (single, single_robust) = rows[2], rows[1]
    by = sharded["metrics"]["evaluated_by"]
    assert by["command"] == "trial" and by["shards"] == 2 and "evaluated_by" not in single["metrics"]
    assert sharded["config_hash"] == single["config_hash"]
    assert len(sharded_robust) == 24 and sharded_robust == single_robust
    assert 0 < sum(sharded_robust) < 24, "the comparison needs samples broken and robust"
    for key in ("clean_acc", "pgd_acc", "autoattack_acc", "robust_acc"):
        assert sharded["metrics"][key] == single["metrics"][key], key
    rel, ref = sharded["reliability"], single["reliability"]
    assert rel["verdict"] == ref["verdict"] and rel["fired"] == ref["fired"] and rel["subset_n"] == 8
    assert rel["indicators"] == ref["indicators"] and rel["curve"] == ref["curve"]

    # bench evaluate --shards 2 of the unsharded trial's weights writes the same block
    from bench.cli import main

    assert main(["evaluate", str(dirs[1]), "--shards", "2", "--data-root", str(shards_root), "--no-progress"]) == 0
    again = json.loads((dirs[1] / "result.json").read_text())
    assert again["metrics"]["evaluated_by"]["shards"] == 2
    assert again["metrics"]["robust_acc"] == single["metrics"]["robust_acc"]
    assert again["reliability"]["indicators"] == ref["indicators"] and again["reliability"]["curve"] == ref["curve"]
