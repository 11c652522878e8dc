"""The CLI as an OpenTelemetry application: the standard environment decides what is exported where.

Also: lane gauges read from any thread (no traceback at shutdown), and ``rlmflow trace`` reading
the OTLP JSON forms people have (a collector's camelCase, protobuf's snake_case, Phoenix's pages).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from aiohttp import web
from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import RLM, ScriptedModel
from rlmflow.telemetry.export import Export, ExportConfigurationError, export_from_environment
from rlmflow.telemetry.report import analyse, load_trace

from .fakes import FakeOpenAIServer
from .helpers import refused_port, turn_script

FAN_OUT = "r = llm_query_many(['a', 'b', 'c'])\nprint(r)\nFINAL(' '.join(r))"


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for key in list(os.environ):
        if key.startswith(("OTEL_", "PHOENIX_")):
            monkeypatch.delenv(key)
    yield monkeypatch


@pytest.fixture
def exports() -> Iterator[list[Export]]:
    made: list[Export] = []
    yield made
    for export in made:
        export.shutdown()


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, False, False),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, True, False),
        ({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:9/v1/metrics"}, False, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, True, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_METRICS_EXPORTER": "none"}, True, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}, False, True),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_METRICS_EXPORTER": "none"}, True, False),
    ],
)
def test_exporters_follow_the_environment(otel_env: pytest.MonkeyPatch, exports: list[Export], env: dict[str, str],
                                          traces: bool, metrics: bool) -> None:
    for key, value in env.items():
        otel_env.setenv(key, value)
    export = export_from_environment()
    exports.append(export)
    assert (export.tracer_provider is not None, export.meter_provider is not None) == (traces, metrics)


def test_unknown_exporter_and_protocol_are_errors(otel_env: pytest.MonkeyPatch) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ExportConfigurationError, match="zipkin"):
        export_from_environment()
    otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ExportConfigurationError, match="http/json"):
        export_from_environment()


@pytest.mark.parametrize(
    ("env", "service", "project"),
    [
        ({}, "rlmflow", "rlmflow"),
        ({"OTEL_SERVICE_NAME": "billing-qa"}, "billing-qa", "billing-qa"),
        ({"PHOENIX_PROJECT_NAME": "audits"}, "rlmflow", "audits"),
        ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=svc,openinference.project.name=proj,team=x"}, "svc", "proj"),
    ],
)
def test_resource_names_the_service_and_the_phoenix_project(
    otel_env: pytest.MonkeyPatch, exports: list[Export], env: dict[str, str], service: str, project: str
) -> None:
    otel_env.setenv("OTEL_TRACES_EXPORTER", "console")
    for key, value in env.items():
        otel_env.setenv(key, value)
    export = export_from_environment()
    exports.append(export)
    assert export.resource is not None
    assert export.resource.attributes["service.name"] == service
    assert export.resource.attributes["openinference.project.name"] == project


def test_lane_gauges_are_read_off_the_event_loop_without_errors(caplog: pytest.LogCaptureFixture) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    async def main() -> MetricsData | None:
        async with RLM(root=turn_script([FAN_OUT]), sub=ScriptedModel(lambda r: "x", name="sub"),
                       meter_provider=provider) as rlm:
            await rlm.run("some text", "q")
            return await anyio.to_thread.run_sync(reader.get_metrics_data)  # a worker thread, as an exporter's

    with caplog.at_level(logging.WARNING):
        from_thread = anyio.run(main)
        after_loop = reader.get_metrics_data()  # no event loop at all: what a shutdown flush sees
        provider.shutdown()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    for data in (from_thread, after_loop):
        assert data is not None
        gauges = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
        limits = {p.attributes["rlm.lane"]: p.value for p in gauges["rlm.lane.concurrency_limit"].data.data_points}
        assert limits["scripted:sub"] >= 1
        in_flight = {p.attributes["rlm.lane"]: p.value for p in gauges["rlm.lane.in_flight"].data.data_points}
        assert in_flight["scripted:sub"] == 0


class _Collector:
    """An OTLP/HTTP receiver on 127.0.0.1 recording (path, headers, body) of every POST."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.url = ""

    async def __aenter__(self) -> _Collector:
        async def collect(request: web.Request) -> web.Response:
            self.received.append((request.path, dict(request.headers), await request.read()))
            return web.Response(status=200, content_type="application/x-protobuf", body=b"")

        app = web.Application()
        app.router.add_post("/{tail:.*}", collect)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._runner.cleanup()


async def _cli_run(tmp_path: Path, env: dict[str, str], *extra: str) -> tuple[int, str, str]:
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta " * 200)
    reply = "```repl\nr = llm_query_many(['one', 'two'])\nprint(r)\nFINAL('done: ' + str(len(r)))\n```"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_", "RLMFLOW_CAPTURE"))}
    async with FakeOpenAIServer(root_marker="MARK", root_reply=reply) as server:
        done = await anyio.run_process(
            [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(doc), "--query", "MARK: count",
             "--root", f"openai:gpt-4o-mini@{server.base_url}", *extra],
            env={**clean, **env}, check=False,
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.anyio
async def test_cli_traces_endpoint_headers_and_resource_and_no_metrics(tmp_path: Path) -> None:
    async with _Collector() as collector:
        code, out, err = await _cli_run(tmp_path, {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector.url}/custom/traces",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-tenant=acme",
            "OTEL_RESOURCE_ATTRIBUTES": "openinference.project.name=qa-runs",
        }, "--capture-content", "500")
    assert code == 0 and out.strip() == "done: 2", err
    assert "Traceback" not in err and "rror" not in err, err
    paths = {path for path, _, _ in collector.received}
    assert paths == {"/custom/traces"}  # the traces endpoint only: metrics have nowhere to go
    headers = [h for _, h, _ in collector.received]
    assert all(h.get("x-tenant") == "acme" for h in headers)
    body = b"".join(b for _, _, b in collector.received)
    assert b"qa-runs" in body and b"invoke_agent rlm" in body
    assert b"MARK: count" in body  # --capture-content put the query on the root span


@pytest.mark.anyio
async def test_cli_with_metrics_exports_both_and_shuts_down_quietly(tmp_path: Path) -> None:
    async with _Collector() as collector:
        code, _, err = await _cli_run(tmp_path, {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url})
        quiet, _, quiet_err = await _cli_run(tmp_path, {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_METRICS_EXPORTER": "none", "OTEL_SERVICE_NAME": "q2",
        })
    assert code == 0 and quiet == 0
    assert "Traceback" not in err + quiet_err and "Callback failed" not in err + quiet_err, err + quiet_err
    metrics_posts = [body for path, _, body in collector.received if path == "/v1/metrics"]
    assert len(metrics_posts) == 1 and b"rlm.lane.in_flight" in metrics_posts[0]  # only the first run's flush
    traces = [body for path, _, body in collector.received if path == "/v1/traces"]
    assert any(b"q2" in body for body in traces)


@pytest.mark.anyio
async def test_cli_refuses_a_bad_capture_value(tmp_path: Path) -> None:
    code, _, err = await _cli_run(tmp_path, {"RLMFLOW_CAPTURE_CONTENT": "lots"})
    assert code == 2 and "RLMFLOW_CAPTURE_CONTENT" in err


@pytest.mark.anyio
async def test_trace_reads_camel_snake_and_phoenix_forms(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with RLM(root=turn_script([FAN_OUT]), sub=ScriptedModel(lambda r: "x", name="sub"),
                   tracer_provider=provider) as rlm:
        await rlm.run("some text", "q")
    request = encode_spans(exporter.get_finished_spans())  # the protobuf an OTLP exporter sends
    camel = MessageToDict(request)
    snake = MessageToDict(request, preserving_proto_field_name=True)
    assert "resourceSpans" in camel and "resource_spans" in snake
    spans = [s for rs in snake["resource_spans"] for ss in rs["scope_spans"] for s in ss["spans"]]
    phoenix: dict[str, Any] = {"data": spans, "next_cursor": None}  # the shape of Phoenix's span export
    totals = []
    for name, document in (("camel", camel), ("snake", snake), ("phoenix", phoenix)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(document))
        analysis = analyse(load_trace(path))
        totals.append(analysis.totals)
        assert analysis.totals["calls"] == 4 and analysis.totals["sub_calls"] == 3
        assert analysis.fan_out == [{"turn": 1, "calls": 3, "max_in_flight": analysis.fan_out[0]["max_in_flight"]}]
    assert totals[0] == totals[1] == totals[2]


def test_trace_needs_exactly_one_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rlmflow import cli

    assert cli.main(["trace"]) == 2
    assert cli.main(["trace", str(tmp_path / "x.json"), "--phoenix", "http://127.0.0.1:9"]) == 2
    with refused_port() as port:
        assert cli.main(["trace", "--phoenix", f"http://127.0.0.1:{port}", "--project", "p"]) == 3  # refused
    err = capsys.readouterr().err
    assert "one of them" in err and "cannot reach Phoenix" in err
