"""bench.report.plots: every figure compares like with like (one panel per comparison group), a method keeps its
colour across figures, and few-shot points carry their 95% interval."""
from __future__ import annotations

import pytest

from bench.report import plots
from bench.report.stats import finish_rows, group_records


def _rec(name, method, *, lr, fewshot=False, eps=1 / 255, seed=0, robust=0.3, ci=0.05):
    rec = {"id": name, "method": method, "dataset": "digits", "backbone": "b", "seed": seed, "status": "ok",
           "config": {"method": method, "dataset": "digits", "seed": seed, "eps": eps, "lr": lr},
           "sweep": {"name": "s", "trial_id": name, "swept": {"lr": lr}}, "_path": f"/r/{name}/result.json",
           "history": [{"epoch": 0, "val_pgd_acc": 0.2, "lr": lr}, {"epoch": 1, "val_pgd_acc": 0.3, "lr": lr}]}
    if fewshot:
        rec["fewshot"] = {"ways": 5, "shots": 1, "episodes": 100, "clean_acc": 0.6, "clean_ci95": ci,
                          "adv_acc": robust, "adv_ci95": ci, "eps": eps}
    else:
        rec["metrics"] = {"clean_acc": 0.8, "pgd_acc": robust, "eps": eps, "pgd_steps": 5, "n_eval": 256}
    return rec


@pytest.fixture
def records():
    # supervised PGD at 1/255 and few-shot at 0.5/255: two comparison groups that must never share an axis
    return [_rec("rft0", "rft", lr=0.01, seed=0, robust=0.30), _rec("rft1", "rft", lr=0.01, seed=1, robust=0.34),
            _rec("al0", "autolora", lr=0.02, robust=0.40),
            _rec("pmf0", "pmf", lr=0.01, fewshot=True, eps=0.5 / 255, robust=0.31, ci=0.05),
            _rec("alfs0", "autolora", lr=0.02, fewshot=True, eps=0.5 / 255, robust=0.32, ci=0.04)]


@pytest.fixture
def figures(monkeypatch):
    """Each figure a plot function draws, kept instead of written."""
    drawn = {}

    def keep(fig, path, dpi):
        drawn[path.name] = fig
        return True

    monkeypatch.setattr(plots, "_save", keep)
    yield drawn
    for fig in drawn.values():
        plots._plt().close(fig)


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]


def _colours(fig):
    """method -> the colour of its points or lines in every panel of ``fig``."""
    import matplotlib.colors as mc

    out: dict[str, set] = {}
    for ax in _panels(fig):
        for artist in [*ax.lines, *ax.containers]:
            label = str(artist.get_label()).split(":")[0]
            line = artist.lines[0] if hasattr(artist, "lines") else artist
            if label and not label.startswith("_") and label != "Pareto front":
                out.setdefault(label, set()).add(mc.to_hex(line.get_color()))
    return out


def test_each_figure_has_one_panel_per_comparison_group(records, figures):
    rows = finish_rows(group_records(records))
    groups = sorted({r["group"] for r in rows})
    assert len(groups) == 2
    assert plots.plot_pareto(rows, plots.Path("pareto.png"))
    assert plots.plot_params(records, plots.Path("params.png"))
    assert plots.plot_curves(records, plots.Path("curves.png"))
    assert sorted(ax.get_title().split("\n")[0] for ax in _panels(figures["pareto.png"])) == groups
    assert sorted(ax.get_title() for ax in _panels(figures["params.png"])) == groups
    curve_titles = [ax.get_title() for ax in _panels(figures["curves.png"]) if "validation" in ax.get_title()]
    assert sorted(t.split("\n")[0] for t in curve_titles) == groups
    # the few-shot panel of params.png holds only few-shot points (0.5/255), the supervised one only supervised
    for ax in _panels(figures["params.png"]):
        methods = {str(c.get_label()) for c in ax.containers}
        assert methods == ({"pmf", "autolora"} if "5-way" in ax.get_title() else {"rft", "autolora"})


def test_a_method_keeps_its_colour_in_every_figure(records, figures):
    rows = finish_rows(group_records(records))
    plots.plot_pareto(rows, plots.Path("pareto.png"))
    plots.plot_params(records, plots.Path("params.png"))
    plots.plot_curves(records, plots.Path("curves.png"))
    seen: dict[str, set] = {}
    for fig in figures.values():
        for m, cs in _colours(fig).items():
            seen.setdefault(m, set()).update(cs)
    assert set(seen) >= {"rft", "autolora", "pmf"}
    assert all(len(cs) == 1 for cs in seen.values()), seen
    assert len({next(iter(cs)) for cs in seen.values()}) == len(seen)  # and no two methods share one
    # fixed by the registry, not by which methods a figure happens to show
    assert plots.method_colours(["rft"])["rft"] == plots.method_colours(["pmf", "amt", "rft"])["rft"]


def test_fewshot_points_carry_their_95_interval_supervised_the_std(records, figures):
    rows = finish_rows(group_records(records))
    plots.plot_pareto(rows, plots.Path("pareto.png"))
    bars = {}
    for ax in _panels(figures["pareto.png"]):
        for c in ax.containers:
            _, ybars = c.lines[2]  # the (x, y) bar collections of an errorbar
            seg = ybars.get_segments()[0]
            bars[(str(c.get_label()), "5-way" in ax.get_title())] = abs(seg[1][1] - seg[0][1]) / 2
    assert bars[("pmf", True)] == pytest.approx(5.0)  # ±ci95 = 0.05 -> 5 points
    assert bars[("autolora", True)] == pytest.approx(4.0)
    assert bars[("rft", False)] == pytest.approx(100 * 0.028284271, rel=1e-4)  # std of 0.30, 0.34
