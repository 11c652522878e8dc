"""The Dispatcher: the single door every model call, root or sub, passes through.

For each call it: reserves a conservative estimate on the run's budget ledger (refusing what
cannot fit, before anything is sent); waits for admission on the model's :class:`Lane` (priority,
fair share, adaptive concurrency, RPM/TPM windows, quota pauses); sends; retries what is
retryable (a refused call waits its own ``retry-after``); feeds the outcome back to the lane;
settles the ledger to the real usage, reporting any overrun of the reservation; and records a
``chat {model}`` span and a :class:`CallRecord`. Cancellation at any point releases the
reservation and the lane slot, and cancels the request in flight.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import anyio
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

from .._exceptions import ConfigurationError, ModelError, QuotaExhaustedError, RLMError, ThrottledError
from .._util import single_exception
from ..models.base import LanguageModel, ModelRequest, ModelResponse, Usage
from ..telemetry import attributes as attr
from ..telemetry import spans as span_attributes
from ..telemetry.logs import get_logger
from ..telemetry.metrics import CallMetrics
from ..telemetry.scope import current_telemetry
from .budget import Budget, BudgetLedger, Reservation, Spend
from .headers import pause_from_headers
from .lane import Lane, LaneStatistics, RunShare
from .limits import Limits, Priority
from .policy import Policy, lane_key_of, load_policy
from .pricing import Price, Pricing
from .records import CallRecord as CallRecord
from .records import CallRecorder
from .redis_lane import SharedLane
from .retry import RetryPolicy
from .shared import SharedConfig, SharedState

__all__ = ["DEFAULT_LIMITS", "CallRecord", "Dispatcher", "LaneStatistics", "RunShare"]

_logger = get_logger("rlmflow.dispatch")

#: Defaults by provider. Remote providers slow-start from 8 calls in flight towards a ceiling of
#: 256 and let the provider set the pace; a local model computes on this machine's cores, one
#: call at a time. A model may carry its own defaults as a ``lane_limits`` attribute.
DEFAULT_LIMITS: dict[str, Limits] = {
    "llama.cpp": Limits(max_concurrency=1),
    "openai": Limits(max_concurrency=256),
    "aws.bedrock": Limits(max_concurrency=256),
    "anthropic": Limits(max_concurrency=256),
}

#: Input tokens are reserved with this margin over the model's count (an estimate for remote
#: models) plus a few tokens per message for the chat template.
INPUT_MARGIN = 0.1
MESSAGE_OVERHEAD_TOKENS = 4


@dataclass(slots=True)
class _Tally:
    """What the attempts of one call add up to."""

    attempts: int = 0
    throttles: int = 0
    failures: int = 0
    queue_wait: float = 0.0
    duration: float = 0.0
    cancelled_in_flight: bool = False  # the provider may have accepted (and will bill) the request


@dataclass(slots=True)
class _Batch:
    """What the calls of one :meth:`Dispatcher.call` or :meth:`Dispatcher.call_many` share."""

    model: LanguageModel
    lane: Lane | SharedLane
    share: RunShare
    priority: Priority
    depth: int
    record: CallRecorder | None
    parent: otel_context.Context | None
    capture: int
    queued_at: float  # the Dispatcher's clock when the calls were queued
    queued_ns: int  # the same moment on the wall clock (spans, records)
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep  # the wait before a retry


class Dispatcher:
    """Sends model calls under per-lane limits, a retry policy and each run's budget.

    Share one Dispatcher between every :class:`rlmflow.RLM` of a process: they then share lanes,
    so concurrent runs split the provider's limits fairly. ``limits`` maps a lane key
    (``"provider:model"``) or a provider name to :class:`Limits`; other lanes use
    :data:`DEFAULT_LIMITS`. Load an operator's policy file with :meth:`from_policy`.
    """

    def __init__(
        self,
        *,
        limits: Mapping[str, Limits] | None = None,
        retry: RetryPolicy | None = None,
        pricing: Pricing | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        clock: Callable[[], float] | None = None,
        shared: str | SharedConfig | SharedState | None = None,
    ) -> None:
        # model strings ("bedrock:<id>", "local") become the lane keys they stand for
        self._limits = {lane_key_of(key): value for key, value in (limits or {}).items()}
        self._lanes: dict[str, Lane | SharedLane] = {}
        # shared=: lanes kept in Redis across processes (docs/scaling.md); None keeps them in memory
        self.shared = shared if isinstance(shared, SharedState) or shared is None else SharedState(
            shared, meter_provider=meter_provider, clock=clock
        )
        self.retry = retry or RetryPolicy()
        self.pricing = pricing or Pricing()
        self._tracer = trace.get_tracer("rlmflow", tracer_provider=tracer_provider)
        self._metrics = CallMetrics(meter_provider, self.lanes)
        self._overrun = metrics.get_meter("rlmflow", meter_provider=meter_provider).create_counter(
            attr.METRIC_BUDGET_OVERRUN, description="What calls spent beyond their budget reservation, by quantity"
        )
        # the monotonic clock asyncio's loop reads, without anyio's per-call backend lookup (a lane
        # reads the clock about twenty times a call); only differences of it are ever used
        self._clock = clock or time.monotonic

    @classmethod
    def from_policy(cls, path: str | Path | Policy, **kwargs: Any) -> Dispatcher:
        """A Dispatcher configured from a TOML policy file (see ``docs/policies.md``), or from the
        :class:`~rlmflow.dispatch.policy.Policy` :func:`~rlmflow.dispatch.policy.load_policy` read.

        ``[lanes.<key>]`` tables hold :class:`Limits` fields (keyed by a provider, a lane key or a
        model string), ``[retry]`` :class:`RetryPolicy` fields, ``[shared]`` :class:`SharedConfig`
        fields; keyword arguments given here win over the file. ``[sandbox]`` is not the
        Dispatcher's (the command line reads it). Raises :class:`ConfigurationError` naming the
        file, the table and the key of any bad value.
        """
        policy = path if isinstance(path, Policy) else load_policy(path)
        if policy.shared is not None:
            kwargs.setdefault("shared", policy.shared)
        if policy.retry is not None:
            kwargs.setdefault("retry", policy.retry)
        kwargs["limits"] = {**policy.limits, **(kwargs.get("limits") or {})}
        return cls(**kwargs)

    def check_limits_used(self, models: Sequence[LanguageModel], *, source: str = "the limits") -> None:
        """Raise :class:`ConfigurationError` if some configured limits would apply to none of
        ``models`` (a misspelled model string in a policy file, say): a caller that knows all
        the models it will call (the CLI) checks its policy so. ``source`` names the policy."""
        used: set[str] = set()
        for model in models:
            used |= {self.lane_key(model), f"{model.provider}:{model.name}", model.provider}
        unmatched = sorted(key for key in self._limits if key not in used)
        if unmatched:
            raise ConfigurationError(
                f"{source} sets lanes no model of this run uses: {', '.join(unmatched)}; this run's lanes are "
                f"{', '.join(sorted({self.lane_key(m) for m in models}))} (a lane is keyed by a model string such "
                "as bedrock:<model-id>, a lane key such as aws.bedrock:<model-id>, or a provider)"
            )

    # -- lanes ------------------------------------------------------------------------------------
    def lane_key(self, model: LanguageModel) -> str:
        """``provider:model``, with ``@endpoint`` for models that name one (two servers, two lanes)."""
        endpoint = getattr(model, "endpoint", None)
        return f"{model.provider}:{model.name}@{endpoint}" if endpoint else f"{model.provider}:{model.name}"

    def lane(self, model: LanguageModel) -> Lane | SharedLane:
        """The lane of ``model``, created with its configured limits on first use.

        Limits are looked up by lane key, then ``provider:model``, then provider; else the
        model's own ``lane_limits``, else :data:`DEFAULT_LIMITS`. A model with a connection pool
        (``reserve_connections``) is told the lane's ceiling before its first call.
        """
        key = self.lane_key(model)
        lane = self._lanes.get(key)
        if lane is None:
            declared = getattr(model, "lane_limits", None)
            limits = (
                self._limits.get(key)
                or self._limits.get(f"{model.provider}:{model.name}")
                or self._limits.get(model.provider)
                or (declared if isinstance(declared, Limits) else None)
                or DEFAULT_LIMITS.get(model.provider, Limits())
            )
            reserve = getattr(model, "reserve_connections", None)
            if callable(reserve):
                reserve(limits.max_concurrency)
            if self.shared is not None:
                lane = self._lanes[key] = SharedLane(key, limits, self.shared, clock=self._clock)
            else:
                lane = self._lanes[key] = Lane(key, limits, clock=self._clock)
        return lane

    async def aclose(self) -> None:
        """Close the shared state (Redis) this Dispatcher uses, if any; in-memory lanes need nothing."""
        if self.shared is not None:
            await self.shared.aclose()

    def cost(self, model: LanguageModel, usage: Usage) -> float | None:
        """USD for ``usage`` on ``model``: the Dispatcher's pricing (overrides, then tables), else a
        ``price`` the model declares itself; ``None`` when unknown."""
        cost = self.pricing.cost(model.provider, model.name, usage)
        if cost is None:
            declared = getattr(model, "price", None)
            if isinstance(declared, Price):
                cost = declared.cost(usage)
        return cost

    def check_budget(self, model: LanguageModel, budget: Budget | BudgetLedger) -> None:
        """Raise :class:`ConfigurationError` if ``budget`` caps cost but ``model`` has no known price.

        The Dispatcher checks this itself before the first call of a run on each model; call it
        at the start of a run to fail before anything is sent.
        """
        caps_cost = budget.caps_cost() if isinstance(budget, BudgetLedger) else budget.max_cost_usd is not None
        if caps_cost and self.cost(model, Usage(1, 1, 1)) is None:
            raise ConfigurationError(
                f"max_cost_usd is set but no price is known for {model.provider}:{model.name}; give one with "
                f"Dispatcher(pricing=Pricing({{{model.name!r}: Price(input_per_mtok, output_per_mtok)}}))"
            )

    def estimate(self, model: LanguageModel, request: ModelRequest) -> Spend:
        """A conservative worst case for a request: its input tokens with a margin, ``max_tokens``,
        and their price.

        For a model that caches prompts (``caches_prompts``) the price is the dearer of every input
        token plain and every input token written to the cache (a write costs 1.25x the input
        price on Claude): whatever mix of reads, writes and plain tokens the provider reports,
        the call settles at or below what it reserved.
        """
        counted = sum(model.count_tokens(m.content) for m in request.messages)
        input_tokens = math.ceil(counted * (1 + INPUT_MARGIN)) + MESSAGE_OVERHEAD_TOKENS * len(request.messages)
        cost = self.cost(model, Usage(input_tokens, request.max_tokens, 1))
        if cost is not None and getattr(model, "caches_prompts", False) is True:
            written = self.cost(model, Usage(input_tokens, request.max_tokens, 1, cache_write_tokens=input_tokens))
            cost = max(cost, written or 0.0)
        return Spend(calls=1, input_tokens=input_tokens, output_tokens=request.max_tokens, cost_usd=cost or 0.0)

    # -- calls --------------------------------------------------------------------------------------
    async def call(
        self,
        model: LanguageModel,
        request: ModelRequest,
        *,
        ledger: BudgetLedger,
        share: RunShare | None = None,
        priority: Priority = Priority.SUB,
        depth: int = 0,
        record: CallRecorder | None = None,
        parent: otel_context.Context | None = None,
        capture: int = 0,
    ) -> ModelResponse:
        """Send one request. Raises ``BudgetExceededError`` before sending if it cannot fit, and
        ``ConfigurationError`` if the budget caps cost and the model's price is unknown."""
        self.check_budget(model, ledger)
        estimate = self.estimate(model, request)
        (reservation,) = ledger.reserve_many([estimate])
        batch = self._batch(model, share, priority, depth, record, parent, capture)
        return await self._send(request, estimate, reservation, batch)

    async def call_many(
        self,
        model: LanguageModel,
        requests: Sequence[ModelRequest],
        *,
        ledger: BudgetLedger,
        share: RunShare | None = None,
        priority: Priority = Priority.SUB,
        depth: int = 0,
        record: CallRecorder | None = None,
        parent: otel_context.Context | None = None,
        capture: int = 0,
    ) -> list[ModelResponse | RLMError]:
        """Send requests concurrently; results in input order, a failure in its own place.

        The whole batch is reserved first: if it cannot fit, ``BudgetExceededError`` is raised
        and nothing is sent. Each item's failure is returned in place, after every other item
        has finished.
        """
        self.check_budget(model, ledger)
        estimates = [self.estimate(model, r) for r in requests]
        reservations = ledger.reserve_many(estimates)
        outcomes: list[ModelResponse | RLMError | None] = [None] * len(requests)
        batch = self._batch(model, share, priority, depth, record, parent, capture)
        lane = batch.lane
        # Senders, not one task per item: as many workers as the lane may ever have in flight
        # take the items in order. A task per item of a 10,000-item batch would cost a task, a
        # cancel scope, a span and a parked waiter each before the first answer came back, and
        # their garbage lengthens the collector's pauses. A worker about to sleep before a retry
        # starts a stand-in, so sleeping retries never leave the lane short of senders: at most
        # the ceiling plus one sender per item being retried are alive.
        total = len(requests)
        target = min(total, lane.limits.max_concurrency, batch.share.max_concurrency or total)
        taken = workers = sleeping = 0
        lane.backlog += total
        caller = contextvars.copy_context()  # stand-ins start here, not inside a sleeping call's span

        async def worker() -> None:
            nonlocal taken, workers
            try:
                while taken < total:
                    index, taken = taken, taken + 1
                    lane.backlog -= 1
                    try:
                        outcomes[index] = await self._send(requests[index], estimates[index], reservations[index],
                                                           batch)
                    except RLMError as exc:
                        outcomes[index] = exc
                    if workers - sleeping > target:
                        return  # a stand-in took over while this one slept before a retry
            finally:
                workers -= 1

        async def sleep_with_stand_in(seconds: float) -> None:
            nonlocal workers, sleeping
            sleeping += 1
            if taken < total and workers - sleeping < target:
                workers += 1
                caller.run(tg.start_soon, worker)
            try:
                await anyio.sleep(seconds)
            finally:
                sleeping -= 1

        batch.sleep = sleep_with_stand_in
        try:
            with single_exception():
                async with anyio.create_task_group() as tg:
                    for _ in range(target):
                        workers += 1
                        tg.start_soon(worker)
        finally:
            lane.backlog -= total - taken
            for reservation in reservations:  # items that never started (cancellation)
                reservation.release()
        return [outcome if outcome is not None else RLMError("no result") for outcome in outcomes]

    def _batch(
        self,
        model: LanguageModel,
        share: RunShare | None,
        priority: Priority,
        depth: int,
        record: CallRecorder | None,
        parent: otel_context.Context | None,
        capture: int,
    ) -> _Batch:
        # the caller's span parents every call, whichever task sends it
        parent = parent if parent is not None else otel_context.get_current()
        return _Batch(model, self.lane(model), share or RunShare(), priority, depth, record, parent, capture,
                      self._clock(), time.time_ns())

    async def _send(
        self, request: ModelRequest, estimate: Spend, reservation: Reservation, batch: _Batch
    ) -> ModelResponse:
        model, lane = batch.model, batch.lane
        role = "root" if batch.priority == Priority.ROOT else "sub"
        window_tokens = estimate.input_tokens + request.max_tokens * lane.limits.output_weight
        tally = _Tally()
        telemetry = current_telemetry()
        tracer = telemetry.tracer if telemetry is not None else self._tracer
        # the span starts when the call was queued, so it shows the wait for admission
        span = tracer.start_span(
            attr.chat_span_name(model.name),
            context=batch.parent,
            kind=trace.SpanKind.CLIENT,
            attributes=span_attributes.chat_start(
                provider=model.provider, model=model.name, max_tokens=request.max_tokens, depth=batch.depth,
                role=role, prompt_chars=request.prompt_chars, messages=request.messages, capture=batch.capture,
                endpoint=getattr(model, "endpoint", None),
            ),
            start_time=batch.queued_ns,
            record_exception=False,
            set_status_on_exception=False,
        )
        # current while the request is out (provider instrumentation, log correlation); a span of
        # no tracer at all carries nothing worth making current
        token = otel_context.attach(trace.set_span_in_context(span)) if span.get_span_context().is_valid else None
        try:
            try:
                response = await self._attempts(request, span, window_tokens, tally, batch)
            except BaseException as exc:
                if tally.cancelled_in_flight:
                    # an HTTP request cancelled after it left is still done, and billed, by the
                    # provider: its worst case is charged, so a cap bounds what was really spent
                    reservation.keep()
                else:
                    reservation.release()
                self._finish_failed(span, exc, tally.attempts, tally.throttles, tally.queue_wait)
                if isinstance(exc, Exception):
                    self._emit(
                        CallRecord(
                            model.name, model.provider, role, batch.depth, 0, 0, 0.0, tally.queue_wait,
                            self._clock() - batch.queued_at, tally.attempts, tally.throttles, type(exc).__name__,
                            batch.queued_ns / 1e9,
                        ),
                        batch.record,
                    )
                raise
            return self._settle(model, response, estimate, reservation, span, tally, role, batch)
        finally:
            if token is not None:
                otel_context.detach(token)
            span.end()

    def _settle(
        self, model: LanguageModel, response: ModelResponse, estimate: Spend, reservation: Reservation, span: Span,
        tally: _Tally, role: str, batch: _Batch,
    ) -> ModelResponse:
        """Charge a successful call to the ledger, finish its span and record it."""
        usage = response.usage
        if usage.estimated or usage.input_tokens <= 0 < estimate.input_tokens:
            # the provider reported no usage: charge at least the (conservative) reservation
            usage = Usage(max(usage.input_tokens, estimate.input_tokens),
                          max(usage.output_tokens, estimate.output_tokens), usage.calls or 1, estimated=True)
            span.add_event("usage_unknown", {"rlm.usage.charged": "reservation"})
        cost = self.cost(model, usage)
        cached = usage.cache_read_tokens or usage.cache_write_tokens
        uncached = self.cost(model, Usage(usage.input_tokens, usage.output_tokens, usage.calls)) if cached else cost
        overrun = reservation.settle(usage, cost or 0.0)
        if overrun != Spend():
            self._report_overrun(span, model, overrun, reservation.amount)
        if span.is_recording():
            self._finish_ok(span, response, cost, tally.attempts, tally.throttles, tally.queue_wait)
            span.set_attributes(span_attributes.chat_end(
                response_model=response.model, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                text=response.text, finish_reason=response.finish_reason, capture=batch.capture,
                cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens,
            ))
        self._emit(
            CallRecord(
                model.name, model.provider, role, batch.depth, usage.input_tokens, usage.output_tokens,
                cost, tally.queue_wait, tally.duration, tally.attempts, tally.throttles, None, batch.queued_ns / 1e9,
                cache_read_tokens=usage.cache_read_tokens, cache_write_tokens=usage.cache_write_tokens,
                uncached_cost_usd=uncached,
            ),
            batch.record,
        )
        return response

    def answered(
        self, model: LanguageModel, request: ModelRequest, response: ModelResponse, *,
        source: Literal["cache", "journal"], cost: float | None, role: str, depth: int, record: CallRecorder | None,
        parent: otel_context.Context | None, capture: int = 0,
    ) -> None:
        """Report a call answered without a provider request (from the sub-call cache or a
        journal): a ``chat`` span marked ``rlm.call.source``, a metric, and a record. Nothing is
        admitted on a lane or charged here: the caller charges a journal's answer to its ledger
        (it was paid by the run), a cache hit costs nothing.
        """
        telemetry = current_telemetry()
        tracer = telemetry.tracer if telemetry is not None else self._tracer
        usage = response.usage
        span = tracer.start_span(
            attr.chat_span_name(model.name),
            context=parent if parent is not None else otel_context.get_current(),
            kind=trace.SpanKind.CLIENT,
            attributes=span_attributes.chat_start(
                provider=model.provider, model=model.name, max_tokens=request.max_tokens, depth=depth, role=role,
                prompt_chars=request.prompt_chars, messages=request.messages, capture=capture,
                endpoint=getattr(model, "endpoint", None),
            ),
        )
        if span.is_recording():
            span.set_attribute(attr.RLM_CALL_SOURCE, source)
            self._finish_ok(span, response, cost, 0, 0, 0.0)
            span.set_attributes(span_attributes.chat_end(
                response_model=response.model, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                text=response.text, finish_reason=response.finish_reason, capture=capture,
            ))
        span.end()
        self._emit(
            CallRecord(
                model.name, model.provider, role, depth, usage.input_tokens, usage.output_tokens, cost, 0.0, 0.0,
                attempts=0, started_at=time.time(), from_journal=source == "journal", cached=source == "cache",
            ),
            record,
        )

    async def _attempts(
        self, request: ModelRequest, span: Span, window_tokens: float, tally: _Tally, batch: _Batch
    ) -> ModelResponse:
        """Send until success or until the retry policy gives up; every attempt reports to the lane."""
        model, lane = batch.model, batch.lane
        seq: int | None = None
        while True:
            tally.attempts += 1
            ticket = await lane.acquire(priority=batch.priority, share=batch.share, tokens=window_tokens, seq=seq)
            # the first attempt waited since the batch was queued; a retry since it asked again
            queued_at = batch.queued_at if seq is None else ticket.queued_at
            seq = ticket.seq  # a retry keeps its place in line
            tally.queue_wait += ticket.admitted_at - queued_at
            started = time.perf_counter()
            try:
                response = await model.request(request)
            except RLMError as exc:
                refused = isinstance(exc, (ThrottledError, QuotaExhaustedError))
                retry_after = getattr(exc, "retry_after", None)
                if refused:
                    tally.throttles += 1
                    verdict = lane.on_refusal(
                        ticket, retry_after=retry_after, exhausted=isinstance(exc, QuotaExhaustedError)
                    )
                    if verdict.pause:
                        span.add_event("lane_paused", {"rlm.lane": lane.key, "retry_after_s": retry_after or 0.0})
                else:
                    tally.failures += 1
                    lane.on_error(ticket)
                delay = self.retry.delay(tally.failures if not refused else tally.throttles, exc)
                if not self.retry.should_retry(
                    exc, failures=tally.failures, throttles=tally.throttles,
                    elapsed=self._clock() - batch.queued_at, delay=delay,
                ):
                    raise
                lane.retries += 1
                _logger.info("retrying model call", lane=lane.key, attempt=tally.attempts,
                             error=type(exc).__name__, delay_s=round(delay, 3))
                span.add_event(
                    "retry", {"attempt": tally.attempts, attr.ERROR_TYPE: type(exc).__name__, "delay_s": delay}
                )
                await batch.sleep(delay)
                continue
            except Exception as exc:  # an SDK error a model failed to translate
                lane.on_error(ticket)
                raise ModelError(
                    f"{model.provider}:{model.name} failed: {type(exc).__name__}: {exc}",
                    provider=model.provider,
                    model=model.name,
                ) from exc
            except BaseException:  # cancelled in flight
                lane.on_cancel(ticket)
                tally.cancelled_in_flight = True
                raise
            usage = response.usage
            lane.on_success(
                ticket,
                tokens_used=usage.input_tokens + usage.output_tokens * lane.limits.output_weight,
                pause=pause_from_headers(response.headers) if response.headers else 0.0,
            )
            tally.duration = time.perf_counter() - started
            return response

    def _report_overrun(self, span: Span, model: LanguageModel, overrun: Spend, reserved: Spend) -> None:
        """A call spent more than it reserved: a span event, a metric per quantity, a warning."""
        excess = {k: v for k, v in asdict(overrun).items() if v}
        span.add_event(attr.EVENT_BUDGET_OVERRUN, {f"rlm.budget.overrun.{k}": v for k, v in excess.items()})
        for quantity, value in excess.items():
            self._overrun.add(value, {attr.RLM_BUDGET_QUANTITY: quantity, attr.GEN_AI_REQUEST_MODEL: model.name})
        _logger.warning("model call spent more than its budget reservation", model=model.name,
                        overrun=excess, reserved=asdict(reserved))

    def _emit(self, call: CallRecord, record: CallRecorder | None) -> None:
        telemetry = current_telemetry()
        (telemetry.metrics if telemetry is not None else self._metrics).record(call)
        if record is not None:
            record(call)

    @staticmethod
    def _finish_ok(
        span: Span, response: ModelResponse, cost: float | None, attempts: int, throttles: int, queue_wait: float
    ) -> None:
        span.set_attribute(attr.GEN_AI_RESPONSE_MODEL, response.model)
        span.set_attribute(attr.GEN_AI_USAGE_INPUT_TOKENS, response.usage.input_tokens)
        span.set_attribute(attr.GEN_AI_USAGE_OUTPUT_TOKENS, response.usage.output_tokens)
        if response.usage.cache_read_tokens or response.usage.cache_write_tokens:
            span.set_attribute(attr.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, response.usage.cache_read_tokens)
            span.set_attribute(attr.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS, response.usage.cache_write_tokens)
        if response.finish_reason:
            span.set_attribute(attr.GEN_AI_RESPONSE_FINISH_REASONS, (response.finish_reason,))
        if cost is not None:
            span.set_attribute(attr.RLM_COST_USD, cost)
        span.set_attribute(attr.RLM_ATTEMPTS, attempts)
        span.set_attribute(attr.RLM_THROTTLES, throttles)
        span.set_attribute(attr.RLM_QUEUE_WAIT_S, queue_wait)

    @staticmethod
    def _finish_failed(span: Span, exc: BaseException, attempts: int, throttles: int, queue_wait: float) -> None:
        span.set_attribute(attr.ERROR_TYPE, type(exc).__name__)
        span.set_attribute(attr.RLM_ATTEMPTS, attempts)
        span.set_attribute(attr.RLM_THROTTLES, throttles)
        span.set_attribute(attr.RLM_QUEUE_WAIT_S, queue_wait)
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            # not the task machinery's own words ("Cancelled via cancel scope 7f7b... by <Task...>")
            description = "cancelled: the run was cancelled or passed its deadline"
        else:
            description = str(getattr(exc, "message", None) or exc)[:200]
        span.set_status(Status(StatusCode.ERROR, description))

    @property
    def lanes(self) -> Mapping[str, Lane | SharedLane]:
        """A live read-only view of the lanes by key (what the lane gauges read, from any thread)."""
        return MappingProxyType(self._lanes)

    def statistics(self) -> list[LaneStatistics]:
        """A snapshot of every lane."""
        return [lane.statistics() for lane in self._lanes.values()]

    def __repr__(self) -> str:
        return f"Dispatcher(lanes={list(self._lanes.values())!r})"
