"""A self-contained HTML page for a recorded run: summary tables and a waterfall chart.

No external assets: the data is embedded as JSON and a small script draws the waterfall as SVG.
When drawing is done it sets ``data-rendered`` on ``<body>`` to the number of bars, which the
tests read back from headless Chromium.
"""

from __future__ import annotations

import html
import json

from .report import Analysis, TraceData

__all__ = ["render_html"]

MAX_ROWS = 800

_SCRIPT = """
(() => {  // a scope of its own: names like `top` would clash with window globals
const data = JSON.parse(document.getElementById('trace-data').textContent);
const svgNS = 'http://www.w3.org/2000/svg';
const rowH = 14, left = 230, width = 1000, top = 24;
const svg = document.getElementById('waterfall');
const t0 = data.t0, span = Math.max(data.t1 - t0, 1e-6);
const x = t => left + (t - t0) / span * width;
svg.setAttribute('height', top + data.rows.length * rowH + 10);
svg.setAttribute('width', left + width + 20);
function el(name, attrs, text) {
  const node = document.createElementNS(svgNS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  svg.appendChild(node);
  return node;
}
for (let i = 0; i <= 10; i++) {
  const t = t0 + span * i / 10;
  el('line', {x1: x(t), x2: x(t), y1: top - 6, y2: top + data.rows.length * rowH, class: 'grid'});
  el('text', {x: x(t), y: top - 10, class: 'tick'}, (span * i / 10).toFixed(2) + ' s');
}
let bars = 0;
data.rows.forEach((row, i) => {
  const y = top + i * rowH;
  el('text', {x: left - 6, y: y + 10, class: 'label'}, row.label);
  if (row.queued < row.start) {
    el('rect', {x: x(row.queued), y: y + 2, width: Math.max(x(row.start) - x(row.queued), 0.5), height: rowH - 4,
                class: 'queue'});
  }
  const bar = el('rect', {x: x(row.start), y: y + 2, width: Math.max(x(row.end) - x(row.start), 1),
                          height: rowH - 4, class: row.kind + (row.error ? ' error' : '')});
  const tip = document.createElementNS(svgNS, 'title');
  tip.textContent = row.label + ': ' + (row.end - row.start).toFixed(3) + ' s'
    + (row.queued < row.start ? ', queued ' + (row.start - row.queued).toFixed(3) + ' s' : '');
  bar.appendChild(tip);
  bars += 1;
});
document.body.dataset.rendered = String(bars);
})();
"""

_STYLE = """
body { font: 13px system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 20px; }
td, th { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.label { font-size: 10px; text-anchor: end; fill: #333; }
.tick { font-size: 10px; text-anchor: middle; fill: #666; }
.grid { stroke: #eee; }
.root { fill: #3b6fd8; } .cell { fill: #9a9a9a; } .sub { fill: #2e9d5b; }
.queue { fill: #f2c14e; opacity: 0.7; } .error { fill: #d9423a; }
"""


def _rows(data: TraceData) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    depth_of = {run.run_id: run.depth for run in data.runs.values()}
    items: list[tuple[float, dict[str, object]]] = []
    turn_of_root: dict[str, int] = {}
    for call in sorted(data.calls, key=lambda c: c.queued):
        if call.role == "root":
            turn_of_root[call.run_id] = turn_of_root.get(call.run_id, 0) + 1
            label = f"d{call.depth} turn {turn_of_root[call.run_id]} root {call.model}"
        else:
            label = f"d{call.depth} sub {call.model}"
        items.append((call.queued, {"label": label[:40], "kind": "root" if call.role == "root" else "sub",
                                    "queued": call.queued, "start": call.started, "end": call.ended,
                                    "error": call.error is not None}))
    for cell in data.cells:
        label = f"d{depth_of.get(cell.run_id, 0)} turn {cell.turn} sandbox"
        items.append((cell.started, {"label": label, "kind": "cell", "queued": cell.started, "start": cell.started,
                                     "end": cell.ended, "error": cell.error}))
    items.sort(key=lambda item: item[0])
    rows = [row for _, row in items]
    if len(rows) > MAX_ROWS:  # keep roots and cells, thin out the sub-calls evenly
        keep = [r for r in rows if r["kind"] != "sub"]
        subs = [r for r in rows if r["kind"] == "sub"]
        step = max(1, len(subs) // max(1, MAX_ROWS - len(keep)))
        rows = sorted(keep + subs[::step], key=lambda r: float(r["queued"]))  # type: ignore[arg-type]
    return rows


def _money(value: object) -> str:
    return "unknown" if value is None else f"${float(value):.4f}"  # type: ignore[arg-type]


def render_html(data: TraceData, analysis: Analysis, *, title: str = "rlmflow run") -> str:
    """The report page as a string."""
    rows = _rows(data)
    t0 = min((float(r["queued"]) for r in rows), default=0.0)  # type: ignore[arg-type]
    t1 = max((float(r["end"]) for r in rows), default=1.0)  # type: ignore[arg-type]
    payload = json.dumps({"rows": rows, "t0": t0, "t1": t1}).replace("</", "<\\/")
    split_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{seconds:.2f} s</td>"
        f"<td>{(seconds / analysis.duration * 100 if analysis.duration else 0):.1f}%</td></tr>"
        for name, seconds in analysis.time_split.items()
    )
    path_rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{seconds:.2f} s</td></tr>" for label, seconds in analysis.critical_path
    )
    cost_rows = "".join(
        f"<tr><td>depth {g['depth']} {html.escape(str(g['model']))}</td><td>{g['calls']}</td>"
        f"<td>{g['input_tokens']:,}</td><td>{g['output_tokens']:,}</td>"
        f"<td>{_money(g['cost_usd'])}</td></tr>"
        for g in analysis.cost_by_depth_model
    )
    totals = analysis.totals
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body data-rendered="0">
<h1>{html.escape(title)}</h1>
<p>{analysis.duration:.2f} s, {totals['calls']} model calls ({totals['sub_calls']} sub-calls),
{totals['runs']} run(s) to depth {totals['max_depth']}.
Bars: <span style="color:#3b6fd8">root model</span>, <span style="color:#9a9a9a">sandbox cell</span>,
<span style="color:#2e9d5b">sub-call</span>, <span style="color:#d9a400">queued</span>,
<span style="color:#d9423a">failed</span>.</p>
<h2>Timeline</h2>
<svg id="waterfall" xmlns="http://www.w3.org/2000/svg"></svg>
<h2>Critical path</h2><table><tr><th>segment</th><th>time</th></tr>{path_rows}</table>
<h2>Time split (top-level run)</h2><table><tr><th>where</th><th>time</th><th>share</th></tr>{split_rows}</table>
<h2>Cost by depth and model</h2>
<table><tr><th>lane</th><th>calls</th><th>input</th><th>output</th><th>cost</th></tr>{cost_rows}</table>
<script type="application/json" id="trace-data">{payload}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
