"""A local server speaking Anthropic's Messages API, with server-sent-event streaming.

``POST /v1/messages`` answers as the API does: a ``message`` object with ``usage`` (including
the cache fields), ``anthropic-ratelimit-*`` headers on every response, and errors shaped
``{"type": "error", "error": {"type": "rate_limit_error", ...}}`` with ``retry-after``; 529
``overloaded_error``; a prompt over ``context_window`` gets 400 "prompt is too long". With
``"stream": true`` it sends the documented sequence: ``message_start`` (with the input usage),
``content_block_start``, a ``ping``, ``content_block_delta``s, ``content_block_stop``,
``message_delta`` (``stop_reason``, output usage), ``message_stop``. A reply longer than
``max_tokens`` is cut to it with ``stop_reason`` ``"max_tokens"``. In-stream faults, from a
``[[stream-<kind>]]`` directive or the ``stream_faults`` knob: ``cut`` ends the stream cleanly
after its first piece (no ``message_stop``), ``torn`` the same inside an event; the kinds of
:data:`STREAM_ERRORS` send an ``error`` event there (``[[stream-throttle]]`` an
``overloaded_error``). ``never_stream=True`` answers a streamed request with a plain ``message``.

``POST /v1/messages/count_tokens`` takes a Messages body without ``max_tokens`` or sampling
settings (those are refused, "Extra inputs are not permitted") and answers ``{"input_tokens": N}``:
the prompt tokens the same request's usage reports (``input_tokens`` plus the cache fields). Both
endpoints answer a model not in ``models`` (by default any ``claude-*`` name) with 404
``not_found_error``; ``[[count-<kind>]]`` makes the count answer that error.
Limits, faults and latency are those of :class:`~tests.fakes.FakeOpenAIServer`; prompt
directives are listed in ``_fake_base``.

    async with FakeAnthropicServer() as server:
        model = AnthropicModel("claude-sonnet-4-5", base_url=server.base_url)
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Collection
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from ._fake_base import Admission, FakeProviderBase
from ._prompt_cache import CacheUse, Prompt

__all__ = ["COUNT_FIELDS", "STREAM_ERRORS", "FakeAnthropicServer"]

_ERRORS = {  # directive -> (HTTP status, error type, message)
    "throttle": (429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    "quota": (400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API."),
    "not-ready": (529, "overloaded_error", "Overloaded"),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server-error": (500, "api_error", "Internal server error"),
    "denied": (401, "authentication_error", "invalid x-api-key"),
    "too-long": (400, "invalid_request_error", "prompt is too long"),
    "cache-points": (400, "invalid_request_error", "A maximum of 4 blocks with cache_control may be provided."),
    "not-found": (404, "not_found_error", "model: {model}"),
    "extra-input": (400, "invalid_request_error", "{field}: Extra inputs are not permitted"),
}
#: The members of a count_tokens body (a Messages body without max_tokens, stream and sampling settings).
COUNT_FIELDS = frozenset({"model", "messages", "system", "tools", "tool_choice", "thinking", "mcp_servers"})

#: In-stream error events (kind -> error type, message), sent after the first piece of text.
STREAM_ERRORS = {
    "throttle": ("overloaded_error", "Overloaded"),
    "overloaded": ("overloaded_error", "Overloaded"),
    "rate-limit": ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    "server-error": ("api_error", "Internal server error"),
    "invalid": ("invalid_request_error", "Invalid request"),
}


class FakeAnthropicServer(FakeProviderBase):
    """Anthropic's Messages API on 127.0.0.1; ``base_url`` is the SDK's ``base_url``."""

    def __init__(self, *, api_key: str = "sk-ant-fake", models: Collection[str] | None = None, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.api_key = api_key
        self.models = None if models is None else set(models)  # None: any claude-* model

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)

    def _knows(self, model: object) -> bool:
        if self.models is not None:
            return model in self.models
        return isinstance(model, str) and model.startswith("claude-")

    def _authorized(self, request: web.Request) -> bool:
        keys = {request.headers.get("x-api-key"), request.headers.get("Authorization", "").removeprefix("Bearer ")}
        return self.api_key in keys and bool(request.headers.get("anthropic-version"))

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """``count_tokens``: the prompt tokens of a Messages body, as its usage would report them;
        nothing is admitted to the RPM/TPM window (counting has its own limits at Anthropic)."""
        if not self._authorized(request):
            return self._refuse("denied")
        body = await request.json()
        self.counts_seen.append(body)
        extra = sorted(set(body) - COUNT_FIELDS)
        if extra:
            return self._refuse("extra-input", field=extra[0])
        if not self._knows(body.get("model")):
            return self._refuse("not-found", model=body.get("model"))
        prompt = _prompt(body)
        kind = self.count_directive(prompt.text)
        if kind is not None:
            return self._refuse(kind)
        if self.count_latency:
            await asyncio.sleep(self.count_latency)
        return web.json_response({"input_tokens": self.count_tokens(prompt.text)},
                                 headers={"request-id": f"req_count_{len(self.counts_seen)}"})

    def _rate_headers(self) -> dict[str, str]:
        """``anthropic-ratelimit-*`` as the API sends them: limit, remaining, RFC 3339 reset."""
        now = self._now()
        self._expire(now)
        reset = (datetime.now(timezone.utc) + timedelta(seconds=self.window)).isoformat().replace("+00:00", "Z")
        headers = {"request-id": f"req_{self.counters.requests}"}
        if self.rpm is not None:
            remaining = max(0, self.rpm - len(self._recent))
            headers |= {"anthropic-ratelimit-requests-limit": str(self.rpm),
                        "anthropic-ratelimit-requests-remaining": str(remaining),
                        "anthropic-ratelimit-requests-reset": reset}
        if self.tpm is not None:
            remaining = max(0, self.tpm - self._recent_tokens)
            headers |= {"anthropic-ratelimit-tokens-limit": str(self.tpm),
                        "anthropic-ratelimit-tokens-remaining": str(remaining),
                        "anthropic-ratelimit-tokens-reset": reset}
        return headers

    def _refuse(self, kind: str, prompt_tokens: int = 0, retry_after: float = 0.0, **fields: Any) -> web.Response:
        status, error_type, message = _ERRORS["server-error" if kind == "server_error" else kind]
        message = message.format(**fields) if fields else message
        if kind == "too-long":
            message = f"prompt is too long: {prompt_tokens} tokens > {self.context_window} maximum"
        if kind == "cache-points":  # prompt_tokens: the number of blocks found
            message = (f"A maximum of {self.prompt_cache.max_points} blocks with cache_control may be provided. "
                       f"Found {prompt_tokens}.")
        headers = self._rate_headers()
        if status in (429, 529):
            headers["retry-after"] = str(max(1, math.ceil(retry_after or self.faults.throttle_retry_after)))
        return web.json_response({"type": "error", "error": {"type": error_type, "message": message}},
                                 status=status, headers=headers)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if not self.enter():
            return self._refuse("throttle", retry_after=self.concurrency_retry_after or 0.0)
        try:
            if not self._authorized(request):
                return self._refuse("denied")
            body = await request.json()
            self.requests_seen.append(body)
            if not self._knows(body.get("model")):
                return self._refuse("not-found", model=body.get("model"))
            cached = _prompt(body)
            texts = [m["content"] if isinstance(m["content"], str) else "".join(b.get("text", "") for b in m["content"])
                     for m in body.get("messages", [])]
            prompt, last = cached.text, texts[-1] if texts else ""
            max_tokens = int(body["max_tokens"])
            if self.prompt_cache.too_many(cached):
                return self._refuse("cache-points", len(cached.points))
            kind = self.directive(prompt)
            if kind is not None and not self.scripted_elsewhere(kind):
                return self._refuse(kind)
            admission = self.admit(prompt, last, max_tokens)
            if admission.error in ("too-long", "throttle", "server-error", "overloaded"):
                return self._refuse(admission.error or "", admission.prompt_tokens, admission.retry_after)
            cache = self.prompt_cache.use(str(body["model"]), cached, ready_in=self.latency)
            await self.delay(admission, request)
            if admission.error == "server_error":
                return self._refuse("server_error")
            text, output, capped = self.answer(last, max_tokens)
            self.settle(admission, output)
            stop = "max_tokens" if capped else "end_turn"
            if body.get("stream") and not self.never_stream:
                fault = self.stream_fault_of(kind)
                return await self._stream(request, body, admission, (text, output, stop), fault, cache)
            return web.json_response(self._message(body, admission, text, output, stop, cache),
                                     headers=self._rate_headers())
        finally:
            self.leave()

    def _message(self, body: dict[str, Any], admission: Admission, text: str, output: int,
                 stop: str | None, cache: CacheUse) -> dict[str, Any]:
        # input_tokens leaves out what was read from or written to the cache, as the API's does
        return {
            "id": f"msg_{self.counters.admitted}", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": text}], "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": admission.prompt_tokens - cache.read - cache.write, "output_tokens": output,
                      "cache_creation_input_tokens": cache.write, "cache_read_input_tokens": cache.read},
        }

    async def _stream(
        self, request: web.Request, body: dict[str, Any], admission: Admission, reply: tuple[str, int, str],
        fault: str | None, cache: CacheUse,
    ) -> web.StreamResponse:
        text, output, stop = reply
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self._rate_headers()})
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        start = self._message(body, admission, "", 1, None, cache)
        start["content"] = []
        await send("message_start", {"type": "message_start", "message": start})
        await send("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        await send("ping", {"type": "ping"})
        pieces = self.pieces(text)
        for piece in pieces[:1] if fault is not None else pieces:
            await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}})
            await asyncio.sleep(0)
        if fault is not None:  # after the first piece: an error event, or ("cut") a clean end without message_stop
            if fault == "torn":  # the connection ends cleanly inside an event
                await response.write(b'event: content_block_delta\ndata: {"type": "content_blo')
            elif fault != "cut":
                error_type, message = STREAM_ERRORS[fault]
                await send("error", {"type": "error", "error": {"type": error_type, "message": message}})
            await response.write_eof()
            return response
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        await send("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": stop, "stop_sequence": None},
                                     "usage": {"output_tokens": output}})
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response


def _prompt(body: dict[str, Any]) -> Prompt:
    """A Messages request's blocks (system, then messages) and its breakpoints, for the cache."""
    prompt = Prompt()
    system = body.get("system") or ""
    for block in [{"text": system}] if isinstance(system, str) else system:
        prompt.add("system", str(block.get("text", "")))
        if block.get("cache_control"):
            prompt.point()
    for message in body.get("messages") or []:
        content = message["content"]
        for block in [{"text": content}] if isinstance(content, str) else content:
            prompt.add(str(message.get("role")), str(block.get("text", "")))
            if block.get("cache_control"):
                prompt.point()
    return prompt
