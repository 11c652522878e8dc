"""Strands Agents models and rlmflow models, each usable as the other.

- :class:`StrandsModel` makes any strands ``Model`` (Bedrock, Anthropic, OpenAI, LiteLLM,
  Ollama...) an rlmflow :class:`LanguageModel`: every strands provider works as a root or
  sub-model, behind the Dispatcher like any other.
- :class:`DispatchedModel` makes a model a strands ``Model`` whose every call goes through an
  rlmflow Dispatcher (lane limits, retries, the budget ledger, spans and call records). It wraps
  an rlmflow ``LanguageModel`` (text only) or a strands ``Model`` (tools included: the events of
  each attempt are collected, and those of the attempt that succeeded are handed to strands).

strands-agents is imported only when this module is.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from pydantic import BaseModel
from strands.models.model import Model as StrandsBaseModel
from strands.types.content import Messages
from strands.types.exceptions import ContextWindowOverflowException, ModelThrottledException
from strands.types.streaming import StreamEvent
from strands.types.tools import ToolChoice, ToolSpec

from .._exceptions import ConfigurationError, ContextOverflowError, FatalModelError, ModelError, ThrottledError
from ..dispatch.budget import BudgetLedger
from ..dispatch.dispatcher import Dispatcher
from ..dispatch.lane import RunShare
from ..dispatch.limits import Priority
from ..dispatch.records import CallRecorder
from . import guard
from .base import LanguageModel, Message, ModelRequest, ModelResponse, Usage, estimate_tokens
from .registry import parse_model_string

__all__ = ["DispatchedModel", "StrandsModel", "strands_messages_as_text", "strands_root_model"]

T = TypeVar("T", bound=BaseModel)

# strands provider classes -> gen_ai.provider.name, so prices and default limits apply
_PROVIDERS = {"BedrockModel": "aws.bedrock", "AnthropicModel": "anthropic", "OpenAIModel": "openai",
              "LlamaCppModel": "llama.cpp"}


def _provider_of(model: StrandsBaseModel) -> str:
    return _PROVIDERS.get(type(model).__name__, "strands")


def _model_id(model: StrandsBaseModel) -> str:
    config = model.get_config()
    value = config.get("model_id") if isinstance(config, dict) else getattr(config, "model_id", None)
    return str(value or type(model).__name__)


def _check_allowed(model: StrandsBaseModel) -> None:
    """The test guard, for strands models whose boto3 client says where it sends (BedrockModel)."""
    endpoint = getattr(getattr(getattr(model, "client", None), "meta", None), "endpoint_url", None)
    if isinstance(endpoint, str):
        guard.check_request_allowed(endpoint)


def _translate(exc: BaseException, provider: str, model: str) -> ModelError:
    """A strands (or provider SDK) failure as the Dispatcher's error classes."""
    if isinstance(exc, ModelError):
        return exc
    if isinstance(exc, ModelThrottledException):
        return ThrottledError(f"throttled: {exc}", provider=provider, model=model)
    if isinstance(exc, ContextWindowOverflowException):
        return ContextOverflowError(f"input too long for {model}: {exc}", provider=provider, model=model)
    if type(exc).__module__.startswith("botocore"):
        from .bedrock import translate_botocore

        return translate_botocore(exc, provider=provider, model=model)
    return FatalModelError(f"{type(exc).__name__}: {exc}", provider=provider, model=model)


def strands_messages_as_text(messages: Messages) -> list[Message]:
    """strands (Converse-shaped) messages as plain text messages: tool calls and results written out."""
    out: list[Message] = []
    for message in messages:
        parts: list[str] = []
        for block in message["content"]:
            if "text" in block:
                parts.append(block["text"])
            elif "toolUse" in block:
                use = block["toolUse"]
                parts.append(f"[called {use['name']} with {json.dumps(use.get('input'))}]")
            elif "toolResult" in block:
                result = block["toolResult"]
                texts = [str(c.get("text") or c.get("json") or "") for c in result.get("content", [])]
                parts.append(f"[{result.get('status', 'success')} result: {' '.join(texts)}]")
        out.append(Message("assistant" if message["role"] == "assistant" else "user", "\n".join(parts)))
    return out


class _Collected:
    """The events of one strands stream, with the text, usage and stop reason read from them."""

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []
        self.text: list[str] = []
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None

    def add(self, event: StreamEvent) -> None:
        self.events.append(event)
        if "contentBlockDelta" in event:
            text = event["contentBlockDelta"].get("delta", {}).get("text")
            if text:
                self.text.append(text)
        elif "messageStop" in event:
            self.stop_reason = event["messageStop"].get("stopReason")
        elif "metadata" in event:
            self.usage = dict(event["metadata"].get("usage") or {})

    def response(self, model: str, request: ModelRequest) -> ModelResponse:
        text = "".join(self.text)
        if "inputTokens" in self.usage:
            read = int(self.usage.get("cacheReadInputTokens") or 0)
            write = int(self.usage.get("cacheWriteInputTokens") or 0)
            usage = Usage(int(self.usage["inputTokens"]) + read + write, int(self.usage.get("outputTokens") or 0), 1,
                          cache_read_tokens=read, cache_write_tokens=write)
        else:
            usage = Usage(sum(estimate_tokens(m.content) for m in request.messages), estimate_tokens(text), 1,
                          estimated=True)
        return ModelResponse(text=text, usage=usage, model=model, finish_reason=self.stop_reason)


class StrandsModel:
    """A strands ``Model`` as an rlmflow :class:`LanguageModel`.

    Requests are sent with the strands model's own configuration (its ``max_tokens`` and
    sampling settings); nothing is retried here (strands retries at the Agent, not the Model).
    ``provider`` defaults to the strands class's (``aws.bedrock`` for its BedrockModel...).
    """

    def __init__(self, model: StrandsBaseModel, *, provider: str | None = None, name: str | None = None) -> None:
        self.strands_model = model
        self._provider = provider or _provider_of(model)
        self._name = name or _model_id(model)

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def name(self) -> str:
        return self._name

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    @property
    def caches_prompts(self) -> bool:
        """Whether the strands model places cache points of its own (its ``cache_config``)."""
        return _caches(self.strands_model)

    async def request(self, request: ModelRequest) -> ModelResponse:
        system = "\n\n".join(m.content for m in request.messages if m.role == "system") or None
        messages: Messages = [
            {"role": m.role, "content": [{"text": m.content}]}
            for m in request.messages if m.role != "system"
        ]
        _check_allowed(self.strands_model)
        collected = _Collected()
        try:
            async for event in self.strands_model.stream(messages, system_prompt=system):
                collected.add(event)
        except Exception as exc:
            raise _translate(exc, self._provider, self._name) from exc
        return collected.response(self._name, request)

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"StrandsModel({type(self.strands_model).__name__}, {self._name!r})"


def _caches(model: StrandsBaseModel) -> bool:
    config = model.get_config()
    return bool(config.get("cache_config") or config.get("cache_prompt")) if isinstance(config, dict) else False


def strands_root_model(spec: object, *, prompt_cache: bool = True) -> StrandsModel:
    """The root of a strands-style run from ``strands:bedrock:<id>[@region]``, a strands Model or a StrandsModel.

    A root built from a string caches its prompt with strands' own cache points
    (``CacheConfig(strategy="auto")``: after the system prompt and at the end of the newest user
    message, for the Claude models Bedrock caches for) unless ``prompt_cache`` is False; a model
    passed in keeps its own configuration. Raises ConfigurationError for anything else.
    """
    if isinstance(spec, StrandsModel):
        return spec
    if isinstance(spec, StrandsBaseModel):
        return StrandsModel(spec)
    if not isinstance(spec, str):
        raise ConfigurationError(f"the strands root style needs a strands Model or a strands: string, not {spec!r}")
    provider, name, where = parse_model_string(spec.removeprefix("strands:"))
    if provider != "bedrock":
        raise ConfigurationError(
            f"{spec!r}: the strands root style builds strands' BedrockModel (strands:bedrock:<model-id>); "
            "for another provider pass a strands Model object as root"
        )
    from botocore.config import Config
    from strands.models.bedrock import BedrockModel as StrandsBedrock
    from strands.models.model import CacheConfig

    model = StrandsBedrock(
        model_id=name,
        region_name=where,
        streaming=True,
        # the Dispatcher retries; botocore's own retry loop would hide throttles from the lane
        boto_client_config=Config(retries={"total_max_attempts": 1}, read_timeout=300),
        cache_config=CacheConfig(strategy="auto") if prompt_cache else None,
    )
    return StrandsModel(model)


class _OneCall:
    """One strands stream call as a LanguageModel for the Dispatcher (same lane as its model)."""

    def __init__(self, owner: DispatchedModel, run: Callable[[], AsyncIterable[StreamEvent]]) -> None:
        self._owner = owner
        self._run = run
        self.collected = _Collected()

    @property
    def provider(self) -> str:
        return self._owner.provider

    @property
    def name(self) -> str:
        return self._owner.name

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    @property
    def caches_prompts(self) -> bool:
        inner = self._owner.inner
        return _caches(inner) if isinstance(inner, StrandsBaseModel) else bool(getattr(inner, "caches_prompts", False))

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.collected = _Collected()  # a retry starts from scratch
        try:
            async for event in self._run():
                self.collected.add(event)
        except Exception as exc:
            raise _translate(exc, self.provider, self.name) from exc
        # the whole stream as the reply, tool calls included: what a journal or a cache keeps is
        # then enough to give the Agent the same events again
        return replace(self.collected.response(self.name, request),
                       text=json.dumps(self.collected.events, default=_encoded_bytes))

    async def aclose(self) -> None:
        return None


class DispatchedModel(StrandsBaseModel):
    """A model as a strands ``Model``, every call governed by an rlmflow :class:`Dispatcher`.

    ``model`` is an rlmflow ``LanguageModel`` (the conversation is sent as text; tools are not
    offered to it) or a strands ``Model`` (sent as is, tools included). Calls are reserved on
    ``ledger`` (a fresh unlimited one by default), admitted by the model's lane at ``priority``,
    retried by the Dispatcher's policy and reported to ``record``. ``max_tokens`` sizes the
    budget reservation (and is the generation limit of an rlmflow model). ``ask``, when given,
    sends each call instead of the Dispatcher (a run's :class:`~rlmflow._run.calls.CallScope`,
    which may answer it from a journal or a cache and sends the rest to the Dispatcher).
    """

    def __init__(
        self,
        model: LanguageModel | StrandsBaseModel,
        *,
        dispatcher: Dispatcher,
        ledger: BudgetLedger | None = None,
        share: RunShare | None = None,
        priority: Priority = Priority.SUB,
        depth: int = 0,
        max_tokens: int = 1024,
        record: CallRecorder | None = None,
        capture: int = 0,
        ask: Callable[[LanguageModel, ModelRequest], Awaitable[ModelResponse]] | None = None,
    ) -> None:
        self.inner = model
        self._ask = ask
        self._strands = model if isinstance(model, StrandsBaseModel) else None
        self._language = model if not isinstance(model, StrandsBaseModel) else None
        self.provider = _provider_of(model) if isinstance(model, StrandsBaseModel) else model.provider
        self.name = _model_id(model) if isinstance(model, StrandsBaseModel) else model.name
        self._dispatcher = dispatcher
        self._ledger = ledger or BudgetLedger()
        self._share = share
        self._priority = priority
        self._depth = depth
        self._max_tokens = max_tokens
        self._record = record
        self._capture = capture
        self._config: dict[str, Any] = {"model_id": self.name, "max_tokens": max_tokens}

    def update_config(self, **model_config: Any) -> None:
        self._config.update(model_config)
        if "max_tokens" in model_config:
            self._max_tokens = int(model_config["max_tokens"])

    def get_config(self) -> dict[str, Any]:
        return dict(self._config)

    async def _call(self, model: LanguageModel, request: ModelRequest) -> ModelResponse:
        if self._ask is not None:
            return await self._ask(model, request)
        return await self._dispatcher.call(
            model, request, ledger=self._ledger, share=self._share, priority=self._priority, depth=self._depth,
            record=self._record, parent=otel_context.get_current(), capture=self._capture,
        )

    async def stream(
        self,
        messages: Messages,
        tool_specs: list[ToolSpec] | None = None,
        system_prompt: str | None = None,
        *,
        tool_choice: ToolChoice | None = None,
        **kwargs: Any,
    ) -> AsyncGenerator[StreamEvent, None]:
        text: Sequence[Message] = strands_messages_as_text(messages)
        if system_prompt:
            text = [Message("system", system_prompt), *text]
        request = ModelRequest(messages=tuple(text), max_tokens=self._max_tokens)
        if self._language is not None:
            response = await self._call(self._language, request)
            for event in _text_events(response):
                yield event
            return
        assert self._strands is not None
        inner = self._strands
        _check_allowed(inner)

        def run() -> AsyncIterable[StreamEvent]:
            return inner.stream(messages, tool_specs, system_prompt, tool_choice=tool_choice, **kwargs)

        call = _OneCall(self, run)
        response = await self._call(call, request)
        # a live call gives its events as they came; an answer from a journal or a cache, as kept
        for event in call.collected.events if call.collected.events else _stream_of(response.text):
            yield event

    async def structured_output(
        self, output_model: type[T], prompt: Messages, system_prompt: str | None = None, **kwargs: Any
    ) -> AsyncGenerator[dict[str, T | Any], None]:
        if self._strands is None:
            raise FatalModelError("structured output needs a strands model inside DispatchedModel")
        async for event in self._strands.structured_output(output_model, prompt, system_prompt, **kwargs):
            yield event


_BYTES = "__rlmflow_base64__"


def _encoded_bytes(value: object) -> dict[str, str]:  # json.dumps's default=
    """Bytes in a stream event (Bedrock's redacted reasoning) as JSON, given back by :func:`_stream_of`."""
    if isinstance(value, bytes | bytearray):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    return {"repr": repr(value)[:1000]}  # nothing strands sends today; kept readable, never a failed call


def _decoded_bytes(value: dict[str, Any]) -> object:
    if len(value) == 1 and isinstance(value.get(_BYTES), str):
        return base64.b64decode(value[_BYTES])
    return value


def _stream_of(text: str) -> list[StreamEvent]:
    """The events of a strands stream, from the reply :class:`_OneCall` gave (or a journal kept)."""
    try:
        events = json.loads(text, object_hook=_decoded_bytes)
    except ValueError:
        events = None
    if not isinstance(events, list) or not all(isinstance(event, dict) for event in events):
        raise FatalModelError("a recorded strands reply is not a list of stream events")
    return events


def _text_events(response: ModelResponse) -> list[StreamEvent]:
    """A whole text reply as the Converse-shaped events strands reads."""
    usage = response.usage
    return [
        {"messageStart": {"role": "assistant"}},
        {"contentBlockDelta": {"delta": {"text": response.text}}},
        {"contentBlockStop": {}},
        {"messageStop": {"stopReason": "max_tokens" if response.finish_reason in ("length", "max_tokens")
                         else "end_turn"}},
        # Converse's inputTokens leaves the cached parts out, as strands expects
        {"metadata": {"usage": {
            "inputTokens": usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens,
            "outputTokens": usage.output_tokens, "totalTokens": usage.total_tokens,
            "cacheReadInputTokens": usage.cache_read_tokens, "cacheWriteInputTokens": usage.cache_write_tokens,
        }, "metrics": {"latencyMs": 0}}},
    ]
