"""The OpenAI-compatible model against a local server speaking the chat-completions protocol."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from rlmflow import (
    RLM,
    ContextOverflowError,
    FatalModelError,
    ModelRequest,
    OpenAIModel,
    QuotaExhaustedError,
    ThrottledError,
    TransientModelError,
)

pytestmark = pytest.mark.anyio


class FakeOpenAI:
    """Answers /v1/chat/completions; a prompt starting with 'status:NNN' gets that error."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

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
                headers={"retry-after": "3", "x-ratelimit-remaining-requests": "0"},
            )
        answer = "```repl\nFINAL('from fake')\n```" if "Question:" in prompt else f"echo {prompt}"
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
        ("status:429:insufficient_quota", QuotaExhaustedError, 3.0),
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
    assert len(fake.received) == 1  # the SDK's own retries are off


async def test_requests_beyond_loopback_are_refused_in_tests() -> None:
    model = OpenAIModel("gpt-4o-mini", base_url="https://api.openai.com/v1")
    try:
        with pytest.raises(FatalModelError, match="ALLOW_MODEL_REQUESTS"):
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
