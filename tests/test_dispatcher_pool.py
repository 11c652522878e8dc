"""The Dispatcher's pool of senders under adversarial use: stand-ins, the lane's fast path, the
backlog counter, span parenting, cancellation at any await (anyio scopes and native task
cancellation), deadlines, fairness, root priority, and a shared (Redis) lane."""

from __future__ import annotations

import asyncio
import time

import anyio
import anyio.lowlevel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import (
    BudgetLedger,
    Dispatcher,
    Limits,
    ModelRequest,
    RetryPolicy,
    ScriptedModel,
    TransientModelError,
)
from rlmflow.dispatch.budget import Spend
from rlmflow.dispatch.lane import RunShare
from rlmflow.dispatch.limits import Priority
from rlmflow.dispatch.records import CallRecord
from rlmflow.dispatch.shared import SharedConfig, SharedState

from .redis_server import RedisServer

pytestmark = pytest.mark.anyio


def prompts(n: int, tag: str = "prompt") -> list[ModelRequest]:
    return [ModelRequest.from_prompt(f"{tag} {i}", max_tokens=8) for i in range(n)]


def index_of(request: ModelRequest) -> int:
    return int(request.messages[-1].content.split()[1])


def tag_of(request: ModelRequest) -> str:
    return request.messages[-1].content.split()[0]


def again(delay: float) -> TransientModelError:
    return TransientModelError("try again", provider="scripted", model="scripted", retry_after=delay)


def tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


# -- span parenting --------------------------------------------------------------------------------


async def test_stand_in_chat_spans_keep_the_callers_span_as_parent() -> None:
    """With ``parent=None`` a chat span's parent is the caller's current span. A stand-in is
    started from inside the sleeping sender's ``_send``, where that item's chat span is attached
    as current, so the stand-in's items become children of another item's chat span."""
    provider, exporter = tracing()
    tried: set[int] = set()

    async def reply(request: ModelRequest) -> str:
        index = index_of(request)
        if index == 0 and index not in tried:
            tried.add(index)
            raise again(0.05)
        await anyio.sleep(0.001)
        return "ok"

    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=2, initial_concurrency=2)},
        retry=RetryPolicy(base_delay=0.001, max_delay=0.05, seed=1),
        tracer_provider=provider,
    )
    tracer = provider.get_tracer("review")
    with tracer.start_as_current_span("cell") as cell:
        outcomes = await dispatcher.call_many(ScriptedModel(reply), prompts(10), ledger=BudgetLedger())
    assert all(not isinstance(o, Exception) for o in outcomes)
    chats = [s for s in exporter.get_finished_spans() if s.name.startswith("chat")]
    assert len(chats) == 10
    wrong = [s.name for s in chats if s.parent is None or s.parent.span_id != cell.get_span_context().span_id]
    assert wrong == [], f"{len(wrong)} chat spans are not children of the caller's span"


async def test_during_each_request_the_current_span_is_that_calls_own_chat_span() -> None:
    """What log correlation reads (the current span) while a request is out, with a tracer SDK
    and the parent passed as the bridge passes it: each call's own chat span, for first senders,
    retries and stand-ins alike."""
    provider, exporter = tracing()
    tried: set[int] = set()
    current: dict[tuple[int, int], int] = {}

    async def reply(request: ModelRequest) -> str:
        index = index_of(request)
        attempt = 2 if index in tried else 1
        current[(index, attempt)] = trace.get_current_span().get_span_context().span_id
        if index % 3 == 0 and attempt == 1:
            tried.add(index)
            raise again(0.02)
        await anyio.sleep(0.002)
        return "ok"

    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=2, initial_concurrency=2)},
        retry=RetryPolicy(base_delay=0.001, max_delay=0.02, seed=1),
        tracer_provider=provider,
    )
    with provider.get_tracer("review").start_as_current_span("cell") as cell:
        parent = trace.set_span_in_context(cell)
    await dispatcher.call_many(ScriptedModel(reply), prompts(9), ledger=BudgetLedger(), parent=parent)
    chats = {s.context.span_id: s for s in exporter.get_finished_spans() if s.name.startswith("chat")}
    assert len(chats) == 9
    for (index, attempt), span_id in current.items():
        assert span_id in chats, (index, attempt)
        if attempt == 2:
            assert current[(index, 1)] == span_id  # a retry stays in its call's span
    assert len({current[(i, 1)] for i in range(9)}) == 9
    assert all(s.parent is not None and s.parent.span_id == cell.get_span_context().span_id for s in chats.values())


# -- the fast path never yields ---------------------------------------------------------------------


async def test_a_batch_of_calls_that_never_suspend_lets_other_tasks_run() -> None:
    """A model whose request completes without suspending (ScriptedModel with a plain function,
    a cache) runs the whole batch in one go: the lane's fast path admits without a checkpoint,
    so no other task of the loop runs until the batch ends."""
    ticks = 0
    seen: list[int] = []

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    def reply(request: ModelRequest) -> str:
        seen.append(ticks)
        return "ok"

    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=4, initial_concurrency=4)})
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.lowlevel.checkpoint()
        outcomes = await dispatcher.call_many(ScriptedModel(reply), prompts(300), ledger=BudgetLedger())
        tg.cancel_scope.cancel()
    assert len(outcomes) == 300
    assert len(set(seen)) > 1, f"no other task ran during 300 calls (ticker stayed at {seen[0]})"


async def test_a_deadline_stops_a_batch_of_calls_that_never_suspend() -> None:
    """The run's deadline is a cancel scope with a timer; a timer fires only when the loop runs.
    Each call here costs 1 ms of CPU; the 20 ms deadline must stop the 400-call batch early."""
    sent = 0

    def reply(request: ModelRequest) -> str:
        nonlocal sent
        sent += 1
        time.sleep(0.001)  # the CPU a non-suspending call costs
        return "ok"

    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=4, initial_concurrency=4)})
    with anyio.move_on_after(0.02):
        await dispatcher.call_many(ScriptedModel(reply), prompts(400), ledger=BudgetLedger())
    assert sent < 400, "the deadline passed at ~20 calls but every call was still sent"


# -- stand-ins --------------------------------------------------------------------------------------


async def test_senders_stay_within_the_ceiling_plus_one_per_item_being_retried() -> None:
    """Two senders (ceiling 2) sleep before a retry and start two stand-ins, which take slow
    items. When the sleepers wake they wait in line to retry their items: the pool then holds
    the ceiling plus one sender per item being retried, never more, and none after the batch."""
    tried: set[int] = set()

    async def reply(request: ModelRequest) -> str:
        index = index_of(request)
        if index in (0, 1) and index not in tried:
            tried.add(index)
            raise again(0.02 if index == 0 else 0.03)
        await anyio.sleep(0.3 if index in (2, 3) else 0.001)
        return "ok"

    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=2, initial_concurrency=2)},
        retry=RetryPolicy(base_delay=0.001, max_delay=0.03, seed=1),
    )
    senders: list[int] = []
    outcomes: list[object] = []

    async def batch() -> None:
        outcomes.extend(await dispatcher.call_many(ScriptedModel(reply), prompts(8), ledger=BudgetLedger()))

    async with anyio.create_task_group() as tg:
        baseline = len(asyncio.all_tasks())
        tg.start_soon(batch)
        await anyio.sleep(0.15)  # both sleepers woke at ~0.03 s; items 2 and 3 hold the lane
        senders.append(len(asyncio.all_tasks()) - baseline - 1)  # minus the batch's own task
        assert dispatcher.statistics()[0].in_flight <= 2
    assert senders[0] <= 2 + 2, f"{senders[0]} senders alive (ceiling 2, two items being retried)"
    assert len(asyncio.all_tasks()) == baseline
    assert len(outcomes) == 8 and not any(isinstance(o, Exception) for o in outcomes)


async def test_a_batch_finishes_when_every_sender_sleeps_at_once() -> None:
    """Ceiling 1: every item fails once. Each sleeper starts a stand-in, so the batch never
    waits for a sleeper before sending the next item; every item is answered exactly once.
    Each retry waits 0.5 s, ample for six first attempts through stand-ins (a sender that waited
    out its sleep would send a retry second whatever the wait)."""
    attempts: dict[int, int] = {}
    order: list[tuple[int, int]] = []

    async def reply(request: ModelRequest) -> str:
        index = index_of(request)
        attempts[index] = attempts.get(index, 0) + 1
        order.append((index, attempts[index]))
        if attempts[index] == 1:
            raise again(0.5)
        return f"answer {index}"

    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=1, initial_concurrency=1)},
        retry=RetryPolicy(base_delay=0.001, max_delay=0.5, seed=1),
    )
    outcomes = await dispatcher.call_many(ScriptedModel(reply), prompts(6), ledger=BudgetLedger())
    assert [o.text for o in outcomes] == [f"answer {i}" for i in range(6)]  # type: ignore[union-attr]
    assert attempts == {i: 2 for i in range(6)}
    # every first attempt went out before any retry (no sender waited out a sleep)
    assert [a for _, a in order[:6]] == [1] * 6
    (lane,) = dispatcher.statistics()
    assert lane.in_flight == 0 and lane.waiting == 0 and dispatcher.lanes["scripted:scripted"].backlog == 0


# -- cancellation at any await, anyio scope or native task.cancel() ----------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cancel_after=st.integers(0, 80),
    fail_every=st.integers(2, 6),
    ceiling=st.integers(1, 5),
    total=st.integers(1, 25),
    native=st.booleans(),
)
def test_cancellation_at_any_point_leaves_lane_share_and_ledger_clean(
    cancel_after: int, fail_every: int, ceiling: int, total: int, native: bool
) -> None:
    """Cancel a batch after ``cancel_after`` loop turns (an anyio scope or ``task.cancel()``):
    no slot, no backlog, no waiter and no reservation stays behind, and the ledger charged
    exactly the calls that were recorded as successful and those cancelled inside the provider."""

    async def main() -> None:
        tried: set[int] = set()
        inside = 0  # requests the provider holds: cancelled there, they are billed all the same

        async def reply(request: ModelRequest) -> str:
            nonlocal inside
            index = index_of(request)
            inside += 1
            await anyio.lowlevel.checkpoint()
            if index % fail_every == 0 and index not in tried:
                tried.add(index)
                inside -= 1
                raise again(0.001)
            await anyio.lowlevel.checkpoint()
            inside -= 1
            return "ok"

        dispatcher = Dispatcher(
            limits={"scripted": Limits(max_concurrency=ceiling, initial_concurrency=ceiling)},
            retry=RetryPolicy(base_delay=0.001, max_delay=0.002, seed=1),
        )
        ledger = BudgetLedger()
        share = RunShare(max_concurrency=max(1, ceiling - 1))
        records: list[CallRecord] = []
        model = ScriptedModel(reply)

        async def batch() -> None:
            await dispatcher.call_many(model, prompts(total), ledger=ledger, share=share, record=records.append)

        if native:
            task = asyncio.get_running_loop().create_task(batch())
            for _ in range(cancel_after):
                await anyio.lowlevel.checkpoint()
            task.cancel()
            await asyncio.wait([task])
        else:
            async with anyio.create_task_group() as tg:
                tg.start_soon(batch)
                for _ in range(cancel_after):
                    await anyio.lowlevel.checkpoint()
                tg.cancel_scope.cancel()
        lane = dispatcher.lane(model)
        stats = lane.statistics()
        assert (stats.in_flight, stats.waiting, lane.backlog, share.in_flight) == (0, 0, 0, 0)
        assert ledger.reserved == Spend()
        ok = [r for r in records if r.error is None]
        assert ledger.spent.calls == len(ok) + inside
        assert stats.completed == len(ok)

    anyio.run(main)


@settings(max_examples=40, deadline=None)
@given(
    ceiling=st.integers(1, 6),
    total=st.integers(0, 40),
    failing=st.sets(st.integers(0, 39), max_size=12),
    fatal=st.sets(st.integers(0, 39), max_size=5),
)
def test_every_item_is_sent_and_answered_in_its_own_place(
    ceiling: int, total: int, failing: set[int], fatal: set[int]
) -> None:
    """Items that fail once are retried by their sender; items that keep failing come back as
    their own error; every other item gets its own answer, in input order; nothing is sent
    twice after success and nothing is left unsent."""

    async def main() -> None:
        attempts: dict[int, int] = {}

        async def reply(request: ModelRequest) -> str:
            index = index_of(request)
            attempts[index] = attempts.get(index, 0) + 1
            await anyio.lowlevel.checkpoint()
            if index in fatal or (index in failing and attempts[index] == 1):
                raise again(0.001)
            return f"answer {index}"

        dispatcher = Dispatcher(
            limits={"scripted": Limits(max_concurrency=ceiling, initial_concurrency=ceiling)},
            retry=RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.002, seed=1),
        )
        ledger = BudgetLedger()
        outcomes = await dispatcher.call_many(ScriptedModel(reply), prompts(total), ledger=ledger)
        assert len(outcomes) == total
        for index, outcome in enumerate(outcomes):
            if index in fatal:
                assert isinstance(outcome, TransientModelError)
                assert attempts[index] == 2
            else:
                assert not isinstance(outcome, Exception) and outcome.text == f"answer {index}"
                assert attempts[index] == (2 if index in failing else 1)
        assert set(attempts) == set(range(total))
        (lane,) = dispatcher.statistics()
        assert (lane.in_flight, lane.waiting) == (0, 0)
        assert ledger.reserved == Spend()
        assert ledger.spent.calls == sum(1 for i in range(total) if i not in fatal)

    anyio.run(main)


# -- fairness, per-run caps and root priority with the pool ---------------------------------------


async def test_weighted_runs_split_a_saturated_lane_by_weight_and_keep_their_caps() -> None:
    """Two runs share a lane of four; run a weighs 3, run b 1 and b may hold at most one call.
    With both batches pending, admissions split 3:1 and b never holds more than one."""
    a, b = RunShare(weight=3, name="a"), RunShare(weight=1, max_concurrency=1, name="b")
    admitted: list[str] = []
    peak_b = 0

    async def reply(request: ModelRequest) -> str:
        nonlocal peak_b
        admitted.append(tag_of(request))
        peak_b = max(peak_b, b.in_flight)
        await anyio.sleep(0.005)
        return "ok"

    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=4, initial_concurrency=4)})
    model = ScriptedModel(reply)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: dispatcher.call_many(model, prompts(60, "a"), ledger=BudgetLedger(), share=a))
        tg.start_soon(lambda: dispatcher.call_many(model, prompts(60, "b"), ledger=BudgetLedger(), share=b))
    assert peak_b == 1
    steady = admitted[8:48]  # both runs have work pending throughout
    share_a = steady.count("a") / len(steady)
    assert 0.65 <= share_a <= 0.85, share_a


async def test_a_root_turn_goes_before_every_queued_sub_call_of_a_big_batch() -> None:
    """A root turn asked while a sub batch saturates the lane is the next call admitted."""
    order: list[str] = []
    six_sent = anyio.Event()

    async def reply(request: ModelRequest) -> str:
        order.append(tag_of(request))
        if len(order) == 6:
            six_sent.set()
        await anyio.sleep(0.005)
        return "ok"

    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=2, initial_concurrency=2)})
    model = ScriptedModel(reply)
    share = RunShare()

    async def root() -> None:
        await six_sent.wait()
        asked_at = len(order)
        await dispatcher.call(model, ModelRequest.from_prompt("root 0", max_tokens=8), ledger=BudgetLedger(),
                              share=share, priority=Priority.ROOT)
        position.append((asked_at, order.index("root")))

    position: list[tuple[int, int]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: dispatcher.call_many(model, prompts(40, "sub"), ledger=BudgetLedger(), share=share))
        # a second run's batch: its senders wait in the lane's line, ahead of the root turn in time
        tg.start_soon(lambda: dispatcher.call_many(model, prompts(40, "other"), ledger=BudgetLedger(),
                                                   share=RunShare()))
        tg.start_soon(root)
    ((asked_at, admitted_at),) = position
    assert dispatcher.statistics()[0].waiting == 0
    assert admitted_at <= asked_at + 1  # at most a call that was already being admitted


# -- the shared (Redis) lane -------------------------------------------------------------------------


async def test_a_shared_lane_returns_to_idle_after_failures_retries_and_cancellation(
    redis_server: RedisServer,
) -> None:
    """The pool over a SharedLane: a batch with retried and failing items, then a batch cancelled
    mid-way; the shared lane's backlog, waiting and in-flight counts return to zero and no
    reservation is left."""
    tried: set[int] = set()

    async def reply(request: ModelRequest) -> str:
        index = index_of(request)
        await anyio.sleep(0.002)
        if index % 3 == 0 and index not in tried:
            tried.add(index)
            raise again(0.005)
        if index % 7 == 6:
            raise TransientModelError("broken", provider="scripted", model="scripted")
        return "ok"

    async with SharedState(SharedConfig(redis_server.url)) as state:
        dispatcher = Dispatcher(
            shared=state,
            limits={"scripted": Limits(max_concurrency=3, initial_concurrency=3)},
            retry=RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.005, seed=1),
        )
        model = ScriptedModel(reply)
        ledger = BudgetLedger()
        outcomes = await dispatcher.call_many(model, prompts(30), ledger=ledger)
        assert sum(isinstance(o, Exception) for o in outcomes) == sum(1 for i in range(30) if i % 7 == 6)
        with anyio.move_on_after(0.02):
            await dispatcher.call_many(model, prompts(30, "late"), ledger=ledger)
        lane = dispatcher.lane(model)
        stats = lane.statistics()
        assert (stats.in_flight, stats.waiting, lane.backlog) == (0, 0, 0)
        assert ledger.reserved == Spend()



async def test_a_deadline_cancels_the_requests_in_flight_and_sends_nothing_more() -> None:
    """A deadline over a batch reaches every request the senders have out, and no item is sent
    after it. The deadline falls once the ceiling's three requests are out (it raced their start)."""
    started: list[int] = []
    cancelled: list[int] = []
    all_out = anyio.Event()

    async def reply(request: ModelRequest) -> str:
        index = index_of(request)
        started.append(index)
        if len(started) == 3:
            all_out.set()
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.append(index)
            raise
        return "ok"

    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=3, initial_concurrency=3)})
    ledger = BudgetLedger()

    async def deadline_when_all_are_out(scope: anyio.CancelScope) -> None:
        with anyio.fail_after(10):
            await all_out.wait()
        scope.deadline = anyio.current_time()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(deadline_when_all_are_out, scope)
            await dispatcher.call_many(ScriptedModel(reply), prompts(20), ledger=ledger)
    assert scope.cancelled_caught
    assert sorted(started) == [0, 1, 2] and sorted(cancelled) == [0, 1, 2]
    (lane,) = dispatcher.statistics()
    assert (lane.in_flight, lane.waiting) == (0, 0) and ledger.reserved == Spend()
    assert ledger.spent.calls == 3  # the requests cancelled after they left are charged: they are billed


async def test_the_fast_path_keeps_the_request_window() -> None:
    """Calls admitted without a waiter still count against the RPM window: a batch never has
    more than ``rpm`` requests admitted within one window. Admission times are the lane's own (a
    call's queue wait from the batch's shared start), not when a reply happened to run."""
    at: list[float] = []

    def record(call: CallRecord) -> None:
        at.append(call.queue_wait)

    window = 0.2
    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=8, initial_concurrency=8, rpm=4, window=window)}
    )
    await dispatcher.call_many(ScriptedModel(lambda request: "ok"), prompts(9), ledger=BudgetLedger(), record=record)
    at.sort()
    assert len(at) == 9
    for i, start in enumerate(at):
        assert sum(1 for t in at[i:] if t - start < window) <= 4


async def test_two_dispatchers_pools_on_one_shared_lane_hold_its_ceiling_and_free_every_slot(
    redis_server: RedisServer,
) -> None:
    """Two Dispatchers (two replicas' worth of state) each run a pool as wide as the shared
    lane's ceiling of 3: together they never have more than 3 requests out, and after one batch
    is cancelled mid-way (once 5 of its 40 were sent, with calls out) and the other finishes, Redis holds no
    slot."""
    out = peak = sent = 0
    halfway = anyio.Event()

    async def reply(request: ModelRequest) -> str:
        nonlocal out, peak, sent
        out += 1
        peak = max(peak, out)
        if tag_of(request) == "two":
            sent += 1
            if sent == 5:
                halfway.set()
        try:
            await anyio.sleep(0.003)
        finally:
            out -= 1
        return "ok"

    limits = {"scripted": Limits(max_concurrency=3, initial_concurrency=3, window=1.0)}
    # leases longer than the guards below: a slot left taken is not swept by its lease's end meanwhile
    async with SharedState(SharedConfig(redis_server.url, lease=30.0, timeout=5.0)) as a, \
            SharedState(SharedConfig(redis_server.url, lease=30.0, timeout=5.0)) as b:
        d1, d2 = Dispatcher(shared=a, limits=limits), Dispatcher(shared=b, limits=limits)
        model = ScriptedModel(reply)
        finished: list[int] = []

        async def full() -> None:
            outcomes = await d1.call_many(model, prompts(40, "one"), ledger=BudgetLedger())
            finished.append(sum(not isinstance(o, Exception) for o in outcomes))

        async def cut() -> None:
            with anyio.CancelScope() as scope:  # its deadline falls once 5 of its calls were sent
                async with anyio.create_task_group() as tg:

                    async def deadline_halfway() -> None:
                        with anyio.fail_after(10):
                            await halfway.wait()
                        scope.deadline = anyio.current_time()

                    tg.start_soon(deadline_halfway)
                    await d2.call_many(model, prompts(40, "two"), ledger=BudgetLedger())
            cancelled.append(scope.cancelled_caught)

        cancelled: list[bool] = []
        with anyio.fail_after(10):  # a slot the cut batch left taken would hold the full one back
            async with anyio.create_task_group() as tg:
                tg.start_soon(full)
                tg.start_soon(cut)
        # the background tasks send the last releases a moment later: read until none is held
        key = a.lane_keys("scripted:scripted")[3]
        with anyio.move_on_after(10):
            while await a._client.zcard(key):  # type: ignore[union-attr]  # noqa: ASYNC110 - no event in Redis
                await anyio.sleep(0.01)
        slots = await a._client.zcard(key)  # type: ignore[union-attr]
        lanes = [d1.lane(model), d2.lane(model)]
    assert finished == [40] and peak <= 3
    assert cancelled == [True] and sent < 40  # cut mid-way
    assert slots == 0
    assert all((lane.statistics().in_flight, lane.statistics().waiting, lane.backlog) == (0, 0, 0) for lane in lanes)
