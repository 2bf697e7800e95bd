"""bench.perf arithmetic that turns measured step times into the figures docs/perf.md quotes."""
from __future__ import annotations

import pytest

from bench.perf import _loader_vs_training
from bench.perf.paper_step import TABLE2_SEEDS, TABLE2_SETS, estimate


def _steps(scale: float = 1.0, batch: int = 128, amt: bool = True) -> dict:
    row = {"step_s": 2.0 * scale, "fwd_s": 0.1 * scale, "fwd_input_grad_s": 0.2 * scale}
    steps = {"autolora/fp32_eager": dict(row), "rft/fp32_eager": {k: v / 2 for k, v in row.items()},
             "autolora/fast": {k: v / 4 for k, v in row.items()}}  # fast wins for autolora only
    if amt:
        steps["amt/fast"] = {"step_s": 0.5 * scale}
    return steps


def test_table2_hours_scale_with_the_step_and_use_the_fastest_variant():
    one, two = estimate(_steps(1.0), 128), estimate(_steps(2.0), 128)
    assert two["table2_gpu_hours"] == pytest.approx(2 * one["table2_gpu_hours"], rel=1e-3)
    rows = one["table2_gpu_hours_by_set_method"]
    assert len(rows) == len(TABLE2_SETS) * 3
    # twins is costed as rft; autolora's fast variant (a quarter of fp32) is cheaper than rft's eager half
    assert rows["cifar10/twins"] == rows["cifar10/rft"]
    assert rows["cifar10/autolora"] < rows["cifar10/rft"]
    # by hand for one cell: rft, cifar10, per image step 1/128 s, fwd .05/128, grad .1/128
    s, f, g = 1.0 / 128, 0.05 / 128, 0.1 / 128
    n, t = TABLE2_SETS["cifar10"]
    sec = 60 * (0.95 * n * s + 0.05 * n * (10 * g + 2 * f)) + t * (10 * g + f) \
        + t * (100 * g + 0.5 * (1800 * g + 5000 * f))
    assert rows["cifar10/rft"] == pytest.approx(sec * TABLE2_SEEDS / 3600, abs=1e-3)
    assert one["amt_pool_gpu_hours"] == pytest.approx(4 * 30 * (2000 + 12) * 0.5 / 3600, abs=1e-2)


@pytest.mark.parametrize("steps, expect_table2, expect_amt", [
    ({}, False, False),
    (_steps(amt=False), True, False),
    ({"amt/fast": {"step_s": 1.0}}, False, True),  # the pool alone
])
def test_estimate_reports_only_what_was_measured(steps, expect_table2, expect_amt):
    out = estimate(steps, 128)
    assert ("table2_gpu_hours" in out) is expect_table2
    assert ("amt_pool_gpu_hours" in out) is expect_amt


def test_loader_headroom_against_the_paper_step():
    report = {"loader": {"rows": [{"image_size": 224, "workers": 4, "shards_images_per_s": 1000.0},
                                  {"image_size": 32, "workers": 4, "shards_images_per_s": 9000.0}]},
              "paper_step": {"batch": 128, "steps": {"autolora/fp32_eager": {"step_s": 1.28},
                                                     "autolora/fast": {"step_s": 0.64}}}}
    _loader_vs_training(report)
    lv = report["loader_vs_training"]
    assert lv["paper_step_images_per_s"] == pytest.approx(200.0)
    assert lv["paper_rows"] == [{"workers": 4, "headroom": pytest.approx(5.0)}]


def test_step_flops_counts_the_attack_and_the_training_forwards():
    import torch

    from bench.backbones import create_backbone
    from bench.perf.paper_step import step_flops

    model = create_backbone("tiny_cnn", 10).eval()
    x = torch.rand(2, 3, 32, 32)
    rft, autolora = step_flops(model, x, "rft", 10), step_flops(model, x, "autolora", 10)
    assert rft > 0 and autolora / rft == pytest.approx(26 / 23)
    assert step_flops(model, x, "rft", 0) == pytest.approx(rft * 3 / 23)
    assert step_flops(model, x, "amt", 10) is None


def test_interrupted_perf_records_no_figure(tmp_path, monkeypatch, capsys):
    """Ctrl-C inside a measurement (an interrupted Tune run surfaces as KeyboardInterrupt too,
    bench.sweep.driver.SweepInterrupted) ends `bench perf` with one line and exit 130; no JSON is printed or
    written, since a measurement cut short is no figure."""
    import bench.perf.loader as loader
    from bench.cli import main

    def interrupted(quick):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "loader_benchmark", interrupted)
    out = tmp_path / "perf.json"
    assert main(["perf", "--only", "loader", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert not out.exists() and captured.out == ""
    assert captured.err.strip().splitlines()[-1].startswith("bench perf: interrupted; no figures recorded")
