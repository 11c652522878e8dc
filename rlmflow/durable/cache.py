"""The sub-call cache: answers kept across runs, so a request asked again is not paid again.

A request's key is :func:`~rlmflow.durable.keys.request_key`: the provider, the model and its
endpoint, every setting that shapes the answer (``max_tokens``, temperature, top-p, stop
sequences, reasoning effort) and every message, the system prompt included. Two requests with
the same key would be asked exactly the same thing, so the second is answered from the cache:
no request is sent and nothing is charged (its record is marked ``cached``).

Only whole answers are kept: a call that failed, was cut or was refused leaves nothing here.
Entries older than ``ttl`` are never answered from and are removed; past ``max_bytes`` the
least recently used entries are evicted down to nine tenths of it.

:class:`SQLiteCallCache` keeps the cache in one file (several processes may share it: an
evaluation rerun, parallel batch workers). Lookups of a batch are one query on a worker thread;
writes go to a background writer, so neither ever holds the event loop. For a cache shared by
replicas on several machines, see :class:`rlmflow.durable.redis_cache.RedisCallCache`.
"""

from __future__ import annotations

import sqlite3
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from .._exceptions import ConfigurationError
from .sqlite_file import SQLiteFile, check_format, read_back

__all__ = ["DEFAULT_CACHE_BYTES", "DEFAULT_CACHE_TTL", "CachedAnswer", "CallCache", "Flight", "SQLiteCallCache"]

DEFAULT_CACHE_TTL = 7 * 24 * 3600.0
"""Seconds an answer is kept by default: a week."""
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
"""What a cache holds at most by default (answers' text and their keys)."""

_ENTRY_OVERHEAD = 160  # bytes counted per entry besides its text: key, model, numbers, index rows
_RECENT_BYTES = 16 * 1024 * 1024  # this process's newest answers, kept in memory too
_TRIM_EVERY = 5.0  # seconds between two trims of the file (each sums the sizes of every entry)
_LOOKUP_CHUNK = 500  # keys per query (SQLite's limit on bound values is 32,766 since 3.32)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY, model TEXT NOT NULL, text TEXT NOT NULL, finish_reason TEXT,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, stored REAL NOT NULL, used REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_by_use ON answers (used);
CREATE INDEX IF NOT EXISTS answers_by_age ON answers (stored);
"""
_FORMAT = "1"


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """An answer the cache holds: the reply and what it cost when it was paid for."""

    text: str
    model: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int


class Flight:
    """A request some run of this process is sending now: runs asking the same wait for its
    answer instead of sending it again. ``answer`` stays ``None`` if the call failed or was
    cancelled (those who waited then send it themselves)."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.answer: CachedAnswer | None = None

    def land(self, answer: CachedAnswer | None) -> None:
        if not self.done.is_set():
            self.answer = answer
            self.done.set()


class CallCache(ABC):
    """Answers to model requests, by :func:`~rlmflow.durable.keys.request_key`.

    ``roots``: whether root calls are answered from it too (then an identical question over an
    identical document, asked again, costs nothing at all); sub-calls always are.
    ``in_flight``: the sub-calls this process's runs are sending now, by key; a run asking one
    of them joins it (implementations call ``super().__init__()``).
    """

    roots: bool

    def __init__(self) -> None:
        self.in_flight: dict[str, Flight] = {}

    @abstractmethod
    async def lookup(self, keys: Sequence[str]) -> list[CachedAnswer | None]:
        """The answer held for each key (``None`` for a miss), in order."""

    @abstractmethod
    async def store(self, key: str, answer: CachedAnswer) -> None:
        """Keep ``answer`` for ``key`` (replacing an older one)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Write what is pending and release the cache's resources."""


class SQLiteCallCache(CallCache):
    """A cache in one SQLite file (created ``0600``), shared by every process that opens it.

    Raises :class:`ConfigurationError` for a ``ttl`` or ``max_bytes`` that is not positive, or
    a file that cannot be used as a cache.
    """

    def __init__(
        self, path: str | Path, *, ttl: float | None = DEFAULT_CACHE_TTL, max_bytes: int = DEFAULT_CACHE_BYTES,
        roots: bool = True, clock: Callable[[], float] = time.time,
    ) -> None:
        if ttl is not None and not ttl > 0:
            raise ConfigurationError(f"a cache's ttl must be a positive number of seconds (or None), not {ttl!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigurationError(f"a cache's max_bytes must be a positive integer, not {max_bytes!r}")
        super().__init__()
        self.path = Path(path)
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.roots = roots
        self._clock = clock
        # answers stored by this process, newest last: served without a thread hop, and before
        # the writer has committed them (it lets writes gather for 50 ms)
        self._recent: OrderedDict[str, tuple[float, CachedAnswer, int]] = OrderedDict()
        self._recent_bytes = 0
        self._trimmed = -_TRIM_EVERY  # the writer's last trim (time.monotonic): the first write trims
        self._file = SQLiteFile(self.path, prepare=self._prepare, name="a sub-call cache", after_write=self._trim)

    def _prepare(self, connection: sqlite3.Connection) -> None:
        connection.executescript(_SCHEMA)
        check_format(connection, table="cache_meta", version=_FORMAT, path=self.path, what="a cache")

    async def lookup(self, keys: Sequence[str]) -> list[CachedAnswer | None]:
        now = self._clock()
        oldest = now - self.ttl if self.ttl is not None else float("-inf")
        found: dict[str, CachedAnswer] = {}
        for key in keys:
            recent = self._recent.get(key)
            if recent is not None and recent[0] >= oldest:
                found[key] = recent[1]
        unknown = [key for key in keys if key not in found]
        if unknown:
            found.update(await anyio.to_thread.run_sync(self._read, unknown, oldest))
        for key in found:  # the least recently used go first when the cache is full
            self._file.put("UPDATE answers SET used = ? WHERE key = ?", (now, key))
        return [found.get(key) for key in keys]

    def _read(self, keys: list[str], oldest: float) -> dict[str, CachedAnswer]:
        found: dict[str, CachedAnswer] = {}
        with closing(self._file.connect()) as connection:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start:start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, *answer in map(read_back, connection.execute(
                    "SELECT key, text, model, finish_reason, input_tokens, output_tokens FROM answers "
                    f"WHERE key IN ({marks}) AND stored >= ?", (*chunk, oldest),
                )):
                    found[key] = CachedAnswer(*answer)
        return found

    async def store(self, key: str, answer: CachedAnswer) -> None:
        now = self._clock()
        size = len(answer.text.encode("utf-8", "surrogatepass")) + len(answer.model) + _ENTRY_OVERHEAD
        self._file.put(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, answer.model, answer.text, answer.finish_reason, answer.input_tokens, answer.output_tokens,
             now, now, size),
        )
        replaced = self._recent.pop(key, None)
        if replaced is not None:
            self._recent_bytes -= replaced[2]
        self._recent[key] = (now, answer, size)
        self._recent_bytes += size
        while self._recent_bytes > min(self.max_bytes, _RECENT_BYTES):
            _, (_, _, dropped) = self._recent.popitem(last=False)
            self._recent_bytes -= dropped

    def _trim(self, connection: sqlite3.Connection) -> None:
        """After a write, at most every few seconds (the sum scans the table): drop what has
        expired, then evict the least recently used past the cap."""
        now = time.monotonic()
        if now - self._trimmed < _TRIM_EVERY:
            return
        self._trimmed = now
        if self.ttl is not None:
            connection.execute("DELETE FROM answers WHERE stored < ?", (self._clock() - self.ttl,))
        total = connection.execute("SELECT total(size) FROM answers").fetchone()[0]
        if total > self.max_bytes:
            connection.execute(
                "DELETE FROM answers WHERE key IN (SELECT key FROM (SELECT key, sum(size) OVER "
                "(ORDER BY used DESC, key) AS newer FROM answers) WHERE newer > ?)",
                (self.max_bytes * 0.9,),
            )

    @property
    def failure(self) -> BaseException | None:
        """Why the writer stopped writing, if it did (runs go on; new answers are not kept)."""
        return self._file.failure

    async def aclose(self) -> None:
        await anyio.to_thread.run_sync(self._file.close)

    def entries(self) -> int:
        """How many answers the file holds now (blocking: for tests and reports)."""
        with closing(self._file.connect()) as connection:
            return int(connection.execute("SELECT count(*) FROM answers").fetchone()[0])
