"""Fork: a new run that keeps a recorded run's first k turns and goes on with another root."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from rlmflow import RLM, ConfigurationError, ModelRequest, ScriptedModel
from rlmflow.durable.journal import Journal

from .helpers import repl, turn_script

pytestmark = pytest.mark.anyio

CELLS = [
    "answers = llm_query_many(['item %d' % i for i in range(6)])\nprint(len(answers))",
    "longest = max(answers, key=len)\nprint(longest)",
    "FINAL('parent: ' + longest)",
]


def sub_model() -> ScriptedModel:
    return ScriptedModel(lambda r: "ANSWER " + r.messages[-1].content * (1 + len(r.messages[-1].content) % 3),
                         name="sub")


async def parent_run(journal: Path) -> str:
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        result = await rlm.run("the document", "which answer is longest?")
    assert result.answer.startswith("parent: ")
    return result.run_id


async def test_a_fork_keeps_the_first_turns_and_goes_on_with_another_root(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    parent = await parent_run(journal)
    seen: list[ModelRequest] = []

    def other_root(request: ModelRequest) -> str:
        seen.append(request)
        return repl("FINAL('fork: ' + longest + ' of ' + str(len(answers)))")

    root, sub = ScriptedModel(other_root, name="other-root"), sub_model()
    async with RLM(root=root, sub=sub, journal=journal, system_prompt="Another system prompt.") as rlm:
        forked = await rlm.fork("the document", parent, turn=2)
    # turns 1 and 2 came from the journal (their sub-calls too, and the sandbox state they built)
    assert len(seen) == 1 and sub.requests == []
    assert forked.answer.startswith("fork: ANSWER item") and forked.answer.endswith(" of 6")
    assert forked.turns == 3 and forked.run_id != parent
    assert forked.replayed_calls == 2 + 6
    assert seen[0].messages[0].content == "Another system prompt."
    assert "longest = max(answers, key=len)" in "\n".join(m.content for m in seen[0].messages)
    with closing(sqlite3.connect(journal)) as connection:
        rows = dict(connection.execute("SELECT run_id, settings FROM runs").fetchall())
        answers = dict(connection.execute("SELECT run_id, answer FROM runs").fetchall())
    reader = Journal(journal)
    record = reader.read_run(forked.run_id)
    reader.close()
    assert record is not None and len(record.calls) == 2 + 6 + 1  # inherited, then its own: resumable alone
    settings = json.loads(rows[forked.run_id])
    assert (settings["forked_from"], settings["forked_at_turn"]) == (parent, 2)
    assert answers[parent].startswith("parent: ") and answers[forked.run_id] == forked.answer  # parent untouched


async def test_a_fork_at_turn_zero_asks_its_root_from_the_start(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    parent = await parent_run(journal)
    root, sub = turn_script(CELLS), sub_model()
    async with RLM(root=root, sub=sub, journal=journal, sub_max_tokens=100) as rlm:
        forked = await rlm.fork("the document", parent, turn=0)
    assert len(root.requests) == 3 and len(sub.requests) == 6  # another sub_max_tokens: other sub-calls
    assert forked.replayed_calls == 0


@pytest.mark.parametrize("turn", [-1, 4, True, 1.5])
async def test_a_turn_the_run_does_not_have_is_refused(tmp_path: Path, turn: object) -> None:
    journal = tmp_path / "journal.sqlite"
    parent = await parent_run(journal)
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        with pytest.raises(ConfigurationError, match="recorded root turns"):
            await rlm.fork("the document", parent, turn=turn)  # type: ignore[arg-type]


async def test_a_fork_needs_the_same_document_and_a_journal(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    parent = await parent_run(journal)
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        with pytest.raises(ConfigurationError, match="another document"):
            await rlm.fork("another document", parent, turn=1)
        with pytest.raises(ConfigurationError, match="holds no run"):
            await rlm.fork("the document", "no-such-run", turn=1)
    async with RLM(root=turn_script(CELLS), sub=sub_model()) as rlm:
        with pytest.raises(ConfigurationError, match="needs RLM"):
            await rlm.fork("the document", parent, turn=1)


async def test_a_fork_cut_short_is_resumed_without_asking_its_inherited_turns_again(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    parent = await parent_run(journal)
    asked = anyio.Event()

    async def hangs(request: ModelRequest) -> str:
        asked.set()
        await anyio.sleep_forever()
        return ""

    async with RLM(root=ScriptedModel(hangs, name="other-root"), sub=sub_model(), journal=journal,
                   system_prompt="Another system prompt.") as rlm, anyio.create_task_group() as tg:
        tg.start_soon(lambda: rlm.fork("the document", parent, turn=2))
        await asked.wait()  # its own first turn is in flight
        tg.cancel_scope.cancel()
    reader = Journal(journal)
    fork_id = reader.latest_unfinished()
    reader.close()
    assert fork_id is not None and fork_id != parent

    seen: list[ModelRequest] = []

    def answers(request: ModelRequest) -> str:
        seen.append(request)
        return repl("FINAL('fork: ' + longest)")

    sub = sub_model()
    async with RLM(root=ScriptedModel(answers, name="other-root"), sub=sub, journal=journal,
                   system_prompt="Another system prompt.") as rlm:
        resumed = await rlm.resume("the document", run_id=fork_id)
    assert resumed.answer.startswith("fork: ANSWER item")
    assert len(seen) == 1 and sub.requests == []  # the two inherited turns came from the fork's record
