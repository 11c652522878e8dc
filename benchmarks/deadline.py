"""How late a run's deadline stops it: the overshoot past ``deadline=`` in each place a run can be.

A run is stopped (1) while its cell sleeps, (2) while its cell spins in pure Python, (3) while a
sub-call is in flight on a slow provider (a fake OpenAI-compatible server on 127.0.0.1), (4)
while child runs (``rlm_query_many``) are mid-cell, and (5) while a fan-out of 6 sub-calls is in
flight and a child run, started from a thread of the cell, has its own fan-out of 4 out. The
target is 100 ms; each case prints its overshoot as a ratio to that bound and the worst of
``--repeat`` tries, and writes ``benchmarks/results/deadline.json``. Afterwards no worker process
may be left, and the provider must have answered no request (each is held 30 s) and hold none:
every connection was closed when the deadline passed. ``tests/test_stopped_runs.py`` checks the
same with a generous bound.

    python benchmarks/deadline.py [--deadline 1.0] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import anyio
from _common import write_result

from rlmflow import RLM, BudgetExceededError, Dispatcher, Limits, ModelRequest, OpenAIModel, ScriptedModel
from tests.fakes import FakeOpenAIServer

BOUND = 0.100

CASES = {
    "cell sleeping": "import time\ntime.sleep(60)",
    "cell spinning": "while True:\n    pass",
    "sub-call in flight": "x = llm_query('take your time')",
    "children mid-cell": "rlm_query_many(['child one', 'child two'])",
    "fan-out and a child fanning out": (
        "import threading\n"
        "threading.Thread(target=rlm_query, args=('FANNING: ask too',), daemon=True).start()\n"
        "llm_query_many([f'parent {i}' for i in range(6)])"
    ),
}
FANNING_CHILD = "llm_query_many([f'child {i}' for i in range(4)])"


def repl(code: str) -> str:
    return f"```repl\n{code}\n```"


def workers_left() -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and b"worker.py" in cmdline and fields[0] != "Z":
                count += 1
    return count


async def overshoot(code: str, deadline: float, sub: OpenAIModel) -> float:
    def root_reply(request: ModelRequest) -> str:
        if "FANNING:" in request.messages[1].content:  # this child fans out in its cell
            return repl(FANNING_CHILD)
        if "child" in request.messages[1].content:  # children sleep in their own cell
            return repl("import time\ntime.sleep(60)")
        return repl(code)

    dispatcher = Dispatcher(limits={"openai": Limits(max_concurrency=32, initial_concurrency=32)})
    rlm = RLM(root=ScriptedModel(root_reply, name="root"), sub=sub, dispatcher=dispatcher)
    started = time.monotonic()
    try:
        await rlm.run("a small document", "q?", deadline=deadline)
    except BudgetExceededError:
        pass
    return time.monotonic() - started - deadline


async def main(deadline: float, repeat: int) -> None:
    results: dict[str, float] = {}
    async with FakeOpenAIServer(latency=30.0) as server:
        sub = OpenAIModel("slow", base_url=server.base_url)
        for name, code in CASES.items():
            worst = max([await overshoot(code, deadline, sub) for _ in range(repeat)])
            results[name] = worst
            print(f"{name:32s} overshoot {worst * 1000:6.1f} ms  ratio to the 100 ms bound {worst / BOUND:.2f}")
        with anyio.move_on_after(5):  # the provider learns of closed connections in a few loop turns
            while server.serving:  # noqa: ASYNC110 - the fake counts, it has no event to wait on
                await anyio.sleep(0.01)
        held, answered, cancelled = server.serving, server.counters.answered, server.counters.cancelled
        await sub.aclose()
    await anyio.sleep(0.2)
    left = workers_left()
    print(f"worker processes left: {left}; provider: {answered} requests answered, {cancelled} cancelled, "
          f"{held} still held")
    write_result("deadline", {"deadline_s": deadline, "bound_s": BOUND, "overshoot_s": results,
                              "ratio_to_bound": {k: v / BOUND for k, v in results.items()}, "workers_left": left,
                              "provider": {"answered": answered, "cancelled": cancelled, "held": held}})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadline", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.deadline, args.repeat)
