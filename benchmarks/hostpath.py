"""Host CPU of one big ``llm_query_many``, and where it goes.

    .venv/bin/python benchmarks/hostpath.py [--prompts 10000] [--repeat 3] [--scripted] [--stream] [--trajectory]

One run whose single cell sends ``--prompts`` prompts in one ``llm_query_many`` to the
OpenAI-compatible fake provider, in a process of its own (200 ms per request, capacity 1,024).
A small run first pays the one-time costs (lazy imports, the first price lookup, the first
connections); then each measured run reports the host's CPU per sub-call
(``time.process_time`` around ``rlm.run``: the sandbox worker and the provider are other
processes), the time spent in the garbage collector (``gc.callbacks``), the part of the CPU
outside it (steadier from run to run: a full collection comes or not), and the longest pause.
The median of ``--repeat`` runs is printed and written to benchmarks/results/hostpath.json.

- ``--scripted``: a :class:`ScriptedModel` sub-model that answers at once: no HTTP, so what
  remains is the sandbox, the bridge, the recording and the Dispatcher;
- ``--stream``: the run's events read with ``rlm.stream``, as a UI would;
- ``--trajectory``: a trajectory written (to a temporary file);
- ``--children K``: the cell calls ``rlm_query_many`` with K children instead, each sending its
  share of the prompts in one ``llm_query_many`` (each child has a sandbox of its own).

``--profile RAW`` instead reads a py-spy profile of this script, recorded with ``--native`` so
that collections show up as ``gc_collect_main``, e.g.

    py-spy record --native -r 300 -f raw -o raw.txt -- python benchmarks/hostpath.py --repeat 1
    python benchmarks/hostpath.py --profile raw.txt

and charges each sample to the garbage collector, to the innermost ``rlmflow`` module on its
stack (library code is charged to the rlmflow module that called it), or to "no rlmflow frame"
(the event loop and aiohttp's protocol callbacks). Samples of waiting threads and of imports
are left out.
"""

from __future__ import annotations

import argparse
import gc
import re
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
from _common import write_result
from fanout import FakeProvider

from rlmflow import RLM, Dispatcher, OpenAIModel, ScriptedModel
from rlmflow.models.base import LanguageModel, ModelRequest
from rlmflow.telemetry.trajectory import Trajectory

# py-spy samples threads that wait as running: the worker-thread pool, waitpid, the selector
_IDLE = ("(threading.py:327)", "(asyncio/unix_events.py:1404)", "(selectors.py:468)")
_MODULE = re.compile(r"\((rlmflow/[\w/]+\.py):\d+\)")


class GCClock:
    """Time spent in collections (``gc.callbacks``), how many were full, and the longest one."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self.count = 0
        self.full = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            self.full += info["generation"] == 2
            return
        spent = time.perf_counter() - self._started
        self.total += spent
        self.longest = max(self.longest, spent)
        self.count += 1


async def fan_out(prompts: int, *, scripted: bool, stream: bool, trajectory: Path | None,
                  children: int = 0) -> dict[str, Any]:
    """One warm-up run of 100 prompts, then the measured run of ``prompts`` (split over
    ``children`` child runs of ``rlm_query_many`` when given)."""
    each = prompts // children if children else prompts
    prompts = each * max(children, 1)
    cell = (
        f"n = 100 if 'warm' in context else {each}\n"
        "prompts = [f'chunk {i}: ' + 'lorem ipsum ' * 33 for i in range(n)]\n"
        "answers = llm_query_many(prompts)\n"
        "FINAL(str(sum(a.startswith('answer:') for a in answers)))"
    )
    parent = (
        f"counts = rlm_query_many([f'part {{i}}' for i in range({children})])\n"
        "FINAL(str(sum(int(count) for count in counts)))"
    )
    query = "fan out to children" if children else "fan out"

    def reply(request: ModelRequest) -> str:
        opening = request.messages[1].content  # the context's description and the run's question
        return f"```repl\n{parent if 'to children' in opening else cell}\n```"

    root = ScriptedModel(reply, name="root")
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
            await rlm.run("a warm-up document", "fan out")
            gc.callbacks.append(clock)
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            try:
                if stream:  # every event read as it comes, as a UI or an SSE endpoint would
                    events = rlm.stream("a small document", query)
                    async for _ in events:
                        pass
                    result = await events.wait()
                else:
                    result = await rlm.run("a small document", query)
            finally:
                cpu = time.process_time() - cpu_started
                wall = time.perf_counter() - wall_started
                gc.callbacks.remove(clock)
    finally:
        if isinstance(sub, OpenAIModel):
            await sub.aclose()
        if provider is not None:
            await provider.stop()
    if result.answer != str(prompts):
        raise RuntimeError(f"{result.answer} of {prompts} prompts were answered")
    return {"cpu_us": cpu / prompts * 1e6, "outside_gc_us": (cpu - clock.total) / prompts * 1e6,
            "wall_s": wall, "gc_ms": clock.total * 1000, "gc_full": clock.full, "gc_longest_ms": clock.longest * 1000}


def attribute(raw: Path) -> None:
    """Print the samples of a py-spy raw profile per owner: GC, an rlmflow module, or none."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        python_frames = [frame for frame in stack.split(";") if ".py:" in frame]
        if not python_frames or python_frames[-1].endswith(_IDLE) or "_find_and_load" in stack:
            continue
        if "gc_collect_main" in stack:
            counts["garbage collector"] += int(number)
            continue
        modules = _MODULE.findall(stack)
        counts[modules[-1] if modules else "no rlmflow frame (event loop, aiohttp callbacks)"] += int(number)
    total = sum(counts.values())
    for owner, samples in counts.most_common(25):
        print(f"{samples / total:6.1%}  {samples:6d}  {owner}")


async def main(args: argparse.Namespace) -> None:
    if args.profile:
        attribute(Path(args.profile))
        return
    reports = []
    for _ in range(args.repeat):
        trajectory = Path(tempfile.mkdtemp()) / "trajectory.jsonl" if args.trajectory else None
        try:
            reports.append(await fan_out(args.prompts, scripted=args.scripted, stream=args.stream,
                                         trajectory=trajectory, children=args.children))
        finally:
            if trajectory is not None:
                shutil.rmtree(trajectory.parent)
    median = {key: statistics.median(report[key] for report in reports) for key in reports[0]}
    mode = ", ".join(filter(None, ["scripted sub-model" if args.scripted else "OpenAI-compatible fake",
                                   "events streamed" if args.stream else "",
                                   "trajectory written" if args.trajectory else "",
                                   f"over {args.children} child runs" if args.children else ""]))
    print(f"{args.prompts:,} prompts ({mode}), median of {len(reports)}: host CPU {median['cpu_us']:.0f} us "
          f"per sub-call, {median['outside_gc_us']:.0f} us of it outside GC; GC {median['gc_ms']:.0f} ms "
          f"({median['gc_full']:.0f} full collections, longest {median['gc_longest_ms']:.0f} ms); "
          f"wall {median['wall_s']:.2f} s")
    for report in reports:
        print("  " + ", ".join(f"{key} {value:.1f}" for key, value in report.items()))
    write_result("hostpath", {"prompts": args.prompts, "mode": mode, "median": median, "runs": reports})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scripted", action="store_true", help="a sub-model that answers at once: no HTTP")
    parser.add_argument("--stream", action="store_true", help="read the run's events with rlm.stream")
    parser.add_argument("--trajectory", action="store_true", help="write a trajectory (to a temporary file)")
    parser.add_argument("--children", type=int, default=0, help="split the prompts over this many rlm_query children")
    parser.add_argument("--profile", default=None, metavar="RAW", help="attribute a py-spy raw profile")
    anyio.run(main, parser.parse_args())
