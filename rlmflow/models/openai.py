"""OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, llama.cpp server, LM Studio).

Spoken directly over the shared lean HTTP path (:mod:`rlmflow.models._http`), not through the
openai SDK: the SDK costs about ten times the host CPU per call (``benchmarks/providers.py``).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

from .._exceptions import (
    ConfigurationError,
    ContextOverflowError,
    FatalModelError,
    ModelError,
    ModelNotReadyError,
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
from .base import ModelRequest, ModelResponse, TextCallback, Usage, estimated_usage

__all__ = ["HOSTED_ENDPOINTS", "OpenAIModel", "is_reasoning_model", "needs_api_key"]

#: Hosts of hosted APIs that answer nothing without a key. A model whose base URL points at one of
#: them (or a subdomain) and has no key is a ConfigurationError before anything runs; any other host
#: (loopback, a self-hosted vLLM/Ollama/llama.cpp server, a gateway) is trusted to need none.
HOSTED_ENDPOINTS = frozenset({
    "api.openai.com", "api.anthropic.com", "openrouter.ai", "api.groq.com", "api.together.xyz",
    "api.together.ai", "api.deepseek.com", "api.mistral.ai", "api.fireworks.ai", "api.x.ai",
    "generativelanguage.googleapis.com",
})

_REASONING = re.compile(r"^(o\d|gpt-5)")  # models that take max_completion_tokens and no temperature
_TOO_LONG = ("context_length", "context length", "maximum context", "too many tokens", "prompt is too long")


def needs_api_key(base_url: str) -> bool:
    """Whether ``base_url`` is a hosted API's (one of :data:`HOSTED_ENDPOINTS`, or a subdomain) and
    so cannot answer without a key. Loopback and self-hosted servers are not."""
    host = (urlsplit(base_url).hostname or "").lower().rstrip(".")
    return any(host == hosted or host.endswith("." + hosted) for hosted in HOSTED_ENDPOINTS)


def missing_key_error(provider: str, model: str, base_url: str, variable: str) -> ConfigurationError:
    """The error of a hosted endpoint's model that has no key."""
    return ConfigurationError(
        f"{provider}:{model} is served by {base_url}, which needs an API key, and none was given: "
        f"set {variable} (or pass api_key=...); a self-hosted server needs none (give its base URL)"
    )


def is_reasoning_model(model: str) -> bool:
    """Whether ``model`` is an OpenAI reasoning model (o1, o3, o4-mini, gpt-5...)."""
    return bool(_REASONING.match(model.rsplit("/", 1)[-1]))


class OpenAIModel(HTTPModel):
    """A chat model behind the OpenAI chat-completions protocol.

    ``base_url`` defaults to ``$OPENAI_BASE_URL``, then OpenAI's; the key to ``$OPENAI_API_KEY``
    (servers that need none get a placeholder). A hosted API (:data:`HOSTED_ENDPOINTS`: OpenAI's
    own, OpenRouter, Groq...) without a key fails :meth:`check_ready`, which ``RLM.check`` and
    ``RLM.run`` call before anything runs. ``reasoning`` marks a reasoning model (sent
    ``max_completion_tokens``, never ``temperature``/``top_p``); by default it is inferred from
    the name. Nothing is retried here: the Dispatcher owns retries.

    Two servers serving one model name are two lanes: :attr:`endpoint` is the base URL.
    ``stream=True`` makes :meth:`request` stream, calling ``on_text`` with each piece of text.
    """

    rate_header_prefixes = ("retry-after", "retry-after-ms", "x-ratelimit-")
    terminal_event = "finish_reason or [DONE]"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        provider: str = "openai",
        reasoning: bool | None = None,
        max_pool_connections: int = DEFAULT_POOL_CONNECTIONS,
        stream: bool = False,
        on_text: TextCallback | None = None,
    ) -> None:
        super().__init__(
            model, base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1",
            provider=provider, pool=max_pool_connections, timeout=timeout, stream=stream, on_text=on_text,
        )
        self._url = self._base_url + "/chat/completions"
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
        key = self._api_key or "not-needed"
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._reasoning = is_reasoning_model(model) if reasoning is None else reasoning

    def check_ready(self) -> None:
        """Raise :class:`ConfigurationError` at once if this model's endpoint is a hosted API and no
        key was given (rather than a 401, or a DNS failure retried for seconds, on the first call)."""
        if self._api_key is None and needs_api_key(self._base_url):
            raise missing_key_error(self._provider, self._model, self._base_url, "OPENAI_API_KEY")

    def payload(self, request: ModelRequest) -> dict[str, Any]:
        """The JSON body of ``request`` for this model."""
        body: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        }
        if self._reasoning:
            body["max_completion_tokens"] = request.max_tokens
            if request.reasoning_effort is not None:
                body["reasoning_effort"] = request.reasoning_effort
        else:
            body["max_tokens"] = request.max_tokens
            if request.temperature is not None:
                body["temperature"] = request.temperature
            if request.top_p is not None:
                body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    async def _request(self, request: ModelRequest) -> ModelResponse:
        reply, headers = await self._post(self.payload(request))
        choices = reply.get("choices") or []
        if not choices:
            raise TransientModelError("the server returned no choices", provider=self._provider, model=self._model)
        choice = choices[0]
        text = (choice.get("message") or {}).get("content") or ""
        return ModelResponse(
            text=text,
            usage=_usage(reply.get("usage"), request, text),
            model=reply.get("model") or self._model,
            finish_reason=choice.get("finish_reason"),
            headers=rate_headers(headers, self.rate_header_prefixes),
        )

    async def request_stream(self, request: ModelRequest, on_text: TextCallback | None) -> ModelResponse:
        """Stream one request, calling ``on_text`` with each piece of text; return the whole reply.

        The reply is whole once a choice's ``finish_reason`` or ``data: [DONE]`` arrived (the usage
        chunk, ``choices: []``, comes between them); a stream that ends before both is a
        :class:`TransientModelError`. A server that answers with a plain completion is read as one.
        """
        body = {**self.payload(request), "stream": True, "stream_options": {"include_usage": True}}
        reply = await self._post_streamed(body, on_text, _read_chunk, _read_completion)
        text = reply.text
        return ModelResponse(text=text, usage=_usage(reply.usage, request, text), model=reply.model or self._model,
                             finish_reason=reply.finish, headers=reply.headers)

    def _translate(self, exc: HTTPStatus | HTTPFailure) -> ModelError:
        where: dict[str, Any] = {"provider": self._provider, "model": self._model}
        if isinstance(exc, HTTPFailure):
            return TransientModelError(f"connection to {self._base_url} failed: {exc}", **where)
        status, body = exc.status, exc.body
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        code = str(error.get("code") or error.get("type") or "")
        message = str(error.get("message") or body)
        detail: dict[str, Any] = {**where, "status_code": status, "retry_after": retry_after(exc.headers)}
        if code == "insufficient_quota":
            # the account's credit is spent: no retry can succeed until someone pays
            billing = QuotaExhaustedError(f"billing quota exhausted (insufficient_quota): {message}", **detail)
            billing.retryable = False
            return billing
        if status == 429:
            if "quota" in message.lower():
                return QuotaExhaustedError(f"quota exhausted: {message}", **detail)
            return ThrottledError(f"throttled: {message}", **detail)
        if status in (400, 413) and (
            "context_length" in code or any(phrase in message.lower() for phrase in _TOO_LONG)
        ):
            return ContextOverflowError(f"prompt too long for {self._model}: {message}", **detail)
        if status == 404:
            return FatalModelError(f"model {self._model!r} not found at {self._base_url}: {message}", **detail)
        if status == 503:
            return ModelNotReadyError(f"model not ready: {message}", **detail)
        if status >= 500 or status == 408:
            return TransientModelError(f"server error {status}: {message}", **detail)
        return FatalModelError(f"request rejected ({status}): {message}", **detail)



def _read_chunk(event: ServerEvent, reply: StreamedText) -> bool:
    """One ``chat.completion.chunk`` (or ``[DONE]``, or an error object) into ``reply``; True at the end."""
    if event.data == "[DONE]":
        reply.done = True
        return True
    chunk = json.loads(event.data)
    if chunk.get("error") or chunk.get("object") == "error":  # a failure after the 200 status line
        error = chunk.get("error", chunk)
        raise HTTPStatus(_status_of(error), reply.headers, {"error": error})
    reply.usage = chunk.get("usage") or reply.usage
    reply.model = reply.model or chunk.get("model")
    for choice in chunk.get("choices") or ():
        piece = (choice.get("delta") or {}).get("content")
        if piece:
            reply.add(piece)
        if choice.get("finish_reason"):
            reply.finish, reply.done = choice["finish_reason"], True
    return False


def _read_completion(body: Any, reply: StreamedText) -> None:
    """A plain ``chat.completion`` answering a streamed request, read into ``reply`` as a whole."""
    if body.get("error") or body.get("object") == "error":
        error = body.get("error", body)
        raise HTTPStatus(_status_of(error), reply.headers, {"error": error})
    choices = body.get("choices") or ()
    if not choices:
        return  # not a completion: the reply stays not whole
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") or ""
    if text:
        reply.add(text)
    reply.finish, reply.usage, reply.model = choice.get("finish_reason"), body.get("usage"), body.get("model")
    reply.done = True


def _status_of(error: Any) -> int:
    """The HTTP status an error object sent inside a stream stands for (vLLM puts it in ``code``)."""
    error = error if isinstance(error, dict) else {}
    code, kind = error.get("code"), str(error.get("type") or "").lower()
    if isinstance(code, int) or (isinstance(code, str) and code.isdigit()):
        return int(code)
    name = f"{code or ''} {kind}".lower()
    if "rate_limit" in name or "insufficient_quota" in name or kind in ("requests", "tokens"):
        return 429
    if "context_length" in name or "invalid_request" in name or "badrequest" in name:
        return 400
    if "authentication" in name or "invalid_api_key" in name:
        return 401
    if "not_found" in name or "notfound" in name:
        return 404
    return 500


def _usage(raw: dict[str, Any] | None, request: ModelRequest, text: str) -> Usage:
    """OpenAI usage mapped to ours (``prompt_tokens`` already includes cached tokens); estimated when absent."""
    if not raw:
        return estimated_usage(request, text)
    cached = int((raw.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0), 1,
                 cache_read_tokens=cached)
