"""Budgets and the hierarchical ledger that enforces them before money is spent.

A call reserves a conservative estimate of its cost (one call, the input estimate with a margin,
``max_tokens`` of output, and their price) before it is sent, and settles to its real usage
afterwards. A call that failed before the provider accepted it (refused, or cancelled while
still waiting for admission) releases its reservation; one cancelled after its request left
(the run was cancelled or passed its deadline, the client went away) is charged its whole
reservation, since the provider finishes and bills it all the same. So a cap bounds what a run
really spent however it ended. The check and the reservation happen together, so concurrent
calls are admitted only while everything reserved fits.

A call can still spend more than it reserved (a tokenizer counts more input tokens than the
estimate, a provider ignores ``max_tokens``). The excess is recorded as the ledger's ``overrun``
(and returned by :meth:`Reservation.settle` so the caller can report it), and no new call is
admitted on a quantity whose cap is reached. The exact guarantee, for every capped quantity of
every ledger, at every moment::

    spent + reserved <= cap + overrun

where ``overrun`` sums, over the calls settled so far, what each spent beyond its own
reservation. So a cap is exceeded by at most the overrun of calls admitted before it was
reached, and never by a call admitted after.

A child ledger (``rlm_query``, or one run under a tenant's ledger) has its own caps and forwards
every reservation to its parent, so a child can never spend what its parent does not have, and
whatever it does not use stays with the parent. Exhausting a parent refuses the next call of
every child.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from .._exceptions import BudgetExceededError
from ..models.base import Usage

__all__ = ["Budget", "BudgetLedger", "Reservation", "Spend"]


@dataclass(frozen=True, slots=True)
class Budget:
    """Caps of one run; ``None`` means unlimited.

    ``deadline`` is in seconds from the start of the run; ``max_depth`` is the deepest
    ``rlm_query`` nesting (0: no children); ``max_turns`` caps root turns (it overrides
    ``RLM(max_turns=...)`` when smaller).
    """

    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    max_cost_usd: float | None = None
    max_calls: int | None = None
    deadline: float | None = None
    max_depth: int | None = None
    max_turns: int | None = None


@dataclass(frozen=True, slots=True)
class Spend:
    """Quantities tracked by a ledger."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Spend) -> Spend:
        return Spend(
            self.calls + other.calls,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
        )

    def __sub__(self, other: Spend) -> Spend:
        return Spend(
            self.calls - other.calls,
            self.input_tokens - other.input_tokens,
            self.output_tokens - other.output_tokens,
            self.cost_usd - other.cost_usd,
        )


_CAPS = (
    ("calls", "max_calls"),
    ("input_tokens", "max_input_tokens"),
    ("output_tokens", "max_output_tokens"),
    ("cost_usd", "max_cost_usd"),
)


class Reservation:
    """A worst-case hold on a ledger (and its ancestors); settle or release it exactly once."""

    __slots__ = ("_done", "amount", "ledger")

    def __init__(self, ledger: BudgetLedger, amount: Spend) -> None:
        self.ledger = ledger
        self.amount = amount
        self._done = False

    def settle(self, usage: Usage, cost_usd: float = 0.0) -> Spend:
        """Replace the hold by the real spend of the call; return what it spent beyond the hold."""
        if self._done:
            return Spend()
        self._done = True
        actual = Spend(usage.calls or 1, usage.input_tokens, usage.output_tokens, cost_usd)
        return self.ledger._settle(self.amount, actual)

    def release(self) -> None:
        """Drop the hold: nothing was spent (the call failed before the provider charged it)."""
        if self._done:
            return
        self._done = True
        self.ledger._settle(self.amount, Spend())

    def keep(self) -> None:
        """Charge the whole hold: the call's outcome is unknown but the provider may bill it (its
        request was cancelled after it was sent)."""
        if self._done:
            return
        self._done = True
        self.ledger._settle(self.amount, self.amount)


def _excess(actual: Spend, held: Spend) -> Spend:
    return Spend(
        max(0, actual.calls - held.calls),
        max(0, actual.input_tokens - held.input_tokens),
        max(0, actual.output_tokens - held.output_tokens),
        max(0.0, actual.cost_usd - held.cost_usd),
    )


class BudgetLedger:
    """Tracks spent, reserved and overrun quantities against a :class:`Budget`.

    ``parent``: the ledger this one draws from (a tenant's or a batch's, shared by many runs);
    every reservation and every spend is charged to it as well.
    """

    def __init__(self, budget: Budget | None = None, *, parent: BudgetLedger | None = None) -> None:
        self.budget = budget or Budget()
        self.parent = parent
        self.spent = Spend()
        self.reserved = Spend()
        self.overrun = Spend()

    def caps_cost(self) -> bool:
        """Whether this ledger or an ancestor caps ``max_cost_usd`` (a price is then required)."""
        return any(ledger.budget.max_cost_usd is not None for ledger in self._chain())

    def child(self, allotment: Budget | None = None) -> BudgetLedger:
        """A ledger for a child run that draws from this one."""
        return BudgetLedger(allotment, parent=self)

    def _chain(self) -> list[BudgetLedger]:
        chain: list[BudgetLedger] = []
        ledger: BudgetLedger | None = self
        while ledger is not None:
            chain.append(ledger)
            ledger = ledger.parent
        return chain

    def _shortfall(self, amount: Spend) -> tuple[str, str] | None:
        """The first cap that ``amount`` would cross, as (quantity, message); None if it fits."""
        for ledger in self._chain():
            committed = ledger.spent + ledger.reserved + amount
            for quantity, cap_name in _CAPS:
                cap = getattr(ledger.budget, cap_name)
                if cap is not None and getattr(committed, quantity) > cap:
                    used = getattr(ledger.spent + ledger.reserved, quantity)
                    return cap_name, f"{cap_name}={cap} (already used or reserved: {used:g})"
        return None

    def fits(self, amount: Spend) -> bool:
        return self._shortfall(amount) is None

    def reserve(self, amount: Spend) -> Reservation:
        """Hold ``amount`` or raise :class:`BudgetExceededError` without holding anything."""
        return self.reserve_many([amount])[0]

    def reserve_many(self, amounts: Sequence[Spend]) -> list[Reservation]:
        """All or nothing: hold every amount, or raise saying how many would have fit."""
        total = Spend()
        for amount in amounts:
            total = total + amount
        problem = self._shortfall(total)
        if problem is not None:
            fitting, running = 0, Spend()
            for amount in amounts:
                if not self.fits(running + amount):
                    break
                running = running + amount
                fitting += 1
            cap_name, detail = problem
            if len(amounts) > 1:
                message = (
                    f"budget: only {fitting} of these {len(amounts)} calls fit under {detail}. "
                    "Nothing was sent. Aggregate more text per call, send fewer calls, or check budget()."
                )
            else:
                message = f"budget: this call does not fit under {detail}. Nothing was sent."
            raise BudgetExceededError(message, limit=cap_name, spent=asdict(self.spent))
        for ledger in self._chain():
            ledger.reserved = ledger.reserved + total
        return [Reservation(self, amount) for amount in amounts]

    def _settle(self, held: Spend, actual: Spend) -> Spend:
        excess = _excess(actual, held)
        for ledger in self._chain():
            ledger.reserved = ledger.reserved - held
            ledger.spent = ledger.spent + actual
            ledger.overrun = ledger.overrun + excess
        return excess

    def remaining(self) -> dict[str, float | None]:
        """What may still be spent on each capped quantity, counting this ledger's ancestors
        (0 once a cap is reached, even if an overrun went past it)."""
        result: dict[str, float | None] = {}
        for quantity, cap_name in _CAPS:
            left: float | None = None
            for ledger in self._chain():
                cap = getattr(ledger.budget, cap_name)
                if cap is None:
                    continue
                committed = getattr(ledger.spent + ledger.reserved, quantity)
                left = cap - committed if left is None else min(left, cap - committed)
            result[quantity] = None if left is None else max(0, left)
        return result

    def __repr__(self) -> str:
        caps = {f.name: getattr(self.budget, f.name) for f in fields(self.budget) if getattr(self.budget, f.name)}
        return f"BudgetLedger(spent={self.spent}, reserved={self.reserved}, overrun={self.overrun}, caps={caps})"
