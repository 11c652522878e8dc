"""Exact prompt counts where they matter (issue 21): the provider's count in the ``base`` /
``long-context`` window check, through the real clients against the Bedrock and Anthropic fakes,
and the estimate when a count fails (throttled, an unsupported model, the network, the timeout)."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from rlmflow import Budget, Dispatcher, ModelRequest, ScriptedModel
from rlmflow.eval import DirectApproach, EvalItem
from rlmflow.eval.approaches import Outcome
from rlmflow.models.anthropic import AnthropicModel
from rlmflow.models.base import LanguageModel, TokenCountingModel
from rlmflow.models.bedrock import BedrockModel
from rlmflow.models.counting import PromptCounter

from .fakes._fake_base import FakeProviderBase
from .fakes.fake_anthropic import FakeAnthropicServer
from .fakes.fake_bedrock import FakeBedrockServer

pytestmark = pytest.mark.anyio

CLAUDE_ON_BEDROCK = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
CLAUDE = "claude-sonnet-4-5"
WINDOW, MAX_TOKENS = 4000, 256
PROVIDERS = ["bedrock", "anthropic"]
#: Models that count otherwise than the host's four characters a token.
DENSE: Callable[[str], int] = lambda text: len(text) // 2  # noqa: E731
SPARSE: Callable[[str], int] = lambda text: len(text) // 8  # noqa: E731


@asynccontextmanager
async def provider(kind: str, monkeypatch: pytest.MonkeyPatch, **knobs: Any
                   ) -> AsyncIterator[tuple[FakeProviderBase, LanguageModel]]:
    """A fake of ``kind`` and a model on it, spoken to through its real client."""
    model: LanguageModel
    if kind == "bedrock":
        async with FakeBedrockServer(**knobs) as bedrock_server:
            for name, value in bedrock_server.credentials_env().items():
                monkeypatch.setenv(name, value)
            model = BedrockModel(CLAUDE_ON_BEDROCK, region="us-east-1", endpoint_url=bedrock_server.base_url)
            try:
                yield bedrock_server, model
            finally:
                await model.aclose()
    else:
        async with FakeAnthropicServer(**knobs) as anthropic_server:
            model = AnthropicModel(CLAUDE, base_url=anthropic_server.base_url, api_key=anthropic_server.api_key)
            try:
                yield anthropic_server, model
            finally:
                await model.aclose()


def item(chars: int, marker: str = "", name: str = "q") -> tuple[EvalItem, str]:
    line = "The ledger of the harbour office lists one ship a line. "
    context = (line * (chars // len(line) + 1))[:chars]
    return EvalItem(id=name, question=f"{marker}Which ship came first?", answer="A"), context


def estimate_of(model: LanguageModel, request: ModelRequest) -> int:
    return model.count_tokens("\n".join(m.content for m in request.messages))


async def answer(approach: DirectApproach, question: EvalItem, context: str) -> Outcome:
    dispatcher = Dispatcher()
    try:
        return await approach.answer(question, context, dispatcher=dispatcher, budget=Budget())
    finally:
        await dispatcher.aclose()


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_an_item_the_estimate_fits_but_the_provider_counts_over_is_refused_unsent(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with provider(kind, monkeypatch, tokenizer=DENSE) as (server, model):
        approach = DirectApproach(model, window=WINDOW, max_tokens=MAX_TOKENS)
        question, context = item(12_000)
        request = approach.request(question, context)
        assert estimate_of(model, request) + MAX_TOKENS <= WINDOW  # the estimate would have sent it
        outcome = await answer(approach, question, context)
    exact = server.count_tokens("".join(m.content for m in request.messages))
    assert exact + MAX_TOKENS > WINDOW
    assert not outcome.success and outcome.error_type == "ContextOverflowError"
    assert f"{exact:,} tokens, counted by the provider" in (outcome.error or "")
    assert server.requests_seen == [] and len(server.counts_seen) == 1  # counted, never sent


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_an_item_the_estimate_puts_over_but_the_provider_counts_in_is_sent(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with provider(kind, monkeypatch, tokenizer=SPARSE) as (server, model):
        approach = DirectApproach(model, window=WINDOW, max_tokens=MAX_TOKENS)
        question, context = item(20_000)
        request = approach.request(question, context)
        assert estimate_of(model, request) + MAX_TOKENS > WINDOW  # the estimate would have refused it
        outcome = await answer(approach, question, context)
    assert outcome.success and outcome.reply and outcome.turns == 1
    assert len(server.requests_seen) == 1 and len(server.counts_seen) == 1
    assert outcome.input_tokens + MAX_TOKENS <= WINDOW  # the provider's usage agrees with its count


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_throttled_count_falls_back_to_the_estimate_and_asks_again_next_time(
    kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with provider(kind, monkeypatch, tokenizer=DENSE) as (server, model):
        approach = DirectApproach(model, window=WINDOW, max_tokens=MAX_TOKENS)
        throttled, context = item(12_000, marker="[[count-throttle]] ")
        with caplog.at_level(logging.WARNING, logger="rlmflow"):
            first = await answer(approach, throttled, context)  # the estimate fits: sent
        second = await answer(approach, *item(12_000, name="q2"))  # counted again: over the window
    assert first.success and len(server.requests_seen) == 1
    assert "ThrottledError" in caplog.text and "estimated instead" in caplog.text
    assert not second.success and "counted by the provider" in (second.error or "")
    assert len(server.counts_seen) == 2
    assert approach.counter.statistics().failures == 1 and approach.counter.statistics().refused is None


@pytest.mark.parametrize(("kind", "knobs", "marker"), [
    ("bedrock", {"count_models": ()}, ""),  # CountTokens does not count for this model
    ("anthropic", {}, "[[count-denied]] "),  # the key may not count
])
async def test_a_provider_that_refuses_to_count_is_not_asked_again(
    kind: str, knobs: dict[str, Any], marker: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with provider(kind, monkeypatch, tokenizer=DENSE, **knobs) as (server, model):
        approach = DirectApproach(model, window=WINDOW, max_tokens=MAX_TOKENS)
        with caplog.at_level(logging.WARNING, logger="rlmflow"):
            fits = await answer(approach, *item(12_000, marker=marker))
            over = await answer(approach, *item(20_000, name="q2"))
    assert fits.success and len(server.requests_seen) == 1  # estimated to fit: sent
    assert not over.success and "estimated" in (over.error or "") and len(server.requests_seen) == 1
    assert len(server.counts_seen) == 1 and "estimated from now on" in caplog.text
    assert approach.counter.statistics().refused is not None and not approach.counter.asks_provider


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_slow_count_is_cut_at_its_timeout(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with provider(kind, monkeypatch, tokenizer=DENSE, count_latency=30.0) as (server, model):
        await model.request(ModelRequest.from_prompt("warm"))  # the client exists: the timeout is the count's
        approach = DirectApproach(model, window=WINDOW, max_tokens=MAX_TOKENS, count_timeout=0.05)
        outcome = await answer(approach, *item(12_000))
    assert outcome.success and len(server.requests_seen) == 2  # the estimate fits: sent
    assert approach.counter.statistics().failures == 1 and len(server.counts_seen) == 1


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_count_the_network_loses_falls_back_to_the_estimate(
    kind: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    model: LanguageModel
    if kind == "bedrock":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFAKE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
        model = BedrockModel(CLAUDE_ON_BEDROCK, region="us-east-1", endpoint_url=url)
    else:
        model = AnthropicModel(CLAUDE, base_url=url, api_key="sk-ant-fake")
    counter = PromptCounter(model)
    request = ModelRequest.from_prompt("x" * 400, system="be brief")
    try:
        with caplog.at_level(logging.WARNING, logger="rlmflow"):
            counted = await counter.count(request)
    finally:
        await model.aclose()
    assert not counted.exact and counted.tokens == estimate_of(model, request)
    assert counted.fallback is not None and counted.fallback.startswith("TransientModelError")
    assert "estimated instead" in caplog.text and counter.asks_provider  # the network may come back


async def test_a_model_without_a_provider_count_is_estimated_without_a_request() -> None:
    model = ScriptedModel(lambda request: "A", name="m")
    assert not isinstance(model, TokenCountingModel)
    counter = PromptCounter(model)
    counted = await counter.count(ModelRequest.from_prompt("y" * 400))
    assert (counted.tokens, counted.exact, counted.fallback) == (100, False, None)
    assert counter.statistics().estimated == 1 and "estimates" in repr(counter)
