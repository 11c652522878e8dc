"""``RunStream``: a run whose events are read as they happen (``async for event in rlm.stream(...)``).

The run goes on in its own asyncio task, started on the first read, and puts its events in a
bounded buffer. The task ends with the run. Reading stops after the root run's terminal event;
the outcome stays on ``.result`` / ``.error``. Leaving an ``async with`` block,
:meth:`RunStream.aclose`, or dropping the stream cancels the run, so nobody pays for a run whose
reader went away.

The run never waits for its reader (it is paying for calls in flight), so the buffer is bounded
by shedding, not by blocking: past ``max_buffered`` events, the per-call and streamed-text events
(``call_done``, ``root_text``) are dropped and counted on :attr:`RunStream.dropped`, while the
run's structure (turns, code, cells, batches) and its end are always kept; they are few. A
reader waiting longer than ``heartbeat`` seconds for the next event gets a
:class:`~rlmflow.events.Heartbeat`, so a proxy or a browser does not take a long call for a dead
connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio

from .events import AnswerReady, AnyRunEvent, EventSink, Heartbeat, RootText, RunEvent, RunFailed, SubCallDone
from .result import RLMResult

__all__ = ["RunStream"]

_SHED_FIRST = (SubCallDone, RootText)  # one per call or per streamed piece: many, and each replaceable


class RunStream:
    """The events of one run, in order; see :meth:`rlmflow.RLM.stream`.

    ``max_buffered``: events held for a slow reader before per-call events are shed;
    ``heartbeat``: seconds of silence after which the reader gets a :class:`Heartbeat`.
    """

    def __init__(
        self,
        start: Callable[[EventSink], Awaitable[RLMResult]],
        *,
        max_buffered: int = 10_000,
        heartbeat: float = 15.0,
    ) -> None:
        if max_buffered < 1 or heartbeat <= 0:
            raise ValueError("max_buffered must be >= 1 and heartbeat > 0")
        self._start = start
        self._max_buffered = max_buffered
        self._heartbeat = heartbeat
        self._buffer: deque[RunEvent] = deque()
        self._wakeup: anyio.Event | None = None
        self._closed = False  # the run ended: no event will come any more
        self._task: asyncio.Task[None] | None = None
        self._ended = False  # the root run's AnswerReady or RunFailed was sent
        self._last: RunEvent | None = None
        self.result: RLMResult | None = None
        """The run's result, once it ended with an answer."""
        self.error: BaseException | None = None
        """Why the run ended without an answer, once it did."""
        self.dropped = 0
        """Per-call and streamed-text events shed because the reader fell behind."""

    def _sink(self, event: RunEvent) -> None:
        if self._closed:
            return  # the reader has gone: the run is being cancelled
        if event.depth == 0 and isinstance(event, AnswerReady | RunFailed):
            self._ended = True
        if len(self._buffer) >= self._max_buffered and isinstance(event, _SHED_FIRST):
            self.dropped += 1
            return
        self._buffer.append(event)
        if self._wakeup is not None:
            self._wakeup.set()

    async def _drive(self) -> None:
        try:
            self.result = await self._start(self._sink)
        except Exception as exc:  # reported by the RunFailed event and kept for wait()
            self.error = exc
            if not self._ended:  # it failed before the run could say so itself
                message = str(getattr(exc, "message", None) or exc)[:500]
                self._sink(RunFailed(run_id="", depth=0, at=time.time(), error=type(exc).__name__, message=message,
                                     turns=0))
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._closed = True  # after its last event: the reader takes what is buffered, then stops
            if self._wakeup is not None:
                self._wakeup.set()

    def _ensure_started(self) -> None:
        if self._task is None:
            self._wakeup = anyio.Event()
            self._task = asyncio.get_running_loop().create_task(self._drive(), name="rlmflow-run-stream")

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> AnyRunEvent:
        self._ensure_started()
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            assert self._wakeup is not None
            with anyio.move_on_after(self._heartbeat) as waited:
                await self._wakeup.wait()
            self._wakeup = anyio.Event()
            if waited.cancelled_caught and not self._buffer and not self._closed:
                last = self._last
                return Heartbeat(run_id=last.run_id if last else "", depth=0, at=time.time(),
                                 seq=last.seq if last else 0, phase="waiting for the run")
        event = self._buffer.popleft()
        self._last = event
        return event  # type: ignore[return-value]  # the run sends only the events of AnyRunEvent

    async def wait(self) -> RLMResult:
        """Read the remaining events, then return the result or raise the run's error."""
        async for _ in self:
            pass
        if self._task is not None:
            await asyncio.wait({self._task})
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        """Cancel the run if it is still going, and wait until it has cleaned up."""
        self._closed = True
        self._buffer.clear()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})

    async def __aenter__(self) -> RunStream:
        self._ensure_started()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        task = self._task
        if task is not None and not task.done():
            task.cancel()
