"""The leaderboard page (leaderboard.html): one self-contained HTML file with a sortable table per comparison
group (a few lines of JavaScript, no network), the plots inlined as PNG data and the skipped files."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from bench.files import atomic_write
from bench.report.formats import INDICATOR_MEANINGS, cell, group_columns, reproduce_commands, row_groups

# Why the table is written by hand rather than by DataFrame.to_html / Styler: every cell carries its raw value
# in data-sort (the sorter's key) and each row its method in data-method, which neither can attach per cell.
_HTML_JS = r"""
function makeSortable(table) {
  var state = {col: -1, asc: true};
  function key(td) {
    var v = td.getAttribute('data-sort');
    if (v === null || v === '') return null;
    var f = parseFloat(v);
    return isNaN(f) ? v.toLowerCase() : f;
  }
  function sortBy(col) {
    var asc = state.col === col ? !state.asc : true;
    state = {col: col, asc: asc};
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (r, i) { r._i = i; });
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === null && y === null) return a._i - b._i;
      if (x === null) return 1;            /* empty cells last in both directions */
      if (y === null) return -1;
      var c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      if (c === 0) return a._i - b._i;
      return asc ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    var ths = table.tHead.rows[0].cells;
    for (var i = 0; i < ths.length; i++) {
      ths[i].setAttribute('aria-sort', i === col ? (asc ? 'ascending' : 'descending') : 'none');
    }
  }
  var ths = table.tHead.rows[0].cells;
  for (var i = 0; i < ths.length; i++) {
    (function (i) { ths[i].addEventListener('click', function () { sortBy(i); }); })(i);
  }
  return sortBy;
}
/* one sortable table per comparison group; sortLeaderboard(col, g) sorts group g's table (default the first) */
var sorters = Array.prototype.map.call(document.querySelectorAll('table.leaderboard'), makeSortable);
window.sortLeaderboard = function (col, g) { sorters[g || 0](col); };
"""

_HTML_CSS = """
body{font-family:system-ui,sans-serif;margin:1em;color:#222}
.scroll{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ccc;padding:2px 4px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;user-select:none;white-space:normal;max-width:6em;vertical-align:bottom}
td.s{white-space:normal;max-width:14em}
th[aria-sort=ascending]::after{content:" \\25B2"} th[aria-sort=descending]::after{content:" \\25BC"}
td.s{text-align:left} tr.pareto td:first-child{font-weight:bold}
td details code{display:block;white-space:pre-wrap;overflow-wrap:anywhere;text-align:left;font-size:11px}
td.better{background:#d9f2d9} td.worse{background:#f7d6d6}
td.suspect{background:#fdebc8} td.suspect details{white-space:normal;max-width:32em}
td.suspect summary{cursor:pointer} td.suspect li{margin:2px 0}
img{max-width:100%;margin-top:1em}
"""


def _html_table(index: int, label: str, rows: list[dict]) -> list[str]:
    cols = [c for c in group_columns(rows) if c[0] != "dataset"]  # the group's title starts with its data set
    out = [f"<h2>{html.escape(label)}</h2>", "<div class='scroll'>",
           f"<table class='leaderboard' id='leaderboard-{index}' data-group='{html.escape(label, quote=True)}'>"
           "<thead><tr>"]
    out += [f"<th data-key='{html.escape(k)}'>{html.escape(h)}</th>" for k, h, _ in cols]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cls = " class='pareto'" if r.get("pareto") else ""
        # the row's tooltip: the command that re-runs each of its trials
        commands = "\n".join(reproduce_commands(r))
        tip = f" title='{html.escape(commands, quote=True)}' data-reproduce='{html.escape(commands, quote=True)}'" \
            if commands else ""
        out.append(f"<tr{cls} data-method='{html.escape(str(r['method']))}'{tip}>")
        for k, _, kd in cols:
            v = r.get(k)
            sort = "" if v is None else (repr(float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool)
                                         else str(v))
            tdcls = []
            if kd == "str":
                tdcls.append("s")
            if k == "vs_baseline" and v in ("better", "worse"):
                tdcls.append(v)
            if k == "reliability" and v == "suspect":
                tdcls.append("suspect")
            c = f" class='{' '.join(tdcls)}'" if tdcls else ""
            text = _reliability_cell(r) if k == "reliability" and v == "suspect" else html.escape(cell(r, k, kd))
            if k == "commit" and commands:  # the commit opens onto the commands, to copy
                text = f"<details><summary>{text}</summary><code>{html.escape(commands)}</code></details>"
            out.append(f"<td{c} data-sort='{html.escape(sort, quote=True)}'>{text}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return out


def _reliability_cell(row: dict) -> str:
    """A suspect row's reliability cell: which indicators fired (the summary) and what each means (opened
    by a click, and as the cell's tooltip)."""
    fired = [f for f in (row.get("reliability_fired") or "").split(";") if f]
    meanings = [(f, INDICATOR_MEANINGS.get(f, "see docs/reliability.md")) for f in fired]
    tip = html.escape("; ".join(f"{f}: {m}" for f, m in meanings), quote=True)
    items = "".join(f"<li><b>{html.escape(f)}</b>: {html.escape(m)}</li>" for f, m in meanings)
    return (f"<details title='{tip}'><summary>{html.escape(cell(row, 'reliability', 'str'))}</summary>"
            f"<ul>{items}</ul>see docs/reliability.md for what to do</details>")


def write_html(rows: list[dict], path: Path, problems: list[tuple[str, str]], images: list[Path]) -> None:
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           "<title>Robust LoRA leaderboard</title>", f"<style>{_HTML_CSS}</style></head><body>",
           "<h1>Robust LoRA leaderboard</h1>",
           "<p>One table per comparison group (data set · task · threat model and eps): rows are ranked and "
           "compared only within their group. Accuracies in %, mean ± sample std over seeds. Click a column "
           "header to sort (again to reverse). vs baseline: Welch's t-test within the group, p &lt; 0.05, "
           "both n ≥ 2. commit: the code a row ran (+: with uncommitted changes); hover a row, or open its "
           "commit, for the <code>bench reproduce</code> command of each of its trials. reliability: "
           "<i>suspect</i> when an indicator of attack failure fired (click the cell for what it means), "
           "<i>ok</i> when none did.</p>"]
    for gi, (label, group_rows) in enumerate(row_groups(rows)):
        out += _html_table(gi, label, group_rows)
    for img in images:
        try:
            b64 = base64.b64encode(Path(img).read_bytes()).decode()
            out.append(f"<h2>{html.escape(Path(img).stem)}</h2><img alt='{html.escape(Path(img).stem)}' "
                       f"src='data:image/png;base64,{b64}'>")
        except OSError:
            pass
    if problems:
        out.append("<h2>Skipped results</h2><ul>")
        out += [f"<li><code>{html.escape(p)}</code>: {html.escape(w)}</li>" for p, w in problems]
        out.append("</ul>")
    out.append(f"<script>{_HTML_JS}</script></body></html>")
    atomic_write(path, "\n".join(out))


