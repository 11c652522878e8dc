"""Writes that never hold the event loop: a thread applying queued records in batches, and one
SQLite file the host writes through it: opened ``0600`` in WAL mode, its
writes queued by the event loop and committed in batches, its reads done on a fresh connection.

The journal and the sub-call cache are both such files. Their writers must never make the event
loop wait (a commit is a disk flush), and a fan-out of thousands of calls must not cost thousands
of commits: the writer lets records gather for 50 ms, then commits them in one transaction, runs
of the same statement in one ``executemany``.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any, Generic, TypeVar

from .._exceptions import ConfigurationError

__all__ = ["BatchedWriter", "SQLiteFile", "Statement", "check_format", "read_back"]

Statement = tuple[str, tuple[Any, ...]]
"""An SQL statement and its values, as queued for the writer."""

T = TypeVar("T")

_GATHER = 4096  # records written in one transaction at most
_PAUSE = 0.05  # seconds the writer lets records gather before a transaction


def _storable(value: Any) -> Any:
    """A text SQLite cannot store as TEXT (a lone surrogate: model and sandbox text may hold one)
    as its UTF-8 bytes with surrogates passed through, stored as a BLOB; :func:`read_back`
    restores it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogatepass")
    return value


def read_back(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row as it was written: texts stored as bytes by the writer are texts again."""
    return tuple(value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value for value in row)


def check_format(connection: sqlite3.Connection, *, table: str, version: str, path: Path, what: str) -> None:
    """Stamp a new file's ``table`` with the layout ``version``; refuse a file of another layout
    (a file of another layout is refused, not misread)."""
    found = connection.execute(f"SELECT value FROM {table} WHERE key = 'format'").fetchone()
    if found is None:
        connection.execute(f"INSERT INTO {table} VALUES ('format', ?)", (version,))
    elif found[0] != version:
        raise ConfigurationError(f"{path} is {what} of format {found[0]}; this rlmflow reads format {version}")


class BatchedWriter(Generic[T]):
    """A thread that applies queued items in batches: ``write`` gets what gathered in 50 ms (at
    most 4,096 items). ``open`` runs first on the thread, and ``closing`` last. A failure stops
    the writer (reported by :attr:`failure`); later items are dropped, the callers never wait.
    """

    def __init__(
        self, write: Callable[[list[T]], None], *, name: str, on_start: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self._queue: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._write, self._on_start, self._on_stop = write, on_start, on_stop
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        """Queue an item (never blocks); dropped once the writer has failed."""
        if self._failed is None:
            self._queue.put(item)

    @property
    def failure(self) -> BaseException | None:
        """Why the writer stopped writing, if it did (a full disk, a deleted file, a lost server)."""
        return self._failed

    def close(self) -> None:
        """Write what is queued and stop the writer (blocking: call it off the event loop)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _loop(self) -> None:
        try:
            if self._on_start is not None:
                self._on_start()
            while True:
                first = self._queue.get()
                if first is None:
                    return
                # let a fan-out's records gather: one commit per pause, not per call (each commit
                # and each wake-up of this thread takes the GIL from the event loop)
                time.sleep(_PAUSE)
                gathered = [first]
                stop = False
                while len(gathered) < _GATHER:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    gathered.append(item)
                self._write(gathered)
                if stop:
                    return
        except BaseException as exc:  # the runs go on without what this thread wrote
            self._failed = exc
        finally:
            if self._on_stop is not None:
                self._on_stop()


class SQLiteFile:
    """``path`` opened (created ``0600``), its schema applied by ``prepare``, and a writer thread.

    ``after_write`` runs on the writer's connection after each transaction (housekeeping such
    as a cache's eviction). Raises :class:`ConfigurationError` when the file cannot be opened
    or ``prepare`` refuses it.
    """

    def __init__(
        self, path: str | Path, *, prepare: Callable[[sqlite3.Connection], None], name: str,
        after_write: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._after_write = after_write
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # the host's alone
            with closing(self.connect()) as connection:
                prepare(connection)
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(f"{self.path} cannot be used as {name}: {exc}") from exc
        except OSError as exc:
            raise ConfigurationError(f"{self.path} cannot be opened as {name}: {exc}") from exc
        self._connection: sqlite3.Connection | None = None
        self._writer: BatchedWriter[Statement] = BatchedWriter(
            self._write, name=f"rlmflow {name} {self.path.name}", on_start=self._open, on_stop=self._close_connection,
        )

    def connect(self) -> sqlite3.Connection:
        """A new connection (blocking: use it off the event loop, and close it)."""
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a killed process
        return connection

    def put(self, sql: str, values: tuple[Any, ...]) -> None:
        """Queue a write (never blocks); dropped once the writer has failed (reported by :attr:`failure`)."""
        self._writer.put((sql, values))

    @property
    def failure(self) -> BaseException | None:
        """Why the writer stopped writing, if it did (a full disk, a deleted file)."""
        return self._writer.failure

    def close(self) -> None:
        """Write what is queued and stop the writer (blocking: call it off the event loop)."""
        self._writer.close()

    def _open(self) -> None:
        self._connection = self.connect()

    def _close_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()

    @staticmethod
    def _execute(connection: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
        try:
            connection.executemany(sql, rows)
        except UnicodeEncodeError:  # rare: only then is every text checked
            connection.executemany(sql, [tuple(_storable(value) for value in row) for row in rows])

    def _write(self, gathered: list[Statement]) -> None:
        connection = self._connection
        assert connection is not None  # opened by the writer before its first batch
        connection.execute("BEGIN")
        statement: str | None = None
        rows: list[tuple[Any, ...]] = []
        for sql, values in gathered:  # runs of the same statement in one executemany, in order
            if sql != statement and rows:
                self._execute(connection, statement or sql, rows)
                rows = []
            statement = sql
            rows.append(values)
        if rows and statement is not None:
            self._execute(connection, statement, rows)
        if self._after_write is not None:
            self._after_write(connection)
        connection.execute("COMMIT")
