"""The root loop's policy: turns of root-model code until ``FINAL``, and what the root reads.

:class:`RootLoop` decides what the root model sees each turn (the context's metadata, capped and
sanitised cell output, nudges), when a run gives up (turns used up, the same error again and
again) and how the transcript is trimmed for small windows. It runs code through the session and
calls models through the Dispatcher, but keeps no books: that is the recorder's job.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import trace

from . import prompts
from ._exceptions import NoAnswerError
from ._text import sanitize_text
from .dispatch.limits import Priority
from .events import CellFinished, CodeSubmitted, RootText, TurnStarted
from .models.base import LanguageModel, Message, ModelRequest, StreamingLanguageModel, StreamingView
from .result import RLMResult, Turn
from .sandbox.base import CellResult, SandboxSession
from .telemetry import attributes as attr
from .telemetry import spans as span_attributes
from .telemetry.logs import get_logger

if TYPE_CHECKING:
    from .run import _Run

__all__ = ["RootLoop"]

_logger = get_logger("rlmflow")


class RootLoop:
    """Drives one run's root model over one sandbox session."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._established = True  # the sandbox offers _rlmflow_established() until it fails once

    def _opening(self) -> list[Message]:
        run = self._run
        rlm = run.rlm
        system = rlm.system_prompt.format(
            context_kind=prompts.context_kind(run.context),
            chunk_hint=4 * rlm.sub_max_tokens * 4,
            output_cap=rlm.max_feedback_chars,
        )
        aliases = sorted(rlm.sub_models)
        if len(aliases) > 1:
            system += f"\nHelper models you can name with llm_query(..., model=NAME): {', '.join(aliases)}.\n"
        return [
            Message("system", system),
            Message(
                "user",
                f"{prompts.describe_context(run.context)}\n\nQuestion: {run.query}\n\n"
                "Start by looking at `context` with code in a ```repl block.",
            ),
        ]

    async def __call__(self, session: SandboxSession) -> RLMResult:
        run = self._run
        rlm = run.rlm
        progress = run.progress
        max_turns = run.options.max_turns
        if run.depth == 0:
            progress.max_turns = max_turns
        messages = self._opening()
        last_error: str | None = None
        repeats = 0
        previous_code: list[str] = []
        previous_text: str | None = None
        stuck = 0  # turns in a row whose cell repeated the previous one with the same result
        forced = False  # this turn must answer: the last one, or the one after a repeated cell
        for turn_index in range(1, max_turns + 1):
            if run.depth == 0:
                progress.turn = turn_index
            run.recorder.emit(TurnStarted, turn=turn_index, max_turns=max_turns)
            if turn_index == max_turns:
                messages.append(Message("user", prompts.LAST_TURN))
            turn_started = time.monotonic()
            turn_wall = time.time()
            cell_spans: list[tuple[float, float]] = []
            with rlm._tracer.start_as_current_span(
                attr.SPAN_TURN, attributes=span_attributes.turn_start(turn=turn_index, depth=run.depth)
            ):
                progress.phase = "root model thinking"
                response = await rlm.dispatcher.call(
                    self._root_model(turn_index),
                    ModelRequest(messages=tuple(self._trimmed(messages)), max_tokens=rlm.root_max_tokens),
                    ledger=run.ledger,
                    share=run.share,
                    priority=Priority.ROOT,
                    depth=run.depth,
                    record=run.recorder.record,
                    capture=rlm.capture_content,
                )
                reply = response.text
                messages.append(Message("assistant", reply))
                blocks = prompts.extract_code_blocks(reply)
                forced = forced or (turn_index == max_turns and previous_text is not None)
                if not blocks and forced and prompts.plain_answer(reply):
                    # told to answer now after working on the context, a small model often answers
                    # in words: take them (a root that never ran code gets no such pass)
                    run.recorder.turn(Turn(turn_index, reply, [], "", time.monotonic() - turn_started,
                                           started_at=turn_wall))
                    progress.phase = "done"
                    return run.result(self._answer(prompts.plain_answer(reply)))
                if not blocks:
                    run.recorder.turn(
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
                    run.recorder.emit(CodeSubmitted, turn=turn_index, code=block)
                    cell_wall = time.time()
                    cell = await self._execute_cell(session, block)
                    cell_spans.append((cell_wall, time.time() - cell_wall))
                    cells.append(cell)
                    shown = prompts.format_cell_feedback(cell, limit=rlm.max_feedback_chars)
                    feedback.append(shown)
                    run.recorder.emit(
                        CellFinished, turn=turn_index, output=shown, output_chars=cell.output_chars,
                        error=cell.error, duration=cell.duration, restarted=cell.restarted,
                    )
                    if cell.final is not None:
                        answer = self._answer(cell.final)
                        break
                    if cell.error:
                        break  # later blocks usually depend on this one
                text = printed = "\n".join(feedback)
                if answer is None and not any(c.error for c in cells):
                    text += await self._established_note(session, printed)
                run.recorder.turn(
                    Turn(turn_index, reply, blocks, text, time.monotonic() - turn_started, cells,
                         started_at=turn_wall, cell_spans=cell_spans)
                )
                if answer is not None:
                    progress.phase = "done"
                    return run.result(answer)
                error_signature = next((c.error.strip().splitlines()[-1] for c in cells if c.error), None)
                if error_signature is not None and error_signature == last_error:
                    repeats += 1
                else:
                    repeats = 1 if error_signature else 0
                last_error = error_signature
                if repeats >= rlm.max_repeated_errors:
                    raise NoAnswerError(
                        f"stopped after the same error {repeats} times in a row: {error_signature}",
                        partial=run.result(""),
                    )
                if repeats >= 2:
                    text += (
                        f"\nThis is the same error as before ({repeats} times). Change your approach "
                        "instead of repeating the code."
                    )
                asked_helper = progress.calls_done > calls_before and not any(c.error for c in cells)
                # the same code with the same output and no sub-call: a search the root keeps
                # re-running (repeated fan-outs are left to the budget and the error rule)
                fans_out = any("llm_query" in block or "rlm_query" in block for block in blocks)
                same = previous_code == blocks and previous_text == printed and not fans_out
                stuck = stuck + 1 if same else 0
                left = max_turns - turn_index
                if stuck >= 2:
                    return await self._forced_answer(
                        printed, turn_index, "stopped: the same cell ran three times in a row with the same result"
                    )
                if stuck == 1 and left > 0:
                    # a small root imitates its own last reply: restart from the question with what
                    # the cell printed, without the repeated turns, and ask for the answer
                    messages = [*messages[:2], Message("user", prompts.stuck_message(blocks, text, run.query))]
                    previous_code, previous_text, forced = blocks, printed, True
                    continue
                forced = False
                if previous_code == blocks:
                    text += "\n" + prompts.REPEAT_NUDGE
                previous_code, previous_text = blocks, printed
                messages.append(
                    Message("user", prompts.continue_message(text, run.query, left, asked_helper=asked_helper))
                )
        return await self._forced_answer(
            previous_text, max_turns, f"no answer after {max_turns} turns: the root model never called FINAL"
        )

    async def _forced_answer(self, printed: str | None, turn: int, reason: str) -> RLMResult:
        """The run's last chance: the root answers in words from what its last cell printed.

        Raises :class:`NoAnswerError` (``reason``) when no cell printed anything to answer from,
        or when the reply holds no answer.
        """
        run = self._run
        rlm = run.rlm
        if not printed or not printed.strip():
            raise NoAnswerError(reason, partial=run.result(""))
        started, wall = time.monotonic(), time.time()
        run.progress.phase = "answering from the last output"
        request = ModelRequest(
            messages=(
                Message("system", prompts.FORCED_ANSWER_SYSTEM),
                Message("user", prompts.forced_answer_message(printed, run.query, limit=rlm.max_feedback_chars)),
            ),
            max_tokens=min(rlm.root_max_tokens, 256),
        )
        response = await rlm.dispatcher.call(
            rlm.root, request, ledger=run.ledger, share=run.share, priority=Priority.ROOT, depth=run.depth,
            record=run.recorder.record, capture=rlm.capture_content,
        )
        # a reply that is code again is not an answer (the words around it would be mistaken for one)
        answer = "" if prompts.extract_code_blocks(response.text) else prompts.plain_answer(response.text)
        # not a turn (max_turns caps those): the call is in the run's calls, the reply in the log
        _logger.info("forced answer", reason=reason, answered=bool(answer), chars=len(response.text),
                     duration_s=round(time.monotonic() - started, 3), turn=turn, started_at=wall)
        if not answer:
            raise NoAnswerError(reason, partial=run.result(""))
        run.progress.phase = "done"
        return run.result(self._answer(answer))

    def _root_model(self, turn: int) -> LanguageModel:
        """The root model; one that can stream hands its reply to the progress and events live."""
        run = self._run
        root = run.rlm.root
        if not isinstance(root, StreamingLanguageModel):
            return root
        progress = run.progress
        if run.depth == 0:
            progress.root_chars = 0

        def on_text(piece: str) -> None:
            if run.depth == 0:
                progress.root_chars += len(piece)
            run.recorder.emit(RootText, turn=turn, text=piece)

        return StreamingView(root, on_text)

    async def _established_note(self, session: SandboxSession, printed: str) -> str:
        """What the last cell set (names, types, sizes, short values) that its output did not show.

        Asked of the sandbox's helper in one extra round trip, outside the recorded cells; a
        sandbox without the helper (a remote one) is asked once, then never again.
        """
        if not self._established:
            return ""
        probe = await session.execute("print(_rlmflow_established())")
        if probe.error or probe.restarted:
            self._established = False
            return ""
        lines = []
        for line in sanitize_text(probe.output).strip().splitlines():
            value = line.partition(" = ")[2].rpartition(" (")[0].removesuffix("...")
            if not value or value[:60] not in printed:  # a value already printed is not repeated
                lines.append(line)
        shown = prompts.cap_text("\n".join(lines), 800)
        return f"\nVariables your code set: {shown}" if shown else ""

    def _answer(self, final: str) -> str:
        """The answer as the caller gets it: control characters escaped, length capped."""
        limit = self._run.rlm.bridge_limits.max_answer_chars
        answer = sanitize_text(str(final))
        if len(answer) > limit:
            answer = answer[:limit] + f"\n[answer cut at {limit:,} of {len(answer):,} characters]"
        return answer

    def _trimmed(self, messages: list[Message]) -> list[Message]:
        """System and first user message always; then the newest turns that fit the history size."""
        head, rest = messages[:2], messages[2:]
        budget = self._run.rlm.history_chars - sum(len(m.content) for m in head)
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

    async def _execute_cell(self, session: SandboxSession, code: str) -> CellResult:
        run = self._run
        rlm = run.rlm
        with rlm._tracer.start_as_current_span(
            attr.SPAN_EXECUTE,
            attributes=span_attributes.cell_start(depth=run.depth, code=code, capture=rlm.capture_content),
        ) as span:
            run.cell_span_context = trace.set_span_in_context(span)
            try:
                cell = await session.execute(code)
            finally:
                run.cell_span_context = None
            span.set_attributes(span_attributes.cell_end(
                output=cell.output, error=cell.error, duration=cell.duration, output_chars=cell.output_chars,
                restarts=session.restarts, capture=rlm.capture_content,
            ))
            run.progress.sandbox_restarts = max(run.progress.sandbox_restarts, session.restarts)
            return cell
