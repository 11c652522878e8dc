"""The run's books: usage added up as calls are recorded matches a recount of the calls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlmflow import RLM, FatalModelError, ModelRequest, ScriptedModel
from rlmflow._run.state import UsageTally
from rlmflow.dispatch.records import CallRecord
from rlmflow.result import summarise_usage

from .helpers import turn_script

calls = st.builds(
    CallRecord,
    model=st.sampled_from(["a", "b", "c"]),
    provider=st.just("p"),
    role=st.sampled_from(["root", "sub"]),
    depth=st.integers(0, 3),
    input_tokens=st.integers(0, 10**9),
    output_tokens=st.integers(0, 10**6),
    cost_usd=st.one_of(st.none(), st.floats(0, 100, allow_nan=False)),
    queue_wait=st.just(0.0),
    duration=st.just(0.0),
    error=st.one_of(st.none(), st.sampled_from(["ThrottledError", "FatalModelError"])),
)


@given(st.lists(calls, max_size=60))
def test_the_tally_is_a_recount_of_the_calls(records: list[CallRecord]) -> None:
    tally = UsageTally()
    for record in records:
        tally.add(record)
    assert tally.summary() == summarise_usage(records)  # same order of float sums: equal, not close


@pytest.mark.anyio
async def test_results_of_a_run_with_children_and_failures_add_up_their_calls() -> None:
    def sub_reply(request: ModelRequest) -> str | BaseException:
        prompt = request.messages[-1].content
        return FatalModelError("no", provider="scripted", model="sub") if prompt.startswith("bad") else "ok"

    cells = [
        "try:\n    llm_query_many(['a', 'bad 1', 'b'])\nexcept BatchError:\n    pass\n"
        "answers = rlm_query_many(['x', 'y'], ['one', 'two'])\n"
        "FINAL(' '.join(answers))"
    ]
    async with RLM(root=turn_script(cells), sub=ScriptedModel(sub_reply, name="sub")) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == "ok ok ok ok"  # each child ran the same cell, its rlm_query_many as plain calls
    assert {c.error for c in result.calls} == {None, "FatalModelError"}
    assert {c.depth for c in result.calls} == {0, 1}
    assert (result.usage, result.cost_usd) == summarise_usage(result.calls)
    assert result.usage["root"].calls == 3
