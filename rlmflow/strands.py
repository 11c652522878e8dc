"""The Strands Agents root style: a strands ``Agent`` drives the run through one Python tool.

The reference architecture: the root is a strands ``Agent`` whose single tool,
``execute_python``, runs code in the run's sandbox, where ``context``, ``llm_query_many``,
``rlm_query`` and ``FINAL`` are the same as in the default (code-block) root style. One Agent is
built per run, with no console callback handler, strands' own retries off (the Dispatcher
retries) and every model call of the Agent going through the run's Dispatcher, ledger and lane
share (:class:`~rlmflow.models.strands.DispatchedModel` at root priority). Both root styles
return the same :class:`RLMResult`, with the same budgets, events and spans.

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

from ._exceptions import ConfigurationError, NoAnswerError
from .dispatch.limits import Priority
from .events import CellFinished, CodeSubmitted, TurnStarted
from .loop import RootLoop
from .models.strands import DispatchedModel, StrandsModel
from .result import RLMResult, Turn
from .sandbox.base import SandboxSession
from .telemetry import attributes as attr
from .telemetry import spans as span_attributes

__all__ = ["TOOL_INSTRUCTIONS", "StrandsRootLoop", "strands_root_model"]

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


def strands_root_model(spec: object) -> StrandsModel:
    """The root of a strands-style run from ``strands:bedrock:<id>[@region]``, a strands Model or a StrandsModel.

    Raises ConfigurationError for anything else.
    """
    from strands.models.model import Model as StrandsBaseModel

    if isinstance(spec, StrandsModel):
        return spec
    if isinstance(spec, StrandsBaseModel):
        return StrandsModel(spec)
    if not isinstance(spec, str):
        raise ConfigurationError(f"the strands root style needs a strands Model or a strands: string, not {spec!r}")
    inner = spec.removeprefix("strands:")
    from .models.registry import parse_model_string

    provider, name, where = parse_model_string(inner)
    if provider != "bedrock":
        raise ConfigurationError(
            f"{spec!r}: the strands root style builds strands' BedrockModel (strands:bedrock:<model-id>); "
            "for another provider pass a strands Model object as root"
        )
    from botocore.config import Config
    from strands.models.bedrock import BedrockModel as StrandsBedrock

    model = StrandsBedrock(
        model_id=name,
        region_name=where,
        streaming=True,
        # the Dispatcher retries; botocore's own retry loop would hide throttles from the lane
        boto_client_config=Config(retries={"total_max_attempts": 1}, read_timeout=300),
    )
    return StrandsModel(model)


class StrandsRootLoop(RootLoop):
    """One run with a strands Agent as the root; each ``execute_python`` call is one turn."""

    async def __call__(self, session: SandboxSession) -> RLMResult:
        from strands import Agent, tool

        run = self._run
        rlm = run.rlm
        if not isinstance(rlm.root, StrandsModel):
            raise ConfigurationError("the strands root style needs a strands model as root (see strands_root_model)")
        max_turns = run.options.max_turns
        if run.depth == 0:
            run.progress.max_turns = max_turns
        system, opening = self._strands_opening()
        model = DispatchedModel(
            rlm.root.strands_model, dispatcher=rlm.dispatcher, ledger=run.ledger, share=run.share,
            priority=Priority.ROOT, depth=run.depth, max_tokens=rlm.root_max_tokens, record=run.recorder.record,
            capture=rlm.capture_content,
        )
        state: dict[str, Any] = {"turn": 0, "answer": None}
        agent: Any = None

        @tool(name="execute_python")
        async def execute_python(code: str) -> str:
            """Run Python code in the persistent sandbox where `context` holds the document; returns its output.

            Args:
                code: Python source to run (no markdown fences).
            """
            state["turn"] += 1
            turn_index = state["turn"]
            if run.depth == 0:
                run.progress.turn = turn_index
            run.recorder.emit(TurnStarted, turn=turn_index, max_turns=max_turns)
            started, wall = time.monotonic(), time.time()
            with rlm._tracer.start_as_current_span(
                attr.SPAN_TURN, attributes=span_attributes.turn_start(turn=turn_index, depth=run.depth)
            ):
                run.progress.phase = "running code"
                run.recorder.emit(CodeSubmitted, turn=turn_index, code=code)
                cell = await self._execute_cell(session, code)
                shown = self._feedback(cell)
                run.recorder.emit(
                    CellFinished, turn=turn_index, output=shown, output_chars=cell.output_chars,
                    error=cell.error, duration=cell.duration, restarted=cell.restarted,
                )
            run.recorder.turn(Turn(turn_index, code, [code], shown, time.monotonic() - started, [cell],
                                   started_at=wall, cell_spans=[(wall, cell.duration)]))
            if cell.final is not None:
                state["answer"] = self._answer(cell.final)
                agent.cancel(message="FINAL received", after_current_tools=True)
                return shown + "\nFINAL received: the run is over."
            if turn_index >= max_turns:
                agent.cancel(message="out of turns", after_current_tools=True)
            return shown

        agent = Agent(
            model=model,
            tools=[execute_python],
            system_prompt=system,
            callback_handler=None,  # strands would print every token to stdout
            retry_strategy=None,  # the Dispatcher owns retries
            name="rlm-root",
        )
        with _strands_spans_to(rlm._tracer):
            run.progress.phase = "root model thinking"
            await agent.invoke_async(opening)
        if state["answer"] is not None:
            run.progress.phase = "done"
            return run.result(state["answer"])
        raise NoAnswerError(
            f"the strands root ended after {state['turn']} tool calls without calling FINAL",
            partial=run.result(""),
        )

    def _strands_opening(self) -> tuple[str, str]:
        system, user = self._opening()
        return system.content + TOOL_INSTRUCTIONS, user.content.replace(
            "with code in a ```repl block", "with the execute_python tool"
        )

    def _feedback(self, cell: Any) -> str:
        from . import prompts

        return prompts.format_cell_feedback(cell, limit=self._run.rlm.max_feedback_chars)
