"""Amazon Bedrock through aioboto3: the Converse API, and ConverseStream for streamed replies.

One aioboto3 ``bedrock-runtime`` client is shared by every model of a process that uses the same
event loop, region, endpoint and credentials: it is created on the first request and closed
when the last model using it is closed. botocore's own retries are off (the Dispatcher owns
retries), and its connection pool is sized to the lane's concurrency ceiling (botocore's default
of 10 connections silently caps fan-out at 10 calls in flight).

Credentials come only from the standard AWS chain (environment, shared files, SSO, instance or
container roles), optionally through a named ``profile``: rlmflow never takes keys as arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread

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
from ..dispatch.limits import Limits
from . import guard
from .base import (
    Message,
    ModelRequest,
    ModelResponse,
    TextCallback,
    Usage,
    estimate_tokens,
    estimated_usage,
    note_partial_output,
)
from .caching import PromptCache, cache_points, resolve_prompt_cache

__all__ = ["DEFAULT_POOL_CONNECTIONS", "BedrockModel", "counting_model_id", "translate_botocore"]

#: Connections per shared client unless a lane asks for more (>= the Dispatcher's default ceiling).
DEFAULT_POOL_CONNECTIONS = 256

# ValidationException messages Bedrock and its models use for an input that does not fit.
_TOO_LONG = re.compile(
    r"too long|context (window|length|limit)|maximum context|exceeds? .*(context|max(imum)? tokens|token limit)",
    re.IGNORECASE,
)
# Bedrock counts each output token of these Claude models as 5 tokens against the TPM quota
# (Claude 3.7 Sonnet and the Claude 4 generation on); other models 1:1.
_HEAVY_OUTPUT = re.compile(r"anthropic\.claude-(3-7-|(sonnet|opus|haiku)-[4-9])")
# A ThrottlingException about a quota per day (Converse's "Too many tokens per day"): a spent quota.
_DAILY_QUOTA = re.compile(r"per day|daily", re.IGNORECASE)
# Retried, as botocore's standard retry mode and the model's documentation have them: 5xx faults
# (InternalServer, ServiceUnavailable), ModelTimeoutException (408: the model took too long this
# time), ModelErrorException (424: "Try your request again"), ModelStreamErrorException ("Retry your
# request"). ThrottlingException and ModelNotReadyException (the model's retryable trait) apart.
_TRANSIENT_CODES = {
    "InternalServerException", "ServiceUnavailableException", "ModelStreamErrorException",
    "ModelTimeoutException", "ModelErrorException", "RequestTimeout", "RequestTimeoutException",
}
# A system-defined cross-region inference profile: its geography prefix (and its ARN's head), before
# the foundation model's id (``us.anthropic.claude-...``, ``arn:aws:bedrock:...:inference-profile/eu.amazon...``).
_PROFILE = re.compile(r"^(?:arn:aws[\w-]*:bedrock:[\w-]*:\d*:inference-profile/)?"
                      r"(?:us|us-gov|eu|apac|jp|au|ca|global)\.(?=[a-z0-9-]+\.)")
_FATAL_CODES = {
    "AccessDeniedException", "ResourceNotFoundException", "UnrecognizedClientException",
    "ExpiredTokenException", "InvalidSignatureException", "IncompleteSignature",
}


class _Stream:
    """What a ConverseStream reply has said so far, and whether its last events arrived."""

    __slots__ = ("metadata", "on_text", "parts", "stop_reason", "stopped", "usage")

    def __init__(self, on_text: TextCallback | None) -> None:
        self.on_text = on_text
        self.parts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.stopped = self.metadata = False

    def add(self, piece: str) -> None:
        self.parts.append(piece)
        if self.on_text is not None:
            self.on_text(piece)

    def read(self, event: dict[str, Any]) -> None:
        if "contentBlockDelta" in event:
            piece = event["contentBlockDelta"].get("delta", {}).get("text")
            if piece:
                self.add(piece)
        elif "messageStop" in event:
            self.stop_reason, self.stopped = event["messageStop"].get("stopReason"), True
        elif "metadata" in event:
            self.usage, self.metadata = event["metadata"].get("usage"), True

    def read_plain(self, reply: dict[str, Any]) -> None:
        """A whole Converse reply where events were expected (read like the last events arrived)."""
        text = _converse_text(reply)
        if text:
            self.add(text)
        self.stop_reason, self.usage = reply.get("stopReason"), reply.get("usage")
        self.stopped = self.metadata = "output" in reply


@dataclass
class _Shared:
    client: Any
    stack: AsyncExitStack
    users: int = 0
    pool: int = 0


@dataclass
class _ClientCache:
    """The process's shared clients, keyed by (event loop, region, endpoint, profile, session)."""

    clients: dict[tuple[Any, ...], _Shared] = field(default_factory=dict)
    lock: dict[tuple[Any, ...], asyncio.Lock] = field(default_factory=dict)


_CACHE = _ClientCache()


class BedrockModel:
    """A model on Amazon Bedrock, called through the Converse API.

    ``model_id`` is a foundation model id or a cross-region inference profile id
    (``us.anthropic.claude-sonnet-4-5-20250929-v1:0``). ``region`` defaults to the AWS chain's
    (``AWS_REGION`` / the profile's); ``endpoint_url`` points the client elsewhere (a VPC endpoint,
    or a local fake in tests). ``session`` is an ``aioboto3.Session`` to take credentials from;
    by default one is made from ``profile`` and the standard chain.

    ``stream=True`` makes :meth:`request` use ConverseStream (as :meth:`request_stream` always
    does), calling ``on_text`` with each piece of text as it arrives: use it for a root model
    whose turns are shown live.

    :meth:`count_request_tokens` asks Bedrock's ``CountTokens`` for a request's exact input
    tokens (free, for the models Bedrock counts for).

    ``prompt_cache`` says where ``cachePoint`` blocks go: by default after the messages a request
    marks (``Message.cache_point``) for the models Bedrock caches for (Claude, Nova), within
    their minimum length and their 4 points a request; ``False`` sends none, a
    :class:`~rlmflow.models.caching.PromptCache` sets the rules.

    Raises :class:`ConfigurationError` when aioboto3 is not installed.
    """

    def __init__(
        self,
        model_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        profile: str | None = None,
        session: Any = None,
        max_pool_connections: int = DEFAULT_POOL_CONNECTIONS,
        read_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        stream: bool = False,
        on_text: TextCallback | None = None,
        prompt_cache: PromptCache | bool | None = None,
    ) -> None:
        try:
            import aioboto3
        except ImportError as exc:  # pragma: no cover - aioboto3 is a dependency
            raise ConfigurationError("Bedrock models need aioboto3: pip install aioboto3") from exc
        if not model_id:
            raise ConfigurationError("a Bedrock model needs a model id")
        self._model_id = model_id
        self.prompt_cache = resolve_prompt_cache(prompt_cache, "aws.bedrock", model_id)
        self._session = session or aioboto3.Session(profile_name=profile, region_name=region)
        self._region = region or self._session.region_name
        if not self._region:
            raise ConfigurationError(
                f"no AWS region for bedrock:{model_id}: write bedrock:{model_id}@<region>, or set AWS_REGION"
            )
        # botocore reads these too; known here so the test guard sees where calls go
        self._endpoint_url = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_BEDROCK_RUNTIME") or os.environ.get("AWS_ENDPOINT_URL")
        )
        self._key = (self._region, self._endpoint_url, profile, id(session) if session is not None else None)
        self._pool = max_pool_connections
        self._read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._stream = stream
        self._on_text = on_text
        self._shared: _Shared | None = None
        self._shared_key: tuple[Any, ...] | None = None

    # -- the LanguageModel protocol ------------------------------------------------------------------
    @property
    def provider(self) -> str:
        return "aws.bedrock"

    @property
    def name(self) -> str:
        return self._model_id

    @property
    def endpoint(self) -> str:
        """What tells this model's quota apart from the same model's elsewhere: the region (or URL)."""
        return self._endpoint_url or self._region

    @property
    def region(self) -> str:
        return self._region

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    @property
    def lane_limits(self) -> Limits | None:
        """Default limits of this model's lane: ``output_weight=5`` where Bedrock weighs output 5x.

        Limits configured on the Dispatcher take precedence: give them the same ``output_weight``.
        """
        return Limits(output_weight=5.0) if _HEAVY_OUTPUT.search(self._model_id) else None

    def reserve_connections(self, count: int) -> None:
        """Make the client's connection pool hold at least ``count`` connections.

        The Dispatcher calls it with the lane's concurrency ceiling when the lane is created
        (before the first request creates the client, so the pool is sized once).
        """
        self._pool = max(self._pool, count)

    async def request(self, request: ModelRequest) -> ModelResponse:
        if self._stream:
            return await self.request_stream(request, self._on_text)
        client = await self._client()
        try:
            reply = await client.converse(**self._arguments(request))
        except Exception as exc:
            raise self._translate(exc) from exc
        text = _converse_text(reply)
        return ModelResponse(
            text=text,
            usage=_usage(reply.get("usage"), request, text),
            model=self._model_id,
            finish_reason=reply.get("stopReason"),
        )

    async def request_stream(self, request: ModelRequest, on_text: TextCallback | None) -> ModelResponse:
        """Send one request with ConverseStream, calling ``on_text`` with each piece of text.

        The reply is whole once ``messageStop`` and ``metadata`` arrived; a stream that ends
        before them is a :class:`TransientModelError` carrying the text so far. An endpoint that
        answers with a plain Converse reply (JSON) is read as one. ``stopReason`` is the
        response's ``finish_reason`` (``max_tokens`` when the output hit the cap).
        """
        client = await self._client()
        stream = _Stream(on_text)
        try:
            reply = await client.converse_stream(**self._arguments(request))
            events = reply["stream"]
            try:
                plain = reply.get(_PLAIN_REPLY)
                if plain is not None:
                    stream.read_plain(plain)
                else:
                    async for event in events:
                        stream.read(event)
            finally:
                events.close()  # returns the connection to the pool, also when cancelled mid-stream
        except Exception as exc:
            raise note_partial_output(self._translate(exc), stream.parts) from exc
        if not (stream.stopped and stream.metadata):
            missing = "messageStop" if not stream.stopped else "metadata"
            raise note_partial_output(TransientModelError(
                f"the stream ended before its {missing}: the reply is not whole", provider=self.provider,
                model=self._model_id,
            ), stream.parts)
        text = "".join(stream.parts)
        return ModelResponse(
            text=text, usage=_usage(stream.usage, request, text), model=self._model_id,
            finish_reason=stream.stop_reason,
        )

    async def count_request_tokens(self, request: ModelRequest) -> int:
        """The input tokens Bedrock counts for ``request``: ``CountTokens`` with the system prompt
        and messages as Converse would send them (``input.converse``), through the same client,
        credentials and timeouts as :meth:`request`.

        Bedrock counts for some foundation models only (Claude ones), named by their bare id:
        a cross-region inference profile (``us.anthropic.claude-...``) is counted as the model
        it routes to (:func:`counting_model_id`). Any other model is refused with a
        ``ValidationException`` ("doesn't support counting tokens"): a :class:`FatalModelError`.
        """
        client = await self._client()
        try:
            reply = await client.count_tokens(modelId=counting_model_id(self._model_id),
                                              input={"converse": self._count_input(request)})
        except Exception as exc:
            raise self._translate(exc) from exc
        tokens = reply.get("inputTokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
            raise TransientModelError(f"a malformed token count: {str(reply)[:200]}", provider=self.provider,
                                      model=self._model_id)
        return tokens

    async def aclose(self) -> None:
        shared, key = self._shared, self._shared_key
        self._shared = self._shared_key = None
        if shared is None or key is None:
            return
        shared.users -= 1
        if shared.users == 0 and _CACHE.clients.get(key) is shared:
            del _CACHE.clients[key]
            _CACHE.lock.pop(key, None)
            await shared.stack.aclose()

    def __repr__(self) -> str:
        where = self._endpoint_url or self._region
        return f"BedrockModel({self._model_id!r}, region={where!r}, stream={self._stream})"

    # -- internals -------------------------------------------------------------------------------
    async def _client(self) -> Any:
        if self._shared is not None:
            return self._shared.client
        guard.check_request_allowed(self._endpoint_url or f"https://bedrock-runtime.{self._region}.amazonaws.com")
        key = (asyncio.get_running_loop(), *self._key)
        lock = _CACHE.lock.setdefault(key, asyncio.Lock())
        async with lock:
            if self._shared is not None:  # another call of this model made or joined it meanwhile
                return self._shared.client
            shared = _CACHE.clients.get(key)
            if shared is None:
                shared = await self._create_client()
                _CACHE.clients[key] = shared
            elif shared.pool < self._pool:
                _note_small_pool(shared.pool, self._pool, self._model_id)
            shared.users += 1
        self._shared, self._shared_key = shared, key
        return shared.client

    async def _create_client(self) -> _Shared:
        from botocore.config import Config

        config = Config(
            retries={"total_max_attempts": 1},  # the Dispatcher retries, with every lane in view
            max_pool_connections=self._pool,
            read_timeout=self._read_timeout,
            connect_timeout=self._connect_timeout,
            tcp_keepalive=True,
        )
        # botocore reads its JSON models from disk while making a client (~90 ms here): read them in
        # a thread first, into the loader's cache, so the event loop is not blocked for that long
        await anyio.to_thread.run_sync(_warm_loader, self._session)
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            self._session.client(
                "bedrock-runtime", region_name=self._region, endpoint_url=self._endpoint_url, config=config
            )
        )
        client.meta.events.register("before-parse.bedrock-runtime.ConverseStream", _read_plain_reply)
        return _Shared(client=client, stack=stack, pool=self._pool)

    @property
    def caches_prompts(self) -> bool:
        """Whether requests may carry cache points (a cache write costs more: the Dispatcher reserves it)."""
        return self.prompt_cache.enabled

    def _arguments(self, request: ModelRequest) -> dict[str, Any]:
        points = cache_points(request.messages, self.prompt_cache, self.count_tokens)
        system = [block for i, m in enumerate(request.messages) if m.role == "system"
                  for block in _blocks(m.content, i in points)]
        messages = [(m, i in points) for i, m in enumerate(request.messages) if m.role != "system"]
        config: dict[str, Any] = {"maxTokens": request.max_tokens}
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if request.top_p is not None:
            config["topP"] = request.top_p
        if request.stop:
            config["stopSequences"] = list(request.stop)
        arguments: dict[str, Any] = {
            "modelId": self._model_id,
            "messages": _converse_messages(messages),
            "inferenceConfig": config,
        }
        if system:
            arguments["system"] = system
        return arguments

    @staticmethod
    def _count_input(request: ModelRequest) -> dict[str, Any]:
        """CountTokens' ``converse`` input: the request's system blocks and messages, without
        cache points (they change no count)."""
        system = [{"text": m.content} for m in request.messages if m.role == "system"]
        counted: dict[str, Any] = {
            "messages": _converse_messages([(m, False) for m in request.messages if m.role != "system"]),
        }
        if system:
            counted["system"] = system
        return counted

    def _translate(self, exc: Exception) -> ModelError:
        return translate_botocore(exc, provider=self.provider, model=self._model_id)


def counting_model_id(model_id: str) -> str:
    """The model id ``CountTokens`` is asked with: a system-defined cross-region inference profile
    (``us.anthropic.claude-...``, also as an ``inference-profile/`` ARN) is counted as the
    foundation model it routes to (``anthropic.claude-...``), since CountTokens takes foundation
    model ids only; any other id is passed as it is."""
    return _PROFILE.sub("", model_id)


def translate_botocore(exc: BaseException, *, provider: str, model: str) -> ModelError:
    """Map a botocore failure (also one raised inside a strands model) to the Dispatcher's error classes."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
    )

    where: dict[str, Any] = {"provider": provider, "model": model}
    if isinstance(exc, ModelError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error") or {}
        code = str(error.get("Code") or "")
        code = code[:1].upper() + code[1:]  # stream events name them in lowerCamelCase
        message = str(error.get("Message") or exc)
        status = (exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        detail: dict[str, Any] = {**where, "status_code": status}
        if code == "ThrottlingException" and _DAILY_QUOTA.search(message):
            return QuotaExhaustedError(f"Bedrock quota spent: {message}", **detail)
        if code == "ThrottlingException":
            return ThrottledError(f"throttled by Bedrock: {message}", **detail)
        if code == "ServiceQuotaExceededException":  # InvokeModel's (strands models may use it), not Converse's
            return QuotaExhaustedError(f"Bedrock service quota exceeded: {message}", **detail)
        if code == "ModelNotReadyException":
            return ModelNotReadyError(f"model not ready: {message}", **detail)
        if code == "ValidationException" and _TOO_LONG.search(message):
            return ContextOverflowError(f"input too long for {model}: {message}", **detail)
        if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
            return TransientModelError(f"Bedrock {code or status}: {message}", **detail)
        if code in _FATAL_CODES:
            return FatalModelError(f"Bedrock refused the call ({code}): {message}", **detail)
        return FatalModelError(f"Bedrock {code or status}: {message}", **detail)
    if isinstance(exc, NoCredentialsError):
        return FatalModelError(f"no AWS credentials in the standard chain: {exc}", **where)
    if isinstance(exc, ConnectionError | HTTPClientError):
        return TransientModelError(f"connection to Bedrock failed: {exc}", **where)
    if isinstance(exc, BotoCoreError):
        return FatalModelError(f"botocore: {exc}", **where)
    return TransientModelError(f"{type(exc).__name__}: {exc}", **where)


def _warm_loader(session: Any) -> None:
    """Load what creating a bedrock-runtime client reads from disk (cached by botocore's loader)."""
    botocore_session = getattr(session, "_session", None)  # aioboto3.Session wraps an aiobotocore one
    if botocore_session is None:
        return
    from botocore.exceptions import DataNotFoundError, UnknownServiceError

    loader = botocore_session.get_component("data_loader")
    for kind in ("service-2", "endpoint-rule-set-1"):
        with contextlib.suppress(DataNotFoundError, UnknownServiceError):  # best effort
            loader.load_service_model("bedrock-runtime", kind)
    for name in ("endpoints", "partitions", "sdk-default-configuration", "_retry"):
        with contextlib.suppress(DataNotFoundError):
            loader.load_data(name)


#: Where :func:`_read_plain_reply` leaves a JSON body that answered ConverseStream.
_PLAIN_REPLY = "rlmflowPlainReply"


async def _read_plain_reply(response_dict: dict[str, Any], customized_response_dict: dict[str, Any],
                            **_: Any) -> None:
    """botocore's ``before-parse`` hook for ConverseStream: a 200 answered with JSON (an endpoint
    that ignores streaming) is read whole here and handed on beside the (then empty) event stream."""
    headers = response_dict.get("headers") or {}
    if response_dict.get("status_code") != 200 or "json" not in str(headers.get("content-type", "")):
        return
    body = response_dict.get("body")  # the raw response: aiohttp's (read) or httpx's (aread)
    read = getattr(body, "aread", None) or getattr(body, "read", None)
    if read is None:
        return
    raw = read()
    raw = await raw if asyncio.iscoroutine(raw) else raw
    try:
        customized_response_dict[_PLAIN_REPLY] = json.loads(raw)
    except ValueError:
        customized_response_dict[_PLAIN_REPLY] = {}  # neither events nor a reply: not whole


def _converse_text(reply: dict[str, Any]) -> str:
    content = (reply.get("output") or {}).get("message", {}).get("content") or []
    return "".join(block.get("text", "") for block in content)


#: The block that ends a cached prefix (botocore's CachePointBlock; "default" is its one type).
CACHE_POINT: dict[str, Any] = {"cachePoint": {"type": "default"}}


def _blocks(text: str, cached: bool) -> list[dict[str, Any]]:
    return [{"text": text}, CACHE_POINT] if cached else [{"text": text}]


def _converse_messages(messages: list[tuple[Message, bool]]) -> list[dict[str, Any]]:
    """Converse messages: text blocks (a cache point after a marked one), consecutive messages of
    one role merged (Converse needs alternation)."""
    out: list[dict[str, Any]] = []
    for message, cached in messages:
        if out and out[-1]["role"] == message.role:
            out[-1]["content"].extend(_blocks(message.content, cached))
        else:
            out.append({"role": message.role, "content": _blocks(message.content, cached)})
    return out


def _usage(raw: dict[str, Any] | None, request: ModelRequest, text: str) -> Usage:
    """Bedrock usage mapped to ours: ``inputTokens`` excludes the cached parts, our input counts them."""
    if not raw:
        return estimated_usage(request, text)
    read = int(raw.get("cacheReadInputTokens") or 0)
    write = int(raw.get("cacheWriteInputTokens") or 0)
    return Usage(
        int(raw.get("inputTokens") or 0) + read + write,
        int(raw.get("outputTokens") or 0),
        1,
        cache_read_tokens=read,
        cache_write_tokens=write,
    )


def _note_small_pool(have: int, want: int, model_id: str) -> None:
    import logging

    logging.getLogger("rlmflow").warning(
        "the shared Bedrock client for %s was created with %d connections; %d were asked for later. "
        "Build models with max_pool_connections=%d to avoid queueing inside botocore.",
        model_id, have, want, want,
    )
