"""Which tracer and metrics a model call reports to: the run's, when it brought its own.

A Dispatcher is shared by every ``RLM`` of a process, but each ``RLM`` may have its own
``tracer_provider`` and ``meter_provider``. The run sets its telemetry in a context variable for
the duration of the run; the Dispatcher reads it for each call (task groups copy context
variables into their tasks, so every sub-call of the run sees it) and falls back to its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from opentelemetry import trace

from .metrics import CallMetrics

__all__ = ["CallTelemetry", "current_telemetry", "use_telemetry"]


@dataclass(frozen=True, slots=True)
class CallTelemetry:
    """Where a call's span and measurements go."""

    tracer: trace.Tracer
    metrics: CallMetrics


_current: ContextVar[CallTelemetry | None] = ContextVar("rlmflow_call_telemetry", default=None)


def current_telemetry() -> CallTelemetry | None:
    """The telemetry of the run this task belongs to, or ``None`` outside a run."""
    return _current.get()


@contextmanager
def use_telemetry(telemetry: CallTelemetry | None) -> Iterator[None]:
    """Report the calls made inside this block to ``telemetry`` (``None``: the Dispatcher's own)."""
    token = _current.set(telemetry)
    try:
        yield
    finally:
        _current.reset(token)
