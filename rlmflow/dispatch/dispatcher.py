"""The Dispatcher: the single door every model call, root or sub, passes through.

For each call it: reserves the worst case on the run's budget ledger (refusing what cannot fit,
before anything is sent); waits for admission on the model's :class:`Lane` (priority, fair share,
adaptive concurrency, RPM/TPM windows, server pauses); sends; retries what is retryable with
jittered backoff; feeds the outcome back to the lane; settles the ledger to the real usage; and
records a ``chat {model}`` span and a :class:`CallRecord`. Cancellation at any point releases the
reservation and the lane slot, and cancels the request in flight.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

from .._exceptions import ConfigurationError, ModelError, RLMError, ThrottledError
from .._util import single_exception
from ..models.base import LanguageModel, ModelRequest, ModelResponse, Usage
from ..telemetry import attributes as attr
from ..telemetry.logs import get_logger
from ..telemetry.metrics import CallMetrics
from .budget import BudgetLedger, Reservation, Spend
from .headers import pause_from_headers
from .lane import Lane, LaneStatistics, RunShare
from .limits import Limits, Priority
from .pricing import Pricing
from .redis_lane import SharedLane
from .retry import RetryPolicy
from .shared import SharedConfig, SharedState

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DEFAULT_LIMITS", "CallRecord", "Dispatcher", "LaneStatistics", "RunShare"]

_logger = get_logger("rlmflow.dispatch")

#: Defaults by provider: a local model computes on this machine's cores, one call at a time.
DEFAULT_LIMITS: dict[str, Limits] = {
    "llama.cpp": Limits(max_concurrency=1),
    "scripted": Limits(max_concurrency=64),
    "openai": Limits(max_concurrency=32),
    "aws.bedrock": Limits(max_concurrency=16),
    "anthropic": Limits(max_concurrency=16),
}


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What one model call cost and how long it took; ``error`` names the final exception type."""

    model: str
    provider: str
    role: str
    depth: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    queue_wait: float
    duration: float
    attempts: int = 1
    throttles: int = 0
    error: str | None = None
    started_at: float = 0.0  # wall clock (time.time()) when the call was queued


Recorder = Callable[[CallRecord], None]


def _capture_messages(request: ModelRequest, limit: int) -> str:
    """Messages as the GenAI conventions' JSON, each content cut to ``limit`` characters."""
    return json.dumps([{"role": m.role, "content": m.content[:limit]} for m in request.messages], ensure_ascii=False)


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
        self._limits = dict(limits or {})
        self._lanes: dict[str, Lane | SharedLane] = {}
        # shared=: lanes kept in Redis across processes (docs/scaling.md); None keeps them in memory
        self.shared = shared if isinstance(shared, SharedState) or shared is None else SharedState(
            shared, meter_provider=meter_provider, clock=clock
        )
        self.retry = retry or RetryPolicy()
        self.pricing = pricing or Pricing()
        self._tracer = trace.get_tracer("rlmflow", tracer_provider=tracer_provider)
        self._metrics = CallMetrics(meter_provider, self.statistics)
        self._clock = clock or anyio.current_time

    @classmethod
    def from_policy(cls, path: str | Path, **kwargs: Any) -> Dispatcher:
        """A Dispatcher configured from a TOML policy file (see ``docs/policies.md``).

        ``[lanes."<provider>:<model>"]`` and ``[lanes.<provider>]`` tables hold :class:`Limits`
        fields; ``[retry]`` holds :class:`RetryPolicy` fields. Unknown keys are errors.
        """
        try:
            policy = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read the policy file {path}: {exc}") from exc
        unknown = set(policy) - {"lanes", "retry", "shared"}
        if unknown:
            raise ConfigurationError(f"unknown sections in {path}: {sorted(unknown)}")
        try:
            limits = {key: Limits(**table) for key, table in (policy.get("lanes") or {}).items()}
            retry = RetryPolicy(**policy["retry"]) if "retry" in policy else None
            if "shared" in policy:
                kwargs.setdefault("shared", SharedConfig(**policy["shared"]))
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"invalid policy in {path}: {exc}") from exc
        return cls(limits=limits, retry=retry, **kwargs)

    # -- lanes ------------------------------------------------------------------------------------
    def lane_key(self, model: LanguageModel) -> str:
        return f"{model.provider}:{model.name}"

    def lane(self, model: LanguageModel) -> Lane | SharedLane:
        """The lane of ``model``, created with its configured limits on first use."""
        key = self.lane_key(model)
        lane = self._lanes.get(key)
        if lane is None:
            limits = self._limits.get(key) or self._limits.get(model.provider) or DEFAULT_LIMITS.get(
                model.provider, Limits()
            )
            if self.shared is not None:
                lane = self._lanes[key] = SharedLane(key, limits, self.shared, clock=self._clock)
            else:
                lane = self._lanes[key] = Lane(key, limits, clock=self._clock)
        return lane

    async def aclose(self) -> None:
        """Close the shared state (Redis) this Dispatcher uses, if any; in-memory lanes need nothing."""
        if self.shared is not None:
            await self.shared.aclose()

    def estimate(self, model: LanguageModel, request: ModelRequest) -> Spend:
        """The worst case a request can spend: its input tokens, ``max_tokens``, and their price."""
        input_tokens = sum(model.count_tokens(m.content) for m in request.messages)
        worst = Usage(input_tokens, request.max_tokens, 1)
        cost = self.pricing.cost(model.provider, model.name, worst)
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
        record: Recorder | None = None,
        parent: otel_context.Context | None = None,
        capture: int = 0,
    ) -> ModelResponse:
        """Send one request. Raises ``BudgetExceededError`` before sending if it cannot fit."""
        estimate = self.estimate(model, request)
        (reservation,) = ledger.reserve_many([estimate])
        return await self._send(
            model, request, estimate, reservation, share or RunShare(), priority, depth, record, parent, capture
        )

    async def call_many(
        self,
        model: LanguageModel,
        requests: Sequence[ModelRequest],
        *,
        ledger: BudgetLedger,
        share: RunShare | None = None,
        priority: Priority = Priority.SUB,
        depth: int = 0,
        record: Recorder | None = None,
        parent: otel_context.Context | None = None,
        capture: int = 0,
    ) -> list[ModelResponse | RLMError]:
        """Send requests concurrently; results in input order, a failure in its own place.

        The whole batch is reserved first: if it cannot fit, ``BudgetExceededError`` is raised
        and nothing is sent. Each item's failure is returned in place, after every other item
        has finished.
        """
        share = share or RunShare()
        estimates = [self.estimate(model, r) for r in requests]
        reservations = ledger.reserve_many(estimates)
        outcomes: list[ModelResponse | RLMError | None] = [None] * len(requests)

        async def one(index: int) -> None:
            try:
                outcomes[index] = await self._send(
                    model, requests[index], estimates[index], reservations[index], share, priority, depth,
                    record, parent, capture,
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
        estimate: Spend,
        reservation: Reservation,
        share: RunShare,
        priority: Priority,
        depth: int,
        record: Recorder | None,
        parent: otel_context.Context | None,
        capture: int = 0,
    ) -> ModelResponse:
        lane = self.lane(model)
        role = "root" if priority == Priority.ROOT else "sub"
        weight = lane.limits.output_weight
        window_tokens = estimate.input_tokens + request.max_tokens * weight
        first_queued = self._clock()
        started_at = time.time()
        attempts = throttles = 0
        queue_wait = 0.0
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
            if capture:
                span.set_attribute(attr.GEN_AI_INPUT_MESSAGES, _capture_messages(request, capture))
            try:
                while True:
                    attempts += 1
                    ticket = await lane.acquire(priority=priority, share=share, tokens=window_tokens)
                    queue_wait += ticket.admitted_at - ticket.queued_at
                    started = time.perf_counter()
                    try:
                        response = await model.request(request)
                    except RLMError as exc:
                        throttled = isinstance(exc, ThrottledError)
                        throttles += throttled
                        retry_after = getattr(exc, "retry_after", None) or 0.0
                        lane.release(ticket, outcome="throttled" if throttled else "error", pause=retry_after)
                        delay = self.retry.delay(attempts, exc)
                        elapsed = self._clock() - first_queued
                        if (
                            not self.retry.retryable(exc)
                            or attempts >= self.retry.max_attempts
                            or elapsed + delay > self.retry.deadline
                        ):
                            raise
                        lane.retries += 1
                        _logger.info("retrying model call", lane=lane.key, attempt=attempts,
                                     error=type(exc).__name__, delay_s=round(delay, 3))
                        span.add_event(
                            "retry",
                            {"attempt": attempts, attr.ERROR_TYPE: type(exc).__name__, "delay_s": delay},
                        )
                        await anyio.sleep(delay)
                        continue
                    except Exception as exc:  # an SDK error a model failed to translate
                        lane.release(ticket, outcome="error")
                        raise ModelError(
                            f"{model.provider}:{model.name} failed: {type(exc).__name__}: {exc}",
                            provider=model.provider,
                            model=model.name,
                        ) from exc
                    except BaseException:  # cancelled in flight
                        lane.release(ticket, outcome="cancelled")
                        raise
                    usage = response.usage
                    lane.release(
                        ticket,
                        outcome="success",
                        tokens_used=usage.input_tokens + usage.output_tokens * weight,
                        pause=pause_from_headers(response.headers) if response.headers else 0.0,
                    )
                    break
            except BaseException as exc:
                reservation.release()
                self._finish_failed(span, exc, attempts, throttles, queue_wait)
                if isinstance(exc, Exception):
                    self._emit(
                        CallRecord(
                            model.name, model.provider, role, depth, 0, 0, 0.0, queue_wait,
                            self._clock() - first_queued, attempts, throttles, type(exc).__name__, started_at,
                        ),
                        record,
                    )
                raise
            duration = time.perf_counter() - started
            cost = self.pricing.cost(model.provider, model.name, usage)
            reservation.settle(usage, cost or 0.0)
            self._finish_ok(span, response, cost, attempts, throttles, queue_wait)
            if capture:
                span.set_attribute(attr.GEN_AI_OUTPUT_MESSAGES, json.dumps(
                    [{"role": "assistant", "content": response.text[:capture]}], ensure_ascii=False
                ))
            self._emit(
                CallRecord(
                    model.name, model.provider, role, depth, usage.input_tokens, usage.output_tokens,
                    cost, queue_wait, duration, attempts, throttles, None, started_at,
                ),
                record,
            )
            return response

    def _emit(self, call: CallRecord, record: Recorder | None) -> None:
        self._metrics.record(call)
        if record is not None:
            record(call)

    @staticmethod
    def _finish_ok(
        span: Span, response: ModelResponse, cost: float | None, attempts: int, throttles: int, queue_wait: float
    ) -> None:
        span.set_attribute(attr.GEN_AI_RESPONSE_MODEL, response.model)
        span.set_attribute(attr.GEN_AI_USAGE_INPUT_TOKENS, response.usage.input_tokens)
        span.set_attribute(attr.GEN_AI_USAGE_OUTPUT_TOKENS, response.usage.output_tokens)
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
        span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))

    def statistics(self) -> list[LaneStatistics]:
        """A snapshot of every lane."""
        return [lane.statistics() for lane in self._lanes.values()]

    def __repr__(self) -> str:
        return f"Dispatcher(lanes={list(self._lanes.values())!r})"
