"""Sandbox costs: cell round trip and session start per isolation level (as ratios to the plain
process), the time from cancelling a busy cell to a closed session, context load, and the
frame cost of a 1,000-prompt batch.

    .venv/bin/python benchmarks/sandbox.py [--quick]

Prints each figure with its ratio to the target (ratio < 1 meets it) and writes
benchmarks/results/sandbox.json.
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import anyio
from _common import percentile, write_result

from rlmflow import LocalSandbox

TARGETS = {"round_trip_p50_ms": 1.0, "load_100mb_s": 0.5, "cancel_to_closed_ms": 100.0}

# Isolation levels, weakest first; "plain" is the process with no confinement, the ratios' base.
LEVELS: dict[str, dict[str, Any]] = {
    "plain": {"isolation": "none"},
    "landlock+caps": {"seccomp": False, "bubblewrap": False},
    "landlock+caps+seccomp": {"bubblewrap": False},
    "all (auto)": {},
}


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


async def per_level(context: str, cells: int, starts: int) -> dict[str, dict[str, Any]]:
    """Cell round trip p50 and session start (median) for each isolation level.

    The levels take turns, cell by cell and start by start, so that load from other processes
    on a shared machine falls on all of them alike.
    """
    configs = {name: LocalSandbox(**options) for name, options in LEVELS.items()}
    start_times: dict[str, list[float]] = {name: [] for name in LEVELS}
    layers: dict[str, list[str]] = {}
    for _ in range(starts):
        for name, config in configs.items():
            started = time.perf_counter()
            async with config.session(context, immediate_bridge) as sandbox:
                start_times[name].append(time.perf_counter() - started)
                layers[name] = list(sandbox.report.layers)
    timings: dict[str, list[float]] = {name: [] for name in LEVELS}
    async with AsyncExitStack() as stack:
        sessions = {
            name: await stack.enter_async_context(config.session(context, immediate_bridge))
            for name, config in configs.items()
        }
        for round_ in range(30 + cells):
            for name, sandbox in sessions.items():
                started = time.perf_counter()
                await sandbox.execute("x = 1")
                if round_ >= 30:  # the first rounds warm up
                    timings[name].append(time.perf_counter() - started)
    measured: dict[str, dict[str, Any]] = {}
    for name in LEVELS:
        measured[name] = {
            "round_trip_p50_ms": percentile(timings[name], 0.5) * 1000,
            "round_trip_p99_ms": percentile(timings[name], 0.99) * 1000,
            "session_start_ms": statistics.median(start_times[name]) * 1000,
            "layers": layers[name],
        }
    base = measured["plain"]
    for figures in measured.values():
        figures["round_trip_ratio_to_plain"] = figures["round_trip_p50_ms"] / base["round_trip_p50_ms"]
        figures["session_start_ratio_to_plain"] = figures["session_start_ms"] / base["session_start_ms"]
    return measured


async def cancel_to_closed(repeats: int) -> dict[str, float]:
    """From cancelling a cell that sleeps to the session being closed (worker killed, files gone)."""
    timings = []
    for _ in range(repeats):
        async with LocalSandbox(cell_timeout=60).session("ctx", immediate_bridge) as sandbox:
            with anyio.move_on_after(0.2):
                await sandbox.execute("import time\ntime.sleep(60)")
            cancelled = time.perf_counter()
        timings.append(time.perf_counter() - cancelled)
    return {"median_ms": statistics.median(timings) * 1000, "max_ms": max(timings) * 1000}


async def main() -> None:
    quick = "--quick" in sys.argv
    levels = await per_level(document(1024 * 1024), cells=200 if quick else 1000, starts=3 if quick else 7)
    for name, figures in levels.items():
        print(
            f"{name:>24}: round trip p50 {figures['round_trip_p50_ms']:.3f} ms "
            f"(x{figures['round_trip_ratio_to_plain']:.2f}), session start {figures['session_start_ms']:.0f} ms "
            f"(x{figures['session_start_ratio_to_plain']:.2f})"
        )
    cancel = await cancel_to_closed(3 if quick else 10)
    target = TARGETS["cancel_to_closed_ms"]
    print(
        f"cancel a sleeping cell -> session closed: median {cancel['median_ms']:.1f} ms, "
        f"max {cancel['max_ms']:.1f} ms -> ratio to {target:.0f} ms target {cancel['max_ms'] / target:.2f}"
    )
    if quick:
        write_result("sandbox-levels", {"levels": levels, "cancel_to_closed": cancel})
        return
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
        "levels": levels,
        "cancel_to_closed": cancel,
        "targets": TARGETS,
        "ratios": {
            "round_trip_p50 / 1 ms": p50 / TARGETS["round_trip_p50_ms"],
            "load_100mb / 0.5 s": load100["session_start_s"] / TARGETS["load_100mb_s"],
            "cancel_to_closed_max / 100 ms": cancel["max_ms"] / TARGETS["cancel_to_closed_ms"],
        },
    }
    print(
        f"cell round trip (10 MB context): p50 {p50:.3f} ms, p99 {p99:.3f} ms "
        f"-> ratio to 1 ms target {p50 / TARGETS['round_trip_p50_ms']:.2f}"
    )
    print(
        f"context load 10 MB: session start {load10['session_start_s'] * 1000:.0f} ms "
        f"(worker reads it in {load10['worker_load_s'] * 1000:.0f} ms)"
    )
    print(
        f"context load 100 MB: session start {load100['session_start_s'] * 1000:.0f} ms "
        f"(worker {load100['worker_load_s'] * 1000:.0f} ms) -> ratio to 0.5 s target "
        f"{load100['session_start_s'] / TARGETS['load_100mb_s']:.2f}"
    )
    print(
        f"llm_query_many frame, 1000 x 2 KB prompts, host answering at once: "
        f"{batch['batch_round_trip_ms']:.1f} ms per batch"
    )
    write_result("sandbox", result)


if __name__ == "__main__":
    anyio.run(main)
