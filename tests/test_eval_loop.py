"""Loop behaviour for small roots: a repeated cell, a forced plain answer, what a cell established."""

from __future__ import annotations

import pytest

from rlmflow import RLM, ModelRequest, NoAnswerError, ScriptedModel

from .helpers import repl

pytestmark = pytest.mark.anyio

DOC = ("Nothing happened today.\n" * 3000) + "The strongbox key was left with Thomas Vincent.\n" + (
    "Nothing happened today.\n" * 3000
)


def scripted(replies: list[str]) -> ScriptedModel:
    """A root that plays ``replies`` in order, repeating the last one."""

    def reply(request: ModelRequest) -> str:
        index = len(model.requests) - 1
        return replies[min(index, len(replies) - 1)]

    model = ScriptedModel(reply, name="root")
    return model


async def test_a_repeated_cell_restarts_from_its_evidence_and_a_plain_answer_is_taken() -> None:
    root = scripted([repl("print(grep('strongbox', window=40))")] * 2 + ["It was left with Thomas Vincent."])
    async with RLM(root=root, max_turns=8) as rlm:
        result = await rlm.run(DOC, "Who has the strongbox key?")
    assert result.answer == "It was left with Thomas Vincent."
    assert result.turns == 3  # not 8: the loop noticed the repeat
    third = root.requests[2].messages
    assert [m.role for m in third] == ["system", "user", "user"]  # the repeated turns are gone
    assert "same result" in third[-1].content and "Thomas Vincent" in third[-1].content  # with the evidence


async def test_a_cell_that_keeps_repeating_stops_the_run() -> None:
    """A root that only repeats its cell is stopped at the third repeat and asked once, without
    code, to answer from what the cell printed; code again is no answer."""
    root = scripted([repl("print(len(context))")])
    async with RLM(root=root, max_turns=10) as rlm:
        with pytest.raises(NoAnswerError, match="same result") as caught:
            await rlm.run(DOC, "How long is it?")
    assert caught.value.partial.turns == 3 and len(root.requests) == 4
    assert str(len(DOC)) in root.requests[3].messages[-1].content  # the forced answer saw the output


async def test_a_stuck_root_answers_from_its_last_output() -> None:
    answered = iter([repl("print(len(context))")] * 3 + [f"It is {len(DOC)} characters long."])
    root = ScriptedModel(lambda request: next(answered), name="root")
    async with RLM(root=root, max_turns=10) as rlm:
        result = await rlm.run(DOC, "How long is it?")
    assert result.answer == f"It is {len(DOC)} characters long." and result.turns == 3
    assert len(result.calls) == 4  # three turns and the forced answer


async def test_plain_replies_count_only_on_a_forced_turn() -> None:
    root = scripted(["I think it is Thomas.", repl("x = 1\nprint(x)"), "Thomas Vincent"])
    async with RLM(root=root, max_turns=3) as rlm:
        result = await rlm.run(DOC, "Who has the strongbox key?")
    assert result.answer == "Thomas Vincent" and result.turns == 3  # turn 1's words were not taken
    assert "no ```repl code block" in root.requests[1].messages[-1].content


async def test_the_root_sees_what_its_last_cell_established() -> None:
    root = scripted([
        repl("import re\nhits = [m.start() for m in re.finditer('strongbox', context)]"),
        repl("FINAL(str(len(hits)))"),
    ])
    async with RLM(root=root, max_turns=4) as rlm:
        result = await rlm.run(DOC, "How many mentions?")
    assert result.answer == "1"
    told = root.requests[1].messages[-1].content
    assert f"hits = [{DOC.find('strongbox')}] (list, 1 items)" in told


async def test_distinct_cells_keep_the_whole_history() -> None:
    cells = [repl(f"step{i} = {i}\nprint(step{i})") for i in range(3)] + [repl("FINAL('done')")]
    root = scripted(cells)
    async with RLM(root=root, max_turns=6) as rlm:
        result = await rlm.run(DOC, "Count")
    assert result.answer == "done" and result.turns == 4
    roles = [m.role for m in root.requests[3].messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]


async def test_a_repeated_fan_out_is_not_cut_short() -> None:
    cells = [repl("answers = llm_query_many(['a', 'b'])\nprint(answers)")] * 3 + [repl("FINAL('fanned')")]
    root = scripted(cells)
    sub = ScriptedModel(lambda r: "same", name="sub")
    async with RLM(root=root, sub=sub, max_turns=6) as rlm:
        result = await rlm.run(DOC, "Fan out")
    assert result.answer == "fanned" and result.turns == 4 and len(sub.requests) == 2  # dedup: one per prompt


async def test_final_spelled_as_small_models_spell_it() -> None:
    root = scripted([repl("Final('Thomas Vincent')")])
    async with RLM(root=root, max_turns=2) as rlm:
        result = await rlm.run(DOC, "Who has the key?")
    assert result.answer == "Thomas Vincent" and result.turns == 1
