"""One run from start to end: its parts assembled, its span, its deadline, and how it ends.

:func:`execute_run` is the top of the run package. It builds a run's parts from the frozen
:class:`~rlmflow._run.settings.RunSettings` and the run's :class:`~rlmflow._run.state.RunState`
(recorder, call scope, cell runner, bridge, loop), opens the sandbox session, and turns every
way a run can end into a result or an error carrying ``.partial``. A child run (``rlm_query``)
is the same function one level deeper: the bridge receives it as its ``spawn`` callable, so
nothing below this module knows how children are made.
"""

from __future__ import annotations

import time

import anyio
import anyio.to_thread
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext

from .._exceptions import BudgetExceededError, InternalError, RLMError
from .._util import single_exception
from ..context import context_digest, context_size
from ..events import EventSink
from ..result import RLMResult
from ..sandbox.base import Context, SandboxReport
from ..telemetry import attributes as attr
from ..telemetry import spans as span_attributes
from ..telemetry.logs import bound_contextvars
from .bridge import HostBridge
from .calls import CallScope
from .cells import CellRunner
from .loop import RootLoop
from .recorder import RunRecorder
from .settings import RunSettings
from .state import RunState

__all__ = ["execute_run"]


async def execute_run(
    settings: RunSettings, state: RunState, *, events: EventSink | None, parent: OtelContext | None
) -> RLMResult:
    """Run to the end. Errors carry ``.partial``; so does a cancellation, which is re-raised."""
    return await _Lifecycle(settings, state, events).execute(parent)


class _Lifecycle:
    """One run's parts, wired: values down (settings, state), callbacks up (record, spawn)."""

    def __init__(self, settings: RunSettings, state: RunState, events: EventSink | None) -> None:
        self.settings = settings
        self.state = state
        self.recorder = RunRecorder(state, trajectory=settings.trajectory, sink=events)
        self.calls = CallScope(
            dispatcher=settings.dispatcher, ledger=state.ledger, share=state.share, depth=state.depth,
            record=self.recorder.record, capture=settings.capture_content, memory=state.tree.memory,
            cache=settings.cache,
        )
        self.cells = CellRunner(settings, state, self.recorder)
        self.bridge = HostBridge(
            settings, state, calls=self.calls, recorder=self.recorder, spawn=self.spawn_child,
            cell_span=self.cells.span_context,
        )

    async def spawn_child(self, query: str, context: Context | None) -> RLMResult:
        """Run ``rlm_query``'s child: one level deeper, on this run's ledger and lane share."""
        child = self.state.child(query, context)
        return await execute_run(self.settings, child, events=self.recorder.sink, parent=self.cells.span_context())

    async def execute(self, parent: OtelContext | None) -> RLMResult:
        settings, state = self.settings, self.state
        context_chars = context_size(state.context)
        # hashing a large document takes a while: not on the event loop
        context_hash = await anyio.to_thread.run_sync(context_digest, state.context)
        attributes = span_attributes.run_start(
            run_id=state.run_id, depth=state.depth, root_model=settings.root.name, context_chars=context_chars,
            context_sha256=context_hash, query=state.query, capture=settings.capture_content,
        )
        for key, value in state.options.metadata.items():
            attributes[f"{attr.RLM_METADATA_PREFIX}{key}"] = value
        with settings.tracer.start_as_current_span(
            attr.SPAN_RUN, context=parent, kind=trace.SpanKind.INTERNAL, attributes=attributes,
            record_exception=False, set_status_on_exception=False,  # _ended_by says it, cancellation too
        ) as span:
            span_context = span.get_span_context()
            if span_context.is_valid:
                state.trace_id = format(span_context.trace_id, "032x")
            with bound_contextvars(run_id=state.run_id, depth=state.depth):
                self.recorder.started(context_hash=context_hash, context_chars=context_chars,
                                      root_model=settings.root.name, sub_model=settings.sub.name)
                try:
                    result = await self._within_deadline()
                except BaseException as exc:
                    _ended_by(span, exc)
                    raise
                finally:
                    spent = state.ledger.spent  # this run and its children, however it ended
                    # the cache's share is counted per run tree: the top run's span has it
                    usage = state.tree.usage.summary()[0].values() if state.depth == 0 else ()
                    span.set_attributes(span_attributes.run_totals(
                        calls=spent.calls, input_tokens=spent.input_tokens, output_tokens=spent.output_tokens,
                        cost_usd=spent.cost_usd, cache_read_tokens=sum(u.cache_read_tokens for u in usage),
                        cache_write_tokens=sum(u.cache_write_tokens for u in usage),
                    ))
                span.set_attributes(span_attributes.run_end(answer=result.answer, capture=settings.capture_content))
                return result

    async def _within_deadline(self) -> RLMResult:
        """The run in its sandbox under its deadline; every way it ends is recorded."""
        state = self.state
        deadline = state.options.deadline
        try:
            with single_exception():
                if deadline is None:
                    result = await self._in_sandbox()
                else:
                    with anyio.fail_after(max(0.0, deadline - (time.monotonic() - state.started))):
                        result = await self._in_sandbox()
        except TimeoutError:
            error = BudgetExceededError(
                f"the run's deadline of {deadline:g} s passed; in-flight calls were cancelled",
                limit="deadline",
                spent={"seconds": time.monotonic() - state.started},
            )
            error.partial = state.result("")
            self.recorder.finished(None, error)
            raise error from None
        except RLMError as exc:
            if exc.partial is None:
                exc.partial = state.result("")
            self.recorder.finished(None, exc)
            raise
        except Exception as exc:  # only RLMErrors leave a run, each with what was paid for
            internal = InternalError(f"the run stopped on an unexpected {type(exc).__name__}: {str(exc)[:300]}")
            internal.partial = state.result("")
            self.recorder.finished(None, internal)
            raise internal from exc
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                # Cancellation must propagate; the caller still learns what was paid for.
                exc.partial = state.result("")  # type: ignore[attr-defined]
            self.recorder.finished(None, exc)
            raise
        self.recorder.finished(result, None)
        return result

    async def _in_sandbox(self) -> RLMResult:
        settings, state = self.settings, self.state
        async with settings.sandbox.session(state.context, self.bridge) as session:
            report = getattr(session, "report", None)
            if isinstance(report, SandboxReport):
                state.sandbox_report = report
                trace.get_current_span().set_attributes(report.attributes())  # the run's span
            if settings.root_style == "strands":
                from .strands_loop import StrandsRootLoop

                return await StrandsRootLoop(settings, state, calls=self.calls, cells=self.cells)(session)
            return await RootLoop(settings, state, calls=self.calls, cells=self.cells, recorder=self.recorder)(session)


def _ended_by(span: trace.Span, exc: BaseException) -> None:
    """Mark a run's span as failed: status, ``error.type``, the cap that stopped it."""
    if isinstance(exc, anyio.get_cancelled_exc_class()):
        span.set_attributes(span_attributes.run_failed(error_type="cancelled", limit=None))
        span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled: the caller cancelled the run"))
        return
    limit = exc.limit if isinstance(exc, BudgetExceededError) else None
    span.set_attributes(span_attributes.run_failed(error_type=type(exc).__name__, limit=limit))
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, str(getattr(exc, "message", None) or exc)[:200]))
