"""Properties of the controllers over generated workloads (hypothesis)."""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmflow import (
    Budget,
    BudgetExceededError,
    BudgetLedger,
    Dispatcher,
    Limits,
    ModelRequest,
    ModelResponse,
    Price,
    Pricing,
    RetryPolicy,
    RLMError,
    ScriptedModel,
    Spend,
    ThrottledError,
    TransientModelError,
    Usage,
)
from rlmflow.dispatch.lane import RunShare
from rlmflow.dispatch.ratelimit import SlidingWindowLimiter

QUANTITIES = (("calls", "max_calls"), ("input_tokens", "max_input_tokens"),
              ("output_tokens", "max_output_tokens"), ("cost_usd", "max_cost_usd"))
BATCH: contextvars.ContextVar[int] = contextvars.ContextVar("BATCH", default=-1)


class RecordingLedger(BudgetLedger):
    """A ledger that notes each reservation asked of it, whether it was refused, and whether the
    documented rule says it had to be: refused exactly when, for this ledger or an ancestor, what
    is committed (spent + reserved) plus the whole batch crosses a cap. The rule is applied here,
    to the amounts the Dispatcher asked for, not taken from the ledger."""

    def __init__(self, budget: Budget | None = None, *, parent: BudgetLedger | None = None) -> None:
        super().__init__(budget, parent=parent)
        self.asked: list[tuple[int, list[Spend], bool | None, bool]] = []  # batch, amounts, fits, refused

    def rule(self, amounts: Sequence[Spend]) -> bool | None:
        """True: fits; False: crosses a cap; None: within float rounding of a cost cap."""
        close = False
        ledger: BudgetLedger | None = self
        while ledger is not None:
            committed = ledger.spent + ledger.reserved
            for quantity, cap_name in QUANTITIES:
                cap = getattr(ledger.budget, cap_name)
                if cap is None:
                    continue
                total = getattr(committed, quantity) + sum(getattr(a, quantity) for a in amounts)
                slack = 1e-12 if quantity == "cost_usd" else 0
                if total > cap + slack:
                    return False
                close = close or total > cap - slack
            ledger = ledger.parent
        return None if close else True

    def reserve_many(self, amounts: Sequence[Spend]) -> list[Any]:
        amounts = list(amounts)
        fits = self.rule(amounts)
        try:
            holds = super().reserve_many(amounts)
        except BudgetExceededError:
            self.asked.append((BATCH.get(), amounts, fits, True))
            raise
        self.asked.append((BATCH.get(), amounts, fits, False))
        return holds

    def check(self, prompts: dict[int, list[str]], max_tokens: int, refused_batches: set[int]) -> None:
        """Every refusal was needed, every admission allowed, and each reservation is a worst case:
        one call, ``max_tokens`` out, at least a token per four characters in, priced at $1/$10 per
        million tokens."""
        assert {batch for batch, *_, refused in self.asked if refused} == refused_batches
        for batch, amounts, fits, refused in self.asked:
            wrong = fits is True if refused else fits is False
            assert not wrong, f"batch {batch}: refused={refused} but the caps say fits={fits}"
            assert len(amounts) == len(prompts[batch])
            for amount, prompt in zip(amounts, prompts[batch], strict=True):
                assert amount.calls == 1 and amount.output_tokens == max_tokens
                assert amount.input_tokens >= len(prompt) / 4
                assert abs(amount.cost_usd - (amount.input_tokens * 1e-6 + max_tokens * 1e-5)) < 1e-12


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
    ledger = RecordingLedger(budget)
    sent: dict[int, list[str]] = {}
    refused: set[int] = set()

    async def scenario() -> None:
        async def batch(index: int, run: int, size: int, kind: str) -> None:
            BATCH.set(index)
            requests = [ModelRequest.from_prompt(f"{kind}:{index}:{i}", max_tokens=20) for i in range(size)]
            sent[index] = [r.messages[-1].content for r in requests]
            try:
                outcomes = await dispatcher.call_many(model, requests, ledger=ledger, share=shares[run])
            except BudgetExceededError:
                assert not any(r.messages[-1].content in attempts for r in requests)  # nothing was sent
                refused.add(index)
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
    ledger.check(sent, 20, refused)
    spent = ledger.spent
    assert max_calls is None or spent.calls <= max_calls
    assert max_output is None or spent.output_tokens <= max_output
    assert max_cost is None or spent.cost_usd <= max_cost + 1e-12
    assert ledger.reserved.calls == 0 and ledger.reserved.output_tokens == 0 and abs(ledger.reserved.cost_usd) < 1e-12


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10), min_size=1, max_size=4),
    max_calls=st.one_of(st.none(), st.integers(1, 30)),
    max_input=st.one_of(st.none(), st.integers(20, 600)),
    max_output=st.one_of(st.none(), st.integers(20, 400)),
    max_cost=st.one_of(st.none(), st.floats(0.0002, 0.01)),
    parent_calls=st.one_of(st.none(), st.integers(1, 30)),
    rng=st.randoms(use_true_random=False),
    cancel_at=st.one_of(st.none(), st.integers(0, 60)),
    concurrency=st.integers(1, 6),
)
def test_usage_above_estimates_refusals_and_cancellation_keep_the_guarantee(
    sizes: list[int], max_calls: int | None, max_input: int | None, max_output: int | None,
    max_cost: float | None, parent_calls: int | None, rng: Any, cancel_at: int | None, concurrency: int,
) -> None:
    """Real usage up to 3x the reservation, refusals at random, cancellation at any await:
    every ledger keeps spent + reserved <= cap + overrun, the overrun is exactly what calls spent
    beyond their reservations, and nothing stays reserved or in flight."""
    checkpoints = 0
    scopes: list[anyio.CancelScope] = []
    model = ScriptedModel(lambda r: "", name="m")  # replaced below: needs the dispatcher's estimate
    dispatcher = Dispatcher(
        limits={"scripted": Limits(max_concurrency=concurrency)},
        retry=RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002, max_throttles=3, seed=0),
        pricing=Pricing({"m": Price(1.0, 10.0)}),
    )
    excess = Spend()

    async def reply(request: ModelRequest) -> ModelResponse:
        nonlocal checkpoints, excess
        for _ in range(2):
            checkpoints += 1
            if checkpoints == cancel_at:
                scopes[0].cancel()
            await anyio.lowlevel.checkpoint()
        if rng.random() < 0.2:
            raise ThrottledError("slow down", retry_after=0.001)
        estimate = dispatcher.estimate(model, request)
        usage = Usage(int(estimate.input_tokens * rng.uniform(0.5, 3.0)),
                      int(estimate.output_tokens * rng.uniform(0.0, 2.0)), 1)
        cost = usage.input_tokens * 1e-6 + usage.output_tokens * 1e-5
        excess = excess + Spend(0, max(0, usage.input_tokens - estimate.input_tokens),
                                max(0, usage.output_tokens - estimate.output_tokens),
                                max(0.0, cost - estimate.cost_usd))
        return ModelResponse("ok", usage, "m")

    model = ScriptedModel(reply, name="m")
    tenant = BudgetLedger(Budget(max_calls=parent_calls))
    ledger = RecordingLedger(Budget(max_calls=max_calls, max_input_tokens=max_input, max_output_tokens=max_output,
                                    max_cost_usd=max_cost), parent=tenant)
    sent: dict[int, list[str]] = {}
    refused: set[int] = set()

    async def scenario() -> None:
        async def batch(index: int, size: int) -> None:
            BATCH.set(index)
            requests = [ModelRequest.from_prompt(f"{index}:{i} " + "w" * 40, max_tokens=20) for i in range(size)]
            sent[index] = [r.messages[-1].content for r in requests]
            try:
                await dispatcher.call_many(model, requests, ledger=ledger)
            except BudgetExceededError:
                refused.add(index)

        scopes.append(anyio.CancelScope())
        with scopes[0]:
            async with anyio.create_task_group() as tg:
                for index, size in enumerate(sizes):
                    tg.start_soon(batch, index, size)
        for lane in dispatcher.statistics():
            assert lane.in_flight == 0 and lane.waiting == 0

    anyio.run(scenario)
    ledger.check(sent, 20, refused)
    for each in (ledger, tenant):
        committed = each.spent + each.reserved
        for quantity, cap in (("calls", each.budget.max_calls), ("input_tokens", each.budget.max_input_tokens),
                              ("output_tokens", each.budget.max_output_tokens),
                              ("cost_usd", each.budget.max_cost_usd)):
            assert cap is None or getattr(committed, quantity) <= cap + getattr(each.overrun, quantity) + 1e-9
        assert each.reserved.calls == 0 and each.reserved.input_tokens == 0 and abs(each.reserved.cost_usd) < 1e-12
    assert ledger.overrun.input_tokens == excess.input_tokens
    assert ledger.overrun.output_tokens == excess.output_tokens
    assert abs(ledger.overrun.cost_usd - excess.cost_usd) < 1e-9
