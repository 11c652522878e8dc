"""A lane: the admission scheduler of one (provider, model).

A call is admitted when all of these hold: a concurrency slot is free (the adaptive limit of
:mod:`.concurrency`), the request and token windows have room (RPM, TPM), the lane is not
paused (the provider said the quota is spent), and the call is next in line. "Next in line" is
decided in one place so that limits never reorder it: root turns first (in arrival order), then
sub-calls of the run that has the fewest calls in flight for its weight (fair share between
concurrent runs), each run's calls in arrival order (a retried call keeps its place) and never
more than its own cap in flight.

The lane never sleeps on its own: the waiter at the head of the line holds the timer for the
moment capacity frees; everyone else waits to be woken.

State changes go through a few named methods (:meth:`Lane.admit`, :meth:`Lane.on_success`,
:meth:`Lane.on_refusal`, :meth:`Lane.on_error`, :meth:`Lane.pause`), which a shared backend can
implement over other storage.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from .concurrency import AdaptiveLimit, ConcurrencyStatistics, RefusalVerdict, SendStamp
from .limits import Limits, Priority
from .ratelimit import Admission, SlidingWindowLimiter

__all__ = ["Lane", "LaneStatistics", "RunShare", "Ticket"]


class RunShare:
    """A run's claim on shared lanes: its fair-share ``weight`` and its own in-flight cap."""

    def __init__(self, *, weight: float = 1.0, max_concurrency: int | None = None, name: str = "") -> None:
        if weight <= 0:
            raise ValueError("weight must be > 0")
        self.weight = weight
        self.max_concurrency = max_concurrency
        self.name = name
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"RunShare({self.name!r}, weight={self.weight}, in_flight={self.in_flight})"


class _Waiter:
    __slots__ = ("event", "granted", "priority", "seq", "share", "tokens")

    def __init__(self, priority: int, share: RunShare, tokens: float, seq: int) -> None:
        self.priority = priority
        self.share = share
        self.tokens = tokens
        self.seq = seq
        self.event = anyio.Event()
        self.granted: Ticket | None = None


@dataclass
class Ticket:
    """An admitted call; hand it back to the lane (``on_success`` and so on) exactly once.

    ``seq`` is the call's place in line: pass it to :meth:`Lane.acquire` again when retrying.
    """

    share: RunShare
    requests: Admission | None
    tokens: Admission | None
    queued_at: float
    admitted_at: float
    seq: int = 0
    stamp: SendStamp | None = None
    released: bool = False


@dataclass(frozen=True, slots=True)
class LaneStatistics:
    key: str
    limits: Limits
    concurrency: ConcurrencyStatistics
    in_flight: int
    waiting: int
    requests_in_window: float
    tokens_in_window: float
    paused_for: float
    completed: int
    failed: int
    throttled: int
    retries: int


class Lane:
    """Admission control for one model. Created by the Dispatcher; one per lane key."""

    def __init__(self, key: str, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.key = key
        self.limits = limits
        self._clock = clock
        self.concurrency = AdaptiveLimit(
            limits.max_concurrency, initial=limits.initial_concurrency, backoff_ratio=limits.backoff_ratio,
            clock=clock,
        )
        # Requests admitted together reach the provider spread over some tens of milliseconds; a
        # slightly longer window keeps two of our windows from landing in one of the provider's.
        margin = max(limits.window * 0.01, 0.25)
        self.requests = (
            SlidingWindowLimiter(limits.rpm, window=limits.window, margin=margin, clock=clock) if limits.rpm else None
        )
        self.tokens = (
            SlidingWindowLimiter(limits.tpm, window=limits.window, margin=margin, clock=clock) if limits.tpm else None
        )
        self.in_flight = 0
        self.backlog = 0  # calls of batches not yet asking (the Dispatcher's senders take them in turn)
        self._root: deque[_Waiter] = deque()
        self._sub: dict[RunShare, deque[_Waiter]] = {}
        self._seq = itertools.count(1)
        self._paused_until = -math.inf
        self._resume_pending = False
        self._timer_owner: _Waiter | None = None
        self._timer_delay = math.inf
        self.completed = self.failed = self.throttled = self.retries = 0

    # -- choosing who is next ---------------------------------------------------------------------
    def _next(self) -> _Waiter | None:
        if self._root:
            return self._root[0]
        best: _Waiter | None = None
        best_key: tuple[float, int] = (math.inf, 0)
        for share, queue in self._sub.items():
            if not queue or (share.max_concurrency is not None and share.in_flight >= share.max_concurrency):
                continue
            key = (share.in_flight / share.weight, queue[0].seq)
            if key < best_key:
                best, best_key = queue[0], key
        return best

    def _enqueue(self, waiter: _Waiter) -> None:
        queue = self._root if waiter.priority == Priority.ROOT else self._sub.setdefault(waiter.share, deque())
        if not queue or queue[-1].seq < waiter.seq:
            queue.append(waiter)
            return
        for index, other in enumerate(queue):  # a retry: back to its place in line
            if other.seq > waiter.seq:
                queue.insert(index, waiter)
                return
        queue.append(waiter)  # pragma: no cover - seqs are unique

    def _pop(self, waiter: _Waiter) -> None:
        if waiter.priority == Priority.ROOT:
            self._root.popleft()
        else:
            queue = self._sub[waiter.share]
            queue.popleft()
            if not queue:
                del self._sub[waiter.share]

    def _blocked_for(self, tokens: float, now: float) -> float:
        """Seconds until time alone lets a call of ``tokens`` in (0: it may go now)."""
        delay = max(0.0, self._paused_until - now)
        if delay == 0 and self._resume_pending:
            self._resume_pending = False
            self.concurrency.on_resume()
        if self.requests is not None:
            delay = max(delay, self.requests.delay(1))
        if self.tokens is not None:
            delay = max(delay, self.tokens.delay(tokens))
        return delay

    def _dispatch(self) -> None:
        """Admit as many waiters as the limits allow; arm the head waiter's timer if time blocks."""
        self._timer_owner, self._timer_delay = None, math.inf
        while True:
            waiter = self._next()
            if waiter is None:
                return
            now = self._clock()
            delay = self._blocked_for(waiter.tokens, now)
            if delay == 0 and not self.concurrency.available(self.in_flight):
                delay = self.concurrency.next_change_in()  # a held slot frees, or a probe is due
                if delay == math.inf:
                    return  # a completion will call us again
                delay = max(delay, 1e-3)
            if delay > 0:
                self._timer_owner, self._timer_delay = waiter, delay
                waiter.event.set()  # the head re-arms its wait with the timer
                return
            self._pop(waiter)
            self.admit(waiter, now)

    def admit(self, waiter: _Waiter, now: float) -> None:
        """Take a slot and the windows' room for ``waiter`` and wake it."""
        waiter.granted = self._grant(waiter.share, waiter.tokens, waiter.seq, now)
        waiter.event.set()

    def _grant(self, share: RunShare, tokens: float, seq: int, now: float) -> Ticket:
        self.in_flight += 1
        share.in_flight += 1
        return Ticket(
            share=share,
            requests=self.requests.acquire_nowait(1) if self.requests else None,
            tokens=self.tokens.acquire_nowait(tokens) if self.tokens else None,
            queued_at=now,
            admitted_at=now,
            seq=seq,
            stamp=self.concurrency.on_send(self.in_flight),
        )

    def _may_go_now(self, share: RunShare, tokens: float, now: float) -> bool:
        """Whether a new call may be admitted at once: nobody waits ahead of it and no limit holds it."""
        return (
            not self._root
            and not self._sub
            and (share.max_concurrency is None or share.in_flight < share.max_concurrency)
            and self._blocked_for(tokens, now) == 0
            and self.concurrency.available(self.in_flight)
        )

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._root if waiter.priority == Priority.ROOT else self._sub.get(waiter.share)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if queue is not self._root and not queue:
                del self._sub[waiter.share]

    # -- public -------------------------------------------------------------------------------------
    async def acquire(
        self, *, priority: Priority, share: RunShare, tokens: float, seq: int | None = None
    ) -> Ticket:
        """Wait until this call may be sent; cancellation leaves no trace in the lane.

        ``seq``: the place in line of an earlier attempt of the same call (a retry keeps it).
        """
        queued_at = self._clock()
        seq = seq if seq is not None else next(self._seq)
        if self._may_go_now(share, tokens, queued_at):
            # the common case of a busy lane's steady state (a call ends, the next one starts):
            # no waiter, no event, no timer. The slot is taken before yielding (two callers must
            # not both pass the test), and acquire still yields: a batch of calls that never
            # suspend would otherwise hold the loop and deafen its deadline.
            ticket = self._grant(share, tokens, seq, queued_at)
            try:
                await anyio.lowlevel.checkpoint()
            except BaseException:
                self.on_cancel(ticket)
                raise
            return ticket
        waiter = _Waiter(priority, share, tokens, seq)
        self._enqueue(waiter)
        waited = False
        try:
            self._dispatch()
            while waiter.granted is None:
                waited = True
                delay = self._timer_delay if self._timer_owner is waiter else math.inf
                if waiter.event.is_set():
                    waiter.event = anyio.Event()
                if delay == math.inf:
                    await waiter.event.wait()  # a completion or a departure wakes us
                else:
                    with anyio.move_on_after(delay):
                        await waiter.event.wait()
                if waiter.granted is None:
                    self._dispatch()
            if not waited:
                await anyio.lowlevel.checkpoint()  # admitted at once: still a point to be cancelled at
        except BaseException:
            if waiter.granted is not None:
                self.on_cancel(waiter.granted)
            else:
                self._remove(waiter)
                self._dispatch()
            raise
        ticket = waiter.granted
        ticket.queued_at = queued_at
        return ticket

    def _return_slot(self, ticket: Ticket) -> bool:
        if ticket.released:
            return False
        ticket.released = True
        self.in_flight -= 1
        ticket.share.in_flight -= 1
        return True

    def on_success(self, ticket: Ticket, *, tokens_used: float | None = None, pause: float = 0.0) -> None:
        """The call succeeded. ``tokens_used`` replaces the token estimate (weighted like the
        reservation); ``pause`` > 0 when headers say a quota is at zero until its reset."""
        if not self._return_slot(ticket):
            return
        if tokens_used is not None and self.tokens is not None and ticket.tokens is not None:
            self.tokens.adjust(ticket.tokens, tokens_used)
        self.completed += 1
        if ticket.stamp is not None:
            self.concurrency.on_success(ticket.stamp)
        if pause > 0:
            self.pause(pause)
        self._dispatch()

    def on_refusal(self, ticket: Ticket, *, retry_after: float | None, exhausted: bool = False) -> RefusalVerdict:
        """The provider refused the call for rate or quota. The refused call waits its own
        ``retry-after``; the whole lane pauses only when the refusals say the quota is spent."""
        verdict = RefusalVerdict(False, False, False)
        if not self._return_slot(ticket):
            return verdict
        self.throttled += 1
        if ticket.stamp is not None:
            verdict = self.concurrency.on_refusal(ticket.stamp, exhausted=exhausted)
        if verdict.pause:
            self.pause(retry_after if retry_after else self.concurrency.round_trip)
        self._dispatch()
        return verdict

    def on_error(self, ticket: Ticket) -> None:
        """The call failed for another reason (it says nothing about load)."""
        if self._return_slot(ticket):
            self.failed += 1
            self._dispatch()

    def on_cancel(self, ticket: Ticket) -> None:
        """The call was cancelled while admitted or in flight."""
        if self._return_slot(ticket):
            self._dispatch()

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds``; then resume with one call and slow start back."""
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._resume_pending = True

    def statistics(self) -> LaneStatistics:
        waiting = self.backlog + len(self._root) + sum(len(q) for q in self._sub.values())
        return LaneStatistics(
            key=self.key,
            limits=self.limits,
            concurrency=self.concurrency.statistics(),
            in_flight=self.in_flight,
            waiting=waiting,
            requests_in_window=self.requests.statistics().used if self.requests else 0.0,
            tokens_in_window=self.tokens.statistics().used if self.tokens else 0.0,
            paused_for=max(0.0, self._paused_until - self._clock()),
            completed=self.completed,
            failed=self.failed,
            throttled=self.throttled,
            retries=self.retries,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"Lane({self.key!r}, limit={s.concurrency.limit}/{s.concurrency.maximum}, in_flight={s.in_flight}, "
            f"waiting={s.waiting}, rpm_used={s.requests_in_window:g}, tpm_used={s.tokens_in_window:g})"
        )
