"""Runs that survive: a journal for every run, resume without paying twice, replay, divergence."""

from __future__ import annotations

import sqlite3
import stat
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlmflow import RLM, ConfigurationError, ModelRequest, NotInJournalError, ScriptedModel
from rlmflow.durable.journal import Journal

from .helpers import turn_script

pytestmark = pytest.mark.anyio

PROMPTS = 30
FAN_OUT = (
    f"answers = llm_query_many(['item %d' % i for i in range({PROMPTS})])\n"
    "print(sum(len(a) for a in answers))"
)
CELLS = [FAN_OUT, "FINAL('total ' + str(sum(len(a) for a in answers)))"]


def sub_model(hang_from: int | None = None, started: anyio.Event | None = None) -> ScriptedModel:
    """A sub-model answering ``ANSWER <prompt>``; from its ``hang_from``-th request on it never answers."""
    count = 0

    async def reply(request: ModelRequest) -> str:
        nonlocal count
        count += 1
        if hang_from is not None and count >= hang_from:
            if started is not None:
                started.set()
            await anyio.sleep_forever()
        return "ANSWER " + request.messages[-1].content

    return ScriptedModel(reply, name="sub")


async def interrupted_run(journal: Path, hang_from: int) -> tuple[ScriptedModel, ScriptedModel]:
    """A journaled run cancelled while its fan-out waits on the ``hang_from``-th sub-call."""
    hanging = anyio.Event()
    root, sub = turn_script(CELLS), sub_model(hang_from, hanging)
    async with RLM(root=root, sub=sub, journal=journal) as rlm, anyio.create_task_group() as tg:
        tg.start_soon(rlm.run, "the document", "how long are the answers?")
        await hanging.wait()
        tg.cancel_scope.cancel()
    return root, sub


async def test_a_resumed_run_pays_each_prompt_once_and_answers_as_the_whole_run(tmp_path: Path) -> None:
    async with RLM(root=turn_script(CELLS), sub=sub_model()) as rlm:
        whole = await rlm.run("the document", "how long are the answers?")

    journal = tmp_path / "journal.sqlite"
    _, first_sub = await interrupted_run(journal, hang_from=12)
    answered_before = [r.messages[-1].content for r in first_sub.requests][:11]

    root, sub = turn_script(CELLS), sub_model()
    async with RLM(root=root, sub=sub, journal=journal) as rlm:
        resumed = await rlm.resume("the document")
    sent_again = [r.messages[-1].content for r in sub.requests]
    assert resumed.answer == whole.answer
    assert not set(answered_before) & set(sent_again)  # nothing answered before the crash is paid twice
    assert len(sent_again) == PROMPTS - len(answered_before)
    assert len(root.requests) == 1  # turn 1 came from the journal, turn 2 went live
    assert resumed.replayed_calls == 1 + len(answered_before)
    assert sum(c.from_journal for c in resumed.calls) == resumed.replayed_calls
    assert resumed.diverged_at is None
    assert resumed.usage["sub"].calls == PROMPTS  # the run's own account: every prompt, once


async def test_a_journal_is_the_hosts_alone_and_resume_refuses_another_document(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    await interrupted_run(journal, hang_from=3)
    assert stat.S_IMODE(journal.stat().st_mode) == 0o600
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        with pytest.raises(ConfigurationError, match="another document"):
            await rlm.resume("a different document")
        with pytest.raises(ConfigurationError, match="no run 'nope'"):
            await rlm.resume("the document", run_id="nope")


async def test_a_journal_of_another_version_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    await interrupted_run(journal, hang_from=3)
    with closing(sqlite3.connect(journal)) as connection, connection:
        connection.execute("UPDATE runs SET version = '0.0.1'")
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        with pytest.raises(ConfigurationError, match=r"recorded by rlmflow 0\.0\.1"):
            await rlm.resume("the document")


async def test_a_file_that_is_no_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "not.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigurationError, match="cannot be used as a journal"):
        Journal(path)


async def test_a_replay_answers_everything_from_the_journal_and_names_what_it_lacks(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        recorded = await rlm.run("the document", "how long are the answers?")
    silent = ScriptedModel([], name="root"), ScriptedModel([], name="sub")  # any request would fail
    async with RLM(root=silent[0], sub=silent[1], replay=journal) as rlm:
        replayed = await rlm.run("the document", "how long are the answers?")
        with pytest.raises(NotInJournalError, match="journal holds no answer"):
            await rlm.run("the document", "another question")
    assert replayed.answer == recorded.answer and replayed.replayed_calls == len(recorded.calls)
    assert silent[0].requests == [] and silent[1].requests == []


async def test_code_that_prints_otherwise_when_run_again_is_reported_and_goes_on_live(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite"
    cells = ["import uuid\nprint(uuid.uuid4())", "print(llm_query('x'))", "FINAL('done')"]
    hanging = anyio.Event()
    async with RLM(root=turn_script(cells), sub=sub_model(1, hanging), journal=journal) as rlm, \
            anyio.create_task_group() as tg:
        tg.start_soon(rlm.run, "the document", "q?")
        await hanging.wait()
        tg.cancel_scope.cancel()
    root = turn_script(cells)
    async with RLM(root=root, sub=sub_model(), journal=journal) as rlm:
        resumed = await rlm.resume("the document")
    assert resumed.answer == "done" and resumed.diverged_at == 1
    assert len(root.requests) == 2  # turn 1 from the journal; its output differed, so turns 2 and 3 live


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hang_from=st.integers(1, PROMPTS))
def test_wherever_the_fan_out_is_cut_a_resume_pays_only_what_was_not_answered(tmp_path: Path, hang_from: int) -> None:
    async def scenario() -> None:
        journal = tmp_path / f"journal-{hang_from}.sqlite"
        _, first_sub = await interrupted_run(journal, hang_from=hang_from)
        answered = {r.messages[-1].content for r in first_sub.requests[: hang_from - 1]}
        sub = sub_model()
        async with RLM(root=turn_script(CELLS), sub=sub, journal=journal) as rlm:
            resumed = await rlm.resume("the document")
        again = [r.messages[-1].content for r in sub.requests]
        assert resumed.answer.startswith("total ")
        assert not answered & set(again) and len(again) == PROMPTS - len(answered)

    anyio.run(scenario)
