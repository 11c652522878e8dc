"""What a run tree may be answered from instead of a provider, and where its new calls are written.

One :class:`CallMemory` per run tree (a run and its ``rlm_query`` children). Resuming a run, it
holds the calls the journal recorded for it: a request asked again (same model, same messages,
same settings: the same :func:`~rlmflow.durable.keys.request_key`) is answered from there, the
n-th time from the n-th record, and costs no provider request. Every call that does go out is
written to the journal as it completes, so a second crash loses no more than the first. A replay
memory (``strict``) holds a whole journal's calls and refuses any request it does not hold.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping

import structlog

from .._exceptions import NotInJournalError
from ..models.base import LanguageModel, ModelRequest, ModelResponse, ModelView, Usage
from .cache import CachedAnswer, CallCache, Flight
from .journal import RecordedCall, RecordedTurn, RunJournal
from .keys import request_key

_logger = structlog.get_logger("rlmflow.cache")

# the finish reasons of a whole answer, as the providers name them (None: a model that names none)
_WHOLE = frozenset({"stop", "end_turn", "stop_sequence", "tool_use", "tool_calls", None})

__all__ = ["CachingModel", "CallMemory", "RecordingModel", "first_turns", "inherited_turns"]


class CallMemory:
    """Recorded calls to answer from (each once) and the journal new calls go to."""

    def __init__(
        self, *, journal: RunJournal | None, run_id: str, recorded: Iterable[RecordedCall] = (),
        turns: Iterable[RecordedTurn] = (), strict: bool = False, root_turns: Iterable[RecordedCall] = (),
        forked_from: tuple[str, int] | None = None,
    ) -> None:
        self.journal = journal
        self.run_id = run_id
        self.strict = strict
        self.forked_from = forked_from
        """``(run id, turn)`` of the run this one was forked from, if it was."""
        # a fork's first root turns, answered in order whatever the request (its root model or
        # system prompt may differ from the parent's: the parent's turns are kept as they were)
        self._root_turns = deque(root_turns)
        self.turns = {turn.turn: turn for turn in turns if turn.child_path == ""}
        """The root run's recorded turns by number (the latest record of each)."""
        self._recorded: defaultdict[str, deque[RecordedCall]] = defaultdict(deque)
        for call in recorded:
            self._recorded[call.key].append(call)
        self.replayed = 0
        """Calls answered from the journal so far."""

    @property
    def answers(self) -> bool:
        """Whether a request may be answered from here (a resume or replay): otherwise no
        request needs its key looked up before it is sent."""
        return self.strict or bool(self._root_turns) or any(self._recorded.values())

    def take(self, key: str) -> RecordedCall | None:
        """The next recorded answer to the request ``key``, or ``None`` (it must be sent)."""
        answers = self._recorded.get(key)
        if not answers:
            return None
        self.replayed += 1
        return answers.popleft()

    def take_root_turn(self, key: str) -> RecordedCall | None:
        """The next root turn's recorded answer: a fork's next inherited turn, else by ``key``."""
        if self._root_turns:
            self.replayed += 1
            return self._root_turns.popleft()
        return self.take(key)

    def missed(self, model: LanguageModel, request: ModelRequest) -> None:
        """A request the memory cannot answer; raises :class:`NotInJournalError` in a replay."""
        if self.strict:
            last = request.messages[-1].content if request.messages else ""
            raise NotInJournalError(
                f"the journal holds no answer to this request to {model.provider}:{model.name} "
                f"({len(request.messages)} messages, the last beginning {last[:80]!r}); a replay sends nothing"
            )

    @property
    def writes(self) -> RunJournal | None:
        """The journal new records go to (none in a replay)."""
        return None if self.strict else self.journal

    def write(self, call: RecordedCall) -> None:
        if self.writes is not None:
            self.writes.call_done(self.run_id, call)


def first_turns(calls: Iterable[RecordedCall], turns: int) -> tuple[list[RecordedCall], list[RecordedCall]]:
    """A recorded run cut before its root turn ``turns + 1``: the root's first ``turns`` replies
    (its depth-0 root calls, in order) and every other call made before the next one."""
    before: list[RecordedCall] = []
    roots: list[RecordedCall] = []
    for call in calls:
        if call.role == "root" and call.depth == 0:
            if len(roots) == turns:
                break
            roots.append(call)
        else:
            before.append(call)
    return before, roots


def inherited_turns(calls: Iterable[RecordedCall], turns: int) -> tuple[list[RecordedCall], list[RecordedCall]]:
    """A fork's record split for its resume: the first ``turns`` root replies (its depth-0 root
    calls, inherited from its parent and answered in order) and every other call (by key)."""
    roots: list[RecordedCall] = []
    others: list[RecordedCall] = []
    for call in calls:
        if call.role == "root" and call.depth == 0 and len(roots) < turns:
            roots.append(call)
        else:
            others.append(call)
    return roots, others


class RecordingModel(ModelView):
    """``model`` whose every answered request is written to a :class:`CallMemory`'s journal.

    Given to the Dispatcher in the model's place (the same lane), the write happens as each call
    completes, also inside a batch that a crash interrupts half-way.
    """

    def __init__(
        self, model: LanguageModel, memory: CallMemory, *, role: str, depth: int,
        cost: Callable[[LanguageModel, Usage], float | None],
    ) -> None:
        super().__init__(model)
        self._memory = memory
        self._role = role
        self._depth = depth
        self._cost = cost

    async def request(self, request: ModelRequest) -> ModelResponse:
        response = await self.model.request(request)
        usage = response.usage
        self._memory.write(RecordedCall(
            key=request_key(self.model, request), role=self._role, depth=self._depth, model=response.model,
            text=response.text, finish_reason=response.finish_reason, input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens, cost_usd=self._cost(self.model, usage),
        ))
        return response


class CachingModel(ModelView):
    """``model`` whose every answer is kept in a :class:`~rlmflow.durable.cache.CallCache` as
    it completes, and handed to the runs waiting on its ``flights`` (a failed call raises, and
    leaves nothing there)."""

    def __init__(self, model: LanguageModel, cache: CallCache, flights: Mapping[str, Flight] | None = None) -> None:
        super().__init__(model)
        self._cache = cache
        self._flights = flights or {}

    async def request(self, request: ModelRequest) -> ModelResponse:
        response = await self.model.request(request)
        usage = response.usage
        key = request_key(self.model, request)
        answer = CachedAnswer(response.text, response.model, response.finish_reason, usage.input_tokens,
                              usage.output_tokens)
        flight = self._flights.get(key)
        if flight is not None:  # those asking the same now get what this request got
            flight.land(answer)
        if response.finish_reason not in _WHOLE:  # cut at max_tokens, filtered, refused: not kept
            return response
        try:
            await self._cache.store(key, answer)
        except Exception:  # a paid answer is never lost to its cache
            _logger.warning("sub-call cache failed to keep an answer", exc_info=True)
        return response
