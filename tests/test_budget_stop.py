"""A budget refusal ends the run within a turn: the root is told once, then answers (marked) or the run stops."""

from __future__ import annotations

import pytest

from rlmflow import RLM, Budget, BudgetExceededError, BudgetLedger, ModelRequest, ScriptedModel
from rlmflow.events import AnswerReady, RunEvent

from .helpers import repl, turn_script

pytestmark = pytest.mark.anyio

FAN_OUT = "answers = llm_query_many(['p%d' % i for i in range(10)])\nprint(len(answers))"


def told(request: ModelRequest) -> bool:
    return any("budget is spent" in m.content for m in request.messages if m.role == "user")


async def test_a_refused_batch_makes_the_next_turn_the_last_and_marks_the_answer() -> None:
    def root(request: ModelRequest) -> str:
        if told(request):
            return repl("FINAL('what I had')")
        return repl(FAN_OUT)

    events: list[RunEvent] = []
    tenant = BudgetLedger(Budget(max_calls=6))  # 10 sub-calls never fit
    sub = ScriptedModel(lambda r: "x", name="sub")
    async with RLM(root=ScriptedModel(root, name="root"), sub=sub, max_turns=12) as rlm:
        result = await rlm.run("doc", "q?", ledger=tenant, events=events.append)
    assert result.answer == "what I had" and result.limited == "max_calls"
    assert result.turns == 2  # not the twelve turns it was allowed
    (answer,) = [e for e in events if isinstance(e, AnswerReady)]
    assert answer.limited == "max_calls"
    assert sub.requests == []


async def test_a_root_that_does_not_answer_once_told_ends_the_run_with_the_refusal() -> None:
    root = turn_script([FAN_OUT])  # keeps fanning out
    async with RLM(root=root, sub=ScriptedModel(lambda r: "x", name="sub"), max_turns=12) as rlm:
        with pytest.raises(BudgetExceededError) as caught:
            await rlm.run("doc", "q?", budget=Budget(max_calls=6))
    assert caught.value.limit == "max_calls"
    assert caught.value.partial is not None and caught.value.partial.turns == 2
    assert len(root.requests) == 2


async def test_an_answer_without_refusal_is_not_marked() -> None:
    async with RLM(root=turn_script(["FINAL(llm_query('a'))"]), sub=ScriptedModel(["ok"], name="sub")) as rlm:
        result = await rlm.run("doc", "q?", budget=Budget(max_calls=10))
    assert result.answer == "ok" and result.limited is None
