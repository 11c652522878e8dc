"""A client that leaves examples/service.py mid-run: its tenant is charged what the provider accepted.

The example service runs under uvicorn on a real socket and a real client streams a run from it.
Root and sub-model are the fake OpenAI-compatible provider: the root's one turn fans 40 sub-calls
out, 8 at a time; the fake answers the first 16 requests it admits (the root's turn and 15
sub-calls) and holds every later one. When 8 held sub-calls are in flight the client closes its
connection. A real provider finishes those 8 and bills them; the fake books each at its admission
hold (the prompt's tokens and ``max_tokens``, as Bedrock counts a request), the answered ones at
their usage. Once the service has cancelled the run (the tenant holds no reservation any more),
``GET /tenants/{tenant}/spend`` must count exactly the requests the fake accepted and their output
tokens, and cost no less than the fake's bill at the same prices.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
import uvicorn

from rlmflow import RLM, Dispatcher, Limits, OpenAIModel, Price, Pricing, Usage

from .fakes import FakeOpenAIServer
from .helpers import load_example

pytestmark = pytest.mark.anyio

PROMPTS = 40
WIDTH = 8  # sub-calls in flight at once
ANSWERED = 16  # requests the fake answers (the root's turn among them) before it holds the rest
QUERY = "Question: how long are the items?"
CELL = f"answers = llm_query_many(['item %d' % i for i in range({PROMPTS})])\nFINAL(str(len(answers)))"
PRICES = {"root": Price(3.0, 15.0), "sub": Price(1.0, 4.0)}  # USD per million tokens in, out


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """``app`` under uvicorn on a port of 127.0.0.1 for the block; its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                                           http="h11", ws="none"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(10):
                while not server.started:  # noqa: ASYNC110 - uvicorn has no event for it
                    await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True


def bill(provider: FakeOpenAIServer) -> tuple[int, int, float]:
    """What the fake accepted: input tokens, output tokens and their cost, each unanswered request
    at its admission hold (``max_tokens`` of output)."""
    input_tokens = output_tokens = 0
    cost = 0.0
    for request in provider.admitted:
        output = request.max_tokens if request.output_tokens is None else request.output_tokens
        input_tokens += request.prompt_tokens
        output_tokens += output
        cost += PRICES[request.model].cost(Usage(request.prompt_tokens, output, 1))
    return input_tokens, output_tokens, cost


async def stream_until_held(client: httpx.AsyncClient, provider: FakeOpenAIServer) -> list[str]:
    """Start a run and read its events until the provider holds WIDTH sub-calls, then leave: the
    response, closed unread, closes the client's connection mid-run. The event names read."""
    events: list[str] = []
    body = {"document": "a document about items", "query": QUERY, "tenant": "acme"}
    async with client.stream("POST", "/runs", json=body) as response:
        assert response.status_code == 200

        async def read() -> None:
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    events.append(line.removeprefix("event: "))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            with anyio.fail_after(10):
                while provider.counters.admitted < ANSWERED + WIDTH or provider.requests_in_flight < WIDTH:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    return events


async def settled_spend(client: httpx.AsyncClient, provider: FakeOpenAIServer) -> dict[str, Any]:
    """The tenant's spend once the service has cancelled the run (its calls hold no reservation any
    more) and the provider has let go of the held requests (the service closed them)."""
    with anyio.fail_after(10):  # polled through the service's read endpoint and the fake's counter
        while (spend := (await client.get("/tenants/acme/spend")).json())["reserved"]["calls"]:  # noqa: ASYNC110
            await anyio.sleep(0.01)
        while provider.requests_in_flight:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    return spend


async def test_a_disconnected_tenant_is_charged_every_request_its_provider_accepted() -> None:
    service = load_example()
    reply = f"Let me fan out.\n```repl\n{CELL}\n```"
    async with FakeOpenAIServer(root_marker=QUERY, root_reply=reply, hold_after=ANSWERED) as provider:
        root, sub = OpenAIModel("root", base_url=provider.base_url), OpenAIModel("sub", base_url=provider.base_url)
        # the example's own tenant budget caps cost ($5): every price must be known
        dispatcher = Dispatcher(limits={"openai": Limits(max_concurrency=WIDTH, initial_concurrency=WIDTH)},
                                pricing=Pricing(PRICES))
        try:
            async with RLM(root=root, sub=sub, dispatcher=dispatcher) as rlm, serving(service.create_app(rlm)) as url, \
                    httpx.AsyncClient(base_url=url, timeout=10) as client:
                events = await stream_until_held(client, provider)
                accepted_at_disconnect = provider.counters.admitted
                spend = await settled_spend(client, provider)
        finally:
            await root.aclose()
            await sub.aclose()
    assert "batch_started" in events and "answer" not in events and "run_failed" not in events, events
    assert accepted_at_disconnect == ANSWERED + WIDTH == provider.counters.admitted  # nothing sent after it
    assert sum(request.output_tokens is None for request in provider.admitted) == WIDTH  # accepted, unanswered
    input_tokens, output_tokens, cost = bill(provider)
    assert spend["calls"] == len(provider.admitted)  # each accepted request charged, none other
    assert spend["output_tokens"] == output_tokens
    assert spend["input_tokens"] >= input_tokens  # an unanswered request's input is charged its estimate
    assert spend["cost_usd"] >= cost > 0
    assert spend["reserved"]["input_tokens"] == spend["reserved"]["output_tokens"] == 0
    assert abs(spend["reserved"]["cost_usd"]) < 1e-12  # float sums settled back to zero
