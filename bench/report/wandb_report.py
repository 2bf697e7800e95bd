"""W&B side of the leaderboard: a leaderboard run (job_type "leaderboard": a wandb.Table of the rows and the
Pareto plot) and a report comparing the trials' runs, built with wandb-workspaces' public Report API; saved when
W&B is online, else kept as wandb_report.json (the Report's public fields, one "type" per object) to save later."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from bench.files import atomic_write
from bench.report.formats import CSV_FIELDS
from bench.report.results import get, swept_settings
from bench.report.tracking import DEFAULT_SELECT_METRIC, history_key, summary_key


def table_columns_and_data(rows: list[dict]) -> tuple[list[str], list[list]]:
    cols = [c for c in CSV_FIELDS]
    data = []
    for r in rows:
        data.append([r.get(c) if not isinstance(r.get(c), (list, dict)) else json.dumps(r.get(c)) for c in cols])
    return cols, data


def log_wandb_leaderboard(rows: list[dict], out_dir: Path, pareto_png: Path | None, *,
                          group: str | None = None) -> list[str]:
    """A leaderboard run (job_type "leaderboard") logging a wandb.Table of the rows and the Pareto plot."""
    from bench.report import tracking
    notes: list[str] = []
    try:
        import wandb
        run, mode, notes = tracking.open_run(out_dir, run_id=None, name=f"leaderboard-{group or 'results'}",
                                             group=group, tags=["leaderboard"], job_type="leaderboard",
                                             config={"results": str(out_dir), "n_rows": len(rows)}, resume=None)
        if run is None:
            return notes + ["leaderboard not logged to W&B"]
        try:
            cols, data = table_columns_and_data(rows)
            payload: dict[str, Any] = {"leaderboard": wandb.Table(columns=cols, data=data)}
            if pareto_png is not None and Path(pareto_png).exists():
                payload["pareto"] = wandb.Image(str(pareto_png))
            run.log(payload)
            for r in rows:
                if r.get("rank") == 1:  # the best of each comparison group
                    run.summary[f"best/{r['group']}/method"] = r["method"]
                    run.summary[f"best/{r['group']}/robust_acc"] = r["robust_acc"]
        except Exception as exc:
            notes.append(f"W&B leaderboard logging failed: {exc!r}")
        run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
        run.finish()
        if mode == "offline" and run_dir is not None:
            tracking.wait_flushed(run_dir)
            notes.append(f"leaderboard run saved offline; upload later with: wandb sync {run_dir}")
    except Exception as exc:
        notes.append(f"W&B leaderboard run failed: {exc!r}")
    return notes


def build_report(rows: list[dict], records: list[dict], *, project: str | None = None,
                 entity: str | None = None):
    """The W&B report (wandb_workspaces.reports.v2.Report) comparing the runs of the results folder."""
    import wandb_workspaces.reports.v2 as wr
    from bench.report import tracking

    project = project or tracking._project()
    entity = entity if entity is not None else (os.environ.get("WANDB_ENTITY") or "")
    groups = sorted({str(get(r, "sweep", "name")) for r in records if get(r, "sweep", "name")})

    def runset(name: str, dataset: str | None = None, groupby: list[str] | None = None):
        kw: dict[str, Any] = dict(entity=entity, project=project, name=name)
        if dataset is not None:
            kw["filters"] = f"Config('dataset') = '{dataset}'"
        if groupby:
            kw["groupby"] = groupby
        return wr.Runset(**kw)

    blocks: list[Any] = [
        wr.H1(text="Adversarially robust LoRA fine-tuning: leaderboard"),
        wr.P(text=f"{len(rows)} configurations from {len(records)} trials"
                  + (f" (sweeps: {', '.join(groups)})" if groups else "")
                  + ". Robust accuracy is AutoAttack where computed, else PGD; few-shot rows use episodic "
                    "adversarial accuracy."),
        wr.H2(text="Leaderboard table"),
        wr.PanelGrid(runsets=[runset("leaderboard runs")],
                     panels=[wr.WeavePanelSummaryTable(table_name="leaderboard")]),
        wr.H2(text="Clean vs robust accuracy per data set"),
    ]
    for ds in sorted({r["dataset"] for r in rows}):
        fewshot = all(r["kind"] == "fewshot" for r in rows if r["dataset"] == ds)
        if fewshot:  # episodic methods: the trial summary holds the few-shot accuracies
            pairs = [("few-shot clean vs adversarial", "fewshot/clean_acc", "fewshot/adv_acc")]
        else:
            pairs = [("clean vs AutoAttack", "metrics/clean_acc", "metrics/autoattack_acc"),
                     ("clean vs PGD", "metrics/clean_acc", "metrics/pgd_acc")]
        pairs = [(t, summary_key(x), summary_key(y)) for t, x, y in pairs]  # the trials' W&B summary names
        blocks.append(wr.H3(text=ds))
        blocks.append(wr.PanelGrid(
            runsets=[runset(f"{ds} runs", dataset=ds)],
            panels=[wr.ScatterPlot(title=f"{ds}: {t}", x=wr.SummaryMetric(x), y=wr.SummaryMetric(y))
                    for t, x, y in pairs]))
    swept = swept_settings(records)
    pc_cols = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in swept]
    # each method's selection metric (its run summary is the best epoch's value, bench.report.tracking)
    selection = sorted({history_key(str(get(r, "config", "select_metric") or DEFAULT_SELECT_METRIC)) for r in records})
    test_pgd = summary_key("metrics/pgd_acc")
    pc_cols += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m)) for m in [test_pgd, *selection]]
    blocks += [
        wr.H2(text="Swept settings against robust accuracy"),
        wr.PanelGrid(runsets=[runset("sweep trials")],
                     panels=[wr.ParallelCoordinatesPlot(title="swept settings vs robust accuracy",
                                                        columns=pc_cols)]),
        wr.H2(text="Runs grouped by method"),
        wr.PanelGrid(runsets=[runset("by method", groupby=["config.method"])],
                     panels=[wr.LinePlot(title="validation (selection metrics)", x="epoch", y=selection),
                             wr.BarPlot(title="final robust accuracy", metrics=[wr.SummaryMetric(test_pgd)]),
                             wr.RunComparer()]),
    ]
    return wr.Report(project=project, entity=entity, title="Robust LoRA leaderboard",
                     description="Built by `bench leaderboard --wandb-report`.", blocks=blocks)



def report_to_dict(obj: Any) -> Any:
    """A Report (or any of its blocks, panels, runsets, metrics) as plain JSON data: each object's public init
    fields plus its class name under "type", so :func:`report_from_dict` can call the same constructors."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: report_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                  if f.init and not f.name.startswith("_")}
        return {"type": type(obj).__name__, **fields}
    if isinstance(obj, (list, tuple)):
        return [report_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): report_to_dict(v) for k, v in obj.items()}
    return obj


def report_from_dict(data: Any) -> Any:
    """Inverse of :func:`report_to_dict`: the wandb_workspaces.reports.v2 objects, through their constructors."""
    import wandb_workspaces.reports.v2 as wr

    if isinstance(data, list):
        return [report_from_dict(v) for v in data]
    if isinstance(data, dict) and "type" in data:
        cls = getattr(wr, data["type"], None)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ValueError(f"not a wandb_workspaces report type: {data['type']!r}")
        return cls(**{k: report_from_dict(v) for k, v in data.items() if k != "type"})
    if isinstance(data, dict):
        return {k: report_from_dict(v) for k, v in data.items()}
    return data


REPORT_FILE = "wandb_report.json"
REPORT_FORMAT = "wandb_workspaces.reports.v2.Report fields"


def make_wandb_report(rows: list[dict], records: list[dict], out_dir: Path) -> list[str]:
    """Build the report; save it when W&B is configured online, else write it to ``out_dir/wandb_report.json``."""
    from bench.report import tracking
    notes: list[str] = []
    try:
        report = build_report(rows, records)
    except Exception as exc:
        return [f"W&B report could not be built: {exc!r}"]
    if tracking.wanted_mode() == "online":
        try:
            report.save()
            return [f"W&B report saved: {report.url}"]
        except Exception as exc:
            notes.append(f"W&B report save failed ({exc!r}); writing it to a file instead")
    path = Path(out_dir) / REPORT_FILE
    try:
        atomic_write(path, json.dumps({"format": REPORT_FORMAT, "saved": False, "report": report_to_dict(report)},
                                      indent=1))
        notes.append(f"W&B report written to {path} (save it when online with "
                     f"`bench.report.wandb_report.save_report_file`)")
    except Exception as exc:
        notes.append(f"W&B report could not be written: {exc!r}")
    return notes


def load_report_file(path: Path):
    """The Report written offline by :func:`make_wandb_report` (call ``.save()`` on it once online)."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != REPORT_FORMAT:
        raise ValueError(f"{path}: not a report written by bench leaderboard (format {data.get('format')!r})")
    return report_from_dict(data["report"])


def save_report_file(path: Path, entity: str | None = None) -> str:
    """Save a report written offline to W&B (needs W&B online); returns its URL."""
    report = load_report_file(path)
    if entity:
        report.entity = entity
    report.save()
    return report.url
