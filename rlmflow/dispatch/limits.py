"""Lane limits and call priorities."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Limits", "Priority"]


class Priority(IntEnum):
    """Lower runs first: a root turn never waits behind queued sub-calls."""

    ROOT = 0
    SUB = 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one lane (one provider and model).

    - ``rpm`` / ``tpm``: requests and tokens per ``window`` seconds (``None``: unlimited). Tokens
      are counted as the provider does when a call starts: input estimate + ``max_tokens`` x
      ``output_weight`` (some Bedrock models weigh output 5x), corrected by the real usage after.
    - ``max_concurrency``: the ceiling of calls in flight. The adaptive limit slow-starts from
      ``initial_concurrency`` (default: 8, or the ceiling if lower) and finds the provider's pace
      below the ceiling; ``backoff_ratio`` is its multiplicative decrease (see
      ``docs/policies.md``). The default ceiling, 256, suits remote providers; local models
      set their own (``llama.cpp``: 1).
    """

    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int = 256
    initial_concurrency: int | None = None
    output_weight: float = 1.0
    window: float = 60.0
    backoff_ratio: float = 0.7

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.initial_concurrency is not None and not 1 <= self.initial_concurrency <= self.max_concurrency:
            raise ValueError("initial_concurrency must be within [1, max_concurrency]")
        if (self.rpm is not None and self.rpm <= 0) or (self.tpm is not None and self.tpm <= 0):
            raise ValueError("rpm and tpm must be > 0 when set")
        if not 0 < self.backoff_ratio < 1:
            raise ValueError("backoff_ratio must be in (0, 1)")
        if self.output_weight <= 0 or self.window <= 0:
            raise ValueError("output_weight and window must be > 0")
