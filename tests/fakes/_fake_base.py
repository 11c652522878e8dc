"""What the Bedrock and Anthropic fakes share with the OpenAI one: limits, faults, latency, logs.

Each fake subclasses :class:`FakeOpenAIServer` for its sliding RPM/TPM window, fault plan,
latency and admission log, and adds its own routes and wire format. On top it counts calls in
flight (``peak_in_flight``: what a test reads to see the client's pool reach a lane's
concurrency) and obeys directives written in a prompt, so a test can script one failure:

- ``[[throttle]]``, ``[[quota]]``, ``[[not-ready]]``, ``[[server-error]]``, ``[[overloaded]]``,
  ``[[denied]]``: that error instead of an answer;
- ``[[throttle x2]]``: the error for the first two attempts of this prompt, then an answer;
- ``[[stream-throttle]]``: a streamed reply throttled after its first piece of text;
- ``[[stream-<kind>]]``: a streamed reply with that in-stream fault after its first piece:
  ``cut`` ends it cleanly there (no terminal event), ``torn`` the same in the middle of an event,
  the other kinds are the provider's in-stream errors (listed in each fake's ``STREAM_ERRORS``).

Both model the prompt cache as their providers document it (:mod:`._prompt_cache`): cache
points (``cachePoint`` blocks, ``cache_control``), prefix match up to a point, the minimum
length (``cache_min_tokens``), at most ``max_cache_points`` points, entries that live
``cache_ttl`` seconds from their last use, and the cache fields of the usage.

Tokens are counted by ``tokenizer`` (default: the host's four-characters estimate), the same way
for the usage of a reply, the context window and each fake's token-counting endpoint (Bedrock's
``CountTokens``, Anthropic's ``count_tokens``), so a test can give the fake a model that counts
otherwise than the host estimates. ``[[count-<kind>]]`` makes the counting endpoint answer that
error (the completion endpoints pass over it); ``count_latency`` is how long a count takes.

A prompt of more than ``context_window`` tokens gets the provider's "input too long" error; a
reply longer than the request's ``max_tokens`` is cut to it and its stop reason says so. The
OpenAI fake's ``max_concurrency``, ``capacity``, ``status_faults``, ``stream_faults`` and
``never_stream`` knobs work here too.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ._prompt_cache import CacheUse, PromptCache
from .fake_openai import Admitted, FakeOpenAIServer, answer_for, cap_reply

__all__ = ["Admission", "FakeProviderBase"]

_DIRECTIVE = re.compile(r"\[\[([a-z-]+)(?: x(\d+))?\]\]")
# FakeOpenAIServer's status_faults, as the directive each provider answers them with
_STATUS_KINDS = {429: "throttle", 500: "server-error", 502: "server-error", 503: "overloaded", 529: "overloaded"}


@dataclass
class Admission:
    """The outcome of admitting one request: ``error`` names a refusal, else ``admitted`` is logged."""

    error: str | None = None
    retry_after: float = 0.0
    admitted: Admitted | None = None
    prompt_tokens: int = 0
    cache: CacheUse = field(default_factory=CacheUse)  # what the prompt cache gave it on arrival
    held: bool = False  # past ``hold_after``: never answered


class FakeProviderBase(FakeOpenAIServer, ABC):
    """A fake provider on 127.0.0.1; subclasses add routes in :meth:`routes` and a wire format."""

    def __init__(
        self,
        *,
        context_window: int = 200_000,
        reply: Callable[[str], str] | None = None,
        stream_pieces: int = 4,
        cache_min_tokens: int = 1024,
        max_cache_points: int = 4,
        cache_ttl: float = 300.0,
        tokenizer: Callable[[str], int] | None = None,
        count_latency: float = 0.0,
        **knobs: Any,
    ) -> None:
        super().__init__(**knobs)
        self.tokenizer = tokenizer
        self.count_latency = count_latency
        self.counts_seen: list[dict[str, Any]] = []  # the bodies of token-counting requests
        self.prompt_cache = PromptCache(min_tokens=cache_min_tokens, max_points=max_cache_points, ttl=cache_ttl)
        self.context_window = context_window
        self.reply = reply or answer_for
        self.stream_pieces = stream_pieces
        self.in_flight = 0  # this fake's own count (the OpenAI fake keeps its own apart)
        self.peak_in_flight = 0
        self.requests_seen: list[dict[str, Any]] = []
        self._attempts: Counter[str] = Counter()

    @property
    def requests_in_flight(self) -> int:
        return self.in_flight

    def count_tokens(self, text: str) -> int:  # type: ignore[override]
        """Tokens of ``text`` as this fake's model counts them (``tokenizer``, else the host's estimate)."""
        return super().count_tokens(text) if self.tokenizer is None else self.tokenizer(text)

    def count_directive(self, prompt: str) -> str | None:
        """The error kind a ``[[count-<kind>]]`` directive in ``prompt`` asks the counting endpoint for."""
        match = _DIRECTIVE.search(prompt)
        if match is None or not match.group(1).startswith("count-"):
            return None  # another endpoint's: its attempts are left to it
        kind = self.directive(prompt)
        return kind.removeprefix("count-") if kind is not None else None

    @staticmethod
    def scripted_elsewhere(kind: str | None) -> bool:
        """Whether a directive is for another endpoint or phase (a stream's fault, a count's error)."""
        return kind is not None and kind.startswith(("stream-", "count-"))

    @abstractmethod
    def routes(self, app: web.Application) -> None:
        """Add this protocol's endpoints to ``app``."""

    url_path = ""

    def _make_runner(self) -> web.BaseRunner:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        return web.AppRunner(app, access_log=None, handler_cancellation=True)

    # -- shared steps of a request -----------------------------------------------------------------
    def enter(self) -> bool:
        """Count a request in flight; False (and not counted) past the hidden ``max_concurrency``."""
        self.counters.requests += 1
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            self.counters.over_concurrency += 1
            return False
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def stream_fault_of(self, kind: str | None) -> str | None:
        """The in-stream fault of a streamed reply: its ``[[stream-<kind>]]`` directive, else the
        ``stream_faults`` plan's (drawn only for streamed replies)."""
        if kind is not None and kind.startswith("stream-"):
            return kind[len("stream-"):]
        return self.next_stream_fault()

    def directive(self, prompt: str) -> str | None:
        """The scripted failure of this attempt of ``prompt``, if any."""
        match = _DIRECTIVE.search(prompt)
        if match is None:
            return None
        self._attempts[prompt] += 1
        times = match.group(2)
        if times is not None and self._attempts[prompt] > int(times):
            return None
        return match.group(1)

    def admit(self, prompt: str, last: str, max_tokens: int) -> Admission:
        """Apply the context window, the RPM/TPM window and the fault plan, as a provider would."""
        prompt_tokens = self.count_tokens(prompt)
        if prompt_tokens > self.context_window:
            return Admission("too-long", prompt_tokens=prompt_tokens)
        tokens = prompt_tokens + max_tokens
        now = self._now()
        self._expire(now)
        wait = self._retry_after(now, tokens)
        if wait > 0:
            self.counters.limited += 1
            return Admission("throttle", retry_after=wait, prompt_tokens=prompt_tokens)
        for status, rate in self.status_faults.items():
            if self._random.random() < rate:
                self.counters.faults[f"status_{status}"] = self.counters.faults.get(f"status_{status}", 0) + 1
                return Admission(_STATUS_KINDS.get(status, "server-error"), prompt_tokens=prompt_tokens)
        fault = self._draw_fault()
        if fault == "throttle":
            return Admission("throttle", retry_after=self.faults.throttle_retry_after, prompt_tokens=prompt_tokens)
        admitted = Admitted(now, tokens, last, prompt_tokens=prompt_tokens, max_tokens=max_tokens)
        self._recent.append(admitted)
        self._recent_tokens += tokens
        self.admitted.append(admitted)
        self.counters.admitted += 1
        held = self.hold_after is not None and self.counters.admitted > self.hold_after
        return Admission(fault, admitted=admitted, prompt_tokens=prompt_tokens, held=held)

    async def delay(self, admission: Admission, request: web.Request) -> None:
        """Latency, and the reset and timeout faults (a reset and a held request never return)."""
        if admission.held:
            await asyncio.Event().wait()  # until the client goes (handler cancellation) or the server stops
        if admission.error == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        if admission.error == "timeout":
            await asyncio.sleep(self.faults.timeout_delay)
        await self.rendezvous()
        delay = self.latency + (self._random.uniform(-1, 1) * self.latency_jitter if self.latency_jitter else 0)
        if delay > 0:
            if self.capacity is not None:  # the server computes this many replies at a time
                async with self.capacity:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(delay)

    def settle(self, admission: Admission, output_tokens: int) -> None:
        """Correct the window to the real usage (max_tokens was held at admission)."""
        admitted = admission.admitted
        if admitted is None:
            return
        used = admission.prompt_tokens + output_tokens
        if self._in_window(admitted):
            self._recent_tokens += used - admitted.tokens
        admitted.tokens, admitted.output_tokens = used, output_tokens

    def answer(self, last: str, max_tokens: int) -> tuple[str, int, bool]:
        """The reply text, its output tokens (at most ``max_tokens``) and whether it was cut at
        ``max_tokens`` (a reply longer than that stops there, as a model's would)."""
        text, capped = cap_reply((self.reply or answer_for)(last), max_tokens)
        return text, min(max(self.output_tokens, self.count_tokens(text)), max_tokens), capped

    def pieces(self, text: str) -> list[str]:
        """``text`` cut into about ``stream_pieces`` parts, as a stream would deliver it."""
        size = max(1, -(-len(text) // max(1, self.stream_pieces)))
        return [text[i : i + size] for i in range(0, len(text), size)] or [""]

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "peak_in_flight": self.peak_in_flight}
