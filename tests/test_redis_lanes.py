"""Lanes and budgets shared across processes in a real redis-server (scripts/setup/test-redis.sh).

Each test starts its own ``redis-server`` on a free 127.0.0.1 port and a fake OpenAI-compatible
provider in the test's event loop; the replicas are separate Python processes
(``tests/redis_worker.py``). Limits are checked from the provider's own admission log. Windows
are short (``Limits(window=...)``) to keep the tests quick.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("redis")
if shutil.which("redis-server") is None:  # pragma: no cover - the setup script installs it
    pytest.skip("redis-server is not installed (scripts/setup/test-redis.sh)", allow_module_level=True)

from rlmflow import (
    BudgetExceededError,
    ConfigurationError,
    Dispatcher,
    Limits,
    Message,
    ModelRequest,
    OpenAIModel,
    RLMError,
)
from rlmflow.dispatch.budget import Budget, BudgetLedger, Spend
from rlmflow.dispatch.lane import RunShare
from rlmflow.dispatch.limits import Priority
from rlmflow.dispatch.redis_budget import SharedBudget
from rlmflow.dispatch.redis_lane import SharedLane, SharedTicket
from rlmflow.dispatch.shared import SharedConfig, SharedState, SharedStateUnavailableError

from .fakes import FakeOpenAIServer
from .fakes.fake_openai import answer_for
from .helpers import refused_port
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("redis_worker.py")


@pytest.fixture
async def provider() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer(latency=0.1, rpm=12, tpm=600, window=1.0, output_tokens=4) as server:
        yield server


def max_concurrent(server: FakeOpenAIServer, latency: float) -> int:
    """The most requests the provider held at once (each holds ``latency`` after its admission)."""
    times = sorted(a.at for a in server.admitted)
    best, start = 0, 0
    for end, at in enumerate(times):
        while times[start] <= at - latency + 1e-6:
            start += 1
        best = max(best, end - start + 1)
    return best


async def until(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait for a condition on the provider (which runs in this event loop)."""
    with anyio.fail_after(within):
        for _ in itertools.count():
            if condition():
                return
            await anyio.sleep(0.01)


async def slots_taken(state: SharedState, lane: str, within: float = 10.0) -> int:
    """The slots of ``lane`` held in Redis once none is (the background task sends the last
    releases a moment after the calls end), or as many as are still held ``within`` s later."""
    key = state.lane_keys(lane)[3]
    with anyio.move_on_after(within):
        while await state._client.zcard(key):  # noqa: ASYNC110 - Redis has no event to wait on
            await anyio.sleep(0.01)
    return int(await state._client.zcard(key))


def each_seen_after_the_other(provider: FakeOpenAIServer, names: list[str], margin: float = 0.2) -> bool:
    """Whether each named replica had a call admitted ``margin`` s after every other's first."""
    firsts: dict[str, float] = {}
    lasts: dict[str, float] = {}
    for admitted in provider.admitted:
        name = admitted.prompt.split("-")[0]
        firsts.setdefault(name, admitted.at)
        lasts[name] = admitted.at
    return all(name in lasts for name in names) and all(
        lasts[name] > firsts[other] + margin for name in names for other in names if other != name
    )


class Workers:
    """Replica processes started together; each prints one JSON result line."""

    def __init__(self) -> None:
        self.processes: list[asyncio.subprocess.Process] = []
        self.replicas: list[str] = []

    async def start(self, specs: list[dict[str, Any]]) -> None:
        await self.launch(specs)
        await self.go()

    async def launch(self, specs: list[dict[str, Any]]) -> None:
        """Start the processes and wait until each is connected and ready."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for spec in specs:
            process = await asyncio.create_subprocess_exec(
                sys.executable, str(WORKER), json.dumps(spec), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=env,
            )
            self.processes.append(process)
        for process in self.processes:
            assert process.stdout is not None
            with anyio.fail_after(60):
                line = await process.stdout.readline()
            self.replicas.append(json.loads(line)["ready"])

    async def go(self) -> None:
        for process in self.processes:  # all together
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()

    async def result(self, index: int, within: float = 60) -> dict[str, Any]:
        process = self.processes[index]
        assert process.stdout is not None
        with anyio.fail_after(within):
            line = await process.stdout.readline()
            await process.wait()
        assert process.returncode == 0, f"worker {index} exited with {process.returncode}"
        result: dict[str, Any] = json.loads(line)
        return result

    async def close(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.kill()
            # read to EOF and close the pipes: transports left to the garbage collector warn later
            await process.communicate()


def spec(redis: RedisServer, provider: FakeOpenAIServer, name: str, prompts: int, **extra: Any) -> dict[str, Any]:
    return {"url": redis.url, "base_url": provider.base_url, "name": name, "prompts": prompts,
            "limits": {"rpm": 12, "tpm": 600, "max_concurrency": 3, "window": 1.0}, "lease": 10.0,
            "timeout": 5.0, **extra}


def assert_within_limits(provider: FakeOpenAIServer, *, rpm: int, tpm: int, concurrency: int) -> None:
    summary = provider.summary()
    assert summary["rate_limited"] == 0, summary
    assert provider.max_in_window() <= rpm, summary
    assert provider.max_in_window(tokens=True) <= tpm, summary
    assert max_concurrent(provider, provider.latency) <= concurrency


async def test_four_processes_share_one_lane(redis_server: RedisServer, provider: FakeOpenAIServer) -> None:
    workers = Workers()
    try:
        await workers.start([spec(redis_server, provider, f"p{i}", 9) for i in range(4)])
        results = [await workers.result(i) for i in range(4)]
    finally:
        await workers.close()
    for result in results:
        assert result["errors"] == [] and result["mode"] == "shared"
        assert result["answers"] == [answer_for(f"{result['name']}-{i}") for i in range(9)]  # 0 lost
    assert provider.counters.admitted == 36
    assert_within_limits(provider, rpm=12, tpm=600, concurrency=3)
    # the lane was the bottleneck: 36 requests at 12 per 1.25 s window take at least two more windows
    assert provider.admitted[-1].at - provider.admitted[0].at >= 2.0


async def server_offset(state: SharedState) -> tuple[float, float]:
    """Redis's clock (``TIME``, in which leases and pauses are kept) minus this event loop's, in
    seconds: a server time ``t`` is the loop's (and so the fake providers') ``t - offset``; and how
    far off that may be. Redis read its clock somewhere within the round trip, so the offset taken
    at its midpoint is off by at most half of it: of 5 samples, the one of the shortest round trip."""
    samples = []
    for _ in range(5):
        before = anyio.current_time()
        seconds, micros = await state._client.time()
        after = anyio.current_time()
        samples.append((after - before, seconds + micros / 1e6 - (before + after) / 2))
    rtt, offset = min(samples)
    return offset, rtt / 2


async def leases_of(state: SharedState, key: str, replica: str, offset: float) -> list[float]:
    """When the leases that ``replica`` holds in the sorted set ``key`` end, in the loop's time."""
    entries = await state._client.zrange(key, 0, -1, withscores=True)
    return sorted(score / 1000 - offset for member, score in entries if member.startswith(f"{replica}:"))


async def test_a_killed_replicas_slots_and_budget_holds_end_with_their_lease_and_not_before(
    redis_server: RedisServer,
) -> None:
    """A replica SIGKILLed while it holds every slot of the lane (the provider holds its calls for a
    minute) and reservations of the tenant budget: the other replicas' calls wait until its leases
    end (not a moment before, and the budget still counts its holds as reserved), then go on; its
    holds are then charged at their worst case, never handed back (docs/scaling.md, "a replica dies")."""
    # the lease only bounds how long the test may take to set up and read what it checks (a
    # precondition: asked_at and checked_at below), not a measurement
    lease, limits = 8.0, {"max_concurrency": 2, "window": 1.0}
    budget = {"name": "tenant-k", "caps": {"max_calls": 8}}  # the victim's 4 holds + the survivors' 4 calls
    # one provider, so one lane (a lane is keyed by its endpoint too): the victim's calls are held
    async with FakeOpenAIServer(latency_of=lambda prompt: 60.0 if prompt.startswith("victim") else 0.05) as provider, \
            SharedState(SharedConfig(redis_server.url)) as state:
        lane = Dispatcher().lane_key(OpenAIModel("fake", base_url=provider.base_url))
        tenant = SharedBudget(state, "tenant-k", Budget(max_calls=8))
        slots_key, holds_key = state.lane_keys(lane)[3], state.budget_keys("tenant-k")[1]
        victim, survivors = Workers(), Workers()
        try:
            await survivors.launch([spec(redis_server, provider, f"s{i}", 2, limits=limits, lease=lease,
                                         budget=budget) for i in range(2)])
            await victim.start([spec(redis_server, provider, "victim", 4, limits=limits, lease=lease, budget=budget)])
            await until(lambda: provider.counters.admitted == 2)  # both slots taken, 4 calls reserved
            victim.processes[0].send_signal(signal.SIGKILL)
            await victim.processes[0].wait()
            offset, error = await server_offset(state)
            slot_ends = await leases_of(state, slots_key, victim.replicas[0], offset)
            hold_ends = await leases_of(state, holds_key, victim.replicas[0], offset)
            asked_at = anyio.current_time()
            await survivors.go()
            # the survivors reserve at once, and each reservation runs the budget's sweep of ended leases...
            with anyio.fail_after(10):
                while (early := await tenant.totals())[0].calls + early[1].calls < 8:  # noqa: ASYNC110
                    await anyio.sleep(0.01)  # Redis has no event to wait on
            checked_at = anyio.current_time()
            results = [await survivors.result(i) for i in range(2)]
            # ...and the victim's holds are charged by the first settlement after their leases end
            await anyio.sleep(max(0.0, hold_ends[-1] - anyio.current_time()) + 0.05 + error)
            await (await tenant.reserve(Spend())).release()
            spent, reserved = await tenant.totals()
            expired = await state._client.hget(state.budget_keys("tenant-k")[0], "expired")
            slots_left = await state._client.zrange(slots_key, 0, -1)
        finally:
            await victim.close()
            await survivors.close()
    assert len(slot_ends) == 2 and len(hold_ends) == 4, (slot_ends, hold_ends)
    assert asked_at < slot_ends[0] - 1.0, "the survivors did not ask while the victim's leases ran"
    for result in results:
        assert result["errors"] == [] and result["refused"] == 0 and all(result["answers"]), result
    theirs = [a for a in provider.admitted if not a.prompt.startswith("victim")]
    assert len(provider.admitted) == 2 + 4 and len(theirs) == 4  # the victim never got a third slot
    # slots: no survivor call reached the provider before the first of the victim's leases ended...
    first = min(a.at for a in theirs)
    assert first >= slot_ends[0] - 0.05 - error, (first, slot_ends, error)
    # ...and they went on as soon as it did (a waiting replica asks again every 0.25 s at most)
    assert first < slot_ends[0] + 2.0, (first, slot_ends)
    assert slots_left == [], (slots_left, victim.replicas, survivors.replicas)
    # budget: while the victim's leases ran, its holds stayed reserved, neither charged nor freed...
    assert checked_at < hold_ends[0], "the budget was not read while the victim's leases ran"
    assert (early[0].calls, early[1].calls) == (0, 8)
    # ...and once they ended they were charged at their worst case (4 calls), never handed back
    assert (spent.calls, reserved.calls) == (8, 0) and int(expired) == 4


async def test_a_spent_quota_pauses_the_lane_in_every_process(redis_server: RedisServer) -> None:
    """One replica meets a spent quota (429 "quota exceeded", retry-after 3 s): the lane pauses in
    every process sharing the Redis, none of them sends a call before the pause ends, and all of
    them go on after it (docs/scaling.md, "Pauses")."""
    pause, limits = 3.0, {"max_concurrency": 4, "window": 1.0}
    async with FakeOpenAIServer(latency=0.01, quota_refusals=1, quota_retry_after=pause) as provider, \
            SharedState(SharedConfig(redis_server.url)) as state:
        state_key = state.lane_keys(Dispatcher().lane_key(OpenAIModel("fake", base_url=provider.base_url)))[2]
        first, others = Workers(), Workers()
        try:
            await others.launch([spec(redis_server, provider, f"o{i}", 3, limits=limits) for i in range(2)])
            await first.start([spec(redis_server, provider, "first", 1, limits=limits)])  # its call is refused
            with anyio.fail_after(30):
                while not await state._client.hget(state_key, "paused"):  # noqa: ASYNC110 - Redis has no event here
                    await anyio.sleep(0.01)
            offset, error = await server_offset(state)
            ends = float(await state._client.hget(state_key, "paused")) / 1000 - offset
            asked_at = anyio.current_time()
            await others.go()
            results = [await first.result(0)] + [await others.result(i) for i in range(2)]
        finally:
            await first.close()
            await others.close()
    assert asked_at < ends - 1.0, "the other processes did not ask while the lane was paused"
    for result in results:
        assert result["errors"] == [] and all(result["answers"]), result
    assert provider.counters.faults["quota"] == 1 and provider.counters.requests == 1 + 1 + 6
    admitted = sorted(a.at for a in provider.admitted)
    assert len(admitted) == 7  # the refused call sent again, and the others' 6
    assert admitted[0] >= ends - 0.05 - error, (admitted[0], ends, error)  # no process sent anything while paused
    assert admitted[0] < ends + 2.0, (admitted[0], ends)  # and all went on once it ended


async def test_closing_the_state_sends_a_release_the_background_task_had_in_flight(redis_server: RedisServer) -> None:
    """A replica shutting down cleanly frees its slots at once: a release the background task is
    still sending when the state is closed is finished, not cancelled (it was: the slot then stayed
    taken for a whole lease, 30 s by default, seen as a survivor's slots left in Redis by the test
    above). Redis is paused for writes (CLIENT PAUSE), so the send is surely in flight."""
    async with SharedState(SharedConfig(redis_server.url)) as observer:
        state = SharedState(SharedConfig(redis_server.url, lease=30.0, timeout=2.0))
        await state.connect()
        lane = SharedLane("closing:m", Limits(max_concurrency=2, window=1.0), state)
        slots = state.lane_keys("closing:m")[3]
        ticket = await lane.acquire(priority=Priority.SUB, share=RunShare(), tokens=1)
        assert await observer._client.zcard(slots) == 1
        await observer._client.execute_command("CLIENT", "PAUSE", 300, "WRITE")
        lane.on_success(ticket, tokens_used=1)
        await until(lambda: state.statistics().releases_pending == 0)  # taken by the background task
        await state.aclose()
        assert await observer._client.zcard(slots) == 0


async def test_tenant_budget_shared_by_two_processes_is_never_overspent(
    redis_server: RedisServer, provider: FakeOpenAIServer
) -> None:
    provider.rpm = provider.tpm = None
    budget = {"name": "tenant-a", "caps": {"max_calls": 7, "max_input_tokens": 400}}
    workers = Workers()
    try:
        await workers.start([spec(redis_server, provider, f"b{i}", 6, budget=budget,
                                  limits={"max_concurrency": 4, "window": 1.0}) for i in range(2)])
        results = [await workers.result(i) for i in range(2)]
    finally:
        await workers.close()
    answered = sum(1 for r in results for a in r["answers"] if a)
    refused = sum(r["refused"] for r in results)
    assert answered == 7 and refused == 5, results  # exactly the cap, from both processes together
    assert provider.counters.admitted == 7
    async with SharedState(redis_server.url) as state:
        spent, reserved = await SharedBudget(state, "tenant-a", Budget(max_calls=7)).totals()
    assert spent.calls == 7 and reserved == Spend()


async def test_redis_stopped_mid_run_falls_back_to_a_share(redis_server: RedisServer) -> None:
    async with FakeOpenAIServer(latency=0.05, rpm=8, window=1.0) as provider:
        workers = Workers()
        try:
            await workers.start([spec(redis_server, provider, f"f{i}", 20, limits={"rpm": 8, "max_concurrency": 2,
                                                                                    "window": 1.0})
                                 for i in range(2)])
            # each process has acquired since the other's first call, so each has counted both (the
            # N of its 1/N fallback) before Redis goes
            await until(lambda: each_seen_after_the_other(provider, ["f0", "f1"]))
            redis_server.stop()
            results = [await workers.result(i, within=30) for i in range(2)]
        finally:
            await workers.close()
    for result in results:
        assert result["errors"] == [] and all(result["answers"])  # nothing lost, nothing hung
        assert result["fallbacks"] == 1 and result["mode"] == "fallback" and result["replicas"] == 2
    assert provider.counters.admitted == 40
    # the window of the loss may exceed the lane by the difference of the replicas' shares before
    # it (docs/scaling.md), at most by one share (4: the other had filled the window), retried;
    # every later window within the lane
    assert provider.summary()["rate_limited"] <= 8 // 2
    assert provider.max_in_window() <= 8 + 2


async def test_unreachable_redis_is_a_clear_error_at_start() -> None:
    with refused_port() as port:
        await unreachable_redis_is_a_clear_error_at_start(port)


async def unreachable_redis_is_a_clear_error_at_start(port: int) -> None:
    state = SharedState(SharedConfig(f"redis://127.0.0.1:{port}/0", timeout=0.5))
    with pytest.raises(SharedStateUnavailableError, match=r"cannot reach Redis at redis://127\.0\.0\.1"):
        await state.connect()
    dispatcher = Dispatcher(shared=f"redis://127.0.0.1:{port}/0")
    async with FakeOpenAIServer() as provider:
        model = OpenAIModel("fake", base_url=provider.base_url)
        with pytest.raises(SharedStateUnavailableError):
            await dispatcher.call(model, ModelRequest([Message("user", "x")], max_tokens=4), ledger=BudgetLedger())
        assert provider.counters.requests == 0  # nothing was sent
        await model.aclose()


async def test_in_process_lanes_agree_and_budget_holds_under_contention(redis_server: RedisServer) -> None:
    """Two states in one process (two replicas' worth of state), racing on one lane and one budget."""
    async with FakeOpenAIServer(latency=0.02, rpm=10, window=0.5) as provider, \
            SharedState(SharedConfig(redis_server.url, lease=10.0, timeout=5.0)) as a, \
            SharedState(SharedConfig(redis_server.url, lease=10.0, timeout=5.0)) as b:
        model = OpenAIModel("fake", base_url=provider.base_url)
        limits = {"openai": Limits(rpm=10, max_concurrency=2, window=0.5)}
        d1, d2 = Dispatcher(shared=a, limits=limits), Dispatcher(shared=b, limits=limits)
        assert isinstance(d1.lane(model), SharedLane)
        budget = Budget(max_calls=25)
        tenants = [SharedBudget(a, "t", budget), SharedBudget(b, "t", budget)]
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            dispatcher, tenant = (d1, tenants[0]) if i % 2 else (d2, tenants[1])
            request = ModelRequest([Message("user", f"q{i}")], max_tokens=16)
            try:
                hold = await tenant.reserve(dispatcher.estimate(model, request))
            except RLMError:
                return
            response = await dispatcher.call(model, request, ledger=BudgetLedger())
            await hold.settle(response.usage)
            assert response.text == answer_for(f"q{i}")
            done += 1

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(one, i)
        spent, reserved = await tenants[0].totals()
        await model.aclose()
    assert done == 25 and spent.calls == 25 and reserved == Spend()
    assert provider.summary()["rate_limited"] == 0 and provider.max_in_window() <= 10
    assert max_concurrent(provider, provider.latency) <= 2


async def test_root_turns_pass_queued_sub_calls_and_cancelled_waiters_leave_no_slot(
    redis_server: RedisServer,
) -> None:
    async with SharedState(SharedConfig(redis_server.url, lease=5.0)) as state:
        lane = SharedLane("p:m", Limits(max_concurrency=1, window=1.0), state)
        run = RunShare()
        first = await lane.acquire(priority=Priority.SUB, share=run, tokens=1)
        order: list[str] = []

        async def call(name: str, priority: Priority) -> None:
            ticket = await lane.acquire(priority=priority, share=run, tokens=1)
            order.append(name)
            lane.on_success(ticket, tokens_used=1)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, f"sub{i}", Priority.SUB)
            with anyio.move_on_after(0.3):  # a waiter that gives up while the slot is taken
                await lane.acquire(priority=Priority.SUB, share=run, tokens=1)
            await anyio.sleep(0.05)
            tg.start_soon(call, "root", Priority.ROOT)
            await anyio.sleep(0.05)
            lane.on_success(first, tokens_used=1)
        assert order == ["root", "sub0", "sub1", "sub2"]
        assert await slots_taken(state, "p:m") == 0 and lane.in_flight == 0


async def test_allotments_hold_a_runs_caps_on_the_tenant_budget(redis_server: RedisServer) -> None:
    async with SharedState(redis_server.url) as a, SharedState(redis_server.url) as b:
        tenant_a = SharedBudget(a, "tenant-x", Budget(max_calls=10, max_cost_usd=1.0))
        tenant_b = SharedBudget(b, "tenant-x", Budget(max_calls=10, max_cost_usd=1.0))
        run = Budget(max_calls=6, max_cost_usd=0.5)
        async with tenant_a.allot(run) as first:
            with pytest.raises(BudgetExceededError, match="max_calls"):
                async with tenant_b.allot(run):
                    pass  # 6 + 6 calls could exceed 10: refused before anything runs
            first.spent = Spend(calls=2, input_tokens=100, output_tokens=10, cost_usd=0.1)
        async with tenant_b.allot(run):  # 2 spent + 6 held fit; never set: charged at its worst case
            pass
        spent, reserved = await tenant_a.totals()
        assert spent.calls == 8 and spent.cost_usd == pytest.approx(0.6) and reserved == Spend()
        with pytest.raises(ConfigurationError, match="max_cost_usd"):
            async with tenant_a.allot(Budget(max_calls=1)):
                pass


async def test_mixed_priorities_and_cancellations_keep_the_lane_consistent(redis_server: RedisServer) -> None:
    """Invariants under churn: never more than the limit held, every slot back, no double grant."""
    rng = random.Random(7)
    async with SharedState(SharedConfig(redis_server.url, lease=5.0)) as state:
        lane = SharedLane("churn:m", Limits(max_concurrency=4, initial_concurrency=4, window=1.0), state)
        held = peak = granted = 0

        async def call(priority: Priority, patience: float, hold: float) -> None:
            nonlocal held, peak, granted
            with anyio.move_on_after(patience):
                ticket = await lane.acquire(priority=priority, share=RunShare(), tokens=1)
                granted += 1
                held += 1
                peak = max(peak, held)
                try:
                    await anyio.sleep(hold)
                finally:
                    held -= 1
                    lane.on_success(ticket, tokens_used=1)

        async with anyio.create_task_group() as tg:
            for _ in range(80):
                priority = Priority.ROOT if rng.random() < 0.3 else Priority.SUB
                tg.start_soon(call, priority, rng.uniform(0.005, 0.5), rng.uniform(0.0, 0.02))
                await anyio.sleep(rng.uniform(0, 0.004))
        slots = await slots_taken(state, "churn:m")
    assert peak <= 4 and granted > 20
    assert lane.in_flight == 0 and held == 0 and slots == 0 and not lane._heads


async def test_redis_back_the_lane_rejoins_and_replays_its_window(redis_server: RedisServer) -> None:
    """Lost, then a fresh empty Redis on the same port: what was admitted meanwhile is counted again."""
    async with SharedState(SharedConfig(redis_server.url, lease=3.0, timeout=1.0)) as state:
        lane = SharedLane("back:m", Limits(rpm=50, max_concurrency=4, window=30.0), state)

        async def one() -> None:
            ticket = await lane.acquire(priority=Priority.SUB, share=RunShare(), tokens=3)
            lane.on_success(ticket, tokens_used=2)

        for _ in range(3):
            await one()
        redis_server.stop()
        with anyio.fail_after(5):
            await one()  # the fallback admits without waiting on the dead server
        assert state.mode == "fallback" and state.fallbacks == 1
        await one()
        redis_server.start()  # empty: nothing persisted
        with anyio.fail_after(10):
            while state.mode != "shared":  # noqa: ASYNC110 - the heartbeat (lease / 3) rejoins
                await anyio.sleep(0.05)
        keys = state.lane_keys("back:m")
        in_window = await state._client.zcard(keys[0])
        used = float(await state._client.hget(keys[2], "used"))
        await one()
        after = await state._client.zcard(keys[0])
    assert in_window == 5 and used == pytest.approx(10.0)  # 5 calls, each corrected to 2 tokens
    assert after == 6


async def test_the_agreed_limit_is_cut_once_per_round_trip_for_every_process(redis_server: RedisServer) -> None:
    async with SharedState(redis_server.url) as a, SharedState(redis_server.url) as b:
        limits = Limits(max_concurrency=16, initial_concurrency=8, window=1.0)
        lane_a, lane_b = SharedLane("agree:m", limits, a), SharedLane("agree:m", limits, b)
        tickets = [await lane_a.acquire(priority=Priority.SUB, share=RunShare(), tokens=1) for _ in range(3)]
        keys = a.lane_keys("agree:m")[:4]

        async def release(grant: str | None, outcome: str) -> list[int]:
            assert grant is not None
            args = lane_a._release_args(grant, outcome, None, 0.0)
            args[7] = 1000  # a round trip of 1 s: both refusals fall inside one
            return [int(x) for x in await a._scripts["LANE_RELEASE"](keys=keys, args=args)]

        grants = [t.grant for t in tickets if isinstance(t, SharedTicket)]
        assert await release(grants[0], "throttled") == [5, 2]  # 8 x 0.7, floored
        assert await release(grants[1], "throttled") == [5, 1]  # the same round trip: no second cut
        assert await release(grants[2], "refused") == [5, 0]  # a random refusal changes nothing
        ticket = await lane_b.acquire(priority=Priority.SUB, share=RunShare(), tokens=1)
        assert lane_b.limit_seen == 5  # the other process sees the agreed limit
        lane_b.on_success(ticket, tokens_used=1)


def test_one_dispatcher_serves_successive_event_loops(redis_server: RedisServer) -> None:
    """run_sync-style use: each call in a new event loop reconnects instead of reusing a dead one."""
    dispatcher = Dispatcher(shared=redis_server.url, limits={"openai": Limits(max_concurrency=2, window=1.0)})

    async def once(k: int) -> str:
        async with FakeOpenAIServer() as provider:
            model = OpenAIModel("fake", base_url=provider.base_url)
            response = await dispatcher.call(model, ModelRequest([Message("user", f"m{k}")], max_tokens=16),
                                             ledger=BudgetLedger())
            await model.aclose()
            return response.text

    assert [anyio.run(once, k) for k in range(2)] == [answer_for("m0"), answer_for("m1")]
    assert dispatcher.shared is not None and dispatcher.shared.mode == "shared"
    anyio.run(dispatcher.aclose)


def test_the_test_redis_server_moves_off_a_port_taken_before_it_starts() -> None:
    """RedisServer's free port is checked before redis binds it: a port taken in between (here by a
    listener that never answers) must not be mistaken for the server, nor fail the test."""
    server = RedisServer()
    taken = server.port
    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", taken))
        stranger.listen()
        server.start()
        try:
            assert server.port != taken and server.process is not None
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
                sock.sendall(b"PING\r\n")
                assert sock.recv(16).startswith(b"+PONG")
            server.stop()
            server.start()  # a restart keeps its port (the tests of losing Redis mid-run)
            assert server.port != taken
        finally:
            server.close()
