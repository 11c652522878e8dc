"""How a batch reaches the lane: a pool of senders as wide as the lane's ceiling, stand-ins for
senders sleeping before a retry, the backlog counted as waiting, spans that start when the
batch was queued, and the lane's shortcut for a call nobody waits ahead of."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import BudgetLedger, Dispatcher, Limits, ModelRequest, RetryPolicy, ScriptedModel, TransientModelError
from rlmflow.dispatch.lane import Lane, RunShare
from rlmflow.dispatch.limits import Priority

pytestmark = pytest.mark.anyio


def prompts(n: int) -> list[ModelRequest]:
    return [ModelRequest.from_prompt(f"prompt {i}", max_tokens=8) for i in range(n)]


def index_of(request: ModelRequest) -> int:
    return int(request.messages[-1].content.split()[1])


async def test_a_batch_runs_on_as_many_tasks_as_the_lane_may_have_in_flight() -> None:
    live = peak = 0

    async def reply(request: ModelRequest) -> str:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await anyio.sleep(0.001)
        live -= 1
        return "ok"

    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=4, initial_concurrency=4)})
    seen_tasks: list[int] = []

    async def watch() -> None:
        while True:
            seen_tasks.append(len(asyncio.all_tasks()))
            await anyio.lowlevel.checkpoint()

    baseline = len(asyncio.all_tasks())
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        outcomes = await dispatcher.call_many(ScriptedModel(reply), prompts(200), ledger=BudgetLedger())
        tg.cancel_scope.cancel()
    assert [o.text for o in outcomes] == ["ok"] * 200  # type: ignore[union-attr]
    assert peak == 4
    # the watcher and at most four senders: never a task per item
    assert max(seen_tasks) <= baseline + 1 + 4, (baseline, max(seen_tasks))


async def test_senders_sleeping_before_a_retry_are_replaced() -> None:
    """The first attempts of items 0-3 fail and wait 0.5 s to retry; the other items must not
    wait for them: stand-ins keep four senders at work."""
    attempts: dict[int, int] = {}
    finished: list[int] = []

    async def reply(request: ModelRequest) -> str:
        index = index_of(request)
        attempts[index] = attempts.get(index, 0) + 1
        if index < 4 and attempts[index] == 1:
            raise TransientModelError("try again", provider="scripted", model="scripted", retry_after=0.5)
        await anyio.sleep(0.001)
        finished.append(index)
        return "ok"

    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=4, initial_concurrency=4)},
        retry=RetryPolicy(base_delay=0.01, max_delay=0.5, seed=1),
    )
    outcomes = await dispatcher.call_many(ScriptedModel(reply), prompts(40), ledger=BudgetLedger())
    assert all(not isinstance(o, Exception) for o in outcomes)
    assert sorted(finished) == list(range(40))
    # everything else finished while the four failed items slept
    assert set(finished[:36]) == set(range(4, 40)), finished
    (lane,) = dispatcher.statistics()
    assert lane.in_flight == 0 and lane.waiting == 0 and lane.retries == 4


async def test_the_backlog_counts_as_waiting_and_spans_start_when_the_batch_was_queued() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    waiting_seen: list[int] = []
    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=2, initial_concurrency=2)},
                            tracer_provider=provider)

    async def reply(request: ModelRequest) -> str:
        waiting_seen.append(dispatcher.statistics()[0].waiting)
        await anyio.sleep(0.01)
        return "ok"

    await dispatcher.call_many(ScriptedModel(reply), prompts(10), ledger=BudgetLedger())
    assert waiting_seen[0] >= 8  # eight items not sent yet while the first two are out
    assert dispatcher.statistics()[0].waiting == 0
    spans = sorted(exporter.get_finished_spans(), key=lambda s: s.end_time or 0)
    assert len(spans) == 10
    starts = {s.start_time for s in spans}
    assert len(starts) == 1  # all queued together
    last = spans[-1]
    assert last.attributes is not None
    queue_wait = float(last.attributes["rlm.queue_wait_s"])  # type: ignore[arg-type]
    assert queue_wait >= 0.03  # the last item waited for four pairs ahead of it
    assert (last.end_time or 0) - (last.start_time or 0) >= queue_wait * 1e9


async def test_a_call_nobody_waits_ahead_of_goes_at_once_and_a_cancelled_one_takes_no_slot() -> None:
    lane = Lane("m", Limits(max_concurrency=2, initial_concurrency=2))
    share = RunShare()
    first = await lane.acquire(priority=Priority.SUB, share=share, tokens=1)
    assert lane.in_flight == 1 and lane.statistics().waiting == 0
    with anyio.CancelScope() as scope:
        scope.cancel()
        await lane.acquire(priority=Priority.SUB, share=share, tokens=1)
    assert lane.in_flight == 1 and share.in_flight == 1  # the cancelled caller took nothing
    second = await lane.acquire(priority=Priority.SUB, share=share, tokens=1)
    assert lane.in_flight == 2
    # full now: the next caller waits until a slot frees
    got: list[object] = []

    async def third() -> None:
        got.append(await lane.acquire(priority=Priority.SUB, share=share, tokens=1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await anyio.sleep(0.01)
        assert got == [] and lane.statistics().waiting == 1
        lane.on_success(first)
    assert len(got) == 1 and lane.in_flight == 2
    lane.on_success(second)
