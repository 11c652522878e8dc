"""Anthropic's Messages API, spoken over the shared lean HTTP path.

The anthropic SDK is not needed (nor imported): its wire format is small, and the SDK costs
about ten times the host CPU per call of the lean path (``benchmarks/providers.py``).
``anthropic-ratelimit-*`` headers go back to the Dispatcher, which pauses the lane when a quota
is at zero; 429 and 529 (overloaded) are throttles; nothing is retried here.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .._exceptions import (
    ContextOverflowError,
    FatalModelError,
    ModelError,
    QuotaExhaustedError,
    ThrottledError,
    TransientModelError,
)
from ._http import (
    DEFAULT_POOL_CONNECTIONS,
    HTTPFailure,
    HTTPModel,
    HTTPStatus,
    ServerEvent,
    StreamedText,
    rate_headers,
    retry_after,
)
from .base import (
    ModelRequest,
    ModelResponse,
    TextCallback,
    Usage,
    estimated_usage,
    split_system,
)
from .caching import PromptCache, cache_points, resolve_prompt_cache
from .openai import missing_key_error, needs_api_key

__all__ = ["AnthropicModel"]

API_VERSION = "2023-06-01"
#: The members of a Messages body that ``count_tokens`` takes (it refuses ``max_tokens`` and sampling settings).
_COUNTED = ("model", "messages", "system")
#: A breakpoint: the prompt up to the end of this block is cached (5 minutes from its last use).
EPHEMERAL: dict[str, str] = {"type": "ephemeral"}


class AnthropicModel(HTTPModel):
    """A Claude model on Anthropic's API (``anthropic:<model>``).

    ``base_url`` defaults to ``$ANTHROPIC_BASE_URL``, then ``https://api.anthropic.com``; the
    key to ``$ANTHROPIC_API_KEY`` (Anthropic's own API without one fails :meth:`check_ready`,
    which ``RLM.check`` and ``RLM.run`` call before anything runs; another base URL, a gateway or
    a local server, may need none). ``stream=True`` makes :meth:`request` stream, calling
    ``on_text`` with each piece of text as it arrives.

    :meth:`count_request_tokens` asks ``/v1/messages/count_tokens`` for a request's exact input
    tokens (free; its own rate limits, apart from the Messages API's).

    ``prompt_cache`` says where ``cache_control`` goes: by default on the messages a request marks
    (``Message.cache_point``), within the model's minimum cacheable length and the API's 4
    breakpoints; ``False`` sends none (and the messages as plain strings), a
    :class:`~rlmflow.models.caching.PromptCache` sets the rules.
    """

    rate_header_prefixes = ("retry-after", "anthropic-ratelimit-")
    terminal_event = "message_stop"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        max_pool_connections: int = DEFAULT_POOL_CONNECTIONS,
        stream: bool = False,
        on_text: TextCallback | None = None,
        prompt_cache: PromptCache | bool | None = None,
    ) -> None:
        self.prompt_cache = resolve_prompt_cache(prompt_cache, "anthropic", model)
        super().__init__(
            model, base_url or os.environ.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com",
            provider="anthropic", pool=max_pool_connections, timeout=timeout, stream=stream, on_text=on_text,
        )
        self._url = self._base_url + "/v1/messages"
        self._count_url = self._base_url + "/v1/messages/count_tokens"
        self._api_key = api_key or os.environ.get("ANTHROPIC_API_KEY") or None
        self._headers = {
            "x-api-key": self._api_key or "",
            "anthropic-version": API_VERSION,
            "content-type": "application/json",
        }

    def check_ready(self) -> None:
        """Raise :class:`ConfigurationError` at once if this model's endpoint is a hosted API and no
        key was given (rather than a 401, or a DNS failure retried for seconds, on the first call)."""
        if self._api_key is None and needs_api_key(self._base_url):
            raise missing_key_error(self._provider, self._model, self._base_url, "ANTHROPIC_API_KEY")

    @property
    def caches_prompts(self) -> bool:
        """Whether requests may carry breakpoints (a cache write costs more: the Dispatcher reserves it)."""
        return self.prompt_cache.enabled

    def payload(self, request: ModelRequest) -> dict[str, Any]:
        """The JSON body of ``request``: system apart, consecutive turns of one role merged.

        With caching on, messages of one role are not joined but sent as text blocks of their own
        (a turn reads the same whether or not a breakpoint is on it this time) and marked ones
        carry ``cache_control``; a lone block without one is sent as a plain string, which the
        API reads as that same block.
        """
        if self.prompt_cache.enabled:
            return self._cached_payload(request)
        system, messages = split_system(request)
        turns: list[dict[str, Any]] = []
        for message in messages:
            if turns and turns[-1]["role"] == message.role:
                turns[-1]["content"] += "\n\n" + message.content
            else:
                turns.append({"role": message.role, "content": message.content})
        return self._settings({"model": self._model, "max_tokens": request.max_tokens, "messages": turns},
                              request, "\n\n".join(system))

    def _cached_payload(self, request: ModelRequest) -> dict[str, Any]:
        points = cache_points(request.messages, self.prompt_cache, self.count_tokens)
        system: list[dict[str, Any]] = []
        turns: list[dict[str, Any]] = []
        for index, message in enumerate(request.messages):
            block: dict[str, Any] = {"type": "text", "text": message.content}
            if index in points:
                block["cache_control"] = EPHEMERAL
            if message.role == "system":
                system.append(block)
            elif turns and turns[-1]["role"] == message.role:
                turns[-1]["content"].append(block)
            else:
                turns.append({"role": message.role, "content": [block]})
        for turn in turns:
            turn["content"] = _plain(turn["content"])
        return self._settings({"model": self._model, "max_tokens": request.max_tokens, "messages": turns},
                              request, _plain(system) if system else "")

    @staticmethod
    def _settings(body: dict[str, Any], request: ModelRequest, system: str | list[dict[str, Any]]) -> dict[str, Any]:
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        return body

    async def count_request_tokens(self, request: ModelRequest) -> int:
        """The input tokens Anthropic counts for ``request``: ``POST /v1/messages/count_tokens``
        with the request's model, system prompt and messages as :meth:`payload` sends them (the
        endpoint takes no ``max_tokens`` or sampling settings). Errors are :meth:`request`'s (an
        unknown model is a 404, a :class:`FatalModelError`); its rate-limit headers, which are
        the counting endpoint's own, are not passed on to the lane."""
        body = {key: value for key, value in self.payload(request).items() if key in _COUNTED}
        reply, _headers = await self._post(body, url=self._count_url)
        tokens = reply.get("input_tokens") if isinstance(reply, dict) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise TransientModelError(f"a malformed token count: {str(reply)[:200]}", provider="anthropic",
                                      model=self._model)
        return tokens

    async def _request(self, request: ModelRequest) -> ModelResponse:
        reply, headers = await self._post(self.payload(request))
        text = _text_of(reply)
        return ModelResponse(
            text=text,
            usage=_usage(reply.get("usage"), request, text),
            model=reply.get("model") or self._model,
            finish_reason=reply.get("stop_reason"),
            headers=rate_headers(headers, self.rate_header_prefixes),
        )

    async def request_stream(self, request: ModelRequest, on_text: TextCallback | None) -> ModelResponse:
        """Stream one request (server-sent events), calling ``on_text`` with each piece of text.

        The reply is whole once ``message_stop`` arrived; a stream that ends before it is a
        :class:`TransientModelError`. A server that answers with a plain ``message`` is read as one.
        """
        reply = await self._post_streamed({**self.payload(request), "stream": True}, on_text, _read_event,
                                          _read_message)
        text = reply.text
        return ModelResponse(text=text, usage=_usage(reply.usage, request, text), model=reply.model or self._model,
                             finish_reason=reply.finish, headers=reply.headers)

    def _translate(self, exc: HTTPStatus | HTTPFailure) -> ModelError:
        where: dict[str, Any] = {"provider": "anthropic", "model": self._model}
        if isinstance(exc, HTTPFailure):
            return TransientModelError(f"connection to {self._base_url} failed: {exc}", **where)
        status, body = exc.status, exc.body
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        kind = str(error.get("type") or "")
        message = str(error.get("message") or body)
        detail: dict[str, Any] = {**where, "status_code": status, "retry_after": retry_after(exc.headers)}
        if kind == "rate_limit_error" or status == 429:
            return ThrottledError(f"throttled: {message}", **detail)
        if kind == "overloaded_error" or status == 529:
            return ThrottledError(f"Anthropic is overloaded: {message}", **detail)
        if "credit balance" in message.lower() or status == 402:
            billing = QuotaExhaustedError(f"billing quota exhausted: {message}", **detail)
            billing.retryable = False  # no retry can succeed until the account is paid
            return billing
        if status in (400, 413) and ("too long" in message.lower() or kind == "request_too_large"):
            return ContextOverflowError(f"prompt too long for {self._model}: {message}", **detail)
        if status >= 500 or kind == "api_error" or status == 408:
            return TransientModelError(f"server error {status}: {message}", **detail)
        return FatalModelError(f"request rejected ({status} {kind}): {message}", **detail)



def _plain(blocks: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """One text block with no breakpoint as the string it stands for; blocks otherwise."""
    return blocks[0]["text"] if len(blocks) == 1 and "cache_control" not in blocks[0] else blocks


def _read_event(event: ServerEvent, reply: StreamedText) -> bool:
    """One Messages stream event into ``reply``; True at ``message_stop`` (pings and unknown events pass)."""
    data = json.loads(event.data)
    kind = data.get("type")
    if kind == "content_block_delta":
        delta = data.get("delta") or {}
        if delta.get("type") == "text_delta":
            reply.add(delta["text"])
    elif kind == "message_start":
        message = data.get("message") or {}
        reply.usage = dict(message.get("usage") or {})
        reply.model = message.get("model")
    elif kind == "message_delta":
        reply.usage = {**(reply.usage or {}), **(data.get("usage") or {})}
        reply.finish = (data.get("delta") or {}).get("stop_reason") or reply.finish
    elif kind == "message_stop":
        reply.done = True
        return True
    elif kind == "error":  # after the 200 status line: overloaded, rate limit...
        raise HTTPStatus(_status_of(data), reply.headers, data)
    return False


def _read_message(body: Any, reply: StreamedText) -> None:
    """A plain ``message`` answering a streamed request, read into ``reply`` as a whole."""
    if body.get("type") == "error":
        raise HTTPStatus(_status_of(body), reply.headers, body)
    if body.get("type") != "message":
        return  # not a message: the reply stays not whole
    text = _text_of(body)
    if text:
        reply.add(text)
    reply.finish, reply.usage, reply.model = body.get("stop_reason"), body.get("usage"), body.get("model")
    reply.done = True


def _text_of(message: dict[str, Any]) -> str:
    return "".join(b.get("text", "") for b in message.get("content") or [] if b.get("type") == "text")


#: The HTTP status of each error type, for an error event sent inside a stream.
_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
           "permission_error": 403, "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
           "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


def _status_of(event: dict[str, Any]) -> int:
    error = event.get("error")
    return _STATUS.get(str((error if isinstance(error, dict) else {}).get("type") or ""), 500)


def _usage(raw: dict[str, Any] | None, request: ModelRequest, text: str) -> Usage:
    """Anthropic usage mapped to ours: its ``input_tokens`` leaves out cache reads and writes, ours counts them."""
    if not raw or "input_tokens" not in raw:
        return estimated_usage(request, text)
    read = int(raw.get("cache_read_input_tokens") or 0)
    write = int(raw.get("cache_creation_input_tokens") or 0)
    return Usage(int(raw["input_tokens"]) + read + write, int(raw.get("output_tokens") or 0), 1,
                 cache_read_tokens=read, cache_write_tokens=write)
