"""What a run returns, and the live counters a progress display reads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .dispatch.budget import Budget, Spend
from .dispatch.dispatcher import CallRecord
from .models.base import Usage
from .sandbox.base import CellResult, SandboxReport

__all__ = ["RLMResult", "RunProgress", "Turn", "partial_result", "summarise_usage"]


@dataclass
class Turn:
    """One root turn: the model's reply and what its code printed."""

    index: int
    reply: str
    code: list[str]
    feedback: str
    duration: float
    cells: list[CellResult] = field(default_factory=list)
    started_at: float = 0.0  # wall clock
    cell_spans: list[tuple[float, float]] = field(default_factory=list)  # (wall start, seconds) per cell


@dataclass(frozen=True)
class RLMResult:
    """The outcome of a run.

    ``usage`` is per model name; ``cost_usd`` is ``None`` if any call's price is unknown;
    ``calls`` lists every model call (root and sub, all depths) in completion order;
    ``metadata`` is what the caller passed to ``run``; ``sandbox`` is the sandbox's report of
    the isolation it applied (``None`` for sandboxes that give none); ``overrun`` is what calls
    spent beyond their budget reservations (real usage above the estimate), zero normally;
    ``limited`` names the budget cap (``max_calls``, ``max_cost_usd``...) that refused some of the
    run's work before it answered: the answer was given from what could be paid for.
    ``replayed_calls`` counts the calls a resumed or replayed run answered from its journal (no
    request sent); ``diverged_at`` is the first root turn whose cells printed otherwise than the
    journal recorded (code that is not deterministic): from there the run went on live.
    """

    answer: str
    turns: int
    usage: dict[str, Usage]
    cost_usd: float | None
    duration: float
    trace_id: str | None
    run_id: str
    calls: list[CallRecord]
    transcript: list[Turn]
    spent: Spend
    budget: Budget
    metadata: dict[str, str] = field(default_factory=dict)
    sandbox: SandboxReport | None = None
    overrun: Spend = field(default_factory=Spend)
    limited: str | None = None
    replayed_calls: int = 0
    diverged_at: int | None = None

    @property
    def total_usage(self) -> Usage:
        total = Usage()
        for usage in self.usage.values():
            total = total + usage
        return total


@dataclass
class RunProgress:
    """Live counters of a run, for progress displays; updated by the engine, read by anyone."""

    turn: int = 0
    max_turns: int = 0
    phase: str = "starting"
    calls_done: int = 0
    calls_failed: int = 0
    calls_in_flight: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    sandbox_restarts: int = 0
    root_chars: int = 0  # characters of the current root reply received so far (streaming models)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


def summarise_usage(calls: list[CallRecord]) -> tuple[dict[str, Usage], float | None]:
    usage: dict[str, Usage] = {}
    cost: float | None = 0.0
    for call in calls:
        usage[call.model] = usage.get(call.model, Usage()) + (Usage(cached_calls=1) if call.cached else Usage(
            call.input_tokens, call.output_tokens, 1 if call.error is None else 0, call.cache_read_tokens,
            call.cache_write_tokens,
        ))
        if call.error is None:
            cost = None if cost is None or call.cost_usd is None else cost + call.cost_usd
    return usage, cost


def partial_result(error: BaseException) -> RLMResult | None:
    """The work a failed or cancelled run had done (its ``.partial``), typed.

    Every :class:`~rlmflow.RLMError` that ends a run carries it, and so does the
    ``CancelledError`` of a cancelled run (an attribute ``mypy --strict`` cannot see there)::

        except BaseException as exc:
            done = partial_result(exc)   # RLMResult | None: usage, calls, spent, transcript
            raise
    """
    partial = getattr(error, "partial", None)
    return partial if isinstance(partial, RLMResult) else None
