"""The Dispatcher: the single door every model call, root or sub, passes through.

Per (provider, model) it keeps a lane with a priority-ordered pool of slots, so a root turn is
served before any queued sub-call and a local model runs one call at a time. Every call reserves
its worst case on the run's ledger before it is sent and settles afterwards, is traced as a
``chat {model}`` span and is reported to the caller as a :class:`CallRecord`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from .._exceptions import ModelError, RLMError
from .._util import single_exception
from ..models.base import LanguageModel, ModelRequest, ModelResponse
from ..telemetry import attributes as attr
from .budget import BudgetLedger, Reservation, Spend
from .limits import Limits, Priority, PrioritySlots, SlotStatistics
from .pricing import Pricing

__all__ = ["CallRecord", "Dispatcher", "LaneStatistics"]

_logger = logging.getLogger("rlmflow.dispatch")

#: Defaults by provider: a local model computes on this machine's cores, one call at a time.
DEFAULT_LIMITS: dict[str, Limits] = {
    "llama.cpp": Limits(max_concurrency=1),
    "scripted": Limits(max_concurrency=64),
    "openai": Limits(max_concurrency=16),
    "aws.bedrock": Limits(max_concurrency=16),
    "anthropic": Limits(max_concurrency=16),
}


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What one model call cost and how long it took; ``error`` names the exception type."""

    model: str
    provider: str
    role: str
    depth: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    queue_wait: float
    duration: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class LaneStatistics:
    key: str
    limits: Limits
    slots: SlotStatistics
    completed: int
    failed: int


class _Lane:
    def __init__(self, key: str, limits: Limits) -> None:
        self.key = key
        self.limits = limits
        self.slots = PrioritySlots(limits.max_concurrency)
        self.completed = 0
        self.failed = 0


Recorder = Callable[[CallRecord], None]


class Dispatcher:
    """Sends model calls under per-lane limits and a run's budget.

    One Dispatcher per process (or per service) is the intent: every :class:`rlmflow.RLM`
    sharing it shares its lanes. ``limits`` maps a lane key (``"provider:model"``) or a
    provider name to :class:`Limits`; unlisted lanes use the provider defaults.
    """

    def __init__(
        self,
        *,
        limits: Mapping[str, Limits] | None = None,
        pricing: Pricing | None = None,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self._limits = dict(limits or {})
        self._lanes: dict[str, _Lane] = {}
        self.pricing = pricing or Pricing()
        self._tracer = trace.get_tracer("rlmflow", tracer_provider=tracer_provider)

    def lane_key(self, model: LanguageModel) -> str:
        return f"{model.provider}:{model.name}"

    def _lane(self, model: LanguageModel) -> _Lane:
        key = self.lane_key(model)
        lane = self._lanes.get(key)
        if lane is None:
            limits = self._limits.get(key) or self._limits.get(model.provider) or DEFAULT_LIMITS.get(
                model.provider, Limits()
            )
            lane = self._lanes[key] = _Lane(key, limits)
        return lane

    def estimate(self, model: LanguageModel, request: ModelRequest) -> Spend:
        """The worst case a request can spend: its input tokens plus ``max_tokens``."""
        input_tokens = sum(model.count_tokens(m.content) for m in request.messages)
        return Spend(calls=1, input_tokens=input_tokens, output_tokens=request.max_tokens)

    async def call(
        self,
        model: LanguageModel,
        request: ModelRequest,
        *,
        ledger: BudgetLedger,
        priority: Priority = Priority.SUB,
        depth: int = 0,
        record: Recorder | None = None,
        parent: otel_context.Context | None = None,
    ) -> ModelResponse:
        """Send one request. Raises ``BudgetExceededError`` before sending if it cannot fit."""
        (reservation,) = ledger.reserve_many([self.estimate(model, request)])
        return await self._send(model, request, reservation, priority, depth, record, parent)

    async def call_many(
        self,
        model: LanguageModel,
        requests: Sequence[ModelRequest],
        *,
        ledger: BudgetLedger,
        priority: Priority = Priority.SUB,
        depth: int = 0,
        record: Recorder | None = None,
        parent: otel_context.Context | None = None,
    ) -> list[ModelResponse | RLMError]:
        """Send requests concurrently; results in input order, a failure in its own slot.

        The whole batch is reserved first: if it cannot fit, ``BudgetExceededError`` is raised
        and nothing is sent. Each item's failure is returned in place, after every other item
        has finished.
        """
        reservations = ledger.reserve_many([self.estimate(model, r) for r in requests])
        outcomes: list[ModelResponse | RLMError | None] = [None] * len(requests)

        async def one(index: int) -> None:
            try:
                outcomes[index] = await self._send(
                    model, requests[index], reservations[index], priority, depth, record, parent
                )
            except RLMError as exc:
                outcomes[index] = exc

        try:
            with single_exception():
                async with anyio.create_task_group() as tg:
                    for index in range(len(requests)):
                        tg.start_soon(one, index)
        finally:
            for reservation in reservations:  # items that never started (cancellation)
                reservation.release()
        return [outcome if outcome is not None else RLMError("no result") for outcome in outcomes]

    async def _send(
        self,
        model: LanguageModel,
        request: ModelRequest,
        reservation: Reservation,
        priority: Priority,
        depth: int,
        record: Recorder | None,
        parent: otel_context.Context | None,
    ) -> ModelResponse:
        lane = self._lane(model)
        role = "root" if priority == Priority.ROOT else "sub"
        queued = time.perf_counter()
        with self._tracer.start_as_current_span(
            attr.chat_span_name(model.name),
            context=parent,
            kind=trace.SpanKind.CLIENT,
            attributes={
                attr.GEN_AI_OPERATION_NAME: attr.OPERATION_CHAT,
                attr.GEN_AI_PROVIDER_NAME: model.provider,
                attr.GEN_AI_REQUEST_MODEL: model.name,
                attr.GEN_AI_REQUEST_MAX_TOKENS: request.max_tokens,
                attr.RLM_DEPTH: depth,
                attr.RLM_ROLE: role,
                attr.RLM_PROMPT_CHARS: request.prompt_chars,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                await lane.slots.acquire(priority)
            except BaseException:
                reservation.release()
                raise
            started = time.perf_counter()
            span.set_attribute(attr.RLM_QUEUE_WAIT_S, started - queued)
            try:
                response = await model.request(request)
            except BaseException as exc:
                lane.slots.release()
                reservation.release()
                lane.failed += 1
                span.set_attribute(attr.ERROR_TYPE, type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                if record is not None and isinstance(exc, Exception):
                    record(
                        CallRecord(
                            model.name, model.provider, role, depth, 0, 0, 0.0,
                            started - queued, time.perf_counter() - started, type(exc).__name__,
                        )
                    )
                if isinstance(exc, Exception) and not isinstance(exc, RLMError):
                    raise ModelError(
                        f"{model.provider}:{model.name} failed: {type(exc).__name__}: {exc}",
                        provider=model.provider,
                        model=model.name,
                    ) from exc
                raise
            lane.slots.release()
            lane.completed += 1
            cost = self.pricing.cost(model.provider, model.name, response.usage)
            reservation.settle(response.usage, cost or 0.0)
            span.set_attribute(attr.GEN_AI_RESPONSE_MODEL, response.model)
            span.set_attribute(attr.GEN_AI_USAGE_INPUT_TOKENS, response.usage.input_tokens)
            span.set_attribute(attr.GEN_AI_USAGE_OUTPUT_TOKENS, response.usage.output_tokens)
            if response.finish_reason:
                span.set_attribute(attr.GEN_AI_RESPONSE_FINISH_REASONS, (response.finish_reason,))
            if cost is not None:
                span.set_attribute(attr.RLM_COST_USD, cost)
            if record is not None:
                record(
                    CallRecord(
                        model.name, model.provider, role, depth,
                        response.usage.input_tokens, response.usage.output_tokens, cost,
                        started - queued, time.perf_counter() - started,
                    )
                )
            return response

    def statistics(self) -> list[LaneStatistics]:
        return [
            LaneStatistics(lane.key, lane.limits, lane.slots.statistics(), lane.completed, lane.failed)
            for lane in self._lanes.values()
        ]

    def __repr__(self) -> str:
        return f"Dispatcher(lanes={[repr(lane.slots) for lane in self._lanes.values()]})"
