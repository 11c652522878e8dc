"""One run's lifecycle: its state, its span, its deadline, and how it ends.

A :class:`_Run` ties together the three parts of a run that change for different reasons: the
root loop's policy (:mod:`rlmflow.loop`), the host side of the sandbox bridge
(:mod:`rlmflow.bridge`) and the record of what happened (:mod:`rlmflow.recording`). A child run
(``rlm_query``) is a ``_Run`` one level deeper that draws on its parent's ledger and shares its
fair-share slot on the lanes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext

from ._exceptions import BudgetExceededError, RLMError
from ._util import single_exception
from .bridge import HostBridge
from .context import context_digest, context_size
from .dispatch.budget import BudgetLedger
from .dispatch.dispatcher import CallRecord
from .dispatch.lane import RunShare
from .loop import RootLoop
from .recording import EventSink, RunRecorder, UsageTally
from .result import RLMResult, RunProgress, Turn
from .sandbox.base import Context, SandboxReport
from .telemetry import attributes as attr
from .telemetry import spans as span_attributes
from .telemetry.logs import bound_contextvars

if TYPE_CHECKING:
    from .engine import RLM


@dataclass(frozen=True, slots=True)
class _RunOptions:
    """The settings of one run: the RLM's defaults with the caller's per-run overrides applied."""

    max_turns: int
    max_depth: int
    deadline: float | None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class _RunTree:
    """State shared by a root run and all its children."""

    calls: list[CallRecord] = field(default_factory=list)
    usage: UsageTally = field(default_factory=UsageTally)  # what ``calls`` add up to
    sub_calls: int = 0


class _Run:
    """The state of one run (root or child)."""

    def __init__(
        self,
        rlm: RLM,
        context: Context,
        query: str,
        *,
        options: _RunOptions,
        ledger: BudgetLedger,
        share: RunShare,
        progress: RunProgress,
        depth: int = 0,
        shared: _RunTree | None = None,
        parent_run_id: str | None = None,
        events: EventSink | None = None,
    ) -> None:
        self.rlm = rlm
        self.context = context
        self.query = query
        self.options = options
        self.ledger = ledger
        self.share = share
        self.progress = progress
        self.depth = depth
        self.shared = shared or _RunTree()
        self.calls = self.shared.calls
        self.parent_run_id = parent_run_id
        self.run_id = uuid.uuid4().hex[:16]
        self.transcript: list[Turn] = []
        self.cell_span_context: OtelContext | None = None
        self.started = time.monotonic()
        self.trace_id: str | None = None
        self.recorder = RunRecorder(self, events)
        self.bridge = HostBridge(self)
        self._events = events
        self._session_report: SandboxReport | None = None

    def result(self, answer: str) -> RLMResult:
        """The run so far as a result (an empty answer for the ``.partial`` of an error)."""
        usage, cost = self.shared.usage.summary()
        return RLMResult(
            answer=answer,
            turns=len(self.transcript),
            usage=usage,
            cost_usd=cost,
            duration=time.monotonic() - self.started,
            trace_id=self.trace_id,
            run_id=self.run_id,
            calls=list(self.calls),
            transcript=list(self.transcript),
            spent=self.ledger.spent,
            budget=self.ledger.budget,
            metadata=dict(self.options.metadata),
            sandbox=self._session_report,
            overrun=self.ledger.overrun,
        )

    async def spawn_child(self, query: str, context: Context | None) -> RLMResult:
        """Run ``rlm_query``'s child: one level deeper, on this run's ledger and lane share."""
        child = _Run(
            self.rlm,
            context if context is not None else self.context,
            query,
            options=replace(self.options, deadline=None),  # this run's deadline scope covers the child
            ledger=self.ledger.child(),
            share=self.share,
            progress=self.progress,
            depth=self.depth + 1,
            shared=self.shared,
            parent_run_id=self.run_id,
            events=self._events,
        )
        return await child.execute(parent=self.cell_span_context)

    async def execute(self, parent: OtelContext | None) -> RLMResult:
        """Run to the end. Errors carry ``.partial``; so does a cancellation, which is re-raised."""
        rlm = self.rlm
        context_chars = context_size(self.context)
        # hashing a large document takes a while: not on the event loop
        context_hash = await anyio.to_thread.run_sync(context_digest, self.context)
        attributes = span_attributes.run_start(
            run_id=self.run_id, depth=self.depth, root_model=rlm.root.name, context_chars=context_chars,
            context_sha256=context_hash, query=self.query, capture=rlm.capture_content,
        )
        for key, value in self.options.metadata.items():
            attributes[f"{attr.RLM_METADATA_PREFIX}{key}"] = value
        with rlm._tracer.start_as_current_span(
            attr.SPAN_RUN, context=parent, kind=trace.SpanKind.INTERNAL, attributes=attributes
        ) as span:
            span_context = span.get_span_context()
            if span_context.is_valid:
                self.trace_id = format(span_context.trace_id, "032x")
            deadline = self.options.deadline
            with bound_contextvars(run_id=self.run_id, depth=self.depth):
                self.recorder.started(context_hash, context_chars)
                try:
                    with single_exception():
                        if deadline is not None:
                            with anyio.fail_after(max(0.0, deadline - (time.monotonic() - self.started))):
                                result = await self._in_sandbox()
                        else:
                            result = await self._in_sandbox()
                except TimeoutError:
                    error = BudgetExceededError(
                        f"the run's deadline of {deadline:g} s passed; in-flight calls were cancelled",
                        limit="deadline",
                        spent={"seconds": time.monotonic() - self.started},
                    )
                    error.partial = self.result("")
                    self.recorder.finished(None, error)
                    raise error from None
                except RLMError as exc:
                    if exc.partial is None:
                        exc.partial = self.result("")
                    self.recorder.finished(None, exc)
                    raise
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        # Cancellation must propagate; the caller still learns what was paid for.
                        exc.partial = self.result("")  # type: ignore[attr-defined]
                    self.recorder.finished(None, exc)
                    raise
                self.recorder.finished(result, None)
                span.set_attributes(span_attributes.run_end(answer=result.answer, capture=rlm.capture_content))
                return result

    async def _in_sandbox(self) -> RLMResult:
        async with self.rlm.sandbox.session(self.context, self.bridge) as session:
            report = getattr(session, "report", None)
            if isinstance(report, SandboxReport):
                self._session_report = report
                trace.get_current_span().set_attributes(report.attributes())  # the run's span
            if self.rlm.root_style == "strands":
                from .strands import StrandsRootLoop

                return await StrandsRootLoop(self)(session)
            return await RootLoop(self)(session)
