"""The OpenAI-compatible model against a local server speaking the chat-completions protocol."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rlmflow import (
    RLM,
    BudgetLedger,
    ContextOverflowError,
    Dispatcher,
    FatalModelError,
    Limits,
    ModelRequest,
    OpenAIModel,
    Price,
    Pricing,
    QuotaExhaustedError,
    RetryPolicy,
    ThrottledError,
    TransientModelError,
    Usage,
)

from .fakes import FakeOpenAIServer
from .fakes.fake_openai import answer_for
from .helpers import turn_script

pytestmark = pytest.mark.anyio


class FakeOpenAI:
    """Answers /v1/chat/completions; a prompt starting with 'status:NNN' gets that error."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.retry_after = "3"

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append(body)
        prompt = body["messages"][-1]["content"]
        if prompt.startswith("status:"):
            status = int(prompt[7:10])
            code = prompt[11:] or None
            return web.json_response(
                {"error": {"message": f"simulated {status}", "type": "test", "code": code}},
                status=status,
                headers={"retry-after": self.retry_after, "x-ratelimit-remaining-requests": "0"},
            )
        answer = "```repl\nFINAL('from fake')\n```" if "Question:" in prompt else f"echo {prompt}"
        if body.get("stream") and prompt.startswith("stream:"):
            return await self.stream_variant(request, prompt[7:])
        if body.get("stream"):
            return await self.stream(request, answer)
        if prompt.startswith("nousage"):
            return web.json_response({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                   "finish_reason": "stop"}]})
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 2, "total_tokens": 0},
            },
            headers={"x-ratelimit-remaining-tokens": "999"},
        )


    async def stream(self, request: web.Request, answer: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in (answer[:4], answer[4:]):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(f"data: {json.dumps(done)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                          "prompt_tokens_details": {"cached_tokens": 3}}}
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response


    async def stream_variant(self, request: web.Request, variant: str) -> web.StreamResponse:
        """Streams that end in other ways: after finish_reason without [DONE] or usage; with [DONE]
        and no finish_reason; with an error object at the top level (older vLLM)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": "part"}, "finish_reason": None}]}]
        if variant == "no-done":
            events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        elif variant == "top-level-error":
            events.append({"object": "error", "message": "generation failed", "type": "InternalServerError",
                           "param": None, "code": 500})
        for event in events:
            await response.write(f"data: {json.dumps(event)}\n\n".encode())
        if variant == "done-only":
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def fake_server() -> AsyncIterator[tuple[str, FakeOpenAI]]:
    fake = FakeOpenAI()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", fake
    finally:
        await runner.cleanup()


async def test_request_usage_and_rate_headers(fake_server: tuple[str, FakeOpenAI]) -> None:
    base_url, fake = fake_server
    model = OpenAIModel("test-model", base_url=base_url)
    try:
        response = await model.request(ModelRequest.from_prompt("one two three", max_tokens=7))
    finally:
        await model.aclose()
    assert response.text == "echo one two three"
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 2)
    assert response.headers["x-ratelimit-remaining-tokens"] == "999"
    assert fake.received[0]["max_tokens"] == 7 and fake.received[0]["model"] == "test-model"


@pytest.mark.parametrize(
    ("prompt", "error", "retry_after"),
    [
        ("status:429", ThrottledError, 3.0),
        ("status:429:insufficient_quota", QuotaExhaustedError, 3.0),  # billing: never retried
        ("status:400:context_length_exceeded", ContextOverflowError, 3.0),
        ("status:404", FatalModelError, 3.0),
        ("status:500", TransientModelError, 3.0),
        ("status:401", FatalModelError, 3.0),
    ],
)
async def test_errors_are_typed(fake_server: tuple[str, FakeOpenAI], prompt: str, error: type,
                                retry_after: float) -> None:
    base_url, fake = fake_server
    model = OpenAIModel("test-model", base_url=base_url)
    try:
        with pytest.raises(error) as caught:
            await model.request(ModelRequest.from_prompt(prompt))
    finally:
        await model.aclose()
    assert caught.value.retry_after == retry_after
    assert caught.value.retryable is (error in (ThrottledError, TransientModelError))
    assert len(fake.received) == 1  # nothing is retried below the Dispatcher


async def test_requests_beyond_loopback_are_refused_in_tests() -> None:
    model = OpenAIModel("gpt-4o-mini", base_url="https://api.openai.com/v1")
    try:
        with pytest.raises(FatalModelError, match="allow_only_loopback"):
            await model.request(ModelRequest.from_prompt("hi"))
    finally:
        await model.aclose()


async def test_connection_refused_is_transient() -> None:
    model = OpenAIModel("m", base_url="http://127.0.0.1:9/v1")
    try:
        with pytest.raises(TransientModelError):
            await model.request(ModelRequest.from_prompt("hi"))
    finally:
        await model.aclose()


async def test_a_run_over_the_wire_with_a_model_string(fake_server: tuple[str, FakeOpenAI]) -> None:
    base_url, fake = fake_server
    async with RLM(root=f"openai:fake-root@{base_url}") as rlm:
        result = await rlm.run("preface " * 100 + "BODY-ONLY-TEXT " * 1000, "what?")
    assert result.answer == "from fake"
    assert "BODY-ONLY-TEXT" not in json.dumps(fake.received)  # metadata and a short preview only
    assert result.usage["fake-root"].calls == 1
    assert result.cost_usd is None  # no price known for a made-up model


async def test_settings_pass_through_and_reasoning_models(fake_server: tuple[str, FakeOpenAI]) -> None:
    base_url, fake = fake_server
    chat, reasoning = OpenAIModel("llama-3", base_url=base_url), OpenAIModel("o4-mini", base_url=base_url)
    request = ModelRequest(messages=ModelRequest.from_prompt("hi").messages, max_tokens=9, temperature=0.7,
                           top_p=0.5, stop=("X",), reasoning_effort="low")
    try:
        await chat.request(request)
        await reasoning.request(request)
    finally:
        await chat.aclose()
        await reasoning.aclose()
    plain, thinking = fake.received
    assert (plain["max_tokens"], plain["temperature"], plain["top_p"], plain["stop"]) == (9, 0.7, 0.5, ["X"])
    assert "reasoning_effort" not in plain
    assert thinking["max_completion_tokens"] == 9 and thinking["reasoning_effort"] == "low"
    assert not {"max_tokens", "temperature", "top_p"} & set(thinking)


async def test_a_reply_without_usage_is_estimated(fake_server: tuple[str, FakeOpenAI]) -> None:
    base_url, _ = fake_server
    model = OpenAIModel("m", base_url=base_url)
    try:
        response = await model.request(ModelRequest.from_prompt("nousage please"))
    finally:
        await model.aclose()
    assert response.usage.estimated and response.usage.input_tokens > 0 and response.usage.output_tokens > 0


async def test_streaming_with_cached_usage(fake_server: tuple[str, FakeOpenAI]) -> None:
    base_url, _ = fake_server
    pieces: list[str] = []
    model = OpenAIModel("m", base_url=base_url, stream=True, on_text=pieces.append)
    try:
        response = await model.request(ModelRequest.from_prompt("abc def"))
    finally:
        await model.aclose()
    assert pieces == ["echo", " abc def"] and response.text == "echo abc def"
    assert (response.usage.input_tokens, response.usage.cache_read_tokens, response.finish_reason) == (5, 3, "stop")


async def test_billing_exhaustion_is_not_retried(fake_server: tuple[str, FakeOpenAI]) -> None:
    base_url, fake = fake_server
    fake.retry_after = "0"
    dispatcher = Dispatcher(retry=RetryPolicy(base_delay=0.001, max_delay=0.01, max_throttles=5))
    model = OpenAIModel("m", base_url=base_url)
    try:
        with pytest.raises(QuotaExhaustedError, match="insufficient_quota"):
            await dispatcher.call(model, ModelRequest.from_prompt("status:429:insufficient_quota"),
                                  ledger=BudgetLedger())
        with pytest.raises(ThrottledError):
            await dispatcher.call(model, ModelRequest.from_prompt("status:429"), ledger=BudgetLedger())
    finally:
        await model.aclose()
    assert len(fake.received) == 1 + 6  # one billing refusal; six attempts (five retries) at the throttle


async def test_two_servers_with_one_model_name_are_two_lanes() -> None:
    dispatcher = Dispatcher(limits={"openai:llama-3": Limits(max_concurrency=3)})
    first = OpenAIModel("llama-3", base_url="http://127.0.0.1:8001/v1")
    second = OpenAIModel("llama-3", base_url="http://127.0.0.1:8002/v1/")
    assert dispatcher.lane(first) is not dispatcher.lane(second)
    assert dispatcher.lane_key(first) == "openai:llama-3@http://127.0.0.1:8001/v1"
    assert dispatcher.lane(second).limits.max_concurrency == 3  # configured by provider:model still


def test_price_overrides_keyed_by_provider_and_model() -> None:
    pricing = Pricing(overrides={"openai:llama-3": Price(1.0, 2.0), "llama-3": Price(10.0, 20.0)})
    usage = Usage(1_000_000, 1_000_000, 1)
    assert pricing.cost("openai", "llama-3", usage) == 3.0
    assert pricing.cost("anthropic", "llama-3", usage) == 30.0  # the bare name covers other providers


async def test_a_run_with_openai_sub_calls_priced_and_pooled_to_the_lane() -> None:
    root = turn_script([
        "answers = llm_query_many([f'chunk {i}' for i in range(40)])\nprint(len(answers))",
        "FINAL(answers[7])",
    ])
    async with FakeOpenAIServer(meet=40) as server:  # each request waits for the 40th (a pool of 4 stops at 4)
        sub = OpenAIModel("my-vllm", base_url=server.base_url, max_pool_connections=4)
        dispatcher = Dispatcher(limits={"openai": Limits(max_concurrency=40, initial_concurrency=40)},
                                pricing=Pricing(overrides={"openai:my-vllm": Price(1.0, 2.0)}))
        try:
            async with RLM(root=root, sub=sub, dispatcher=dispatcher) as rlm:
                result = await rlm.run("x" * 1000, "what?")
        finally:
            await sub.aclose()
    assert result.answer == answer_for("chunk 7")
    sub_calls = [c for c in result.calls if c.role == "sub"]
    assert len(sub_calls) == 40 and server.peak_in_flight == 40
    for call in sub_calls:
        assert call.cost_usd == pytest.approx((call.input_tokens * 1.0 + call.output_tokens * 2.0) / 1e6)


def test_importing_rlmflow_loads_no_provider_client() -> None:
    code = ("import sys, rlmflow; loaded = [m for m in ('openai', 'anthropic', 'aioboto3', 'aiohttp', 'httpx') "
            "if m in sys.modules]; print(loaded); rlmflow.OpenAIModel; print('aiohttp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:2] == ["[]", "True"]  # nothing until a remote model is named


def test_one_model_across_two_event_loops() -> None:
    """run_sync starts a loop per call: the model's session follows the running loop."""
    import asyncio

    async def ask(model: OpenAIModel) -> str:
        async with FakeOpenAIServer() as server:
            model._base_url, model._url = server.base_url, server.base_url + "/chat/completions"
            return (await model.request(ModelRequest.from_prompt("same model"))).text

    model = OpenAIModel("m", base_url="http://127.0.0.1:9/v1")
    assert asyncio.run(ask(model)) == asyncio.run(ask(model)) == answer_for("same model")
    asyncio.run(model.aclose())


@pytest.mark.parametrize(("variant", "finish"), [("no-done", "stop"), ("done-only", None)])
async def test_a_stream_is_whole_at_its_finish_reason_or_its_done(
    fake_server: tuple[str, FakeOpenAI], variant: str, finish: str | None
) -> None:
    """A stream cut after its finish_reason (the usage chunk lost) is whole; so is one with [DONE] only."""
    base_url, _ = fake_server
    model = OpenAIModel("m", base_url=base_url, stream=True)
    try:
        response = await model.request(ModelRequest.from_prompt(f"stream:{variant}"))
    finally:
        await model.aclose()
    assert (response.text, response.finish_reason, response.usage.estimated) == ("part", finish, True)


async def test_an_error_object_at_the_top_of_a_chunk_is_an_error(fake_server: tuple[str, FakeOpenAI]) -> None:
    base_url, _ = fake_server
    model = OpenAIModel("m", base_url=base_url, stream=True)
    try:
        with pytest.raises(TransientModelError, match="generation failed") as caught:
            await model.request(ModelRequest.from_prompt("stream:top-level-error"))
    finally:
        await model.aclose()
    assert caught.value.status_code == 500 and "after 4 characters" in caught.value.message


async def test_the_fake_streams_chunks_as_openai_documents() -> None:
    """Role delta first, content deltas, an empty delta with the finish_reason, then (include_usage) a
    last chunk with ``choices: []`` and the usage (``"usage": null`` on every other), then [DONE]."""
    body = {"model": "m", "messages": [{"role": "user", "content": "chunks please"}], "max_tokens": 64,
            "stream": True, "stream_options": {"include_usage": True}}
    async with FakeOpenAIServer() as server, aiohttp.ClientSession() as session, session.post(
        server.base_url + "/chat/completions", json=body
    ) as response:
        assert response.content_type == "text/event-stream"
        raw = (await response.read()).decode()
    events = [block.removeprefix("data: ") for block in raw.split("\n\n") if block]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert "".join(content) == answer_for("chunks please") and len(content) > 1
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None and c["object"] == "chat.completion.chunk" for c in chunks[:-1])


async def test_a_refusal_for_rate_has_retry_after_and_rate_limit_headers() -> None:
    async with FakeOpenAIServer(rpm=1, tpm=10_000) as server, aiohttp.ClientSession() as session:
        url, body = server.base_url + "/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
        async with session.post(url, json=body) as response:
            assert response.status == 200
        async with session.post(url, json=body) as response:
            headers = response.headers
        model = OpenAIModel("m", base_url=server.base_url)
        try:
            with pytest.raises(ThrottledError) as caught:
                await model.request(ModelRequest.from_prompt("again"))
        finally:
            await model.aclose()
    assert int(headers["retry-after"]) == 60 and int(headers["retry-after-ms"]) > 59_000
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("1", "0")
    assert headers["x-ratelimit-limit-tokens"] == "10000" and headers["x-ratelimit-reset-requests"].endswith("s")
    assert caught.value.retry_after is not None and caught.value.retry_after > 59
