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
import sqlite3
import time
from abc import ABC, abstractmethod
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._version import __version__
from .sqlite_file import SQLiteFile, check_format, read_back

__all__ = ["Journal", "JournalRun", "RecordedCall", "RecordedTurn", "RunJournal"]

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


class RunJournal(ABC):
    """Where runs are recorded as they go: written without waiting (each write queued for a
    writer thread), read off the event loop. :class:`Journal` keeps it in an SQLite file,
    :class:`~rlmflow.durable.redis_journal.RedisJournal` in Redis (for replicas)."""

    @property
    @abstractmethod
    def where(self) -> str:
        """Where the journal is, for messages (a path, or a URL without its credentials)."""

    @abstractmethod
    def run_started(self, run_id: str, *, query: str, context_sha256: str, context_chars: int,
                    settings: dict[str, Any]) -> None:
        """A run's identity and inputs (written once: a resumed run keeps its first record)."""

    @abstractmethod
    def call_done(self, run_id: str, call: RecordedCall) -> None:
        """A model call the run was answered."""

    @abstractmethod
    def turn_done(self, run_id: str, turn: RecordedTurn) -> None:
        """A root turn's digests."""

    @abstractmethod
    def run_ended(self, run_id: str, *, status: str, answer: str | None, error: str | None) -> None:
        """How the run ended (``done`` with an answer; anything else stays resumable)."""

    @abstractmethod
    def close(self) -> None:
        """Write what is queued and stop the writer (blocking: call it off the event loop)."""

    @property
    @abstractmethod
    def failure(self) -> BaseException | None:
        """Why the writer stopped recording, if it did (the runs went on without it)."""

    @abstractmethod
    def read_run(self, run_id: str) -> JournalRun | None:
        """The run's record, or ``None`` if the journal has no such run (blocking)."""

    @abstractmethod
    def latest_unfinished(self) -> str | None:
        """The most recently started run that has no answer (killed, cancelled or failed), if any (blocking)."""

    @abstractmethod
    def all_calls(self) -> list[RecordedCall]:
        """Every call of every run, each run's in order (what a replay may answer from; blocking)."""


class Journal(RunJournal):
    """An append-only journal in one SQLite file (created ``0600``). Safe to share by many runs
    of one process; one writer thread per journal.

    Raises :class:`ConfigurationError` when the file cannot be opened or is not a journal of
    this format.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = SQLiteFile(self.path, prepare=self._prepare, name="a journal")

    @property
    def where(self) -> str:
        return str(self.path)

    def _prepare(self, connection: sqlite3.Connection) -> None:
        connection.executescript(_SCHEMA)
        check_format(connection, table="journal", version=_FORMAT, path=self.path, what="a journal")

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
        self._file.put(sql, values)  # a run never fails because its journal did

    def close(self) -> None:
        """Write what is queued and stop the writer (blocking: call it off the event loop)."""
        self._file.close()

    @property
    def failure(self) -> BaseException | None:
        """Why the writer stopped recording, if it did (the runs went on without it)."""
        return self._file.failure

    # -- reading (blocking: call these off the event loop) ----------------------------------------------
    def read_run(self, run_id: str) -> JournalRun | None:
        """The run's record, or ``None`` if the journal has no such run."""
        with closing(self._file.connect()) as connection:
            row = connection.execute(
                "SELECT run_id, version, query, context_sha256, context_chars, settings, status, answer "
                "FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                return None
            calls = tuple(RecordedCall(*read_back(r)) for r in connection.execute(
                "SELECT key, role, depth, model, text, finish_reason, input_tokens, output_tokens, cost_usd "
                "FROM calls WHERE run_id = ? ORDER BY seq", (run_id,)))
            turns = tuple(RecordedTurn(*r) for r in connection.execute(
                "SELECT child_path, turn, code_sha256, output_sha256 FROM turns WHERE run_id = ? ORDER BY rowid",
                (run_id,)))
        row = read_back(row)
        return JournalRun(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], calls, turns)

    def latest_unfinished(self) -> str | None:
        """The most recently started run that has no answer (killed, cancelled or failed), if any."""
        with closing(self._file.connect()) as connection:
            row = connection.execute(
                "SELECT run_id FROM runs WHERE status != 'done' ORDER BY started DESC LIMIT 1").fetchone()
        return None if row is None else str(row[0])

    def all_calls(self) -> list[RecordedCall]:
        """Every call of every run, in order (what a replay may answer from)."""
        with closing(self._file.connect()) as connection:
            return [RecordedCall(*read_back(r)) for r in connection.execute(
                "SELECT key, role, depth, model, text, finish_reason, input_tokens, output_tokens, cost_usd "
                "FROM calls ORDER BY seq")]
