"""An AMT pool without a shared disk: what a pool member and a merging trial record is relative to their own
folder, so a member stopped in one folder (a node) finishes in another, and a pool folder moved whole (or
restored from Tune's storage on another node) is still read by its merging trial."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from bench.config import config_hash, resolve_config
from bench.prerequisites import assemble, in_run_dir, prerequisite_runs
from bench.trial import run_trial
from methods.base import RUN_DIR

TINY_POOL = {"epochs": 2, "episodes_per_epoch": 2, "episodes": 3, "val_episodes": 2, "queries": 3, "rank": 4,
             "warmup_epochs": 0, "pool_size": 2, "train_attack_steps": 1, "eval_pgd_steps": 1, "val_pgd_steps": 1,
             "image_size": 32, "backbone": "tiny_cnn", "dataset": "digits", "autoattack_version": "off",
             "fewshot_autoattack": "off"}


def test_a_members_config_is_the_same_in_any_folder(tmp_path):
    cfg = resolve_config("amt", TINY_POOL)
    runs = prerequisite_runs(cfg)
    assert len(runs) == 2
    member = runs[0].resolved()
    assert member.adapter_path == f"{RUN_DIR}/adapter.pt"  # recorded: relative to the run's folder
    here, there = in_run_dir(member, tmp_path / "a"), in_run_dir(member, tmp_path / "b")
    assert here.adapter_path == str((tmp_path / "a").resolve() / "adapter.pt")  # read: this folder's
    assert there.adapter_path == str((tmp_path / "b").resolve() / "adapter.pt")
    assert config_hash(member) == config_hash(runs[0].resolved()) != config_hash(here)
    assert in_run_dir(cfg, tmp_path) is cfg  # nothing to fill: the config itself


class _Stop(Exception):
    pass


@pytest.mark.slow  # four short trials, three through DeepSpeed: about 55 s of CPU, minutes on a loaded VM
def test_member_finishes_in_another_folder_and_a_moved_pool_is_merged(tmp_path, shards_root):
    cfg = resolve_config("amt", TINY_POOL)
    runs = prerequisite_runs(cfg)
    node_a, node_b = tmp_path / "node_a" / "_prerequisites", tmp_path / "node_b" / "_prerequisites"

    def stop_after_first_epoch(row, ckpt_dir):
        if ckpt_dir is not None:
            raise _Stop  # the node dies once the first epoch's checkpoint is written

    with pytest.raises(_Stop):
        run_trial(runs[0].resolved(), node_a / runs[0].name, data_root=shards_root, progress=False, track=False,
                  evaluate=False, epoch_callback=stop_after_first_epoch)
    # node B gets the member's folder as Tune's storage restores it (node A and its disk are gone)
    shutil.copytree(node_a / runs[0].name, node_b / runs[0].name)
    shutil.rmtree(tmp_path / "node_a")
    seen = []
    first = run_trial(runs[0].resolved(), node_b / runs[0].name, data_root=shards_root, progress=False,
                      track=False, evaluate=False, epoch_callback=lambda row, ckpt: seen.append(row["epoch"]))
    assert seen == [1], seen  # resumed after epoch 0, not restarted, and not refused as "another config"
    assert first["status"] == "ok" and [h["epoch"] for h in first["history"]] == [0, 1]
    assert (node_b / runs[0].name / "adapter.pt").is_file()
    recorded = yaml.safe_load((node_b / runs[0].name / "args.yaml").read_text())
    assert recorded["adapter_path"] == f"{RUN_DIR}/adapter.pt"
    run_trial(runs[1].resolved(), node_b / runs[1].name, data_root=shards_root, progress=False, track=False,
              evaluate=False)

    # the merging trial assembles its pool in its folder, then the folder moves (members and pool.json)
    merged_cfg = assemble(cfg, node_b, tmp_path / "trial_a")
    assert merged_cfg.pool_dir == f"{RUN_DIR}/."
    pool = json.loads((tmp_path / "trial_a" / "pool.json").read_text())
    for m in pool["members"]:
        assert m["out_dir"].startswith("members/") and m["adapter"] == f"{m['out_dir']}/adapter.pt"
    shutil.move(tmp_path / "trial_a", tmp_path / "trial_b")
    shutil.rmtree(tmp_path / "node_b")  # the pool holds its own copies of the members
    result = run_trial(merged_cfg, tmp_path / "trial_b", data_root=shards_root, progress=False, track=False)
    assert result["status"] == "ok" and result["config"]["pool_dir"] == f"{RUN_DIR}/."
    assert result["cost"]["pool"]["members"] == 2 and result["cost"]["pool"]["train_s"] > 0
    assert 0 <= result["fewshot"]["adv_acc"] <= result["fewshot"]["clean_acc"] <= 1


@pytest.mark.slow  # a local Ray: 2 members in parallel, then the merging trial
def test_pool_sweep_with_storage_records_no_node_path(tmp_path, shards_root):
    """With --storage, every trial runs in a folder of its node (Tune's trial folder) and reaches RESULTS only
    through the storage: the merging trial gets its members from their checkpoints there, and what reaches
    RESULTS names no node's folder."""
    import ray

    from bench.prerequisites import PREREQUISITES_DIR
    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep

    fixed = {k: v for k, v in TINY_POOL.items() if k not in ("backbone", "dataset")} | {"epochs": 1}
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"name": "pool", "methods": ["amt"], "dataset": "digits", "backbone": "tiny_cnn",
                                    "fixed": fixed, "max_concurrent_trials": 2}))
    res, storage = tmp_path / "res", tmp_path / "storage"
    root = Path(__file__).resolve().parents[1]
    ray.init(num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"WANDB_MODE": "offline", "PYTHONPATH": str(root)}})
    try:
        summary = run_sweep(load_sweep(path), res, data_root=shards_root, leaderboard=False, verbose=0,
                            storage=str(storage))
    finally:
        ray.shutdown()
    assert summary["n_trials"] == 1 and summary["n_error"] == 0, summary
    ((trial, result),) = [(p.parent, json.loads(p.read_text())) for p in res.glob("*/result.json")
                          if not p.parent.name.startswith("_")]
    assert result["status"] == "ok" and result["config"]["pool_dir"] == f"{RUN_DIR}/."
    assert 0 <= result["fewshot"]["adv_acc"] <= result["fewshot"]["clean_acc"] <= 1
    pool = json.loads((trial / "pool.json").read_text())
    assert [m["out_dir"] for m in pool["members"]] == ["members/member_0_eps0.01", "members/member_1_eps8"]
    assert all((trial / m["adapter"]).is_file() for m in pool["members"])  # the pool's copies came back whole
    members = [d for d in (res / PREREQUISITES_DIR).iterdir() if (d / "args.yaml").is_file()]
    assert len(members) == 2
    for d in members:
        assert yaml.safe_load((d / "args.yaml").read_text())["adapter_path"] == f"{RUN_DIR}/adapter.pt"


def test_a_selected_merge_setting_reads_the_pool_of_its_candidates_folder(tmp_path):
    """A merge-search candidate that assembled its pool records ``pool_dir: {run_dir}/.``; its test trial runs
    in another folder (RESULTS/selected/...) and must read the candidate's pool, not look in its own folder."""
    from bench.sweep.merge_search import test_config

    config = resolve_config("amt", {**TINY_POOL, "pool_dir": f"{RUN_DIR}/.", "target_datasets": ["digits"]})
    selection = {"target": "digits", "config": {"method": "amt", **config.to_dict()},
                 "trial_dir": str(tmp_path / "candidate")}
    cfg = test_config(selection)
    assert Path(cfg.pool_dir).resolve() == (tmp_path / "candidate").resolve()
    assert test_config({**selection, "trial_dir": None}).pool_dir == f"{RUN_DIR}/."


@pytest.mark.slow  # a 3-node `ray start` cluster: 2 members, one killed with its node and resumed, then the merge
def test_pool_member_killed_with_its_node_resumes_on_another_and_is_merged(tmp_path, shards_root,
                                                                           ray_start_cluster):
    """Nodes without a shared disk (each its own folder; Tune's --storage the only shared place): a pool
    member's node is killed once the member's first epoch reached the storage; a new node joins, the member
    resumes there from its checkpoint, and the merging trial gets the pool through the storage. Nothing in
    RESULTS names a node's own folder."""
    from bench.prerequisites import PREREQUISITES_DIR

    # the member's epochs: the kill must land before its last (an idle CI machine runs one in 0.43 s, and
    # the storage brings an epoch to RESULTS seconds later: 6 epochs once all ended before a kill timed on it)
    EPOCHS = 24
    cluster = ray_start_cluster
    cluster.start("head", 0, head=True)
    first = cluster.start("worker1", 1)
    fixed = {k: v for k, v in TINY_POOL.items() if k not in ("backbone", "dataset")} | {"epochs": EPOCHS}
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump({"name": "pool", "methods": ["amt"], "dataset": "digits", "backbone": "tiny_cnn",
                                    "fixed": fixed, "max_concurrent_trials": 1, "max_failures": 3}))
    res, storage = tmp_path / "res", tmp_path / "storage"
    root = Path(__file__).resolve().parents[1]
    proc = cluster.sweep([sys.executable, "-m", "bench", "sweep", str(path), "--results", str(res), "--storage",
                          str(storage), "--address", cluster.address, "--no-leaderboard", "--data-root",
                          str(shards_root)], cwd=root)

    def member_epochs(where: Path, pattern: str) -> dict[str, int]:
        out = {}
        for p in where.glob(pattern):
            try:
                out[p.parent.name] = len(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                pass
        return out

    # timed on the node's own folder (written as the epoch ends): 2 epochs there mean epoch 1's report, and
    # its checkpoint in the storage, is done, so the member must resume from epoch 1 or later
    on_node = "session_*/artifacts/**/history.json"  # the members' (phase 1 runs nothing else)
    cluster.wait_for(proc, lambda: any(n >= 2 for n in member_epochs(first, on_node).values()),
                     "member's second epoch on its node", poll_s=0.1)
    assert cluster.kill(first) > 0
    killed = next(name for name, n in member_epochs(first, on_node).items() if n >= 2)
    second = cluster.start("worker2", 1)  # capacity comes back, as an autoscaler would bring it
    assert proc.wait(timeout=600) == 0, cluster.output(proc)[-4000:]

    member = res / PREREQUISITES_DIR / killed
    r = json.loads((member / "result.json").read_text())
    assert r["status"] == "ok" and [h["epoch"] for h in r["history"]] == list(range(EPOCHS))
    attempts = [json.loads(line) for line in (member / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) >= 2 and attempts[-1]["resumed"] and attempts[-1]["start_epoch"] >= 1, attempts
    assert attempts[-1]["start_epoch"] < EPOCHS, attempts  # it trained on the new node, not only finished there
    assert attempts[0]["node_id"] != attempts[-1]["node_id"]
    assert list(second.glob(f"session_*/artifacts/**/{killed}/result.json"))  # finished on the new worker

    ((trial, result),) = [(p.parent, json.loads(p.read_text())) for p in res.glob("*/result.json")
                          if not p.parent.name.startswith("_")]
    assert result["status"] == "ok" and result["config"]["pool_dir"] == f"{RUN_DIR}/."
    assert 0 <= result["fewshot"]["adv_acc"] <= result["fewshot"]["clean_acc"] <= 1, result["fewshot"]
    assert result["cost"]["pool"]["members"] == 2
    pool = json.loads((trial / "pool.json").read_text())
    assert all((trial / m["adapter"]).is_file() for m in pool["members"])
    assert [m["result"]["history"] for m in pool["members"] if m["key"] == killed] == [r["history"]]
    assert list(second.glob("session_*/artifacts/**/pool.json"))  # the merge ran on the new worker
    assert [m["adapter"] for m in result["method_summary"]["pool"]] == [m["adapter"] for m in pool["members"]]
    # no record of the suite names a node's own folder (they all lie under the cluster's root); W&B's own
    # files (its logs, the worker's command line in its run metadata) are W&B's, not results
    records = [f for f in res.rglob("*") if f.is_file() and "wandb" not in f.relative_to(res).parts]
    assert any(f.name == "pool.json" for f in records) and any(f.name == "attempts.jsonl" for f in records)
    for f in records:
        assert str(cluster.root) not in f.read_text(errors="replace"), f
