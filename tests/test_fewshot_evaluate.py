"""``bench evaluate RUN_DIR`` of few-shot (episodic) trials: a tiny finished pmf trial and a tiny amt pool
trial (two members, merged per episode) re-evaluated on their test episodes give the trial's own few-shot
numbers exactly; the evaluation split into episode shards gives the per-query flags of one process, also as
Ray tasks; a killed shard's finished episodes are not recomputed; options that do not apply fail in one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.cli import main

ROOT = Path(__file__).resolve().parents[1]
# tiny_cnn at the digits' stored size: the cheapest trial that trains, selects and evaluates like a real one
# (the reliability indicators never change a number: off, they cost the trial's test most of its time)
TINY = {"backbone": "tiny_cnn", "epochs": 1, "episodes_per_epoch": 2, "val_episodes": 1, "episodes": 4,
        "queries": 3, "eval_pgd_steps": 1, "image_size": 32, "reliability": "off"}
METHODS = {"pmf": {"test_time_ft_steps": 2}, "amt": {"pool_size": 2, "rank": 4}}
FEWSHOT_KEYS = ("clean_acc", "clean_ci95", "adv_acc", "adv_ci95", "robust_acc", "robust_ci95", "robust_attack")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as a shard: two on the busy 2-core machine made these tiny trials and episodes about
    30x slower (measured: 12 amt episodes 38.5 s with 2 threads, 1.3 s with 1)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trials(shards_root, tmp_path_factory, one_thread) -> dict[str, Path]:
    """A finished trial folder per method (trained once for the module), and the result.json it wrote."""
    from bench.config import resolve_config
    from bench.trial import run_trial

    root = tmp_path_factory.mktemp("fewshot_runs")
    out = {}
    for method, extra in METHODS.items():
        run_dir = root / method
        run_trial(resolve_config(method, {**TINY, **extra}), run_dir, data_root=shards_root, progress=False,
                  track=False)
        (run_dir / "trained_result.json").write_text((run_dir / "result.json").read_text())
        out[method] = run_dir
    return out


def _evaluate(run_dir: Path, shards_root: Path, *options: str) -> dict:
    assert main(["evaluate", str(run_dir), "--data-root", str(shards_root), "--no-progress", *options]) == 0
    return json.loads((run_dir / "result.json").read_text())


def _episode_flags(run_dir: Path) -> list[dict]:
    """The per-query flags the last evaluation saved, in episode order, whatever the shards were."""
    report = json.loads((run_dir / "eval_episodes" / "shards.json").read_text())
    flags = []
    for shard in report["per_shard"]:
        a, b = shard["range"]
        folder = run_dir / "eval_episodes" / f"episodes-{a:06d}-{b:06d}"
        flags += [json.loads((folder / f"digits-{i:06d}.json").read_text())["flags"] for i in range(a, b)]
    return flags


@pytest.mark.parametrize("method", list(METHODS))
def test_bench_evaluate_reproduces_the_trials_fewshot_numbers(trials, shards_root, method):
    run_dir = trials[method]
    trained = json.loads((run_dir / "trained_result.json").read_text())
    result = _evaluate(run_dir, shards_root)
    for key in FEWSHOT_KEYS:
        assert result["fewshot"][key] == trained["fewshot"][key], key  # exactly: same episodes, same draws
    assert trained["fewshot"]["clean_acc"] > 0, "the comparison needs queries right clean"
    by = result["fewshot"]["evaluated_by"]
    assert by["command"] == "bench evaluate" and by["episodes"] == 4 and by["shards"] == 1
    assert by["queries_per_episode"] == 5 * 3 and by["eval_pgd_steps"] == 1
    assert ("pool of" in by["weights"]) == (method == "amt")  # amt: the pool it merged, no checkpoint of its own
    assert result["fewshot_history"] == [trained["fewshot"]]
    assert result["cost"]["evaluate"]["unit"] == "episodes"
    flags = _episode_flags(run_dir)
    assert len(flags) == 4 and all(len(f["clean"]) == 15 for f in flags)
    for f in flags:  # robust = right clean and under every attack, per query
        assert f["robust"] == [c and p for c, p in zip(f["clean"], f["pgd"])]


@pytest.mark.parametrize("method, autoattack, whole_range, parts", [
    ("pmf", "apgd-ce", (0, 3), [(1, 3)]),  # the fine-tuning's draws and AutoAttack's seed: the episode's own
    ("amt", "off", (0, 2), [(0, 1), (1, 2)]),  # the merge's scoring draws: the episode's own
])
def test_episode_shards_give_one_process_flags(trials, shards_root, tmp_path, method, autoattack, whole_range, parts):
    """Shards over episode ranges, run one after the other in this process, give the flags of the same
    episodes in one shard; a rerun of a shard reloads every episode it finished (a retried shard's resume)."""
    from bench.config import resolve_config
    from bench.eval_target import ModelRecipe, trial_weights
    from bench.prerequisites import in_run_dir
    from bench.sharded_fewshot import fewshot_shard

    run_dir = trials[method]
    trained = json.loads((run_dir / "trained_result.json").read_text())
    cfg = in_run_dir(resolve_config(method, {**{k: v for k, v in trained["config"].items() if k != "method"},
                                             "fewshot_autoattack": autoattack}), run_dir)
    recipe = ModelRecipe(kind="method", backbone=cfg.backbone, num_classes=cfg.ways, image_size=32,
                         config=cfg.to_dict())
    state = trial_weights(run_dir)[0] if method == "pmf" else None  # amt: the pool it merges

    def shard(a, b, folder):
        return fewshot_shard(recipe, state, cfg, init_seed=cfg.seed, data_root=str(shards_root), shard=0, start=a,
                             stop=b, shard_dir=str(tmp_path / folder))

    start, stop = whole_range
    whole = shard(start, stop, "whole")["flags"]["digits"]
    assert len(whole) == stop - start and sum(sum(f["clean"]) for f in whole) > 0
    for a, b in parts:
        assert shard(a, b, f"part{a}")["flags"]["digits"] == whole[a - start:b - start], (a, b)
    attacks = ["pgd"] + (["autoattack"] if autoattack != "off" else [])
    for f in whole:  # robust: right clean and under every attack that ran, per query
        assert f["robust"] == [all(f[k][q] for k in ["clean", *attacks]) for q in range(len(f["clean"]))]
    a, b = parts[-1]
    again = shard(a, b, f"part{a}")
    assert again["resumed_episodes"] == b - a and again["flags"]["digits"] == whole[a - start:b - start]


def _worker_hook():
    """Runs in every Ray worker at start: logs each episode a shard finishes to the control folder and, when
    ``kill_at_second`` is there, SIGKILLs the first worker that starts its second episode (once), its first
    saved by then (an episode's file is written when ``episode_flags`` returns)."""
    import os
    import signal

    import bench.fewshot

    ctl, compute = Path(os.environ["BENCH_TEST_CTL"]), bench.fewshot.episode_flags
    started = []

    def episode_flags(*args, **kwargs):
        armed = (ctl / "kill_at_second").exists()
        started.append(armed)  # a worker may have run episodes of an earlier evaluation: count the armed ones
        if armed and sum(started) == 2:
            try:
                os.close(os.open(ctl / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                os.kill(os.getpid(), signal.SIGKILL)
            except FileExistsError:
                pass
        out = compute(*args, **kwargs)
        with open(ctl / "episodes.log", "a") as f:
            f.write(f"{os.getpid()}\n")
        return out

    bench.fewshot.episode_flags = episode_flags


@pytest.fixture
def ray_2cpu(tmp_path):
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the hook travels by value to the workers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"WANDB_MODE": "offline", "PYTHONPATH": str(ROOT),
                                       "BENCH_TEST_CTL": str(tmp_path)}, "worker_process_setup_hook": _worker_hook})
    yield tmp_path
    ray.shutdown()


def test_two_ray_shards_equal_one_and_a_killed_shard_resumes(trials, shards_root, ray_2cpu):
    """``--shards 2`` (two Ray tasks over episodes 0-1 and 2-3) and ``--shards 1`` (in this process): the same
    per-query flags and few-shot block. Again with a worker SIGKILLed as it starts its second episode: Ray
    retries that shard, which reloads its first episode; the same flags, and no episode computed twice."""
    import shutil

    ctl, run_dir = ray_2cpu, trials["pmf"]
    one = _evaluate(run_dir, shards_root, "--shards", "1")
    flags_one = _episode_flags(run_dir)
    two = _evaluate(run_dir, shards_root, "--shards", "2")
    assert [s["range"] for s in two["cost"]["evaluate"]["per_shard"]] == [[0, 2], [2, 4]]
    assert _episode_flags(run_dir) == flags_one
    for key in FEWSHOT_KEYS:
        assert two["fewshot"][key] == one["fewshot"][key], key
    assert two["fewshot"]["evaluated_by"]["shards"] == 2
    assert len((ctl / "episodes.log").read_text().splitlines()) == 4

    for name in ("episodes-000000-000002", "episodes-000002-000004"):
        shutil.rmtree(run_dir / "eval_episodes" / name)
    (ctl / "episodes.log").unlink()
    (ctl / "kill_at_second").write_text("")
    killed = _evaluate(run_dir, shards_root, "--shards", "2")
    assert (ctl / "killed").exists()
    assert _episode_flags(run_dir) == flags_one and killed["fewshot"]["clean_acc"] == one["fewshot"]["clean_acc"]
    shards = killed["cost"]["evaluate"]["per_shard"]
    assert sorted((s["attempts"], s["resumed_episodes"]) for s in shards) == [(1, 0), (2, 1)]
    assert len((ctl / "episodes.log").read_text().splitlines()) == 4  # nothing finished ran again


@pytest.mark.parametrize("options, code, message", [
    (["--n-eval", "8"], 2, "--n-eval counts test samples; pmf is a few-shot trial"),
    (["--pgd-steps", "0"], 2, "eval_pgd_steps=0 must be >= 1"),
    (["--episodes", "0"], 2, "--episodes 0 must be >= 1"),
    (["--autoattack", "standard", "--set", "ways=3"], 2, "fewshot_autoattack=standard needs ways >= 4"),
])
def test_options_that_do_not_apply_fail_in_one_line(trials, shards_root, capsys, options, code, message):
    run_dir = trials["pmf"]
    before = (run_dir / "result.json").read_text()
    assert main(["evaluate", str(run_dir), "--data-root", str(shards_root), *options]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert (run_dir / "result.json").read_text() == before  # nothing ran, nothing written


def test_episodes_on_a_supervised_trial_or_a_backbone_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "result.json").write_text(json.dumps({"status": "ok", "method": "rft",
                                                      "config": {"method": "rft", "backbone": "tiny_cnn"}}))
    for request, message in ((["--backbone", "tiny_cnn", "--dataset", "digits"], "--episodes goes with a few-shot"),
                             ([str(tmp_path)], "--episodes counts few-shot test episodes; rft is a supervised")):
        assert main(["evaluate", *request, "--episodes", "5"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("targets", [None, ["digits"]])
def test_test_samplers_are_the_trials_test_episodes(shards_root, targets):
    """What ``bench evaluate`` samples (test samplers alone) is what the trial's test sampled (``open``)."""
    import torch

    from bench.config import resolve_config
    from bench.tasks import EpisodicTask
    from data_shards.manifest import read_manifest

    cfg = resolve_config("pmf", {**TINY, "target_datasets": targets})
    ds_dir = shards_root / "digits"
    task = EpisodicTask(cfg, ds_dir, read_manifest(ds_dir), device=torch.device("cpu"), data_root=shards_root)
    task.open()
    alone = task.test_samplers()
    assert list(alone) == [t["name"] for t in task.targets] == ["digits"]
    for t in task.targets:
        s = alone[t["name"]]
        assert (s.seed, s.classes, s.ways, s.shots, s.queries) == (t["test"].seed, t["test"].classes, 5, 1, 3)
        assert s.seed == cfg.seed + 10_000 and s.classes == [5, 6, 7, 8, 9]  # the novel classes
        for a, b in zip(s.sample(2), t["test"].sample(2)):
            assert torch.equal(a, b)
