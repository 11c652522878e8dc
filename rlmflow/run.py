"""One run of the root loop: turns of root-model code in a sandbox until ``FINAL``.

A :class:`_Run` owns its sandbox session, ledger, transcript and trajectory records, and serves
the host calls its sandbox code makes (``llm_query_many``, ``rlm_query_many``, ``budget``). A
child run (``rlm_query``) is a ``_Run`` one level deeper that draws on its parent's ledger and
shares its fair-share slot on the lanes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext

from . import prompts
from ._exceptions import BatchError, BudgetExceededError, NoAnswerError, RLMError
from ._util import single_exception
from .context import context_digest, context_size, validate_context
from .dispatch.budget import BudgetLedger
from .dispatch.dispatcher import CallRecord
from .dispatch.lane import RunShare
from .dispatch.limits import Priority
from .models.base import Message, ModelRequest
from .result import RLMResult, RunProgress, Turn, summarise_usage
from .sandbox.base import CellResult, Context
from .telemetry import attributes as attr
from .telemetry.logs import bound_contextvars, get_logger

if TYPE_CHECKING:
    from .engine import RLM

_logger = get_logger("rlmflow")

class _Run:
    """The state of one run (root or child)."""

    def __init__(
        self,
        rlm: RLM,
        context: Context,
        query: str,
        *,
        depth: int,
        ledger: BudgetLedger,
        share: RunShare,
        progress: RunProgress,
        calls: list[CallRecord] | None = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.rlm = rlm
        self.parent_run_id = parent_run_id
        self.context = context
        self.query = query
        self.depth = depth
        self.ledger = ledger
        self.share = share
        self.progress = progress
        self.answers: dict[tuple[str, str, int], str] = {}  # dedup: (lane, prompt, max_tokens) -> answer
        self.calls: list[CallRecord] = calls if calls is not None else []
        self.run_id = uuid.uuid4().hex[:16]
        self.transcript: list[Turn] = []
        self.cell_span_context: OtelContext | None = None
        self.started = time.monotonic()
        self.trace_id: str | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    def record(self, call: CallRecord) -> None:
        self.calls.append(call)
        if self.rlm.trajectory is not None:
            self.rlm.trajectory.event("call", run_id=self.run_id, **asdict(call))
        progress = self.progress
        if call.role != "root":  # the display counts sub-calls; root turns have their own counter
            if call.error is None:
                progress.calls_done += 1
            else:
                progress.calls_failed += 1
        progress.input_tokens += call.input_tokens
        progress.output_tokens += call.output_tokens
        progress.cost_usd += call.cost_usd or 0.0

    def result(self, answer: str) -> RLMResult:
        usage, cost = summarise_usage(self.calls)
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
        )

    # -- the loop ------------------------------------------------------------------------------
    async def execute(self, parent: OtelContext | None) -> RLMResult:
        rlm = self.rlm
        context_chars = context_size(self.context)
        # hashing a large document takes a while: not on the event loop
        context_hash = await anyio.to_thread.run_sync(context_digest, self.context)
        with rlm._tracer.start_as_current_span(
            attr.SPAN_RUN,
            context=parent,
            kind=trace.SpanKind.INTERNAL,
            attributes={
                attr.GEN_AI_OPERATION_NAME: attr.OPERATION_INVOKE_AGENT,
                attr.GEN_AI_AGENT_NAME: "rlm",
                attr.GEN_AI_REQUEST_MODEL: rlm.root.name,
                attr.RLM_RUN_ID: self.run_id,
                attr.RLM_DEPTH: self.depth,
                attr.RLM_CONTEXT_CHARS: context_chars,
            },
        ) as span:
            span_context = span.get_span_context()
            if span_context.is_valid:
                self.trace_id = format(span_context.trace_id, "032x")
            span.set_attribute(attr.RLM_CONTEXT_SHA256, context_hash)
            deadline = self.ledger.budget.deadline
            with bound_contextvars(run_id=self.run_id, depth=self.depth):
                self._start_record(context_hash, context_chars)
                try:
                    with single_exception():
                        if deadline is not None:
                            with anyio.fail_after(deadline):
                                result = await self._loop()
                        else:
                            result = await self._loop()
                except TimeoutError:
                    error = BudgetExceededError(
                        f"the run's deadline of {deadline:g} s passed; in-flight calls were cancelled",
                        limit="deadline",
                        spent={"seconds": time.monotonic() - self.started},
                    )
                    error.partial = self.result("")
                    self._end_record(None, error)
                    raise error from None
                except RLMError as exc:
                    if exc.partial is None:
                        exc.partial = self.result("")
                    self._end_record(None, exc)
                    raise
                except BaseException as exc:
                    self._end_record(None, exc)
                    raise
                self._end_record(result, None)
                return result

    def _start_record(self, context_hash: str, context_chars: int) -> None:
        _logger.info("run started", query_chars=len(self.query), context_chars=context_chars,
                     root=self.rlm.root.name, sub=self.rlm.sub.name)
        trajectory = self.rlm.trajectory
        if trajectory is not None:
            kind = "str" if isinstance(self.context, str) else "dict" if isinstance(self.context, Mapping) else "list"
            documents = 1 if isinstance(self.context, str) else len(self.context)
            trajectory.context(context_hash, {"chars": context_chars, "kind": kind, "documents": documents})
            trajectory.event(
                "run_start", run_id=self.run_id, parent_run_id=self.parent_run_id, depth=self.depth,
                t=time.time(), query=trajectory.cap(self.query), context_sha256=context_hash,
                root_model=self.rlm.root.name, sub_model=self.rlm.sub.name, trace_id=self.trace_id,
            )

    def _end_record(self, result: RLMResult | None, error: BaseException | None) -> None:
        duration = time.monotonic() - self.started
        if error is None:
            _logger.info("run finished", turns=len(self.transcript), duration_s=round(duration, 3))
        else:
            _logger.warning("run failed", error=type(error).__name__, turns=len(self.transcript))
        trajectory = self.rlm.trajectory
        if trajectory is not None:
            usage, cost = summarise_usage(self.calls)
            trajectory.event(
                "run_end", run_id=self.run_id, depth=self.depth, t=time.time(), duration=duration,
                answer=trajectory.cap(result.answer) if result else None,
                error=type(error).__name__ if error else None, turns=len(self.transcript),
                usage={model: asdict(u) for model, u in usage.items()}, cost_usd=cost,
            )
            trajectory.flush()

    async def _loop(self) -> RLMResult:
        rlm = self.rlm
        progress = self.progress
        max_turns = rlm.max_turns
        if self.depth == 0:
            progress.max_turns = max_turns
        messages: list[Message] = [
            Message(
                "system",
                rlm.system_prompt.format(
                    context_kind=prompts.context_kind(self.context),
                    chunk_hint=4 * rlm.sub_max_tokens * 4,
                    output_cap=rlm.max_feedback_chars,
                ),
            ),
            Message(
                "user",
                f"{prompts.describe_context(self.context)}\n\nQuestion: {self.query}\n\n"
                "Start by looking at `context` with code in a ```repl block.",
            ),
        ]
        last_error: str | None = None
        repeats = 0
        previous_code: list[str] = []
        async with rlm.sandbox.session(self.context, self._bridge) as session:
            for turn_index in range(1, max_turns + 1):
                if self.depth == 0:
                    progress.turn = turn_index
                if turn_index == max_turns:
                    messages.append(Message("user", prompts.LAST_TURN))
                turn_started = time.monotonic()
                turn_wall = time.time()
                cell_spans: list[tuple[float, float]] = []
                with rlm._tracer.start_as_current_span(
                    attr.SPAN_TURN, attributes={attr.RLM_TURN: turn_index, attr.RLM_DEPTH: self.depth}
                ):
                    progress.phase = "root model thinking"
                    response = await rlm.dispatcher.call(
                        rlm.root,
                        ModelRequest(messages=tuple(self._trimmed(messages)), max_tokens=rlm.root_max_tokens),
                        ledger=self.ledger,
                        share=self.share,
                        priority=Priority.ROOT,
                        depth=self.depth,
                        record=self.record,
                        capture=rlm.capture_content,
                    )
                    reply = response.text
                    messages.append(Message("assistant", reply))
                    blocks = prompts.extract_code_blocks(reply)
                    if not blocks:
                        self._add_turn(
                            Turn(turn_index, reply, [], prompts.NO_CODE_NUDGE, time.monotonic() - turn_started,
                                 started_at=turn_wall)
                        )
                        messages.append(Message("user", prompts.NO_CODE_NUDGE))
                        continue
                    feedback: list[str] = []
                    cells: list[CellResult] = []
                    answer: str | None = None
                    progress.phase = "running code"
                    calls_before = progress.calls_done
                    for block in blocks:
                        cell_wall = time.time()
                        cell = await self._execute_cell(session, block)
                        cell_spans.append((cell_wall, time.time() - cell_wall))
                        cells.append(cell)
                        feedback.append(prompts.format_cell_feedback(cell, limit=rlm.max_feedback_chars))
                        if cell.final is not None:
                            answer = cell.final
                            break
                        if cell.error:
                            break  # later blocks usually depend on this one
                    text = "\n".join(feedback)
                    self._add_turn(
                        Turn(turn_index, reply, blocks, text, time.monotonic() - turn_started, cells,
                             started_at=turn_wall, cell_spans=cell_spans)
                    )
                    if answer is not None:
                        progress.phase = "done"
                        return self.result(answer)
                    error_signature = next((c.error.strip().splitlines()[-1] for c in cells if c.error), None)
                    if error_signature is not None and error_signature == last_error:
                        repeats += 1
                    else:
                        repeats = 1 if error_signature else 0
                    last_error = error_signature
                    if repeats >= rlm.max_repeated_errors:
                        raise NoAnswerError(
                            f"stopped after the same error {repeats} times in a row: {error_signature}",
                            partial=self.result(""),
                        )
                    if repeats >= 2:
                        text += (
                            f"\nThis is the same error as before ({repeats} times). Change your approach "
                            "instead of repeating the code."
                        )
                    if previous_code == blocks:
                        text += "\n" + prompts.REPEAT_NUDGE
                    previous_code = blocks
                    left = max_turns - turn_index
                    asked_helper = self.progress.calls_done > calls_before and not any(c.error for c in cells)
                    messages.append(
                        Message("user", prompts.continue_message(text, self.query, left, asked_helper=asked_helper))
                    )
        raise NoAnswerError(
            f"no answer after {max_turns} turns: the root model never called FINAL",
            partial=self.result(""),
        )

    def _add_turn(self, turn: Turn) -> None:
        self.transcript.append(turn)
        _logger.info("turn finished", turn=turn.index, cells=len(turn.cells), duration_s=round(turn.duration, 3),
                     error=next((c.error.strip().splitlines()[-1][:200] for c in turn.cells if c.error), None))
        trajectory = self.rlm.trajectory
        if trajectory is None:
            return
        trajectory.event(
            "turn", run_id=self.run_id, depth=self.depth, turn=turn.index, t=turn.started_at,
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

    def _trimmed(self, messages: list[Message]) -> list[Message]:
        """System and first user message always; then the newest turns that fit the history size."""
        head, rest = messages[:2], messages[2:]
        budget = self.rlm.history_chars - sum(len(m.content) for m in head)
        kept: list[Message] = []
        for message in reversed(rest):
            budget -= len(message.content)
            if budget < 0 and len(kept) >= 2:
                break
            kept.append(message)
        kept.reverse()
        if len(kept) < len(rest):
            if kept and kept[0].role == "user":  # keep assistant/user alternation after the note
                kept = kept[1:]
            omitted = len(rest) - len(kept)
            note = Message("user", f"[{omitted} earlier messages omitted; variables in the sandbox are kept]")
            return [*head, Message("assistant", "(earlier work)"), note, *kept]
        return [*head, *kept]

    async def _execute_cell(self, session: Any, code: str) -> CellResult:
        with self.rlm._tracer.start_as_current_span(attr.SPAN_EXECUTE, attributes={attr.RLM_DEPTH: self.depth}) as span:
            self.cell_span_context = trace.set_span_in_context(span)
            try:
                cell: CellResult = await session.execute(code)
            finally:
                self.cell_span_context = None
            span.set_attribute(attr.RLM_CELL_DURATION_S, cell.duration)
            if self.rlm.capture_content:
                limit = self.rlm.capture_content
                span.set_attribute(attr.RLM_CELL_CODE, code[:limit])
                span.set_attribute(attr.RLM_CELL_OUTPUT, (cell.output + (cell.error or ""))[:limit])
            span.set_attribute(attr.RLM_CELL_OUTPUT_CHARS, cell.output_chars)
            span.set_attribute(attr.RLM_SANDBOX_RESTARTS, session.restarts)
            if cell.error:
                span.set_attribute(attr.ERROR_TYPE, cell.error.strip().splitlines()[-1].split(":")[0][:100])
            self.progress.sandbox_restarts = max(self.progress.sandbox_restarts, session.restarts)
            return cell

    # -- the host functions sandbox code calls -------------------------------------------------
    async def _bridge(self, fn: str, args: dict[str, Any]) -> Any:
        if fn == "llm_query_many":
            return await self._llm_query_many(
                [str(p) for p in args.get("prompts") or []], args.get("model"), args.get("max_tokens")
            )
        if fn == "rlm_query_many":
            return await self._rlm_query_many(list(args.get("items") or []))
        if fn == "budget":
            return self._budget_view()
        raise RLMError(f"unknown host function {fn!r}")

    async def _llm_query_many(self, prompts_: list[str], model: str | None, max_tokens: int | None) -> list[str]:
        rlm = self.rlm
        sub = rlm.resolve_model(model) if model else rlm.sub
        limit = int(max_tokens) if max_tokens else rlm.sub_max_tokens
        lane_key = rlm.dispatcher.lane_key(sub)
        # Dedup: each distinct prompt not answered before in this run is sent once.
        keys = [(lane_key, p, limit) for p in prompts_]
        to_send: list[tuple[str, str, int]] = []
        if rlm.dedup:
            seen: set[tuple[str, str, int]] = set()
            for key in keys:
                if key not in self.answers and key not in seen:
                    seen.add(key)
                    to_send.append(key)
        else:
            to_send = keys
        requests = [ModelRequest.from_prompt(key[1], max_tokens=limit) for key in to_send]
        with rlm._tracer.start_as_current_span(
            attr.SPAN_BATCH,
            context=self.cell_span_context,
            attributes={
                attr.RLM_BATCH_SIZE: len(prompts_),
                attr.RLM_DEDUPLICATED: len(prompts_) - len(requests),
                attr.RLM_DEPTH: self.depth,
            },
        ) as span:
            self.progress.calls_in_flight += len(requests)
            try:
                outcomes = await rlm.dispatcher.call_many(
                    sub,
                    requests,
                    ledger=self.ledger,
                    share=self.share,
                    priority=Priority.SUB,
                    depth=self.depth,
                    record=self.record,
                    parent=trace.set_span_in_context(span),
                    capture=rlm.capture_content,
                )
            finally:
                self.progress.calls_in_flight -= len(requests)
            failures: dict[tuple[str, str, int], RLMError] = {}
            fresh: dict[tuple[str, str, int], str] = {}
            for key, outcome in zip(to_send, outcomes, strict=True):
                if isinstance(outcome, RLMError):
                    failures[key] = outcome
                else:
                    fresh[key] = outcome.text
            if rlm.dedup:
                self.answers.update(fresh)
            results: list[str | None] = []
            errors: dict[int, RLMError] = {}
            for index, key in enumerate(keys):
                if key in failures:
                    errors[index] = failures[key]
                    results.append(None)
                else:
                    results.append(fresh[key] if key in fresh else self.answers[key])
            if errors:
                span.set_attribute(attr.RLM_BATCH_FAILED, len(errors))
                first = errors[min(errors)]
                raise BatchError(
                    f"{len(errors)} of {len(prompts_)} calls failed (first, item {min(errors)}: "
                    f"{type(first).__name__}: {first.message}); the other results are in .results",
                    results=results,
                    errors=errors,
                )
            return [r or "" for r in results]

    async def _rlm_query_many(self, items: list[dict[str, Any]]) -> list[str]:
        rlm = self.rlm
        if self.depth + 1 > rlm.max_depth:  # at the limit a child is a plain sub-call
            prompts_ = []
            for item in items:
                child_context = item.get("context")
                prompt = str(item.get("prompt", ""))
                if isinstance(child_context, str) and child_context:
                    prompt = f"{child_context}\n\n{prompt}"
                prompts_.append(prompt)
            return await self._llm_query_many(prompts_, None, None)
        results: list[str | None] = [None] * len(items)
        errors: dict[int, RLMError] = {}

        async def child(index: int, item: dict[str, Any]) -> None:
            raw_context = item.get("context")
            try:
                child_context = validate_context(raw_context) if raw_context is not None else self.context
                child_run = _Run(
                    rlm,
                    child_context,
                    str(item.get("prompt", "")),
                    depth=self.depth + 1,
                    ledger=self.ledger.child(),
                    share=self.share,
                    progress=self.progress,
                    calls=self.calls,
                    parent_run_id=self.run_id,
                )
                outcome = await child_run.execute(parent=self.cell_span_context)
                results[index] = outcome.answer
            except RLMError as exc:
                errors[index] = exc

        with single_exception():
            async with anyio.create_task_group() as tg:
                for index, item in enumerate(items):
                    tg.start_soon(child, index, item)
        if errors:
            raise BatchError(
                f"{len(errors)} of {len(items)} child runs failed; the other answers are in .results",
                results=results,
                errors=errors,
            )
        return [r or "" for r in results]

    def _budget_view(self) -> dict[str, Any]:
        remaining = self.ledger.remaining()
        deadline = self.ledger.budget.deadline
        view: dict[str, Any] = {
            "calls_left": remaining["calls"],
            "input_tokens_left": remaining["input_tokens"],
            "output_tokens_left": remaining["output_tokens"],
            "cost_usd_left": remaining["cost_usd"],
            "seconds_left": None if deadline is None else max(0.0, deadline - (time.monotonic() - self.started)),
            "turns_left": self.rlm.max_turns - len(self.transcript) - 1,
            "depth": self.depth,
            "max_depth": self.rlm.max_depth,
            "spent": {
                "calls": self.ledger.spent.calls,
                "input_tokens": self.ledger.spent.input_tokens,
                "output_tokens": self.ledger.spent.output_tokens,
                "cost_usd": round(self.ledger.spent.cost_usd, 6),
            },
        }
        return view
