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
