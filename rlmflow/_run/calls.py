"""One run's door to the Dispatcher: the arguments every call of the run shares, written once.

A run's calls, root or sub, all go to the same Dispatcher with the same ledger, lane share,
depth, record callback and capture setting; only the model, the priority and the span parent
differ. :class:`CallScope` holds the shared part, so the loops, the bridge and the strands
adapter each name only what is theirs.

With a :class:`~rlmflow.durable.memory.CallMemory` (a journaled, resumed or replayed run), a
call the journal already holds is answered from it before it reaches the Dispatcher: no lane
slot, no provider request; the run's ledger is charged what the journal says it cost, so the
run's caps hold across a crash. Every other call is written to the journal as it completes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import anyio
from opentelemetry.context import Context as OtelContext

from .._exceptions import RLMError
from .._util import single_exception
from ..dispatch.budget import BudgetLedger, Spend
from ..dispatch.dispatcher import Dispatcher
from ..dispatch.lane import RunShare
from ..dispatch.limits import Priority
from ..dispatch.records import CallRecorder
from ..durable.cache import CachedAnswer, CallCache, Flight
from ..durable.journal import RecordedCall
from ..durable.keys import request_key
from ..durable.memory import CachingModel, CallMemory, RecordingModel
from ..models.base import LanguageModel, ModelRequest, ModelResponse, Usage

__all__ = ["CallScope"]

_JOINS = 3  # failed flights a request waits on before its run sends it unjoinably


@dataclass(frozen=True, slots=True)
class CallScope:
    """Where one run's calls go and on whose account."""

    dispatcher: Dispatcher
    ledger: BudgetLedger
    share: RunShare
    depth: int
    record: CallRecorder
    capture: int
    memory: CallMemory | None = None
    cache: CallCache | None = None

    async def ask_root(self, model: LanguageModel, request: ModelRequest) -> ModelResponse:
        """One root call, admitted before any queued sub-call."""
        cache = self.cache if self.cache is not None and self.cache.roots else None
        answered = await self._answer_known(model, [request], "root", None, cache)
        if isinstance(answered[0], ModelResponse):
            return answered[0]
        return await self.dispatcher.call(
            self._guarded(model, "root", cache), request, ledger=self.ledger, share=self.share,
            priority=Priority.ROOT, depth=self.depth, record=self.record, capture=self.capture,
        )

    async def ask_many(
        self, model: LanguageModel, requests: Sequence[ModelRequest], *, parent: OtelContext | None
    ) -> list[ModelResponse | RLMError]:
        """Sub-calls sent concurrently; outcomes in input order, a failure in its own place.

        With a cache, a request another run of this process is sending now is not sent again:
        this run waits for that answer. If that call fails it asks again, as a flight others can
        join in turn (a run asking after the failure waits on the resend instead of sending its own).
        """
        answered = await self._answer_known(model, requests, "sub", parent, self.cache)
        outcomes: list[ModelResponse | RLMError | str | None] = list(answered)
        missing = [index for index, known in enumerate(answered) if not isinstance(known, ModelResponse)]
        cache = self.cache
        if missing and cache is None:
            await self._send_into(outcomes, missing, model, requests, parent, None)
        elif missing and cache is not None:
            for _ in range(_JOINS):  # a waiter whose flight failed asks again: it may lead, or join a newer one
                missing = await self._send_or_join(outcomes, missing, answered, model, requests, parent, cache)
                if not missing:
                    break
            else:  # three flights failed under it: it sends its own, joinable by nobody
                await self._send_into(outcomes, missing, model, requests, parent, None)
        return [outcome for outcome in outcomes if isinstance(outcome, ModelResponse | RLMError)]

    async def _send_or_join(
        self, outcomes: list[ModelResponse | RLMError | str | None], indexes: list[int],
        keys: Sequence[ModelResponse | str | None], model: LanguageModel, requests: Sequence[ModelRequest],
        parent: OtelContext | None, cache: CallCache,
    ) -> list[int]:
        """Send each of ``indexes`` no run of this process is sending now (as a flight others can
        join) and wait for the answers of those another run is sending; the indexes whose flight
        failed are returned, to be asked again."""
        joined: list[tuple[int, Flight]] = []
        led: dict[str, Flight] = {}
        sent: list[int] = []
        for index in indexes:
            key = keys[index]
            assert isinstance(key, str)  # a cache was asked: every miss has its key
            flight = cache.in_flight.get(key)
            if flight is not None and key not in led:
                joined.append((index, flight))
                continue
            if key not in led:
                led[key] = cache.in_flight[key] = Flight()
            sent.append(index)
        try:
            if not joined:  # nothing to wait on: the batch is sent as it would be without a cache
                await self._send_into(outcomes, sent, model, requests, parent, led)
            else:
                with single_exception():  # a budget refusal reaches the sandbox as itself
                    async with anyio.create_task_group() as group:
                        if sent:
                            group.start_soon(self._send_into, outcomes, sent, model, requests, parent, led)
                        for _, flight in joined:
                            await flight.done.wait()
        finally:
            for key, flight in led.items():
                flight.land(None)  # failed or cancelled: those waiting ask again
                if cache.in_flight.get(key) is flight:
                    del cache.in_flight[key]
        for index, flight in joined:
            if flight.answer is not None:
                outcomes[index] = self._from_cache(model, requests[index], flight.answer, "sub", parent)
        return [index for index, flight in joined if flight.answer is None]

    async def _send_into(
        self, outcomes: list[ModelResponse | RLMError | str | None], indexes: list[int], model: LanguageModel,
        requests: Sequence[ModelRequest], parent: OtelContext | None, flights: Mapping[str, Flight] | None,
    ) -> None:
        """Send ``requests[i]`` for each index, concurrently; each outcome in its place."""
        sent = await self._send_many(self._guarded(model, "sub", self.cache, flights), [requests[i] for i in indexes],
                                     parent)
        for index, outcome in zip(indexes, sent, strict=True):
            outcomes[index] = outcome

    async def _answer_known(
        self, model: LanguageModel, requests: Sequence[ModelRequest], role: str, parent: OtelContext | None,
        cache: CallCache | None,
    ) -> list[ModelResponse | str | None]:
        """Each request's answer from the journal (a resumed or replayed run) or the cache; for
        the others, their key when one was computed (``None`` when nothing could answer)."""
        memory = self.memory
        answering = memory is not None and memory.answers
        if not answering and cache is None:
            return [None] * len(requests)
        keys = [request_key(model, request) for request in requests]
        outcomes: list[ModelResponse | str | None] = list(keys)
        if memory is not None and answering:
            take = memory.take_root_turn if role == "root" and self.depth == 0 else memory.take
            for index, request in enumerate(requests):
                recorded = take(keys[index])
                if recorded is None:
                    memory.missed(model, request)
                else:
                    outcomes[index] = self._from_journal(model, request, recorded, parent)
        if cache is not None:
            # a request another run is sending now is not looked up: it is joined (ask_many)
            asked = [index for index, outcome in enumerate(outcomes)
                     if isinstance(outcome, str) and outcome not in cache.in_flight]
            found = await cache.lookup([keys[index] for index in asked])
            for index, hit in zip(asked, found, strict=True):
                if hit is not None:
                    outcomes[index] = self._from_cache(model, requests[index], hit, role, parent)
        return outcomes

    async def _send_many(
        self, model: LanguageModel, requests: Sequence[ModelRequest], parent: OtelContext | None
    ) -> list[ModelResponse | RLMError]:
        return await self.dispatcher.call_many(
            model, requests, ledger=self.ledger, share=self.share, priority=Priority.SUB, depth=self.depth,
            record=self.record, parent=parent, capture=self.capture,
        )

    def _guarded(
        self, model: LanguageModel, role: str, cache: CallCache | None, flights: Mapping[str, Flight] | None = None
    ) -> LanguageModel:
        """``model`` as the Dispatcher sends it: each answer written to the journal and kept in
        the cache as it completes (also inside a batch a crash interrupts half-way)."""
        if self.memory is not None and self.memory.writes is not None:
            model = RecordingModel(model, self.memory, role=role, depth=self.depth, cost=self.dispatcher.cost)
        if cache is not None:
            model = CachingModel(model, cache, flights)
        return model

    def _from_journal(
        self, model: LanguageModel, request: ModelRequest, recorded: RecordedCall, parent: OtelContext | None
    ) -> ModelResponse:
        """A call the journal answers: charged to the ledger as it was paid, reported as such."""
        memory = self.memory
        if memory is not None and memory.forked_from is not None:  # a fork's record is whole without its parent's
            memory.write(recorded)
        if recorded.input_tokens == recorded.output_tokens == 0 and recorded.cost_usd == 0.0:
            # the cache answered it then (no provider reports a call without input): free again
            hit = CachedAnswer(recorded.text, recorded.model, recorded.finish_reason, 0, 0)
            return self._from_cache(model, request, hit, recorded.role, parent, journaled=True)
        usage = Usage(recorded.input_tokens, recorded.output_tokens, 1)
        cost = recorded.cost_usd
        spend = Spend(1, recorded.input_tokens, recorded.output_tokens, cost or 0.0)
        self.ledger.reserve(spend).settle(usage, cost or 0.0)  # a run's caps hold across its crash
        response = ModelResponse(recorded.text, usage, recorded.model, recorded.finish_reason)
        self.dispatcher.answered(model, request, response, source="journal", cost=cost, role=recorded.role,
                                 depth=self.depth, record=self.record, parent=parent, capture=self.capture)
        return response

    def _from_cache(
        self, model: LanguageModel, request: ModelRequest, hit: CachedAnswer, role: str, parent: OtelContext | None,
        *, journaled: bool = False,
    ) -> ModelResponse:
        """A call the cache answers: nothing sent, nothing charged; journaled (no tokens, cost 0)
        so that a resume or replay of this run gives the same answer, free again."""
        response = ModelResponse(hit.text, Usage(cached_calls=1), hit.model, hit.finish_reason)
        memory = self.memory
        if memory is not None and not journaled:
            memory.write(RecordedCall(
                key=request_key(model, request), role=role, depth=self.depth, model=hit.model, text=hit.text,
                finish_reason=hit.finish_reason, input_tokens=0, output_tokens=0, cost_usd=0.0,
            ))
        self.dispatcher.answered(model, request, response, source="cache", cost=0.0, role=role, depth=self.depth,
                                 record=self.record, parent=parent, capture=self.capture)
        return response

