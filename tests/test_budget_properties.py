"""Invariants of the budget ledger and the priority slots, over generated workloads."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmflow import Budget, BudgetExceededError, BudgetLedger, Spend, Usage

spends = st.builds(
    Spend,
    calls=st.integers(1, 3),
    input_tokens=st.integers(0, 500),
    output_tokens=st.integers(0, 300),
    cost_usd=st.floats(0, 0.5),
)
actions = st.lists(
    st.tuples(st.sampled_from(["reserve", "reserve_many", "settle", "release", "child"]), spends,
              st.integers(0, 1000), st.integers(1, 5)),
    max_size=60,
)
budgets = st.builds(
    Budget,
    max_calls=st.one_of(st.none(), st.integers(1, 40)),
    max_input_tokens=st.one_of(st.none(), st.integers(100, 5000)),
    max_output_tokens=st.one_of(st.none(), st.integers(100, 3000)),
    max_cost_usd=st.one_of(st.none(), st.floats(0.1, 5)),
)


def within(ledger: BudgetLedger) -> bool:
    committed = ledger.spent + ledger.reserved
    caps = ledger.budget
    return all(
        cap is None or value <= cap + 1e-9
        for value, cap in (
            (committed.calls, caps.max_calls),
            (committed.input_tokens, caps.max_input_tokens),
            (committed.output_tokens, caps.max_output_tokens),
            (committed.cost_usd, caps.max_cost_usd),
        )
    )


@settings(max_examples=300, deadline=None)
@given(budgets, budgets, actions)
def test_ledger_never_commits_past_a_cap_and_returns_to_zero(root_budget: Budget, child_budget: Budget,
                                                             steps: list) -> None:
    root = BudgetLedger(root_budget)
    ledgers = [root]
    open_holds = []
    for action, amount, pick, count in steps:
        ledger = ledgers[pick % len(ledgers)]
        if action == "child":
            ledgers.append(ledger.child(child_budget))
        elif action in ("reserve", "reserve_many"):
            try:
                holds = ledger.reserve_many([amount] * (count if action == "reserve_many" else 1))
            except BudgetExceededError:
                continue
            open_holds.extend(holds)
        elif open_holds:
            hold = open_holds.pop(pick % len(open_holds))
            if action == "settle":
                # real usage never exceeds the worst case that was reserved
                hold.settle(Usage(amount.input_tokens % (hold.amount.input_tokens + 1),
                                  amount.output_tokens % (hold.amount.output_tokens + 1), 1),
                            cost_usd=min(amount.cost_usd, hold.amount.cost_usd))
            else:
                hold.release()
        assert all(within(each) for each in ledgers)
    for hold in open_holds:
        hold.release()
    for ledger in ledgers:
        assert ledger.reserved.calls == 0
        assert ledger.reserved.input_tokens == 0 and ledger.reserved.output_tokens == 0
        assert abs(ledger.reserved.cost_usd) < 1e-9


def test_reserve_many_is_all_or_nothing() -> None:
    ledger = BudgetLedger(Budget(max_calls=5))
    with pytest.raises(BudgetExceededError, match="only 5 of these 7"):
        ledger.reserve_many([Spend(calls=1)] * 7)
    assert ledger.reserved == Spend()
    child = ledger.child(Budget(max_calls=3))
    holds = child.reserve_many([Spend(calls=1)] * 3)
    assert ledger.reserved.calls == 3
    holds[0].settle(Usage(1, 1, 1))
    assert ledger.spent.calls == 1 and child.spent.calls == 1
    assert ledger.remaining()["calls"] == 2 and child.remaining()["calls"] == 0


# -- real usage above the reservation ----------------------------------------------------------

overruns = st.lists(
    st.tuples(st.sampled_from(["reserve", "settle", "release"]), spends, st.integers(0, 1000),
              st.floats(0.0, 3.0), st.integers(0, 3)),
    max_size=80,
)


def guarantee_holds(ledger: BudgetLedger) -> bool:
    """spent + reserved <= cap + overrun, for every capped quantity (the documented guarantee)."""
    committed = ledger.spent + ledger.reserved
    allowed = ledger.overrun
    return all(
        cap is None or getattr(committed, quantity) <= cap + getattr(allowed, quantity) + 1e-9
        for quantity, cap in (
            ("calls", ledger.budget.max_calls),
            ("input_tokens", ledger.budget.max_input_tokens),
            ("output_tokens", ledger.budget.max_output_tokens),
            ("cost_usd", ledger.budget.max_cost_usd),
        )
    )


@settings(max_examples=300, deadline=None)
@given(budgets, budgets, overruns)
def test_usage_above_the_reservation_is_bounded_by_the_recorded_overrun(
    parent_budget: Budget, child_budget: Budget, steps: list
) -> None:
    parent = BudgetLedger(parent_budget)
    children = [parent.child(child_budget), parent.child(child_budget)]
    holds = []
    expected_overrun = Spend()
    for action, amount, pick, factor, extra_calls in steps:
        ledger = children[pick % 2]
        if action == "reserve":
            try:
                holds.append(ledger.reserve(amount))
            except BudgetExceededError:
                # refused only because a cap of this ledger or its parent would be crossed
                assert not ledger.fits(amount)
        elif holds:
            hold = holds.pop(pick % len(holds))
            if action == "settle":
                # real usage up to three times the estimate, sometimes more calls than one
                usage = Usage(int(hold.amount.input_tokens * factor), int(hold.amount.output_tokens * factor),
                              hold.amount.calls + extra_calls)
                cost = hold.amount.cost_usd * factor
                excess = hold.settle(usage, cost)
                assert excess == Spend(
                    max(0, usage.calls - hold.amount.calls),
                    max(0, usage.input_tokens - hold.amount.input_tokens),
                    max(0, usage.output_tokens - hold.amount.output_tokens),
                    max(0.0, cost - hold.amount.cost_usd),
                )
                expected_overrun = expected_overrun + excess
            else:
                hold.release()
        for each in [parent, *children]:
            assert guarantee_holds(each)
            assert all(left is None or left >= 0 for left in each.remaining().values())
    assert parent.overrun.calls == expected_overrun.calls
    assert parent.overrun.input_tokens == expected_overrun.input_tokens
    assert abs(parent.overrun.cost_usd - expected_overrun.cost_usd) < 1e-9


def test_a_reached_cap_admits_nothing_more() -> None:
    ledger = BudgetLedger(Budget(max_output_tokens=100))
    hold = ledger.reserve(Spend(calls=1, output_tokens=60))
    assert hold.settle(Usage(0, 150, 1)) == Spend(output_tokens=90)  # the provider ignored max_tokens
    assert ledger.spent.output_tokens == 150 and ledger.overrun.output_tokens == 90
    assert ledger.remaining()["output_tokens"] == 0
    with pytest.raises(BudgetExceededError):
        ledger.reserve(Spend(calls=1, output_tokens=1))


def test_a_shared_parent_ledger_stops_every_run_drawing_on_it() -> None:
    tenant = BudgetLedger(Budget(max_calls=10))
    runs = [tenant.child(Budget(max_calls=8)) for _ in range(3)]
    holds = [runs[i % 3].reserve(Spend(calls=1)) for i in range(10)]
    for run in runs:  # the tenant is spent: every run's next call is refused, nothing is held
        with pytest.raises(BudgetExceededError, match="max_calls=10"):
            run.reserve(Spend(calls=1))
        assert run.reserved.calls in (3, 4)
    for hold in holds[:4]:
        hold.release()  # a run that did not use its calls leaves them to the others
    runs[0].reserve_many([Spend(calls=1)] * 4)
    assert tenant.reserved.calls == 10 and tenant.remaining()["calls"] == 0
