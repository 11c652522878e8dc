"""What the journal costs and what it saves: host CPU per sub-call on vs off, resume, replay.

    .venv/bin/python benchmarks/durable.py [--prompts 2000] [--repeat 3]

One run whose single cell sends ``--prompts`` prompts in one ``llm_query_many`` to the
OpenAI-compatible fake provider (benchmarks/fake_provider.py, its own process, 200 ms a request,
capacity 1,024), as in ``hostpath.py``. Measured, alternating journal off and on, ``--repeat``
times each: the host's CPU per sub-call (``time.process_time`` around the run: it includes the
journal's writer thread). Then the journaled run is resumed by id (every call answered from the
journal: the provider's request count must not move) and replayed (``RLM(replay=...)``): their
wall time against the original run's. Targets: journal on within 1.10x of off; 0 requests when
resumed or replayed. Writes benchmarks/results/durable.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from _common import write_result
from fanout import FakeProvider

from rlmflow import RLM, Dispatcher, ModelRequest, OpenAIModel, ScriptedModel


def root_for(prompts: int) -> ScriptedModel:
    cell = f"answers = llm_query_many(['question %d' % i for i in range({prompts})])\nFINAL(str(len(answers)))"
    return ScriptedModel(lambda r: f"```repl\n{cell}\n```", name="root")


async def one_run(provider: FakeProvider, prompts: int, journal: Path | None) -> tuple[float, float, str]:
    """(host CPU seconds, wall seconds, run id) of one fan-out run."""
    sub = OpenAIModel("fake-sub", base_url=provider.base_url, timeout=120)
    try:
        async with RLM(root=root_for(prompts), sub=sub, dispatcher=Dispatcher(), sub_max_tokens=64,
                       journal=journal) as rlm:
            await rlm.run("a warm-up document", "warm up")  # imports, connections, first prices
            cpu, wall = time.process_time(), time.perf_counter()
            result = await rlm.run("a small document", "fan out")
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await sub.aclose()
    if result.answer != str(prompts):
        raise RuntimeError(f"answered {result.answer} of {prompts}")
    return cpu, wall, result.run_id


async def from_journal(provider: FakeProvider, prompts: int, journal: Path, run_id: str, *,
                       replay: bool) -> tuple[float, int]:
    """Wall seconds of a resume (or a replay) of ``run_id``, and the requests it sent."""
    counted = 0

    def never(request: ModelRequest) -> str:
        nonlocal counted
        counted += 1
        return "sent"

    sub = ScriptedModel(never, name="fake-sub", provider="openai")
    sub.endpoint = provider.base_url  # type: ignore[attr-defined]  # the recorded calls' model, by key
    options: dict[str, Any] = {"replay": journal} if replay else {"journal": journal}
    async with RLM(root=root_for(prompts), sub=sub, sub_max_tokens=64, **options) as rlm:
        started = time.perf_counter()
        if replay:
            result = await rlm.run("a small document", "fan out")
        else:
            result = await rlm.resume("a small document", run_id=run_id)
        wall = time.perf_counter() - started
    if result.answer != str(prompts):
        raise RuntimeError(f"answered {result.answer} of {prompts}")
    return wall, counted


async def main(args: argparse.Namespace) -> dict[str, Any]:
    provider = FakeProvider("--capacity", "1024")
    folder = Path(tempfile.mkdtemp())
    off: list[float] = []
    on: list[float] = []
    walls: list[float] = []
    run_id, journal = "", folder / "journal-0.sqlite"
    try:
        for index in range(args.repeat):
            off.append((await one_run(provider, args.prompts, None))[0])
            journal = folder / f"journal-{index}.sqlite"
            cpu, wall, run_id = await one_run(provider, args.prompts, journal)
            on.append(cpu)
            walls.append(wall)
        resumed_wall, resumed_requests = await from_journal(provider, args.prompts, journal, run_id, replay=False)
        replayed_wall, replayed_requests = await from_journal(provider, args.prompts, journal, run_id, replay=True)
    finally:
        await provider.stop()
    per_call = {"off_us": statistics.median(off) / args.prompts * 1e6,
                "on_us": statistics.median(on) / args.prompts * 1e6}
    ratio = per_call["on_us"] / per_call["off_us"]
    original = statistics.median(walls)
    print(f"{args.prompts:,} prompts, median of {args.repeat}: host CPU per sub-call {per_call['off_us']:.0f} us "
          f"without the journal, {per_call['on_us']:.0f} us with it -> ratio {ratio:.3f} (target <= 1.10)")
    print(f"resumed: {resumed_wall:.2f} s with {resumed_requests} requests sent; replayed: {replayed_wall:.2f} s "
          f"with {replayed_requests}; the original run took {original:.2f} s (target: 0 requests)")
    return {"prompts": args.prompts, "cpu_per_call": per_call, "ratio": round(ratio, 3), "off_s": off, "on_s": on,
            "original_wall_s": original, "resume": {"wall_s": resumed_wall, "requests": resumed_requests},
            "replay": {"wall_s": replayed_wall, "requests": replayed_requests}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    write_result("durable", anyio.run(main, parser.parse_args()))
