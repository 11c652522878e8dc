"""Prompt caching on Bedrock and Anthropic, against the fakes (real aioboto3 and HTTP clients).

Where cache points go (and where not), a root's turns reading their history from the cache, the
cache's share in results, spans and reports, and budget reservations that a cache write cannot
overrun.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import RLM, BudgetLedger, Dispatcher, ModelRequest, Price, Pricing, Spend
from rlmflow.dispatch.budget import Budget
from rlmflow.models.anthropic import AnthropicModel
from rlmflow.models.base import LanguageModel, Message, Usage
from rlmflow.models.bedrock import BedrockModel
from rlmflow.models.caching import PromptCache, cache_points, default_prompt_cache
from rlmflow.models.scripted import ScriptedModel
from rlmflow.result import RLMResult
from rlmflow.telemetry import attributes as attr
from rlmflow.telemetry.report import analyse, format_text, trace_from_spans

from .fakes.fake_anthropic import FakeAnthropicServer
from .fakes.fake_bedrock import FakeBedrockServer
from .fakes.root_script import CellScript, harbour_document, realistic_cells
from .helpers import echo_sub

pytestmark = pytest.mark.anyio

CLAUDE_BEDROCK = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
CLAUDE = "claude-sonnet-4-5"
LONG = "The harbour ledger lists every ship, its berth and its cargo. " * 100  # ~1,600 tokens


@pytest.fixture
async def bedrock_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeBedrockServer]:
    async with FakeBedrockServer() as fake:
        for name, value in fake.credentials_env().items():
            monkeypatch.setenv(name, value)
        yield fake


@pytest.fixture
async def anthropic_server() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer() as fake:
        yield fake


def bedrock(server: FakeBedrockServer, model_id: str = CLAUDE_BEDROCK, **options: Any) -> BedrockModel:
    return BedrockModel(model_id, region="us-east-1", endpoint_url=server.base_url, **options)


def claude(server: FakeAnthropicServer, **options: Any) -> AnthropicModel:
    return AnthropicModel(CLAUDE, base_url=server.base_url, api_key=server.api_key, **options)


def marked(*messages: tuple[str, str]) -> ModelRequest:
    """A request with a cache mark on each system and user message (as a root's are marked)."""
    return ModelRequest(messages=tuple(Message(role, text, cache_point=role != "assistant")  # type: ignore[arg-type]
                                       for role, text in messages), max_tokens=32)


def bedrock_points(body: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Where the cachePoint blocks of a Converse body stand: after which system block, and after
    which message (index), one entry each."""
    system = [i - 1 for i, b in enumerate(body.get("system") or []) if "cachePoint" in b]
    messages = [i for i, m in enumerate(body["messages"]) for b in m["content"] if "cachePoint" in b]
    return system, messages


def anthropic_points(body: dict[str, Any]) -> tuple[int, list[int]]:
    system = body.get("system")
    in_system = sum(1 for b in system if "cache_control" in b) if isinstance(system, list) else 0
    return in_system, [i for i, m in enumerate(body["messages"]) if isinstance(m["content"], list)
                       for b in m["content"] if "cache_control" in b]


# -- where the points go ---------------------------------------------------------------------------------
async def test_bedrock_points_follow_the_marks_above_the_minimum(bedrock_server: FakeBedrockServer) -> None:
    model = bedrock(bedrock_server)
    try:
        # the system prompt alone is too short to cache; with the long first message the prefix is not
        await model.request(marked(("system", "be brief"), ("user", LONG), ("assistant", "ok"), ("user", "and?")))
        await model.request(marked(("system", "be brief"), ("user", "short question")))
    finally:
        await model.aclose()
    long_body, short_body = bedrock_server.requests_seen
    assert bedrock_points(long_body) == ([], [0, 2])
    assert long_body["messages"][0]["content"] == [{"text": LONG}, {"cachePoint": {"type": "default"}}]
    assert bedrock_points(short_body) == ([], [])  # under 1,024 tokens: no point at all


async def test_anthropic_points_follow_the_marks_above_the_minimum(anthropic_server: FakeAnthropicServer) -> None:
    model = claude(anthropic_server)
    try:
        await model.request(marked(("system", LONG), ("user", "q1"), ("assistant", "a1"), ("user", "q2")))
        await model.request(marked(("system", "be brief"), ("user", "short question")))
    finally:
        await model.aclose()
    long_body, short_body = anthropic_server.requests_seen
    assert anthropic_points(long_body) == (1, [0, 2])
    assert long_body["system"] == [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    assert short_body["system"] == "be brief" and short_body["messages"][0]["content"] == "short question"


async def test_at_most_four_points_the_system_prompt_and_the_newest(bedrock_server: FakeBedrockServer) -> None:
    turns = [("user" if i % 2 == 0 else "assistant", f"turn {i} " + LONG) for i in range(9)]
    model = bedrock(bedrock_server)
    try:
        response = await model.request(marked(("system", LONG), *turns))  # 1 + 5 marks on user turns
    finally:
        await model.aclose()
    assert bedrock_points(bedrock_server.requests_seen[0]) == ([0], [4, 6, 8])
    assert response.usage.cache_write_tokens > 0  # the fake accepted them (it refuses a fifth)


async def test_caching_off_and_models_that_do_not_cache(bedrock_server: FakeBedrockServer) -> None:
    request = marked(("system", LONG), ("user", LONG))
    llama = "meta.llama3-70b-instruct-v1:0"
    for model in (bedrock(bedrock_server, prompt_cache=False), bedrock(bedrock_server, llama)):
        try:
            response = await model.request(request)
        finally:
            await model.aclose()
        assert response.usage.cache_write_tokens == 0
    assert [bedrock_points(body) for body in bedrock_server.requests_seen] == [([], []), ([], [])]
    assert not bedrock(bedrock_server, prompt_cache=False).caches_prompts


def test_default_rules_per_model() -> None:
    assert default_prompt_cache("aws.bedrock", CLAUDE_BEDROCK) == PromptCache(min_tokens=1024)
    assert default_prompt_cache("anthropic", "claude-3-5-haiku-20241022").min_tokens == 2048
    assert default_prompt_cache("aws.bedrock", "anthropic.claude-3-haiku-20240307-v1:0").min_tokens == 2048
    assert default_prompt_cache("anthropic", "claude-haiku-4-5").min_tokens == 4096
    assert default_prompt_cache("aws.bedrock", "us.anthropic.claude-opus-4-5-20251101-v1:0").min_tokens == 4096
    assert default_prompt_cache("aws.bedrock", "amazon.nova-pro-v1:0").min_tokens == 1000
    assert not default_prompt_cache("aws.bedrock", "meta.llama3-70b-instruct-v1:0").enabled
    assert not default_prompt_cache("openai", "claude-via-a-proxy").enabled
    messages = [Message("system", "s" * 8000, cache_point=True), Message("user", "u", cache_point=True)]
    assert cache_points(messages, PromptCache(max_points=1), len) == frozenset({0})


# -- a root's turns read their history from the cache ---------------------------------------------------
def root_calls(result: RLMResult) -> list[Any]:
    return [c for c in result.calls if c.role == "root"]


async def run_cached(root: LanguageModel, turns: int = 8) -> tuple[RLMResult, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with RLM(root=root, sub=echo_sub(), tracer_provider=provider, max_turns=turns + 2) as rlm:
        result = await rlm.run(harbour_document(), "Which cargo came in most often?")
    return result, exporter


def assert_history_read(calls: Sequence[Any]) -> None:
    """Each turn from the third on reads at least what the turn before it wrote and read."""
    assert calls[0].cache_read_tokens == 0
    for before, after in itertools.pairwise(calls[1:]):
        assert after.cache_read_tokens > 0
        assert after.cache_read_tokens >= before.cache_read_tokens + before.cache_write_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_bedrock_root_turns_read_the_history_from_the_cache(
    bedrock_server: FakeBedrockServer, stream: bool
) -> None:
    bedrock_server.reply = CellScript(realistic_cells(8))
    root = bedrock(bedrock_server, stream=stream)
    try:
        result, exporter = await run_cached(root)
    finally:
        await root.aclose()
    calls = root_calls(result)
    assert result.answer == "copper came in on many ships" and len(calls) == 8
    assert_history_read(calls)
    usage = result.usage[CLAUDE_BEDROCK]
    assert usage.cache_read_tokens == sum(c.cache_read_tokens for c in calls) == bedrock_server.prompt_cache.reads
    assert usage.cache_write_tokens == sum(c.cache_write_tokens for c in calls) == bedrock_server.prompt_cache.writes
    # cost: genai-prices' cache rates for the profile; without the cache every token at the input price
    assert sum(c.cost_usd for c in calls) < 0.6 * sum(c.cost_without_cache for c in calls)
    chats = [s for s in exporter.get_finished_spans() if s.name == attr.chat_span_name(CLAUDE_BEDROCK)]
    reads = [s.attributes.get(attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, 0) for s in chats]
    writes = [s.attributes.get(attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, 0) for s in chats]
    assert reads == [c.cache_read_tokens for c in calls] and writes == [c.cache_write_tokens for c in calls]
    run = next(s for s in exporter.get_finished_spans() if s.name == attr.SPAN_RUN)
    assert run.attributes[attr.RLM_RUN_CACHE_READ_TOKENS] == usage.cache_read_tokens


async def test_anthropic_root_turns_read_the_history_from_the_cache(anthropic_server: FakeAnthropicServer) -> None:
    anthropic_server.reply = CellScript(realistic_cells(8))
    root = claude(anthropic_server, stream=True)
    try:
        result, exporter = await run_cached(root)
    finally:
        await root.aclose()
    calls = root_calls(result)
    assert len(calls) == 8
    assert_history_read(calls)
    assert result.usage[CLAUDE].cache_read_tokens == anthropic_server.prompt_cache.reads > 0
    # rlmflow trace reads the cache figures back from the spans
    spans = [_otlp(s) for s in exporter.get_finished_spans()]
    analysis = analyse(trace_from_spans(spans))
    assert analysis.totals["cache_read_tokens"] == anthropic_server.prompt_cache.reads
    assert "prompt cache:" in format_text(analysis)


async def test_an_expired_entry_is_written_again(anthropic_server: FakeAnthropicServer) -> None:
    model = claude(anthropic_server)
    request = marked(("system", LONG), ("user", "q1"))
    try:
        first = await model.request(request)
        second = await model.request(request)
        anthropic_server.prompt_cache.advance(301)  # past the 5-minute TTL
        third = await model.request(request)
    finally:
        await model.aclose()
    assert first.usage.cache_write_tokens > 0 and first.usage.cache_read_tokens == 0
    assert second.usage.cache_read_tokens == first.usage.cache_write_tokens and second.usage.cache_write_tokens == 0
    assert third.usage.cache_write_tokens == first.usage.cache_write_tokens and third.usage.cache_read_tokens == 0


def _otlp(span: Any) -> dict[str, Any]:
    """An SDK span as OTLP JSON's camelCase span (what ``rlmflow trace`` reads)."""
    def value(v: Any) -> dict[str, Any]:
        if isinstance(v, bool):
            return {"boolValue": v}
        if isinstance(v, int):
            return {"intValue": str(v)}
        if isinstance(v, float):
            return {"doubleValue": v}
        return {"stringValue": str(v)}

    return {"spanId": format(span.context.span_id, "016x"), "name": span.name,
            "parentSpanId": format(span.parent.span_id, "016x") if span.parent else "",
            "startTimeUnixNano": str(span.start_time), "endTimeUnixNano": str(span.end_time),
            "attributes": [{"key": k, "value": value(v)} for k, v in (span.attributes or {}).items()]}


# -- the root's history keeps its prefix ------------------------------------------------------------------
async def test_trimmed_history_keeps_its_prefix_for_several_turns() -> None:
    """With a history too long for ``history_chars``, most turns still send the turn before's
    messages unchanged at their start (the cut moves in coarse steps)."""
    cells = realistic_cells(12)
    turns = iter(range(100))
    root = ScriptedModel(lambda r: CellScript([cells[min(next(turns), 11)]])(""), name="root")
    async with RLM(root=root, sub=echo_sub(), history_chars=12_000, max_turns=14) as rlm:
        await rlm.run(harbour_document(), "Which cargo came in most often?")
    requests = [r.messages for r in root.requests]
    assert len(requests) == 12
    kept = [len(after) > len(before) and tuple(after[: len(before)]) == tuple(before)
            for before, after in itertools.pairwise(requests)]
    assert any("earlier messages omitted" in m.content for m in requests[-1])  # it was trimmed
    assert sum(kept) >= 8, kept  # 11 pairs; the cut moved at most three times


# -- reservations ----------------------------------------------------------------------------------------
#: A share of the reserved tokens: the edges (none, all) as often as anything between
SHARE = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1))


@settings(max_examples=200, deadline=None)
@given(
    chars=st.integers(1, 400_000),
    max_tokens=st.integers(1, 8192),
    read=SHARE,
    write=SHARE,
    used=SHARE,
    out=SHARE,
    priced=st.sampled_from(["tables", "override"]),
)
def test_a_settled_call_never_costs_more_than_it_reserved(
    chars: int, max_tokens: int, read: float, write: float, used: float, out: float, priced: str
) -> None:
    """Any mix of plain input, cache reads and cache writes within the reserved tokens (what the
    provider can report for the request) costs at most what was reserved."""
    overrides = {CLAUDE_BEDROCK: Price.anthropic_style(3.0, 15.0)} if priced == "override" else None
    dispatcher = Dispatcher(pricing=Pricing(overrides))
    model = BedrockModel(CLAUDE_BEDROCK, region="us-east-1", endpoint_url="http://127.0.0.1:9")
    request = ModelRequest(messages=(Message("user", "x" * chars, cache_point=True),), max_tokens=max_tokens)
    reserved = dispatcher.estimate(model, request)
    input_tokens = int(reserved.input_tokens * used)
    read_tokens = int(input_tokens * read)
    write_tokens = int((input_tokens - read_tokens) * write)
    usage = Usage(input_tokens, int(max_tokens * out), 1, read_tokens, write_tokens)
    cost = dispatcher.cost(model, usage)
    assert cost is not None and cost <= reserved.cost_usd + 1e-12


async def test_a_cached_call_settles_to_its_real_price(bedrock_server: FakeBedrockServer) -> None:
    dispatcher = Dispatcher(pricing=Pricing({CLAUDE_BEDROCK: Price.anthropic_style(3.0, 15.0)}))
    ledger = BudgetLedger(Budget(max_cost_usd=1.0))
    model = bedrock(bedrock_server)
    request = marked(("system", LONG), ("user", "q1"))
    records: list[Any] = []
    try:
        for _ in range(2):
            await dispatcher.call(model, request, ledger=ledger, record=records.append)
    finally:
        await model.aclose()
    write, read = records
    assert write.cache_write_tokens > 0 and read.cache_read_tokens == write.cache_write_tokens
    price = Price.anthropic_style(3.0, 15.0)
    for record in records:
        usage = Usage(record.input_tokens, record.output_tokens, 1, record.cache_read_tokens, record.cache_write_tokens)
        assert record.cost_usd == pytest.approx(price.cost(usage))
        assert record.cost_without_cache == pytest.approx(Price(3.0, 15.0).cost(usage))
    assert write.cost_usd > write.cost_without_cache == read.cost_without_cache > read.cost_usd
    assert ledger.spent.cost_usd == pytest.approx(write.cost_usd + read.cost_usd)
    assert ledger.overrun == Spend()  # nothing spent beyond a reservation


# -- reports and metrics ---------------------------------------------------------------------------------
def test_eval_report_shows_cost_with_and_without_the_cache() -> None:
    from rlmflow.eval.report import format_markdown, summarise
    from rlmflow.eval.runner import ItemResult

    def item(i: str, cost: float, uncached: float | None, read: int) -> ItemResult:
        return ItemResult(item_id=i, approach="rlm", model="claude", expected="A", answer="A", correct=True,
                          success=True, turns=3, sub_calls=0, input_tokens=1000, output_tokens=10, cost_usd=cost,
                          latency_s=1.0, trace_id=None, error_type=None, cache_read_tokens=read,
                          cache_write_tokens=100, uncached_cost_usd=uncached)

    rows = [item("1", 0.01, 0.03, 600), item("2", 0.02, 0.05, 200)]
    (summary,) = summarise(rows)
    assert summary.uncached_cost_usd == pytest.approx(0.08) and summary.cache_read_tokens == 800
    text = format_markdown(rows)
    assert "| claude | RLM | $0.0150 | $0.0400 | 800 / 200 | 40.0% |" in text
    # an older results file (no uncached cost) with cache tokens: the cost without it is unknown
    rows[1] = item("2", 0.02, None, 200)
    assert "| claude | RLM | $0.0150 | unknown |" in format_markdown(rows)


def test_the_cache_metric_counts_reads_and_writes() -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from rlmflow import CallRecord
    from rlmflow.telemetry.metrics import CallMetrics

    reader = InMemoryMetricReader()
    metrics = CallMetrics(MeterProvider(metric_readers=[reader]))
    metrics.record(CallRecord("m", "anthropic", "root", 0, 2000, 10, 0.01, 0.0, 0.1,
                              cache_read_tokens=1500, cache_write_tokens=300))
    data = reader.get_metrics_data()
    points = [p for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
              if m.name == attr.METRIC_CACHE_TOKENS for p in m.data.data_points]
    assert {p.attributes[attr.RLM_CACHE_OPERATION]: p.value for p in points} == {"read": 1500, "write": 300}


def test_a_hosted_roots_history_is_long_enough_to_stay_cached_and_a_small_windows_fits_it() -> None:
    class SmallWindow(ScriptedModel):
        context_window = 8192

    assert RLM(root=ScriptedModel(["x"])).settings.history_chars == 100_000
    assert RLM(root=SmallWindow(["x"])).settings.history_chars == 3 * 8192
    assert RLM(root=SmallWindow(["x"]), history_chars=5000).settings.history_chars == 5000


async def test_prompt_caching_can_be_turned_off_for_the_models_an_rlm_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    claude, bedrock = "anthropic:claude-sonnet-4-5", "bedrock:us.anthropic.claude-sonnet-4-5-20250929-v1:0@us-east-1"
    async with RLM(root=claude, sub=bedrock) as on, RLM(root=claude, sub=bedrock, prompt_cache=False) as off, \
            RLM(root="strands:" + bedrock, prompt_cache=False) as strands_off:
        assert [getattr(m, "caches_prompts", None) for m in (on.root, on.sub)] == [True, True]
        assert [getattr(m, "caches_prompts", None) for m in (off.root, off.sub)] == [False, False]
        assert getattr(strands_off.root, "caches_prompts", None) is False
