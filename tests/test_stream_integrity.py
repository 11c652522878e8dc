"""A streamed reply is whole only when its terminal event arrived, for every provider (issue 18).

Against each provider's fake: a stream that ends cleanly without its terminal event (OpenAI's
``finish_reason`` / ``[DONE]``, Anthropic's ``message_stop``, Bedrock's ``messageStop`` and
``metadata``) is a :class:`TransientModelError` carrying the text so far, which the Dispatcher
retries; a server that answers a streamed request with a plain JSON completion is read as one;
in-stream errors are classified; a reply cut at ``max_tokens`` says so. A run through a server that
cuts half of its streams, or never streams, answers exactly as through a healthy one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from rlmflow import (
    RLM,
    BudgetLedger,
    Dispatcher,
    FatalModelError,
    ModelRequest,
    RetryPolicy,
    ThrottledError,
    TransientModelError,
)
from rlmflow.models import base
from rlmflow.models.anthropic import AnthropicModel
from rlmflow.models.bedrock import BedrockModel
from rlmflow.models.openai import OpenAIModel

from .fakes import FakeAnthropicServer, FakeBedrockServer, FakeOpenAIServer
from .fakes.fake_openai import answer_for

pytestmark = pytest.mark.anyio

PROVIDERS = ["openai", "anthropic", "bedrock"]
CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
#: What each protocol calls a reply that ended normally, and one cut at max_tokens.
STOP = {"openai": ("stop", "length"), "anthropic": ("end_turn", "max_tokens"), "bedrock": ("end_turn", "max_tokens")}


class Wire:
    """One provider's fake and the models made for it (closed with it)."""

    def __init__(self, provider: str, server: FakeOpenAIServer) -> None:
        self.provider = provider
        self.server = server
        self.models: list[Any] = []

    def model(self, **options: Any) -> Any:
        url = self.server.base_url
        if self.provider == "openai":
            made: Any = OpenAIModel("fake-model", base_url=url, **options)
        elif self.provider == "anthropic":
            assert isinstance(self.server, FakeAnthropicServer)
            made = AnthropicModel("claude-sonnet-4-5", base_url=url, api_key=self.server.api_key, **options)
        else:
            made = BedrockModel(CLAUDE, region="us-east-1", endpoint_url=url, **options)
        self.models.append(made)
        return made


@asynccontextmanager
async def wire(provider: str, monkeypatch: pytest.MonkeyPatch, **knobs: Any) -> AsyncIterator[Wire]:
    server: FakeOpenAIServer
    if provider == "openai":
        server = FakeOpenAIServer(**knobs)
    elif provider == "anthropic":
        server = FakeAnthropicServer(**knobs)
    else:
        server = FakeBedrockServer(**knobs)
    async with server:
        if isinstance(server, FakeBedrockServer):
            for name, value in server.credentials_env().items():
                monkeypatch.setenv(name, value)
        connected = Wire(provider, server)
        try:
            yield connected
        finally:
            for model in connected.models:
                await model.aclose()


def fast_dispatcher() -> Dispatcher:
    return Dispatcher(retry=RetryPolicy(base_delay=0.001, max_delay=0.01))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("fault", ["cut", "torn"])
async def test_a_stream_ended_before_its_terminal_event_is_transient_with_its_text(
    provider: str, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut cleanly between events, or inside one: retryable, and the text so far is on the error."""
    async with wire(provider, monkeypatch, stream_faults={fault: 1.0}) as connected:
        pieces: list[str] = []
        with pytest.raises(TransientModelError, match="not whole") as caught:
            await connected.model().request_stream(ModelRequest.from_prompt("tell me all"), pieces.append)
    whole = answer_for("tell me all")
    partial = base.partial_output(caught.value)
    assert partial == "".join(pieces) and partial and whole.startswith(partial) and partial != whole
    assert type(caught.value) is TransientModelError and caught.value.retryable


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_half_the_streams_cut_are_retried_to_whole_replies(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with wire(provider, monkeypatch, stream_faults={"cut": 0.5}) as connected:
        model, dispatcher, records = connected.model(stream=True), fast_dispatcher(), []
        texts = [
            (await dispatcher.call(model, ModelRequest.from_prompt(f"q{i}"), ledger=BudgetLedger(),
                                   record=records.append)).text
            for i in range(6)
        ]
        cuts = connected.server.counters.faults["stream_cut"]
    assert texts == [answer_for(f"q{i}") for i in range(6)]
    assert cuts == 6 and [r.attempts for r in records] == [2] * 6  # streams 1, 3, 5...: each call's first


def scripted_root(last: str) -> str:
    """A two-turn root (and its sub-calls' answers) played by the fake from the last message."""
    if last.startswith("part "):
        return answer_for(last)
    if "gathered 3 parts" in last:
        return "Now the answer.\n```repl\nFINAL(' | '.join(answers))\n```"
    return ("Let me read the parts first.\n```repl\n"
            "answers = llm_query_many([f'part {i} of the report' for i in range(3)])\n"
            "print('gathered', len(answers), 'parts')\n```")


async def run_once(provider: str, monkeypatch: pytest.MonkeyPatch, **knobs: Any) -> tuple[Any, Wire]:
    async with wire(provider, monkeypatch, reply=scripted_root, **knobs) as connected:
        root, sub = connected.model(), connected.model(stream=True)
        async with RLM(root=root, sub=sub, dispatcher=fast_dispatcher()) as rlm:
            return await rlm.run("a report in three parts", "what do the parts say?"), connected


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("knobs", [{"stream_faults": {"cut": 0.5}}, {"never_stream": True}],
                         ids=["half-cut", "never-streams"])
async def test_a_run_answers_exactly_as_through_a_healthy_server(
    provider: str, knobs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    healthy, _ = await run_once(provider, monkeypatch)
    result, connected = await run_once(provider, monkeypatch, **knobs)
    assert healthy.answer == " | ".join(answer_for(f"part {i} of the report") for i in range(3))
    assert result.answer == healthy.answer
    # the root never saw a half reply: the same turns, the same replies
    assert [t.reply for t in result.transcript] == [t.reply for t in healthy.transcript]
    assert result.turns == healthy.turns == 2
    if "stream_faults" in knobs:  # root and sub streams were cut, and every one was asked again
        assert connected.server.counters.faults["stream_cut"] > 2
        assert any(c.role == "root" and c.attempts == 2 for c in result.calls)
        assert any(c.role == "sub" and c.attempts == 2 for c in result.calls)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_plain_completion_answering_a_stream_is_read_whole(
    provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with wire(provider, monkeypatch, never_stream=True) as connected:
        pieces: list[str] = []
        response = await connected.model().request_stream(ModelRequest.from_prompt("no stream"), pieces.append)
        prompt_tokens = connected.server.count_tokens("no stream")
    assert response.text == answer_for("no stream") and pieces == [response.text]
    assert response.finish_reason == STOP[provider][0]
    assert not response.usage.estimated  # the completion's own usage, not a guess from an empty reply
    assert (response.usage.input_tokens, response.usage.output_tokens) == (prompt_tokens, 8)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_reply_cut_at_max_tokens_reports_it(
    provider: str, stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with wire(provider, monkeypatch) as connected:
        model = connected.model(stream=stream)
        response = await model.request(ModelRequest.from_prompt("say a lot", max_tokens=2))
        full = await model.request(ModelRequest.from_prompt("say a lot", max_tokens=64))
    assert response.text == answer_for("say a lot")[:8] and response.finish_reason == STOP[provider][1]
    assert full.text == answer_for("say a lot") and full.finish_reason == STOP[provider][0]


IN_STREAM_ERRORS = [
    ("openai", "server-error", TransientModelError),
    ("openai", "rate-limit", ThrottledError),
    ("openai", "invalid", FatalModelError),  # vLLM's shape: {"object": "error", "code": 400, ...}
    ("anthropic", "overloaded", ThrottledError),
    ("anthropic", "rate-limit", ThrottledError),
    ("anthropic", "server-error", TransientModelError),
    ("anthropic", "invalid", FatalModelError),
    ("bedrock", "throttle", ThrottledError),
    ("bedrock", "server-error", TransientModelError),  # internalServerException
    ("bedrock", "overloaded", TransientModelError),  # serviceUnavailableException
    ("bedrock", "model-stream-error", TransientModelError),  # modelStreamErrorException
    ("bedrock", "validation", FatalModelError),  # validationException
]


@pytest.mark.parametrize(("provider", "kind", "error"), IN_STREAM_ERRORS)
async def test_errors_inside_a_stream_are_classified_and_retried_if_retryable(
    provider: str, kind: str, error: type[Exception], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with wire(provider, monkeypatch, stream_faults={kind: 0.5}) as connected:
        model = connected.model(stream=True)
        with pytest.raises(error) as caught:  # stream 1: the error after partial output
            await model.request(ModelRequest.from_prompt("mid-stream"))
        assert type(caught.value) is error
        assert answer_for("mid-stream").startswith(base.partial_output(caught.value)) and base.partial_output(
            caught.value)
        assert (await model.request(ModelRequest.from_prompt("mid-stream"))).text == answer_for("mid-stream")
        records: list[Any] = []
        call = fast_dispatcher().call(model, ModelRequest.from_prompt("again"), ledger=BudgetLedger(),
                                      record=records.append)
        if caught.value.retryable:  # type: ignore[attr-defined]  # stream 3 fails, stream 4 is whole
            assert (await call).text == answer_for("again") and records[0].attempts == 2
        else:
            with pytest.raises(error):
                await call
            assert records[0].attempts == 1
