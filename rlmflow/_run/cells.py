"""Turns and cells as both root styles run them: spans, events, progress and what the root reads.

A :class:`CellRunner` runs one cell of root-model code in the run's sandbox session inside an
``execute_code`` span, emits the cell's events, and turns its result into the feedback the root
model reads. The code-block loop and the strands loop share it, so a turn looks the same in
traces, events and transcripts whichever style produced it. While a cell runs, its span is
what :meth:`CellRunner.span_context` returns: the bridge parents the cell's sub-calls on it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio.to_thread
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext

from .. import prompts
from .._text import sanitize_text
from ..events import CellFinished, CodeSubmitted, TurnStarted
from ..result import Turn
from ..sandbox.base import CellResult, SandboxSession
from ..telemetry import attributes as attr
from ..telemetry import spans as span_attributes
from .recorder import RunRecorder
from .settings import RunSettings
from .state import RunState

__all__ = ["CellRunner", "RanCell"]

_SANITIZE_ON_LOOP = 20_000  # characters sanitised on the event loop (~10 ms); more go to a thread


@dataclass(frozen=True, slots=True)
class RanCell:
    """A cell that ran: its result, what the root reads of it, and when it ran (wall clock)."""

    result: CellResult
    shown: str
    started_at: float
    seconds: float


class CellRunner:
    """Runs one run's cells and frames its turns; one per run."""

    def __init__(self, settings: RunSettings, state: RunState, recorder: RunRecorder) -> None:
        self._settings = settings
        self._state = state
        self._recorder = recorder
        self._span_context: OtelContext | None = None

    def span_context(self) -> OtelContext | None:
        """The span of the cell running now (``None`` between cells)."""
        return self._span_context

    @contextmanager
    def turn(self, index: int, max_turns: int) -> Iterator[None]:
        """One root turn: counted, announced, and spanned (``rlm.turn``)."""
        state = self._state
        if state.depth == 0:
            state.progress.turn = index
        self._recorder.emit(TurnStarted, turn=index, max_turns=max_turns)
        with self._settings.tracer.start_as_current_span(
            attr.SPAN_TURN, attributes=span_attributes.turn_start(turn=index, depth=state.depth)
        ):
            yield

    def finish_turn(self, turn: Turn) -> None:
        """Put a finished turn in the transcript (and the trajectory, the log)."""
        self._recorder.turn(turn)

    async def run(self, session: SandboxSession, code: str, *, turn: int) -> RanCell:
        """Run ``code`` in ``session``; the result with the feedback the root model will read."""
        self._recorder.emit(CodeSubmitted, turn=turn, code=code)
        started_at = time.time()
        cell = await self._execute(session, code)
        shown = prompts.format_cell_feedback(cell, limit=self._settings.max_feedback_chars)
        self._recorder.emit(
            CellFinished, turn=turn, output=shown, output_chars=cell.output_chars,
            error=cell.error, duration=cell.duration, restarted=cell.restarted,
        )
        return RanCell(cell, shown, started_at, time.time() - started_at)

    async def _execute(self, session: SandboxSession, code: str) -> CellResult:
        settings, state = self._settings, self._state
        capture = settings.capture_content
        with settings.tracer.start_as_current_span(
            attr.SPAN_EXECUTE, attributes=span_attributes.cell_start(depth=state.depth, code=code, capture=capture),
        ) as span:
            self._span_context = trace.set_span_in_context(span)
            try:
                cell = await session.execute(code)
            finally:
                self._span_context = None
            span.set_attributes(span_attributes.cell_end(
                output=cell.output, error=cell.error, duration=cell.duration, output_chars=cell.output_chars,
                restarts=session.restarts, capture=capture,
            ))
            state.progress.sandbox_restarts = max(state.progress.sandbox_restarts, session.restarts)
            return cell

    async def answer(self, final: str) -> str:
        """The answer as the caller gets it: length capped, then control characters escaped.

        Cut before it is sanitised, so its size is bounded whatever the sandbox sent; a long one is
        sanitised off the event loop (about half a second per million characters).
        """
        limit = self._settings.bridge_limits.max_answer_chars
        text = str(final)
        head = text[:limit]
        if len(head) > _SANITIZE_ON_LOOP:
            answer = await anyio.to_thread.run_sync(sanitize_text, head)
        else:
            answer = sanitize_text(head)
        if len(text) > limit or len(answer) > limit:
            answer = answer[:limit] + f"\n[answer cut at {limit:,} of {len(text):,} characters]"
        return answer
