"""Events a service can rely on: sequence numbers, heartbeats while a call is long, a bounded buffer."""

from __future__ import annotations

import anyio
import pytest

from rlmflow import RLM, ModelRequest, ScriptedModel
from rlmflow.events import AnswerReady, BatchFinished, Heartbeat, RunEvent, SubCallDone

from .helpers import repl, turn_script

pytestmark = pytest.mark.anyio


async def test_events_are_numbered_in_order_across_a_run_and_its_children() -> None:
    root = ScriptedModel(
        lambda r: repl("FINAL('leaf')") if "Question: child" in r.messages[1].content
        else repl("FINAL(rlm_query('child') + llm_query('a'))"),
        name="root",
    )
    async with RLM(root=root, sub=ScriptedModel(lambda r: "x", name="sub"), max_depth=1) as rlm:
        events = [event async for event in rlm.stream("doc", "parent")]
    assert {e.depth for e in events} == {0, 1}
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.kind for e in events} >= {"run_started", "turn_started", "code", "cell_output", "call_done", "answer"}


async def test_a_reader_waiting_on_a_long_call_gets_heartbeats() -> None:
    released = anyio.Event()

    async def slow_sub(request: ModelRequest) -> str:
        await released.wait()  # answers only once the reader has had a heartbeat
        return "done"

    root = turn_script(["FINAL(llm_query('a'))"])
    seen: list[RunEvent] = []
    async with RLM(root=root, sub=ScriptedModel(slow_sub, name="sub")) as rlm:
        with anyio.fail_after(30):
            async with rlm.stream("doc", "q?", heartbeat=0.02) as stream:
                async for event in stream:
                    seen.append(event)
                    if isinstance(event, Heartbeat):
                        released.set()
    beats = [e for e in seen if isinstance(e, Heartbeat)]
    assert beats and isinstance(seen[-1], AnswerReady)
    first = seen.index(beats[0])
    assert beats[0].seq == seen[first - 1].seq  # where the stream is, not a new event
    assert [e.seq for e in seen if not isinstance(e, Heartbeat)] == sorted({e.seq for e in seen})


async def test_a_slow_reader_loses_per_call_events_first_never_the_runs_structure() -> None:
    second_turn = anyio.Event()

    def root(request: ModelRequest) -> str:
        if any(m.role == "assistant" for m in request.messages):
            second_turn.set()
            return repl("FINAL('done')")
        return repl("answers = llm_query_many(['p%d' % i for i in range(50)])\nprint(len(answers))")

    rlm = RLM(root=ScriptedModel(root, name="root"), sub=ScriptedModel(lambda r: "x", name="sub"))
    async with rlm, rlm.stream("doc", "q?", max_buffered=5) as stream:
        await second_turn.wait()  # every event of the fan-out was emitted; none was read
        events = [event async for event in stream]
    assert stream.dropped > 0
    assert sum(isinstance(e, SubCallDone) for e in events) + stream.dropped >= 50
    kinds = [e.kind for e in events]
    for kind in ("run_started", "turn_started", "code", "batch_started", "batch_finished", "cell_output", "answer"):
        assert kind in kinds
    assert isinstance(events[-1], AnswerReady) and any(isinstance(e, BatchFinished) for e in events)
