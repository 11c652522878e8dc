"""A cache named by a string, as the command line and ``RLM(cache=...)`` name it."""

from __future__ import annotations

from pathlib import Path

from .cache import CallCache, SQLiteCallCache

__all__ = ["open_cache"]


def open_cache(spec: str | Path) -> CallCache:
    """``redis://``, ``rediss://`` or ``unix://`` URLs name a
    :class:`~rlmflow.durable.redis_cache.RedisCallCache` (shared by every replica); anything else
    is the path of a :class:`~rlmflow.durable.cache.SQLiteCallCache` file."""
    if isinstance(spec, str) and spec.startswith(("redis://", "rediss://", "unix://")):
        from .redis_cache import RedisCallCache  # redis-py is an extra: imported when asked for

        return RedisCallCache(spec)
    return SQLiteCallCache(spec)
