"""A run stopped while everything is in flight: its deadline, or its caller's cancellation, comes
while a fan-out of HTTP sub-calls waits on a slow provider and a child run (``rlm_query``, started
from a thread of the cell) has its own fan-out out. The docs promise that the deadline ends the run
at once and that no sub-call, worker or file outlives it: the provider (a fake OpenAI-compatible
server in this event loop) must see every connection closed and answer none, no sandbox worker
may be left below this process, and the scratch and context files of both runs must be gone.

The overshoot past the deadline is measured in ``benchmarks/deadline.py``; here it is only bounded
generously.
"""

from __future__ import annotations

import hashlib
import itertools
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from rlmflow import RLM, BudgetExceededError, Dispatcher, Limits, ModelRequest, OpenAIModel, ScriptedModel
from rlmflow.sandbox import scratch

from .fakes import FakeOpenAIServer
from .helpers import repl
from .processes import gone, worker_processes

pytestmark = pytest.mark.anyio

PARENT_FAN, CHILD_FAN = 6, 4
DOCUMENT = "The parent's document, only this test's. " * 40
CHILD_DOCUMENT = "The child's own document, only this test's. " * 40
PARENT_CELL = f"""import threading
open('parent-notes.txt', 'w').write('a file of the run')
child = threading.Thread(target=rlm_query, args=('CHILD: fan out as well', {CHILD_DOCUMENT!r}), daemon=True)
child.start()
llm_query_many([f'parent {{i}}' for i in range({PARENT_FAN})])"""
CHILD_CELL = f"""open('child-notes.txt', 'w').write('a file of the child')
llm_query_many([f'child {{i}}' for i in range({CHILD_FAN})])"""


def root_reply(request: ModelRequest) -> str:
    return repl(CHILD_CELL if "CHILD:" in request.messages[1].content else PARENT_CELL)


def context_dir(text: str) -> Path | None:
    """Where the host keeps ``text`` for the sandboxes reading it (None before any context exists)."""
    root = scratch._root
    return None if root is None else root / f"text-{hashlib.sha256(text.encode()).hexdigest()}"


def scratch_dirs() -> set[Path]:
    """This process's scratch directories (each session has one)."""
    prefix = scratch._prefix()
    return {p for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith(prefix) and "contexts" not in p.name}


async def until(condition: Callable[[], bool], within: float) -> None:
    """Wait for ``condition`` at most ``within`` seconds (a safety net; the caller asserts it)."""
    with anyio.move_on_after(within):
        for _ in itertools.count():
            if condition():
                return
            await anyio.sleep(0.01)


@dataclass
class InFlight:
    """What belonged to the run while all of it was in flight."""

    at: float = 0.0  # seconds after the run started
    workers: set[tuple[int, int]] = field(default_factory=set)
    files: set[Path] = field(default_factory=set)
    reached: anyio.Event = field(default_factory=anyio.Event)


async def stop_with_everything_in_flight(
    server: FakeOpenAIServer, stop: Callable[[RLM, InFlight], Awaitable[None]]
) -> None:
    """Run the parent (fan-out + child with its own fan-out), ``stop`` it, and check that nothing
    it held is left (before the sub model's HTTP session is closed, which would close any
    connection the run left open)."""
    sub = OpenAIModel("slow", base_url=server.base_url)
    dispatcher = Dispatcher(limits={"openai": Limits(max_concurrency=32, initial_concurrency=32)})
    held = InFlight()
    before = scratch_dirs()
    try:
        async with RLM(root=ScriptedModel(root_reply, name="root"), sub=sub, dispatcher=dispatcher) as rlm:
            started = time.monotonic()

            async def watch() -> None:
                await until(lambda: server.serving == PARENT_FAN + CHILD_FAN, within=60)
                if server.serving != PARENT_FAN + CHILD_FAN:
                    return
                held.at = time.monotonic() - started
                held.workers = worker_processes()
                held.files = scratch_dirs() - before
                for text in (DOCUMENT, CHILD_DOCUMENT):
                    if (where := context_dir(text)) is not None and where.exists():
                        held.files.add(where)
                held.reached.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await stop(rlm, held)
                tg.cancel_scope.cancel()
            await assert_nothing_outlives(server, held)
    finally:
        await sub.aclose()


async def assert_nothing_outlives(server: FakeOpenAIServer, held: InFlight) -> None:
    assert len(held.files) >= 4, held.files  # two scratch directories and two context files were seen
    # every file of both runs is gone by the time the run has ended: checked before any waiting
    assert [path for path in held.files if path.exists()] == []
    # the provider sees every connection closed (a request it holds for a minute cannot be answered)
    await until(lambda: server.serving == 0, within=5)
    assert server.serving == 0, f"the provider still serves {server.serving} requests 5 s after the run ended"
    assert server.counters.answered == 0
    assert server.counters.cancelled == PARENT_FAN + CHILD_FAN
    assert len(held.workers) >= 2, held.workers  # the parent's worker and the child's (bubblewrap adds its own)
    assert await gone(held.workers) == set()


async def test_a_deadline_ends_a_run_with_sub_calls_and_a_child_in_flight() -> None:
    # the deadline counts from the run's start: it must leave room to start both sandbox workers
    # and get all the sub-calls out first (0.3 s idle, about 2 s under heavy load: 4 s left little margin)
    deadline = 8.0

    async def run_to_its_deadline(rlm: RLM, held: InFlight) -> None:
        started = time.monotonic()
        with pytest.raises(BudgetExceededError) as caught:
            await rlm.run(DOCUMENT, "q?", deadline=deadline)
        overshoot = time.monotonic() - started - deadline
        assert caught.value.limit == "deadline"
        assert held.reached.is_set() and held.at < deadline, "the run was not all in flight before its deadline"
        assert overshoot < 2.0, overshoot  # generous here: benchmarks/deadline.py measures it
        assert caught.value.partial is not None

    async with FakeOpenAIServer(latency=60.0) as server:
        await stop_with_everything_in_flight(server, run_to_its_deadline)


async def test_a_cancelled_run_leaves_no_sub_call_worker_or_file() -> None:
    caught: list[BaseException] = []

    async def cancel_when_all_in_flight(rlm: RLM, held: InFlight) -> None:
        async def run() -> None:
            try:
                await rlm.run(DOCUMENT, "q?")
            except BaseException as exc:
                caught.append(exc)
                raise

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(60):
                await held.reached.wait()
            tg.cancel_scope.cancel()

    async with FakeOpenAIServer(latency=60.0) as server:
        await stop_with_everything_in_flight(server, cancel_when_all_in_flight)
    assert len(caught) == 1 and isinstance(caught[0], anyio.get_cancelled_exc_class())
