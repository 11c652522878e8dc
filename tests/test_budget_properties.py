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


QUANTITIES = (("calls", "max_calls"), ("input_tokens", "max_input_tokens"),
              ("output_tokens", "max_output_tokens"), ("cost_usd", "max_cost_usd"))
COST_SLACK = 1e-9  # sums of float costs in another order may differ by rounding: either answer is right there


class Reference:
    """The documented rule, kept apart from the ledger: a ledger's committed amount (what it
    reserved or spent, its children's included) per quantity, and a request fits when, for this
    ledger and each ancestor, committed + request <= cap on every capped quantity."""

    def __init__(self) -> None:
        self.parent: list[int | None] = []
        self.caps: list[Budget] = []
        self.committed: list[dict[str, float]] = []

    def add(self, budget: Budget, parent: int | None) -> int:
        self.parent.append(parent)
        self.caps.append(budget)
        self.committed.append({quantity: 0 for quantity, _ in QUANTITIES})
        return len(self.caps) - 1

    def chain(self, node: int) -> list[int]:
        nodes: list[int] = []
        current: int | None = node
        while current is not None:
            nodes.append(current)
            current = self.parent[current]
        return nodes

    def verdict(self, node: int, request: dict[str, float]) -> bool | None:
        """True: fits; False: crosses a cap; None: within rounding of a cost cap (either is right)."""
        close = False
        for each in self.chain(node):
            for quantity, cap_name in QUANTITIES:
                cap = getattr(self.caps[each], cap_name)
                if cap is None:
                    continue
                total = self.committed[each][quantity] + request[quantity]
                slack = COST_SLACK if quantity == "cost_usd" else 0
                if total > cap + slack:
                    return False
                close = close or total > cap - slack
        return None if close else True

    def charge(self, node: int, delta: dict[str, float]) -> None:
        for each in self.chain(node):
            for quantity, _ in QUANTITIES:
                self.committed[each][quantity] += delta[quantity]


def as_dict(spend: Spend, times: int = 1) -> dict[str, float]:
    return {quantity: getattr(spend, quantity) * times for quantity, _ in QUANTITIES}


def matches(reference: dict[str, float], ledger: BudgetLedger) -> bool:
    committed = ledger.spent + ledger.reserved
    return all(
        abs(getattr(committed, quantity) - value) <= (COST_SLACK if quantity == "cost_usd" else 0)
        for quantity, value in reference.items()
    )


@settings(max_examples=300, deadline=None)
@given(budgets, budgets, actions)
def test_ledger_refuses_exactly_what_crosses_a_cap_and_returns_to_zero(root_budget: Budget, child_budget: Budget,
                                                                      steps: list) -> None:
    reference = Reference()
    ledgers = [BudgetLedger(root_budget)]
    reference.add(root_budget, None)
    open_holds = []  # (hold, node)
    for action, amount, pick, count in steps:
        node = pick % len(ledgers)
        ledger = ledgers[node]
        if action == "child":
            ledgers.append(ledger.child(child_budget))
            reference.add(child_budget, node)
        elif action in ("reserve", "reserve_many"):
            times = count if action == "reserve_many" else 1
            expected = reference.verdict(node, as_dict(amount, times))
            try:
                holds = ledger.reserve_many([amount] * times)
            except BudgetExceededError:
                assert expected is not True, f"refused {times} x {amount} though it fits"
                continue
            assert expected is not False, f"admitted {times} x {amount} past a cap"
            reference.charge(node, as_dict(amount, times))
            open_holds.extend((hold, node) for hold in holds)
        elif open_holds:
            hold, held_by = open_holds.pop(pick % len(open_holds))
            if action == "settle":
                # real usage never exceeds the worst case that was reserved
                used = Spend(1, amount.input_tokens % (hold.amount.input_tokens + 1),
                             amount.output_tokens % (hold.amount.output_tokens + 1),
                             min(amount.cost_usd, hold.amount.cost_usd))
                hold.settle(Usage(used.input_tokens, used.output_tokens, 1), cost_usd=used.cost_usd)
            else:
                used = Spend()
                hold.release()
            reference.charge(held_by, {q: as_dict(used)[q] - as_dict(hold.amount)[q] for q, _ in QUANTITIES})
        assert all(within(each) for each in ledgers)
        assert all(matches(reference.committed[i], each) for i, each in enumerate(ledgers))
    for hold, _ in open_holds:
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
            # the rule, from the ledgers' own caps and committed amounts (usage above estimates included)
            crosses = any(
                getattr(each.spent + each.reserved + amount, quantity) > cap
                for each in (ledger, parent)
                for quantity, cap_name in QUANTITIES
                if (cap := getattr(each.budget, cap_name)) is not None
            )
            try:
                holds.append(ledger.reserve(amount))
            except BudgetExceededError:
                assert crosses, f"refused {amount} though it fits every cap"
                continue
            assert not crosses, f"admitted {amount} past a cap"
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
