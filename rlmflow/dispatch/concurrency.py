"""Adaptive concurrency: additive increase, multiplicative decrease (after Netflix's AIMDLimit).

A lane starts at ``initial`` calls in flight. Each success while the lane is busy (at least half
the limit in flight) adds one; each throttle multiplies the limit by ``backoff_ratio``. The limit
stays within ``[1, maximum]``. Growth only when busy keeps an idle lane from inflating a limit it
never tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AIMDLimit", "AIMDStatistics"]


@dataclass(frozen=True, slots=True)
class AIMDStatistics:
    limit: int
    maximum: int
    lowest: int
    decreases: int


class AIMDLimit:
    """The current concurrency limit of a lane, adjusted by outcomes."""

    def __init__(self, maximum: int, *, initial: int | None = None, backoff_ratio: float = 0.7) -> None:
        if maximum < 1:
            raise ValueError("maximum must be >= 1")
        if not 0 < backoff_ratio < 1:
            raise ValueError("backoff_ratio must be in (0, 1)")
        self.maximum = maximum
        self.backoff_ratio = backoff_ratio
        self._limit = min(maximum, initial or maximum)
        self._lowest = self._limit
        self._decreases = 0

    @property
    def limit(self) -> int:
        return self._limit

    def on_success(self, in_flight: int) -> int:
        if in_flight * 2 >= self._limit and self._limit < self.maximum:
            self._limit += 1
        return self._limit

    def on_throttle(self) -> int:
        self._limit = max(1, math.floor(self._limit * self.backoff_ratio))
        self._lowest = min(self._lowest, self._limit)
        self._decreases += 1
        return self._limit

    def statistics(self) -> AIMDStatistics:
        return AIMDStatistics(self._limit, self.maximum, self._lowest, self._decreases)

    def __repr__(self) -> str:
        return f"AIMDLimit(limit={self._limit}, maximum={self.maximum}, decreases={self._decreases})"
