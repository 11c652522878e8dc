"""Reading a recorded run back: where the time and the money went.

Input is a trajectory (``Trajectory`` JSONL) or an OpenTelemetry span export in OTLP JSON: a
collector's camelCase ``{"resourceSpans": ...}`` documents (one, or one per line), the same in
protobuf's snake_case field names, or Phoenix's span export (``{"data": [span, ...]}`` with
snake_case keys, as ``GET /v1/projects/{project}/spans/otlpv1`` returns it). All become the same
:class:`TraceData`:
runs, turns, cells and calls on one wall-clock axis. :func:`analyse` then computes the critical
path, the time split of the top-level run, fan-out width per turn and cost by depth and model.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import attributes as attr

__all__ = ["Analysis", "TraceData", "analyse", "load_trace", "normalise_span", "trace_from_spans"]


@dataclass
class Call:
    run_id: str
    role: str
    depth: int
    model: str
    queued: float
    started: float
    ended: float
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0
    error: str | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass
class Cell:
    run_id: str
    turn: int
    started: float
    ended: float
    error: bool = False


@dataclass
class Run:
    run_id: str
    depth: int
    parent: str | None
    started: float
    ended: float
    error: str | None = None


@dataclass
class TraceData:
    runs: dict[str, Run] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)


# -- loading ----------------------------------------------------------------------------------------
def load_trace(path: str | Path) -> TraceData:
    """Read a trajectory JSONL or an OTLP-JSON span export."""
    text = Path(path).read_text(encoding="utf-8")
    records = _json_documents(text)
    if not any(key in r for r in records for key in _OTLP_KEYS):
        return _from_trajectory(records)
    records = [_camel(r) for r in records]
    if any("resourceSpans" in r for r in records):
        return trace_from_spans(span for r in records for span in _otlp_spans(r))
    if any(isinstance(r.get("data"), list) for r in records):  # Phoenix's export: pages of spans
        return trace_from_spans(span for r in records for span in r.get("data") or [])
    if records and all("spanId" in r for r in records):  # bare spans, one per line or a list
        return trace_from_spans(records)
    raise ValueError("no spans found in the OTLP JSON")


# top-level keys of span exports: a collector's, protobuf's names, Phoenix's pages, bare spans
_OTLP_KEYS = ("resourceSpans", "resource_spans", "data", "spanId", "span_id")


def _camel_key(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _camel(value: Any) -> Any:
    """protobuf's snake_case field names (``span_id``, ``string_value``) as OTLP JSON's camelCase.

    Only object keys change; attribute names are values (``{"key": "rlm.run_id", ...}``) and stay.
    """
    if isinstance(value, dict):
        return {_camel_key(k): _camel(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_camel(v) for v in value]
    return value


def normalise_span(span: dict[str, Any]) -> dict[str, Any]:
    """One span in OTLP JSON's camelCase form, whichever form it came in."""
    normalised: dict[str, Any] = _camel(span)
    return normalised


def _json_documents(text: str) -> list[dict[str, Any]]:
    stripped = text.strip()
    if not stripped:
        return []
    try:
        whole = json.loads(stripped)
        return whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        # JSON Lines end at "\n" only: splitlines() would also cut at U+2028 inside a string
        return [json.loads(line) for line in stripped.split("\n") if line.strip()]


def _from_trajectory(records: list[dict[str, Any]]) -> TraceData:
    data = TraceData()
    for r in records:
        kind = r.get("type")
        if kind == "run_start":
            data.runs[r["run_id"]] = Run(r["run_id"], r.get("depth", 0), r.get("parent_run_id"), r["t"], r["t"])
        elif kind == "run_end" and r["run_id"] in data.runs:
            run = data.runs[r["run_id"]]
            run.ended = r["t"]
            run.error = r.get("error")
        elif kind == "turn":
            for cell in r.get("cells") or []:
                data.cells.append(
                    Cell(r["run_id"], r["turn"], cell["t"], cell["t"] + cell["duration"], bool(cell.get("error")))
                )
        elif kind == "call":
            queued = r.get("started_at") or 0.0
            started = queued + r.get("queue_wait", 0.0)
            data.calls.append(
                Call(r["run_id"], r["role"], r.get("depth", 0), r["model"], queued, started,
                     started + r.get("duration", 0.0), r.get("input_tokens", 0), r.get("output_tokens", 0),
                     r.get("cost_usd"), r.get("error"), r.get("cache_read_tokens", 0), r.get("cache_write_tokens", 0))
            )
    return data


def _otlp_spans(document: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for resource in document.get("resourceSpans") or []:
        for scope in resource.get("scopeSpans") or []:
            yield from scope.get("spans") or []


def _attributes(span: dict[str, Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in span.get("attributes") or []:
        value = item.get("value") or {}
        for key in ("stringValue", "intValue", "doubleValue", "boolValue"):
            raw = value.get(key)
            if raw is not None:  # Phoenix's export writes every field, the unset ones as null
                values[item["key"]] = int(raw) if key == "intValue" else raw
                break
    return values


def trace_from_spans(spans: Iterable[dict[str, Any]]) -> TraceData:
    """The runs, cells and calls of OTLP-JSON spans (camelCase; see :func:`normalise_span`)."""
    data = TraceData()
    by_id = {s["spanId"]: s for s in spans}

    def seconds(span: dict[str, Any], key: str) -> float:
        return int(span[key]) / 1e9

    def run_of(span: dict[str, Any]) -> str:
        current: dict[str, Any] | None = span
        while current is not None:
            if current["name"] == attr.SPAN_RUN:
                return str(_attributes(current).get(attr.RLM_RUN_ID, current["spanId"]))
            current = by_id.get(current.get("parentSpanId") or "")
        return "?"

    for span in by_id.values():
        a = _attributes(span)
        start, end = seconds(span, "startTimeUnixNano"), seconds(span, "endTimeUnixNano")
        if span["name"] == attr.SPAN_RUN:
            parent = by_id.get(span.get("parentSpanId") or "")
            data.runs[run_of(span)] = Run(run_of(span), int(a.get(attr.RLM_DEPTH, 0)),
                                          run_of(parent) if parent else None, start, end)
        elif span["name"] == attr.SPAN_EXECUTE:
            turn_span = by_id.get(span.get("parentSpanId") or "")
            turn = int(_attributes(turn_span).get(attr.RLM_TURN, 0)) if turn_span else 0
            data.cells.append(Cell(run_of(span), turn, start, end, attr.ERROR_TYPE in a))
        elif a.get(attr.GEN_AI_OPERATION_NAME) == attr.OPERATION_CHAT:
            wait = float(a.get(attr.RLM_QUEUE_WAIT_S, 0.0))
            data.calls.append(
                Call(run_of(span), str(a.get(attr.RLM_ROLE, "sub")), int(a.get(attr.RLM_DEPTH, 0)),
                     str(a.get(attr.GEN_AI_REQUEST_MODEL, "?")), start, start + wait, end,
                     int(a.get(attr.GEN_AI_USAGE_INPUT_TOKENS, 0)), int(a.get(attr.GEN_AI_USAGE_OUTPUT_TOKENS, 0)),
                     a.get(attr.RLM_COST_USD), a.get(attr.ERROR_TYPE),
                     int(a.get(attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, 0)),
                     int(a.get(attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, 0)))
            )
    return data


# -- analysis ---------------------------------------------------------------------------------------
@dataclass
class Analysis:
    """What ``rlmflow trace`` prints."""

    duration: float
    time_split: dict[str, float]
    critical_path: list[tuple[str, float]]
    fan_out: list[dict[str, Any]]
    cost_by_depth_model: list[dict[str, Any]]
    totals: dict[str, Any]


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, -float("inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _clip(intervals: Iterable[tuple[float, float]], low: float, high: float) -> list[tuple[float, float]]:
    return [(max(a, low), min(b, high)) for a, b in intervals if b > low and a < high]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals], key=lambda e: (e[0], e[1]))
    best = current = 0
    for _, step in events:
        current += step
        best = max(best, current)
    return best


def analyse(data: TraceData) -> Analysis:
    """Critical path and time split of the top-level run; fan-out per turn; cost by depth and model."""
    if not data.runs:
        raise ValueError("no run found in the trace")
    top = min(data.runs.values(), key=lambda r: (r.depth, r.started))
    duration = top.ended - top.started
    root_calls = sorted((c for c in data.calls if c.run_id == top.run_id and c.role == "root"), key=lambda c: c.queued)
    cells = sorted((c for c in data.cells if c.run_id == top.run_id), key=lambda c: c.started)
    others = [c for c in data.calls if not (c.run_id == top.run_id and c.role == "root")]

    split = {"root thinking": 0.0, "root queueing": 0.0, "sandbox compute": 0.0, "sub-call waiting": 0.0,
             "sub-call queueing": 0.0, "other": 0.0}
    for call in root_calls:
        split["root thinking"] += call.ended - call.started
        split["root queueing"] += call.started - call.queued
    fan_out: list[dict[str, Any]] = []
    path: list[tuple[str, float]] = []
    cells_by_turn: dict[int, list[Cell]] = defaultdict(list)
    for cell in cells:
        cells_by_turn[cell.turn].append(cell)
    for index, call in enumerate(root_calls, start=1):
        path.append((f"turn {index}: root model (queue {call.started - call.queued:.2f} s)", call.ended - call.queued))
        for cell in cells_by_turn.get(index, []):
            inside = [c for c in others if cell.started <= c.queued <= cell.ended]
            service = _clip(((c.started, c.ended) for c in inside), cell.started, cell.ended)
            queued = _clip(((c.queued, c.started) for c in inside), cell.started, cell.ended)
            waiting = _union(service)
            queueing = max(0.0, _union(service + queued) - waiting)
            split["sub-call waiting"] += waiting
            split["sub-call queueing"] += queueing
            split["sandbox compute"] += max(0.0, (cell.ended - cell.started) - waiting - queueing)
            fan_out.append({"turn": index, "calls": len(inside), "max_in_flight": _max_overlap(service)})
            if inside:
                last = max(inside, key=lambda c: c.ended)
                first_queued = min(c.queued for c in inside)
                path.append((f"turn {index}: cell before the fan-out", max(0.0, first_queued - cell.started)))
                path.append((f"turn {index}: slowest call inside, {last.model} depth {last.depth} "
                             f"(queued {last.started - last.queued:.2f} s)", last.ended - first_queued))
                path.append((f"turn {index}: cell after the fan-out", max(0.0, cell.ended - last.ended)))
            else:
                path.append((f"turn {index}: cell", cell.ended - cell.started))
    split["other"] = max(0.0, duration - sum(split.values()))

    groups: dict[tuple[int, str], dict[str, Any]] = {}
    for call in data.calls:
        group = groups.setdefault((call.depth, call.model), {"depth": call.depth, "model": call.model, "calls": 0,
                                                             "input_tokens": 0, "output_tokens": 0,
                                                             "cache_read_tokens": 0, "cache_write_tokens": 0,
                                                             "cost_usd": 0.0, "errors": 0})
        group["calls"] += 1
        group["input_tokens"] += call.input_tokens
        group["cache_read_tokens"] += call.cache_read_tokens
        group["cache_write_tokens"] += call.cache_write_tokens
        group["output_tokens"] += call.output_tokens
        group["errors"] += call.error is not None
        if group["cost_usd"] is not None:
            group["cost_usd"] = None if call.cost_usd is None and call.error is None else (
                group["cost_usd"] + (call.cost_usd or 0.0))
    totals = {
        "runs": len(data.runs),
        "calls": len(data.calls),
        "sub_calls": sum(1 for c in data.calls if c.role == "sub"),
        "input_tokens": sum(c.input_tokens for c in data.calls),
        "output_tokens": sum(c.output_tokens for c in data.calls),
        "cache_read_tokens": sum(c.cache_read_tokens for c in data.calls),
        "cache_write_tokens": sum(c.cache_write_tokens for c in data.calls),
        "cost_usd": None if any(g["cost_usd"] is None for g in groups.values())
        else sum(g["cost_usd"] for g in groups.values()),
        "max_depth": max(r.depth for r in data.runs.values()),
    }
    return Analysis(duration, split, path, fan_out, sorted(groups.values(), key=lambda g: (g["depth"], g["model"])),
                    totals)


def format_text(analysis: Analysis) -> str:
    lines = [f"run: {analysis.duration:.2f} s, {analysis.totals['calls']} model calls "
             f"({analysis.totals['sub_calls']} sub-calls), {analysis.totals['runs']} run(s) to depth "
             f"{analysis.totals['max_depth']}, cost "
             + ("unknown" if analysis.totals["cost_usd"] is None else f"${analysis.totals['cost_usd']:.4f}")]
    lines.append("\ncritical path:")
    lines += [f"  {seconds:8.2f} s  {label}" for label, seconds in analysis.critical_path]
    lines.append("\ntime split of the top-level run:")
    for name, seconds in analysis.time_split.items():
        share = seconds / analysis.duration * 100 if analysis.duration else 0.0
        lines.append(f"  {name:18s} {seconds:8.2f} s {share:5.1f}%")
    lines.append("\nfan-out per turn:")
    lines += [
        f"  turn {f['turn']}: {f['calls']} calls, at most {f['max_in_flight']} in flight" for f in analysis.fan_out
    ]
    lines.append("\ncost by depth and model:")
    for g in analysis.cost_by_depth_model:
        cost = "unknown" if g["cost_usd"] is None else f"${g['cost_usd']:.4f}"
        lines.append(f"  depth {g['depth']} {g['model']:28s} {g['calls']:5d} calls {g['input_tokens']:>9,} in "
                     f"{g['output_tokens']:>8,} out {cost:>10s}" + _cache_note(g)
                     + (f" ({g['errors']} failed)" if g["errors"] else ""))
    totals = analysis.totals
    if totals.get("cache_read_tokens") or totals.get("cache_write_tokens"):
        lines.append(f"\nprompt cache: {totals['cache_read_tokens']:,} input tokens read, "
                     f"{totals['cache_write_tokens']:,} written, of {totals['input_tokens']:,} "
                     f"({_share(totals['cache_read_tokens'], totals['input_tokens'])} read)")
    return "\n".join(lines)


def _share(part: int, whole: int) -> str:
    return f"{part / whole * 100:.0f}%" if whole else "0%"


def _cache_note(group: dict[str, Any]) -> str:
    """`` (cache: N read, M written)`` for a group that used a prompt cache, else nothing."""
    read, write = group.get("cache_read_tokens", 0), group.get("cache_write_tokens", 0)
    return f" (cache: {read:,} read, {write:,} written)" if read or write else ""
