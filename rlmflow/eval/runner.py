"""Running approaches over items: concurrently, under one Dispatcher, resumable from a JSONL file.

Each finished (item, approach) pair appends one JSON line to the results file at once, so an
interrupted evaluation loses only the items in flight; a rerun reads the file and skips every
pair already there (``retry_failed=True`` reruns the ones whose ``success`` is false).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from opentelemetry import trace

from .._util import single_exception
from ..dispatch.budget import Budget
from ..dispatch.dispatcher import Dispatcher
from .approaches import Approach, Outcome
from .items import DatasetError, EvalItem
from .scoring import score

__all__ = ["EvalProgress", "ItemResult", "read_results", "run_eval"]

_REPLY_CAP = 2000


@dataclass
class ItemResult:
    """One line of the results file: an item answered by one approach."""

    item_id: str
    approach: str
    model: str
    expected: str
    answer: str | None
    correct: bool
    success: bool
    turns: int
    sub_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    latency_s: float
    trace_id: str | None
    error_type: str | None
    error: str | None = None
    reply: str | None = None
    context_chars: int = 0
    domain: str = ""
    sub_domain: str = ""
    difficulty: str = ""
    length: str = ""
    dataset: str = ""
    finished_at: float = 0.0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    uncached_cost_usd: float | None = None  # the cost with no prompt cache (None: unknown, or an older file)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.item_id, self.approach, self.model

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ItemResult:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass
class EvalProgress:
    """Live counters for a progress display; updated by :func:`run_eval`, read by anyone."""

    total: int = 0
    done: int = 0
    failed: int = 0
    correct: int = 0
    resumed: int = 0
    running: int = 0
    cost_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    last: ItemResult | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.done if self.done else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the pace so far (items resumed from the file do not count)."""
        if not self.done:
            return None
        return (time.monotonic() - self.started) / self.done * (self.total - self.done)


def read_results(path: str | Path) -> list[ItemResult]:
    """Results of a file; a pair recorded twice (a retried item) keeps its last line.

    A line that is not JSON is the remnant of an interrupted write and is skipped; a JSON line
    that is not a result record raises :class:`DatasetError` naming the line.
    """
    path = Path(path)
    latest: dict[tuple[str, str, str], ItemResult] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        try:
            result = ItemResult.from_json(raw)
        except (TypeError, AttributeError) as exc:
            raise DatasetError(f"not a result record ({exc})", source=str(path), item=f"line {number}") from exc
        latest[result.key] = result
    return list(latest.values())


class _Sink:
    """Appends result lines; one writer at a time, off the event loop."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = anyio.Lock()

    def _append(self, line: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("a+b") as fh:
            if fh.tell() > 0:  # after an interrupted write, start on a line of our own
                fh.seek(-1, 2)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
            fh.write(line.encode("utf-8") + b"\n")
            fh.flush()

    async def write(self, result: ItemResult) -> None:
        line = json.dumps(asdict(result), ensure_ascii=False)
        async with self._lock:
            await anyio.to_thread.run_sync(self._append, line)


class _CostPool:
    """The evaluation's total cost cap: an item starts only if its own cap fits in what is left.

    With a per-item cost cap the total can never be crossed (each item reserves its cap before it
    starts); without one, items start while anything is left, so the total can be crossed by at
    most the items in flight.
    """

    def __init__(self, total: float | None, per_item: float | None) -> None:
        self.total = total
        self.per_item = per_item
        self.spent = 0.0
        self.reserved = 0.0

    def try_reserve(self) -> float | None:
        if self.total is None:
            return 0.0
        need = self.per_item or 0.0
        if self.spent + self.reserved + need > self.total or self.spent >= self.total:
            return None
        self.reserved += need
        return need

    def settle(self, reserved: float, cost: float | None) -> None:
        self.reserved -= reserved
        self.spent += cost or 0.0


def _result(item: EvalItem, approach: Approach, outcome: Outcome, latency: float) -> ItemResult:
    answer, correct = score(outcome.reply, item.answer, item.choices)
    return ItemResult(
        item_id=item.id, approach=approach.name, model=approach.model_label, expected=item.answer,
        answer=answer, correct=correct and outcome.success, success=outcome.success, turns=outcome.turns,
        sub_calls=outcome.sub_calls, input_tokens=outcome.input_tokens, output_tokens=outcome.output_tokens,
        cost_usd=outcome.cost_usd, latency_s=round(latency, 3), trace_id=outcome.trace_id,
        cache_read_tokens=outcome.cache_read_tokens, cache_write_tokens=outcome.cache_write_tokens,
        uncached_cost_usd=outcome.uncached_cost_usd,
        error_type=outcome.error_type, error=outcome.error[:500] if outcome.error else None,
        reply=outcome.reply[:_REPLY_CAP] if outcome.reply else outcome.reply, context_chars=item.context_chars,
        domain=item.domain, sub_domain=item.sub_domain, difficulty=item.difficulty, length=item.length,
        dataset=item.source, finished_at=time.time(),
    )


async def run_eval(
    items: Sequence[EvalItem],
    approaches: Sequence[Approach],
    *,
    results: str | Path,
    dispatcher: Dispatcher | None = None,
    concurrency: int = 4,
    item_budget: Budget | None = None,
    max_cost_usd: float | None = None,
    retry_failed: bool = False,
    progress: EvalProgress | None = None,
    tracer_provider: trace.TracerProvider | None = None,
) -> list[ItemResult]:
    """Answer every item with every approach; return all results (resumed ones included).

    Up to ``concurrency`` pairs run at once, all through ``dispatcher`` (one is made if not
    given), each under ``item_budget``; ``max_cost_usd`` caps the whole evaluation (see
    :class:`_CostPool`): pairs that cannot start for it are recorded as failed with
    ``BudgetExceededError``. The approaches are closed at the end.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    path = Path(results)
    done: dict[tuple[str, str, str], ItemResult] = {}
    if await anyio.Path(path).exists():
        for previous in await anyio.to_thread.run_sync(read_results, path):
            if previous.success or not retry_failed:
                done[previous.key] = previous
    dispatcher = dispatcher or Dispatcher(tracer_provider=tracer_provider)
    budget = item_budget or Budget()
    pool = _CostPool(max_cost_usd, budget.max_cost_usd)
    sink = _Sink(path)
    tracer = trace.get_tracer("rlmflow.eval", tracer_provider=tracer_provider)
    progress = progress or EvalProgress()
    jobs = [(item, approach) for item in items for approach in approaches]
    todo = [(i, a) for i, a in jobs if (i.id, a.name, a.model_label) not in done]
    progress.total = len(todo)
    progress.resumed = len(jobs) - len(todo)
    progress.started = time.monotonic()
    finished: list[ItemResult] = list(done.values())
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(item: EvalItem, approach: Approach) -> None:
        async with limiter:
            reserved = pool.try_reserve()
            started = time.monotonic()
            if reserved is None:
                outcome = Outcome(None, False, "BudgetExceededError",
                                  f"the evaluation's cost cap of ${max_cost_usd:g} is spent")
            else:
                progress.running += 1
                try:
                    with tracer.start_as_current_span(
                        "rlm.eval.item", attributes={"rlm.eval.item_id": item.id, "rlm.eval.approach": approach.name}
                    ) as span:
                        try:
                            context = await anyio.to_thread.run_sync(item.load_context)
                        except DatasetError as exc:
                            outcome = Outcome(None, False, "DatasetError", exc.message)
                        else:
                            outcome = await approach.answer(item, context, dispatcher=dispatcher, budget=budget)
                        if outcome.trace_id is None and span.get_span_context().is_valid:
                            outcome.trace_id = format(span.get_span_context().trace_id, "032x")
                finally:
                    progress.running -= 1
                    pool.settle(reserved, None)
                pool.spent += outcome.cost_usd or 0.0
            result = _result(item, approach, outcome, time.monotonic() - started)
            await sink.write(result)
            finished.append(result)
            progress.done += 1
            progress.failed += not result.success
            progress.correct += result.correct
            progress.cost_usd += result.cost_usd or 0.0
            progress.last = result

    try:
        with single_exception():
            async with anyio.create_task_group() as tg:
                for item, approach in todo:
                    tg.start_soon(one, item, approach)
    finally:
        with anyio.CancelScope(shield=True):
            for approach in approaches:
                await approach.aclose()
    return finished

