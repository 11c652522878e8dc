"""The Strands root's own calls are journaled and cached as the code style's are: a resumed or
repeated Strands run pays for no root call it had paid for."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import anyio
import pytest
from strands.types.streaming import StreamEvent

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


class RedactedReasoning(ScriptedToolModel):
    """Claude on Bedrock: a redacted reasoning block (bytes) before each tool call."""

    async def stream(self, messages: Any, *args: Any, **kwargs: Any) -> AsyncGenerator[StreamEvent, None]:
        first = True
        async for event in super().stream(messages, *args, **kwargs):
            if first and "messageStart" in event:
                yield event
                yield {"contentBlockDelta": {"delta": {"reasoningContent": {"redactedContent": b"\x01\x02opaque"}}}}
                yield {"contentBlockStop": {}}
                first = False
                continue
            yield event


async def test_bytes_in_a_strands_stream_survive_live_and_from_the_cache(tmp_path: Path) -> None:
    document, total = make_reports()
    cache = tmp_path / "cache.sqlite"
    for _ in range(2):  # live, then every root reply from the cache
        root = RedactedReasoning()
        async with RLM(root=root, sub=revenue_sub(), cache=cache) as rlm:
            result = await rlm.run(document, "What is the total revenue of all reports?")
        assert result.answer == f"total={total}"
    assert root.calls == 0
