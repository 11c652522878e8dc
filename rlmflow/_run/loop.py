"""The code-block root loop: turns of root-model code until ``FINAL``, and what the root reads.

:class:`RootLoop` decides what the root model sees each turn (the context's metadata, capped and
sanitised cell output, nudges) and trims the transcript for small windows. A turn is two steps:
:meth:`~RootLoop._ask_root` (one root call) and :meth:`~RootLoop._run_blocks` (its code blocks,
through the :class:`~rlmflow._run.cells.CellRunner`); when to give up is the
:class:`~rlmflow._run.stall.StallPolicy`'s call. It keeps no books: that is the recorder's job.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import partial

from .. import prompts
from .._exceptions import BudgetExceededError, NoAnswerError
from .._text import cap_text, traceback_summary
from ..events import RootText
from ..models.base import LanguageModel, Message, ModelRequest, StreamingLanguageModel, StreamingView, scores_choices
from ..result import RLMResult, Turn
from ..sandbox.base import SandboxSession
from ..telemetry.logs import get_logger
from .calls import CallScope
from .cells import CellRunner, RanCell
from .guards import answer_problem, unwrap_final
from .plan import make_plan, render
from .recorder import RunRecorder
from .settings import RunSettings
from .stall import StallPolicy
from .state import RunState

__all__ = ["RootLoop"]

_logger = get_logger("rlmflow")


@dataclass(frozen=True, slots=True)
class _FollowUp:
    """The next user message; ``restart``: the conversation starts again from the question with it."""

    message: Message
    restart: bool = False


@dataclass(frozen=True, slots=True)
class _Work:
    """What one turn's code blocks did."""

    cells: list[RanCell]
    final: str | None  # FINAL's value, as the cell gave it
    printed: str  # the cells' feedback as the root reads it
    text: str  # ``printed`` and the note on variables the cells set
    asked_helper: bool  # sub-calls answered and no cell failed


def _refused_message(problem: str, query: str, turns_left: int) -> str:
    """The user message after a FINAL whose value is not an answer (see :mod:`rlmflow._run.guards`)."""
    return (
        f"Your FINAL was not accepted: {problem}. Call FINAL with the answer itself (a name, a number, a "
        f"short sentence), computed from what your code found.\nThe question is: {query}\n"
        f"You have {turns_left} turn(s) left."
    )


class RootLoop:
    """Drives one run's root model over one sandbox session."""

    def __init__(
        self, settings: RunSettings, state: RunState, *, calls: CallScope, cells: CellRunner, recorder: RunRecorder
    ) -> None:
        self._settings = settings
        self._state = state
        self._calls = calls
        self._cells = cells
        self._recorder = recorder
        self._policy = StallPolicy(max_repeated_errors=settings.max_repeated_errors)
        self._told_budget = False  # the root was told the budget is spent: its next turn is its last
        self._cut = 0  # history messages left out of the root's requests (see _trimmed)

    def _opening(self) -> list[Message]:
        settings, state = self._settings, self._state
        system, user = prompts.opening_messages(
            settings.system_prompt, state.context, state.query, start=prompts.START_WITH_CODE,
            sub_max_tokens=settings.sub_max_tokens, output_cap=settings.max_feedback_chars,
            aliases=list(settings.sub_models),
        )
        return [Message("system", system), Message("user", user)]

    async def __call__(self, session: SandboxSession) -> RLMResult:
        state = self._state
        max_turns = state.options.max_turns
        if state.depth == 0:
            state.progress.max_turns = max_turns
        messages = self._opening()
        first = 1
        if self._settings.plan_first and max_turns > 1:
            planned = await self._plan_turn(session, messages, max_turns)
            if isinstance(planned, RLMResult):
                return planned
            first = 2 if planned else 1
        for turn in range(first, max_turns + 1):
            with self._cells.turn(turn, max_turns):
                if turn == max_turns:
                    messages.append(Message("user", prompts.LAST_TURN))
                started, wall = time.monotonic(), time.time()
                reply = await self._ask_root(turn, messages)
                messages.append(Message("assistant", reply))
                blocks = prompts.extract_code_blocks(reply)
                if not blocks:
                    # told to answer now after working on the context, a small model often answers
                    # in words: take them (a root that never ran code gets no such pass)
                    due = self._policy.answer_due(turn, max_turns) or self._told_budget
                    words = unwrap_final(prompts.plain_answer(reply)) if due else ""
                    words = "" if answer_problem(words, state.query) else words
                    note = "" if words else prompts.NO_CODE_NUDGE
                    self._cells.finish_turn(Turn(turn, reply, [], note, time.monotonic() - started, started_at=wall))
                    if words:
                        return await self._done(words)
                    self._end_if_budget_spent()
                    messages.append(Message("user", note))
                    continue
                work = await self._run_blocks(session, blocks, turn)
                self._cells.finish_turn(Turn(
                    turn, reply, blocks, work.text, time.monotonic() - started, [ran.result for ran in work.cells],
                    started_at=wall, cell_spans=[(ran.started_at, ran.seconds) for ran in work.cells],
                ))
                refused = None if work.final is None else answer_problem(unwrap_final(work.final), state.query)
                if work.final is not None and refused is None:
                    return await self._done(unwrap_final(work.final))
                if refused is not None:
                    if turn == max_turns:
                        return await self._forced_answer(
                            work.printed, turn, f"the last FINAL was refused: {refused}")
                    messages.append(Message("user", _refused_message(refused, state.query, max_turns - turn)))
                    continue
                stop = state.budget_stop
                if stop is not None:  # told once to answer from what it has, then the run ends
                    self._end_if_budget_spent()
                    self._told_budget = True
                    messages.append(Message("user", prompts.budget_spent_message(work.text, stop.message, state.query)))
                    continue
                follow_up = await self._follow_up(blocks, work, turn=turn, turns_left=max_turns - turn)
                if isinstance(follow_up, RLMResult):
                    return follow_up
                if follow_up.restart:
                    messages = messages[:2]
                messages.append(follow_up.message)
        return await self._forced_answer(
            self._policy.last_output, max_turns, f"no answer after {max_turns} turns: the root model never called FINAL"
        )

    async def _plan_turn(self, session: SandboxSession, messages: list[Message], max_turns: int) -> RLMResult | bool:
        """Turn 1 of a planning run: the root fills the form of :mod:`rlmflow._run.plan`, and an
        aggregation's program runs. Returns the result when that program answered; ``True`` when
        it did not (the turn is in ``messages`` and the free-form loop goes on from turn 2);
        ``False`` for a lookup or a reply with no usable form: the free-form loop starts at turn 1
        as without a plan (lookups are what it already does well)."""
        state = self._state
        started, wall = time.monotonic(), time.time()
        state.progress.phase = "root model planning"
        root = self._root_model(1)
        planned = await make_plan(partial(self._calls.ask_root, root), state.query,
                                  scores_choices=scores_choices(root),
                                  max_tokens=min(self._settings.root_max_tokens, 200))
        plan, reply = planned.plan, planned.reply
        _logger.info("plan", kind=plan.kind if plan else None, form=planned.form.kind if planned.form else None,
                     lookup_probability=planned.lookup_probability, one_probability=planned.one_probability,
                     combined=planned.combined, chars=len(reply))
        if plan is None or plan.kind == "lookup":
            return False
        code = render(plan, state.query)
        with self._cells.turn(1, max_turns):
            work = await self._run_blocks(session, [code], 1)
            self._cells.finish_turn(Turn(
                1, reply, [code], work.text, time.monotonic() - started, [ran.result for ran in work.cells],
                started_at=wall, cell_spans=[(ran.started_at, ran.seconds) for ran in work.cells],
            ))
        if work.final is not None and answer_problem(unwrap_final(work.final), state.query) is None:
            return await self._done(unwrap_final(work.final))
        messages.append(Message("assistant", f"```repl\n{code}\n```"))
        follow_up = await self._follow_up([code], work, turn=1, turns_left=max_turns - 1)
        if isinstance(follow_up, RLMResult):
            return follow_up
        messages.append(follow_up.message)
        return True

    async def _ask_root(self, turn: int, messages: list[Message]) -> str:
        """The root model's reply to the (trimmed) conversation."""
        self._state.progress.phase = "root model thinking"
        request = ModelRequest(messages=_cache_marked(self._trimmed(messages)),
                               max_tokens=self._settings.root_max_tokens)
        response = await self._calls.ask_root(self._root_model(turn), request)
        return response.text

    async def _run_blocks(self, session: SandboxSession, blocks: list[str], turn: int) -> _Work:
        """Run a reply's code blocks in order, up to ``FINAL`` or the first error."""
        progress = self._state.progress
        progress.phase = "running code"
        calls_before = progress.calls_done
        cells: list[RanCell] = []
        final: str | None = None
        for block in blocks:
            ran = await self._cells.run(session, block, turn=turn)
            cells.append(ran)
            if ran.result.final is not None:
                final = ran.result.final
                break
            if ran.result.error:
                break  # later blocks usually depend on this one
        failed = any(ran.result.error for ran in cells)
        text = printed = "\n".join(ran.shown for ran in cells)
        if final is None and not failed:
            text += self._established_note(cells, printed)
        asked_helper = progress.calls_done > calls_before and not failed
        return _Work(cells, final, printed, text, asked_helper)

    async def _follow_up(self, blocks: list[str], work: _Work, *, turn: int, turns_left: int) -> _FollowUp | RLMResult:
        """What comes after a turn without an answer: the next user message, or the run's forced end.

        Raises :class:`NoAnswerError` when the same error came too many times in a row.
        """
        state = self._state
        error = next((traceback_summary(ran.result.error) for ran in work.cells if ran.result.error), None)
        verdict = self._policy.judge(blocks, work.printed, error, turns_left=turns_left)
        if verdict.action == "give_up":
            raise NoAnswerError(
                f"stopped after the same error {verdict.same_error_times} times in a row: {error}",
                partial=state.result(""),
            )
        if verdict.action == "answer_now":
            return await self._forced_answer(
                work.printed, turn,
                "stopped: the same cell ran three times in a row with the same result",
            )
        # the loop's own words go outside the fence that holds what the sandbox printed
        notes = [prompts.same_error_note(verdict.same_error_times)] if verdict.same_error_times >= 2 else []
        if verdict.action == "restart":
            # a small root imitates its own last reply: restart from the question with what the
            # cell printed, without the repeated turns, and ask for the answer
            message = prompts.stuck_message(blocks, work.text, state.query, notes=notes)
            return _FollowUp(Message("user", message), restart=True)
        if verdict.repeated_code:
            notes.append(prompts.REPEAT_NUDGE)
        return _FollowUp(Message("user", prompts.continue_message(
            work.text, state.query, turns_left, asked_helper=work.asked_helper, notes=notes,
        )))

    def _end_if_budget_spent(self) -> None:
        """End the run with the budget's refusal if the root, told once, still did not answer."""
        stop = self._state.budget_stop
        if self._told_budget and stop is not None:
            raise BudgetExceededError(
                f"{stop.message} (the root was told and did not answer)", limit=stop.limit, spent=stop.spent
            )

    async def _done(self, answer: str) -> RLMResult:
        answer = await self._cells.answer(answer)
        self._state.progress.phase = "done"
        return self._state.result(answer)

    async def _forced_answer(self, printed: str | None, turn: int, reason: str) -> RLMResult:
        """The run's last chance: the root answers in words from what its last cell printed.

        Raises :class:`NoAnswerError` (``reason``) when no cell printed anything to answer from,
        or when the reply holds no answer.
        """
        settings, state = self._settings, self._state
        if not printed or not printed.strip():
            raise NoAnswerError(reason, partial=state.result(""))
        started, wall = time.monotonic(), time.time()
        state.progress.phase = "answering from the last output"
        request = ModelRequest(
            messages=(
                Message("system", prompts.FORCED_ANSWER_SYSTEM),
                Message(
                    "user",
                    prompts.forced_answer_message(printed, state.query, limit=settings.max_feedback_chars),
                ),
            ),
            max_tokens=min(settings.root_max_tokens, 256),
        )
        response = await self._calls.ask_root(settings.root, request)
        # a reply that is code again is not an answer (the words around it would be mistaken for one)
        answer = "" if prompts.extract_code_blocks(response.text) else unwrap_final(prompts.plain_answer(response.text))
        answer = "" if answer_problem(answer, state.query) else answer
        # not a turn (max_turns caps those): the call is in the run's calls, the reply in the log
        _logger.info("forced answer", reason=reason, answered=bool(answer), chars=len(response.text),
                     duration_s=round(time.monotonic() - started, 3), turn=turn, started_at=wall)
        if not answer:
            raise NoAnswerError(reason, partial=state.result(""))
        return await self._done(answer)

    def _root_model(self, turn: int) -> LanguageModel:
        """The root model; one that can stream hands its reply to the progress and events live."""
        state = self._state
        root = self._settings.root
        if not isinstance(root, StreamingLanguageModel):
            return root
        progress = state.progress
        if state.depth == 0:
            progress.root_chars = 0

        def on_text(piece: str) -> None:
            if state.depth == 0:
                progress.root_chars += len(piece)
            self._recorder.emit(RootText, turn=turn, text=piece)

        return StreamingView(root, on_text)

    @staticmethod
    def _established_note(cells: list[RanCell], printed: str) -> str:
        """What the turn's cells set (names, types, sizes, short values) that their output did not
        show, as the sandbox reported it with each cell's result (nothing for a sandbox that does not)."""
        lines = []
        for line in "\n".join(ran.result.established for ran in cells).strip().splitlines():
            value = line.partition(" = ")[2].rpartition(" (")[0].removesuffix("...")
            if not value or value[:60] not in printed:  # a value already printed is not repeated
                lines.append(line)
        shown = cap_text("\n".join(lines), 800)
        return f"\nVariables your code set: {shown}" if shown else ""

    def _trimmed(self, messages: list[Message]) -> list[Message]:
        """System and first user message always; then the newest turns that fit the history size.

        Turns are left out in coarse steps: once the history outgrows its size, the oldest turns
        go until what is kept fills half of it, and that cut then stays where it is for the turns
        that follow (until the history outgrows the size again). Every turn in between sends
        the same prefix as the turn before, so a provider's prompt cache can serve it; dropping
        one turn each time would change the prefix, and miss the cache, on every turn.
        """
        head, rest = messages[:2], messages[2:]
        room = self._settings.history_chars - sum(len(m.content) for m in head)
        if self._cut > len(rest):  # the conversation restarted from the question
            self._cut = 0
        if sum(len(m.content) for m in rest[self._cut:]) > room:
            self._cut = _cut_to_fit(rest, room // 2)
        if self._cut == 0:
            return [*head, *rest]
        note = Message("user", f"[{self._cut} earlier messages omitted; variables in the sandbox are kept]")
        return [*head, Message("assistant", "(earlier work)"), note, *rest[self._cut:]]


def _cut_to_fit(rest: list[Message], room: int) -> int:
    """How many of the oldest messages of ``rest`` to leave out so the newest fit ``room`` characters
    (at least the newest two are kept), the kept part starting with an assistant reply (the note
    that stands for the others is a user message)."""
    kept = 0
    for message in reversed(rest):
        room -= len(message.content)
        if room < 0 and kept >= 2:
            break
        kept += 1
    cut = len(rest) - kept
    if cut and rest[cut].role == "user" and cut + 1 < len(rest):
        cut += 1
    return cut


def _cache_marked(messages: list[Message]) -> tuple[Message, ...]:
    """The root's request with a cache mark after the system prompt and after each user message
    (the end of a turn of the history, which the next turns repeat byte for byte); the model
    keeps the marks its provider can use (:func:`rlmflow.models.caching.cache_points`)."""
    return tuple(m if m.role == "assistant" else replace(m, cache_point=True) for m in messages)
