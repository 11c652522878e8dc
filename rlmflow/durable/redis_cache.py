"""The sub-call cache in Redis: one cache for every replica of a service, on any machine.

Each answer is one Redis string (JSON) under ``<namespace>:cache:<request key>`` that expires
after the cache's ``ttl``; a sorted set ``<namespace>:cache-lru`` orders the keys by last use,
and past ``max_entries`` a store evicts the least recently used, in one script (atomic, so
replicas storing at once never evict more or less than the cap says).

A cache never fails a run: when Redis does not answer within the shared config's ``timeout``, a
lookup is a miss and a store is dropped (and logged), and the run goes on paying as it would
without a cache.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
import structlog

from .._exceptions import ConfigurationError
from ..dispatch.shared import SharedConfig
from .cache import DEFAULT_CACHE_TTL, CachedAnswer, CallCache

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisCallCache"]

_logger = structlog.get_logger("rlmflow.cache")

DEFAULT_MAX_ENTRIES = 1_000_000

# KEYS: the LRU set. ARGV: the entry's key prefix, its key, its value, ttl in ms (0: none),
# now, max entries.
_STORE = """
local entry = ARGV[1] .. ARGV[2]
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', entry, ARGV[3], 'PX', ARGV[4])
else
  redis.call('SET', entry, ARGV[3])
end
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[2])
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[6])
if excess > 0 then
  local victims = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
  for _, victim in ipairs(victims) do
    redis.call('DEL', ARGV[1] .. victim)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, excess - 1)
end
return excess
"""


class RedisCallCache(CallCache):
    """A sub-call cache in Redis (``shared``: a ``redis://`` URL or the :class:`SharedConfig` of
    the Dispatcher's ``[shared]`` table; its namespace prefixes every key).

    Raises :class:`ConfigurationError` for a bad URL, a ``ttl`` that is not positive, or a
    ``max_entries`` that is not a positive integer. Needs the ``redis`` extra.
    """

    def __init__(
        self, shared: str | SharedConfig, *, ttl: float | None = DEFAULT_CACHE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES, roots: bool = True,
    ) -> None:
        super().__init__()
        self.config = shared if isinstance(shared, SharedConfig) else SharedConfig(shared)
        if ttl is not None and not ttl > 0:
            raise ConfigurationError(f"a cache's ttl must be a positive number of seconds (or None), not {ttl!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries <= 0:
            raise ConfigurationError(f"a cache's max_entries must be a positive integer, not {max_entries!r}")
        self.ttl = ttl
        self.max_entries = max_entries
        self.roots = roots
        self._prefix = f"{self.config.namespace}:cache:"
        self._lru = f"{self.config.namespace}:cache-lru"
        self._client: Redis | None = None
        self._store: AsyncScript | None = None
        self._lock = anyio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _connected(self) -> tuple[Redis, AsyncScript]:
        """This event loop's client (a client is bound to the loop it was made on: an RLM used
        from ``run_sync`` twice, or from a test's loops, gets one per loop)."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._client is not None and self._loop is not loop:
                self._client = None  # its connections died with their loop; nothing to close here
            if self._client is None:
                try:
                    import redis.asyncio as aioredis
                except ImportError as exc:
                    raise ConfigurationError("a Redis cache needs redis-py: pip install 'rlmflow-async[redis]'") \
                        from exc
                self._client = aioredis.Redis.from_url(
                    self.config.url, socket_timeout=self.config.timeout,
                    socket_connect_timeout=self.config.timeout, decode_responses=True,
                )
                self._store = self._client.register_script(_STORE)
                self._loop = loop
            assert self._store is not None
            return self._client, self._store

    async def lookup(self, keys: Sequence[str]) -> list[CachedAnswer | None]:
        if not keys:
            return []
        try:
            client, _ = await self._connected()
            with anyio.fail_after(self.config.timeout * 2):
                values = await client.mget([self._prefix + key for key in keys])
                found = [_answer(value) for value in values]
                used = {key: time.time() for key, hit in zip(keys, found, strict=True) if hit is not None}
                if used:  # the least recently used are evicted first
                    await client.zadd(self._lru, used, xx=True)
            return found
        except ConfigurationError:
            raise
        except Exception as exc:  # a cache never fails a run: Redis down, slow, or anything else
            _logger.warning("sub-call cache unavailable: asked as misses", error=type(exc).__name__)
            return [None] * len(keys)

    async def store(self, key: str, answer: CachedAnswer) -> None:
        # ASCII JSON: a lone surrogate in a model's answer is escaped, not an encoding error
        value = json.dumps([answer.text, answer.model, answer.finish_reason, answer.input_tokens,
                            answer.output_tokens])
        try:
            _, script = await self._connected()
            with anyio.fail_after(self.config.timeout * 2):
                await script(keys=[self._lru], args=[
                    self._prefix, key, value, int(self.ttl * 1000) if self.ttl is not None else 0, time.time(),
                    self.max_entries,
                ])
        except Exception as exc:  # the answer is not kept; the call it answered stands
            _logger.warning("sub-call cache unavailable: answer not kept", error=type(exc).__name__)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()  # a client of a loop that has ended went with its connections


def _answer(value: bytes | str | None) -> CachedAnswer | None:
    """A stored value as an answer; anything else (absent, of another shape) is a miss."""
    if value is None:
        return None
    try:
        text, model, finish_reason, input_tokens, output_tokens = json.loads(value)
    except (ValueError, TypeError):
        return None
    if not (isinstance(text, str) and isinstance(model, str) and isinstance(input_tokens, int)
            and isinstance(output_tokens, int) and (finish_reason is None or isinstance(finish_reason, str))):
        return None
    return CachedAnswer(text, model, finish_reason, input_tokens, output_tokens)
