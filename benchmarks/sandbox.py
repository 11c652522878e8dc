"""Sandbox costs: cell round trip, context load, and the frame cost of a 1,000-prompt batch.

    .venv/bin/python benchmarks/sandbox.py

Prints each figure with its ratio to the target (ratio < 1 meets it) and writes
benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import platform
import statistics
import time
from typing import Any

import anyio
from _common import percentile, write_result

from rlmflow import LocalSandbox

TARGETS = {"round_trip_p50_ms": 1.0, "load_100mb_s": 0.5}


async def immediate_bridge(fn: str, args: dict[str, Any]) -> Any:
    return ["ok"] * len(args.get("prompts", []))


def document(size: int) -> str:
    line = "All the world's a stage, and all the men and women merely players.\n"
    return (line * (size // len(line) + 1))[:size]


async def round_trips(context: str, n: int = 1000) -> list[float]:
    timings = []
    async with LocalSandbox().session(context, immediate_bridge) as sandbox:
        for _ in range(50):  # warm up
            await sandbox.execute("x = 1")
        for _ in range(n):
            started = time.perf_counter()
            await sandbox.execute("x = 1")
            timings.append(time.perf_counter() - started)
    return timings


async def load_time(context: str, repeats: int = 3) -> dict[str, float]:
    starts, loads = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        async with LocalSandbox().session(context, immediate_bridge) as sandbox:
            starts.append(time.perf_counter() - started)
            loads.append(sandbox.load_seconds)
    return {"session_start_s": min(starts), "worker_load_s": min(loads)}


async def batch_frame_cost(prompts: int = 1000, size: int = 2048) -> dict[str, float]:
    setup = f"prompts = ['p' * {size}] * {prompts}"
    timings = []
    async with LocalSandbox().session("ctx", immediate_bridge) as sandbox:
        await sandbox.execute(setup)
        for _ in range(20):
            started = time.perf_counter()
            result = await sandbox.execute("answers = llm_query_many(prompts)")
            assert result.error is None, result.error
            timings.append(time.perf_counter() - started)
    return {"batch_round_trip_ms": statistics.median(timings) * 1000}


async def main() -> None:
    ten_mb = document(10 * 1024 * 1024)
    hundred_mb = document(100 * 1024 * 1024)
    rt = await round_trips(ten_mb)
    p50 = percentile(rt, 0.5) * 1000
    p99 = percentile(rt, 0.99) * 1000
    load10 = await load_time(ten_mb)
    load100 = await load_time(hundred_mb)
    batch = await batch_frame_cost()
    result = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "round_trip_p50_ms": p50,
        "round_trip_p99_ms": p99,
        "load_10mb": load10,
        "load_100mb": load100,
        "llm_query_many_1000x2kb": batch,
        "targets": TARGETS,
        "ratios": {
            "round_trip_p50 / 1 ms": p50 / TARGETS["round_trip_p50_ms"],
            "load_100mb / 0.5 s": load100["session_start_s"] / TARGETS["load_100mb_s"],
        },
    }
    print(f"cell round trip (10 MB context): p50 {p50:.3f} ms, p99 {p99:.3f} ms "
          f"-> ratio to 1 ms target {p50 / TARGETS['round_trip_p50_ms']:.2f}")
    print(f"context load 10 MB: session start {load10['session_start_s'] * 1000:.0f} ms "
          f"(worker reads it in {load10['worker_load_s'] * 1000:.0f} ms)")
    print(f"context load 100 MB: session start {load100['session_start_s'] * 1000:.0f} ms "
          f"(worker {load100['worker_load_s'] * 1000:.0f} ms) -> ratio to 0.5 s target "
          f"{load100['session_start_s'] / TARGETS['load_100mb_s']:.2f}")
    print(f"llm_query_many frame, 1000 x 2 KB prompts, host answering at once: "
          f"{batch['batch_round_trip_ms']:.1f} ms per batch")
    write_result("sandbox", result)


if __name__ == "__main__":
    anyio.run(main)
