"""Which failures are retried, and how long to wait before the next attempt.

Throttled, quota-exhausted, not-ready and transient errors are retried (``ModelError.retryable``);
context overflow and fatal errors are not. A refusal for rate (``ThrottledError``) that names a
``retry-after`` waits exactly that long plus up to 10% jitter: the provider said when, and a
random refusal must not cost more than it asks. Every other retry waits exponential backoff
with full jitter (botocore's implementation, scaled to ``base_delay``), never shorter than a
``retry-after``. Refusals for rate and other failures are counted apart: a call gives up after
``max_attempts`` failures that were not rate refusals, after ``max_throttles`` refusals for rate or
quota,
or when the next wait would pass ``deadline`` seconds after it was first queued.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from botocore.retries.standard import ExponentialBackoff

from .._exceptions import ModelError, QuotaExhaustedError, RLMError, ThrottledError

__all__ = ["RetryPolicy"]


@dataclass
class _Attempt:
    attempt_number: int  # what botocore's backoff reads


@dataclass(frozen=True)
class RetryPolicy:
    """Retry settings of a Dispatcher. ``RetryPolicy(max_attempts=1, max_throttles=0)`` turns retries off."""

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 20.0
    deadline: float = 300.0
    max_throttles: int = 30
    seed: int | None = None
    _random: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay <= 0 or self.max_delay < self.base_delay:
            raise ValueError("need max_attempts >= 1 and 0 < base_delay <= max_delay")
        if self.max_throttles < 0 or self.deadline <= 0:
            raise ValueError("need max_throttles >= 0 and deadline > 0")
        object.__setattr__(self, "_random", random.Random(self.seed))

    def retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, ModelError) and exc.retryable

    def should_retry(self, exc: BaseException, *, failures: int, throttles: int, elapsed: float,
                     delay: float) -> bool:
        """Whether to try again after ``exc``; ``failures``/``throttles`` count the attempts so far
        (this one included), ``elapsed`` is seconds since the call was first queued."""
        if not self.retryable(exc) or elapsed + delay > self.deadline:
            return False
        if isinstance(exc, (ThrottledError, QuotaExhaustedError)):
            return throttles <= self.max_throttles
        return failures < self.max_attempts

    def delay(self, attempt: int, error: RLMError | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        retry_after = getattr(error, "retry_after", None)
        if retry_after and isinstance(error, ThrottledError):
            return float(retry_after) * (1 + 0.1 * self._random.random())
        backoff = ExponentialBackoff(max_backoff=self.max_delay / self.base_delay, random=self._random.random)
        wait = float(backoff.delay_amount(_Attempt(attempt))) * self.base_delay
        if retry_after:
            wait = max(wait, float(retry_after))
        return wait
