"""Properties of the controllers over generated workloads (hypothesis)."""

from __future__ import annotations

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmflow import (
    Budget,
    BudgetExceededError,
    BudgetLedger,
    Dispatcher,
    Limits,
    ModelRequest,
    Price,
    Pricing,
    RetryPolicy,
    RLMError,
    ScriptedModel,
    ThrottledError,
    TransientModelError,
)
from rlmflow.dispatch.lane import RunShare
from rlmflow.dispatch.ratelimit import SlidingWindowLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 50),
    steps=st.lists(st.tuples(st.floats(0, 0.7), st.integers(1, 20)), min_size=1, max_size=120),
)
def test_sliding_window_never_admits_more_than_the_limit(limit: int, steps: list[tuple[float, int]]) -> None:
    clock = FakeClock()
    limiter = SlidingWindowLimiter(limit, window=1.0, clock=clock)
    admitted: list[tuple[float, float]] = []
    for advance, amount in steps:
        clock.now += advance
        wait = limiter.delay(amount)
        admission = limiter.acquire_nowait(amount)
        assert (admission is not None) == (wait == 0)
        if admission is None:
            clock.now += wait  # the promised wait is enough
            admission = limiter.acquire_nowait(amount)
            assert admission is not None
        admitted.append((admission.at, admission.amount))
        in_window = sum(a for t, a in admitted if clock.now - t < 1.0 - 1e-9)
        assert in_window <= limit + 1e-9


workloads = st.lists(
    st.tuples(st.integers(0, 2), st.integers(1, 12), st.sampled_from(["ok", "throttle", "flaky", "fatal"])),
    min_size=1,
    max_size=6,
)


@settings(max_examples=40, deadline=None)
@given(
    batches=workloads,
    max_calls=st.one_of(st.none(), st.integers(1, 40)),
    max_output=st.one_of(st.none(), st.integers(50, 600)),
    max_cost=st.one_of(st.none(), st.floats(0.0005, 0.01)),
    concurrency=st.integers(1, 6),
)
def test_dispatcher_never_overspends_and_answers_every_prompt_once(
    batches: list[tuple[int, int, str]], max_calls: int | None, max_output: int | None, max_cost: float | None,
    concurrency: int,
) -> None:
    attempts: dict[str, int] = {}

    def reply(request: ModelRequest) -> str:
        prompt = request.messages[-1].content
        attempts[prompt] = attempts.get(prompt, 0) + 1
        kind = prompt.split(":")[0]
        if kind == "throttle" and attempts[prompt] == 1:
            raise ThrottledError("slow down", retry_after=0.001)
        if kind == "flaky" and attempts[prompt] <= 2:
            raise TransientModelError("reset")
        if kind == "fatal":
            raise RLMError("refused")
        return "answer:" + prompt

    model = ScriptedModel(reply, name="m")
    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=concurrency)},
        retry=RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.002, seed=0),
        pricing=Pricing({"m": Price(1.0, 10.0)}),  # $ per million tokens
    )
    budget = Budget(max_calls=max_calls, max_output_tokens=max_output, max_cost_usd=max_cost)
    ledger = BudgetLedger(budget)

    async def scenario() -> None:
        async def batch(index: int, run: int, size: int, kind: str) -> None:
            requests = [ModelRequest.from_prompt(f"{kind}:{index}:{i}", max_tokens=20) for i in range(size)]
            try:
                outcomes = await dispatcher.call_many(model, requests, ledger=ledger, share=shares[run])
            except BudgetExceededError:
                assert not any(r.messages[-1].content in attempts for r in requests)  # nothing was sent
                return
            assert len(outcomes) == size
            for request, outcome in zip(requests, outcomes, strict=True):
                prompt = request.messages[-1].content
                if kind == "fatal":
                    assert isinstance(outcome, RLMError)
                else:
                    assert getattr(outcome, "text", None) == "answer:" + prompt

        shares = [RunShare(name=str(i)) for i in range(3)]
        async with anyio.create_task_group() as tg:
            for index, (run, size, kind) in enumerate(batches):
                tg.start_soon(batch, index, run, size, kind)
        for lane in dispatcher.statistics():
            assert lane.in_flight == 0 and lane.waiting == 0

    anyio.run(scenario)
    spent = ledger.spent
    assert max_calls is None or spent.calls <= max_calls
    assert max_output is None or spent.output_tokens <= max_output
    assert max_cost is None or spent.cost_usd <= max_cost + 1e-12
    assert ledger.reserved.calls == 0 and ledger.reserved.output_tokens == 0 and abs(ledger.reserved.cost_usd) < 1e-12
