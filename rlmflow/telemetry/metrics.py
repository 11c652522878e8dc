"""OpenTelemetry metrics of model calls and lanes.

GenAI metric names where the conventions have them (``gen_ai.client.token.usage``,
``gen_ai.client.operation.duration``), ours otherwise. Instruments come from the meter provider
the application passes, or the global one (a no-op until the application configures an SDK).

The lane gauges are observed by the metric reader's thread (a periodic exporter's, or the one
that flushes at shutdown), not on the event loop: their callbacks read two plain integers of each
lane and call nothing that needs a running loop, and they never raise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from . import attributes as attr

if TYPE_CHECKING:
    from ..dispatch.records import CallRecord

__all__ = ["CallMetrics", "ObservedLane"]


class _Limit(Protocol):
    @property
    def level(self) -> int: ...


class ObservedLane(Protocol):
    """What the gauges read of a lane (``rlmflow.dispatch.lane.Lane`` is one): plain attributes only."""

    @property
    def in_flight(self) -> int: ...

    @property
    def concurrency(self) -> _Limit: ...


class CallMetrics:
    """Records every finished call; observes lanes when the metric reader collects.

    ``lanes`` is the live mapping of lane key to lane (the dispatcher's own dict): the gauges
    take a snapshot of it from whichever thread collects.
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        lanes: Mapping[str, ObservedLane] | None = None,
    ) -> None:
        meter = metrics.get_meter("rlmflow", meter_provider=meter_provider)
        self._tokens = meter.create_histogram(
            attr.METRIC_TOKEN_USAGE, unit="{token}", description="Tokens per call, by gen_ai.token.type"
        )
        self._duration = meter.create_histogram(
            attr.METRIC_OPERATION_DURATION, unit="s", description="Duration of model calls"
        )
        self._queue_wait = meter.create_histogram(
            attr.METRIC_QUEUE_WAIT, unit="s", description="Time calls waited for admission on their lane"
        )
        self._cost = meter.create_counter(attr.METRIC_COST, unit="USD", description="Cost of model calls")
        self._cache = meter.create_counter(
            attr.METRIC_CACHE_TOKENS, unit="{token}",
            description="Input tokens read from or written to a prompt cache, by rlm.cache.operation",
        )
        self._throttles = meter.create_counter(attr.METRIC_THROTTLES, description="Calls refused for rate")
        self._retries = meter.create_counter(attr.METRIC_RETRIES, description="Retried attempts")
        self._answered = meter.create_counter(
            attr.METRIC_ANSWERED, description="Calls answered from the sub-call cache or a journal, no request sent"
        )
        self._lanes = lanes
        if lanes is not None:
            meter.create_observable_gauge(attr.METRIC_LANE_IN_FLIGHT, callbacks=[self._observe_in_flight],
                                          description="Calls in flight per lane")
            meter.create_observable_gauge(attr.METRIC_LANE_LIMIT, callbacks=[self._observe_limit],
                                          description="Adaptive concurrency limit per lane")

    def record(self, call: CallRecord) -> None:
        common = {
            attr.GEN_AI_OPERATION_NAME: attr.OPERATION_CHAT,
            attr.GEN_AI_PROVIDER_NAME: call.provider,
            attr.GEN_AI_REQUEST_MODEL: call.model,
            attr.RLM_ROLE: call.role,
        }
        source = call.source
        if source is not None:  # no provider request: its duration and tokens are not a client's
            self._answered.add(1, {**common, attr.RLM_CALL_SOURCE: source})
            return
        if call.error is not None:
            common[attr.ERROR_TYPE] = call.error
        self._duration.record(call.duration, common)
        self._queue_wait.record(call.queue_wait, common)
        if call.error is None:
            self._tokens.record(call.input_tokens, {**common, attr.GEN_AI_TOKEN_TYPE: "input"})
            self._tokens.record(call.output_tokens, {**common, attr.GEN_AI_TOKEN_TYPE: "output"})
            if call.cost_usd:
                self._cost.add(call.cost_usd, common)
            if call.cache_read_tokens:
                self._cache.add(call.cache_read_tokens, {**common, attr.RLM_CACHE_OPERATION: "read"})
            if call.cache_write_tokens:
                self._cache.add(call.cache_write_tokens, {**common, attr.RLM_CACHE_OPERATION: "write"})
        if call.throttles:
            self._throttles.add(call.throttles, common)
        if call.attempts > 1:
            self._retries.add(call.attempts - 1, common)

    def _snapshot(self) -> list[tuple[str, int, int]]:
        """(key, in flight, limit) of every lane; empty if the lanes cannot be read right now."""
        if self._lanes is None:
            return []
        try:
            # copying a dict is one C call under the GIL, so the loop thread cannot resize it midway;
            # the except is for a mapping that is not a plain dict
            lanes = tuple(self._lanes.items())
            return [(key, int(lane.in_flight), int(lane.concurrency.level)) for key, lane in lanes]
        except Exception:  # a gauge must never fail the collection of the others
            return []

    def _observe_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(in_flight, {attr.RLM_LANE: key}) for key, in_flight, _ in self._snapshot()]

    def _observe_limit(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(limit, {attr.RLM_LANE: key}) for key, _, limit in self._snapshot()]
