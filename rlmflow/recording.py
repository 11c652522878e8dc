"""What a run leaves behind while it goes: call records, live progress, logs, trajectory, events.

One :class:`RunRecorder` per run. It never decides anything about the run; it only writes down
what happened, so the loop, the bridge and the lifecycle can change without touching it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields
from typing import TYPE_CHECKING, Any

from .dispatch.dispatcher import CallRecord
from .events import AnswerReady, RunEvent, RunFailed, RunStarted, SubCallDone
from .models.base import Usage
from .result import RLMResult, Turn
from .telemetry.logs import get_logger

if TYPE_CHECKING:
    from .run import _Run

__all__ = ["EventSink", "RunRecorder", "UsageTally"]

EventSink = Callable[[RunEvent], None]
"""Receives a run's events as they happen; must not block (it runs on the event loop)."""

_logger = get_logger("rlmflow")
_CALL_FIELDS = tuple(f.name for f in fields(CallRecord))


class UsageTally:
    """Usage per model and total cost of a run tree's calls, added up as each call is recorded.

    The same figures as :func:`rlmflow.result.summarise_usage` over the calls, in the same order
    (so the same float sums), without walking them all again whenever a result is made: that took
    23 ms for 10,000 calls, and every child run's result walked the whole tree's calls.
    """

    def __init__(self) -> None:
        self._tokens: dict[str, list[int]] = {}  # model -> [input tokens, output tokens, successful calls]
        self._cost: float | None = 0.0  # None once a successful call has no known price

    def add(self, call: CallRecord) -> None:
        tokens = self._tokens.get(call.model)
        if tokens is None:
            tokens = self._tokens[call.model] = [0, 0, 0]
        tokens[0] += call.input_tokens
        tokens[1] += call.output_tokens
        if call.error is None:
            tokens[2] += 1
            if self._cost is not None:
                self._cost = None if call.cost_usd is None else self._cost + call.cost_usd

    def summary(self) -> tuple[dict[str, Usage], float | None]:
        """Usage per model and the total cost (``None`` if any successful call's price is unknown)."""
        return {model: Usage(i, o, n) for model, (i, o, n) in self._tokens.items()}, self._cost


class RunRecorder:
    """Writes one run's record: calls, progress counters, log records, trajectory and events."""

    def __init__(self, run: _Run, sink: EventSink | None) -> None:
        self._run = run
        self._sink = sink

    def emit(self, event_type: type[RunEvent], **fields: Any) -> None:
        """Send an event to the sink, if any (a failing sink is logged, never fatal)."""
        if self._sink is None:
            return
        run = self._run
        try:
            self._sink(event_type(run_id=run.run_id, depth=run.depth, at=time.time(), **fields))
        except Exception:
            _logger.exception("event sink failed", event=event_type.kind)

    def record(self, call: CallRecord) -> None:
        """One finished model call (root or sub) of this run."""
        run = self._run
        run.calls.append(call)
        run.shared.usage.add(call)
        trajectory = run.rlm.trajectory
        if trajectory is not None:
            # a flat record's fields as they are: dataclasses.asdict deep-copies each one (about 10 us a call)
            trajectory.event("call", run_id=run.run_id, **{name: getattr(call, name) for name in _CALL_FIELDS})
        progress = run.progress
        if call.role != "root":  # the display counts sub-calls; root turns have their own counter
            if call.error is None:
                progress.calls_done += 1
            else:
                progress.calls_failed += 1
        progress.input_tokens += call.input_tokens
        progress.output_tokens += call.output_tokens
        progress.cost_usd += call.cost_usd or 0.0
        if self._sink is not None:  # most runs have no sink: skip building the event's fields
            self.emit(
                SubCallDone, role=call.role, model=call.model, input_tokens=call.input_tokens,
                output_tokens=call.output_tokens, cost_usd=call.cost_usd, duration=call.duration, error=call.error,
            )

    def started(self, context_hash: str, context_chars: int) -> None:
        run = self._run
        rlm = run.rlm
        _logger.info("run started", query_chars=len(run.query), context_chars=context_chars,
                     root=rlm.root.name, sub=rlm.sub.name)
        self.emit(RunStarted, query=run.query, context_chars=context_chars, root_model=rlm.root.name,
                  sub_model=rlm.sub.name, parent_run_id=run.parent_run_id, metadata=dict(run.options.metadata))
        trajectory = rlm.trajectory
        if trajectory is not None:
            context = run.context
            kind = "str" if isinstance(context, str) else "dict" if isinstance(context, Mapping) else "list"
            documents = 1 if isinstance(context, str) else len(context)
            trajectory.context(context_hash, {"chars": context_chars, "kind": kind, "documents": documents})
            trajectory.event(
                "run_start", run_id=run.run_id, parent_run_id=run.parent_run_id, depth=run.depth,
                t=time.time(), query=trajectory.cap(run.query), context_sha256=context_hash,
                root_model=rlm.root.name, sub_model=rlm.sub.name, trace_id=run.trace_id,
                metadata=dict(run.options.metadata),
            )

    def finished(self, result: RLMResult | None, error: BaseException | None) -> None:
        run = self._run
        duration = time.monotonic() - run.started
        turns = len(run.transcript)
        if error is None and result is not None:
            _logger.info("run finished", turns=turns, duration_s=round(duration, 3))
            self.emit(AnswerReady, answer=result.answer, turns=turns, cost_usd=result.cost_usd, duration=duration)
        else:
            _logger.warning("run failed", error=type(error).__name__, turns=turns)
            message = str(getattr(error, "message", None) or error or "")
            self.emit(RunFailed, error=type(error).__name__, message=message[:500], turns=turns)
        trajectory = run.rlm.trajectory
        if trajectory is not None:
            usage, cost = run.shared.usage.summary()
            trajectory.event(
                "run_end", run_id=run.run_id, depth=run.depth, t=time.time(), duration=duration,
                answer=trajectory.cap(result.answer) if result else None,
                error=type(error).__name__ if error else None, turns=turns,
                usage={model: asdict(u) for model, u in usage.items()}, cost_usd=cost,
            )
            trajectory.flush()

    def turn(self, turn: Turn) -> None:
        run = self._run
        run.transcript.append(turn)
        _logger.info("turn finished", turn=turn.index, cells=len(turn.cells), duration_s=round(turn.duration, 3),
                     error=next((c.error.strip().splitlines()[-1][:200] for c in turn.cells if c.error), None))
        trajectory = run.rlm.trajectory
        if trajectory is None:
            return
        trajectory.event(
            "turn", run_id=run.run_id, depth=run.depth, turn=turn.index, t=turn.started_at,
            duration=turn.duration, reply=trajectory.cap(turn.reply), code=turn.code,
            cells=[
                {
                    "t": start, "duration": wall, "compute": cell.duration, "output": trajectory.cap(cell.output),
                    "output_chars": cell.output_chars, "error": trajectory.cap(cell.error), "final": cell.final,
                    "restarted": cell.restarted, "timed_out": cell.timed_out,
                }
                for cell, (start, wall) in zip(turn.cells, turn.cell_spans, strict=False)
            ],
        )
