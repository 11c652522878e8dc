"""The lean HTTP path shared by the JSON providers (OpenAI-compatible and Anthropic).

Measured on this machine against a local fake (``benchmarks/providers.py``): the openai SDK
costs about 2 ms of host CPU a call and raw httpx about 0.9 ms even one call at a time (more
under concurrency), while aiohttp costs about 0.2 ms. aiohttp is already installed with
aioboto3 (aiobotocore is built on it), so the two JSON protocols are spoken here directly over
one long-lived aiohttp session per model: JSON bodies, server-sent events for streams, and the
status, headers and body of a failure handed back for the provider to classify.
"""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import aiohttp

from .._exceptions import ModelError, TransientModelError
from . import guard
from .base import ModelRequest, ModelResponse, TextCallback, estimate_tokens, note_partial_output

__all__ = [
    "DEFAULT_POOL_CONNECTIONS", "HTTPFailure", "HTTPModel", "HTTPStatus", "JSONReply", "JSONTransport",
    "ServerEvent", "StreamedText", "rate_headers", "retry_after",
]

#: Connections per model's session unless its lane asks for more (>= the Dispatcher's default ceiling).
DEFAULT_POOL_CONNECTIONS = 256


@dataclass(frozen=True, slots=True)
class ServerEvent:
    """One server-sent event: its ``event:`` name (empty if none) and its ``data:`` text."""

    event: str
    data: str


@dataclass(frozen=True, slots=True)
class JSONReply:
    """A whole JSON document where server-sent events were asked for (a server that ignores ``"stream": true``)."""

    body: Any


class HTTPFailure(Exception):
    """No response: the connection failed, broke or timed out."""


class HTTPStatus(Exception):
    """A response with an error status; ``body`` is the decoded JSON (or the text)."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.headers = headers
        self.body = body


class JSONTransport:
    """A long-lived aiohttp session posting JSON, created lazily in the running event loop.

    ``pool`` is the most connections kept open (sized to the lane's ceiling by
    :meth:`reserve`); ``timeout`` bounds one whole call, ``connect_timeout`` the connection.
    """

    def __init__(self, *, pool: int = DEFAULT_POOL_CONNECTIONS, timeout: float = 600.0,
                 connect_timeout: float = 10.0) -> None:
        self.pool = pool
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def reserve(self, count: int) -> None:
        """Keep at least ``count`` connections (before the session exists; later calls only widen new ones)."""
        self.pool = max(self.pool, count)

    def _client(self) -> aiohttp.ClientSession:
        """This loop's session: one per event loop (``run_sync`` runs each call in a new loop)."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            for other in [other for other in self._sessions if other.is_closed()]:
                self._forget(self._sessions.pop(other))  # its connections died with its loop
            connector = aiohttp.TCPConnector(limit=self.pool, limit_per_host=self.pool, keepalive_timeout=60)
            session = self._sessions[loop] = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout, json_serialize=json.dumps
            )
        return session

    async def post(
        self, url: str, payload: dict[str, Any], headers: Mapping[str, str]
    ) -> tuple[Any, Mapping[str, str]]:
        """POST ``payload`` as JSON; the decoded reply and its headers. Raises HTTPStatus / HTTPFailure."""
        try:
            async with self._client().post(url, data=json.dumps(payload), headers=headers) as response:
                raw = await response.read()
                if response.status >= 400:
                    raise HTTPStatus(response.status, response.headers, _decode(raw))
                return json.loads(raw), response.headers
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
            raise HTTPFailure(f"{type(exc).__name__}: {exc}") from exc

    async def stream(
        self, url: str, payload: dict[str, Any], headers: Mapping[str, str]
    ) -> AsyncGenerator[ServerEvent | JSONReply | Mapping[str, str], None]:
        """POST and read server-sent events: first the response headers, then each event.

        A JSON response (some servers answer ``"stream": true`` with a plain completion) comes
        out as one :class:`JSONReply`. An event cut inside one of its lines is dropped; one whose
        lines are whole is kept even without the blank line after it. The response is closed
        when the iterator is closed or abandoned (also on cancellation).
        """
        try:
            async with self._client().post(url, data=json.dumps(payload), headers=headers) as response:
                if response.status >= 400:
                    raise HTTPStatus(response.status, response.headers, _decode(await response.read()))
                yield response.headers
                if response.content_type.endswith("/json"):
                    yield JSONReply(json.loads(await response.read()))
                    return
                event, data = "", list[str]()
                async for line in response.content:
                    if not line.endswith(b"\n"):
                        data = []  # the stream ended inside a line: that event is incomplete
                        break
                    text = line.decode("utf-8").rstrip("\r\n")
                    if not text:
                        if data:
                            yield ServerEvent(event, "\n".join(data))
                        event, data = "", []
                    elif text.startswith("data:"):
                        data.append(text[5:].lstrip(" "))
                    elif text.startswith("event:"):
                        event = text[6:].strip()
                if data:  # whole lines without the blank line after them (a lenient server's last event)
                    yield ServerEvent(event, "\n".join(data))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise HTTPFailure(f"{type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _forget(session: aiohttp.ClientSession) -> None:
        """Mark a session of a finished loop closed without awaiting (that loop cannot run again)."""
        connector = session.connector
        if connector is not None:
            connector._close()  # the synchronous part of close(); the loop that owned it is gone
        session.detach()

    async def aclose(self) -> None:
        """Close this loop's session; forget those of loops that are closed."""
        loop = asyncio.get_running_loop()
        sessions, self._sessions = self._sessions, {}
        for owner, session in sessions.items():
            if owner is loop:
                await session.close()
            elif owner.is_closed():
                self._forget(session)
            else:
                self._sessions[owner] = session  # another thread's running loop closes its own


class StreamedText:
    """What a streamed reply has said so far: its pieces of text (each passed on to ``on_text``),
    its finish reason, usage and model as reported, the rate-limit headers of its response, and
    whether its terminal event arrived (``done``: only then is the reply whole)."""

    __slots__ = ("done", "finish", "headers", "model", "on_text", "parts", "usage")

    def __init__(self, on_text: TextCallback | None) -> None:
        self.on_text = on_text
        self.parts: list[str] = []
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None
        self.headers: dict[str, str] = {}
        self.done = False

    def add(self, piece: str) -> None:
        self.parts.append(piece)
        if self.on_text is not None:
            self.on_text(piece)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class HTTPModel(ABC):
    """What the JSON-over-HTTP models share: name, endpoint (two servers, two lanes), pool, streaming switch."""

    #: Response headers kept on a reply (lower-cased name prefixes): the provider's rate-limit headers.
    rate_header_prefixes: tuple[str, ...] = ("retry-after",)
    #: What ends this protocol's streamed reply (named in the error when a stream ends without it).
    terminal_event = "terminal event"

    def __init__(
        self, model: str, base_url: str, *, provider: str, pool: int, timeout: float, stream: bool,
        on_text: TextCallback | None,
    ) -> None:
        self._model = model
        self._base_url = base_url.rstrip("/")
        self._provider = provider
        self._http = JSONTransport(pool=pool, timeout=timeout)
        self._stream = stream
        self._on_text = on_text
        self._url = self._base_url  # the subclass's endpoint path
        self._headers: dict[str, str] = {}

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def name(self) -> str:
        return self._model

    @property
    def endpoint(self) -> str:
        return self._base_url

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    def reserve_connections(self, count: int) -> None:
        """Keep at least ``count`` connections open (the Dispatcher passes the lane's ceiling)."""
        self._http.reserve(count)

    async def request(self, request: ModelRequest) -> ModelResponse:
        if self._stream:
            return await self.request_stream(request, self._on_text)
        return await self._request(request)

    @abstractmethod
    async def _request(self, request: ModelRequest) -> ModelResponse:
        """Send one request as this protocol's JSON and read the whole reply."""

    @abstractmethod
    def _translate(self, exc: HTTPStatus | HTTPFailure) -> ModelError:
        """The provider's error class for an HTTP status or a transport failure."""

    async def _post(self, payload: dict[str, Any], *, url: str | None = None) -> tuple[Any, Mapping[str, str]]:
        """POST to this model's URL (or ``url``, another endpoint of the same API, with the same
        headers and credentials); a failure comes out as the provider's ModelError."""
        url = url or self._url
        guard.check_request_allowed(url)
        try:
            return await self._http.post(url, payload, self._headers)
        except (HTTPStatus, HTTPFailure) as exc:
            raise self._translate(exc) from exc

    async def _post_streamed(
        self, body: dict[str, Any], on_text: TextCallback | None, read: Callable[[ServerEvent, StreamedText], bool],
        whole: Callable[[Any, StreamedText], None],
    ) -> StreamedText:
        """POST ``body`` and read its server-sent events with ``read`` (which returns True at the last
        one), or a plain JSON completion answering the streamed request with ``whole``. Each sets
        ``done`` when the reply's terminal event (or a whole completion) arrived.

        A reply is whole only then: a stream that ends cleanly without it (a proxy or server cut it
        short) is a :class:`TransientModelError`, retried like a broken connection. That error and
        every other failure, before the first piece or after, carries the text received so far."""
        guard.check_request_allowed(self._url)
        reply = StreamedText(on_text)
        try:
            async with aclosing(self._http.stream(self._url, body, self._headers)) as events:
                async for item in events:
                    if isinstance(item, ServerEvent):
                        if read(item, reply):
                            break
                    elif isinstance(item, JSONReply):
                        whole(item.body, reply)
                    else:
                        reply.headers = rate_headers(item, self.rate_header_prefixes)
        except (HTTPStatus, HTTPFailure) as exc:
            raise note_partial_output(self._translate(exc), reply.parts) from exc
        except (ValueError, LookupError, TypeError, AttributeError) as exc:  # not JSON, or not the protocol's shape
            raise note_partial_output(
                self._broken(f"a malformed reply ({type(exc).__name__}: {exc})"), reply.parts
            ) from exc
        if not reply.done:
            raise note_partial_output(self._broken(f"the stream ended before its {self.terminal_event}"), reply.parts)
        return reply

    def _broken(self, what: str) -> TransientModelError:
        return TransientModelError(f"{what}: the reply is not whole", provider=self._provider, model=self._model)

    @abstractmethod
    async def request_stream(self, request: ModelRequest, on_text: TextCallback | None) -> ModelResponse:
        """Send one request streamed, calling ``on_text`` with each piece; return the whole reply."""

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._model!r}, base_url={self._base_url!r})"


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def rate_headers(headers: Mapping[str, str], prefixes: tuple[str, ...]) -> dict[str, str]:
    """The headers whose lower-cased names start with one of ``prefixes`` (a provider's rate-limit
    headers), names lower-cased; each name is lowered once."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        name = name.lower()
        if name.startswith(prefixes):
            found[name] = value
    return found


def retry_after(headers: Mapping[str, str]) -> float | None:
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
