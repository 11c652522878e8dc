"""The Strands root's own calls are journaled and cached as the code style's are: a resumed or
repeated Strands run pays for no root call it had paid for."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from rlmflow import RLM, ModelRequest, ScriptedModel

from .test_strands import ScriptedToolModel, make_reports, revenue_sub

pytestmark = pytest.mark.anyio


def held_sub(release_after: int, reached: anyio.Event) -> ScriptedModel:
    """The revenue sub-model, whose calls past ``release_after`` never answer."""
    answered = revenue_sub()
    count = 0

    async def reply(request: ModelRequest) -> str:
        nonlocal count
        count += 1
        if count > release_after:
            reached.set()
            await anyio.sleep_forever()
        return (await answered.request(request)).text

    return ScriptedModel(reply, name="analyst")


async def test_a_cut_strands_run_resumes_without_asking_its_root_again(tmp_path: Path) -> None:
    document, total = make_reports()
    journal = tmp_path / "journal.sqlite"
    first_root, reached = ScriptedToolModel(), anyio.Event()
    async with RLM(root=first_root, sub=held_sub(10, reached), journal=journal) as rlm, \
            anyio.create_task_group() as tg:
        tg.start_soon(rlm.run, document, "What is the total revenue of all reports?")
        await reached.wait()  # turn 2's fan-out is half answered
        tg.cancel_scope.cancel()
    assert first_root.calls == 2

    root, sub = ScriptedToolModel(), revenue_sub()
    async with RLM(root=root, sub=sub, journal=journal) as rlm:
        resumed = await rlm.resume(document)
    assert resumed.answer == f"total={total}"
    assert root.calls == 1  # turns 1 and 2 came from the journal, tool calls included; turn 3 went live
    assert len(sub.requests) == 24 - 10  # the fan-out's answered half was not paid again
    assert resumed.replayed_calls == 2 + 10


async def test_an_identical_strands_run_on_the_cache_sends_nothing(tmp_path: Path) -> None:
    document, total = make_reports()
    cache = tmp_path / "cache.sqlite"
    async with RLM(root=ScriptedToolModel(), sub=revenue_sub(), cache=cache) as rlm:
        await rlm.run(document, "What is the total revenue of all reports?")
    root, sub = ScriptedToolModel(), revenue_sub()
    async with RLM(root=root, sub=sub, cache=cache) as rlm:
        again = await rlm.run(document, "What is the total revenue of all reports?")
    assert again.answer == f"total={total}" and root.calls == 0 and sub.requests == []
    assert again.usage["scripted-strands"].cached_calls == 3
