"""A budget shared by every process of a deployment (a tenant's cap), kept in Redis.

The same rule as the in-memory :class:`~rlmflow.dispatch.budget.BudgetLedger`: a call reserves its
worst case before it is sent and settles to its real spend after; the check and the hold are one
atomic script (:data:`redis_scripts.BUDGET_RESERVE`), so concurrent reservations from any number
of processes can never commit more than the cap. A process that dies holding reservations cannot
settle them: their leases end ``lease`` seconds after its last heartbeat and they are charged at
their worst case (the calls may have been billed), never handed back.

While Redis is unreachable nothing new can be reserved (:class:`BudgetExceededError` with
``limit="shared"``): a cap that cannot be checked is not spent. Settlements that cannot be sent are
left to the leases (charged at the worst case).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass

import anyio

from .._exceptions import BudgetExceededError, ConfigurationError
from ..models.base import Usage
from .budget import Budget, Spend
from .shared import SharedLostError, SharedState

__all__ = ["Allotment", "SharedBudget", "SharedReservation"]

_QUANTITIES = ("calls", "input_tokens", "output_tokens", "cost_usd")
_CAPS = ("max_calls", "max_input_tokens", "max_output_tokens", "max_cost_usd")


def _caps(budget: Budget) -> list[float]:
    return [-1 if getattr(budget, cap) is None else float(getattr(budget, cap)) for cap in _CAPS]


def _values(spend: Spend) -> list[float]:
    return [float(getattr(spend, q)) for q in _QUANTITIES]


class SharedReservation:
    """A worst-case hold on a :class:`SharedBudget`; settle or release it exactly once."""

    __slots__ = ("_done", "amount", "budget", "id")

    def __init__(self, budget: SharedBudget, id: str, amount: Spend) -> None:
        self.budget = budget
        self.id = id
        self.amount = amount
        self._done = False

    async def settle(self, usage: Usage, cost_usd: float = 0.0) -> None:
        """Replace the hold by what the call really spent."""
        if not self._done:
            self._done = True
            actual = Spend(usage.calls or 1, usage.input_tokens, usage.output_tokens, cost_usd)
            await self.budget._finish(self, actual)

    async def release(self) -> None:
        """Drop the hold: the call was not sent (or failed before the provider charged it)."""
        if not self._done:
            self._done = True
            await self.budget._finish(self, Spend())


@dataclass
class Allotment:
    """A run's share of a :class:`SharedBudget`; set ``spent`` to what the run really spent."""

    budget: Budget
    spent: Spend | None = None


class SharedBudget:
    """Caps (:class:`Budget`'s token, cost and call caps) that hold across processes.

    ``name`` identifies the ledger in Redis (e.g. the tenant id): every process that builds a
    SharedBudget of the same name on the same :class:`SharedState` draws from one ledger. The caps
    are passed on each reservation, so processes should agree on them.
    """

    def __init__(self, state: SharedState, name: str, budget: Budget) -> None:
        self.state = state
        self.name = name
        self.budget = budget
        self._keys = state.budget_keys(name)
        self._held: dict[str, SharedReservation] = {}
        self._renewing = False

    async def reserve_many(self, amounts: Sequence[Spend]) -> list[SharedReservation]:
        """All or nothing: hold every amount, or raise :class:`BudgetExceededError` holding nothing."""
        reservations = [SharedReservation(self, self.state.new_id(), amount) for amount in amounts]
        args: list[object] = [self.state.config.lease * 1000, *_caps(self.budget)]
        for reservation in reservations:
            args += [reservation.id, *_values(reservation.amount)]
        try:
            result = await self.state.run("BUDGET_RESERVE", self._keys, args)
        except SharedLostError as exc:
            raise BudgetExceededError(
                f"budget {self.name!r} lives in Redis, which cannot be reached: nothing was sent", limit="shared"
            ) from exc
        if int(result[0]) != 1:
            index = int(result[1]) - 1
            spent = {q: float(v) for q, v in zip(_QUANTITIES, result[2:6], strict=True)}
            reserved = float(result[6 + index])
            cap = _CAPS[index]
            raise BudgetExceededError(
                f"budget {self.name!r}: {len(amounts)} call(s) do not fit under {cap}={getattr(self.budget, cap)} "
                f"(spent {spent[_QUANTITIES[index]]:g}, reserved by calls in flight {reserved:g}). Nothing was sent.",
                limit=cap, spent=spent,
            )
        for reservation in reservations:
            self._held[reservation.id] = reservation
        if not self._renewing:
            self._renewing = True
            self.state.add_renewal(self._renew)
        return reservations

    async def reserve(self, amount: Spend) -> SharedReservation:
        return (await self.reserve_many([amount]))[0]

    @contextlib.asynccontextmanager
    async def allot(self, budget: Budget) -> AsyncIterator[Allotment]:
        """Hold a whole run's caps on this shared budget while the run goes (the usual way to
        give runs in many replicas one tenant budget)::

            async with tenant.allot(Budget(max_calls=40, max_cost_usd=0.20)) as allotment:
                result = await rlm.run(document, query, budget=allotment.budget)
                allotment.spent = result.spent

        The run's own ledger keeps it within ``budget``; the shared budget is charged
        ``allotment.spent`` at the end (the whole allotment if it was never set: a failed run's
        spend is unknown, so it is charged its worst case). Every quantity this shared budget caps
        must be capped by ``budget`` too. Raises :class:`BudgetExceededError` if it does not fit.
        """
        amounts = {}
        for quantity, cap in zip(_QUANTITIES, _CAPS, strict=True):
            if getattr(self.budget, cap) is not None and getattr(budget, cap) is None:
                raise ConfigurationError(f"the shared budget {self.name!r} caps {cap}: the run's budget must too")
            amounts[quantity] = getattr(budget, cap) or 0
        amount = Spend(int(amounts["calls"]), int(amounts["input_tokens"]), int(amounts["output_tokens"]),
                       float(amounts["cost_usd"]))
        reservation = await self.reserve(amount)
        reservation._done = True  # settled here, below
        allotment = Allotment(budget)
        try:
            yield allotment
        finally:
            spent = allotment.spent if allotment.spent is not None else amount
            with anyio.CancelScope(shield=True):
                await self._finish(reservation, spent)

    async def _finish(self, reservation: SharedReservation, actual: Spend) -> None:
        self._held.pop(reservation.id, None)
        try:
            await self.state.run("BUDGET_RELEASE", self._keys, [reservation.id, *_values(actual)])
        except SharedLostError:
            pass  # the lease ends and charges the worst case: never less than was spent

    async def _renew(self) -> None:
        if self._held:
            await self.state.run_in_background(
                "BUDGET_RENEW", [self._keys[1]], [self.state.config.lease * 1000, *self._held]
            )

    async def totals(self) -> tuple[Spend, Spend]:
        """(spent, reserved) across every process, as Redis has them now."""
        raw = await self.state.read_hash(self._keys[0])

        def read(prefix: str) -> Spend:
            values = {q: float(raw.get(f"{prefix}_{q}", 0)) for q in _QUANTITIES}
            return Spend(int(values["calls"]), int(values["input_tokens"]), int(values["output_tokens"]),
                         values["cost_usd"])

        return read("spent"), read("reserved")

    def __repr__(self) -> str:
        caps = {k: v for k, v in asdict(self.budget).items() if v is not None}
        return f"SharedBudget({self.name!r}, caps={caps}, held_here={len(self._held)})"
