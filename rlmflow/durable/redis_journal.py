"""The journal in Redis: a run one replica started can be resumed by another.

Layout, under the namespace of the shared config (``rlmflow`` by default):

- ``<ns>:journal:runs``: a hash, run id -> the run's record (JSON: its inputs, written once);
- ``<ns>:journal:ends``: a hash, run id -> how it ended (JSON: status, answer, error);
- ``<ns>:journal:started``: a sorted set of run ids by their last write (the latest unfinished run);
- ``<ns>:journal:calls:<run id>`` and ``<ns>:journal:turns:<run id>``: lists, in order.

Writes are queued and sent by one writer thread in pipelines of what gathered in 50 ms, as the
SQLite journal commits them: a run never waits on Redis. Every key of a run expires ``ttl``
after its last write (30 days by default), and runs not written to for longer than that leave
the index when the next run starts. A Redis that stops answering stops the recording (reported by
:attr:`RedisJournal.failure`), never the runs.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from .._exceptions import ConfigurationError
from .._version import __version__
from ..dispatch.shared import SharedConfig, redacted_url
from .journal import JournalRun, RecordedCall, RecordedTurn, RunJournal
from .sqlite_file import BatchedWriter

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["RedisJournal"]

DEFAULT_JOURNAL_TTL = 30 * 24 * 3600.0
"""Seconds a run's record is kept after its last write, by default."""

_Write = tuple[str, str, tuple[Any, ...]]  # (command, run id, arguments)


class RedisJournal(RunJournal):
    """A journal in Redis (``shared``: a ``redis://`` URL or the Dispatcher's :class:`SharedConfig`).

    Raises :class:`ConfigurationError` for a bad URL or ``ttl``, or without the ``redis`` extra.
    """

    def __init__(self, shared: str | SharedConfig, *, ttl: float = DEFAULT_JOURNAL_TTL) -> None:
        self.config = shared if isinstance(shared, SharedConfig) else SharedConfig(shared)
        if not ttl > 0:
            raise ConfigurationError(f"a journal's ttl must be a positive number of seconds, not {ttl!r}")
        self.ttl = ttl
        try:
            import redis
        except ImportError as exc:
            raise ConfigurationError("a Redis journal needs redis-py: pip install 'rlmflow-async[redis]'") from exc
        self._client: Redis = redis.Redis.from_url(
            self.config.url, socket_timeout=self.config.timeout * 5,
            socket_connect_timeout=self.config.timeout * 5, decode_responses=True,
        )
        prefix = f"{self.config.namespace}:journal"
        self._runs, self._ends, self._started = f"{prefix}:runs", f"{prefix}:ends", f"{prefix}:started"
        self._calls, self._turns = f"{prefix}:calls:", f"{prefix}:turns:"
        self._writer: BatchedWriter[_Write] = BatchedWriter(self._write, name="rlmflow journal redis")

    @property
    def where(self) -> str:
        return redacted_url(self.config.url)

    # -- writing (never blocks the caller) --------------------------------------------------------------
    def run_started(self, run_id: str, *, query: str, context_sha256: str, context_chars: int,
                    settings: dict[str, Any]) -> None:
        record = json.dumps({"started": time.time(), "version": __version__, "query": query,
                             "context_sha256": context_sha256, "context_chars": context_chars,
                             "settings": settings}, sort_keys=True)
        self._writer.put(("started", run_id, (record,)))

    def call_done(self, run_id: str, call: RecordedCall) -> None:
        self._writer.put(("call", run_id, (json.dumps([
            call.key, call.role, call.depth, call.model, call.text, call.finish_reason, call.input_tokens,
            call.output_tokens, call.cost_usd,
        ]),)))

    def turn_done(self, run_id: str, turn: RecordedTurn) -> None:
        self._writer.put(("turn", run_id, (json.dumps([turn.child_path, turn.turn, turn.code_sha256,
                                                        turn.output_sha256]),)))

    def run_ended(self, run_id: str, *, status: str, answer: str | None, error: str | None) -> None:
        self._writer.put(("ended", run_id, (json.dumps({"status": status, "answer": answer, "error": error,
                                                         "ended": time.time()}),)))

    def _write(self, gathered: list[_Write]) -> None:
        now = time.time()
        ttl_ms = int(self.ttl * 1000)
        pipe = self._client.pipeline(transaction=False)
        touched: set[str] = set()
        for command, run_id, (value,) in gathered:
            touched.add(run_id)
            if command == "started":
                pipe.hsetnx(self._runs, run_id, value)
                pipe.zadd(self._started, {run_id: now}, nx=True)
                self._forget_before(pipe, now - self.ttl)
            elif command == "call":
                pipe.rpush(self._calls + run_id, value)
            elif command == "turn":
                pipe.rpush(self._turns + run_id, value)
            else:
                pipe.hset(self._ends, run_id, value)
        for run_id in touched:
            pipe.pexpire(self._calls + run_id, ttl_ms)
            pipe.pexpire(self._turns + run_id, ttl_ms)
            pipe.zadd(self._started, {run_id: now}, xx=True)  # the index orders runs by their last write
        pipe.execute()

    def _forget_before(self, pipe: Any, oldest: float) -> None:
        """Drop from the index runs last written before ``oldest`` (their lists expire on their own)."""
        stale = self._client.zrangebyscore(self._started, "-inf", oldest, start=0, num=1000)
        if stale:
            pipe.zrem(self._started, *stale)
            pipe.hdel(self._runs, *stale)
            pipe.hdel(self._ends, *stale)

    def close(self) -> None:
        self._writer.close()
        self._client.close()

    @property
    def failure(self) -> BaseException | None:
        return self._writer.failure

    # -- reading (blocking: call these off the event loop) ----------------------------------------------
    def read_run(self, run_id: str) -> JournalRun | None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hget(self._runs, run_id)
        pipe.hget(self._ends, run_id)
        pipe.lrange(self._calls + run_id, 0, -1)
        pipe.lrange(self._turns + run_id, 0, -1)
        record, end, calls, turns = pipe.execute()
        if record is None:
            return None
        try:
            run = json.loads(record)
            ended: dict[str, Any] = json.loads(end) if end is not None else {"status": "running", "answer": None}
            return JournalRun(
                run_id, run["version"], run["query"], run["context_sha256"], run["context_chars"], run["settings"],
                ended["status"], ended["answer"], tuple(_call(call) for call in calls),
                tuple(RecordedTurn(*json.loads(turn)) for turn in turns),
            )
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigurationError(f"{self.where} holds a malformed record of run {run_id!r}: {exc}") from None

    def latest_unfinished(self) -> str | None:
        newest = [str(run_id) for run_id in self._client.zrevrange(self._started, 0, 999)]
        if not newest:
            return None
        ends = self._client.hmget(self._ends, newest)
        for run_id, end in zip(newest, ends, strict=True):
            if end is None or json.loads(end)["status"] != "done":
                return run_id
        return None

    def all_calls(self) -> list[RecordedCall]:
        calls: list[RecordedCall] = []
        for run_id in self._client.zrange(self._started, 0, -1):
            try:
                calls.extend(_call(call) for call in self._client.lrange(self._calls + str(run_id), 0, -1))
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(f"{self.where} holds a malformed call of run {run_id!r}: {exc}") from None
        return calls


def _call(raw: str | bytes) -> RecordedCall:
    """A journaled call, its fields' types checked (the store is Redis: anyone with its password
    could have written there)."""
    key, role, depth, model, text, finish_reason, input_tokens, output_tokens, cost = json.loads(raw)
    if not (isinstance(key, str) and isinstance(role, str) and type(depth) is int and isinstance(model, str)
            and isinstance(text, str) and (finish_reason is None or isinstance(finish_reason, str))
            and type(input_tokens) is int and type(output_tokens) is int
            and (cost is None or type(cost) in (int, float))):
        raise TypeError("a field of another type")
    return RecordedCall(key, role, depth, model, text, finish_reason, input_tokens, output_tokens, cost)
