"""Spans, metrics, logs, trajectory and the trace report, read back in memory."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import RLM, LocalSandbox, ModelRequest, ScriptedModel
from rlmflow.telemetry.html import render_html
from rlmflow.telemetry.report import analyse, load_trace
from rlmflow.telemetry.trajectory import Trajectory

from .helpers import repl

pytestmark = pytest.mark.anyio

DOCUMENT = "SECRET-DOCUMENT-BODY " * 2000


def tracer() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def recursive_root(name: str = "root", latency: float = 0.0) -> ScriptedModel:
    """Depth 0: a 20-prompt fan-out, then rlm_query; depth 1: rlm_query again; depth 2: answers."""

    def reply(request: ModelRequest) -> str:
        task = request.messages[1].content
        if "Question: level-2" in task:
            return repl("FINAL('leaf')")
        if "Question: level-1" in task:
            return repl("FINAL(rlm_query('level-2', context='xyz'))")
        turn = sum(m.role == "assistant" for m in request.messages)
        if turn == 0:
            return repl("r = llm_query_many([f'item {i}' for i in range(20)])\nprint(len(r))")
        return repl("FINAL(rlm_query('level-1'))")

    return ScriptedModel(reply, name=name, latency=latency)


def by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


async def test_exact_span_tree_with_fan_out_and_depth_two() -> None:
    provider, exporter = tracer()
    sub = ScriptedModel(lambda r: "ok " + r.messages[-1].content, name="sub")
    async with RLM(root=recursive_root(), sub=sub, max_depth=2, tracer_provider=provider) as rlm:
        result = await rlm.run(DOCUMENT, "level-0")
    assert result.answer == "leaf"
    spans = exporter.get_finished_spans()
    ids = {s.context.span_id: s for s in spans}
    named = by_name(list(spans))
    assert {name: len(group) for name, group in named.items()} == {
        "invoke_agent rlm": 3, "rlm.turn": 4, "chat root": 4, "execute_code": 4, "llm_query_many": 1, "chat sub": 20,
    }
    runs = {s.attributes["rlm.depth"]: s for s in named["invoke_agent rlm"]}
    assert runs[0].parent is None
    for depth in (1, 2):  # each child run hangs under the cell that called rlm_query
        parent = ids[runs[depth].parent.span_id]
        assert parent.name == "execute_code" and parent.attributes["rlm.depth"] == depth - 1
    for turn in named["rlm.turn"]:
        assert ids[turn.parent.span_id].name == "invoke_agent rlm"
    for chat in named["chat root"]:
        assert ids[chat.parent.span_id].name == "rlm.turn"
    (batch,) = named["llm_query_many"]
    assert ids[batch.parent.span_id].name == "execute_code" and batch.attributes["rlm.batch.size"] == 20
    assert all(c.parent.span_id == batch.context.span_id for c in named["chat sub"])
    # each chat span carries its own call's usage
    own = sorted((c.input_tokens, c.output_tokens) for c in result.calls if c.model == "sub")
    seen = sorted((c.attributes["gen_ai.usage.input_tokens"], c.attributes["gen_ai.usage.output_tokens"])
                  for c in named["chat sub"])
    assert seen == own
    assert len({s.context.trace_id for s in spans}) == 1
    for span in spans:
        for value in span.attributes.values():
            assert "SECRET-DOCUMENT-BODY" not in str(value)


async def test_content_capture_is_opt_in_and_capped() -> None:
    provider, exporter = tracer()
    sub = ScriptedModel(lambda r: "answer", name="sub")
    async with RLM(root=recursive_root(), sub=sub, max_depth=0, capture_content=50, tracer_provider=provider) as rlm:
        await rlm.run(DOCUMENT, "level-0")
    named = by_name(list(exporter.get_finished_spans()))
    chat = named["chat root"][0].attributes
    (instructions,) = json.loads(chat["gen_ai.system_instructions"])  # the system prompt, apart
    assert instructions["type"] == "text" and len(instructions["content"]) == 50
    captured = json.loads(chat["gen_ai.input.messages"])
    assert captured[0]["role"] == "user" and captured[0]["parts"][0]["type"] == "text"
    assert len(captured[0]["parts"][0]["content"]) == 50
    assert "llm_query_many" in json.loads(named["execute_code"][0].attributes["gen_ai.tool.call.arguments"])["code"]


async def test_parent_links_hold_for_concurrent_runs() -> None:
    provider, exporter = tracer()
    sub = ScriptedModel(lambda r: "ok", name="sub", latency=0.005)
    async with (
        RLM(root=recursive_root(latency=0.01), sub=sub, max_depth=0, tracer_provider=provider) as rlm,
        anyio.create_task_group() as tg,
    ):
        for _ in range(2):
            tg.start_soon(rlm.run, DOCUMENT, "level-0")
    spans = list(exporter.get_finished_spans())
    ids = {s.context.span_id: s for s in spans}
    runs = [s for s in spans if s.name == "invoke_agent rlm" and s.attributes["rlm.depth"] == 0]
    assert len(runs) == 2 and runs[0].context.trace_id != runs[1].context.trace_id

    def run_of(span: ReadableSpan) -> ReadableSpan:
        while span.name != "invoke_agent rlm" or span.attributes["rlm.depth"] != 0:
            span = ids[span.parent.span_id]
        return span

    for span in spans:
        assert run_of(span).context.trace_id == span.context.trace_id
    assert sum(1 for s in spans if s.name == "chat sub") == 40 + 2  # two fan-outs and two degraded rlm_query


async def test_metrics_count_tokens_and_observe_lanes() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    sub = ScriptedModel(lambda r: "ok", name="sub")
    async with RLM(root=recursive_root(), sub=sub, max_depth=0, meter_provider=provider) as rlm:
        result = await rlm.run(DOCUMENT, "level-0")
        data = reader.get_metrics_data()
    metrics: dict[str, Any] = {
        m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
    }
    usage = metrics["gen_ai.client.token.usage"].data.data_points
    sub_input = next(p for p in usage if p.attributes["gen_ai.request.model"] == "sub"
                     and p.attributes["gen_ai.token.type"] == "input")
    assert sub_input.count == 21 and sub_input.sum == result.usage["sub"].input_tokens
    assert "gen_ai.client.operation.duration" in metrics and "rlm.client.queue_wait" in metrics
    lanes = {p.attributes["rlm.lane"] for p in metrics["rlm.lane.concurrency_limit"].data.data_points}
    assert lanes == {"scripted:root", "scripted:sub"}


async def test_logs_are_silent_without_config_and_carry_ids_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    hang = ScriptedModel(["```repl\nimport signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass\n```",
                          "```repl\nFINAL('x')\n```"], name="root")
    # 1 s: the FINAL cell after the restart must finish in time under load too (0.2 s was a race)
    async with RLM(root=hang, sandbox=LocalSandbox(cell_timeout=1.0, interrupt_grace=0.2)) as rlm:
        await rlm.run("doc", "q")  # a restart logs a warning
    assert capsys.readouterr().err == ""

    records: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(self.format(record)))

    handler = Collect()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
        foreign_pre_chain=[structlog.stdlib.ExtraAdder()],
    ))
    logger = logging.getLogger("rlmflow")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    provider, _ = tracer()
    try:
        async with RLM(root=recursive_root(), sub=ScriptedModel(lambda r: "ok"), max_depth=0,
                       tracer_provider=provider) as rlm:
            result = await rlm.run(DOCUMENT, "level-0")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    started = next(r for r in records if r["event"] == "run started")
    assert started["run_id"] == result.run_id and started["trace_id"] == result.trace_id
    assert all(r.get("run_id") == result.run_id for r in records)


async def test_trajectory_and_trace_report(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    sub = ScriptedModel(lambda r: "ok", name="sub", latency=0.01)
    async with RLM(root=recursive_root(latency=0.02), sub=sub, max_depth=2, trajectory=Trajectory(path)) as rlm:
        result = await rlm.run(DOCUMENT, "level-0")
        await rlm.run(DOCUMENT, "level-0")  # the same context again: recorded once
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # six runs (two top-level, four children) over two distinct contexts: each recorded once
    assert sum(1 for r in lines if r["type"] == "run_start") == 6
    assert sum(1 for r in lines if r["type"] == "context") == 2
    assert path.stat().st_size < 60_000  # grows with the work, not with turns x context
    first = [r for r in lines if r.get("run_id") == result.run_id or r["type"] == "context"]
    (tmp_path / "first.jsonl").write_text("\n".join(json.dumps(r) for r in first if r["type"] != "context"))
    data = load_trace(tmp_path / "first.jsonl")
    analysis = analyse(data)
    assert analysis.totals["calls"] == 2 + 20  # the top run's own calls (children have their own run ids)
    assert analysis.fan_out[0]["calls"] == 20 and analysis.fan_out[0]["max_in_flight"] >= 2
    assert analysis.critical_path[0][0].startswith("turn 1: root model")
    assert abs(sum(analysis.time_split.values()) - analysis.duration) < 1e-6
    full = analyse(load_trace(path))
    groups = {(g["depth"], g["model"]): g["calls"] for g in full.cost_by_depth_model}
    assert groups[(0, "sub")] == 40 and groups[(2, "root")] == 2


def otlp_json(spans: list[ReadableSpan]) -> dict[str, Any]:
    """What an OTLP file exporter writes for these spans (the JSON mapping of the protobuf)."""

    def value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": str(v)}

    return {"resourceSpans": [{"scopeSpans": [{"spans": [
        {
            "traceId": format(s.context.trace_id, "032x"), "spanId": format(s.context.span_id, "016x"),
            "parentSpanId": format(s.parent.span_id, "016x") if s.parent else "", "name": s.name,
            "startTimeUnixNano": str(s.start_time), "endTimeUnixNano": str(s.end_time),
            "attributes": [{"key": k, "value": value(v)} for k, v in s.attributes.items()],
        }
        for s in spans
    ]}]}]}


async def test_trace_report_reads_otlp_json_and_renders_in_chromium(tmp_path: Path) -> None:
    provider, exporter = tracer()
    sub = ScriptedModel(lambda r: "ok", name="sub", latency=0.01)
    async with RLM(root=recursive_root(latency=0.02), sub=sub, max_depth=2, tracer_provider=provider) as rlm:
        await rlm.run(DOCUMENT, "level-0")
    export = tmp_path / "spans.json"
    export.write_text(json.dumps(otlp_json(list(exporter.get_finished_spans()))))
    data = load_trace(export)
    analysis = analyse(data)
    assert analysis.totals == {**analysis.totals, "runs": 3, "calls": 24, "sub_calls": 20, "max_depth": 2}
    assert analysis.fan_out[0]["calls"] == 20
    page = tmp_path / "report.html"
    page.write_text(render_html(data, analysis))
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "scripts/setup/test-phoenix.sh installs Debian's chromium for this test"
    dom = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout)
    expected_bars = len(data.calls) + len(data.cells)
    assert f'data-rendered="{expected_bars}"' in dom
    assert dom.count("<rect") >= expected_bars
