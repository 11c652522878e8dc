"""What a run leaves behind while it goes: call records, live progress, logs, trajectory, events.

One :class:`RunRecorder` per run. It never decides anything about the run; it only writes down
what happened, so the loops, the bridge and the lifecycle can change without touching it. Its
:meth:`~RunRecorder.record` is the callback the Dispatcher reports each finished call to.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from opentelemetry import trace

from .._text import traceback_summary
from ..dispatch.records import CallRecord
from ..durable.journal import RecordedTurn
from ..durable.keys import text_digest
from ..durable.memory import CallMemory
from ..events import AnswerReady, Diverged, EventSink, RunEvent, RunFailed, RunStarted, SubCallDone
from ..result import RLMResult, Turn
from ..telemetry.logs import get_logger
from ..telemetry.trajectory import Trajectory
from .state import RunState

__all__ = ["RunRecorder"]

_logger = get_logger("rlmflow")
_CALL_FIELDS = tuple(f.name for f in fields(CallRecord))


class RunRecorder:
    """Writes one run's record: calls, progress counters, log records, trajectory and events."""

    def __init__(self, state: RunState, *, trajectory: Trajectory | None, sink: EventSink | None) -> None:
        self._state = state
        self._trajectory = trajectory
        self.sink = sink
        """Where this run's events go; its children's go there too."""

    def emit(self, event_type: type[RunEvent], **fields: Any) -> None:
        """Send an event to the sink, if any (a failing sink is logged, never fatal)."""
        if self.sink is None:
            return
        state = self._state
        state.tree.events += 1
        try:
            self.sink(event_type(run_id=state.run_id, depth=state.depth, at=time.time(), seq=state.tree.events,
                                 **fields))
        except Exception:
            _logger.exception("event sink failed", event=event_type.kind)

    def record(self, call: CallRecord) -> None:
        """One finished model call (root or sub) of this run."""
        state = self._state
        state.tree.calls.append(call)
        state.tree.usage.add(call)
        if self._trajectory is not None:
            # a flat record's fields as they are: dataclasses.asdict deep-copies each one (about 10 us a call)
            self._trajectory.event(
                "call", run_id=state.run_id, **{name: getattr(call, name) for name in _CALL_FIELDS}
            )
        progress = state.progress
        if call.role != "root":  # the display counts sub-calls; root turns have their own counter
            if call.error is None:
                progress.calls_done += 1
            else:
                progress.calls_failed += 1
        progress.input_tokens += call.input_tokens
        progress.output_tokens += call.output_tokens
        progress.cost_usd += call.cost_usd or 0.0
        if self.sink is not None:  # most runs have no sink: skip building the event's fields
            self.emit(
                SubCallDone, role=call.role, model=call.model, input_tokens=call.input_tokens,
                output_tokens=call.output_tokens, cost_usd=call.cost_usd, duration=call.duration, error=call.error,
                cache_read_tokens=call.cache_read_tokens, cache_write_tokens=call.cache_write_tokens,
                source=call.source,
            )

    def started(self, *, context_hash: str, context_chars: int, root_model: str, sub_model: str) -> None:
        state = self._state
        _logger.info("run started", query_chars=len(state.query), context_chars=context_chars,
                     root=root_model, sub=sub_model)
        # a child's query is sandbox text (it may quote the document): events say only how long it is
        query = state.query if state.depth == 0 else ""
        self.emit(RunStarted, query=query, query_chars=len(state.query), context_chars=context_chars,
                  root_model=root_model, sub_model=sub_model, parent_run_id=state.parent_run_id,
                  metadata=dict(state.options.metadata))
        memory = state.tree.memory
        if state.depth == 0 and memory is not None and memory.writes is not None:
            memory.writes.run_started(
                state.run_id, query=state.query, context_sha256=context_hash, context_chars=context_chars,
                settings={"root": root_model, "sub": sub_model, "max_turns": state.options.max_turns,
                          "max_depth": state.options.max_depth, "metadata": dict(state.options.metadata),
                          **({"forked_from": memory.forked_from[0], "forked_at_turn": memory.forked_from[1]}
                             if memory.forked_from is not None else {})},
            )
        trajectory = self._trajectory
        if trajectory is not None:
            context = state.context
            kind = "str" if isinstance(context, str) else "dict" if isinstance(context, Mapping) else "list"
            documents = 1 if isinstance(context, str) else len(context)
            trajectory.context(context_hash, {"chars": context_chars, "kind": kind, "documents": documents})
            trajectory.event(
                "run_start", run_id=state.run_id, parent_run_id=state.parent_run_id, depth=state.depth,
                t=time.time(), query=trajectory.cap(state.query), context_sha256=context_hash,
                root_model=root_model, sub_model=sub_model, trace_id=state.trace_id,
                metadata=dict(state.options.metadata),
            )

    def finished(self, result: RLMResult | None, error: BaseException | None) -> None:
        state = self._state
        duration = time.monotonic() - state.started
        turns = len(state.transcript)
        if error is None and result is not None:
            _logger.info("run finished", turns=turns, duration_s=round(duration, 3))
            self.emit(AnswerReady, answer=result.answer, turns=turns, cost_usd=result.cost_usd, duration=duration,
                      limited=result.limited)
        else:
            _logger.warning("run failed", error=type(error).__name__, turns=turns)
            message = str(getattr(error, "message", None) or error or "")
            self.emit(RunFailed, error=type(error).__name__, message=message[:500], turns=turns)
        memory = state.tree.memory
        if state.depth == 0 and memory is not None and memory.writes is not None and result is not None:
            memory.writes.run_ended(state.run_id, status="done", answer=result.answer, error=None)
        elif state.depth == 0 and memory is not None and memory.writes is not None and isinstance(error, Exception):
            # still resumable (with a larger budget, a fixed model...): only an answer ends a run's record
            memory.writes.run_ended(state.run_id, status="failed", answer=None, error=type(error).__name__)
        trajectory = self._trajectory
        if trajectory is not None:
            usage, cost = state.tree.usage.summary()
            trajectory.event(
                "run_end", run_id=state.run_id, depth=state.depth, t=time.time(), duration=duration,
                answer=trajectory.cap(result.answer) if result else None,
                error=type(error).__name__ if error else None, turns=turns,
                usage={model: asdict(u) for model, u in usage.items()}, cost_usd=cost,
            )
            trajectory.flush()

    def turn(self, turn: Turn) -> None:
        state = self._state
        state.transcript.append(turn)
        if state.depth == 0 and state.tree.memory is not None:
            self._journal_turn(turn, state.tree.memory)
        error = next((traceback_summary(c.error)[:200] for c in turn.cells if c.error), None)
        _logger.info("turn finished", turn=turn.index, cells=len(turn.cells), duration_s=round(turn.duration, 3),
                     error=error)
        trajectory = self._trajectory
        if trajectory is None:
            return
        trajectory.event(
            "turn", run_id=state.run_id, depth=state.depth, turn=turn.index, t=turn.started_at,
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

    def _journal_turn(self, turn: Turn, memory: CallMemory) -> None:
        """Write the root turn's digests; report the first that differs from its record."""
        state = self._state
        recorded_turn = RecordedTurn("", turn.index, text_digest("\n".join(turn.code)), text_digest(turn.feedback))
        before = memory.turns.get(turn.index)
        differs = before is not None and before.output_sha256 != recorded_turn.output_sha256
        if differs and state.tree.diverged_at is None:
            state.tree.diverged_at = turn.index
            _logger.warning("resumed run diverged", turn=turn.index)
            trace.get_current_span().add_event("rlm.resume.diverged", {"rlm.turn": turn.index})
            self.emit(Diverged, turn=turn.index)
        if memory.writes is not None:
            memory.writes.turn_done(state.run_id, recorded_turn)
