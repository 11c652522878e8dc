"""Host CPU per call of each provider client, and fan-out efficiency against the bound.

    .venv/bin/python benchmarks/providers.py [--calls 2000] [--concurrency 64] [--latency 0.05]

Each fake provider (OpenAI chat completions, Anthropic Messages, Bedrock Converse) runs in a
process of its own, so the CPU measured (``time.process_time`` of this process over the timed
batch, after a warm-up) is the client's alone. For each protocol it measures the vendor client
(openai SDK, anthropic SDK, aioboto3), rlmflow's model alone (``model.request``), and rlmflow's
model through the Dispatcher (``call_many``: budget, lane, spans, records: everything included).
Efficiency is the bound ``ceil(calls / concurrency) x latency`` over the wall time. Prints the
table and the SDK/lean ratios; writes benchmarks/results/providers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from _common import write_result

PROMPT = "Summarise this section of the report in one line. " * 8


# -- the fake providers, each in a child process ---------------------------------------------------
async def _serve(kind: str, latency: float) -> None:
    from tests.fakes import FakeAnthropicServer, FakeBedrockServer, FakeOpenAIServer

    server: Any
    if kind == "openai":
        server = FakeOpenAIServer(latency=latency)
    elif kind == "anthropic":
        server = FakeAnthropicServer(latency=latency)
    else:
        server = FakeBedrockServer(latency=latency)
    async with server:
        env = server.credentials_env() if kind == "bedrock" else {}
        print(json.dumps({"base_url": server.base_url, "env": env}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)
        await stop.wait()


class Child:
    def __init__(self, kind: str, latency: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--latency", str(latency)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        hello = json.loads(self.process.stdout.readline())
        self.base_url: str = hello["base_url"]
        self.env: dict[str, str] = hello["env"]

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- measuring -------------------------------------------------------------------------------------
async def measure(
    call: Callable[[int], Awaitable[Any]], calls: int, concurrency: int, latency: float
) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with gate:
            await call(index)

    await asyncio.gather(*(one(i) for i in range(min(calls, 2 * concurrency))))  # warm up the pool
    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(calls)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    bound = math.ceil(calls / concurrency) * latency
    return {"cpu_ms_per_call": round(cpu / calls * 1000, 3), "wall_s": round(wall, 3),
            "efficiency": round(bound / wall, 3) if wall else None}


async def through_dispatcher(model: Any, calls: int, concurrency: int, latency: float) -> dict[str, Any]:
    from rlmflow import BudgetLedger, Dispatcher, Limits, ModelRequest

    dispatcher = Dispatcher(limits={model.provider: Limits(max_concurrency=concurrency)})
    requests = [ModelRequest.from_prompt(f"{PROMPT} #{i}", max_tokens=16) for i in range(calls)]
    await dispatcher.call_many(model, requests[: 2 * concurrency], ledger=BudgetLedger())
    cpu, wall = time.process_time(), time.perf_counter()
    results = await dispatcher.call_many(model, requests, ledger=BudgetLedger())
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    failed = sum(isinstance(r, Exception) for r in results)
    bound = math.ceil(calls / concurrency) * latency
    return {"cpu_ms_per_call": round(cpu / calls * 1000, 3), "wall_s": round(wall, 3),
            "efficiency": round(bound / wall, 3), "failed": failed}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    from rlmflow import AnthropicModel, BedrockModel, ModelRequest, OpenAIModel

    calls, concurrency, latency = args.calls, args.concurrency, args.latency
    rows: dict[str, dict[str, Any]] = {}

    def request(i: int) -> ModelRequest:
        return ModelRequest.from_prompt(f"{PROMPT} #{i}", max_tokens=16)

    def say(name: str, row: dict[str, Any]) -> None:
        rows[name] = row
        print(f"{name:<28} {row['cpu_ms_per_call']:>8.3f} ms/call  efficiency {row['efficiency']:.2f}", flush=True)

    # OpenAI-compatible
    child = Child("openai", latency)
    try:
        import httpx
        import openai

        sdk = openai.AsyncOpenAI(base_url=child.base_url, api_key="x", max_retries=0)
        say("openai sdk", await measure(lambda i: sdk.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"{PROMPT} #{i}"}], max_tokens=16),
            calls, concurrency, latency))
        await sdk.close()
        shared = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency,
                                                       max_keepalive_connections=concurrency))
        tuned = openai.AsyncOpenAI(base_url=child.base_url, api_key="x", max_retries=0, http_client=shared)
        say("openai sdk + tuned httpx", await measure(lambda i: tuned.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"{PROMPT} #{i}"}], max_tokens=16),
            calls, concurrency, latency))
        await shared.aclose()
        model = OpenAIModel("m", base_url=child.base_url)
        say("rlmflow openai (lean)", await measure(lambda i: model.request(request(i)), calls, concurrency, latency))
        say("rlmflow openai + dispatcher", await through_dispatcher(model, calls, concurrency, latency))
        await model.aclose()
    finally:
        child.close()

    # Anthropic
    child = Child("anthropic", latency)
    try:
        try:
            import anthropic
        except ImportError:
            print("anthropic SDK not installed: skipping its row")
        else:
            asdk = anthropic.AsyncAnthropic(base_url=child.base_url, api_key="sk-ant-fake", max_retries=0)
            say("anthropic sdk", await measure(lambda i: asdk.messages.create(
                model="claude-sonnet-4-5", max_tokens=16,
                messages=[{"role": "user", "content": f"{PROMPT} #{i}"}]), calls, concurrency, latency))
            await asdk.close()
        claude = AnthropicModel("claude-sonnet-4-5", base_url=child.base_url, api_key="sk-ant-fake")
        say("rlmflow anthropic (lean)", await measure(lambda i: claude.request(request(i)),
                                                      calls, concurrency, latency))
        say("rlmflow anthropic + dispatcher", await through_dispatcher(claude, calls, concurrency, latency))
        await claude.aclose()
    finally:
        child.close()

    # Bedrock
    child = Child("bedrock", latency)
    os.environ.update(child.env)
    try:
        import aioboto3
        from botocore.config import Config

        session = aioboto3.Session()
        config = Config(retries={"total_max_attempts": 1}, max_pool_connections=concurrency)
        async with session.client("bedrock-runtime", endpoint_url=child.base_url, config=config) as client:
            say("aioboto3 converse", await measure(lambda i: client.converse(
                modelId="us.anthropic.claude-sonnet-4-5-20250929-v1:0",
                messages=[{"role": "user", "content": [{"text": f"{PROMPT} #{i}"}]}],
                inferenceConfig={"maxTokens": 16}), calls, concurrency, latency))
        bedrock = BedrockModel("us.anthropic.claude-sonnet-4-5-20250929-v1:0", endpoint_url=child.base_url)
        say("rlmflow bedrock", await measure(lambda i: bedrock.request(request(i)), calls, concurrency, latency))
        say("rlmflow bedrock + dispatcher", await through_dispatcher(bedrock, calls, concurrency, latency))
        await bedrock.aclose()
    finally:
        child.close()

    ratios = {}
    for sdk_row, lean_row in (("openai sdk", "rlmflow openai (lean)"), ("anthropic sdk", "rlmflow anthropic (lean)"),
                              ("aioboto3 converse", "rlmflow bedrock")):
        if sdk_row in rows and lean_row in rows:
            ratios[f"{sdk_row} / {lean_row}"] = round(rows[sdk_row]["cpu_ms_per_call"]
                                                      / rows[lean_row]["cpu_ms_per_call"], 2)
    for name, ratio in ratios.items():
        print(f"ratio {name}: {ratio}x host CPU")
    return {"calls": calls, "concurrency": concurrency, "latency_s": latency, "rows": rows, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--serve", choices=("openai", "anthropic", "bedrock"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, args.latency))
        return
    result = asyncio.run(bench(args))
    write_result("providers", result)


if __name__ == "__main__":
    main()
