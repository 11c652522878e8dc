"""The host's event loop under hostile sandbox output: its longest stall against a 100 ms bound.

    .venv/bin/python benchmarks/hostile.py [--chars 8000000]

Each case is one run whose cell code sends the host something huge or malformed (issue 17):
an error, a FINAL answer and printed output of ``--chars`` NUL characters (each one escaped when
sanitised), a batch with an unknown argument of ``--chars`` bytes, many child runs at once. A
ticker task on the same loop wakes every 5 ms and records how late it woke; the longest delay
is the case's stall. The ratio is the worst stall over the 100 ms bound (target <= 1). Writes
benchmarks/results/hostile.json.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import _common
import anyio

from rlmflow import RLM, RLMError, ScriptedModel
from tests.helpers import turn_script

BOUND_S = 0.100
TICK_S = 0.005
HOST = "host = next(c.cell_contents for c in llm_query_many.__closure__ if callable(c.cell_contents))\n"


def cases(chars: int) -> dict[str, str]:
    return {
        "error": f"raise ValueError('\\0' * {chars})",
        "final": f"FINAL('\\0' * {chars})",
        "printed": f"print('\\0' * {chars})",
        "unknown argument": HOST + f"host('llm_query_many', {{'prompts': ['a'], 'junk': b'x' * {chars}}})",
        "children": "rlm_query_many(['p'] * 2000)",
    }


async def longest_stall(code: str) -> dict[str, Any]:
    """One run of ``code``; the loop's longest late wake-up while it ran."""
    worst = 0.0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal worst
        while not done.is_set():
            planned = time.perf_counter() + TICK_S
            await anyio.sleep(TICK_S)
            worst = max(worst, time.perf_counter() - planned)

    sub = ScriptedModel(lambda r: "ok", name="sub")
    outcome = "answered"
    started = time.perf_counter()
    root = turn_script([code, "FINAL('end')"])
    async with RLM(root=root, sub=sub, max_depth=0, max_turns=2) as rlm, anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        try:
            await rlm.run("a small document", "q?")
        except RLMError as exc:
            outcome = type(exc).__name__
        done.set()
    return {"stall_ms": round(worst * 1000, 1), "seconds": round(time.perf_counter() - started, 2), "outcome": outcome}


async def main(chars: int) -> dict[str, Any]:
    await longest_stall("print('warm-up')")  # the first run's imports and first sandbox are no case's
    results = {}
    for name, code in cases(chars).items():
        results[name] = await longest_stall(code)
        print(f"{name:17s} longest stall {results[name]['stall_ms']:7.1f} ms, run {results[name]['seconds']} s, "
              f"{results[name]['outcome']}")
    worst = max(r["stall_ms"] for r in results.values()) / 1000
    ratio = worst / BOUND_S
    print(f"worst stall {worst * 1000:.1f} ms against the {BOUND_S * 1000:.0f} ms bound -> ratio {ratio:.2f} "
          "(target <= 1)")
    return {"chars": chars, "bound_ms": BOUND_S * 1000, "ratio": round(ratio, 3), "cases": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=8_000_000)
    args = parser.parse_args()
    result = anyio.run(main, args.chars)
    _common.write_result("hostile", result)
    print(json.dumps(result["cases"]))
