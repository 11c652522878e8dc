"""The Dispatcher against a fake provider: limits seen from the server's side, faults, priority,
fairness, cancellation, dedup and policies."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from rlmflow import (
    RLM,
    Budget,
    BudgetLedger,
    ConfigurationError,
    ContextOverflowError,
    Dispatcher,
    Limits,
    ModelRequest,
    OpenAIModel,
    Priority,
    RetryPolicy,
    ScriptedModel,
)
from rlmflow.dispatch.headers import pause_from_headers
from rlmflow.dispatch.lane import RunShare

from .fakes import FakeOpenAIServer, FaultPlan
from .fakes.fake_openai import answer_for
from .helpers import turn_script

pytestmark = pytest.mark.anyio

FAST_RETRY = RetryPolicy(max_attempts=12, base_delay=0.002, max_delay=0.02, seed=1)


def prompts(n: int, size: int = 40) -> list[ModelRequest]:
    return [ModelRequest.from_prompt(f"prompt {i} " + "x" * size, max_tokens=16) for i in range(n)]


async def test_faults_lose_nothing_and_random_refusals_keep_the_limit() -> None:
    plan = FaultPlan(throttle=0.08, server_error=0.06, reset=0.06, throttle_retry_after=0.002)
    async with FakeOpenAIServer(faults=plan, seed=3) as server:
        model = OpenAIModel("fake", base_url=server.base_url, timeout=10)
        dispatcher = Dispatcher(limits={"openai": Limits(max_concurrency=32)}, retry=FAST_RETRY)
        ledger = BudgetLedger()
        requests = prompts(2000)
        try:
            outcomes = await dispatcher.call_many(model, requests, ledger=ledger)
        finally:
            await model.aclose()
    texts = [getattr(o, "text", None) for o in outcomes]
    assert texts == [answer_for(r.messages[-1].content) for r in requests]  # 0 lost, 0 mixed up
    injected = sum(server.counters.faults.values())
    # every attempt reached the server and ended in one fault or the one success of its request
    assert server.counters.requests == len(requests) + injected
    # faults before the 2000th success: negative binomial, mean r*p/(1-p), sd sqrt(r*p)/(1-p);
    # 6 sd either side fails a correct dispatcher with probability below 1e-8, whatever the seed
    mean, sd = len(requests) * plan.total / (1 - plan.total), (len(requests) * plan.total) ** 0.5 / (1 - plan.total)
    assert mean - 6 * sd < injected < mean + 6 * sd
    (lane,) = dispatcher.statistics()
    assert lane.throttled == server.counters.faults["throttle"]
    # refusals at random (not rising with load) neither cut the limit nor pause the lane
    assert lane.concurrency.decreases == 0 and lane.concurrency.pauses == 0
    assert lane.concurrency.limit == 32
    assert ledger.reserved.calls == 0 and ledger.spent.calls == 2000


@pytest.mark.parametrize(("rpm", "tpm"), [(30, None), (None, 1500)])
async def test_the_server_never_sees_more_than_the_limits(rpm: int | None, tpm: int | None) -> None:
    # the provider counts arrivals over 0.5 s, the Dispatcher admissions over 1 s (plus its margin):
    # a loaded machine that delays some requests by up to 0.75 s on the way still stays under, and a
    # Dispatcher that ignored the limits would not (the window itself is checked on a fake clock in
    # test_controller_properties.py)
    window = 0.5
    async with FakeOpenAIServer(rpm=rpm, tpm=tpm, window=window) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        dispatcher = Dispatcher(limits={"openai": Limits(rpm=rpm, tpm=tpm, window=2 * window, max_concurrency=64)})
        try:
            outcomes = await dispatcher.call_many(model, prompts(75), ledger=BudgetLedger())
        finally:
            await model.aclose()
    assert all(not isinstance(o, Exception) for o in outcomes)
    assert server.counters.limited == 0  # never refused: we stayed under
    if rpm:
        assert server.max_in_window() <= rpm
    if tpm:
        assert server.max_in_window(tokens=True) <= tpm


async def test_root_turn_is_not_queued_behind_a_saturating_fan_out() -> None:
    """Order, not time: once the root turn is queued, it is the next call the lane admits,
    ahead of every sub-call already waiting in the lane."""
    log: list[str] = []
    saturated = anyio.Event()

    async def reply(request: ModelRequest) -> str:
        log.append(request.messages[-1].content)
        if len(log) == 4:  # both slots busy and the fan-out's queue long
            saturated.set()
        await anyio.sleep(0.005)
        return "ok"

    model = ScriptedModel(reply)
    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=2)})
    ledger = BudgetLedger()
    records: list = []
    async with anyio.create_task_group() as tg:
        for run in range(4):  # four fan-outs: their senders (two each) wait in the lane for two slots
            batch = [ModelRequest.from_prompt(f"prompt {run}:{i}", max_tokens=16) for i in range(15)]
            tg.start_soon(lambda b=batch: dispatcher.call_many(model, b, ledger=ledger, record=records.append))
        await saturated.wait()
        log.append("<root queued>")
        await dispatcher.call(model, ModelRequest.from_prompt("root"), ledger=ledger, priority=Priority.ROOT,
                              record=records.append)
    queued, started = log.index("<root queued>"), log.index("root")
    assert started == queued + 1, log[queued:started + 1]  # no sub-call was admitted in between
    assert sum(entry.startswith("prompt") for entry in log[started:]) >= 50  # and many were waiting
    root = next(r for r in records if r.role == "root")
    assert root.queue_wait <= max(r.queue_wait for r in records if r.role == "sub")


@pytest.mark.parametrize(("weights", "expected"), [((1.0, 1.0), 1.0), ((3.0, 1.0), 3.0)])
async def test_concurrent_runs_share_a_lane_by_weight(weights: tuple[float, float], expected: float) -> None:
    model = ScriptedModel(lambda r: "ok", latency=0.01)
    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=4)})
    done: list[str] = []
    shares = {name: RunShare(weight=w, name=name) for name, w in zip("ab", weights, strict=True)}

    async def run(name: str) -> None:
        await dispatcher.call_many(model, prompts(80), ledger=BudgetLedger(), share=shares[name],
                                   record=lambda r, n=name: done.append(n))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a")
        tg.start_soon(run, "b")
    first_half = done[:80]
    ratio = first_half.count("a") / max(1, first_half.count("b"))
    assert expected * 0.75 <= ratio <= expected * 1.34


async def test_per_run_cap_limits_in_flight() -> None:
    in_flight = peak = 0

    async def reply(request: ModelRequest) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.005)
        in_flight -= 1
        return "ok"

    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=32)})
    await dispatcher.call_many(ScriptedModel(reply), prompts(50), ledger=BudgetLedger(),
                               share=RunShare(max_concurrency=3))
    assert peak == 3


async def test_cancellation_mid_batch_leaves_no_task_and_no_reservation() -> None:
    """The batch's deadline falls once the server holds 4 requests (2 s each), waited for with a
    guard: a fixed 0.3 s raced the first HTTP requests of the process (imports, connections)."""
    async with FakeOpenAIServer(latency=2.0) as server:
        model = OpenAIModel("fake", base_url=server.base_url)
        dispatcher = Dispatcher(limits={"openai": Limits(max_concurrency=4)})
        ledger = BudgetLedger(Budget(max_calls=100))

        async def deadline_when_four_are_held(scope: anyio.CancelScope) -> None:
            with anyio.fail_after(10):
                while server.counters.admitted < 4:  # noqa: ASYNC110 - the server runs in this loop
                    await anyio.sleep(0.01)
            scope.deadline = anyio.current_time()
            cut.append(time.perf_counter())

        cut: list[float] = []
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(deadline_when_four_are_held, scope)
                await dispatcher.call_many(model, prompts(40), ledger=ledger)
        elapsed = time.perf_counter() - cut[0]
        await model.aclose()
    assert scope.cancelled_caught
    assert elapsed < 1.0  # the in-flight HTTP requests were cancelled, not awaited
    (lane,) = dispatcher.statistics()
    assert lane.in_flight == 0 and lane.waiting == 0
    # the 4 requests the server accepted are charged (their worst case): it finishes and bills them
    assert ledger.reserved.calls == 0 and ledger.spent.calls == server.counters.admitted == 4


async def test_identical_prompts_are_sent_once_per_run() -> None:
    sub = ScriptedModel(lambda r: r.messages[-1].content.upper(), name="sub")
    cells = ["a = llm_query_many(['x', 'y', 'x', 'x'])\nb = llm_query('y')\nFINAL(' '.join(a + [b]))"]
    async with RLM(root=turn_script(cells), sub=sub) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == "X Y X X Y"
    assert [r.messages[-1].content for r in sub.requests] == ["x", "y"]
    async with RLM(root=turn_script(cells), sub=ScriptedModel(lambda r: "z", name="s2"), dedup=False) as rlm:
        undeduped = await rlm.run("doc", "q?")
    assert undeduped.usage["s2"].calls == 5


async def test_context_overflow_reaches_sandbox_code_which_can_split() -> None:
    def sub_reply(request: ModelRequest) -> str:
        text = request.messages[-1].content
        if len(text) > 100:
            raise ContextOverflowError("too long", context_window=25)
        return str(len(text))

    cells = [
        "chunk = 'w' * 100 + 'v' * 50\n"
        "try:\n    sizes = llm_query_many([chunk])\n"
        "except BatchError as e:\n"
        "    assert isinstance(e.errors[0], ContextOverflowError)\n"
        "    sizes = llm_query_many([chunk[:75], chunk[75:]])\n"
        "FINAL(sum(int(s) for s in sizes))"
    ]
    async with RLM(root=turn_script(cells), sub=ScriptedModel(sub_reply, name="sub")) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == "150"
    assert [c.error for c in result.calls if c.model == "sub"] == ["ContextOverflowError", None, None]


def test_policy_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[lanes."openai:gpt-4o-mini"]\nrpm = 500\ntpm = 200000\nmax_concurrency = 24\n'
        '[lanes."aws.bedrock"]\noutput_weight = 5\n[retry]\nmax_attempts = 3\n'
    )
    dispatcher = Dispatcher.from_policy(policy)
    lane = dispatcher.lane(OpenAIModel("gpt-4o-mini", base_url="http://127.0.0.1:9/v1"))
    assert lane.limits == Limits(rpm=500, tpm=200000, max_concurrency=24)
    assert dispatcher.retry.max_attempts == 3
    policy.write_text("[lanes.openai]\nrpmm = 5\n")
    with pytest.raises(ConfigurationError, match="invalid policy"):
        Dispatcher.from_policy(policy)


def test_rate_limit_headers_pause_the_lane() -> None:
    assert pause_from_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m2.5s"}) == 62.5
    assert pause_from_headers({"x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "5s"}) == 0
    from datetime import datetime, timezone

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    headers = {"anthropic-ratelimit-requests-remaining": "0",
               "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:03Z"}
    assert pause_from_headers(headers, now=now) == 3.0
