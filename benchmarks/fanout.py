"""Fan-out throughput: a 1,000-prompt llm_query_many from sandbox code against a rate-limited provider.

    .venv/bin/python benchmarks/fanout.py [--prompts 1000] [--latency 0.2] [--rpm 600] [--tpm 400000]

The fake OpenAI-compatible server runs in its own process (so host CPU is ours alone), with
200 ms latency and RPM/TPM enforced over 60 s windows. Prints achieved throughput against the
bound the limits allow, latency and queue-wait percentiles, 429s, lost calls, host CPU per
sub-call (end to end with the openai SDK, and the Dispatcher alone with a scripted model) and
event-loop lag; writes benchmarks/results/fanout.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from _common import percentile, write_result
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import RLM, BudgetLedger, Dispatcher, Limits, ModelRequest, OpenAIModel, ScriptedModel

FAKE_PROVIDER = Path(__file__).with_name("fake_provider.py")


def windowed_ideal(n: int, rpm: float | None, tpm: float | None, tokens: float, concurrency: int,
                   latency: float, window: float = 60.0) -> float:
    """Earliest finish for n calls when at most `per_window` may start in any window."""
    per_window = math.inf
    if rpm:
        per_window = min(per_window, rpm)
    if tpm:
        per_window = min(per_window, math.floor(tpm / tokens))
    per_window = int(min(per_window, n))
    full_windows = (n - 1) // per_window
    last = n - full_windows * per_window
    return full_windows * window + math.ceil(last / concurrency) * latency


class LoopLag:
    """Measures how late a 10 ms sleep wakes up: the event loop's responsiveness."""

    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await anyio.sleep(0.01)
            self.lags.append(time.perf_counter() - started - 0.01)


async def dispatcher_overhead(n: int = 5000, *, tracing: bool = False) -> float:
    """CPU seconds per call through the Dispatcher alone (a scripted model that answers at once).

    With ``tracing``, spans go to an SDK tracer provider with an in-memory exporter.
    """
    model = ScriptedModel(lambda r: "ok")
    provider = None
    if tracing:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    dispatcher = Dispatcher(limits={"scripted": Limits(max_concurrency=64)}, tracer_provider=provider)
    requests = [ModelRequest.from_prompt(f"p{i}", max_tokens=8) for i in range(n)]
    await dispatcher.call_many(model, requests[:200], ledger=BudgetLedger())  # warm up
    started = time.process_time()
    await dispatcher.call_many(model, requests, ledger=BudgetLedger())
    return (time.process_time() - started) / n


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    server = subprocess.Popen(
        [sys.executable, str(FAKE_PROVIDER), "--latency", str(args.latency),
         "--rpm", str(args.rpm), "--tpm", str(args.tpm)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert server.stdout is not None
    return server, json.loads(server.stdout.readline())["base_url"]


async def main(args: argparse.Namespace, server: subprocess.Popen[str], base_url: str) -> dict[str, Any]:
    assert server.stdout is not None and server.stdin is not None
    prompt_chars = 400
    cells = [
        f"prompts = [f'chunk {{i}}: ' + 'lorem ipsum ' * {prompt_chars // 12} for i in range({args.prompts})]\n"
        "answers = llm_query_many(prompts)\n"
        "FINAL(str(sum(a.startswith('answer:') for a in answers)))"
    ]
    root = ScriptedModel(lambda r: f"```repl\n{cells[0]}\n```", name="root")
    sub = OpenAIModel("fake-sub", base_url=base_url, timeout=60)
    limits = Limits(rpm=args.rpm, tpm=args.tpm, max_concurrency=args.concurrency)
    dispatcher = Dispatcher(limits={"openai": limits})
    lag = LoopLag()
    try:
        async with (
            RLM(root=root, sub=sub, dispatcher=dispatcher, sub_max_tokens=64) as rlm,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(lag.run)
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            result = await rlm.run("a small document", "fan out")
            wall = time.perf_counter() - wall_started
            cpu = time.process_time() - cpu_started
            tg.cancel_scope.cancel()
    finally:
        await sub.aclose()
        server.stdin.close()
        summary = json.loads(await anyio.to_thread.run_sync(server.stdout.readline) or "{}")
    subs = [c for c in result.calls if c.model == "fake-sub"]
    ok = sum(1 for c in subs if c.error is None)
    tokens_per_call = sum(c.input_tokens for c in subs) / max(1, len(subs)) + 64
    ideal = windowed_ideal(args.prompts, args.rpm, args.tpm, tokens_per_call, args.concurrency, args.latency)
    steady_bound = min(args.rpm / 60, args.tpm / 60 / tokens_per_call, args.concurrency / args.latency)
    overhead = await dispatcher_overhead()
    traced = await dispatcher_overhead(tracing=True)
    report = {
        "config": vars(args),
        "wall_s": wall,
        "answered": int(result.answer),
        "lost": args.prompts - ok,
        "throughput_per_s": args.prompts / wall,
        "windowed_ideal_s": ideal,
        "ratio_to_windowed_bound": ideal / wall,
        "steady_state_bound_per_s": steady_bound,
        "ratio_to_steady_state_bound": (args.prompts / wall) / steady_bound,
        "latency_p50_s": percentile([c.duration for c in subs], 0.5),
        "latency_p95_s": percentile([c.duration for c in subs], 0.95),
        "queue_wait_p50_s": percentile([c.queue_wait for c in subs], 0.5),
        "queue_wait_p95_s": percentile([c.queue_wait for c in subs], 0.95),
        "server": summary,
        "host_cpu_per_call_us_end_to_end": cpu / len(subs) * 1e6,
        "dispatcher_cpu_per_call_us": overhead * 1e6,
        "dispatcher_cpu_per_call_traced_us": traced * 1e6,
        "tracing_on_off_ratio": traced / overhead,
        "loop_lag_p99_ms": percentile(lag.lags, 0.99) * 1000,
        "loop_lag_mean_ms": statistics.mean(lag.lags) * 1000 if lag.lags else 0.0,
    }
    print(f"{args.prompts} prompts in {wall:.1f} s; the limits allow {ideal:.1f} s at best "
          f"-> ratio {report['ratio_to_windowed_bound']:.3f} (target >= 0.97)")
    print(f"  steady-state bound {steady_bound:.2f}/s, achieved {args.prompts / wall:.2f}/s "
          f"(ratio {report['ratio_to_steady_state_bound']:.2f}; above 1 because a 60 s window admits a burst)")
    print(f"  latency p50 {report['latency_p50_s'] * 1000:.0f} ms, p95 {report['latency_p95_s'] * 1000:.0f} ms; "
          f"queue wait p50 {report['queue_wait_p50_s']:.2f} s, p95 {report['queue_wait_p95_s']:.2f} s")
    print(f"  server: {summary.get('admitted')} admitted, {summary.get('rate_limited')} answered 429, "
          f"max {summary.get('max_requests_in_window')} requests in a window (limit {args.rpm}); lost {report['lost']}")
    print(f"  host CPU per sub-call: {report['host_cpu_per_call_us_end_to_end']:.0f} us end to end (openai SDK + "
          f"HTTP), {report['dispatcher_cpu_per_call_us']:.0f} us in the Dispatcher alone "
          f"-> ratio to 100 us target {report['dispatcher_cpu_per_call_us'] / 100:.2f}")
    print(f"  tracing on (SDK, in-memory exporter): {traced * 1e6:.0f} us per call vs {overhead * 1e6:.0f} us off "
          f"-> ratio {traced / overhead:.2f}")
    print(f"  event-loop lag p99 {report['loop_lag_p99_ms']:.2f} ms -> ratio to 10 ms target "
          f"{report['loop_lag_p99_ms'] / 10:.2f}")
    write_result("fanout", report)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=400_000)
    parser.add_argument("--concurrency", type=int, default=64)
    arguments = parser.parse_args()
    process, url = start_server(arguments)
    try:
        anyio.run(main, arguments, process, url)
    finally:
        process.wait(timeout=10)
