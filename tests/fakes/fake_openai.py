"""A local server speaking the OpenAI chat-completions protocol, with limits and faults.

For tests and benchmarks only; it binds to 127.0.0.1. It enforces RPM and TPM over a sliding
window the way providers do: tokens are counted at admission as prompt estimate + ``max_tokens``
and corrected to the real output when the call ends, as Bedrock does. Past the limits it answers
429 with ``retry-after`` (seconds), ``retry-after-ms`` and, when it has limits, ``x-ratelimit-*``;
it injects faults at given rates and logs what it admitted, so tests can check limits from the
provider's side. A reply longer than the request's ``max_tokens`` is cut to it (``finish_reason``
``"length"``).

Streams are OpenAI's: a first chunk with ``delta: {"role": "assistant"}``, the content deltas, a
chunk with the ``finish_reason`` and an empty delta, then (with ``stream_options.include_usage``,
which also puts ``"usage": null`` on every other chunk) a last chunk with ``choices: []`` and the
``usage``, then ``data: [DONE]``. Stream faults: ``stream_faults={"cut": 0.5}`` ends half of the
streamed replies cleanly half-way (no ``finish_reason``, usage or ``[DONE]``), spread evenly (the
first, the third...); ``"torn"`` ends it the same way but in the middle of an event's line; the
other kinds (:data:`STREAM_ERRORS`) send an error object inside the stream
(``data: {"error": {...}}``) after half of the text. ``never_stream=True`` answers streamed
requests with a plain JSON completion, as some OpenAI-compatible servers do.

Knobs for the Dispatcher's benchmarks and tests: ``max_concurrency`` refuses (429) any request
beyond that many in flight, a limit the client is not told; ``capacity`` serves at most that
many at once and queues the rest (a provider's fixed capacity, slower but no refusal);
``rate_headers`` sends ``x-ratelimit-remaining-requests`` / ``-reset-requests`` on every answer,
as OpenAI does; ``usage=False`` leaves ``usage`` out of answers; ``status_faults`` answers given
statuses (503, 408...) at given rates; ``quota_refusals`` answers the next that many requests 429
"quota exceeded" with a ``retry-after`` of ``quota_retry_after`` (a spent quota, which pauses a lane);
``latency_of`` gives each request its own latency (a function of its last message);
``hold_after=n`` answers the first ``n`` requests it admits and holds every later one, admitted and
never answered, until its client goes (a provider busy with work a disconnecting client will still
be billed for; the Anthropic and Bedrock fakes built on this one hold too); ``meet=n`` holds each
request until ``n`` are in flight at once (or ``MEET_TIMEOUT`` passes), so a test of how far a
client fans out does not hang on a race between one reply's latency and the next request's start.

What the server did with each request it served: ``serving`` are in flight now, ``counters.answered``
were answered (whatever the status), ``counters.cancelled`` ended without an answer because the
client went away (aiohttp cancels the handler of a closed connection; a ``reset`` fault counts too).
Each :class:`Admitted` record keeps what a bill needs: the model, the prompt's tokens,
``max_tokens`` and, once answered, the output tokens.

Answers are deterministic: ``answer:<first 12 hex of sha1(prompt)>``, so a test can tell
whether every prompt got its own answer; ``reply=`` gives another function of the last message.

    async with FakeOpenAIServer(latency=0.2, rpm=600) as server:
        model = OpenAIModel("fake", base_url=server.base_url)

``benchmarks/fake_provider.py`` runs it as a process of its own (for benchmarks, so its CPU is
not the host's). It is built to cost the benchmarks little: aiohttp's low-level server (no
router), one parse of the body and one token count per request, answers encoded from a
template, O(1) bookkeeping per request, and a listen backlog of :data:`BACKLOG` so a client that
opens a thousand connections at once is not met with dropped SYNs (and 1 s retransmits).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from rlmflow.models.base import estimate_tokens

__all__ = ["BACKLOG", "STREAM_ERRORS", "Admitted", "FakeOpenAIServer", "FaultPlan", "answer_for", "cap_reply"]

#: Pending connections the listening socket holds (the kernel caps it at net.core.somaxconn).
#: aiohttp's default, 128, drops the SYNs of a client that connects a thousand times at once.
BACKLOG = 4096
MEET_TIMEOUT = 10.0  # seconds a request waits for ``meet`` others before it is answered anyway
_PATH = "/v1/chat/completions"
# json.dumps of an answer, with the same separators, for the parts that vary
_ANSWER = ('{"id": "chatcmpl-%d", "object": "chat.completion", "created": 0, "model": %s, "choices": [{"index": 0, '
           '"message": {"role": "assistant", "content": %s}, "finish_reason": "%s"}]')
_USAGE = ', "usage": {"prompt_tokens": %d, "completion_tokens": %d, "total_tokens": %d}'
_JSON = "application/json; charset=utf-8"


#: The error objects the fake can send inside a stream (``stream_faults`` kinds), as OpenAI and vLLM do.
STREAM_ERRORS: dict[str, dict[str, Any]] = {
    "server-error": {"message": "The server had an error while processing your request. Sorry about that!",
                     "type": "server_error", "param": None, "code": None},
    "rate-limit": {"message": "Rate limit reached for requests", "type": "requests", "param": None,
                   "code": "rate_limit_exceeded"},
    "invalid": {"object": "error", "message": "The request was rejected: invalid sampling parameters.",
                "type": "BadRequestError", "param": None, "code": 400},  # vLLM's shape
}


def answer_for(prompt: str) -> str:
    """The fake server's answer to ``prompt``."""
    return "answer:" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def cap_reply(text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` cut to ``max_tokens`` (by the fakes' estimate), and whether it was cut."""
    if estimate_tokens(text) <= max_tokens:
        return text, False
    return text[: max(0, max_tokens) * 4], True


@dataclass(frozen=True)
class FaultPlan:
    """Probabilities of each injected fault per request (drawn independently of limits)."""

    throttle: float = 0.0  # a 429 although within limits
    server_error: float = 0.0  # 500 or 503
    reset: float = 0.0  # the connection is dropped without a response
    timeout: float = 0.0  # the response is delayed past ``timeout_delay``
    timeout_delay: float = 30.0
    throttle_retry_after: float = 0.05

    @property
    def total(self) -> float:
        return self.throttle + self.server_error + self.reset + self.timeout


@dataclass
class Admitted:
    at: float
    tokens: int
    prompt: str
    model: str = ""
    prompt_tokens: int = 0
    max_tokens: int = 0
    output_tokens: int | None = None  # None: admitted, never answered


@dataclass
class _Counters:
    requests: int = 0
    admitted: int = 0
    answered: int = 0
    cancelled: int = 0
    limited: int = 0
    over_concurrency: int = 0
    faults: dict[str, int] = field(default_factory=lambda: {"throttle": 0, "server_error": 0, "reset": 0,
                                                             "timeout": 0})


class FakeOpenAIServer:
    """An aiohttp server on 127.0.0.1 answering ``POST /v1/chat/completions``."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        latency_jitter: float = 0.0,
        rpm: int | None = None,
        tpm: int | None = None,
        window: float = 60.0,
        faults: FaultPlan | None = None,
        output_tokens: int = 8,
        seed: int = 0,
        port: int = 0,
        root_marker: str | None = None,
        root_reply: str = "",
        max_concurrency: int | None = None,
        concurrency_retry_after: float | None = 1.0,
        capacity: int | None = None,
        rate_headers: bool = False,
        usage: bool = True,
        status_faults: dict[int, float] | None = None,
        stream_faults: dict[str, float] | None = None,
        never_stream: bool = False,
        reply: Callable[[str], str] | None = None,
        quota_refusals: int = 0,
        quota_retry_after: float = 1.0,
        latency_of: Callable[[str], float] | None = None,
        hold_after: int | None = None,
        meet: int | None = None,
    ) -> None:
        self.latency = latency
        self.latency_jitter = latency_jitter
        self.rpm = rpm
        self.tpm = tpm
        self.window = window
        self.faults = faults or FaultPlan()
        self.output_tokens = output_tokens
        # Plays a root model for peer benchmarks: a request mentioning the marker gets this reply.
        self.root_marker = root_marker
        self.root_reply = root_reply
        self.max_concurrency = max_concurrency
        self.concurrency_retry_after = concurrency_retry_after
        self.capacity = asyncio.Semaphore(capacity) if capacity else None
        self.rate_headers = rate_headers
        self.usage = usage
        self.status_faults = dict(status_faults or {})
        # kind -> share of streamed replies given that fault, spread evenly ("cut": 0.5 = every other one)
        self.stream_faults = dict(stream_faults or {})
        self._stream_credit: dict[str, float] = {}
        self.never_stream = never_stream
        self.quota_refusals = quota_refusals
        self.quota_retry_after = quota_retry_after
        # the latency of a request whose last message is the argument (default: latency, with jitter)
        self.latency_of = latency_of
        # the reply to a request whose last message is the argument (default: answer_for)
        self.reply: Callable[[str], str] | None = reply
        self.hold_after = hold_after
        # requests wait (up to MEET_TIMEOUT) until this many are in flight at once: a test's proof that
        # the client reaches that concurrency, whatever the machine's load (a latency alone is a race)
        self.meet = meet
        self._met = asyncio.Event()
        self._serving = 0  # requests in flight (a subclass may count its own)
        self.peak_in_flight = 0
        self._random = random.Random(seed)
        self._port = port
        self._runner: web.BaseRunner | None = None
        self._recent: deque[Admitted] = deque()
        self._recent_tokens = 0
        self.admitted: list[Admitted] = []
        self.counters = _Counters()
        self.base_url = ""

    @property
    def requests_in_flight(self) -> int:
        """Requests being served now (held ones included)."""
        return self._serving

    async def rendezvous(self) -> None:
        """Wait until ``meet`` requests are in flight at once (or MEET_TIMEOUT passes: the test then
        sees a lower ``peak_in_flight`` and fails on it)."""
        if self.meet is None:
            return
        if self.requests_in_flight >= self.meet:
            self._met.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._met.wait(), MEET_TIMEOUT)

    @staticmethod
    def count_tokens(text: str) -> int:
        return estimate_tokens(text)  # the same estimate the host uses for remote models

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0].at <= now - self.window:
            self._recent_tokens -= self._recent.popleft().tokens

    def _in_window(self, item: Admitted) -> bool:
        """Whether ``item`` (once admitted) is still in the sliding window, in O(1).

        The window holds admissions in the order of their (monotonic) times and expires a prefix
        of them up to a threshold that only grows, so an admission is still in it exactly when
        its time is at least that of the oldest one left.
        """
        return bool(self._recent) and item.at >= self._recent[0].at

    def next_stream_fault(self) -> str | None:
        """The ``stream_faults`` kind of the next streamed reply, if any, spread evenly: each kind
        gains its share per stream and strikes when it has gathered a whole one, starting with the
        first stream (a share of 0.5 faults streams 1, 3, 5...)."""
        chosen = None
        for kind, share in self.stream_faults.items():
            credit = self._stream_credit.get(kind, 1.0 - share) + share
            if chosen is None and credit >= 1.0 - 1e-9:
                credit, chosen = credit - 1.0, kind
            self._stream_credit[kind] = credit
        if chosen is not None:
            key = f"stream_{chosen}"
            self.counters.faults[key] = self.counters.faults.get(key, 0) + 1
        return chosen

    def _retry_after(self, now: float, tokens: int) -> float:
        """Seconds until a request of ``tokens`` would fit."""
        waits = [0.0]
        if self.rpm is not None and len(self._recent) >= self.rpm:
            waits.append(self._recent[len(self._recent) - self.rpm].at + self.window - now)
        if self.tpm is not None and self._recent_tokens + tokens > self.tpm:
            excess, freed = self._recent_tokens + tokens - self.tpm, 0
            for item in self._recent:
                freed += item.tokens
                if freed >= excess:
                    waits.append(item.at + self.window - now)
                    break
        return max(waits)

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        """The one endpoint, as aiohttp's router would answer it (404, 405) without its cost."""
        if request.path != _PATH:
            return web.Response(status=404, text="404: Not Found")
        if request.method != "POST":
            return web.Response(status=405, text="405: Method Not Allowed", headers={"Allow": "POST"})
        return await self._handle(request)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.counters.requests += 1
        if self.max_concurrency is not None and self._serving >= self.max_concurrency:
            self.counters.over_concurrency += 1
            return self._error(429, "too many concurrent requests", "rate_limit_exceeded",
                               retry_after=self.concurrency_retry_after, headers=self._limit_headers(self._now()))
        self._serving += 1
        self.peak_in_flight = max(self.peak_in_flight, self._serving)
        try:
            response = await self._serve(request)
        except asyncio.CancelledError:
            self.counters.cancelled += 1
            raise
        finally:
            self._serving -= 1
        self.counters.answered += 1
        return response

    @property
    def serving(self) -> int:
        """Requests in flight now (admitted or not, not yet answered)."""
        return self._serving

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        body = json.loads(await request.read())
        messages = body.get("messages") or []
        prompt = "".join(str(m.get("content", "")) for m in messages)
        last = str(messages[-1].get("content", "")) if messages else ""
        stated = body.get("max_tokens") or body.get("max_completion_tokens")
        max_tokens = int(stated or 16)
        prompt_tokens = self.count_tokens(prompt)
        tokens = prompt_tokens + max_tokens
        now = self._now()
        self._expire(now)
        wait = self._retry_after(now, tokens)
        if wait > 0:
            self.counters.limited += 1
            return self._error(429, "rate limit reached", "rate_limit_exceeded", retry_after=wait,
                               headers=self._limit_headers(now))
        if self.quota_refusals > 0:
            self.quota_refusals -= 1
            self.counters.faults["quota"] = self.counters.faults.get("quota", 0) + 1
            return self._error(429, "You exceeded your current quota for this window (injected)",
                               "rate_limit_exceeded", retry_after=self.quota_retry_after)
        for status, rate in self.status_faults.items():
            if self._random.random() < rate:
                self.counters.faults[f"status_{status}"] = self.counters.faults.get(f"status_{status}", 0) + 1
                return self._error(status, f"injected {status}", None)
        fault = self._draw_fault()
        if fault == "throttle":
            return self._error(429, "slow down (injected)", "rate_limit_exceeded",
                               retry_after=self.faults.throttle_retry_after, headers=self._limit_headers(now))
        admitted = Admitted(now, tokens, last, str(body.get("model", "")), prompt_tokens, max_tokens)
        self._recent.append(admitted)
        self._recent_tokens += tokens
        self.admitted.append(admitted)
        self.counters.admitted += 1
        if self.hold_after is not None and self.counters.admitted > self.hold_after:
            await asyncio.Event().wait()  # until the client goes (handler cancellation) or the server stops
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing more is written
        if fault == "timeout":
            await asyncio.sleep(self.faults.timeout_delay)
        await self.rendezvous()
        delay = self.latency + (self._random.uniform(-1, 1) * self.latency_jitter if self.latency_jitter else 0)
        if self.latency_of is not None:
            delay = self.latency_of(last)
        if delay > 0:
            if self.capacity is not None:
                async with self.capacity:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(delay)
        if fault == "server_error":
            return self._error(self._random.choice((500, 503)), "internal error (injected)", None)
        # as Bedrock does: max_tokens is held at admission, the unused part returned at the end
        is_root = self.root_marker is not None and self.root_marker in prompt
        content = self.root_reply if is_root else self.reply(last) if self.reply is not None else answer_for(last)
        capped = False
        if stated is not None:  # a reply longer than the request allows stops there
            content, capped = cap_reply(content, max_tokens)
        output = min(self.output_tokens, max_tokens)
        used = prompt_tokens + output
        if self._in_window(admitted):
            self._recent_tokens += used - admitted.tokens
        admitted.tokens, admitted.output_tokens = used, output
        model = body.get("model", "fake")
        finish = "length" if capped else "stop"
        if body.get("stream") and not self.never_stream:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": output, "total_tokens": used}
            return await self._stream_chunks(request, model, body, content, finish, usage if self.usage else None)
        text = _ANSWER % (self.counters.admitted, json.dumps(model), json.dumps(content), finish)
        if self.usage:
            text += _USAGE % (prompt_tokens, output, used)
        headers = self._quota_headers(self._now())
        headers["Content-Type"] = _JSON
        return web.Response(body=(text + "}").encode(), headers=headers)

    async def _stream_chunks(self, request: web.BaseRequest, model: Any, body: dict[str, Any], content: str,
                             finish: str, usage: dict[str, int] | None) -> web.StreamResponse:
        """The reply as OpenAI's server-sent ``chat.completion.chunk`` events, 16 characters each."""
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **self._quota_headers(self._now())})
        await response.prepare(request)
        pieces = [content[i:i + 16] for i in range(0, len(content), 16)] or [""]
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base: dict[str, Any] = {"id": f"chatcmpl-{self.counters.admitted}", "object": "chat.completion.chunk",
                                "created": 0, "model": model}
        if include_usage:
            base["usage"] = None  # on every chunk but the last, with include_usage

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            await response.write(f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode())

        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        fault = self.next_stream_fault()
        if fault is not None:
            pieces = pieces[: max(1, len(pieces) // 2)]
        for piece in pieces:
            await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        if fault is None:
            await send([{"index": 0, "delta": {}, "finish_reason": finish}])
            if include_usage and usage is not None:
                await send([], usage=usage)
            await response.write(b"data: [DONE]\n\n")
        elif fault == "torn":  # the connection ends cleanly inside an event
            await response.write(b'data: {"id": "chatcmpl-')
        elif fault != "cut":  # an error object inside the stream; "cut" just ends it here
            await response.write(f"data: {json.dumps({'error': STREAM_ERRORS[fault]})}\n\n".encode())
        await response.write_eof()
        return response

    def _quota_headers(self, now: float) -> dict[str, str]:
        """OpenAI's request-quota headers, when ``rate_headers`` is on and an RPM is set."""
        if not self.rate_headers or self.rpm is None:
            return {}
        self._expire(now)
        remaining = max(0, self.rpm - len(self._recent))
        reset = self._recent[0].at + self.window - now if self._recent else 0.0
        return {"x-ratelimit-limit-requests": str(self.rpm), "x-ratelimit-remaining-requests": str(remaining),
                "x-ratelimit-reset-requests": f"{max(0.0, reset):.3f}s"}

    def _limit_headers(self, now: float) -> dict[str, str]:
        """Every ``x-ratelimit-*`` header of the limits the fake has, as OpenAI sends them with a 429."""
        self._expire(now)
        reset = f"{max(0.0, self._recent[0].at + self.window - now if self._recent else 0.0):.3f}s"
        headers: dict[str, str] = {}
        if self.rpm is not None:
            headers |= {"x-ratelimit-limit-requests": str(self.rpm),
                        "x-ratelimit-remaining-requests": str(max(0, self.rpm - len(self._recent))),
                        "x-ratelimit-reset-requests": reset}
        if self.tpm is not None:
            headers |= {"x-ratelimit-limit-tokens": str(self.tpm),
                        "x-ratelimit-remaining-tokens": str(max(0, self.tpm - self._recent_tokens)),
                        "x-ratelimit-reset-tokens": reset}
        return headers

    def _draw_fault(self) -> str | None:
        plan = self.faults
        if plan.total <= 0:
            return None
        draw = self._random.random()
        for name in ("throttle", "server_error", "reset", "timeout"):
            draw -= getattr(plan, name)
            if draw < 0:
                self.counters.faults[name] += 1
                return name
        return None

    @staticmethod
    def _error(status: int, message: str, code: str | None, retry_after: float | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        headers = dict(headers or {})
        if retry_after:  # OpenAI sends both: whole seconds, and milliseconds
            headers["retry-after"] = str(max(1, math.ceil(retry_after)))
            headers["retry-after-ms"] = str(math.ceil(retry_after * 1000))
        return web.json_response(
            {"error": {"message": message, "type": "fake", "code": code}}, status=status, headers=headers
        )

    def max_in_window(self, *, tokens: bool = False) -> int:
        """The most requests (or tokens) the server admitted within any window."""
        best, total, start = 0, 0, 0
        log = self.admitted
        for item in log:
            total += item.tokens if tokens else 1
            while log[start].at <= item.at - self.window:
                total -= log[start].tokens if tokens else 1
                start += 1
            best = max(best, total)
        return best

    #: What follows the host and port in :attr:`base_url`.
    url_path = "/v1"

    def _make_runner(self) -> web.BaseRunner:
        return web.ServerRunner(web.Server(self._route, handler_cancellation=True, access_log=None))

    async def start(self) -> str:
        self._runner = self._make_runner()
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, backlog=BACKLOG)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}{self.url_path}"
        return self.base_url

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAIServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.counters.requests,
            "admitted": self.counters.admitted,
            "rate_limited": self.counters.limited,
            "over_concurrency": self.counters.over_concurrency,
            "peak_in_flight": self.peak_in_flight,
            "faults": dict(self.counters.faults),
            "admitted_tokens": sum(a.tokens for a in self.admitted),
            "max_requests_in_window": self.max_in_window(),
            "max_tokens_in_window": self.max_in_window(tokens=True),
        }
