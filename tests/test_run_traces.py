"""What a trace dashboard reads of a run however it ended: status, error.type, the cap hit, totals."""

from __future__ import annotations

import anyio
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from rlmflow import RLM, Budget, BudgetExceededError, ModelRequest, OpenAIModel, ScriptedModel
from rlmflow.telemetry.spans import server_of

from .fakes import FakeOpenAIServer
from .helpers import turn_script

pytestmark = pytest.mark.anyio


def tracer() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def run_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "invoke_agent rlm"]
    return span


async def test_a_cancelled_run_ends_its_span_as_an_error_without_task_internals() -> None:
    provider, exporter = tracer()
    started = anyio.Event()

    async def slow(request: ModelRequest) -> str:
        started.set()
        await anyio.sleep(30)
        return "never"

    sub = ScriptedModel(slow, name="sub")
    root = turn_script(["llm_query_many(['a', 'b'])"])
    async with RLM(root=root, sub=sub, tracer_provider=provider) as rlm, anyio.create_task_group() as tg:
        tg.start_soon(rlm.run, "doc", "q?")
        await started.wait()
        tg.cancel_scope.cancel()
    span = run_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "cancelled"
    calls = [s for s in exporter.get_finished_spans() if s.name == "chat sub"]
    assert calls and all(s.status.status_code is StatusCode.ERROR for s in calls)
    assert not any("cancel scope" in (s.status.description or "") for s in [span, *calls])


async def test_a_budget_stop_names_the_cap_and_the_span_holds_what_was_spent() -> None:
    provider, exporter = tracer()
    sub = ScriptedModel(lambda r: "ok", name="sub")
    cells = ["llm_query_many(['a', 'b'])", "llm_query_many(['c', 'd'])"]
    async with RLM(root=turn_script(cells), sub=sub, tracer_provider=provider, budget=Budget(max_calls=3)) as rlm:
        with pytest.raises(BudgetExceededError):
            await rlm.run("doc", "q?")
    attributes = run_span(exporter).attributes
    assert attributes is not None
    assert attributes["error.type"] == "BudgetExceededError" and attributes["rlm.budget.limit"] == "max_calls"
    assert attributes["rlm.run.calls"] == 3  # two root turns and the two sub-calls would be four
    assert attributes["rlm.run.input_tokens"] > 0 and attributes["rlm.run.output_tokens"] > 0
    assert "gen_ai.usage.input_tokens" not in attributes  # dashboards sum those over the calls' spans


async def test_a_finished_run_carries_its_totals() -> None:
    provider, exporter = tracer()
    sub = ScriptedModel(lambda r: "ok", name="sub")
    async with RLM(root=turn_script(["FINAL(llm_query('a'))"]), sub=sub, tracer_provider=provider) as rlm:
        result = await rlm.run("doc", "q?")
    attributes = run_span(exporter).attributes
    assert attributes is not None and run_span(exporter).status.status_code is not StatusCode.ERROR
    assert attributes["rlm.run.calls"] == len(result.calls) == 2
    assert attributes["rlm.run.input_tokens"] == result.total_usage.input_tokens


async def test_call_spans_name_the_server() -> None:
    provider, exporter = tracer()
    async with FakeOpenAIServer() as server:
        sub = OpenAIModel("my-vllm", base_url=server.base_url)
        try:
            async with RLM(root=turn_script(["FINAL(llm_query('a'))"]), sub=sub, tracer_provider=provider) as rlm:
                await rlm.run("doc", "q?")
        finally:
            await sub.aclose()
        port = int(server.base_url.split(":")[-1].split("/")[0])
    (call,) = [s for s in exporter.get_finished_spans() if s.name == "chat my-vllm"]
    assert call.attributes is not None
    assert call.attributes["server.address"] == "127.0.0.1" and call.attributes["server.port"] == port


def test_server_of_reads_urls_regions_and_hosts() -> None:
    assert server_of("https://api.openai.com/v1") == ("api.openai.com", None)
    assert server_of("http://127.0.0.1:8080/v1") == ("127.0.0.1", 8080)
    assert server_of("us-west-2") == ("bedrock-runtime.us-west-2.amazonaws.com", None)
    assert server_of(None) is None
