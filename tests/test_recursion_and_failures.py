"""rlm_query recursion, the depth limit, and runs that end without an answer."""

from __future__ import annotations

import pytest

from rlmflow import (
    RLM,
    Budget,
    BudgetExceededError,
    ConfigurationError,
    ContextError,
    ModelRequest,
    NoAnswerError,
    RLMResult,
    ScriptedModel,
)

from .helpers import repl

pytestmark = pytest.mark.anyio


def depth_aware_root() -> ScriptedModel:
    """Depth-0 and depth-1 runs delegate to a child; the deepest child answers from its context."""

    def reply(request: ModelRequest) -> str:
        task = request.messages[1].content
        if "Question: level-2" in task:
            return repl("FINAL('leaf:' + context[:8])")
        if "Question: level-1" in task:
            return repl("FINAL('mid>' + rlm_query('level-2', context=context[:20]))")
        return repl("FINAL('top>' + rlm_query('level-1', context='abcdefghijklmnopqrstuvwxyz'))")

    return ScriptedModel(reply, name="root")


async def test_rlm_query_recurses_to_depth_two() -> None:
    sub = ScriptedModel(lambda r: "SUB", name="sub")
    async with RLM(root=depth_aware_root(), sub=sub, max_depth=2) as rlm:
        result = await rlm.run("the top document", "level-0")
    assert result.answer == "top>mid>leaf:abcdefgh"
    assert sub.requests == []
    assert sorted({c.depth for c in result.calls}) == [0, 1, 2]


async def test_rlm_query_degrades_to_llm_query_at_the_limit() -> None:
    sub = ScriptedModel(lambda r: "plain:" + r.messages[-1].content[-7:], name="sub")
    async with RLM(root=depth_aware_root(), sub=sub, max_depth=1) as rlm:
        result = await rlm.run("the top document", "level-0")
    # depth 1 is a real child; its rlm_query at depth 2 became one sub-call with context + prompt
    assert result.answer == "top>mid>plain:level-2"
    assert len(sub.requests) == 1
    assert sub.requests[0].messages[-1].content.startswith("abcdefghijklmnopqrst")


async def test_root_that_never_writes_code_gets_nudged_then_fails_with_partial() -> None:
    root = ScriptedModel(lambda r: "I think the answer is probably 42.", name="root")
    async with RLM(root=root, max_turns=3) as rlm:
        with pytest.raises(NoAnswerError) as caught:
            await rlm.run("doc", "q?")
    partial = caught.value.partial
    assert isinstance(partial, RLMResult) and partial.turns == 3
    assert "no ```repl code block" in root.requests[1].messages[-1].content
    assert "last turn" in root.requests[2].messages[-1].content


async def test_root_looping_on_the_same_error_is_stopped() -> None:
    root = ScriptedModel(lambda r: repl("undefined_name + 1"), name="root")
    async with RLM(root=root, max_turns=10, max_repeated_errors=3) as rlm:
        with pytest.raises(NoAnswerError, match="same error 3 times"):
            await rlm.run("doc", "q?")
    assert len(root.requests) == 3


async def test_budget_refuses_a_batch_up_front_with_an_actionable_message() -> None:
    cells = [
        "try:\n    llm_query_many([f'p{i}' for i in range(10)])\nexcept BudgetExceededError as e:\n    print(e)",
        "FINAL(budget()['calls_left'])",
    ]
    root = ScriptedModel(lambda r: repl(cells[sum(m.role == 'assistant' for m in r.messages)]), name="root")
    sub = ScriptedModel(lambda r: "x", name="sub")
    async with RLM(root=root, sub=sub, budget=Budget(max_calls=6)) as rlm:
        result = await rlm.run("doc", "q?")
    assert sub.requests == []  # nothing of the batch was sent
    feedback = result.transcript[0].feedback
    assert "only 5 of these 10 calls fit" in feedback and "Nothing was sent" in feedback
    assert result.answer == "4"  # 6 calls - 2 root turns


async def test_budget_stops_the_root_and_keeps_the_work() -> None:
    root = ScriptedModel(lambda r: repl("print('working')"), name="root")
    async with RLM(root=root, budget=Budget(max_calls=2), max_turns=5) as rlm:
        with pytest.raises(BudgetExceededError) as caught:
            await rlm.run("doc", "q?")
    assert caught.value.partial.turns == 2


@pytest.mark.parametrize(
    ("context", "error"),
    [("", ContextError), ("   \n", ContextError), ([], ContextError), ({"a": 1}, ContextError), (b"x", ContextError)],
)
async def test_bad_context_is_refused(context: object, error: type[Exception]) -> None:
    async with RLM(root=ScriptedModel(["unused"])) as rlm:
        with pytest.raises(error):
            await rlm.run(context, "q?")  # type: ignore[arg-type]


async def test_empty_query_and_unknown_models_are_refused() -> None:
    async with RLM(root=ScriptedModel(["unused"])) as rlm:
        with pytest.raises(ConfigurationError, match="query is empty"):
            await rlm.run("doc", "  ")
    for spec in ("gpt-4", "local:no-such-model", "nosuch:model", "openai:m@ftp://x"):
        with pytest.raises(ConfigurationError):
            RLM(root=spec)
