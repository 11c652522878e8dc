"""A cap bounds what was really spent: requests the provider accepted are charged however the run ended.

The provider here is a model function that counts the requests it accepted; from the ``k``-th
on it never answers, and the caller cancels as soon as it has accepted that one. Requests already
answered are charged their usage; those in flight at the cancellation are charged their whole
reservation (a real provider finishes and bills them); those still waiting for admission are
charged nothing. So the ledger counts exactly the accepted requests, whatever ``k`` and the
lane's width.
"""

from __future__ import annotations

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmflow import Budget, BudgetLedger, Dispatcher, Limits, ModelRequest, ScriptedModel, Spend


async def cancelled_fan_out(calls: int, hang_from: int, width: int, *, through_call: bool) -> tuple[int, int, int]:
    accepted = 0
    hanging = anyio.Event()

    async def provider(request: ModelRequest) -> str:
        nonlocal accepted
        accepted += 1
        if accepted >= hang_from:
            hanging.set()
            await anyio.sleep_forever()
        return "ok"

    model = ScriptedModel(provider, name="m", provider="fake")
    dispatcher = Dispatcher(limits={"fake": Limits(max_concurrency=width, initial_concurrency=width)})
    tenant = BudgetLedger(Budget(max_calls=10_000))
    run = tenant.child(Budget())
    requests = [ModelRequest.from_prompt(f"p{i}", max_tokens=16) for i in range(calls)]
    async with anyio.create_task_group() as tg:
        if through_call:  # one call() per request, each its own task
            for request in requests:
                tg.start_soon(lambda r=request: dispatcher.call(model, r, ledger=run))
        else:
            tg.start_soon(lambda: dispatcher.call_many(model, requests, ledger=run))
        await hanging.wait()
        tg.cancel_scope.cancel()
    assert run.reserved == tenant.reserved == Spend()  # every hold was settled or dropped
    return accepted, run.spent.calls, tenant.spent.calls


@settings(max_examples=60, deadline=None)
@given(
    calls=st.integers(1, 40),
    hang_from=st.integers(1, 40),
    width=st.integers(1, 12),
    through_call=st.booleans(),
)
def test_every_accepted_request_is_charged_and_no_other(calls: int, hang_from: int, width: int,
                                                         through_call: bool) -> None:
    hang_from = min(hang_from, calls)
    accepted, run_calls, tenant_calls = anyio.run(
        lambda: cancelled_fan_out(calls, hang_from, width, through_call=through_call)
    )
    assert run_calls == tenant_calls == accepted
    assert hang_from <= accepted <= calls
