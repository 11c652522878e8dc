"""The journal: an append-only SQLite record of runs and of every model call they paid for.

One file (WAL mode, ``0600``: the host's alone; the sandbox never sees its path) holds many runs.
A run's record is its identity and inputs (query, the context's digest, never the document; the
models; the package version), then each model call as it completes (root or sub, children's
included, keyed by :func:`~rlmflow.durable.keys.request_key`: the answer, usage and cost), each
turn (digests of its code and of what its cells printed), and its end. That is what
:meth:`rlmflow.RLM.resume` needs to answer, without a provider, every call the run had already
paid for.

Writes never wait on the event loop: they go to one writer thread through a queue, which commits
what has gathered in one transaction (so a fan-out of thousands of calls costs a few commits a
second: the writer lets records gather for 50 ms before each). SQLite's WAL keeps every
committed transaction through a killed process; a torn last transaction is rolled back on the
next open, so a journal always reads as its last whole records. What a crash can lose is the
calls answered in the last 50 ms or so before it (not yet committed): a resume sends those again,
as it does the calls that were in flight.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._exceptions import ConfigurationError
from .._version import __version__

__all__ = ["Journal", "JournalRun", "RecordedCall", "RecordedTurn"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started REAL NOT NULL, version TEXT NOT NULL, query TEXT NOT NULL,
    context_sha256 TEXT NOT NULL, context_chars INTEGER NOT NULL, settings TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'running', answer TEXT, error TEXT, ended REAL
);
CREATE TABLE IF NOT EXISTS calls (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, key TEXT NOT NULL, role TEXT NOT NULL,
    depth INTEGER NOT NULL, model TEXT NOT NULL, text TEXT NOT NULL, finish_reason TEXT,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cost_usd REAL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_by_run ON calls (run_id, seq);
CREATE TABLE IF NOT EXISTS turns (
    run_id TEXT NOT NULL, child_path TEXT NOT NULL, turn INTEGER NOT NULL, code_sha256 TEXT NOT NULL,
    output_sha256 TEXT NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_run ON turns (run_id);
"""
_FORMAT = "1"  # the layout above; a journal of another layout is refused, not misread
_GATHER = 4096  # records written in one transaction at most
_PAUSE = 0.05  # seconds the writer lets records gather before a transaction


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """A model call the journal holds: what was asked (``key``) and what came back."""

    key: str
    role: str
    depth: int
    model: str
    text: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class RecordedTurn:
    """A turn the journal holds, by run path (``""`` the root, ``"0"`` its first child...)."""

    child_path: str
    turn: int
    code_sha256: str
    output_sha256: str


@dataclass(frozen=True, slots=True)
class JournalRun:
    """A run's record: its inputs, how it ended, and what it paid for, in order."""

    run_id: str
    version: str
    query: str
    context_sha256: str
    context_chars: int
    settings: dict[str, Any]
    status: str
    answer: str | None
    calls: tuple[RecordedCall, ...]
    turns: tuple[RecordedTurn, ...]


class Journal:
    """An append-only journal in one SQLite file (created ``0600``). Safe to share by many runs
    of one process; one writer thread per journal.

    Raises :class:`ConfigurationError` when the file cannot be opened or is not a journal of
    this format.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._queue: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._failed: BaseException | None = None
        self._open_checked()
        self._thread = threading.Thread(target=self._write_loop, name=f"rlmflow-journal {self.path.name}",
                                        daemon=True)
        self._thread.start()

    # -- opening ------------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit survives a killed process
        return connection

    def _open_checked(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # the host's alone
            with closing(self._connect()) as connection:
                connection.executescript(_SCHEMA)
                found = connection.execute("SELECT value FROM journal WHERE key = 'format'").fetchone()
                if found is None:
                    connection.execute("INSERT INTO journal VALUES ('format', ?)", (_FORMAT,))
                elif found[0] != _FORMAT:
                    raise ConfigurationError(
                        f"{self.path} is a journal of format {found[0]}; this rlmflow reads format {_FORMAT}"
                    )
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(f"{self.path} cannot be used as a journal: {exc}") from exc

    # -- writing (never blocks the caller) --------------------------------------------------------------
    def run_started(self, run_id: str, *, query: str, context_sha256: str, context_chars: int,
                    settings: dict[str, Any]) -> None:
        self._put("INSERT OR IGNORE INTO runs (run_id, started, version, query, context_sha256, context_chars, "
                  "settings) VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (run_id, time.time(), __version__, query, context_sha256, context_chars,
                   json.dumps(settings, sort_keys=True)))

    def call_done(self, run_id: str, call: RecordedCall) -> None:
        self._put("INSERT INTO calls (run_id, key, role, depth, model, text, finish_reason, input_tokens, "
                  "output_tokens, cost_usd, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (run_id, call.key, call.role, call.depth, call.model, call.text, call.finish_reason,
                   call.input_tokens, call.output_tokens, call.cost_usd, time.time()))

    def turn_done(self, run_id: str, turn: RecordedTurn) -> None:
        self._put("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?)",
                  (run_id, turn.child_path, turn.turn, turn.code_sha256, turn.output_sha256, time.time()))

    def run_ended(self, run_id: str, *, status: str, answer: str | None, error: str | None) -> None:
        self._put("UPDATE runs SET status = ?, answer = ?, error = ?, ended = ? WHERE run_id = ?",
                  (status, answer, error, time.time(), run_id))

    def _put(self, sql: str, values: tuple[Any, ...]) -> None:
        if self._failed is not None:
            return  # already reported: a run never fails because its journal did
        self._queue.put((sql, values))

    def _write_loop(self) -> None:
        connection = self._connect()
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                # let a fan-out's records gather: one commit per pause, not per call (each commit
                # and each wake-up of this thread takes the GIL from the event loop)
                time.sleep(_PAUSE)
                gathered = [first]
                while len(gathered) < _GATHER:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._write(connection, gathered)
                        return
                    gathered.append(item)
                self._write(connection, gathered)
        except BaseException as exc:  # a full disk, a deleted file: the runs go on unrecorded
            self._failed = exc
        finally:
            connection.close()

    @staticmethod
    def _write(connection: sqlite3.Connection, gathered: Iterable[tuple[str, tuple[Any, ...]]]) -> None:
        connection.execute("BEGIN")
        statement: str | None = None
        rows: list[tuple[Any, ...]] = []
        for sql, values in gathered:  # runs of the same statement in one executemany, in order
            if sql != statement and rows:
                connection.executemany(statement or sql, rows)
                rows = []
            statement = sql
            rows.append(values)
        if rows and statement is not None:
            connection.executemany(statement, rows)
        connection.execute("COMMIT")

    def close(self) -> None:
        """Write what is queued and stop the writer (blocking: call it off the event loop)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    @property
    def failure(self) -> BaseException | None:
        """Why the writer stopped recording, if it did (the runs went on without it)."""
        return self._failed

    # -- reading (blocking: call these off the event loop) ----------------------------------------------
    def read_run(self, run_id: str) -> JournalRun | None:
        """The run's record, or ``None`` if the journal has no such run."""
        with closing(self._connect()) as connection:
            row = connection.execute(
                "SELECT run_id, version, query, context_sha256, context_chars, settings, status, answer "
                "FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            calls = tuple(RecordedCall(*r) for r in connection.execute(
                "SELECT key, role, depth, model, text, finish_reason, input_tokens, output_tokens, cost_usd "
                "FROM calls WHERE run_id = ? ORDER BY seq", (run_id,)))
            turns = tuple(RecordedTurn(*r) for r in connection.execute(
                "SELECT child_path, turn, code_sha256, output_sha256 FROM turns WHERE run_id = ? ORDER BY rowid",
                (run_id,)))
        return JournalRun(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], calls, turns)

    def latest_unfinished(self) -> str | None:
        """The most recently started run that has no answer (killed, cancelled or failed), if any."""
        with closing(self._connect()) as connection:
            row = connection.execute(
                "SELECT run_id FROM runs WHERE status != 'done' ORDER BY started DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    def all_calls(self) -> list[RecordedCall]:
        """Every call of every run, in order (what a replay may answer from)."""
        with closing(self._connect()) as connection:
            return [RecordedCall(*r) for r in connection.execute(
                "SELECT key, role, depth, model, text, finish_reason, input_tokens, output_tokens, cost_usd "
                "FROM calls ORDER BY seq")]
