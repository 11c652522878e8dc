"""Lane limits and call priorities."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Limits", "Priority", "default_output_weight"]

# Bedrock counts each output token of these Claude models as 5 tokens against the TPM quota
# (Claude 3.7 Sonnet and the Claude 4 generation on), other models 1:1.
_HEAVY_OUTPUT = re.compile(r"anthropic\.claude-(3-7-|(sonnet|opus|haiku)-[4-9])")


def default_output_weight(provider: str, model: str) -> float:
    """How many quota tokens one output token costs on ``provider`` when nothing is configured."""
    return 5.0 if provider == "aws.bedrock" and _HEAVY_OUTPUT.search(model) else 1.0


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
      ``output_weight=None`` takes the provider's known weight for the model
      (:func:`default_output_weight`: 5 for Claude 3.7 and later on Bedrock, else 1).
    - ``max_concurrency``: the ceiling of calls in flight; the adaptive limit moves below it,
      starting at ``initial_concurrency`` (default: the ceiling).
    """

    rpm: float | None = None
    tpm: float | None = None
    max_concurrency: int = 16
    initial_concurrency: int | None = None
    output_weight: float | None = None
    window: float = 60.0

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.initial_concurrency is not None and not 1 <= self.initial_concurrency <= self.max_concurrency:
            raise ValueError("initial_concurrency must be within [1, max_concurrency]")
        if (self.rpm is not None and self.rpm <= 0) or (self.tpm is not None and self.tpm <= 0):
            raise ValueError("rpm and tpm must be > 0 when set")
        if (self.output_weight is not None and self.output_weight <= 0) or self.window <= 0:
            raise ValueError("output_weight and window must be > 0")
