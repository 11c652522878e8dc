"""Host CPU of one big ``llm_query_many``, split by where it goes.

    .venv/bin/python benchmarks/hostpath.py [--prompts 5000] [--scripted] [--profile RAW]

One run whose single cell sends ``--prompts`` prompts in one ``llm_query_many`` to an
OpenAI-compatible fake provider in a process of its own (200 ms per request, capacity 1,024).
Prints the host's CPU per sub-call (``time.process_time`` around ``rlm.run``: the worker and
the provider are other processes), the time spent in the garbage collector, and the longest
collection. ``--scripted`` swaps the provider for a :class:`ScriptedModel` that answers at once:
what remains is the sandbox, the bridge, the recording and the Dispatcher, no HTTP.

``--profile RAW`` reads a py-spy raw profile of this script, e.g.

    py-spy record -r 500 -f raw -o raw.txt -- python benchmarks/hostpath.py
    python benchmarks/hostpath.py --profile raw.txt

and attributes each sample to the innermost ``rlmflow`` module on its stack (library code is
charged to the rlmflow module that called it; samples with no rlmflow frame are "other").
"""

from __future__ import annotations

import argparse
import gc
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
from fanout import FakeProvider

from rlmflow import RLM, Dispatcher, OpenAIModel, ScriptedModel
from rlmflow.models.base import LanguageModel
from rlmflow.telemetry.trajectory import Trajectory

# leaves of threads that wait (py-spy samples them as running): the worker-thread pool, waitpid
_IDLE = ("(threading.py:327)", "(asyncio/unix_events.py:1404)", "(selectors.py:468)")
_FRAME = re.compile(r"\((rlmflow/[\w/]+\.py):\d+\)")


class GCClock:
    """Time spent in collections (``gc.callbacks``), and the longest one."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self.count = 0
        self.full = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] == 2 and phase == "start":
            self.full += 1
        if phase == "start":
            self._started = time.perf_counter()
            return
        spent = time.perf_counter() - self._started
        self.total += spent
        self.longest = max(self.longest, spent)
        self.count += 1


async def fan_out(prompts: int, *, scripted: bool, stream: bool = False, trajectory: Path | None = None
                  ) -> dict[str, Any]:
    cell = (
        f"n = {prompts} if 'warm' not in context else 100\n"
        "prompts = [f'chunk {i}: ' + 'lorem ipsum ' * 33 for i in range(n)]\n"
        "answers = llm_query_many(prompts)\n"
        "FINAL(str(sum(a.startswith('answer:') for a in answers)))"
    )
    root = ScriptedModel(lambda r: f"```repl\n{cell}\n```", name="root")
    provider = None if scripted else FakeProvider("--capacity", "1024")
    sub: LanguageModel
    if provider is None:
        sub = ScriptedModel(lambda r: "answer: ok", name="fake-sub")
    else:
        sub = OpenAIModel("fake-sub", base_url=provider.base_url, timeout=120)
    clock = GCClock()
    try:
        async with RLM(root=root, sub=sub, dispatcher=Dispatcher(), sub_max_tokens=64,
                       trajectory=None if trajectory is None else Trajectory(trajectory)) as rlm:
            # a small run first pays the one-time costs (lazy imports, the price lookup, connections)
            await rlm.run("a warm-up document", "fan out")
            gc.callbacks.append(clock)
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            if stream:  # every event read as it comes, as a UI or an SSE endpoint would
                events = rlm.stream("a small document", "fan out")
                async for _ in events:
                    pass
                result = await events.wait()
            else:
                result = await rlm.run("a small document", "fan out")
            cpu = time.process_time() - cpu_started
            wall = time.perf_counter() - wall_started
            gc.callbacks.remove(clock)
    finally:
        if isinstance(sub, OpenAIModel):
            await sub.aclose()
        if provider is not None:
            await provider.stop()
    assert result.answer == str(prompts), result.answer
    return {"prompts": prompts, "cpu_s": cpu, "wall_s": wall, "gc_s": clock.total, "gc_longest_s": clock.longest,
            "gc_collections": clock.count, "gc_full": clock.full}


def attribute(raw: Path) -> None:
    """Print the samples of a py-spy raw profile per innermost rlmflow module."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        modules = _FRAME.findall(stack)
        if stack.endswith(_IDLE):
            continue
        counts[modules[-1] if modules else "other"] += int(number)
    total = sum(counts.values())
    for module, samples in counts.most_common(25):
        print(f"{samples / total:6.1%}  {samples:6d}  {module}")


async def main(args: argparse.Namespace) -> None:
    if args.profile:
        attribute(Path(args.profile))
        return
    trajectory = None
    if args.trajectory:
        trajectory = Path(tempfile.mkdtemp()) / "trajectory.jsonl"
    try:
        report = await fan_out(args.prompts, scripted=args.scripted, stream=args.stream, trajectory=trajectory)
    finally:
        if trajectory is not None:
            shutil.rmtree(trajectory.parent)
    mode = ("scripted sub-model" if args.scripted else "OpenAI-compatible fake") + (", events streamed"
            if args.stream else "") + (", trajectory written" if trajectory else "")
    per_call = report["cpu_s"] / report["prompts"] * 1e6
    print(f"{report['prompts']:,} prompts ({mode}):"
          f" host CPU {per_call:.0f} us per sub-call, wall {report['wall_s']:.2f} s; "
          f"GC {report['gc_s'] * 1000:.0f} ms in {report['gc_collections']} collections "
          f"({report['gc_full']} full), "
          f"longest {report['gc_longest_s'] * 1000:.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=5000)
    parser.add_argument("--scripted", action="store_true", help="a sub-model that answers at once: no HTTP")
    parser.add_argument("--stream", action="store_true", help="read the run's events with rlm.stream")
    parser.add_argument("--trajectory", action="store_true", help="write a trajectory (to a temporary file)")
    parser.add_argument("--profile", default=None, metavar="RAW", help="attribute a py-spy raw profile")
    anyio.run(main, parser.parse_args())
