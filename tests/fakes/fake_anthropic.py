"""A local server speaking Anthropic's Messages API, with server-sent-event streaming.

``POST /v1/messages`` answers as the API does: a ``message`` object with ``usage`` (including
the cache fields), ``anthropic-ratelimit-*`` headers on every response, and errors shaped
``{"type": "error", "error": {"type": "rate_limit_error", ...}}`` with ``retry-after``; 529
``overloaded_error``; a prompt over ``context_window`` gets 400 "prompt is too long". With
``"stream": true`` it sends ``message_start`` ... ``message_stop`` events, and an ``error``
event after partial output for ``[[stream-throttle]]``. Limits, faults and latency are those of
:class:`~tests.fakes.FakeOpenAIServer`; prompt directives are listed in ``_fake_base``.

    async with FakeAnthropicServer() as server:
        model = AnthropicModel("claude-sonnet-4-5", base_url=server.base_url)
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

from aiohttp import web

from ._fake_base import Admission, FakeProviderBase

__all__ = ["FakeAnthropicServer"]

_ERRORS = {  # directive -> (HTTP status, error type, message)
    "throttle": (429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit"),
    "quota": (400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API."),
    "not-ready": (529, "overloaded_error", "Overloaded"),
    "overloaded": (529, "overloaded_error", "Overloaded"),
    "server-error": (500, "api_error", "Internal server error"),
    "denied": (401, "authentication_error", "invalid x-api-key"),
    "too-long": (400, "invalid_request_error", "prompt is too long"),
}


class FakeAnthropicServer(FakeProviderBase):
    """Anthropic's Messages API on 127.0.0.1; ``base_url`` is the SDK's ``base_url``."""

    def __init__(self, *, api_key: str = "sk-ant-fake", **knobs: Any) -> None:
        super().__init__(**knobs)
        self.api_key = api_key

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)

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

    def _refuse(self, kind: str, prompt_tokens: int = 0, retry_after: float = 0.0) -> web.Response:
        status, error_type, message = _ERRORS["server-error" if kind == "server_error" else kind]
        if kind == "too-long":
            message = f"prompt is too long: {prompt_tokens} tokens > {self.context_window} maximum"
        headers = self._rate_headers()
        if status in (429, 529):
            headers["retry-after"] = str(max(1, math.ceil(retry_after or self.faults.throttle_retry_after)))
        return web.json_response({"type": "error", "error": {"type": error_type, "message": message}},
                                 status=status, headers=headers)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if not self.enter():
            return self._refuse("throttle", retry_after=self.concurrency_retry_after or 0.0)
        try:
            keys = {request.headers.get("x-api-key"), request.headers.get("Authorization", "").removeprefix("Bearer ")}
            if self.api_key not in keys or not request.headers.get("anthropic-version"):
                return self._refuse("denied")
            body = await request.json()
            self.requests_seen.append(body)
            system = body.get("system") or ""
            system_text = system if isinstance(system, str) else "".join(b.get("text", "") for b in system)
            texts = [m["content"] if isinstance(m["content"], str) else "".join(b.get("text", "") for b in m["content"])
                     for m in body.get("messages", [])]
            prompt, last = system_text + "".join(texts), texts[-1] if texts else ""
            max_tokens = int(body["max_tokens"])
            kind = self.directive(prompt)
            if kind is not None and kind != "stream-throttle":
                return self._refuse(kind)
            admission = self.admit(prompt, last, max_tokens)
            if admission.error in ("too-long", "throttle", "server-error", "overloaded"):
                return self._refuse(admission.error or "", admission.prompt_tokens, admission.retry_after)
            await self.delay(admission, request)
            if admission.error == "server_error":
                return self._refuse("server_error")
            text, output = self.answer(last, max_tokens)
            self.settle(admission, output)
            if body.get("stream"):
                return await self._stream(request, body, admission, text, output, kind == "stream-throttle")
            return web.json_response(self._message(body, admission, text, output), headers=self._rate_headers())
        finally:
            self.leave()

    def _message(self, body: dict[str, Any], admission: Admission, text: str, output: int) -> dict[str, Any]:
        return {
            "id": f"msg_{self.counters.admitted}", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": admission.prompt_tokens, "output_tokens": output,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        }

    async def _stream(
        self, request: web.Request, body: dict[str, Any], admission: Admission, text: str, output: int,
        throttle: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **self._rate_headers()})
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

        start = self._message(body, admission, "", 1)
        start["content"], start["stop_reason"] = [], None
        await send("message_start", {"type": "message_start", "message": start})
        await send("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}})
        for index, piece in enumerate(self.pieces(text)):
            if index == 1 and throttle:
                await send("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                await response.write_eof()
                return response
            await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}})
            await asyncio.sleep(0)
        await send("content_block_stop", {"type": "content_block_stop", "index": 0})
        await send("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                     "usage": {"output_tokens": output}})
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response
