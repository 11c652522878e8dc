"""Identical prompts asked at the same time (threads of sandbox code) are sent once."""

from __future__ import annotations

import anyio
import pytest

from rlmflow import RLM, FatalModelError, ModelRequest, ScriptedModel
from rlmflow.events import BatchStarted, RunEvent

from .helpers import turn_script

pytestmark = pytest.mark.anyio

THREADS = """
import threading
out = []
def ask(prompt):
    try:
        out.append(llm_query(prompt))
    except Exception as e:
        out.append(type(e).__name__)
threads = [threading.Thread(target=ask, args=(p,)) for p in {prompts!r}]
for t in threads:
    t.start()
for t in threads:
    t.join()
FINAL(",".join(sorted(out)))
"""


class Gate:
    """Holds every sub-call until ``expected`` batches have reached the host (all threads asked)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.batches = 0
        self.open = anyio.Event()

    def events(self, event: RunEvent) -> None:
        if isinstance(event, BatchStarted):
            self.batches += 1
            if self.batches >= self.expected:
                self.open.set()


async def test_four_threads_asking_the_same_prompt_send_one_request() -> None:
    gate = Gate(4)

    async def answer(request: ModelRequest) -> str:
        await gate.open.wait()
        return "ANSWER"

    sub = ScriptedModel(answer, name="sub")
    root = turn_script([THREADS.format(prompts=["same"] * 4)])
    async with RLM(root=root, sub=sub) as rlm:
        with anyio.fail_after(30):
            result = await rlm.run("doc", "q?", events=gate.events)
    assert result.answer == ",".join(["ANSWER"] * 4)
    assert [r.messages[-1].content for r in sub.requests] == ["same"]


async def test_a_joined_prompt_that_failed_fails_for_every_asker_and_is_retried_later() -> None:
    gate = Gate(3)
    failures = {"bad": 1}

    async def answer(request: ModelRequest) -> str | BaseException:
        await gate.open.wait()
        prompt = request.messages[-1].content
        if failures.get(prompt):
            failures[prompt] -= 1
            return FatalModelError("no", provider="scripted", model="sub")
        return prompt.upper()

    sub = ScriptedModel(answer, name="sub")
    code = THREADS.format(prompts=["bad", "bad", "ok"])
    cells = [code.replace('FINAL(",".join(sorted(out)))', 'FINAL(",".join(sorted(out)) + "|" + llm_query("bad"))')]
    async with RLM(root=turn_script(cells), sub=sub) as rlm:
        with anyio.fail_after(30):
            result = await rlm.run("doc", "q?", events=gate.events)
    assert result.answer == "BatchError,BatchError,OK|BAD"  # the failure is not kept: asked again, answered
    assert sorted(r.messages[-1].content for r in sub.requests) == ["bad", "bad", "ok"]


async def test_without_dedup_concurrent_prompts_are_each_sent() -> None:
    gate = Gate(3)

    async def answer(request: ModelRequest) -> str:
        await gate.open.wait()
        return "A"

    sub = ScriptedModel(answer, name="sub")
    async with RLM(root=turn_script([THREADS.format(prompts=["same"] * 3)]), sub=sub, dedup=False) as rlm:
        with anyio.fail_after(30):
            await rlm.run("doc", "q?", events=gate.events)
    assert len(sub.requests) == 3
