"""A cache or a journal named by a string, as the command line and ``RLM(...)`` name them:
``redis://``, ``rediss://`` and ``unix://`` URLs name Redis (shared by every replica), anything
else a path of an SQLite file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from .._exceptions import ConfigurationError
from ..dispatch.policy import CacheSettings, Policy
from ..dispatch.shared import SharedConfig
from .cache import DEFAULT_CACHE_BYTES, DEFAULT_CACHE_TTL, CallCache, SQLiteCallCache
from .journal import Journal, RunJournal

__all__ = ["cache_from_settings", "chosen_cache", "open_cache", "open_journal", "owned_cache"]

_REDIS = ("redis://", "rediss://", "unix://")


def _is_url(spec: str | Path) -> bool:
    """A Redis URL, whatever its case; anything else with a scheme-like head and an ``@`` is a
    mistyped URL, refused rather than taken for a file named with its password."""
    if not isinstance(spec, str):
        return False
    if spec.lower().startswith(_REDIS):
        return True
    head, colon, rest = spec.partition(":")
    if colon and "@" in rest and head.isalpha():
        raise ConfigurationError(f"{head}:...@... is not a redis://, rediss:// or unix:// URL, nor a file path")
    return False


def open_cache(spec: str | Path) -> CallCache:
    """``redis://``, ``rediss://`` or ``unix://`` URLs name a
    :class:`~rlmflow.durable.redis_cache.RedisCallCache` (shared by every replica); anything else
    is the path of a :class:`~rlmflow.durable.cache.SQLiteCallCache` file."""
    if _is_url(spec):
        from .redis_cache import RedisCallCache  # redis-py is an extra: imported when asked for

        return RedisCallCache(str(spec))
    return SQLiteCallCache(spec)


def open_journal(spec: str | Path) -> RunJournal:
    """A :class:`~rlmflow.durable.redis_journal.RedisJournal` for a Redis URL, else the path of a
    :class:`~rlmflow.durable.journal.Journal` file."""
    if _is_url(spec):
        from .redis_journal import RedisJournal  # redis-py is an extra: imported when asked for

        return RedisJournal(str(spec))
    return Journal(spec)


def cache_from_settings(settings: CacheSettings, shared: SharedConfig | None = None) -> CallCache:
    """The cache a policy file's ``[cache]`` table describes; a Redis cache takes the namespace
    and timeout of the file's ``[shared]`` table (``shared``), so tenants kept apart by namespace
    keep apart caches too."""
    ttl = settings.ttl if settings.ttl is not None else DEFAULT_CACHE_TTL
    if settings.url is not None:
        from .redis_cache import DEFAULT_MAX_ENTRIES, RedisCallCache

        config = SharedConfig(settings.url) if shared is None else SharedConfig(
            settings.url, namespace=shared.namespace, timeout=shared.timeout
        )
        return RedisCallCache(config, ttl=ttl, max_entries=settings.max_entries or DEFAULT_MAX_ENTRIES,
                              roots=settings.roots)
    assert settings.path is not None  # CacheSettings holds one of them
    return SQLiteCallCache(settings.path, ttl=ttl, max_bytes=settings.max_bytes or DEFAULT_CACHE_BYTES,
                           roots=settings.roots)


def chosen_cache(flag: str | None, policy: Policy | None) -> CallCache | None:
    """The cache a command runs with: ``--cache`` wins over the policy file's ``[cache]``; none
    without either."""
    if flag:
        return open_cache(flag)
    if policy is None or policy.cache is None:
        return None
    return cache_from_settings(policy.cache, policy.shared)


@asynccontextmanager
async def owned_cache(cache: CallCache | None) -> AsyncIterator[CallCache | None]:
    """``cache``, closed on the way out (a command's own: an RLM closes none it was given)."""
    try:
        yield cache
    finally:
        if cache is not None:
            await cache.aclose()
