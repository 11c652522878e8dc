"""Beyond one process: 1, 2 and 4 replicas on one Redis-shared lane, and a Ray batch.

    .venv/bin/python benchmarks/scale.py [--window 5] [--rpm 100] [--calls 300] [--ray-runs 200]

Needs redis-server (scripts/setup/test-redis.sh) and, for the Ray part, the ``ray`` extra.
The fake provider runs in its own process and enforces the limits itself; each replica is a
process of its own (tests/redis_worker.py). Prints, per replica count:

- **limit-bound**: the lane allows ``rpm`` requests per ``window`` seconds, shared by every
  replica; achieved throughput against that limit, and the provider's 429s (must be 0);
- **unbound** (limits far away; four callers per replica, each one call at a time): host CPU per
  call with the lane in Redis against the in-memory lane, the Redis server's own CPU per call,
  and p50/p99 admission latency (from asking for a slot to getting it, a slot being free);

and for Ray: a batch of short runs (the provider plays root and sub-model: two calls a run)
through warm actors, runs per second against the bound the provider's RPM allows.
Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, percentile, write_result

from tests.redis_server import RedisServer

FAKE_PROVIDER = Path(__file__).with_name("fake_provider.py")
WORKER = ROOT / "tests" / "redis_worker.py"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Provider:
    """benchmarks/fake_provider.py in its own process."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, str(FAKE_PROVIDER), *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.process.stdout is not None
        self.base_url = json.loads(self.process.stdout.readline())["base_url"]

    def close(self) -> dict[str, Any]:
        out, _ = self.process.communicate("", timeout=60)
        summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return summary


async def replicas(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [await asyncio.create_subprocess_exec(sys.executable, str(WORKER), json.dumps(s), env=env,
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
             for s in specs]
    for p in procs:
        assert p.stdout is not None
        await p.stdout.readline()  # ready
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    results = []
    for p in procs:
        assert p.stdout is not None
        results.append(json.loads(await p.stdout.readline()))
        await p.wait()
    return results


def bound_phase(redis: RedisServer, n: int, args: argparse.Namespace) -> dict[str, Any]:
    provider = Provider("--latency", "0.1", "--rpm", str(args.rpm), "--window", str(args.window))
    limits = {"rpm": args.rpm, "max_concurrency": 32, "window": args.window}
    specs = [{"url": redis.url, "base_url": provider.base_url, "name": f"bound{n}-{i}", "prompts": args.calls // n,
              "limits": limits, "namespace": f"bound{n}"} for i in range(n)]
    started = time.perf_counter()
    results = asyncio.run(replicas(specs))
    elapsed = time.perf_counter() - started
    summary = provider.close()
    calls = sum(len(r["answers"]) for r in results)
    lost = sum(1 for r in results for a in r["answers"] if not a)
    # the margin makes the lane's window a little longer than the provider's: the bound is ours
    effective_window = args.window + max(args.window * 0.01, 0.5)  # SharedConfig.window_margin
    limit_rate = args.rpm / effective_window
    # the first rpm calls go at once, then one window's worth per window, the last answered 0.1 s later
    ideal = (calls - 1) // args.rpm * effective_window + 0.1
    worst = max(r["elapsed"] for r in results)
    return {"replicas": n, "calls": calls, "lost": lost, "rate_limited": summary["rate_limited"],
            "max_requests_in_window": summary["max_requests_in_window"], "limit_per_window": args.rpm,
            "elapsed_s": round(worst, 2), "ideal_s": round(ideal, 2), "ratio_to_ideal": round(worst / ideal, 3),
            "throughput_per_s": round(calls / worst, 2), "bound_per_s": round(calls / ideal, 2),
            "lane_limit_per_s": round(limit_rate, 2), "wall_s": round(elapsed, 2)}


def unbound_phase(redis: RedisServer | None, n: int, calls: int) -> dict[str, Any]:
    provider = Provider("--latency", "0.05")
    limits = {"max_concurrency": 64, "initial_concurrency": 64, "window": 60.0}
    specs = [{"url": redis.url if redis else None, "base_url": provider.base_url, "name": f"free{n}-{i}",
              "prompts": calls // n, "limits": limits, "namespace": f"free{n}-{time.time()}", "tasks": 4}
             for i in range(n)]
    redis_cpu = cpu_seconds(redis.process.pid) if redis and redis.process else 0.0
    results = asyncio.run(replicas(specs))
    redis_cpu = (cpu_seconds(redis.process.pid) - redis_cpu) if redis and redis.process else 0.0
    provider.close()
    done = sum(len(r["answers"]) for r in results)
    waits = [w for r in results for w in r["queue_waits"]]
    return {"replicas": n, "backend": "redis" if redis else "memory", "calls": done,
            "host_cpu_per_call_ms": round(1000 * sum(r["cpu"] for r in results) / done, 3),
            "redis_cpu_per_call_ms": round(1000 * redis_cpu / done, 3),
            "admission_p50_ms": round(1000 * percentile(waits, 0.5), 3),
            "admission_p99_ms": round(1000 * percentile(waits, 0.99), 3),
            "elapsed_s": round(max(r["elapsed"] for r in results), 2)}


def ray_phase(redis: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    import anyio
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray process on 127.0.0.1
    import ray

    from rlmflow._batch_cli import build_rlm
    from rlmflow.ray import BatchItem, BatchPolicy, RayBatch

    with tempfile.TemporaryDirectory() as tmp:
        reply = Path(tmp) / "root.txt"
        reply.write_text("```repl\nFINAL(llm_query(context))\n```", encoding="utf-8")
        window = args.window
        provider = Provider("--latency", "0.05", "--rpm", str(args.ray_rpm), "--window", str(window),
                            "--root-marker", "QUESTION-", "--root-reply", str(reply))
        policy_file = Path(tmp) / "policy.toml"
        policy_file.write_text(f'[lanes.openai]\nrpm = {args.ray_rpm}\nwindow = {window}\nmax_concurrency = 64\n'
                               f'[shared]\nurl = "{redis.url}"\nnamespace = "ray"\n', encoding="utf-8")
        items = [BatchItem(f"r{k}", f"QUESTION-{k}", context=f"doc{k}") for k in range(args.ray_runs)]
        factory = functools.partial(build_rlm, f"openai:fake@{provider.base_url}", None, str(policy_file), None, 2)
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=100 * 1024 * 1024,
                 logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        try:
            async def go() -> tuple[float, int, int, float]:
                async with RayBatch(factory, policy=BatchPolicy(actors=2, runs_per_actor=args.ray_concurrency)) as b:
                    await b.pids()  # actors up and warm before the clock starts
                    started = time.perf_counter()
                    outcomes = await b.run(items)
                    took = time.perf_counter() - started
                answered = sum(1 for o in outcomes if o.answer)
                retried = sum(1 for o in outcomes if o.attempts > 1)
                return took, answered, retried, started

            took, answered, retried, _ = anyio.run(go)
        finally:
            ray.shutdown()
        summary = provider.close()
    calls = 2 * args.ray_runs
    effective_window = window + max(window * 0.01, 0.5)
    bound_s = (calls - 1) // args.ray_rpm * effective_window
    return {"runs": args.ray_runs, "answered": answered, "retried": retried, "elapsed_s": round(took, 2),
            "runs_per_s": round(args.ray_runs / took, 2),
            "provider_bound_runs_per_s": round(args.ray_runs / bound_s, 2) if bound_s else None,
            "ratio_to_bound": round(took / bound_s, 3) if bound_s else None,
            "rate_limited": summary["rate_limited"], "max_requests_in_window": summary["max_requests_in_window"],
            "rpm_per_window": args.ray_rpm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=5.0, help="the lane's window (s), short to keep it quick")
    parser.add_argument("--rpm", type=int, default=100, help="requests per window, shared by all replicas")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--unbound-calls", type=int, default=800)
    parser.add_argument("--ray-runs", type=int, default=200)
    parser.add_argument("--ray-rpm", type=int, default=60)
    parser.add_argument("--ray-concurrency", type=int, default=8)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    redis = RedisServer()
    redis.start()
    result: dict[str, Any] = {"args": vars(args), "bound": [], "unbound": []}
    try:
        baseline = unbound_phase(None, 1, args.unbound_calls)
        result["unbound"].append(baseline)
        print(f"in memory, 1 process: {baseline['host_cpu_per_call_ms']} ms CPU/call, admission p99 "
              f"{baseline['admission_p99_ms']} ms")
        for n in (1, 2, 4):
            row = unbound_phase(redis, n, args.unbound_calls)
            row["added_cpu_per_call_ms"] = round(row["host_cpu_per_call_ms"] - baseline["host_cpu_per_call_ms"], 3)
            result["unbound"].append(row)
            print(f"redis, {n} replica(s): {row['host_cpu_per_call_ms']} ms CPU/call "
                  f"(+{row['added_cpu_per_call_ms']} vs memory; redis-server {row['redis_cpu_per_call_ms']} ms), "
                  f"admission p50 {row['admission_p50_ms']} ms, p99 {row['admission_p99_ms']} ms")
        for n in (1, 2, 4):
            row = bound_phase(redis, n, args)
            result["bound"].append(row)
            print(f"limit-bound, {n} replica(s): {row['calls']} calls in {row['elapsed_s']} s (ideal "
                  f"{row['ideal_s']} s, ratio {row['ratio_to_ideal']}); {row['throughput_per_s']}/s against a "
                  f"bound of {row['bound_per_s']}/s; 429s {row['rate_limited']}; max in a provider window "
                  f"{row['max_requests_in_window']}/{row['limit_per_window']}; lost {row['lost']}")
        if not args.skip_ray:
            row = ray_phase(redis, args)
            result["ray"] = row
            print(f"ray batch: {row['answered']}/{row['runs']} answered in {row['elapsed_s']} s = "
                  f"{row['runs_per_s']} runs/s against a provider bound of {row['provider_bound_runs_per_s']} "
                  f"runs/s (ratio {row['ratio_to_bound']}); 429s {row['rate_limited']}; retried {row['retried']}")
    finally:
        redis.close()
    write_result("scale", result)


if __name__ == "__main__":
    main()
