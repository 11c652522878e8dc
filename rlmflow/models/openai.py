"""OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, llama.cpp server, LM Studio)."""

from __future__ import annotations

import os
from typing import Any

import openai

from .._exceptions import (
    ContextOverflowError,
    FatalModelError,
    ModelError,
    ModelNotReadyError,
    QuotaExhaustedError,
    ThrottledError,
    TransientModelError,
)
from . import guard
from .base import ModelRequest, ModelResponse, Usage, estimate_tokens

__all__ = ["OpenAIModel"]

_RATE_HEADERS = ("retry-after", "retry-after-ms", "x-ratelimit-")


class OpenAIModel:
    """A chat model behind the OpenAI chat-completions protocol.

    The SDK's own retries are off (``max_retries=0``): the Dispatcher retries with knowledge of
    every lane. ``base_url`` defaults to ``$OPENAI_BASE_URL``; the key to ``$OPENAI_API_KEY``
    (servers that need none get a placeholder).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        client: openai.AsyncOpenAI | None = None,
        provider: str = "openai",
    ) -> None:
        self._model = model
        self._provider = provider
        self._owns_client = client is None
        self._client = client or openai.AsyncOpenAI(
            base_url=base_url or os.environ.get("OPENAI_BASE_URL"),
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or "not-needed",
            max_retries=0,
            timeout=timeout,
        )

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def name(self) -> str:
        return self._model

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    async def request(self, request: ModelRequest) -> ModelResponse:
        kwargs: dict[str, Any] = {
            "model": self._model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.stop:
            kwargs["stop"] = list(request.stop)
        guard.check_request_allowed(str(self._client.base_url))
        try:
            raw = await self._client.chat.completions.with_raw_response.create(**kwargs)
            completion = raw.parse()
        except openai.APIError as exc:
            raise self._translate(exc) from exc
        headers = {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith(_RATE_HEADERS)}
        if not completion.choices:
            raise TransientModelError("the server returned no choices", provider=self._provider, model=self._model)
        choice = completion.choices[0]
        usage = completion.usage
        return ModelResponse(
            text=choice.message.content or "",
            usage=Usage(usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, 1),
            model=completion.model or self._model,
            finish_reason=choice.finish_reason,
            headers=headers,
        )

    def _translate(self, exc: openai.APIError) -> ModelError:
        where: dict[str, Any] = {"provider": self._provider, "model": self._model}
        if isinstance(exc, openai.APITimeoutError):
            return TransientModelError(f"timeout: {exc}", **where)
        if isinstance(exc, openai.APIConnectionError):
            return TransientModelError(f"connection failed: {exc}", **where)
        if not isinstance(exc, openai.APIStatusError):
            return TransientModelError(f"malformed response: {exc}", **where)
        status = exc.status_code
        retry_after = _retry_after(exc.response.headers)
        body = str(exc.body or exc.message)
        code = ""
        if isinstance(exc.body, dict):
            code = str(exc.body.get("code") or (exc.body.get("error") or {}).get("code") or "")
        status_where: dict[str, Any] = {**where, "status_code": status, "retry_after": retry_after}
        if status == 429:
            if code == "insufficient_quota" or "quota" in body.lower():
                return QuotaExhaustedError(f"quota exhausted: {body}", **status_where)
            return ThrottledError(f"throttled: {body}", **status_where)
        if status == 400 and ("context_length" in code or "context length" in body.lower()
                              or "maximum context" in body.lower()):
            return ContextOverflowError(f"prompt too long for {self._model}: {body}", **status_where)
        if status == 404:
            return FatalModelError(f"model {self._model!r} not found at the server: {body}", **status_where)
        if status == 503:
            return ModelNotReadyError(f"model not ready: {body}", **status_where)
        if status >= 500 or status == 408:
            return TransientModelError(f"server error {status}: {body}", **status_where)
        return FatalModelError(f"request rejected ({status}): {body}", **status_where)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.close()

    def __repr__(self) -> str:
        return f"OpenAIModel({self._model!r}, base_url={str(self._client.base_url)!r})"


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or ``retry-after`` (seconds form)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) * scale
        except ValueError:
            continue
    return None
