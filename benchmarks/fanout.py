"""Fan-out under real faults: 1,000 prompts from ONE llm_query_many in sandbox code, three regimes.

    .venv/bin/python benchmarks/fanout.py [--regimes random,hidden,capacity,cpu] [--prompts 1000] [--plot PNG]

The fake OpenAI-compatible provider runs in a process of its own (so host CPU is ours alone),
200 ms per request. The Dispatcher runs with its defaults (slow start from 8, ceiling 256) and is
told nothing about the provider's limits. Regimes, each printed as a ratio to its bound:

- ``random``: 20% of requests refused at random with ``retry-after: 1``. The bound is what the
  refusals allow: every prompt's own refusals times the ``retry-after`` plus one latency, and
  no less than the attempts' work at the 256 ceiling. Target: within 1.5x.
- ``hidden``: the provider enforces 600 RPM (60 s sliding window) and 32 requests in flight and
  tells the client neither. The bound is the earliest finish those limits allow. Target: within
  1.2x, refusals under 5% of requests.
- ``capacity``: no faults; the provider serves 256 at once (it queues the rest). The bound is
  ceil(n / 256) latencies. Target: within 1.1x.
- ``cpu``: 10,000 prompts, no faults, capacity 1,024: host CPU per sub-call, everything included
  (sandbox, Dispatcher, OpenAIModel, HTTP).

For ``capacity`` and ``cpu`` a PEER runs in the same invocation, against a fresh provider
process of its own: a bare aiohttp client that is TOLD the capacity (a semaphore of exactly that
many, one ClientSession made before the clock starts, the same prompts and ``max_tokens``). It
is context, not the target: what the fake provider and this machine allow a client with no
library at all. Every regime also records the host's GC pauses during the fan-out (``--gc-freeze``
runs ``gc.freeze()`` first, to show what the collector's passes over the imported modules cost)
and the fake provider's CPU per request (its process's time on a CPU, from /proc).

Every regime must lose 0 prompts. Writes benchmarks/results/fanout.json; ``--plot`` draws the
lane's concurrency limit over time in each regime from that data.
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

import aiohttp
import anyio
import anyio.to_thread
from _common import RESULTS, GCPauses, percentile, process_cpu_s, write_result
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import RLM, BudgetLedger, Dispatcher, Limits, ModelRequest, OpenAIModel, ScriptedModel

FAKE_PROVIDER = Path(__file__).with_name("fake_provider.py")
LATENCY = 0.2
CEILING = 256  # the Dispatcher's default ceiling for remote providers
SUB_MAX_TOKENS = 64
# --gc-freeze: gc.freeze() in the host before each fan-out (ours and the peer's), to show what the
# collector's full passes over the imported modules cost; off by default, as in a user's process
GC_FREEZE = {"on": False}


def prompt_list(n: int) -> list[str]:
    """The prompts of every fan-out (the cell builds the same list in the sandbox)."""
    return [f"chunk {i}: " + "lorem ipsum " * 33 for i in range(n)]


def slow_start_ideal(n: int, latency: float, capacity: int, initial: int = 8, ceiling: int = CEILING) -> float:
    """Earliest finish for n calls by a client that starts at `initial` in flight and doubles
    every round trip: what any client that is not told the provider's capacity can do."""
    rounds, sent, limit = 0, 0, initial
    while sent < n:
        sent += min(limit, capacity, ceiling)
        limit *= 2
        rounds += 1
    return rounds * latency


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


class FakeProvider:
    """benchmarks/fake_provider.py as a child process; ``summary`` after :meth:`stop`."""

    def __init__(self, *options: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(FAKE_PROVIDER), "--latency", str(LATENCY), *options],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        started = json.loads(self.process.stdout.readline())
        self.base_url: str = started["base_url"]
        self.loop: str = started.get("loop", "asyncio")
        self.summary: dict[str, Any] = {}
        self._cpu_mark = 0.0

    def mark_cpu(self) -> None:
        """Start counting the provider process's CPU from now."""
        self._cpu_mark = process_cpu_s(self.process.pid)

    def cpu_since_mark(self) -> float:
        """The provider process's CPU seconds since :meth:`mark_cpu`."""
        return process_cpu_s(self.process.pid) - self._cpu_mark

    async def stop(self) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        line = await anyio.to_thread.run_sync(self.process.stdout.readline)
        self.summary = json.loads(line or "{}")
        await anyio.to_thread.run_sync(self.process.wait, 10)


async def fan_out(provider: FakeProvider, prompts: int, *, lag: bool = True) -> dict[str, Any]:
    """One run whose single cell sends ``prompts`` prompts in one llm_query_many."""
    cell = (
        f"prompts = [f'chunk {{i}}: ' + 'lorem ipsum ' * 33 for i in range({prompts})]\n"
        "answers = llm_query_many(prompts)\n"
        "FINAL(str(sum(a.startswith('answer:') for a in answers)))"
    )
    root = ScriptedModel(lambda r: f"```repl\n{cell}\n```", name="root")
    sub = OpenAIModel("fake-sub", base_url=provider.base_url, timeout=120)
    dispatcher = Dispatcher()  # defaults: the provider's limits are not told
    loop_lag = LoopLag()
    try:
        async with (
            RLM(root=root, sub=sub, dispatcher=dispatcher, sub_max_tokens=SUB_MAX_TOKENS) as rlm,
            anyio.create_task_group() as tg,
        ):
            if lag:
                tg.start_soon(loop_lag.run)
            t0 = time.monotonic()  # the lane's clock
            provider.mark_cpu()
            with GCPauses(freeze=GC_FREEZE["on"]) as gc_pauses:
                cpu_started, wall_started = time.process_time(), time.perf_counter()
                result = await rlm.run("a small document", "fan out")
                ended = time.time()
                wall = time.perf_counter() - wall_started
                cpu = time.process_time() - cpu_started
            server_cpu = provider.cpu_since_mark()
            tg.cancel_scope.cancel()
    finally:
        await sub.aclose()
        await provider.stop()
    subs = [c for c in result.calls if c.model == "fake-sub"]
    # the fan-out itself: from the first sub-call queued to the end of the run (FINAL follows the
    # last answer by a scripted root turn and one cell, a few milliseconds)
    fanout = ended - min(c.started_at for c in subs)
    lane = dispatcher.lane(sub)
    stats = lane.statistics()
    return {
        "prompts": prompts,
        "fanout_s": fanout,
        "run_wall_s": wall,
        "cpu_s": cpu,
        "answered": int(result.answer),
        "lost": prompts - sum(1 for c in subs if c.error is None),
        "attempts": sum(c.attempts for c in subs),
        "refusals_seen": sum(c.throttles for c in subs),
        "max_refusals_one_prompt": max((c.throttles for c in subs), default=0),
        "latency_p50_s": percentile([c.duration for c in subs], 0.5),
        "queue_wait_p95_s": percentile([c.queue_wait for c in subs], 0.95),
        "lane": {"limit": stats.concurrency.limit, "lowest": stats.concurrency.lowest,
                 "decreases": stats.concurrency.decreases, "pauses": stats.concurrency.pauses},
        "limit_history": [(round(t - t0, 4), limit) for t, limit in lane.concurrency.history if t >= t0],
        "loop_lag_p99_ms": percentile(loop_lag.lags, 0.99) * 1000,
        "loop_lag_mean_ms": statistics.mean(loop_lag.lags) * 1000 if loop_lag.lags else 0.0,
        **costs(gc_pauses, server_cpu, provider),
    }


def costs(gc_pauses: GCPauses, server_cpu: float, provider: FakeProvider) -> dict[str, Any]:
    """What a fan-out cost besides its time: the host's GC pauses and the fake provider's CPU."""
    return {
        "host_gc": gc_pauses.report(),
        "gc_line": gc_pauses.line(),
        "server_cpu_s": server_cpu,
        "server_cpu_per_request_us": server_cpu / max(1, provider.summary.get("requests", 0)) * 1e6,
        "server_loop": provider.loop,
        "server": provider.summary,
    }


async def peer_fan_out(provider: FakeProvider, prompts: int, concurrency: int) -> dict[str, Any]:
    """The same prompts from a bare aiohttp client TOLD the provider's capacity: a semaphore of
    ``concurrency`` and one ClientSession (made before the clock starts), no library."""
    url = provider.base_url + "/chat/completions"
    headers = {"Authorization": "Bearer not-needed"}
    gate = anyio.Semaphore(concurrency)
    answers: list[str] = []

    async def one(session: aiohttp.ClientSession, prompt: str) -> None:
        body = {"model": "fake-sub", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": SUB_MAX_TOKENS}
        async with gate, session.post(url, json=body, headers=headers) as response:
            reply = await response.json()
        answers.append(reply["choices"][0]["message"]["content"])

    connector = aiohttp.TCPConnector(limit=concurrency)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
            provider.mark_cpu()
            with GCPauses(freeze=GC_FREEZE["on"]) as gc_pauses:
                cpu_started, started = time.process_time(), time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for prompt in prompt_list(prompts):
                        tg.start_soon(one, session, prompt)
                fanout = time.perf_counter() - started
                cpu = time.process_time() - cpu_started
            server_cpu = provider.cpu_since_mark()
    finally:
        await provider.stop()
    return {
        "client": f"bare aiohttp {aiohttp.__version__}, semaphore {concurrency}, one ClientSession",
        "prompts": prompts,
        "fanout_s": fanout,
        "cpu_s": cpu,
        "host_cpu_per_call_us": cpu / prompts * 1e6,
        "lost": prompts - sum(a.startswith("answer:") for a in answers),
        **costs(gc_pauses, server_cpu, provider),
    }


def add_peer(report: dict[str, Any], peer: dict[str, Any], in_flight: int) -> str:
    """Store the peer in ``report`` (its ratio to the bound, ours to it); the words to print."""
    peer["ratio"] = peer["fanout_s"] / report["bound_s"]
    report["peer"] = peer
    report["ratio_to_peer"] = report["fanout_s"] / peer["fanout_s"]
    return (f" | peer (bare aiohttp, {in_flight} in flight): {peer['fanout_s']:.2f} s -> ratio {peer['ratio']:.2f}, "
            f"ours/peer {report['ratio_to_peer']:.2f}, host CPU/call {peer['host_cpu_per_call_us']:.0f} us, "
            f"fake CPU/req {peer['server_cpu_per_request_us']:.0f} us, host GC {peer['gc_line']}, "
            f"lost {peer['lost']}")


def costs_line(report: dict[str, Any]) -> str:
    """Where our run's time went besides the client: the fake's CPU and the host's GC pauses."""
    return f"    fake CPU/req {report['server_cpu_per_request_us']:.0f} us, host GC {report['gc_line']}"


async def regime_random(prompts: int) -> dict[str, Any]:
    """(a) 20% of requests refused at random with retry-after: 1."""
    retry_after = 1.0
    report = await fan_out(FakeProvider("--throttle", "0.2", "--throttle-retry-after", str(retry_after), "--seed", "7"),
                           prompts)
    work = report["attempts"] * LATENCY / CEILING
    chain = report["max_refusals_one_prompt"] * retry_after + LATENCY
    report["bound_s"] = max(work, chain)
    report["ratio"] = report["fanout_s"] / report["bound_s"]
    report["target"] = "ratio <= 1.5, 0 lost"
    report["ok"] = report["ratio"] <= 1.5 and report["lost"] == 0
    print(f"(a) random 20% refusals, retry-after 1 s: fan-out of {prompts} prompts {report['fanout_s']:.2f} s; "
          f"the refusals allow {report['bound_s']:.2f} s "
          f"(a prompt was refused {report['max_refusals_one_prompt']} times) "
          f"-> ratio {report['ratio']:.2f} (target <= 1.5); lost {report['lost']}; "
          f"limit cuts {report['lane']['decreases']}, pauses {report['lane']['pauses']}")
    print(costs_line(report))
    return report


async def regime_hidden(prompts: int, rpm: int = 600, concurrency: int = 32) -> dict[str, Any]:
    """(b) an RPM and a concurrency limit the client is not told."""
    report = await fan_out(FakeProvider("--rpm", str(rpm), "--max-concurrency", str(concurrency)), prompts)
    server = report["server"]
    report["bound_s"] = windowed_ideal(prompts, rpm, None, 1.0, concurrency, LATENCY)
    report["ratio"] = report["fanout_s"] / report["bound_s"]
    refused = server.get("rate_limited", 0) + server.get("over_concurrency", 0)
    report["refusal_fraction"] = refused / max(1, server.get("requests", 1))
    report["target"] = "ratio <= 1.2, refusals < 5% of requests, 0 lost"
    report["ok"] = report["ratio"] <= 1.2 and report["refusal_fraction"] < 0.05 and report["lost"] == 0
    print(f"(b) hidden limits (rpm {rpm}, {concurrency} in flight): fan-out {report['fanout_s']:.2f} s; "
          f"the limits allow {report['bound_s']:.2f} s -> ratio {report['ratio']:.2f} (target <= 1.2); "
          f"refusals {refused} of "
          f"{server.get('requests')} requests = {report['refusal_fraction']:.1%} (target < 5%; "
          f"{server.get('rate_limited')} for rate, {server.get('over_concurrency')} for concurrency); "
          f"peak in flight at the server {server.get('peak_in_flight')}; lost {report['lost']}")
    print(costs_line(report))
    return report


async def regime_capacity(prompts: int, capacity: int = 256) -> dict[str, Any]:
    """(c) no faults; the provider serves ``capacity`` requests at once."""
    report = await fan_out(FakeProvider("--capacity", str(capacity)), prompts)
    report["bound_s"] = math.ceil(prompts / capacity) * LATENCY
    report["ratio"] = report["fanout_s"] / report["bound_s"]
    report["slow_start_bound_s"] = slow_start_ideal(prompts, LATENCY, capacity)
    report["ratio_to_slow_start_bound"] = report["fanout_s"] / report["slow_start_bound_s"]
    per_call_cpu = report["cpu_s"] / prompts
    report["target"] = "ratio <= 1.1, 0 lost"
    report["ok"] = report["ratio"] <= 1.1 and report["lost"] == 0
    print(f"(c) no faults, capacity {capacity}: fan-out {report['fanout_s']:.2f} s; the provider allows "
          f"{report['bound_s']:.2f} s -> ratio {report['ratio']:.2f} (target <= 1.1); a client told nothing, "
          f"starting at 8 and doubling per round trip, can do {report['slow_start_bound_s']:.2f} s -> ratio "
          f"{report['ratio_to_slow_start_bound']:.2f}; host CPU {per_call_cpu * 1e6:.0f} us per sub-call; "
          f"lost {report['lost']}")
    peer = await peer_fan_out(FakeProvider("--capacity", str(capacity)), prompts, capacity)
    print(costs_line(report) + add_peer(report, peer, capacity))
    return report


async def regime_cpu(prompts: int, capacity: int = 1024) -> dict[str, Any]:
    """A large fan-out with no faults: host CPU per sub-call, all included."""
    report = await fan_out(FakeProvider("--capacity", str(capacity)), prompts, lag=False)
    # context only (this regime has no target): the Dispatcher's default ceiling, not the
    # provider's capacity, sets the pace here, so the bound and the peer use the ceiling
    in_flight = min(capacity, CEILING)
    report["bound_s"] = math.ceil(prompts / in_flight) * LATENCY
    report["ratio"] = report["fanout_s"] / report["bound_s"]
    report["host_cpu_per_call_us"] = report["cpu_s"] / prompts * 1e6
    report["dispatcher_cpu_per_call_us"] = await dispatcher_overhead() * 1e6
    report["dispatcher_cpu_per_call_traced_us"] = await dispatcher_overhead(tracing=True) * 1e6
    report["ok"] = report["lost"] == 0
    print(f"{prompts:,} prompts, no faults: {report['fanout_s']:.1f} s, host CPU "
          f"{report['host_cpu_per_call_us']:.0f} us per sub-call all included (sandbox, Dispatcher, OpenAIModel, "
          f"HTTP); the Dispatcher alone "
          f"{report['dispatcher_cpu_per_call_us']:.0f} us ({report['dispatcher_cpu_per_call_traced_us']:.0f} us "
          f"with SDK tracing); lost {report['lost']}; {in_flight} in flight allow {report['bound_s']:.1f} s -> "
          f"ratio {report['ratio']:.2f}")
    peer = await peer_fan_out(FakeProvider("--capacity", str(capacity)), prompts, in_flight)
    print(costs_line(report) + add_peer(report, peer, in_flight))
    return report


async def dispatcher_overhead(n: int = 5000, *, tracing: bool = False) -> float:
    """CPU seconds per call through the Dispatcher alone (a scripted model that answers at once)."""
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


def plot(results: dict[str, Any], path: Path) -> None:
    """The lane's concurrency limit over time in each regime, as a PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"random": "(a) 20% random refusals, retry-after 1 s", "hidden": "(b) hidden 600 RPM + 32 in flight",
              "capacity": "(c) no faults, capacity 256"}
    shown = [name for name in titles if name in results]
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.6 * len(shown)), squeeze=False)
    for ax, name in zip(axes[:, 0], shown, strict=True):
        result = results[name]
        start = result["run_wall_s"] - result["fanout_s"]  # the first sub-call, after the run's first turn
        history = [(t - start, limit) for t, limit in result["limit_history"] if t >= start]
        times = [0.0] + [t for t, _ in history] + [result["fanout_s"]]
        limits = [8] + [limit for _, limit in history]
        limits.append(limits[-1])
        ax.step(times, limits, where="post")
        ax.set_title(f"{titles[name]}: fan-out {result['fanout_s']:.1f} s, ratio {result['ratio']:.2f}", fontsize=9)
        ax.set_ylabel("limit (calls in flight)")
        ax.set_ylim(bottom=0)
        if name == "hidden":
            ax.axhline(32, color="grey", linestyle=":", linewidth=1)
    axes[-1, 0].set_xlabel("seconds since the fan-out started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


async def main(args: argparse.Namespace) -> dict[str, Any]:
    GC_FREEZE["on"] = args.gc_freeze
    regimes = {"random": regime_random, "hidden": regime_hidden, "capacity": regime_capacity}
    results: dict[str, Any] = {}
    existing = RESULTS / "fanout.json"
    if existing.exists() and args.keep:
        results = json.loads(existing.read_text())
    for name in filter(None, args.regimes.split(",")):
        if name == "cpu":
            results["cpu_10k"] = await regime_cpu(args.cpu_prompts)
        else:
            results[name] = await regimes[name](args.prompts)
    write_result("fanout", results)
    if args.plot:
        plot(results, Path(args.plot))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--regimes", default="random,hidden,capacity,cpu")
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--cpu-prompts", type=int, default=10_000)
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() in the host before each fan-out (not the default: shows the GC's cost)")
    parser.add_argument("--keep", action="store_true", help="update fanout.json instead of replacing it")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw the limit over time, e.g. docs/fanout.png")
    anyio.run(main, parser.parse_args())
