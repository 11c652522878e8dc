"""The fake OpenAI-compatible provider as a process of its own, for benchmarks.

    python benchmarks/fake_provider.py --latency 0.2 --rpm 600 --tpm 400000

Prints its base URL as one JSON line; when its stdin closes, prints a JSON summary of what it
admitted and refused, and exits. Binds to 127.0.0.1 only. ``--max-concurrency`` refuses (429)
requests beyond that many in flight without telling the client the limit; ``--capacity`` serves
that many at once and queues the rest; ``--throttle`` refuses that fraction of requests at
random with ``retry-after: --throttle-retry-after``.

Being a process of the benchmark and not the library, it runs on uvloop when that is installed
(``--loop asyncio`` to keep the standard loop) and freezes the garbage collector's view of what
exists once it listens (``gc.freeze()``), so the collector's full passes skip the imported
modules: both cut its CPU per request (about 20% together, measured at 1,000 and 10,000 requests),
and so what it takes from a two-core machine the client shares.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import _common  # noqa: F401  (puts the repository root on sys.path, for tests.fakes)

from tests.fakes import FakeOpenAIServer, FaultPlan


async def serve(args: argparse.Namespace, root_reply: str, loop_name: str) -> None:
    server = FakeOpenAIServer(
        latency=args.latency, latency_jitter=args.jitter, rpm=args.rpm, tpm=args.tpm, window=args.window,
        port=args.port, root_marker=args.root_marker, root_reply=root_reply, seed=args.seed,
        faults=FaultPlan(throttle=args.throttle, throttle_retry_after=args.throttle_retry_after),
        max_concurrency=args.max_concurrency, concurrency_retry_after=args.concurrency_retry_after,
        capacity=args.capacity, rate_headers=args.rate_headers,
    )
    async with server:
        gc.freeze()  # what exists now lives as long as the process: no full collection need scan it
        print(json.dumps({"base_url": server.base_url, "loop": loop_name}), flush=True)
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
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                        help="the event loop: uvloop when installed (auto), or the one named")
    args = parser.parse_args()
    root_reply = ""
    if args.root_reply:
        with open(args.root_reply, encoding="utf-8") as fh:
            root_reply = fh.read()
    run, loop_name = event_loop(args.loop)
    run(serve(args, root_reply, loop_name))


def event_loop(choice: str) -> tuple[Callable[[Coroutine[Any, Any, None]], None], str]:
    """How to run the server (``asyncio.run`` or ``uvloop.run``) and that loop's name."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.run, "uvloop"
    return asyncio.run, "asyncio"


if __name__ == "__main__":
    main()
