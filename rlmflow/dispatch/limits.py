"""Lane limits and a priority-ordered, resizable slot pool."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from enum import IntEnum

import anyio
import anyio.lowlevel

__all__ = ["Limits", "Priority", "PrioritySlots", "SlotStatistics"]


class Priority(IntEnum):
    """Lower runs first: a root turn never waits behind sub-calls."""

    ROOT = 0
    SUB = 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one lane (one provider and model).

    ``rpm`` and ``tpm`` are requests and tokens per minute (``None``: unlimited);
    ``max_concurrency`` caps calls in flight.
    """

    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int = 16

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")


@dataclass(frozen=True, slots=True)
class SlotStatistics:
    total: int
    in_use: int
    waiting: int


class _Waiter:
    __slots__ = ("cancelled", "event", "granted")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.granted = False
        self.cancelled = False


class PrioritySlots:
    """A counting semaphore whose waiters are served by priority, then first come first served.

    ``total`` can be changed at any time (adaptive concurrency shrinks and grows it); shrinking
    never interrupts holders, it only delays new grants. A waiter cancelled while queued leaves
    no trace; one cancelled just after being granted hands its slot on.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("total must be >= 1")
        self._total = total
        self._in_use = 0
        self._queue: list[tuple[int, int, _Waiter]] = []
        self._seq = itertools.count()

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        if value < 1:
            raise ValueError("total must be >= 1")
        self._total = value
        self._grant()

    def acquire_nowait(self, priority: int = Priority.SUB) -> bool:
        """Take a slot if one is free and nobody of equal or higher priority is waiting."""
        self._drop_cancelled()
        if self._in_use < self._total and (not self._queue or self._queue[0][0] > priority):
            self._in_use += 1
            return True
        return False

    async def acquire(self, priority: int = Priority.SUB) -> None:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if self.acquire_nowait(priority):
            # yield without being cancellable: a slot taken must reach the caller
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = _Waiter()
        heapq.heappush(self._queue, (priority, next(self._seq), waiter))
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.granted:
                self.release()
            else:
                waiter.cancelled = True
            raise

    def release(self) -> None:
        if self._in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_use -= 1
        self._grant()

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0][2].cancelled:
            heapq.heappop(self._queue)

    def _grant(self) -> None:
        while self._in_use < self._total:
            self._drop_cancelled()
            if not self._queue:
                return
            _, _, waiter = heapq.heappop(self._queue)
            waiter.granted = True
            self._in_use += 1
            waiter.event.set()

    def statistics(self) -> SlotStatistics:
        waiting = sum(1 for _, _, w in self._queue if not w.cancelled)
        return SlotStatistics(total=self._total, in_use=self._in_use, waiting=waiting)

    def __repr__(self) -> str:
        stats = self.statistics()
        return f"PrioritySlots(total={stats.total}, in_use={stats.in_use}, waiting={stats.waiting})"
