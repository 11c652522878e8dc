"""A run cut at any model call (root turn, sub-call, a child run's own calls) and resumed: the
same answer as the whole run, and nothing that had been answered is paid for again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlmflow import RLM, ModelRequest, ScriptedModel

from .helpers import repl

ROOT_CELLS = [
    "answers = llm_query_many(['item %d' % i for i in range(6)])\nprint(len(answers))",
    "child = rlm_query('child question', context='the child document')\nprint(child)",
    "FINAL('total ' + str(sum(len(a) for a in answers)) + ' / ' + child)",
]
CHILD_CELL = "parts = llm_query_many(['part %d of ' % i + context for i in range(3)])\nFINAL('|'.join(parts))"
CALLS = 3 + 6 + 1 + 3  # root turns, the fan-out, the child's root turn, the child's fan-out


class Models:
    """A root and a sub-model that count every call they answer; the ``cut``-th call (over both,
    in the order they start) never answers, and says so."""

    def __init__(self, cut: int | None = None) -> None:
        self.cut, self.started, self.reached = cut, 0, anyio.Event()
        self.answered: Counter[tuple[str, str]] = Counter()
        self.root = ScriptedModel(self._root, name="root")
        self.sub = ScriptedModel(self._sub, name="sub")

    async def _gate(self) -> None:
        self.started += 1
        if self.started == self.cut:
            self.reached.set()
            await anyio.sleep_forever()

    async def _root(self, request: ModelRequest) -> str:
        await self._gate()
        query = request.messages[1].content if len(request.messages) > 1 else ""
        turn = sum(1 for m in request.messages if m.role == "assistant")
        reply = repl(CHILD_CELL) if "child question" in query else repl(ROOT_CELLS[min(turn, 2)])
        self.answered["root", "\n".join(m.content for m in request.messages)] += 1
        return reply

    async def _sub(self, request: ModelRequest) -> str:
        await self._gate()
        prompt = request.messages[-1].content
        self.answered["sub", prompt] += 1
        return "ANSWER " + prompt


async def whole_run() -> tuple[str, Counter[tuple[str, str]]]:
    models = Models()
    async with RLM(root=models.root, sub=models.sub) as rlm:
        result = await rlm.run("the document", "how long are the answers?")
    return result.answer, models.answered


@settings(max_examples=CALLS, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(1, CALLS))
def test_wherever_a_run_is_cut_its_resume_answers_the_same_and_pays_nothing_twice(tmp_path: Path, cut: int) -> None:
    async def scenario() -> None:
        expected, every_call = await whole_run()
        assert sum(every_call.values()) == CALLS
        journal = tmp_path / f"journal-{cut}.sqlite"
        first = Models(cut)
        async with RLM(root=first.root, sub=first.sub, journal=journal) as rlm, anyio.create_task_group() as tg:
            tg.start_soon(rlm.run, "the document", "how long are the answers?")
            await first.reached.wait()
            tg.cancel_scope.cancel()
        second = Models()
        async with RLM(root=second.root, sub=second.sub, journal=journal) as rlm:
            resumed = await rlm.resume("the document")
        assert resumed.answer == expected
        assert not set(first.answered) & set(second.answered)  # answered once, never paid again
        assert set(first.answered) | set(second.answered) == set(every_call)
        assert resumed.replayed_calls == sum(first.answered.values())

    anyio.run(scenario)
