"""The Anthropic Messages model over the lean HTTP path, against a local fake of the API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rlmflow import (
    RLM,
    BudgetLedger,
    ContextOverflowError,
    Dispatcher,
    FatalModelError,
    Limits,
    ModelRequest,
    QuotaExhaustedError,
    RetryPolicy,
    ThrottledError,
    TransientModelError,
)
from rlmflow.models import estimate_tokens, parse_model_string
from rlmflow.models.anthropic import AnthropicModel

from .fakes.fake_anthropic import FakeAnthropicServer
from .fakes.fake_openai import answer_for
from .helpers import turn_script

pytestmark = pytest.mark.anyio

MODEL = "claude-sonnet-4-5"


@pytest.fixture
async def server() -> AsyncIterator[FakeAnthropicServer]:
    async with FakeAnthropicServer() as fake:
        yield fake


def claude(server: FakeAnthropicServer, **options: object) -> AnthropicModel:
    return AnthropicModel(MODEL, base_url=server.base_url, api_key=server.api_key, **options)  # type: ignore[arg-type]


async def test_messages_with_usage_settings_and_rate_headers(server: FakeAnthropicServer) -> None:
    server.rpm, server.tpm = 100, 10_000
    model = claude(server)
    try:
        request = ModelRequest(
            messages=ModelRequest.from_prompt("count the reports", system="be exact").messages,
            max_tokens=32, temperature=0.3, stop=("END",),
        )
        response = await model.request(request)
    finally:
        await model.aclose()
    sent = server.requests_seen[0]
    assert sent["system"] == "be exact" and sent["messages"] == [{"role": "user", "content": "count the reports"}]
    assert (sent["max_tokens"], sent["temperature"], sent["stop_sequences"]) == (32, 0.3, ["END"])
    assert "top_p" not in sent
    assert response.text == answer_for("count the reports")
    assert response.usage.input_tokens == server.count_tokens("be exact" + "count the reports")
    assert response.usage.output_tokens == 8 and not response.usage.estimated
    assert response.headers["anthropic-ratelimit-requests-remaining"] == "99"
    assert "anthropic-ratelimit-tokens-reset" in response.headers


async def test_streaming_hands_out_pieces(server: FakeAnthropicServer) -> None:
    pieces: list[str] = []
    model = claude(server, stream=True, on_text=pieces.append)
    try:
        response = await model.request(ModelRequest.from_prompt("stream it"))
    finally:
        await model.aclose()
    assert len(pieces) > 1 and "".join(pieces) == response.text == answer_for("stream it")
    assert response.finish_reason == "end_turn" and response.usage.output_tokens == 8
    assert response.usage.input_tokens == server.count_tokens("stream it")


@pytest.mark.parametrize(
    ("directive", "error", "retryable"),
    [
        ("throttle", ThrottledError, True),
        ("overloaded", ThrottledError, True),  # 529
        ("server-error", TransientModelError, True),
        ("quota", QuotaExhaustedError, False),  # credit balance too low: never retried
        ("denied", FatalModelError, False),
    ],
)
async def test_errors_are_classified(
    server: FakeAnthropicServer, directive: str, error: type[Exception], retryable: bool
) -> None:
    model = claude(server)
    try:
        with pytest.raises(error) as caught:
            await model.request(ModelRequest.from_prompt(f"[[{directive}]]"))
    finally:
        await model.aclose()
    assert type(caught.value) is error and caught.value.retryable is retryable  # type: ignore[attr-defined]
    assert server.counters.requests == 1


async def test_throttle_carries_retry_after_and_too_long_is_overflow(server: FakeAnthropicServer) -> None:
    server.context_window = 20
    model = claude(server)
    try:
        with pytest.raises(ThrottledError) as throttled:
            await model.request(ModelRequest.from_prompt("[[throttle]]"))
        with pytest.raises(ContextOverflowError, match="prompt is too long"):
            await model.request(ModelRequest.from_prompt("word " * 200))
    finally:
        await model.aclose()
    assert throttled.value.retry_after == 1.0


async def test_overloaded_mid_stream_is_retried_by_the_dispatcher(server: FakeAnthropicServer) -> None:
    pieces: list[str] = []
    model = claude(server)
    dispatcher = Dispatcher(retry=RetryPolicy(base_delay=0.001, max_delay=0.01))
    try:
        with pytest.raises(ThrottledError, match=r"after \d+ characters"):
            await model.request_stream(ModelRequest.from_prompt("[[stream-throttle]] go"), pieces.append)
        assert len(pieces) == 1
        streaming = claude(server, stream=True)
        try:
            records = []
            response = await dispatcher.call(streaming, ModelRequest.from_prompt("[[stream-throttle x1]] go"),
                                             ledger=BudgetLedger(), record=records.append)
        finally:
            await streaming.aclose()
    finally:
        await model.aclose()
    assert response.text == answer_for("[[stream-throttle x1]] go")
    assert (records[0].attempts, records[0].throttles) == (2, 1)


async def test_an_exhausted_quota_header_pauses_the_lane(server: FakeAnthropicServer) -> None:
    server.rpm = 1
    dispatcher = Dispatcher()
    model = claude(server)
    try:
        await dispatcher.call(model, ModelRequest.from_prompt("one"), ledger=BudgetLedger())
        (lane,) = dispatcher.statistics()
    finally:
        await model.aclose()
    assert lane.paused_for > 50  # remaining 0: wait for the RFC 3339 reset a minute away


async def test_pool_reaches_the_lane_ceiling(server: FakeAnthropicServer) -> None:
    server.meet = 40  # each request waits for the 40th: a pool of 4 would stop at 4
    dispatcher = Dispatcher(limits={"anthropic": Limits(max_concurrency=40, initial_concurrency=40)})
    model = claude(server, max_pool_connections=4)
    try:
        results = await dispatcher.call_many(
            model, [ModelRequest.from_prompt(f"q{i}", max_tokens=16) for i in range(40)], ledger=BudgetLedger()
        )
    finally:
        await model.aclose()
    assert all(not isinstance(r, Exception) for r in results)
    assert server.peak_in_flight == 40


async def test_a_run_with_anthropic_sub_calls_and_cost(server: FakeAnthropicServer) -> None:
    root = turn_script([
        "answers = llm_query_many([f'part {i}: ' + context[i * 10:(i + 1) * 10] for i in range(5)])\n"
        "print(answers)",
        "FINAL(answers[-1])",
    ])
    sub = claude(server)
    document = "0123456789" * 5
    try:
        async with RLM(root=root, sub=sub) as rlm:
            result = await rlm.run(document, "what?")
    finally:
        await sub.aclose()
    assert result.answer == answer_for("part 4: 0123456789")
    sub_calls = [c for c in result.calls if c.role == "sub"]
    assert len(sub_calls) == 5 == server.counters.admitted
    assert all(c.provider == "anthropic" and c.output_tokens == 8 for c in sub_calls)
    assert all(c.cost_usd is not None and c.cost_usd > 0 for c in sub_calls)


async def test_a_run_from_an_anthropic_model_string(
    server: FakeAnthropicServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", server.api_key)
    server.reply = lambda prompt: "```repl\nFINAL('from claude')\n```"
    assert parse_model_string(f"anthropic:{MODEL}") == ("anthropic", MODEL, None)
    async with RLM(root=f"anthropic:{MODEL}@{server.base_url}") as rlm:
        assert isinstance(rlm.root, AnthropicModel)
        result = await rlm.run("some text", "what?")
    assert result.answer == "from claude" and result.calls[0].provider == "anthropic"


async def test_the_fake_streams_the_documented_events(server: FakeAnthropicServer) -> None:
    """message_start (input usage), content_block_start, ping, deltas, content_block_stop, message_delta
    (stop_reason, output usage), message_stop: what the client reads, pings passed over."""
    import json

    import aiohttp

    body = {"model": MODEL, "max_tokens": 64, "stream": True, "messages": [{"role": "user", "content": "events"}]}
    headers = {"x-api-key": server.api_key, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as session, session.post(
        server.base_url + "/v1/messages", json=body, headers=headers
    ) as response:
        raw = (await response.read()).decode()
    blocks = [block.split("\n") for block in raw.split("\n\n") if block]
    names = [lines[0].removeprefix("event: ") for lines in blocks]
    data = [json.loads(lines[1].removeprefix("data: ")) for lines in blocks]
    assert [d["type"] for d in data] == names
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"] and deltas > 1
    assert data[0]["message"]["usage"]["input_tokens"] == server.count_tokens("events")
    assert data[-2]["delta"]["stop_reason"] == "end_turn" and data[-2]["usage"]["output_tokens"] == 8
    assert "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta") == answer_for("events")


@pytest.mark.parametrize(
    ("kind", "error", "retryable"),
    [("overloaded", ThrottledError, True), ("invalid", FatalModelError, False), ("cut", TransientModelError, True)],
)
async def test_stream_directives_script_one_in_stream_fault(
    server: FakeAnthropicServer, kind: str, error: type[Exception], retryable: bool
) -> None:
    model = claude(server, stream=True)
    try:
        with pytest.raises(error, match=r"after \d+ characters") as caught:
            await model.request(ModelRequest.from_prompt(f"[[stream-{kind}]] go"))
        later = await model.request(ModelRequest.from_prompt("plain"))
    finally:
        await model.aclose()
    assert type(caught.value) is error and caught.value.retryable is retryable  # type: ignore[attr-defined]
    assert later.text == answer_for("plain")


# -- count_tokens --------------------------------------------------------------------------------------
async def test_count_tokens_is_what_the_same_request_is_billed(server: FakeAnthropicServer) -> None:
    """``/v1/messages/count_tokens`` with the request's model, system prompt and messages (no
    max_tokens or sampling settings, which the endpoint refuses) answers the prompt tokens the same
    Messages request's usage reports: the provider's count, not the host's estimate."""
    server.tokenizer = lambda text: len(text) // 2  # this model counts twice what the estimate says
    model = claude(server)
    request = ModelRequest(messages=ModelRequest.from_prompt("count the reports", system="be exact").messages,
                           max_tokens=32, temperature=0.3, top_p=0.9, stop=("END",))
    try:
        counted = await model.count_request_tokens(request)
        response = await model.request(request)
    finally:
        await model.aclose()
    text = "be exact" + "count the reports"
    assert counted == response.usage.input_tokens == server.count_tokens(text) == len(text) // 2
    assert counted != estimate_tokens(text)
    assert server.counts_seen == [{"model": MODEL, "system": "be exact",
                                   "messages": [{"role": "user", "content": "count the reports"}]}]
    assert len(server.admitted) == 1  # a count is not a model call


@pytest.mark.parametrize(
    ("model_name", "prompt", "error", "match"),
    [
        ("gpt-4o", "hi", FatalModelError, "404 not_found_error"),
        (MODEL, "[[count-throttle]] hi", ThrottledError, "throttled"),
        (MODEL, "[[count-overloaded]] hi", ThrottledError, "overloaded"),
        (MODEL, "[[count-denied]] hi", FatalModelError, "authentication_error"),
    ],
)
async def test_count_tokens_errors_are_classified(
    server: FakeAnthropicServer, model_name: str, prompt: str, error: type[Exception], match: str
) -> None:
    model = AnthropicModel(model_name, base_url=server.base_url, api_key=server.api_key)
    try:
        with pytest.raises(error, match=match) as caught:
            await model.count_request_tokens(ModelRequest.from_prompt(prompt))
        if model_name == MODEL:  # a count's directive is the count's only
            assert (await model.request(ModelRequest.from_prompt(prompt))).text == answer_for(prompt)
    finally:
        await model.aclose()
    assert type(caught.value) is error
