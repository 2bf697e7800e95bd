"""The leaderboard's matplotlib figures (PNG): clean vs robust accuracy with each comparison group's Pareto front,
validation curves with the λ/η schedules per sweep, robust accuracy against each swept setting, and robust
accuracy against the attack budget (the reliability indicators' robustness curve).

Every figure has one panel per comparison group (never two threat models or tasks on one axis) and gives a
method the same colour in every figure."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from bench.files import atomic_write
from bench.report.formats import fmt_eps, row_groups
from bench.report.results import (comparison_group, get, group_label, num, record_curve, record_kind, record_robust,
                                  record_robust_ci95,
                                  swept_settings)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, dpi: int) -> bool:
    """Lay out, write atomically as PNG (a reader never sees half an image) and free the figure."""
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=dpi, format="png"))
    _plt().close(fig)
    return True


def method_colours(names) -> dict[str, tuple]:
    """method -> colour, fixed by the method registry's order (then unregistered names, sorted), so a method keeps
    its colour whichever methods a figure shows."""
    from methods.registry import list_methods

    order = list_methods()
    order += sorted({str(n) for n in names} - set(order))
    cmap = _plt().get_cmap("tab10" if len(order) <= 10 else "tab20")
    return {m: cmap(i % cmap.N) for i, m in enumerate(order)}


def _grid(n: int, ncol_max: int, w: float, h: float):
    plt = _plt()
    ncol = min(ncol_max, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(w * ncol, h * nrow), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _record_group(rec: dict) -> str:
    return group_label(comparison_group(rec))


def _bars(r: dict) -> tuple[float, float]:
    """A row's (x, y) bar half-widths in %: few-shot rows their 95% interval over episodes, others the std over
    seeds (0 for one seed)."""
    if r.get("kind") == "fewshot":
        return 100 * (r.get("fs_clean_ci95") or 0), 100 * (r.get("fs_robust_ci95") or 0)
    return 100 * (r.get("clean_acc_std") or 0), 100 * (r.get("robust_acc_std") or 0)


def plot_pareto(rows: list[dict], path: Path) -> bool:
    """One panel per comparison group (its Pareto front is the group's); bars: 95% interval over episodes
    (few-shot) or ± std over seeds (supervised)."""
    groups = [(label, [r for r in rs if r["clean_acc"] is not None and r["robust_acc"] is not None])
              for label, rs in row_groups(rows)]
    groups = [(label, rs) for label, rs in groups if rs]
    if not groups:
        return False
    colours = method_colours(r["method"] for r in rows)
    fig, axes = _grid(len(groups), 3, 5.5, 4.5)
    for ax, (ds, rs) in zip(axes, groups):
        for m in sorted({r["method"] for r in rs}):
            pts = [r for r in rs if r["method"] == m]
            ax.errorbar([100 * r["clean_acc"] for r in pts], [100 * r["robust_acc"] for r in pts],
                        xerr=[_bars(r)[0] for r in pts], yerr=[_bars(r)[1] for r in pts],
                        fmt="o", color=colours[m], label=m, capsize=3, alpha=0.85)
        front = sorted([r for r in rs if r.get("pareto")], key=lambda r: r["clean_acc"])
        if front:
            ax.plot([100 * r["clean_acc"] for r in front], [100 * r["robust_acc"] for r in front], "k--", lw=1,
                    label="Pareto front")
            ax.scatter([100 * r["clean_acc"] for r in front], [100 * r["robust_acc"] for r in front], s=160,
                       facecolors="none", edgecolors="k", linewidths=1.2)
        metrics = sorted({r["robust_metric"] for r in rs if r["robust_metric"]})
        fewshot = any(r.get("kind") == "fewshot" for r in rs)
        ax.set_title(f"{ds}\nbars: {'95% interval over episodes' if fewshot else '± std over seeds'}", fontsize=9)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy (%) [{', '.join(metrics)}]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, dpi=100)


_SCHEDULE_KEYS = ("lambda1", "lambda2", "lambda", "eta", "lam1", "lam2")


def plot_curves(records: list[dict], path: Path) -> bool:
    """Per comparison group and sweep: validation robust accuracy (top) and λ/η (bottom) per epoch, one line per
    trial in its method's colour (markers tell a method's trials apart)."""
    by_sweep: dict[str, list[dict]] = OrderedDict()
    for rec in records:
        hist = rec.get("history")
        if not isinstance(hist, list) or not any(isinstance(h, dict) for h in hist):
            continue
        sweep = str(get(rec, "sweep", "name") or "(no sweep)")
        by_sweep.setdefault((_record_group(rec), sweep), []).append(rec)
    if not by_sweep:
        return False
    plt = _plt()
    colours = method_colours(rec["method"] for recs in by_sweep.values() for rec in recs)
    n = len(by_sweep)
    fig, axes = plt.subplots(2, n, figsize=(6 * n, 7), squeeze=False)
    from matplotlib.ticker import MaxNLocator
    for ci, ((group, sweep), recs) in enumerate(by_sweep.items()):
        ax1, ax2 = axes[0][ci], axes[1][ci]
        ax3 = ax2.twinx()  # η: the learning rate, on its own axis
        any_sched = False
        for ti, rec in enumerate(recs):
            style = dict(color=colours[rec["method"]], marker="os^Dv<>p"[ti % 8], markersize=4)
            hist = [h for h in rec["history"] if isinstance(h, dict)]
            label = str(get(rec, "sweep", "trial_id") or rec.get("id") or rec["method"])
            label = f"{rec['method']}:{label}"[:40]
            ep = [h.get("epoch", i) for i, h in enumerate(hist)]
            ys = [num(h.get("val_pgd_acc")) for h in hist]
            if any(y is not None for y in ys):
                ax1.plot([e for e, y in zip(ep, ys) if y is not None], [100 * y for y in ys if y is not None],
                         label=label, **style)
            for k in _SCHEDULE_KEYS:
                vs = [num(h.get(k)) for h in hist]
                if any(v is not None for v in vs):
                    any_sched = True
                    ax2.plot([e for e, v in zip(ep, vs) if v is not None], [v for v in vs if v is not None],
                             label=f"{label} {k}", **style)
            lrs = [num(h.get("lr")) for h in hist]
            if any(v is not None for v in lrs):
                ax3.plot([e for e, v in zip(ep, lrs) if v is not None], [v for v in lrs if v is not None],
                         ls=":", label=f"{label} η", **style)
        ax1.set_title(f"{group}\nsweep {sweep}: validation robust accuracy", fontsize=9)
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("val PGD acc (%)")
        ax1.grid(alpha=0.3)
        if ax1.lines:
            ax1.legend(fontsize=6)
        ax2.set_title("λ (solid, left) / η learning rate (dotted, right)" if any_sched or ax3.lines
                      else "no λ/η logged")
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("λ")
        ax3.set_ylabel("η (lr)")
        ax2.grid(alpha=0.3)
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax2.lines or ax3.lines:
            h2, l2 = ax2.get_legend_handles_labels()
            h3, l3 = ax3.get_legend_handles_labels()
            ax2.legend(h2 + h3, l2 + l3, fontsize=6)
    return _save(fig, path, dpi=90)


def plot_params(records: list[dict], path: Path) -> bool:
    """Robust accuracy of each trial against each swept setting: one row of panels per comparison group (a
    few-shot accuracy at one eps never shares an axis with a supervised one at another); few-shot points carry
    their 95% interval over episodes."""
    by_group: dict[str, list[dict]] = OrderedDict()
    for rec in records:
        if isinstance(get(rec, "sweep", "swept"), dict) and record_robust(rec) is not None:
            by_group.setdefault(_record_group(rec), []).append(rec)
    panels = [(g, k, recs) for g, recs in by_group.items() for k in swept_settings(recs)]
    if not panels:
        return False
    colours = method_colours(rec["method"] for rec in records)
    fig, axes = _grid(len(panels), 3, 4.8, 4.2)
    for ax, (group, k, recs) in zip(axes, panels):
        pts = [(rec["sweep"]["swept"][k], rec) for rec in recs if k in rec["sweep"]["swept"]]
        numeric = all(num(x) is not None for x, _ in pts)
        cats = sorted({str(x) for x, _ in pts})
        for m in sorted({rec["method"] for _, rec in pts}):
            mp = [(x, rec) for x, rec in pts if rec["method"] == m]
            ax.errorbar([float(x) if numeric else cats.index(str(x)) for x, _ in mp],
                        [100 * record_robust(rec) for _, rec in mp],
                        yerr=[100 * (record_robust_ci95(rec) or 0) for _, rec in mp],
                        fmt="o", color=colours[m], label=m, capsize=3, alpha=0.8)
        xs = [float(x) for x, _ in pts] if numeric else []
        if not numeric:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=30, fontsize=7)
        elif xs and min(xs) > 0 and max(xs) / min(xs) > 50:
            ax.set_xscale("log")
        ax.set_title(group, fontsize=8)
        ax.set_xlabel(k)
        ax.set_ylabel("robust accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, dpi=90)


def plot_robustness_curve(records: list[dict], path: Path) -> bool:
    """One panel per comparison group: robust accuracy against eps for each method (mean ± std over seeds,
    from result.json's ``reliability.curve``: PGD at eps x 0.25, 0.5, 1, 2, 4 and unbounded), with the clean
    accuracy at eps 0 and chance marked. The budgets sit at even spacing, labelled with their eps: the
    unbounded point (eps 1) would squash the others on a linear axis. A working attack drives the curve
    down to chance; a curve that stays up is a failed attack (docs/reliability.md)."""
    import numpy as np

    groups: dict[str, dict[str, list[dict]]] = OrderedDict()
    for rec in records:
        curve = record_curve(rec)
        if curve is None or record_kind(rec) != "supervised":
            continue
        groups.setdefault(group_label(comparison_group(rec)), OrderedDict()).setdefault(rec["method"], []).append(curve)
    if not groups:
        return False
    plt = _plt()
    ncol = min(3, len(groups))
    nrow = -(-len(groups) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4.3 * nrow), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    cmap = plt.get_cmap("tab10")
    for ax, (label, by_method) in zip(axes.flat, groups.items()):
        ticks: list[str] = []
        chance = None
        for mi, (method, curves) in enumerate(sorted(by_method.items())):
            eps = curves[0]["eps"]
            same = [c for c in curves if c["eps"] == eps]  # seeds of one budget list (one config)
            ys = np.array([[100 * (num(v) if num(v) is not None else np.nan) for v in
                            [c.get("clean_acc"), *c["robust_acc"]]] for c in same])
            mean = np.nanmean(ys, 0)
            std = np.nanstd(ys, 0, ddof=1) if len(ys) > 1 else np.zeros_like(mean)
            xs = np.arange(len(mean))
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=2, color=cmap(mi % 10),
                        label=f"{method} (n={len(same)})")
            ax.scatter([0], [mean[0]], s=90, facecolors="none", edgecolors=cmap(mi % 10))
            if len(eps) + 1 > len(ticks):
                ticks = ["0 (clean)"] + [fmt_eps(e) if e < 1 else "unbounded" for e in eps]
            chance = num(same[0].get("chance")) if chance is None else chance
        if chance is not None:
            ax.axhline(100 * chance, color="grey", ls="--", lw=1, label="chance")
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=30, fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("eps (L-inf, pixel scale)")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, dpi=100)
