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

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.context import Context as OtelContext

from .._exceptions import RLMError
from ..dispatch.budget import BudgetLedger, Spend
from ..dispatch.dispatcher import Dispatcher
from ..dispatch.lane import RunShare
from ..dispatch.limits import Priority
from ..dispatch.records import CallRecord, CallRecorder
from ..durable.journal import RecordedCall
from ..durable.keys import request_key
from ..durable.memory import CallMemory, RecordingModel
from ..models.base import LanguageModel, ModelRequest, ModelResponse, Usage

__all__ = ["CallScope"]


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

    async def ask_root(self, model: LanguageModel, request: ModelRequest) -> ModelResponse:
        """One root call, admitted before any queued sub-call."""
        memory = self.memory
        if memory is not None and memory.answers:
            recorded = memory.take(request_key(model, request))
            if recorded is not None:
                return self._answered(model, recorded)
            memory.missed(model, request)
        if memory is not None:
            model = self._recording(model, memory, "root")
        return await self.dispatcher.call(
            model, request, ledger=self.ledger, share=self.share, priority=Priority.ROOT, depth=self.depth,
            record=self.record, capture=self.capture,
        )

    async def ask_many(
        self, model: LanguageModel, requests: Sequence[ModelRequest], *, parent: OtelContext | None
    ) -> list[ModelResponse | RLMError]:
        """Sub-calls sent concurrently; outcomes in input order, a failure in its own place."""
        memory = self.memory
        if memory is None:
            return await self._send_many(model, requests, parent)
        if not memory.answers:  # a fresh journaled run: every call is sent, and written as it completes
            return await self._send_many(self._recording(model, memory, "sub"), requests, parent)
        outcomes: list[ModelResponse | RLMError | None] = []
        missing: list[int] = []
        for index, request in enumerate(requests):
            recorded = memory.take(request_key(model, request))
            if recorded is None:
                memory.missed(model, request)
                missing.append(index)
            outcomes.append(None if recorded is None else self._answered(model, recorded))
        if missing:
            sent = await self._send_many(
                self._recording(model, memory, "sub"), [requests[i] for i in missing], parent
            )
            for index, outcome in zip(missing, sent, strict=True):
                outcomes[index] = outcome
        return [outcome for outcome in outcomes if outcome is not None]

    async def _send_many(
        self, model: LanguageModel, requests: Sequence[ModelRequest], parent: OtelContext | None
    ) -> list[ModelResponse | RLMError]:
        return await self.dispatcher.call_many(
            model, requests, ledger=self.ledger, share=self.share, priority=Priority.SUB, depth=self.depth,
            record=self.record, parent=parent, capture=self.capture,
        )

    def _recording(self, model: LanguageModel, memory: CallMemory, role: str) -> LanguageModel:
        return RecordingModel(model, memory, role=role, depth=self.depth, cost=self.dispatcher.cost)

    def _answered(self, model: LanguageModel, recorded: RecordedCall) -> ModelResponse:
        """A call the journal answers: charged to the ledger as it was paid, recorded as such."""
        usage = Usage(recorded.input_tokens, recorded.output_tokens, 1)
        cost = recorded.cost_usd
        spend = Spend(1, recorded.input_tokens, recorded.output_tokens, cost or 0.0)
        self.ledger.reserve(spend).settle(usage, cost or 0.0)  # a run's caps hold across its crash
        self.record(CallRecord(
            model.name, model.provider, recorded.role, self.depth, recorded.input_tokens, recorded.output_tokens,
            cost, 0.0, 0.0, attempts=0, from_journal=True,
        ))
        return ModelResponse(recorded.text, usage, recorded.model, recorded.finish_reason)
