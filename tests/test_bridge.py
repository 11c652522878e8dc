"""The host side of llm_query_many: answers in order, per item, with and without dedup."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import pytest

from rlmflow import RLM, FatalModelError, ModelRequest, ScriptedModel
from rlmflow.events import RunEvent, SubCallDone
from rlmflow.telemetry.trajectory import Trajectory

from .helpers import turn_script

pytestmark = pytest.mark.anyio


async def test_without_dedup_each_repeated_prompt_gets_its_own_answer() -> None:
    counter = itertools.count(1)
    sub = ScriptedModel(lambda r: f"{r.messages[-1].content}{next(counter)}", name="sub")
    cells = ["FINAL(repr(llm_query_many(['x', 'y', 'x', 'x'])))"]
    async with RLM(root=turn_script(cells), sub=sub, dedup=False) as rlm:
        result = await rlm.run("doc", "q?")
    answers = ast.literal_eval(result.answer)
    assert [a[0] for a in answers] == ["x", "y", "x", "x"]  # in input order
    assert len({answers[0], answers[2], answers[3]}) == 3  # each repeat has its own call's answer
    assert len(sub.requests) == 4


async def test_without_dedup_repeated_prompts_are_not_collapsed() -> None:
    counter = itertools.count(1)
    sub = ScriptedModel(lambda r: str(next(counter)), name="sub")
    cells = ["FINAL(','.join(llm_query_many(['same'] * 3)))"]
    async with RLM(root=turn_script(cells), sub=sub, dedup=False) as rlm:
        result = await rlm.run("doc", "q?")
    assert sorted(result.answer.split(",")) == ["1", "2", "3"]  # each item its own call and answer


async def test_dedup_keeps_answers_across_batches_and_retries_failures() -> None:
    failing = {"bad": 1}  # "bad" fails once, then succeeds

    def reply(request: ModelRequest) -> str | BaseException:
        prompt = request.messages[-1].content
        if failing.get(prompt):
            failing[prompt] -= 1
            return FatalModelError("no", provider="scripted", model="sub")
        return prompt.upper()

    sub = ScriptedModel(reply, name="sub")
    cells = [
        "try:\n    llm_query_many(['a', 'bad', 'a', 'bad'])\n"
        "except BatchError as e:\n    first = (e.results, e.failed_indices)\n"
        "second = llm_query_many(['bad', 'a', 'b'])\n"
        "FINAL(repr((first, second)))"
    ]
    async with RLM(root=turn_script(cells), sub=sub) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == repr(((["A", None, "A", None], [1, 3]), ["BAD", "A", "B"]))
    # 'a' was sent once for both batches; 'bad' once per batch (a failure is not kept)
    assert [r.messages[-1].content for r in sub.requests] == ["a", "bad", "bad", "b"]


async def test_dedup_is_per_max_tokens() -> None:
    sub = ScriptedModel(lambda r: f"{r.messages[-1].content}/{r.max_tokens}", name="sub")
    cells = ["FINAL(repr(llm_query_many(['p']) + llm_query_many(['p'], max_tokens=7) + llm_query_many(['p'])))"]
    async with RLM(root=turn_script(cells), sub=sub, sub_max_tokens=50) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == repr(["p/50", "p/7", "p/50"])
    assert [r.max_tokens for r in sub.requests] == [50, 7]


async def test_sub_call_events_and_trajectory_records_carry_every_call_field(tmp_path: Path) -> None:
    events: list[RunEvent] = []
    path = tmp_path / "t.jsonl"
    sub = ScriptedModel(lambda r: "ok", name="sub")
    cells = ["FINAL(str(len(llm_query_many(['a', 'b']))))"]
    async with RLM(root=turn_script(cells), sub=sub, trajectory=Trajectory(path)) as rlm:
        result = await rlm.run("doc", "q?", events=events.append)
    assert result.answer == "2"
    done = [e for e in events if isinstance(e, SubCallDone)]
    assert sorted(e.role for e in done) == ["root", "sub", "sub"]
    calls = [json.loads(line) for line in path.read_text().splitlines() if '"type": "call"' in line]
    assert len(calls) == 3
    expected = {"run_id", "model", "provider", "role", "depth", "input_tokens", "output_tokens", "cost_usd",
                "queue_wait", "duration", "attempts", "throttles", "error", "started_at"}
    assert all(expected <= set(call) for call in calls)
    assert {(c["model"], c["role"], c["error"]) for c in calls} == {("root", "root", None), ("sub", "sub", None)}
