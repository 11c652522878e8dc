"""What the journal costs and what it saves: host CPU per sub-call on vs off, resume, replay.

    .venv/bin/python benchmarks/durable.py [--prompts 2000] [--repeat 3]

One run whose single cell sends ``--prompts`` prompts in one ``llm_query_many`` to the
OpenAI-compatible fake provider (benchmarks/fake_provider.py, its own process, 200 ms a request,
capacity 1,024), as in ``hostpath.py``. Measured, alternating journal off and on, ``--repeat``
times each: the host's CPU per sub-call (``time.process_time`` around the run: it includes the
journal's writer thread). Then the journaled run is resumed by id (every call answered from the
journal: the provider's request count must not move) and replayed (``RLM(replay=...)``): their
wall time against the original run's. Last, an evaluation run three times on one sub-call cache
(``--items`` items, ``base`` and ``rlm``, each run fanning out ``--item-prompts`` sub-calls), each
pass into a fresh results file so every item runs again: the provider's requests per pass (a fresh
provider process each, so its count is the pass's). Targets: journal on within 1.10x of off; 0
requests when resumed or replayed; 0 when the evaluation is run again unchanged, and only the
changed items' own calls when a fifth of the questions change. Writes
benchmarks/results/durable.json.
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
from rlmflow.durable.cache import SQLiteCallCache
from rlmflow.eval.approaches import DirectApproach, RLMApproach
from rlmflow.eval.items import EvalItem
from rlmflow.eval.runner import run_eval


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


def eval_items(count: int, changed: int) -> list[EvalItem]:
    """``count`` items over distinct documents; the first ``changed`` with another wording."""
    return [
        EvalItem(f"item-{i}", ("Reworded: which?" if i < changed else "Which one?") + f" (item {i})", "A",
                 choices={"A": "yes", "B": "no"}, context=f"document {i}: " + "lorem ipsum dolor " * 400)
        for i in range(count)
    ]


async def eval_pass(
    cache_path: Path, results: Path, items: list[EvalItem], item_prompts: int, port: int
) -> tuple[int, float, int]:
    """The provider requests and wall seconds of one evaluation pass on the cache, and the
    provider's port (each pass's provider listens where the first did: the endpoint is part of a
    request's key, as another server may serve another model)."""
    provider = FakeProvider("--capacity", "1024", "--port", str(port))
    cell = (f"parts = llm_query_many(['part %d: ' % i + context[:60] for i in range({item_prompts})])\n"
            "FINAL('A')")
    cache = SQLiteCallCache(cache_path)
    model = OpenAIModel("fake-sub", base_url=provider.base_url, timeout=120)
    root = ScriptedModel(lambda r: f"```repl\n{cell}\n```", name="root")
    try:
        approaches = [DirectApproach(model, name="base", cache=cache),
                      RLMApproach(root, model, cache=cache, sub_max_tokens=64)]
        started = time.perf_counter()
        await run_eval(items, approaches, results=results, dispatcher=Dispatcher(), concurrency=4)
        wall = time.perf_counter() - started
        for approach in approaches:
            await approach.aclose()
    finally:
        await model.aclose()
        await cache.aclose()
        await provider.stop()
    return int(provider.summary.get("requests", -1)), wall, int(provider.base_url.rsplit(":", 1)[1].split("/")[0])


async def eval_reruns(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    cache = folder / "cache.sqlite"
    changed = args.items // 5
    passes = {}
    port = 0
    for name, items in (("first", eval_items(args.items, 0)), ("unchanged", eval_items(args.items, 0)),
                        ("changed", eval_items(args.items, changed))):
        requests, wall, port = await eval_pass(cache, folder / f"{name}.jsonl", items, args.item_prompts, port)
        passes[name] = {"requests": requests, "wall_s": round(wall, 3)}
    print(f"evaluation of {args.items} items (base + rlm, {args.item_prompts} sub-calls a run) on one cache: "
          + ", ".join(f"{name} {p['requests']} requests in {p['wall_s']:.2f} s" for name, p in passes.items())
          + f" (targets: unchanged 0; changed {changed}: one base call each, the rlm's root is scripted and its "
          "sub-prompts unchanged)")
    return {"items": args.items, "item_prompts": args.item_prompts, "changed_items": changed, "passes": passes}


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
    reruns = await eval_reruns(args, folder)
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
            "replay": {"wall_s": replayed_wall, "requests": replayed_requests}, "eval_with_cache": reruns}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--items", type=int, default=20, help="items of the evaluation reruns")
    parser.add_argument("--item-prompts", type=int, default=50, help="sub-calls of each item's run")
    write_result("durable", anyio.run(main, parser.parse_args()))
