"""Which failures are retried, and how long to wait before the next attempt.

Throttled, quota-exhausted, not-ready and transient errors are retried (``ModelError.retryable``);
context overflow and fatal errors are not. The wait is exponential backoff with full jitter
(botocore's implementation, scaled to ``base_delay``), never shorter than the server's
``retry-after``; retries stop at ``max_attempts`` or when the next wait would pass ``deadline``
seconds after the first attempt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from botocore.retries.standard import ExponentialBackoff

from .._exceptions import ModelError, RLMError

__all__ = ["RetryPolicy"]


@dataclass
class _Attempt:
    attempt_number: int  # what botocore's backoff reads


@dataclass(frozen=True)
class RetryPolicy:
    """Retry settings of a Dispatcher. ``RetryPolicy(max_attempts=1)`` turns retries off."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0
    deadline: float = 300.0
    seed: int | None = None
    _random: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay <= 0 or self.max_delay < self.base_delay:
            raise ValueError("need max_attempts >= 1 and 0 < base_delay <= max_delay")
        object.__setattr__(self, "_random", random.Random(self.seed))

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, ModelError) and exc.retryable

    def delay(self, attempt: int, error: RLMError | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        backoff = ExponentialBackoff(max_backoff=self.max_delay / self.base_delay, random=self._random.random)
        wait = float(backoff.delay_amount(_Attempt(attempt))) * self.base_delay
        retry_after = getattr(error, "retry_after", None)
        if retry_after:
            wait = max(wait, float(retry_after))
        return wait
