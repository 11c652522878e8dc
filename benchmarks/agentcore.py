"""What the AgentCore backend adds per llm_query_many batch, against the local sandbox.

    .venv/bin/python benchmarks/agentcore.py [--rtt-ms 0]

The fake data-plane server (tests/fakes/fake_agentcore.py) runs in a process of its own, so its
CPU is not the host's; ``--rtt-ms`` adds that much delay to every API call to model the network
round trip to AWS. The host answers every batch at once (no model latency), so the figures are
pure sandbox overhead. Prints the per-batch cost of each backend and their ratio, and writes
benchmarks/results/agentcore.json (agentcore-rtt<N>ms.json with a simulated round trip).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import aioboto3
import anyio
from _common import write_result

from rlmflow import LocalSandbox
from rlmflow.sandbox import AgentCoreSandbox

BATCHES = 30
SHAPES = {"10 x 100 chars": (10, 100), "1000 x 2 KB": (1000, 2048)}


async def immediate_bridge(fn: str, args: dict[str, Any]) -> Any:
    return ["ok"] * len(args.get("prompts", []))


def document(size: int) -> str:
    line = "All the world's a stage, and all the men and women merely players.\n"
    return (line * (size // len(line) + 1))[:size]


async def measure(sandbox: Any, context: str) -> dict[str, Any]:
    started = time.perf_counter()
    async with sandbox.session(context, immediate_bridge) as session:
        figures: dict[str, Any] = {"session_start_s": time.perf_counter() - started}
        trips = []
        for _ in range(BATCHES):
            began = time.perf_counter()
            await session.execute("x = 1")
            trips.append(time.perf_counter() - began)
        figures["cell_round_trip_ms"] = statistics.median(trips) * 1000
        for label, (count, size) in SHAPES.items():
            await session.execute(f"prompts = ['p' * {size}] * {count}")
            calls_before = getattr(session, "api_calls", 0)
            began = time.perf_counter()
            result = await session.execute(f"for _ in range({BATCHES}):\n    answers = llm_query_many(prompts)")
            assert result.error is None, result.error
            elapsed = time.perf_counter() - began
            figures[label] = {
                "per_batch_ms": elapsed / BATCHES * 1000,
                "api_calls_per_batch": (getattr(session, "api_calls", 0) - calls_before) / BATCHES,
            }
    return figures


async def serve(rtt: float) -> None:
    """The fake server as a process: prints its endpoint, stops when stdin closes."""
    from tests.fakes.fake_agentcore import FakeAgentCoreServer

    async with FakeAgentCoreServer(latency=rtt) as server:
        print(json.dumps({"endpoint_url": server.endpoint_url}), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read)


async def main(rtt_ms: float) -> None:
    server = await anyio.open_process(
        [sys.executable, __file__, "--serve", "--rtt-ms", str(rtt_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await server.stdout.receive()
        endpoint = json.loads(line)["endpoint_url"]
        boto = aioboto3.Session(aws_access_key_id="AKIDFAKEAGENTCORE", aws_secret_access_key="fake-secret-key",
                                region_name="us-east-1")
        agentcore = AgentCoreSandbox(session=boto, region_name="us-east-1", endpoint_url=endpoint)
        for warm_up in (LocalSandbox(), agentcore):  # first client and first worker pay one-time costs
            async with warm_up.session("warm up", immediate_bridge):
                pass
        results: dict[str, Any] = {}
        for size_label, size in (("1 MB", 1 << 20), ("16 MB", 16 << 20)):
            context = document(size)
            local = await measure(LocalSandbox(), context)
            remote = await measure(agentcore, context)
            results[size_label] = {"local": local, "agentcore": remote}
    finally:
        if server.stdin is not None:
            await server.stdin.aclose()
        await server.wait()

    figures = results["1 MB"]
    report: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "simulated_rtt_ms": rtt_ms,
        "contexts": results,
        "ratios": {},
        "added_ms_per_batch": {},
    }
    print(f"simulated network round trip per API call: {rtt_ms:g} ms")
    for label in SHAPES:
        local_ms = figures["local"][label]["per_batch_ms"]
        remote_ms = figures["agentcore"][label]["per_batch_ms"]
        report["ratios"][label] = remote_ms / local_ms
        report["added_ms_per_batch"][label] = remote_ms - local_ms
        print(f"llm_query_many {label}: local {local_ms:.2f} ms, AgentCore (fake) {remote_ms:.2f} ms per batch "
              f"({figures['agentcore'][label]['api_calls_per_batch']:.1f} API calls) -> ratio "
              f"{remote_ms / local_ms:.1f}, +{remote_ms - local_ms:.2f} ms")
    print(f"cell round trip: local {figures['local']['cell_round_trip_ms']:.2f} ms, "
          f"AgentCore (fake) {figures['agentcore']['cell_round_trip_ms']:.2f} ms")
    for size_label, pair in results.items():
        print(f"session start with a {size_label} context: local {pair['local']['session_start_s'] * 1000:.0f} ms, "
              f"AgentCore (fake) {pair['agentcore']['session_start_s'] * 1000:.0f} ms")
    write_result("agentcore" if not rtt_ms else f"agentcore-rtt{rtt_ms:g}ms", report)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="delay added to every API call")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        anyio.run(serve, options.rtt_ms / 1000)
    else:
        anyio.run(main, options.rtt_ms)
