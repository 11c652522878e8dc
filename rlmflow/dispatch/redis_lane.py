"""A lane whose limits hold across processes: admission in Redis, ordering in the process.

A call passes two gates. The process's own :class:`~rlmflow.dispatch.lane.Lane` (without rate
limits) keeps the in-process order (root turns first, fair share between runs, each run's cap).
Then the call asks Redis for one admission of the shared lane (:data:`redis_scripts.LANE_ACQUIRE`):
a slot under the concurrency limit every process agrees on, room in the RPM/TPM windows, no
provider pause. Only one call per process asks at a time, highest priority first, so Redis sees
one queue head per process; a released slot anywhere wakes the heads through pub/sub.

Every admission is also kept in the process's own log (time, tokens). When Redis is lost, the
lane admits against that log at 1/N of the lane's limits (N: the replicas last seen), so that N
processes falling back together stay within the lane, counting what each already sent in the
current window. When Redis returns, the log is written back before the lane rejoins.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from .concurrency import ConcurrencyStatistics, RefusalVerdict
from .lane import Lane, LaneStatistics, RunShare, Ticket
from .limits import Limits, Priority
from .shared import SharedLostError, SharedState

__all__ = ["SharedLane", "SharedTicket"]

#: Longest a waiting head sleeps without news before asking Redis again (a lost pub/sub message).
_POLL = 0.25
#: Most calls of one process admitted by one round trip to Redis.
_BATCH = 32


class _Own:
    """One call this process admitted: when (local clock), its id, the tokens counted for it."""

    __slots__ = ("at", "id", "live", "tokens")

    def __init__(self, at: float, id: str, tokens: float) -> None:
        self.at = at
        self.id = id
        self.tokens = tokens
        self.live = True  # still counted in the window of the own log


@dataclass
class SharedTicket(Ticket):
    """A ticket of a shared lane: ``grant`` is the Redis admission (``None``: admitted in fallback)."""

    grant: str | None = None
    own: _Own | None = field(default=None, repr=False)


@dataclass(order=True)
class _Head:
    """A call of this process waiting for its shared admission, in line order."""

    priority: int
    seq: int
    tokens: float = field(compare=False, default=0.0)
    event: anyio.Event = field(compare=False, default_factory=anyio.Event)
    result: tuple[str | None, _Own] | None = field(compare=False, default=None)
    gone: bool = field(compare=False, default=False)


class _AgreedLimit:
    """A plain reading of a shared lane's limit, safe from any thread."""

    __slots__ = ("level",)

    def __init__(self, level: int) -> None:
        self.level = level


class SharedLane:
    """One lane shared by every process on the same :class:`SharedState` (same Redis, namespace, key).

    Has the interface of :class:`Lane` (``acquire``, ``release``, ``statistics``), so the Dispatcher
    uses either without knowing which.
    """

    def __init__(
        self,
        key: str,
        limits: Limits,
        state: SharedState,
        *,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.key = key
        self.limits = limits
        self.state = state
        self._clock = clock
        # The process's own lane keeps the in-process order and its adaptive limit, which reads this
        # process's outcomes (it tells load-related refusals from random ones); the rate windows,
        # the slots and the limit all processes agree on are Redis's.
        self.local = Lane(key, Limits(max_concurrency=limits.max_concurrency,
                                      initial_concurrency=limits.initial_concurrency,
                                      output_weight=limits.output_weight, window=limits.window,
                                      backoff_ratio=limits.backoff_ratio), clock=clock)
        self.window = limits.window + state.config.window_margin(limits.window)
        self._initial = limits.initial_concurrency or min(8, limits.max_concurrency)
        self._own: deque[_Own] = deque()
        self._own_tokens = 0.0
        self.in_flight = 0
        self._grants: set[str] = set()
        self._heads: list[_Head] = []
        self._asking = False
        self._seq = itertools.count()
        self._changed = anyio.Event()
        self._paused_until = -math.inf
        self.limit_seen = self._initial
        self.replicas = 0  # processes on this lane, last seen (N of the 1/N fallback; 0: not yet seen)
        self.lowest_seen = self._initial
        self.decreases_seen = 0
        self.completed = self.failed = self.throttled = self.retries = 0
        state.register(self)

    @property
    def backlog(self) -> int:
        """Calls of batches not yet asking (counted in ``statistics().waiting``)."""
        return self.local.backlog

    @backlog.setter
    def backlog(self, count: int) -> None:
        self.local.backlog = count

    @property
    def concurrency(self) -> _AgreedLimit:
        """The concurrency limit all processes agreed on, as last seen (what the lane gauge reads)."""
        return _AgreedLimit(self.limit_seen)

    # -- notifications --------------------------------------------------------------------------------
    def notify(self) -> None:
        """Something changed (a slot freed somewhere, the mode switched): the head asks again."""
        self._changed.set()
        self._changed = anyio.Event()

    def observe(self, *, limit: int, in_flight: int) -> None:
        if limit < self.limit_seen:
            self.decreases_seen += 1
            self.lowest_seen = min(self.lowest_seen, limit)
        self.limit_seen = limit

    # -- the own log --------------------------------------------------------------------------------
    def _expire_own(self, now: float) -> None:
        while self._own and now - self._own[0].at >= self.window - 1e-9:
            own = self._own.popleft()
            own.live = False
            self._own_tokens -= own.tokens
        if not self._own:
            self._own_tokens = 0.0

    def _record(self, grant: str, tokens: float) -> _Own:
        own = _Own(self._clock(), grant, tokens)
        self._own.append(own)
        self._own_tokens += tokens
        return own

    # -- admission ----------------------------------------------------------------------------------
    async def acquire(
        self, *, priority: Priority, share: RunShare, tokens: float, seq: int | None = None
    ) -> Ticket:
        """Wait until this call may be sent under the shared limits; cancellation leaves no trace.

        ``seq``: the place in line of an earlier attempt of the same call (see :meth:`Lane.acquire`).
        """
        ticket = await self.local.acquire(priority=priority, share=share, tokens=tokens, seq=seq)
        try:
            grant, own = await self._admit(int(priority), tokens)
        except BaseException:
            self.local.on_cancel(ticket)
            raise
        self.in_flight += 1
        if grant is not None:
            self._grants.add(grant)
        return SharedTicket(share=ticket.share, requests=None, tokens=None, queued_at=ticket.queued_at,
                            admitted_at=self._clock(), seq=ticket.seq, stamp=ticket.stamp, grant=grant, own=own)

    async def _admit(self, priority: int, tokens: float) -> tuple[str | None, _Own]:
        head = _Head(priority, next(self._seq), tokens=tokens)
        heapq.heappush(self._heads, head)
        try:
            while head.result is None:
                if self._heads[0] is not head or self._asking:  # another call asks (maybe for us too)
                    await head.event.wait()
                    head.event = anyio.Event()
                    continue
                changed = self._changed
                batch = heapq.nsmallest(_BATCH, self._heads)  # this head first, then the line
                self._asking = True  # one request at a time: a batch is never granted twice
                try:
                    outcome = await self._try(batch)
                finally:
                    self._asking = False
                if isinstance(outcome, float):
                    if self._heads[0] is not head:  # a call ahead of us arrived meanwhile: its turn
                        self._heads[0].event.set()
                    with anyio.move_on_after(outcome):
                        await changed.wait()
                    continue
                for waiter, granted in zip(batch, outcome, strict=False):
                    if waiter.gone:  # cancelled while we asked: give its admission back
                        self._give_back(granted)
                        continue
                    waiter.result = granted
                    self._heads.remove(waiter)
                    waiter.event.set()
                heapq.heapify(self._heads)
            return head.result
        except BaseException:
            if head.result is not None:
                self._give_back(head.result)
            raise
        finally:
            head.gone = head.result is None
            if head in self._heads:
                self._heads.remove(head)
                heapq.heapify(self._heads)
            if self._heads:
                self._heads[0].event.set()

    def _give_back(self, granted: tuple[str | None, _Own]) -> None:
        grant, _own = granted  # the own log keeps the entry: the window counted it
        if grant is not None:
            self.state.post_release(self, self._release_args(grant, "cancelled", None, 0.0))

    async def _try(self, batch: list[_Head]) -> list[tuple[str | None, _Own]] | float:
        """Admit a prefix of ``batch`` (at least its head) or say how long to wait at most."""
        if self.state.mode == "shared":
            grants = [self.state.new_id() for _ in batch]
            args: list[object] = [self.limits.rpm or 0, self.limits.tpm or 0, self.window * 1000,
                                  self.limits.max_concurrency, self._initial, self.state.config.lease * 1000,
                                  self.state.replica_id]
            for grant, waiter in zip(grants, batch, strict=True):
                args += [grant, waiter.tokens]
            try:
                with anyio.CancelScope(shield=True):  # what Redis admits must reach its callers
                    admitted, status, wait_ms, in_flight, limit, _, replicas = await self.state.run(
                        "LANE_ACQUIRE", self.state.lane_keys(self.key), args)
            except SharedLostError:
                pass  # fall through to the local share
            else:
                self.observe(limit=int(limit), in_flight=int(in_flight))
                self.replicas = max(1, int(replicas))
                if int(admitted) > 0:
                    cap = self.limits.tpm or math.inf
                    return [(grant, self._record(grant, min(waiter.tokens, cap)))
                            for grant, waiter in zip(grants[:int(admitted)], batch, strict=False)]
                wait = float(wait_ms) / 1000
                return wait if int(status) == 0 else min(max(wait, 0.001), _POLL)
        return self._try_fallback(batch[0].tokens)

    def fallback_limits(self) -> tuple[int, float | None, float | None]:
        """This process's share while Redis is lost: (concurrency, rpm, tpm), 1/N of the lane each."""
        n = self.replicas or self.state.replicas
        concurrency = max(1, self.limit_seen // n)
        rpm = max(1.0, math.floor(self.limits.rpm / n)) if self.limits.rpm else None
        tpm = self.limits.tpm / n if self.limits.tpm else None
        return concurrency, rpm, tpm

    def _try_fallback(self, tokens: float) -> list[tuple[str | None, _Own]] | float:
        concurrency, rpm, tpm = self.fallback_limits()
        if self.in_flight >= concurrency:
            return _POLL  # a local release notifies earlier
        now = self._clock()
        self._expire_own(now)
        wait = max(0.0, self._paused_until - now)
        if rpm is not None and len(self._own) + 1 > rpm:
            wait = max(wait, self._own[len(self._own) - int(rpm)].at + self.window - now)
        if tpm is not None:
            tokens = min(tokens, tpm)
            excess = self._own_tokens + tokens - tpm
            freed = 0.0
            for own in self._own if excess > 1e-9 else ():
                freed += own.tokens
                if freed >= excess - 1e-9:
                    wait = max(wait, own.at + self.window - now)
                    break
        if wait > 0:
            return wait
        return [(None, self._record(self.state.new_id(), tokens))]

    # -- outcomes (the interface of Lane) ---------------------------------------------------------
    def on_success(self, ticket: Ticket, *, tokens_used: float | None = None, pause: float = 0.0) -> None:
        """The call succeeded: ``tokens_used`` corrects the windows; ``pause`` > 0 holds every process."""
        if self._finish(ticket, "success", tokens_used, pause):
            self.completed += 1
            self.local.on_success(ticket, pause=pause)
            self.notify()

    def on_refusal(self, ticket: Ticket, *, retry_after: float | None, exhausted: bool = False) -> RefusalVerdict:
        """The provider refused the call. This process's adaptive limit judges the refusal; a
        load-related one cuts the shared limit (at most once per round trip for all processes), a
        spent quota pauses the lane for every process."""
        if not isinstance(ticket, SharedTicket) or ticket.own is None:
            return RefusalVerdict(False, False, False)
        self.throttled += 1
        verdict = self.local.on_refusal(ticket, retry_after=retry_after, exhausted=exhausted)
        pause = (retry_after or self.local.concurrency.round_trip) if verdict.pause else 0.0
        self._finish(ticket, "throttled" if verdict.load_related else "refused", None, pause)
        self.notify()
        return verdict

    def on_error(self, ticket: Ticket) -> None:
        """The call failed for a reason that says nothing about load."""
        if self._finish(ticket, "error", None, 0.0):
            self.failed += 1
            self.local.on_error(ticket)
            self.notify()

    def on_cancel(self, ticket: Ticket) -> None:
        if self._finish(ticket, "cancelled", None, 0.0):
            self.local.on_cancel(ticket)
            self.notify()

    def pause(self, seconds: float) -> None:
        """Hold the lane ``seconds`` here and, through Redis, in every process."""
        self.local.pause(seconds)
        self._paused_until = max(self._paused_until, self._clock() + seconds)
        self.state.post_release(self, self._release_args("", "pause", None, seconds))

    def _finish(self, ticket: Ticket, outcome: str, tokens_used: float | None, pause: float) -> bool:
        """Return the shared slot (in the background) and correct the own log; False if done before."""
        if not isinstance(ticket, SharedTicket) or ticket.own is None:
            return False
        self.in_flight -= 1
        own = ticket.own
        ticket.own = None
        if tokens_used is not None:
            if own.live:
                self._own_tokens += tokens_used - own.tokens
            own.tokens = tokens_used
        if pause > 0:
            self._paused_until = max(self._paused_until, self._clock() + pause)
        if ticket.grant is not None:
            self._grants.discard(ticket.grant)
            self.state.post_release(self, self._release_args(ticket.grant, outcome, tokens_used, pause))
        return True

    def _release_args(self, grant: str, outcome: str, tokens_used: float | None, pause: float) -> list[Any]:
        return [grant, outcome, -1 if tokens_used is None else tokens_used, pause * 1000,
                self.limits.max_concurrency, self._initial, self.limits.backoff_ratio,
                self.local.concurrency.round_trip * 1000, self.state.channel(self.key)]

    # -- background work (called by the SharedState) ----------------------------------------------
    async def renew(self) -> None:
        """Mark this process present on the lane; extend the leases of its calls in flight."""
        keys = self.state.lane_keys(self.key)
        replicas, _ = await self.state.run_in_background(
            "LANE_RENEW", [keys[3], keys[4]], [self.state.config.lease * 1000, self.state.replica_id, *self._grants]
        )
        self.replicas = max(1, int(replicas))

    async def replay(self) -> None:
        """Write back this process's admissions of the current window (after Redis returned)."""
        now = self._clock()
        self._expire_own(now)
        if not self._own:
            return
        # local monotonic times become server times through one round trip's offset
        state = self.state
        _, server_now = await state.run_in_background(
            "HEARTBEAT", [f"{state.config.namespace}:replicas"], [state.replica_id, state.presence_ttl_ms]
        )
        offset = float(server_now) - now * 1000
        args: list[object] = [self.window * 1000]
        for own in self._own:
            args += [own.id, own.at * 1000 + offset, own.tokens]
        await self.state.run_in_background("LANE_REPLAY", self.state.lane_keys(self.key)[:3], args)

    # -- statistics -----------------------------------------------------------------------------------
    def statistics(self) -> LaneStatistics:
        local = self.local.statistics()
        self._expire_own(self._clock())
        return LaneStatistics(
            key=self.key,
            limits=self.limits,
            concurrency=ConcurrencyStatistics(self.limit_seen, self.limits.max_concurrency, self.lowest_seen,
                                              self.decreases_seen, local.concurrency.slow_start,
                                              local.concurrency.refusal_rate, local.concurrency.pauses),
            in_flight=self.in_flight,
            waiting=local.waiting + len(self._heads),
            requests_in_window=float(len(self._own)),
            tokens_in_window=self._own_tokens,
            paused_for=max(0.0, self._paused_until - self._clock()),
            completed=self.completed,
            failed=self.failed,
            throttled=self.throttled,
            retries=self.retries,
        )

    def __repr__(self) -> str:
        return (f"SharedLane({self.key!r}, mode={self.state.mode}, limit={self.limit_seen}/"
                f"{self.limits.max_concurrency}, in_flight={self.in_flight}, waiting={len(self._heads)})")
