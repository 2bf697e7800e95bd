"""The leaderboard's matplotlib figures (PNG): clean vs robust accuracy with each comparison group's Pareto front,
validation curves with the λ/η schedules per sweep, and robust accuracy against each swept setting."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from bench.files import atomic_write
from bench.report.formats import row_groups
from bench.report.results import get, num, record_robust, swept_settings


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


def plot_pareto(rows: list[dict], path: Path) -> bool:
    """One panel per comparison group (its Pareto front is the group's)."""
    groups = [(label, [r for r in rs if r["clean_acc"] is not None and r["robust_acc"] is not None])
              for label, rs in row_groups(rows)]
    groups = [(label, rs) for label, rs in groups if rs]
    if not groups:
        return False
    plt = _plt()
    ncol = min(3, len(groups))
    nrow = -(-len(groups) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4.5 * nrow), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, (ds, rs) in zip(axes.flat, groups):
        methods = sorted({r["method"] for r in rs})
        cmap = plt.get_cmap("tab10")
        for mi, m in enumerate(methods):
            pts = [r for r in rs if r["method"] == m]
            ax.errorbar([100 * r["clean_acc"] for r in pts], [100 * r["robust_acc"] for r in pts],
                        xerr=[100 * (r["clean_acc_std"] or 0) for r in pts],
                        yerr=[100 * (r["robust_acc_std"] or 0) for r in pts],
                        fmt="o", color=cmap(mi % 10), label=m, capsize=2, alpha=0.85)
        front = sorted([r for r in rs if r.get("pareto")], key=lambda r: r["clean_acc"])
        if front:
            ax.plot([100 * r["clean_acc"] for r in front], [100 * r["robust_acc"] for r in front], "k--", lw=1,
                    label="Pareto front")
            ax.scatter([100 * r["clean_acc"] for r in front], [100 * r["robust_acc"] for r in front], s=160,
                       facecolors="none", edgecolors="k", linewidths=1.2)
        metrics = sorted({r["robust_metric"] for r in rs if r["robust_metric"]})
        ax.set_title(ds, fontsize=9)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy (%) [{', '.join(metrics)}]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path, dpi=100)


_SCHEDULE_KEYS = ("lambda1", "lambda2", "lambda", "eta", "lam1", "lam2")


def plot_curves(records: list[dict], path: Path) -> bool:
    """Per sweep: validation robust accuracy (top) and λ/η (bottom) per epoch, one line per trial."""
    by_sweep: dict[str, list[dict]] = OrderedDict()
    for rec in records:
        hist = rec.get("history")
        if not isinstance(hist, list) or not any(isinstance(h, dict) for h in hist):
            continue
        by_sweep.setdefault(str(get(rec, "sweep", "name") or "(no sweep)"), []).append(rec)
    if not by_sweep:
        return False
    plt = _plt()
    n = len(by_sweep)
    fig, axes = plt.subplots(2, n, figsize=(6 * n, 7), squeeze=False)
    from matplotlib.ticker import MaxNLocator
    for ci, (sweep, recs) in enumerate(by_sweep.items()):
        ax1, ax2 = axes[0][ci], axes[1][ci]
        ax3 = ax2.twinx()  # η: the learning rate, on its own axis
        any_sched = False
        for rec in recs:
            hist = [h for h in rec["history"] if isinstance(h, dict)]
            label = str(get(rec, "sweep", "trial_id") or rec.get("id") or rec["method"])
            label = f"{rec['method']}:{label}"[:40]
            ep = [h.get("epoch", i) for i, h in enumerate(hist)]
            ys = [num(h.get("val_pgd_acc")) for h in hist]
            if any(y is not None for y in ys):
                ax1.plot([e for e, y in zip(ep, ys) if y is not None], [100 * y for y in ys if y is not None],
                         marker=".", label=label)
            for k in _SCHEDULE_KEYS:
                vs = [num(h.get(k)) for h in hist]
                if any(v is not None for v in vs):
                    any_sched = True
                    ax2.plot([e for e, v in zip(ep, vs) if v is not None], [v for v in vs if v is not None],
                             marker=".", label=f"{label} {k}")
            lrs = [num(h.get("lr")) for h in hist]
            if any(v is not None for v in lrs):
                ax3.plot([e for e, v in zip(ep, lrs) if v is not None], [v for v in lrs if v is not None],
                         ls=":", marker="x", label=f"{label} η")
        ax1.set_title(f"sweep {sweep}: validation robust accuracy")
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
    keys = swept_settings(records)
    if not keys:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(rec["sweep"]["swept"][k], record_robust(rec), rec["method"]) for rec in records
               if isinstance(get(rec, "sweep", "swept"), dict) and k in rec["sweep"]["swept"]
               and record_robust(rec) is not None]
        numeric = all(num(x) is not None for x, _, _ in pts)
        cats = sorted({str(x) for x, _, _ in pts})
        for m in sorted({m for _, _, m in pts}):
            mp = [(x, y) for x, y, mm in pts if mm == m]
            xs = [float(x) if numeric else cats.index(str(x)) for x, _ in mp]
            ax.scatter(xs, [100 * y for _, y in mp], label=m, alpha=0.8)
        if not numeric:
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, rotation=30, fontsize=7)
        elif pts and min(float(x) for x, _, _ in pts) > 0 and \
                max(float(x) for x, _, _ in pts) / min(float(x) for x, _, _ in pts) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(k)
        ax.set_ylabel("robust accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, dpi=90)
