"""What a model call leaves behind: its :class:`CallRecord`, and the callback type that receives one.

A leaf module: the Dispatcher writes records, telemetry and the run's books read them, and none
of them has to import another to name the type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = ["CallRecord", "CallRecorder"]


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What one model call cost and how long it took; ``error`` names the final exception type.

    ``input_tokens`` counts every input token, cached or not; ``cache_read_tokens`` and
    ``cache_write_tokens`` are the parts of it read from and written to the provider's prompt
    cache. ``uncached_cost_usd`` is what the call would have cost with no prompt cache (every
    input token at the input price); ``None`` where it was not computed (read it through
    :attr:`cost_without_cache`).
    """

    model: str
    provider: str
    role: str
    depth: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    queue_wait: float
    duration: float
    attempts: int = 1
    throttles: int = 0
    error: str | None = None
    started_at: float = 0.0  # wall clock (time.time()) when the call was queued
    from_journal: bool = False  # answered from a journal (a resumed or replayed run): nothing was sent
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    uncached_cost_usd: float | None = None

    @property
    def cost_without_cache(self) -> float | None:
        """What the call would have cost if nothing had been read from or written to a prompt cache."""
        if self.uncached_cost_usd is not None:
            return self.uncached_cost_usd
        return self.cost_usd if not (self.cache_read_tokens or self.cache_write_tokens) else None
    cached: bool = False  # answered from the sub-call cache (RLM(cache=...)): nothing sent, nothing charged

    @property
    def source(self) -> Literal["cache", "journal"] | None:
        """``"cache"`` or ``"journal"`` for a call answered without a provider request, else ``None``."""
        return "cache" if self.cached else "journal" if self.from_journal else None


#: Receives the record of each call as it finishes.
CallRecorder = Callable[[CallRecord], None]
