"""A cache or a journal named by a string, as the command line and ``RLM(...)`` name them:
``redis://``, ``rediss://`` and ``unix://`` URLs name Redis (shared by every replica), anything
else a path of an SQLite file."""

from __future__ import annotations

from pathlib import Path

from .cache import CallCache, SQLiteCallCache
from .journal import Journal, RunJournal

__all__ = ["open_cache", "open_journal"]

_REDIS = ("redis://", "rediss://", "unix://")


def open_cache(spec: str | Path) -> CallCache:
    """``redis://``, ``rediss://`` or ``unix://`` URLs name a
    :class:`~rlmflow.durable.redis_cache.RedisCallCache` (shared by every replica); anything else
    is the path of a :class:`~rlmflow.durable.cache.SQLiteCallCache` file."""
    if isinstance(spec, str) and spec.startswith(_REDIS):
        from .redis_cache import RedisCallCache  # redis-py is an extra: imported when asked for

        return RedisCallCache(spec)
    return SQLiteCallCache(spec)


def open_journal(spec: str | Path) -> RunJournal:
    """A :class:`~rlmflow.durable.redis_journal.RedisJournal` for a Redis URL, else the path of a
    :class:`~rlmflow.durable.journal.Journal` file."""
    if isinstance(spec, str) and spec.startswith(_REDIS):
        from .redis_journal import RedisJournal  # redis-py is an extra: imported when asked for

        return RedisJournal(spec)
    return Journal(spec)
