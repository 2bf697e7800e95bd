"""Per-domain merge search (bench.sweep.merge_search) and cross-domain evaluation: selection on validation episodes
per target, the sweep file's checks, the leaderboard's rows per target, and an amt pool of 2 plus a merge-only
sweep of 8 settings end to end on the embedded default."""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from bench.sweep.merge_search import SelectionError, select

ROOT = Path(__file__).resolve().parents[1]


def cand(lam, beta, val, adv=None, targets=None, seed=0, name="c"):
    config = {"method": "amt", "dataset": "src", "seed": seed, "merge_lambda": lam, "merge_beta": beta,
              "pool_dir": f"/r/{name}", "target_datasets": list(targets) if targets else None}
    if targets:
        row = {f"val_fewshot_acc@{t}": v for t, v in zip(targets, val)}
        row.update({f"val_fewshot_pgd_acc@{t}": a for t, a in zip(targets, adv or [None] * len(targets))})
    else:
        row = {"val_fewshot_acc": val, "val_fewshot_pgd_acc": adv}
    return {"id": name, "config": config, "history": [{"epoch": 0, **row}], "_dir": f"/r/{name}"}


SWEPT = ["merge_beta", "merge_lambda"]


@pytest.mark.parametrize("cands, expected", [
    # one target (the source's novel classes): the best clean validation accuracy wins
    ([cand(0.2, 1, 0.4, name="a"), cand(0.8, 1, 0.6, name="b"), cand(0.2, 12, 0.5, name="c")],
     {"src": ("b", {"merge_beta": 1, "merge_lambda": 0.8})}),
    # a tie on clean accuracy: PGD validation accuracy decides, then the first candidate
    ([cand(0.2, 1, 0.6, 0.1, name="a"), cand(0.8, 1, 0.6, 0.3, name="b"), cand(0.5, 1, 0.6, 0.3, name="c")],
     {"src": ("b", {"merge_beta": 1, "merge_lambda": 0.8})}),
    # named targets: each target its own setting, from its own validation accuracy
    ([cand(0.2, 1, [0.9, 0.1], targets=["x", "y"], name="a"), cand(0.8, 6, [0.2, 0.7], targets=["x", "y"], name="b")],
     {"x": ("a", {"merge_beta": 1, "merge_lambda": 0.2}), "y": ("b", {"merge_beta": 6, "merge_lambda": 0.8})}),
])
def test_select_best_validation_setting_per_target(cands, expected):
    sels = select(cands, SWEPT)
    assert {s["target"]: (s["trial"], s["settings"]) for s in sels} == expected
    assert all(s["candidates"] == len(cands) for s in sels)


def test_select_groups_by_everything_but_the_swept_settings():
    cands = [cand(0.2, 1, 0.4, seed=0, name="a"), cand(0.8, 1, 0.6, seed=0, name="b"),
             cand(0.2, 1, 0.9, seed=1, name="c"), cand(0.8, 1, 0.1, seed=1, name="d")]
    assert sorted(s["trial"] for s in select(cands, SWEPT)) == ["b", "c"]  # one selection per seed


def test_select_without_validation_of_a_target_is_one_line_error():
    c = cand(0.2, 1, [0.5], targets=["x"])
    c["history"][-1] = {"epoch": 0}  # the target had no usable val split
    with pytest.raises(SelectionError, match="target 'x' needs a val split"):
        select([c], SWEPT)


@pytest.mark.parametrize("text, message", [
    ("methods: [amt]\nmerge_search: true\nspace: {rank: {grid: [4, 8]}}\n", "space.rank shapes training"),
    ("methods: [amt, pmf]\nmerge_search: true\n", "methods pmf have no pool"),
    ("methods: [amt]\nmerge_search: yes please\n", "expected true or false"),
])
def test_merge_search_sweep_file_errors(tmp_path, text, message):
    from bench.sweep.space import SweepError, load_sweep

    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SweepError, match=message) as ei:
        load_sweep(path)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("name", ["paper_amt", "merge_search_smoke", "paper_pmf"])
def test_shipped_cross_domain_files_resolve(name):
    from bench.sweep.space import load_sweep

    spec = load_sweep(ROOT / "tune_spaces" / f"{name}.yaml")
    assert spec.merge_search == (name != "paper_pmf")
    if name == "paper_amt":  # the paper's three merge settings, per target domain, on 17 targets
        assert set(spec.space) == {"merge_lambda", "merge_beta", "trim_rho"}
        assert len(spec.fixed["target_datasets"]) == 17


def test_leaderboard_one_row_per_target_with_the_selected_settings(tmp_path):
    from bench.report.results import load_results
    from bench.report.stats import group_records

    block = {"ways": 5, "shots": 1, "episodes": 4, "clean_acc": 0.5, "adv_acc": 0.2}
    multi = {"id": "m", "method": "pmf", "dataset": "src", "config": {"target_datasets": ["x", "y"]},
             "fewshot": block, "fewshot_targets": {"x": block, "y": {**block, "clean_acc": 0.7}}, "status": "ok"}
    chosen = {"id": "s", "method": "amt", "dataset": "src", "config": {"target_datasets": ["x"]}, "status": "ok",
              "fewshot": block, "fewshot_targets": {"x": block},
              "merge_selection": {"target": "x", "settings": {"merge_lambda": 0.8, "trim_rho": 1.0}}}
    candidate = {"id": "c", "method": "amt", "dataset": "src", "config": {}, "status": "ok", "stage": "validation"}
    for name, rec in (("m", multi), ("s", chosen), ("c", candidate)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "result.json").write_text(json.dumps(rec))
    records, problems = load_results(tmp_path)
    assert not problems  # the validation-only candidate is no entry and no problem
    rows = {(r["method"], r["dataset"]): r for r in group_records(records)}
    assert set(rows) == {("pmf", "x"), ("pmf", "y"), ("amt", "x")}
    assert rows[("pmf", "y")]["fs_clean_acc"] == 0.7
    assert rows[("amt", "x")]["selected"] == "merge_lambda=0.8 trim_rho=1"


# --- end to end -------------------------------------------------------------------------------------------
@pytest.fixture
def two_domain_root(tmp_path, shards_root):
    """The digits shards twice: as the source and, under another name, as a second target domain."""
    root = tmp_path / "shards"
    root.mkdir()
    (root / "digits").symlink_to(shards_root / "digits")
    shutil.copytree(shards_root / "digits", root / "digits_b")
    return root


@pytest.mark.slow
def test_pool_of_two_and_a_merge_only_sweep_of_eight_settings(tmp_path, two_domain_root):
    """An amt pool of 2 members trained once, then the shipped merge_search_smoke.yaml over it by path
    (``pool_dir``) with two target domains: 8 validation-only candidates that train nothing, one test per
    target of the setting its validation selected, one leaderboard row per target listing that setting."""
    import os

    from bench.config import resolve_config
    from bench.report.leaderboard import build_leaderboard
    from bench.sweep.merge_search import SELECTED_DIR
    from bench.sweep.driver import run_sweep
    from bench.sweep.space import load_sweep
    from bench.trial import train_pool
    from methods.base import RUN_DIR

    doc = yaml.safe_load((ROOT / "tune_spaces" / "merge_search_smoke.yaml").read_text())
    doc["backbone"] = "tiny_cnn"
    pool_cfg = resolve_config("amt", {**doc["fixed"], "dataset": "digits", "backbone": "tiny_cnn"})
    assembled = train_pool(pool_cfg, tmp_path / "pool", data_root=two_domain_root, progress=False, track=False,
                           root=tmp_path / "members")
    assert assembled.pool_dir == f"{RUN_DIR}/."  # the pool is the trial's folder, recorded relative to it
    pool_dir = str(tmp_path / "pool")
    assert len(json.loads((Path(pool_dir) / "pool.json").read_text())["members"]) == 2
    doc["fixed"].update(target_datasets=["digits", "digits_b"], pool_dir=pool_dir)
    path = tmp_path / "ms.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = tmp_path / "res"
    os.environ["RAY_ADDRESS"] = "local"
    summary = run_sweep(load_sweep(path), res, data_root=two_domain_root, num_cpus=2, leaderboard=False, verbose=0)
    assert summary["n_trials"] == 8 and summary["n_error"] == 0, summary
    candidates = [json.loads(p.read_text()) for p in res.glob("*/result.json")]
    assert len(candidates) == 8
    for c in candidates:  # merge-only: no training of their own, validation per target, no test evaluation
        assert c["stage"] == "validation" and "fewshot" not in c and c["config"]["pool_dir"] == pool_dir
        row = c["history"][-1]
        assert 0 <= row["val_fewshot_acc@digits"] <= 1 and 0 <= row["val_fewshot_acc@digits_b"] <= 1
        assert c["cost"]["train_s"] == c["cost"]["pool"]["train_s"] and c["cost"]["pool"]["members"] == 2
    tested = [json.loads(p.read_text()) for p in (res / SELECTED_DIR).glob("*/result.json")]
    assert sorted(t["merge_selection"]["target"] for t in tested) == ["digits", "digits_b"]
    for t in tested:
        sel, target = t["merge_selection"], t["merge_selection"]["target"]
        assert sel["candidates"] == 8 and set(sel["settings"]) == {"merge_lambda", "merge_beta", "trim_rho"}
        best = max(c["history"][-1][f"val_fewshot_acc@{target}"] for c in candidates)
        assert sel["value"] == best  # the selected setting validated best on its own target
        assert t["config"]["target_datasets"] == [target] and list(t["fewshot_targets"]) == [target]
        assert {k: t["config"][k] for k in sel["settings"]} == sel["settings"]
        assert 0 <= t["fewshot"]["clean_acc"] <= 1 and t["fewshot"]["episodes"] == 6
    rows = build_leaderboard(res, console=False)
    listed = {(r["method"], r["dataset"]): r["selected"] for r in rows}
    assert set(listed) == {("amt", "digits"), ("amt", "digits_b")}
    assert all("merge_lambda=" in s and "trim_rho=" in s for s in listed.values())
    assert "selected settings" in (res / "leaderboard.md").read_text()
