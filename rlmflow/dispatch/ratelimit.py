"""A sliding-window rate limiter: never more than ``limit`` units in any ``window`` seconds.

Providers count requests and tokens per minute over a window, so a token bucket (which admits a
full bucket and then the refill within one minute) can exceed them by up to 2x. This limiter
keeps the log of what it admitted in the last window and admits an amount only if the sum stays
under the limit, so it cannot overshoot. Amounts can be corrected after the fact (a call's real
token usage replaces its estimate).

Time comes from an injectable ``clock`` (default: the event loop's), so tests can drive it.
The limiter itself never sleeps: it says when capacity frees (:meth:`delay`), and the lane that
owns it decides how to wait.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Admission", "RateLimitStatistics", "SlidingWindowLimiter"]


class Admission:
    """One admitted amount; :meth:`SlidingWindowLimiter.adjust` can change it later."""

    __slots__ = ("amount", "at")

    def __init__(self, at: float, amount: float) -> None:
        self.at = at
        self.amount = amount


@dataclass(frozen=True, slots=True)
class RateLimitStatistics:
    limit: float
    window: float
    used: float


class SlidingWindowLimiter:
    """Admits amounts so that the total over any ``window`` seconds stays within ``limit``.

    ``margin`` lengthens the window slightly so that requests delayed on the way to the provider
    still fall into separate provider windows.
    """

    def __init__(
        self, limit: float, *, window: float = 60.0, margin: float = 0.0, clock: Callable[[], float]
    ) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("limit and window must be > 0")
        self.limit = float(limit)
        self.window = float(window) + margin
        self._clock = clock
        self._log: deque[Admission] = deque()
        self._used = 0.0

    def _expire(self, now: float) -> None:
        # an entry leaves exactly one window after it was admitted (with float slack)
        while self._log and now - self._log[0].at >= self.window - 1e-9:
            self._used -= self._log.popleft().amount
        if not self._log:
            self._used = 0.0  # forget float drift

    def _clamp(self, amount: float) -> float:
        # an amount above the limit could never fit: it waits for an empty window instead
        return min(float(amount), self.limit)

    def has_capacity(self, amount: float = 1.0) -> bool:
        self._expire(self._clock())
        return self._used + self._clamp(amount) <= self.limit + 1e-9

    def acquire_nowait(self, amount: float = 1.0) -> Admission | None:
        """Admit ``amount`` now if it fits, else return ``None``."""
        now = self._clock()
        self._expire(now)
        amount = self._clamp(amount)
        if self._used + amount > self.limit + 1e-9:
            return None
        admission = Admission(now, amount)
        self._log.append(admission)
        self._used += amount
        return admission

    def delay(self, amount: float = 1.0) -> float:
        """Seconds until ``amount`` would fit (0 if it fits now), assuming nothing else is admitted."""
        now = self._clock()
        self._expire(now)
        excess = self._used + self._clamp(amount) - self.limit
        if excess <= 1e-9:
            return 0.0
        freed = 0.0
        for admission in self._log:
            freed += admission.amount
            if freed >= excess - 1e-9:
                return max(0.0, admission.at + self.window - now)
        return self.window  # pragma: no cover - the log always holds at least the excess

    def adjust(self, admission: Admission, amount: float) -> None:
        """Replace an admitted amount by the real one (while it is still in the window)."""
        amount = max(0.0, float(amount))
        if admission in self._log:
            self._used += amount - admission.amount
        admission.amount = amount

    def statistics(self) -> RateLimitStatistics:
        self._expire(self._clock())
        return RateLimitStatistics(self.limit, self.window, self._used)

    def __repr__(self) -> str:
        stats = self.statistics()
        return f"SlidingWindowLimiter(limit={stats.limit:g}, window={stats.window:g}s, used={stats.used:g})"
