"""The Dispatcher when things go wrong: retries that run out, the retry deadline, quota pauses
end to end, the status mappings, answers without usage, overruns and unknown prices."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import (
    Budget,
    BudgetExceededError,
    BudgetLedger,
    ConfigurationError,
    Dispatcher,
    Limits,
    ModelNotReadyError,
    ModelRequest,
    ModelResponse,
    OpenAIModel,
    Price,
    Pricing,
    RetryPolicy,
    ScriptedModel,
    ThrottledError,
    TransientModelError,
    Usage,
)
from rlmflow.dispatch.budget import Reservation, Spend

from .fakes import FakeOpenAIServer, FaultPlan
from .fakes.fake_openai import answer_for

pytestmark = pytest.mark.anyio


class HeldLedger(BudgetLedger):
    """A ledger that notes every amount it was asked to hold: what the Dispatcher reserved, read at
    the ledger's door rather than recomputed with the Dispatcher's own estimate."""

    def __init__(self, budget: Budget | None = None) -> None:
        super().__init__(budget)
        self.held: list[Spend] = []

    def reserve_many(self, amounts: Sequence[Spend]) -> list[Reservation]:
        holds = super().reserve_many(amounts)
        self.held.extend(amounts)
        return holds


def prompts(n: int) -> list[ModelRequest]:
    return [ModelRequest.from_prompt(f"prompt {i} " + "x" * 40, max_tokens=16) for i in range(n)]


class StepClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_throttles_run_out_after_max_throttles() -> None:
    plan = FaultPlan(throttle=1.0, throttle_retry_after=0.001)
    async with FakeOpenAIServer(faults=plan) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        dispatcher = Dispatcher(retry=RetryPolicy(max_throttles=3, base_delay=0.001, max_delay=0.002))
        records: list = []
        try:
            with pytest.raises(ThrottledError):
                await dispatcher.call(model, prompts(1)[0], ledger=(ledger := BudgetLedger()), record=records.append)
        finally:
            await model.aclose()
    assert server.counters.requests == 4  # the first attempt and 3 retries
    assert records[0].attempts == 4 and records[0].throttles == 4 and records[0].error == "ThrottledError"
    assert ledger.reserved == Spend() and ledger.spent == Spend()


async def test_errors_run_out_after_max_attempts_and_503_means_not_ready() -> None:
    async with FakeOpenAIServer(status_faults={503: 1.0}) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        dispatcher = Dispatcher(retry=RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002))
        try:
            with pytest.raises(ModelNotReadyError) as caught:
                await dispatcher.call(model, prompts(1)[0], ledger=BudgetLedger())
        finally:
            await model.aclose()
    assert caught.value.status_code == 503
    assert server.counters.requests == 3


async def test_408_is_transient_and_retried_to_success() -> None:
    async with FakeOpenAIServer(status_faults={408: 0.5}, seed=4) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        dispatcher = Dispatcher(retry=RetryPolicy(max_attempts=20, base_delay=0.001, max_delay=0.002))
        try:
            requests = prompts(20)
            outcomes = await dispatcher.call_many(model, requests, ledger=BudgetLedger())
            with pytest.raises(TransientModelError) as caught:
                await _until_408(model)
        finally:
            await model.aclose()
    assert [getattr(o, "text", None) for o in outcomes] == [answer_for(r.messages[-1].content) for r in requests]
    assert server.counters.faults["status_408"] > 0
    assert caught.value.status_code == 408


async def _until_408(model: OpenAIModel) -> None:
    """Send single attempts until one gets a 408 (about every second one does)."""
    dispatcher = Dispatcher(retry=RetryPolicy(max_attempts=1, max_throttles=0))
    for request in prompts(64):
        await dispatcher.call(model, request, ledger=BudgetLedger())


async def test_the_retry_deadline_stops_retries_that_would_end_after_it() -> None:
    clock = StepClock()

    def refuse(request: ModelRequest) -> str:
        clock.now += 1.0  # each attempt takes a second of (fake) time
        raise ThrottledError("slow down", retry_after=0.001)

    dispatcher = Dispatcher(retry=RetryPolicy(deadline=2.5, max_throttles=100), clock=clock)
    model = ScriptedModel(refuse)
    records: list = []
    with pytest.raises(ThrottledError):
        await dispatcher.call(model, ModelRequest.from_prompt("p"), ledger=BudgetLedger(), record=records.append)
    assert len(model.requests) == 3  # at 1 s and 2 s a retry still fits; at 3 s it would not
    too_long = Dispatcher(retry=RetryPolicy(deadline=5.0), clock=StepClock())
    slow = ScriptedModel([ThrottledError("come back in a minute", retry_after=60.0)])
    with pytest.raises(ThrottledError):
        await too_long.call(slow, ModelRequest.from_prompt("p"), ledger=BudgetLedger())
    assert len(slow.requests) == 1  # a retry-after past the deadline is not waited for


async def test_quota_headers_pause_the_lane_before_the_provider_refuses() -> None:
    window = 0.5
    async with FakeOpenAIServer(rpm=4, window=window, rate_headers=True) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        # the lane knows nothing of the RPM; one call at a time so every answer's headers are read
        dispatcher = Dispatcher(limits={"openai": Limits(max_concurrency=1)})
        started = time.perf_counter()
        try:
            requests = prompts(10)
            outcomes = await dispatcher.call_many(model, requests, ledger=BudgetLedger())
        finally:
            await model.aclose()
    elapsed = time.perf_counter() - started
    assert [getattr(o, "text", None) for o in outcomes] == [answer_for(r.messages[-1].content) for r in requests]
    assert server.counters.limited == 0  # "remaining 0" paused the lane until the reset: never refused
    assert elapsed >= 2 * window - 0.05  # 10 calls at 4 per window need two resets


async def test_a_full_rpm_window_pauses_the_lane() -> None:
    window = 0.5
    async with FakeOpenAIServer(rpm=10, window=window, latency=0.02) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        dispatcher = Dispatcher()  # defaults: slow start from 8, nothing told
        try:
            requests = prompts(60)
            outcomes = await dispatcher.call_many(model, requests, ledger=BudgetLedger())
        finally:
            await model.aclose()
    assert [getattr(o, "text", None) for o in outcomes] == [answer_for(r.messages[-1].content) for r in requests]
    (lane,) = dispatcher.statistics()
    assert lane.concurrency.pauses >= 1  # refusals at levels the provider had just served: the quota
    assert server.max_in_window() <= 10
    assert server.counters.limited < 3 * len(requests)  # each refusal waited; no storm


async def test_an_answer_without_usage_is_charged_its_reservation() -> None:
    async with FakeOpenAIServer(usage=False) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        dispatcher = Dispatcher()
        ledger = HeldLedger(Budget(max_input_tokens=10_000))
        request = prompts(1)[0]
        try:
            response = await dispatcher.call(model, request, ledger=ledger)
        finally:
            await model.aclose()
    assert response.usage.estimated  # the answer said nothing; the model estimated from the text
    (held,) = ledger.held
    # a worst case: every token of the prompt (about four characters each) and max_tokens out
    assert held.calls == 1 and held.input_tokens >= len(request.messages[-1].content) / 4
    assert held.output_tokens == request.max_tokens == 16
    assert ledger.spent == Spend(1, held.input_tokens, held.output_tokens, 0.0) and ledger.reserved == Spend()


async def test_an_overrun_is_recorded_on_the_ledger_the_span_and_the_metric() -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    dispatcher = Dispatcher(tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader]),
                            pricing=Pricing({"big": Price(1.0, 1.0)}))
    sent: list[ModelRequest] = []
    model = ScriptedModel(lambda r: sent.append(r) or ModelResponse("ok", Usage(5000, 500, 1), "big"), name="big")
    ledger = HeldLedger(Budget(max_input_tokens=6000))
    await dispatcher.call(model, ModelRequest.from_prompt("short", max_tokens=100), ledger=ledger)
    (held,) = ledger.held
    assert 2 <= held.input_tokens < 100  # "short" with the chat format's overhead: a few tokens, not 5000
    assert ledger.overrun.input_tokens == 5000 - held.input_tokens
    assert ledger.overrun.output_tokens == 500 - 100
    assert ledger.spent == Spend(1, 5000, 500, (5000 + 500) / 1e6)
    (span,) = exporter.get_finished_spans()
    (event,) = [e for e in span.events if e.name == "rlm.budget.overrun"]
    assert event.attributes is not None and event.attributes["rlm.budget.overrun.output_tokens"] == 400
    data = reader.get_metrics_data()
    assert data is not None
    points = {
        p.attributes["rlm.budget.quantity"]: p.value
        for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
        if m.name == "rlm.budget.overrun" for p in m.data.data_points
    }
    assert points["output_tokens"] == 400
    # 5000 of 6000 spent: 4,000 characters (1,000 tokens at four a token) cannot fit, nothing is sent
    with pytest.raises(BudgetExceededError, match="max_input_tokens"):
        await dispatcher.call(model, ModelRequest.from_prompt("x" * 4000, max_tokens=100), ledger=ledger)
    assert len(ledger.held) == 1 and ledger.reserved == Spend() and len(sent) == 1


async def test_a_cost_cap_needs_a_known_price() -> None:
    async with FakeOpenAIServer() as server:
        model = OpenAIModel("my-self-hosted-model", base_url=server.base_url)
        try:
            with pytest.raises(ConfigurationError, match="no price is known"):
                await Dispatcher().call(model, prompts(1)[0], ledger=BudgetLedger(Budget(max_cost_usd=1.0)))
            with pytest.raises(ConfigurationError):
                Dispatcher().check_budget(model, Budget(max_cost_usd=1.0))
            tenant = BudgetLedger(Budget(max_cost_usd=1.0))  # a cap on an ancestor counts too
            with pytest.raises(ConfigurationError):
                await Dispatcher().call_many(model, prompts(2), ledger=tenant.child())
            assert server.counters.requests == 0  # refused before anything was sent
            Dispatcher().check_budget(model, Budget(max_calls=3))  # no cost cap: no price needed
            priced = Dispatcher(pricing=Pricing({"my-self-hosted-model": Price(0.1, 0.2)}))
            ledger = BudgetLedger(Budget(max_cost_usd=1.0))
            await priced.call(model, prompts(1)[0], ledger=ledger)
        finally:
            await model.aclose()
    assert 0 < ledger.spent.cost_usd < 1e-4
