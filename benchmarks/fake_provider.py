"""The fake OpenAI-compatible provider as a process of its own, for benchmarks.

    python benchmarks/fake_provider.py --latency 0.2 --rpm 600 --tpm 400000

Prints its base URL as one JSON line; when its stdin closes, prints a JSON summary of what it
admitted and refused, and exits. Binds to 127.0.0.1 only. ``--max-concurrency`` refuses (429)
requests beyond that many in flight without telling the client the limit; ``--capacity`` serves
that many at once and queues the rest; ``--throttle`` refuses that fraction of requests at
random with ``retry-after: --throttle-retry-after``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from rlmflow.testing import FakeOpenAIServer, FaultPlan


async def serve(args: argparse.Namespace, root_reply: str) -> None:
    server = FakeOpenAIServer(
        latency=args.latency, latency_jitter=args.jitter, rpm=args.rpm, tpm=args.tpm, window=args.window,
        port=args.port, root_marker=args.root_marker, root_reply=root_reply, seed=args.seed,
        faults=FaultPlan(throttle=args.throttle, throttle_retry_after=args.throttle_retry_after),
        max_concurrency=args.max_concurrency, concurrency_retry_after=args.concurrency_retry_after,
        capacity=args.capacity, rate_headers=args.rate_headers,
    )
    async with server:
        print(json.dumps({"base_url": server.base_url}), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)  # the parent closed stdin
        await stop.wait()
        print(json.dumps(server.summary()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--rpm", type=int, default=None)
    parser.add_argument("--tpm", type=int, default=None)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--throttle", type=float, default=0.0, help="fraction of requests refused at random")
    parser.add_argument("--throttle-retry-after", type=float, default=1.0)
    parser.add_argument("--max-concurrency", type=int, default=None, help="hidden limit of requests in flight")
    parser.add_argument("--concurrency-retry-after", type=float, default=1.0)
    parser.add_argument("--capacity", type=int, default=None, help="requests served at once; the rest queue")
    parser.add_argument("--rate-headers", action="store_true", help="send x-ratelimit-* headers")
    parser.add_argument("--root-marker", default=None, help="requests containing it get --root-reply")
    parser.add_argument("--root-reply", default=None, metavar="FILE", help="the scripted root reply")
    args = parser.parse_args()
    root_reply = ""
    if args.root_reply:
        with open(args.root_reply, encoding="utf-8") as fh:
            root_reply = fh.read()
    asyncio.run(serve(args, root_reply))


if __name__ == "__main__":
    main()
