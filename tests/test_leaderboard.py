"""bench.report.leaderboard from hand-written result.json fixtures with known numbers."""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from bench.report import leaderboard as lb
from bench.report.stats import pareto_front
from bench.report.tables import print_table
from bench.report.wandb_report import load_report_file, report_to_dict

FIX = Path(__file__).parent / "fixtures" / "leaderboard"


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "BENCH_WANDB"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "wandb_dir").mkdir()


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    problems: list = []
    rows = lb.build_leaderboard(FIX, out, console=False, problems=problems)
    return rows, problems, out


def _row(rows, dataset, method):
    (r,) = [r for r in rows if r["dataset"] == dataset and r["method"] == method]
    return r


def test_ranking_and_seed_aggregation(board):
    rows, _, _ = board
    assert len(rows) == 8
    digits = [r["method"] for r in rows if r["dataset"] == "digits"]
    assert digits == ["autolora", "rft", "vanilla", "amt"]  # by AutoAttack accuracy
    assert [r["rank"] for r in rows if r["dataset"] == "digits"] == [1, 2, 3, 4]
    al = _row(rows, "digits", "autolora")
    assert al["n"] == 3 and al["seeds"] == "0,1,2"
    assert al["robust_metric"] == "AutoAttack standard"
    assert al["clean_acc"] == pytest.approx(np.mean([0.88, 0.89, 0.90]))
    assert al["clean_acc_std"] == pytest.approx(np.std([0.88, 0.89, 0.90], ddof=1))
    assert al["robust_acc"] == pytest.approx(0.51) and al["autoattack_acc"] == pytest.approx(0.51)
    assert al["pgd_acc"] == pytest.approx(0.54) and al["pgd_steps"] == 10
    assert al["autoattack_version"] == "standard" and al["n_eval"] == 100 and al["device"] == "cpu"
    amt = _row(rows, "digits", "amt")
    assert amt["n"] == 1 and amt["clean_acc_std"] is None
    # PGD is the robust metric where AutoAttack is absent; AA stays absent, never 0
    c = _row(rows, "cifar10", "amt")
    assert c["robust_metric"] == "PGD-10" and c["autoattack_acc"] is None and c["rank"] == 1
    # few-shot rows use the episodic accuracies
    fs = _row(rows, "cub", "autolora")
    assert fs["kind"] == "fewshot" and fs["robust_acc"] == pytest.approx(0.355)
    assert fs["fs_adv_ci95"] == pytest.approx(0.03) and fs["fs_setting"].startswith("5-way 1-shot")


def test_welch_t_test_matches_scipy(board):
    rows, _, _ = board
    al = _row(rows, "digits", "autolora")
    ref = stats.ttest_ind([0.50, 0.52, 0.51], [0.38, 0.40, 0.39], equal_var=False)
    assert al["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert al["t_stat"] == pytest.approx(ref.statistic, rel=1e-9)
    assert al["vs_baseline"] == "better"
    va = _row(rows, "digits", "vanilla")
    ref = stats.ttest_ind([0.37, 0.39], [0.38, 0.40, 0.39], equal_var=False)
    assert va["p_value"] == pytest.approx(ref.pvalue) and va["vs_baseline"] == "n.s."
    assert _row(rows, "digits", "amt")["vs_baseline"] == "n<2"
    assert _row(rows, "digits", "rft")["vs_baseline"] == "baseline"
    assert _row(rows, "cifar10", "amt")["vs_baseline"] == "n<2"
    fs = _row(rows, "cub", "autolora")  # few-shot baseline is pmf
    ref = stats.ttest_ind([0.35, 0.36], [0.30, 0.32], equal_var=False)
    assert fs["p_value"] == pytest.approx(ref.pvalue)
    assert fs["vs_baseline"] == ("better" if ref.pvalue < 0.05 else "n.s.")
    assert _row(rows, "cub", "pmf")["vs_baseline"] == "baseline"


def test_pareto_front(board):
    rows, _, _ = board
    front = {r["method"] for r in rows if r["dataset"] == "digits" and r["pareto"]}
    assert front == {"autolora", "rft", "amt"}  # vanilla is dominated by rft
    assert {r["method"] for r in rows if r["dataset"] == "cifar10" and r["pareto"]} == {"amt"}
    assert pareto_front([(0.9, 0.4), (0.8, 0.5), (0.7, 0.3), (0.9, 0.4)]) == [True, True, False, True]


def test_malformed_results_reported_and_skipped(board, capsys):
    rows, problems, out = board
    by = {Path(p).parent.name: why for p, why in problems}
    assert set(by) == {"notjson", "nomethod", "failed", "missing"}
    assert "JSON" in by["notjson"] and "method" in by["nomethod"]
    assert "boom" in by["failed"] and "missing" in by["missing"]
    assert not any("broken" in p for r in rows for p in r["paths"])
    # an AMT pool member's result.json (under <trial>/members/) is part of its trial, not an entry
    assert not any("members" in p for r in rows for p in r["paths"])
    assert _row(rows, "digits", "rft")["n"] == 3
    md = (out / "leaderboard.md").read_text()
    assert "broken/notjson/result.json" in md
    # the console output names them too
    lb.build_leaderboard(FIX, out / "again", console=True)
    printed = capsys.readouterr().out
    assert "notjson" in printed and "autolora" in printed


def test_output_files(board):
    rows, _, out = board
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "pareto.png", "curves.png",
                 "params.png"):
        assert (out / name).stat().st_size > 0, name
    import csv
    with open(out / "leaderboard.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["method"] for t in table] == [r["method"] for r in rows]
    assert float(table[0]["robust_acc"]) == pytest.approx(rows[0]["robust_acc"])
    page = (out / "leaderboard.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained, no network
    assert "data:image/png;base64," in page


def test_cli_subcommand(tmp_path):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    lb.add_parser(sub)
    args = parser.parse_args(["leaderboard", str(FIX), "--out", str(tmp_path / "o")])
    assert args.func(args) == 0
    assert (tmp_path / "o" / "leaderboard.md").exists()
    args = parser.parse_args(["leaderboard", str(tmp_path / "nope")])
    assert args.func(args) == 2


def test_offline_wandb_leaderboard_run_contains_rows(tmp_path):
    notes: list = []
    rows = lb.build_leaderboard(FIX, tmp_path, wandb_log=True, console=False, notes=notes)
    assert any("wandb sync" in n for n in notes), notes
    (run_dir,) = list((tmp_path / "wandb").glob("offline-run-*"))
    tables = list((run_dir / "files" / "media" / "table").glob("leaderboard_*.table.json"))
    assert len(tables) == 1
    t = json.loads(tables[0].read_text())
    cols = t["columns"]
    got = [dict(zip(cols, d)) for d in t["data"]]
    assert [(g["dataset"], g["method"]) for g in got] == [(r["dataset"], r["method"]) for r in rows]
    al = [g for g in got if g["dataset"] == "digits" and g["method"] == "autolora"][0]
    assert al["robust_acc"] == pytest.approx(0.51) and al["n"] == 3 and al["vs_baseline"] == "better"
    assert list((run_dir / "files" / "media" / "images").glob("pareto_*.png"))
    # the run record itself (the .wandb transaction log) names the leaderboard job and the sweep group
    from bench.report.tracking import read_wandb_file
    recs = read_wandb_file(next(run_dir.glob("run-*.wandb")))
    runrec = [r.run for r in recs if r.WhichOneof("record_type") == "run"][0]
    assert runrec.job_type == "leaderboard" and runrec.run_group == "smoke"


def test_wandb_report_file_offline(tmp_path):
    notes: list = []
    lb.build_leaderboard(FIX, tmp_path, wandb_report=True, console=False, notes=notes)
    report_file = tmp_path / "wandb_report.json"
    assert report_file.exists(), notes
    saved = json.loads(report_file.read_text())
    assert saved["saved"] is False
    spec = saved["report"]
    assert spec["type"] == "Report" and spec["title"] == "Robust LoRA leaderboard"
    grids = [b for b in spec["blocks"] if b["type"] == "PanelGrid"]
    panels = [p for g in grids for p in g["panels"]]
    kinds = [p["type"] for p in panels]
    assert {"WeavePanelSummaryTable", "ParallelCoordinatesPlot", "RunComparer", "LinePlot", "BarPlot"} <= set(kinds)
    assert [p["table_name"] for p in panels if p["type"] == "WeavePanelSummaryTable"] == ["leaderboard"]
    scatters = [p for p in panels if p["type"] == "ScatterPlot"]
    assert {s["title"].split(":")[0] for s in scatters} == {"digits", "cifar10", "cub"}  # one per data set
    axes = {(s["x"]["type"], s["x"]["name"], s["y"]["name"]) for s in scatters}
    # the trials' W&B summary names (bench.report.tracking: test metrics under test/)
    assert ("SummaryMetric", "test/clean_acc", "test/autoattack_acc") in axes
    assert ("SummaryMetric", "test/fewshot_clean_acc", "test/fewshot_adv_acc") in axes  # cub is few-shot only
    (pc,) = [p for p in panels if p["type"] == "ParallelCoordinatesPlot"]
    assert {"type": "Config", "name": "lr"} in [c["metric"] for c in pc["columns"]]  # the swept setting
    assert {"type": "SummaryMetric", "name": "val/pgd_acc"} in [c["metric"] for c in pc["columns"]]  # selection
    runsets = [rs for g in grids for rs in g["runsets"]]
    assert any(rs["groupby"] == ["config.method"] for rs in runsets)
    assert "Config('dataset') = 'digits'" in [rs["filters"] for rs in runsets]
    # the file round-trips through the public constructors into the Report that was built
    rep = load_report_file(report_file)
    assert type(rep).__name__ == "Report" and len(rep.blocks) == len(spec["blocks"]) >= 5
    assert report_to_dict(rep) == spec
    with pytest.raises(ValueError, match="not a report"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"format": "something else", "report": {}}))
        load_report_file(bad)


def _chromium() -> str | None:
    for c in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(c)
        if p:
            return p
    return None


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-sync",
           "--disable-dev-shm-usage", "--mute-audio", f"--user-data-dir={profile}",
           "--virtual-time-budget=3000", "--dump-dom", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(profile)})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _order(dom: str, table_id: str) -> list[tuple[str, float]]:
    body = dom.split(f'id="{table_id}"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    out = []
    for tr in re.findall(r"<tr[^>]*>.*?</tr>", body, flags=re.S):
        method = re.search(r'data-method="([^"]*)"', tr).group(1)
        cells = re.findall(r'<td[^>]*data-sort="([^"]*)"', tr)
        out.append((method, cells))
    return out


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make browser installs Debian's)")
def test_html_sorts_in_headless_chromium(board, tmp_path):
    rows, _, out = board
    browser = _chromium()
    page = (out / "leaderboard.html").read_text()
    labels = list(dict.fromkeys(r["group"] for r in rows))  # one table per comparison group, in this order
    assert page.count("<table class='leaderboard'") == len(labels)
    gi = next(i for i, g in enumerate(labels) if g.startswith("digits"))
    table_id = f"leaderboard-{gi}"
    heads = re.findall(r"<th data-key='([^']+)'", page.split(f"id='{table_id}'", 1)[1].split("</thead>", 1)[0])
    ci = heads.index("clean_acc")
    group = [r["method"] for r in rows if r["group"] == labels[gi]]
    # 1) the page as written loads and shows every row of the digits group in leaderboard order
    plain = tmp_path / "plain.html"
    plain.write_text(page)
    dom = _dump_dom(browser, plain, tmp_path / "p1")
    base = _order(dom, table_id)
    assert [m for m, _ in base] == group
    # 2) a click on the "clean" header (the page's own handler) sorts ascending; a second click descending
    click = ("<script>var th=document.querySelector(\"#%s th[data-key='clean_acc']\");th.click();"
             "document.body.setAttribute('data-first', Array.prototype.map.call("
             "document.querySelectorAll('#%s tbody tr'), function(r){return r.cells[%d]"
             ".getAttribute('data-sort')}).join(','));th.click();</script></body>" % (table_id, table_id, ci))
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.replace("</body>", click))
    dom = _dump_dom(browser, clicked, tmp_path / "p2")
    first = [float(v) for v in re.search(r'data-first="([^"]*)"', dom).group(1).split(",")]
    assert first == sorted(first)
    after = _order(dom, table_id)
    vals = [float(c[ci]) for _, c in after]
    assert vals == sorted(vals, reverse=True)
    assert [m for m, _ in after] != [m for m, _ in base]  # the rows were reordered
    assert sorted(m for m, _ in after) == sorted(m for m, _ in base)
    assert 'aria-sort="descending"' in dom


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (make browser installs Debian's)")
def test_html_tables_fit_a_1400_pixel_window(board, tmp_path):
    """Every group's table, few-shot columns included, fits a 1400 x 900 window without a horizontal scroll."""
    _, _, out = board
    page = (out / "leaderboard.html").read_text()
    assert "few-shot" in page and "FS adv" in page  # the widest table is among them
    probe = ("<script>document.body.setAttribute('data-widths', [document.documentElement.scrollWidth, "
             "window.innerWidth].concat(Array.prototype.map.call(document.querySelectorAll('table.leaderboard'), "
             "function (t) { return t.getBoundingClientRect().right; })).join(','));</script></body>")
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", probe))
    profile = tmp_path / "p3"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,900",
           "--virtual-time-budget=3000", "--dump-dom", probed.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(profile)})
    assert res.returncode == 0, res.stderr[-2000:]
    page_width, window, *rights = [float(v) for v in re.search(r'data-widths="([^"]*)"', res.stdout).group(1)
                                   .split(",")]
    assert window == 1400
    assert len(rights) == page.count("<table class='leaderboard'") >= 3
    assert page_width <= 1400 and max(rights) <= 1400, (page_width, rights)


# --- like with like: comparison groups ----------------------------------------------------------------
def _result(folder: Path, name: str, method: str, *, dataset="digits", seed=0, eps=1 / 255, clean=0.8, robust=0.3,
            fewshot=None, targets=None):
    rec = {"id": name, "method": method, "dataset": dataset, "backbone": "b", "seed": seed, "status": "ok",
           "config": {"method": method, "dataset": dataset, "seed": seed, "eps": eps}}
    if fewshot is None:
        rec["metrics"] = {"clean_acc": clean, "pgd_acc": robust, "eps": eps, "pgd_steps": 5, "n_eval": 256}
    else:
        rec["fewshot"] = {"clean_acc": clean, "adv_acc": robust, "eps": eps, **fewshot}
    if targets is not None:
        rec["fewshot_targets"] = targets
    (folder / name).mkdir(parents=True)
    (folder / name / "result.json").write_text(json.dumps(rec))


def test_rows_are_ranked_within_comparison_groups(tmp_path):
    res = tmp_path / "results"
    _result(res, "rft1", "rft", clean=0.8, robust=0.30)
    _result(res, "al1", "autolora", clean=0.8, robust=0.35)
    _result(res, "rft8", "rft", eps=8 / 255, clean=0.7, robust=0.10)  # another threat model
    _result(res, "amt", "amt", clean=0.5, robust=0.45, fewshot={"ways": 5, "shots": 1})  # few-shot: never above rft
    _result(res, "amt5", "amt", clean=0.6, robust=0.5, fewshot={"ways": 5, "shots": 5})
    _result(res, "pmf", "pmf", clean=0.45, robust=0.2, fewshot={"ways": 5, "shots": 1},
            targets={"cub": {"ways": 5, "shots": 1, "clean_acc": 0.4, "adv_acc": 0.1},
                     "cars": {"ways": 5, "shots": 1, "clean_acc": 0.3, "adv_acc": 0.05}})
    _result(res, "amtx", "amt", clean=0.5, robust=0.45, fewshot={"ways": 5, "shots": 1},
            targets=[{"dataset": "cub", "ways": 5, "shots": 1, "clean_acc": 0.42, "adv_acc": 0.2}])
    out = io.StringIO()
    rows = lb.build_leaderboard(res, tmp_path / "board", console=False)
    print_table(rows, [], file=out)
    groups = {g: [(r["method"], r["rank"]) for r in rows if r["group"] == g] for g in dict.fromkeys(
        r["group"] for r in rows)}
    assert groups == {
        # the group's title names the headline attack: rows measured by different attacks are never ranked together
        "cars · 5-way 1-shot · Linf eps 1/255 · PGD": [("pmf", 1)],
        "cub · 5-way 1-shot · Linf eps 1/255 · PGD": [("amt", 1), ("pmf", 2)],
        "digits · 5-way 1-shot · Linf eps 1/255 · PGD": [("amt", 1), ("pmf", 2)],
        "digits · 5-way 5-shot · Linf eps 1/255 · PGD": [("amt", 1)],
        "digits · supervised · Linf eps 1/255 · PGD-5": [("autolora", 1), ("rft", 2)],
        "digits · supervised · Linf eps 8/255 · PGD-5": [("rft", 1)],
    }
    cub_amt = next(r for r in rows if r["dataset"] == "cub" and r["method"] == "amt")
    assert cub_amt["source_dataset"] == "digits" and cub_amt["robust_acc"] == pytest.approx(0.2)
    assert next(r for r in rows if r["group"].startswith("digits · 5-way 5"))["vs_baseline"] == "no pmf"
    # every output shows one table per group, with every row
    md = (tmp_path / "board" / "leaderboard.md").read_text()
    page = (tmp_path / "board" / "leaderboard.html").read_text()
    printed = out.getvalue()
    for g, members in groups.items():
        assert f"## {g}" in md and html.escape(g) in page and g in printed
    assert md.count("\n| ") - md.count("\n| rank") == len(rows)  # data rows (header rows excluded)
    assert page.count("<table class='leaderboard'") == len(groups) and page.count("<tr data-method") + page.count(
        "<tr class='pareto' data-method") == len(rows)
    assert len(re.findall(r"│ autolora +│", printed)) == 1 and len(re.findall(r"│ pmf +│", printed)) == 3
    with open(tmp_path / "board" / "leaderboard.csv") as fh:
        assert [t["group"] for t in csv.DictReader(fh)] == [r["group"] for r in rows]  # W&B's table has them too


# (result.json's folder under RESULTS, files beside the "members" folder's parent, skipped?)
SKIP_CASES = [
    ("trial_a", (), False),
    ("_tune/sweep/trial_a", (), True),  # Tune's storage: copies of trial files
    ("_members/eps0.03_ab12", (), True),  # a sweep's AMT member cache
    ("_prerequisites/amt_member_0", (), True),  # a two-phase sweep's pool member runs
    ("trial_a/wandb/offline-run-x/files", (), True),
    ("amt_trial/members/member_0", ("pool.json",), True),  # a single `bench run` AMT pool
    ("amt_trial/members/member_0", ("args.yaml",), True),
    ("study/members/trial_b", (), False),  # a folder merely named "members" is not a trial's pool
]


@pytest.mark.parametrize("folder,markers,skipped", SKIP_CASES)
def test_skip_rules(tmp_path, folder, markers, skipped):
    from bench.report.results import load_results, skipped_folder
    res = tmp_path / "results"
    _result(res, folder, "rft")
    for m in markers:
        (res / folder.split("/members/")[0] / m).write_text("{}")
    assert skipped_folder(res / folder / "result.json", res) is skipped
    records, problems = load_results(res)
    assert (len(records) == 0) is skipped
    assert not [p for p, _ in problems if "member_0" in p or "trial_a" in p]  # a skipped file is no problem


def test_headline_is_robust_acc_and_groups_split_by_attack(tmp_path):
    res = tmp_path / "results"
    _result(res, "rft_pgd", "rft", clean=0.8, robust=0.30)
    _result(res, "rft_aa", "rft", seed=1, clean=0.8, robust=0.30)
    rec = json.loads((res / "rft_aa" / "result.json").read_text())
    rec["metrics"].update(autoattack_acc=0.25, autoattack_version="apgd-ce", robust_acc=0.2,
                          robust_attack="AutoAttack apgd-ce")
    (res / "rft_aa" / "result.json").write_text(json.dumps(rec))
    rows = lb.build_leaderboard(res, tmp_path / "board", console=False)
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {"digits · supervised · Linf eps 1/255 · PGD-5",
                             "digits · supervised · Linf eps 1/255 · AutoAttack apgd-ce"}
    aa = by_group["digits · supervised · Linf eps 1/255 · AutoAttack apgd-ce"]
    assert aa["robust_acc"] == pytest.approx(0.2) and aa["robust_metric"] == "AutoAttack apgd-ce"

# A result.json whose accuracies cannot be ranked: (what is written, field name and reason in the skip line).
BAD_ACCURACY_CASES = [
    ({"metrics": {"clean_acc": 0.0938, "pgd_acc": 0.1562}}, "metrics.pgd_acc=0.1562 is above clean_acc=0.0938"),
    ({"metrics": {"clean_acc": 89.84, "pgd_acc": 41.0}}, "metrics.clean_acc=89.84 is outside [0, 1] (a percentage?"),
    ({"metrics": {"clean_acc": 0.9, "pgd_acc": float("nan")}}, "metrics.pgd_acc=nan is not a finite number"),
    ({"metrics": {"clean_acc": "0.9"}}, "metrics.clean_acc='0.9' is not a number"),
    ({"metrics": {"clean_acc": 0.9, "autoattack_acc": None}}, "metrics.autoattack_acc=None is not a number"),
    ({"metrics": {"clean_acc": 0.9, "pgd_acc": -0.1}}, "metrics.pgd_acc=-0.1 is outside [0, 1]"),
    ({"fewshot": {"ways": 5, "shots": 1, "clean_acc": 0.6, "adv_acc": 30.5}}, "fewshot.adv_acc=30.5 is outside [0, 1]"),
    ({"fewshot": {"ways": 5, "shots": 1, "clean_acc": 0.6, "adv_acc": 0.3},
      "fewshot_targets": {"cub": {"clean_acc": 0.5, "adv_acc": float("inf")}}},
     "fewshot_targets.cub.adv_acc=inf is not a finite number"),
    ({"metrics": {"clean_acc": True}}, "metrics.clean_acc=True is not a number"),
]


@pytest.mark.parametrize("blocks, reason", BAD_ACCURACY_CASES)
def test_skip_result_with_bad_accuracy(tmp_path, blocks, reason):
    """Percentages, NaN, infinities, text and null in an accuracy: the result is skipped, listed with its path
    and the reason (console, leaderboard.md), and ranks nowhere; a fraction beside it ranks."""
    res = tmp_path / "results"
    good = {"id": "g", "method": "rft", "dataset": "digits", "seed": 0, "status": "ok",
            "metrics": {"clean_acc": 0.9, "pgd_acc": 0.4, "pgd_steps": 10, "eps": 8 / 255, "n_eval": 100}}
    (res / "good").mkdir(parents=True)
    (res / "good" / "result.json").write_text(json.dumps(good))
    bad = {**{k: v for k, v in good.items() if k != "metrics"}, "id": "b", "method": "autolora", **blocks}
    (res / "bad").mkdir()
    (res / "bad" / "result.json").write_text(json.dumps(bad))  # json writes NaN/Infinity, as Python reads them
    problems: list = []
    rows = lb.build_leaderboard(res, tmp_path / "out", console=False, problems=problems)
    assert [r["method"] for r in rows] == ["rft"]
    assert problems == [(str(res / "bad" / "result.json"), problems[0][1])]
    assert reason in problems[0][1], problems[0][1]
    md = (tmp_path / "out" / "leaderboard.md").read_text()
    assert "## Skipped results" in md and "bad/result.json" in md and reason in md
