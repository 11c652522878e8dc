"""What the prompt cache saves: root input cost per run, hit rate per turn, wall time; a shared-prefix batch.

    .venv/bin/python benchmarks/cost.py [--turns 12] [--batch 40] [--latency 0.05] [--repeat 3]

The root: the same scripted run (``tests/fakes/root_script.py``: ``--turns`` turns of cells that
print 1-4 KB each of a 270 KB ship ledger, ``FINAL`` in the last) with a Claude Sonnet 4.5 root on
the Bedrock fake (Converse) and on the Anthropic fake (Messages), prompt caching on (the default)
and off (``prompt_cache=False``), alternating, ``--repeat`` times each, at each of
``--history-chars`` (RLM's default 24,000, which the run outgrows once, and 100,000, which holds
it: a Claude root's window is 200K tokens). Each run starts on a fresh
fake (an empty cache). Measured per run: the root's input cost (its input tokens priced by
genai-prices, cache reads at 0.1x and writes at 1.25x the input price), the cache hit rate of
each turn (input tokens read from the cache / input tokens) and the wall time (median). Targets:
root input cost with the cache <= 0.35x without; wall time not worse (<= 1.10x).

The batch: one cell asks ``--batch`` questions about one ~6 KB chunk of the ledger, as
``llm_query_many(questions, prefix=chunk)`` against the same prompts with the chunk written into
each (``f"{chunk}\\n\\n{q}"``), with a Claude sub-model on each fake: the sub-calls' input cost and
the batch's wall time (the prefixed batch sends its first call alone, so its cache write can be
read by the others: one reply's latency more).

Fakes answer after ``--latency`` seconds. Writes benchmarks/results/cost.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
from _common import write_result

from rlmflow import RLM, Dispatcher, Pricing, ScriptedModel
from rlmflow.dispatch.records import CallRecord
from rlmflow.models.anthropic import AnthropicModel
from rlmflow.models.base import LanguageModel, Usage
from rlmflow.models.bedrock import BedrockModel
from tests.fakes import FakeAnthropicServer, FakeBedrockServer
from tests.fakes.root_script import CellScript, harbour_document, realistic_cells

BEDROCK_MODEL = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
QUESTION = "Which cargo came in most often?"
PRICING = Pricing()


class Provider:
    """One fake and how to build a model on it."""

    def __init__(self, name: str, latency: float) -> None:
        self.name = name
        self.latency = latency
        self.server: FakeBedrockServer | FakeAnthropicServer | None = None

    async def __aenter__(self) -> Provider:
        self.server = FakeBedrockServer(latency=self.latency) if self.name == "bedrock" else \
            FakeAnthropicServer(latency=self.latency)
        await self.server.__aenter__()
        if isinstance(self.server, FakeBedrockServer):
            os.environ.update(self.server.credentials_env())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await self.server.__aexit__(*exc)

    def model(self, cached: bool) -> LanguageModel:
        server = self.server
        if isinstance(server, FakeBedrockServer):
            return BedrockModel(BEDROCK_MODEL, region="us-east-1", endpoint_url=server.base_url, prompt_cache=cached)
        assert isinstance(server, FakeAnthropicServer)
        return AnthropicModel(ANTHROPIC_MODEL, base_url=server.base_url, api_key=server.api_key, prompt_cache=cached)


def input_cost(model: LanguageModel, calls: list[CallRecord]) -> float:
    """What the calls' input tokens cost (output left out: the cache does not change it)."""
    total = 0.0
    for call in calls:
        usage = Usage(call.input_tokens, 0, 1, call.cache_read_tokens, call.cache_write_tokens)
        cost = PRICING.cost(model.provider, model.name, usage)
        assert cost is not None, f"no price for {model.name}"
        total += cost
    return total


async def root_run(provider_name: str, cached: bool, turns: int, latency: float, history: int) -> dict[str, Any]:
    """One scripted run on a fresh fake; its root input cost, per-turn hit rates and wall time."""
    async with Provider(provider_name, latency) as provider:
        assert provider.server is not None
        provider.server.reply = CellScript(realistic_cells(turns))
        root = provider.model(cached)
        sub = ScriptedModel(lambda r: "ok", name="sub")
        try:
            async with RLM(root=root, sub=sub, dispatcher=Dispatcher(pricing=PRICING), max_turns=turns + 2,
                           history_chars=history) as rlm:
                started = time.perf_counter()
                result = await rlm.run(harbour_document(), QUESTION)
                wall = time.perf_counter() - started
        finally:
            await root.aclose()
    calls = [c for c in result.calls if c.role == "root"]
    if result.answer != "copper came in on many ships" or len(calls) != turns:
        raise RuntimeError(f"the scripted run went wrong: {result.answer!r} after {len(calls)} turns")
    return {
        "input_cost_usd": input_cost(root, calls),
        "input_tokens": sum(c.input_tokens for c in calls),
        "cache_read_tokens": sum(c.cache_read_tokens for c in calls),
        "cache_write_tokens": sum(c.cache_write_tokens for c in calls),
        "hit_rate_per_turn": [round(c.cache_read_tokens / c.input_tokens, 3) if c.input_tokens else 0.0
                              for c in calls],
        "wall_s": wall,
    }


async def batch_run(provider_name: str, prefixed: bool, size: int, latency: float) -> dict[str, Any]:
    """One cell asking ``size`` questions about one chunk: with ``prefix=`` or the chunk inline."""
    document = harbour_document()
    chunk = document[30_000:36_000]
    questions = [f"Question {i}: which ship docked at berth {i % 13} in this part of the ledger?" for i in range(size)]
    if prefixed:
        cell = f"answers = llm_query_many({questions!r}, prefix=context)\nFINAL(str(len(answers)))"
    else:
        cell = f"answers = llm_query_many([context + '\\n\\n' + q for q in {questions!r}])\nFINAL(str(len(answers)))"
    root = ScriptedModel(lambda r: f"```repl\n{cell}\n```", name="root")
    async with Provider(provider_name, latency) as provider:
        sub = provider.model(cached=True)
        try:
            async with RLM(root=root, sub=sub, dispatcher=Dispatcher(pricing=PRICING)) as rlm:
                started = time.perf_counter()
                result = await rlm.run(chunk, "ask about the chunk")
                wall = time.perf_counter() - started
        finally:
            await sub.aclose()
    calls = [c for c in result.calls if c.role == "sub"]
    if result.answer != str(size) or len(calls) != size:
        raise RuntimeError(f"the batch went wrong: {result.answer!r}, {len(calls)} calls")
    return {"input_cost_usd": input_cost(sub, calls), "input_tokens": sum(c.input_tokens for c in calls),
            "cache_read_tokens": sum(c.cache_read_tokens for c in calls),
            "cache_write_tokens": sum(c.cache_write_tokens for c in calls), "wall_s": wall}


async def compare(
    run: Callable[[bool], Any], repeat: int, on_label: str, off_label: str
) -> dict[str, Any]:
    """Runs on and off alternating; the first on-run's figures (they do not vary) and median walls."""
    on: list[dict[str, Any]] = []
    off: list[dict[str, Any]] = []
    for _ in range(repeat):
        on.append(await run(True))
        off.append(await run(False))
    wall_on = statistics.median(r["wall_s"] for r in on)
    wall_off = statistics.median(r["wall_s"] for r in off)
    first_on, first_off = dict(on[0]), dict(off[0])
    first_on["wall_s"], first_off["wall_s"] = round(wall_on, 3), round(wall_off, 3)
    return {
        on_label: first_on,
        off_label: first_off,
        "input_cost_ratio": round(first_on["input_cost_usd"] / first_off["input_cost_usd"], 3),
        "wall_ratio": round(wall_on / wall_off, 3),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"turns": args.turns, "batch": args.batch, "latency_s": args.latency,
                              "repeat": args.repeat, "root": {}, "batch_prefix": {}}
    for name in ("bedrock", "anthropic"):
        await root_run(name, True, 2, 0.0, 24_000)  # warm-up: imports, botocore's loader, first prices
        await batch_run(name, True, 2, 0.0)
    for name in ("bedrock", "anthropic"):
        for history in args.history_chars:
            root = await compare(
                lambda cached, n=name, h=history: root_run(n, cached, args.turns, args.latency, h),  # type: ignore[misc]
                args.repeat, "cache_on", "cache_off",
            )
            result["root"][f"{name}, history_chars={history}"] = root
            on, off = root["cache_on"], root["cache_off"]
            print(f"{name:9s} root, history_chars={history:,}: input cost ${on['input_cost_usd']:.4f} with the "
                  f"cache, ${off['input_cost_usd']:.4f} without ({root['input_cost_ratio']:.2f}x, target <= 0.35x); "
                  f"wall {on['wall_s']:.2f} s vs {off['wall_s']:.2f} s ({root['wall_ratio']:.2f}x)")
            print(f"          hit rate per turn: {root['cache_on']['hit_rate_per_turn']}")
        batch = await compare(lambda prefixed, n=name: batch_run(n, prefixed, args.batch, args.latency),
                              args.repeat, "prefix", "inline")
        result["batch_prefix"][name] = batch
        print(f"{name:9s} batch of {args.batch}: input cost ${batch['prefix']['input_cost_usd']:.4f} with prefix=, "
              f"${batch['inline']['input_cost_usd']:.4f} inline ({batch['input_cost_ratio']:.2f}x); wall "
              f"{batch['prefix']['wall_s']:.2f} s vs {batch['inline']['wall_s']:.2f} s ({batch['wall_ratio']:.2f}x)")
    ratios = [r["input_cost_ratio"] for r in result["root"].values()]
    result["target_met"] = all(r <= 0.35 for r in ratios) and all(
        r["wall_ratio"] <= 1.10 for r in result["root"].values())
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=12)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--history-chars", type=int, nargs="+", default=[24_000, 100_000],
                        help="the root's history sizes to run (24,000: RLM's default; the run's history "
                        "outgrows it at turn 9, where the trimmed prefix misses the cache once)")
    outcome = anyio.run(main, parser.parse_args())
    write_result("cost", outcome)
