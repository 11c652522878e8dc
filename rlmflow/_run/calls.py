"""One run's door to the Dispatcher: the arguments every call of the run shares, written once.

A run's calls, root or sub, all go to the same Dispatcher with the same ledger, lane share,
depth, record callback and capture setting; only the model, the priority and the span parent
differ. :class:`CallScope` holds the shared part, so the loops, the bridge and the strands
adapter each name only what is theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.context import Context as OtelContext

from .._exceptions import RLMError
from ..dispatch.budget import BudgetLedger
from ..dispatch.dispatcher import Dispatcher
from ..dispatch.lane import RunShare
from ..dispatch.limits import Priority
from ..dispatch.records import CallRecorder
from ..models.base import LanguageModel, ModelRequest, ModelResponse

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

    async def ask_root(self, model: LanguageModel, request: ModelRequest) -> ModelResponse:
        """One root call, admitted before any queued sub-call."""
        return await self.dispatcher.call(
            model, request, ledger=self.ledger, share=self.share, priority=Priority.ROOT, depth=self.depth,
            record=self.record, capture=self.capture,
        )

    async def ask_many(
        self, model: LanguageModel, requests: Sequence[ModelRequest], *, parent: OtelContext | None
    ) -> list[ModelResponse | RLMError]:
        """Sub-calls sent concurrently; outcomes in input order, a failure in its own place."""
        return await self.dispatcher.call_many(
            model, requests, ledger=self.ledger, share=self.share, priority=Priority.SUB, depth=self.depth,
            record=self.record, parent=parent, capture=self.capture,
        )
