"""Fail before the 200: a service checks a run before it answers, and a stream always ends with an event."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from rlmflow import (
    RLM,
    Budget,
    BudgetExceededError,
    BudgetLedger,
    ConfigurationError,
    ContextError,
    ScriptedModel,
    Spend,
)
from rlmflow.events import RunFailed

from .helpers import load_example, turn_script

pytestmark = pytest.mark.anyio


class UnpricedModel(ScriptedModel):
    """A self-hosted model nobody gave a price (vLLM, Ollama)."""

    price = None  # type: ignore[assignment]




async def test_check_refuses_what_a_run_would_refuse_without_running() -> None:
    root = turn_script(["FINAL('x')"])
    async with RLM(root=root) as rlm:
        with pytest.raises(ContextError):
            rlm.check("", "q?")
        with pytest.raises(ContextError):
            rlm.check(5, "q?")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="query"):
            rlm.check("doc", "  ")
        with pytest.raises(ConfigurationError, match="metadata"):
            rlm.check("doc", "q?", metadata={"bad key!": "x"})
        tenant = BudgetLedger(Budget(max_calls=1))
        tenant.reserve(Spend(calls=1))  # held by a run in flight: nothing left
        with pytest.raises(BudgetExceededError) as caught:
            rlm.check("doc", "q?", ledger=tenant)
        assert caught.value.limit == "max_calls"
        rlm.check("doc", "q?")  # a good one passes
    assert root.requests == []  # nothing was sent, no sandbox started


async def test_a_cost_cap_on_a_model_without_a_price_fails_at_once() -> None:
    async with RLM(root=UnpricedModel(["```repl\nFINAL('x')\n```"], name="my-vllm")) as rlm:
        with pytest.raises(ConfigurationError, match="no price is known"):
            rlm.check("doc", "q?", budget=Budget(max_cost_usd=1.0))
        with pytest.raises(ConfigurationError, match="no price is known"):
            rlm.stream("doc", "q?", ledger=BudgetLedger(Budget(max_cost_usd=5.0)))


async def test_stream_refuses_bad_input_at_the_call() -> None:
    async with RLM(root=turn_script(["FINAL('x')"])) as rlm:
        with pytest.raises(ContextError):
            rlm.stream("", "q?")


async def test_a_stream_whose_run_fails_before_it_starts_still_ends_with_run_failed() -> None:
    tenant = BudgetLedger(Budget(max_calls=1))
    async with RLM(root=turn_script(["FINAL('x')"])) as rlm:
        stream = rlm.stream("doc", "q?", ledger=tenant)  # room when checked...
        tenant.reserve(Spend(calls=1))  # ...spent by another run before this one starts
        events = [event async for event in stream]
    assert isinstance(events[-1], RunFailed) and events[-1].error == "BudgetExceededError"
    with pytest.raises(BudgetExceededError):
        await stream.wait()


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"document": "", "query": "q?"}, 422),
        ({"document": 5, "query": "q?"}, 422),
        ({"document": "doc", "query": ""}, 400),
        ({"document": "doc"}, 400),
        ({"document": "doc", "query": "q?", "tenant": ["x"]}, 400),
    ],
)
async def test_the_example_service_answers_4xx_before_any_event(body: dict[str, Any], status: int) -> None:
    service = load_example()
    root = turn_script(["FINAL('x')"])
    app = service.create_app(RLM(root=root))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as client:
        response = await client.post("/runs", json=body)
    assert response.status_code == status and "error" in response.json()
    assert root.requests == []


async def test_the_example_service_refuses_an_unpriced_model_under_a_cost_cap_and_a_spent_tenant() -> None:
    service = load_example()
    app = service.create_app(RLM(root=UnpricedModel(["x"], name="my-vllm")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as client:
        response = await client.post("/runs", json={"document": "doc", "query": "q?"})
        assert response.status_code == 400 and "price" in response.json()["error"]
    app = service.create_app(RLM(root=turn_script(["FINAL('x')"])), tenant_budget=Budget(max_calls=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://service.test") as client:
        first = await client.post("/runs", json={"document": "doc", "query": "q?", "tenant": "acme"})
        assert first.status_code == 200
        second = await client.post("/runs", json={"document": "doc", "query": "q?", "tenant": "acme"})
        assert second.status_code == 402 and second.json()["limit"] == "max_calls"
