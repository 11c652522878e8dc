"""``RunStream``: a run whose events are read as they happen (``async for event in rlm.stream(...)``).

The run goes on in its own asyncio task, started on the first read, and writes its events into
an unbounded in-memory channel (events are small and one per call, turn or cell at most). The
task ends with the run. Reading stops after the root run's terminal event; the outcome stays on
``.result`` / ``.error``. Leaving an ``async with`` block, :meth:`RunStream.aclose`, or dropping
the stream cancels the run, so nobody pays for a run whose reader went away.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from types import TracebackType

import anyio

from .events import AnswerReady, EventSink, RunEvent, RunFailed
from .result import RLMResult

__all__ = ["RunStream"]


class RunStream:
    """The events of one run, in order; see :meth:`rlmflow.RLM.stream`."""

    def __init__(self, start: Callable[[EventSink], Awaitable[RLMResult]]) -> None:
        self._start = start
        self._send, self._receive = anyio.create_memory_object_stream[RunEvent](math.inf)
        self._task: asyncio.Task[None] | None = None
        self.result: RLMResult | None = None
        """The run's result, once it ended with an answer."""
        self.error: BaseException | None = None
        """Why the run ended without an answer, once it did."""
        self._ended = False  # the root run's AnswerReady or RunFailed was sent

    def _sink(self, event: RunEvent) -> None:
        if event.depth == 0 and isinstance(event, AnswerReady | RunFailed):
            self._ended = True
        try:
            self._send.send_nowait(event)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the reader has gone: the run is being cancelled

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
            self._send.close()

    def _ensure_started(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drive(), name="rlmflow-run-stream")

    def __aiter__(self) -> RunStream:
        return self

    async def __anext__(self) -> RunEvent:
        self._ensure_started()
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._receive.close()
            raise StopAsyncIteration from None

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
        self._receive.close()
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
