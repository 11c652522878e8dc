"""The Strands Agents root style: a strands ``Agent`` drives the run through one Python tool.

The reference architecture: the root is a strands ``Agent`` whose single tool,
``execute_python``, runs code in the run's sandbox, where ``context``, ``llm_query_many``,
``rlm_query`` and ``FINAL`` are the same as in the default (code-block) root style. One Agent is
built per run, with no console callback handler, strands' own retries off (the Dispatcher
retries) and every model call of the Agent going through the run's Dispatcher, ledger and lane
share (:class:`~rlmflow.models.strands.DispatchedModel` at root priority, through the run's
:class:`~rlmflow._run.calls.CallScope`: journaled and cached as the code style's root calls are). Each tool call is one
turn, run by the same :class:`~rlmflow._run.cells.CellRunner` as the code-block loop's cells, so
both styles return the same :class:`RLMResult`, with the same budgets, events and spans.

Select it with ``RLM(root="strands:bedrock:<model-id>")`` (or ``root_style="strands"`` with a
strands ``Model`` as ``root``) or ``rlmflow run --root strands:bedrock:<model-id>``.

strands reads its tracer from a process-wide singleton built on the global tracer provider. So
that its spans nest under the run's (and reach the RLM's own ``tracer_provider``), the first
strands run installs a routing tracer in that singleton: inside a run it hands spans to the
run's tracer, elsewhere to exactly the tracer strands would have used.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

from .. import prompts
from .._exceptions import BudgetExceededError, ConfigurationError, NoAnswerError
from ..dispatch.limits import Priority
from ..models.strands import DispatchedModel, StrandsModel
from ..result import RLMResult, Turn
from ..sandbox.base import SandboxSession
from .calls import CallScope
from .cells import CellRunner
from .settings import RunSettings
from .state import RunState

__all__ = ["TOOL_INSTRUCTIONS", "StrandsRootLoop"]

TOOL_INSTRUCTIONS = """
You run Python with the `execute_python` tool (one call per step; give it the code only, no
```repl fences). Variables persist between calls. The answer must be submitted with FINAL(answer)
inside the code you run; once FINAL is called the run ends.
"""

_RUN_TRACER: contextvars.ContextVar[trace.Tracer | None] = contextvars.ContextVar("rlmflow_strands_tracer",
                                                                                  default=None)


class _RoutingTracer(trace.Tracer):
    """strands' tracer: the current run's tracer inside a strands root run, else strands' own."""

    def __init__(self, fallback: trace.Tracer) -> None:
        self.fallback = fallback

    def _target(self) -> trace.Tracer:
        return _RUN_TRACER.get() or self.fallback

    # The Tracer API, forwarded as called (its signature belongs to opentelemetry).
    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._target().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._target().start_as_current_span(*args, **kwargs)


@contextmanager
def _strands_spans_to(tracer: trace.Tracer) -> Iterator[None]:
    from strands.telemetry.tracer import get_tracer

    singleton = get_tracer()
    if not isinstance(singleton.tracer, _RoutingTracer):
        singleton.tracer = _RoutingTracer(singleton.tracer)
    token = _RUN_TRACER.set(tracer)
    try:
        yield
    finally:
        _RUN_TRACER.reset(token)


class StrandsRootLoop:
    """One run with a strands Agent as the root; each ``execute_python`` call is one turn."""

    def __init__(self, settings: RunSettings, state: RunState, *, calls: CallScope, cells: CellRunner) -> None:
        if not isinstance(settings.root, StrandsModel):
            raise ConfigurationError("the strands root style needs a strands model as root (strands_root_model)")
        self._settings = settings
        self._state = state
        self._calls = calls
        self._cells = cells
        self._root = settings.root
        self._turns = 0
        self._answer: str | None = None
        self._told_budget = False

    async def __call__(self, session: SandboxSession) -> RLMResult:
        from strands import Agent, tool

        settings, state = self._settings, self._state
        max_turns = state.options.max_turns
        if state.depth == 0:
            state.progress.max_turns = max_turns
        agent: Any = None

        @tool(name="execute_python")
        async def execute_python(code: str) -> str:
            """Run Python code in the persistent sandbox where `context` holds the document; returns its output.

            Args:
                code: Python source to run (no markdown fences).
            """
            shown = await self._turn(session, code, max_turns)
            if self._answer is not None:
                agent.cancel(message="FINAL received", after_current_tools=True)
                return shown + "\nFINAL received: the run is over."
            stop = state.budget_stop
            if stop is not None:  # told once to answer from what it has; the next call is its last
                if self._told_budget:
                    agent.cancel(message="budget spent", after_current_tools=True)
                self._told_budget = True
                return shown + f"\nThe run's budget is spent: {stop.message}\nCall FINAL(answer) now."
            if self._turns >= max_turns:
                agent.cancel(message="out of turns", after_current_tools=True)
            return shown

        system, opening = prompts.opening_messages(
            settings.system_prompt, state.context, state.query, start=prompts.START_WITH_TOOL,
            sub_max_tokens=settings.sub_max_tokens, output_cap=settings.max_feedback_chars,
            aliases=list(settings.sub_models),
        )
        scope = self._calls
        model = DispatchedModel(
            self._root.strands_model, dispatcher=scope.dispatcher, ledger=scope.ledger, share=scope.share,
            priority=Priority.ROOT, depth=scope.depth, max_tokens=settings.root_max_tokens, record=scope.record,
            capture=scope.capture, ask=scope.ask_root,  # journaled and cached as the code style's root calls
        )
        agent = Agent(
            model=model,
            tools=[execute_python],
            system_prompt=system + TOOL_INSTRUCTIONS,
            callback_handler=None,  # strands would print every token to stdout
            retry_strategy=None,  # the Dispatcher owns retries
            name="rlm-root",
        )
        with _strands_spans_to(settings.tracer):
            state.progress.phase = "root model thinking"
            await agent.invoke_async(opening)
        if self._answer is not None:
            state.progress.phase = "done"
            return state.result(self._answer)
        if state.budget_stop is not None:
            stop = state.budget_stop
            raise BudgetExceededError(stop.message, limit=stop.limit, spent=stop.spent)
        raise NoAnswerError(
            f"the strands root ended after {self._turns} tool calls without calling FINAL",
            partial=state.result(""),
        )

    async def _turn(self, session: SandboxSession, code: str, max_turns: int) -> str:
        """One tool call as one turn; what the tool returns to the Agent."""
        self._turns += 1
        turn = self._turns
        started, wall = time.monotonic(), time.time()
        with self._cells.turn(turn, max_turns):
            self._state.progress.phase = "running code"
            ran = await self._cells.run(session, code, turn=turn)
        self._cells.finish_turn(Turn(turn, code, [code], ran.shown, time.monotonic() - started, [ran.result],
                                     started_at=wall, cell_spans=[(ran.started_at, ran.seconds)]))
        if ran.result.final is not None:
            self._answer = await self._cells.answer(ran.result.final)
        return ran.shown
