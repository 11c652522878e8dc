"""``rlmflow batch``: many questions from a JSONL file, on a Ray cluster or in this process.

Application code (part of the CLI): it prints progress and writes a results file.

Each input line is ``{"id": ..., "query": ..., "context": "..."}`` or ``{"id": ..., "query": ...,
"paths": ["doc.txt", ...]}`` (``id`` defaults to the line number). Each output line holds the id,
the answer or the error, the attempts, turns, tokens, cost and duration. With ``--ray ADDRESS``
(``local`` starts a Ray instance here) the runs go to warm actors; ``--shared redis://...`` or a
policy file's ``[shared]`` table makes every actor share the lanes' limits.

``--sandbox`` (as on ``rlmflow run`` and ``rlmflow eval``; rlmflow.sandbox.choice) chooses where the root's code runs:
``local`` (the default) or ``agentcore[:IDENTIFIER][@REGION]``, the AgentCore Code Interpreter; without
it, a policy file's ``[sandbox]`` table chooses.
botocore's standard endpoint variables (``AWS_ENDPOINT_URL_BEDROCK_AGENTCORE``,
``AWS_ENDPOINT_URL_BEDROCK_RUNTIME``) point the sandbox and Bedrock models elsewhere (a local fake).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import anyio

from ._exceptions import ConfigurationError, InternalError, RLMError
from .dispatch.dispatcher import Dispatcher
from .dispatch.policy import load_policy
from .engine import RLM
from .models.registry import DEFAULT_MODEL
from .ray import BatchEvent, BatchItem, BatchPolicy, BatchResult, RayBatch
from .sandbox.choice import add_sandbox_argument, build_sandbox, chosen_sandbox

__all__ = ["add_batch_parser", "batch_main"]

def add_batch_parser(commands: Any) -> None:
    """Add the ``batch`` subcommand to the CLI's subparsers."""
    batch = commands.add_parser("batch", help="answer many questions from a JSONL file (optionally on Ray)")
    batch.add_argument("--input", required=True, metavar="JSONL", help='lines of {"id", "query", "context"|"paths"}')
    batch.add_argument("--output", metavar="JSONL", help="write one result line per item (default: stdout)")
    batch.add_argument("--ray", metavar="ADDRESS", help='Ray cluster address ("auto", "ray://host:10001"; '
                       '"local" starts one here); without it the runs share this process')
    batch.add_argument("--root", default=DEFAULT_MODEL, help=f"root model (default {DEFAULT_MODEL})")
    batch.add_argument("--sub", default=None, help="sub-call model (default: the root model)")
    batch.add_argument("--policy", metavar="TOML", help="a policy file (lanes, retry, [shared], [sandbox])")
    batch.add_argument("--shared", metavar="URL", help="keep lanes in Redis, shared by every worker (redis://...)")
    batch.add_argument("--actors", type=int, default=2, help="Ray actors (each keeps a warm RLM)")
    batch.add_argument("--runs-per-actor", type=int, default=4, help="runs in flight per actor (or in this process)")
    batch.add_argument("--max-attempts", type=int, default=3, help="tries per item (a dead worker is retried)")
    batch.add_argument("--max-turns", type=int, default=12)
    add_sandbox_argument(batch)
    batch.add_argument("-v", "--verbose", action="store_true", help="log rlmflow's records to stderr")


def read_items(path: str) -> list[BatchItem]:
    """The items of a JSONL file; a malformed line is a :class:`ConfigurationError` naming it."""
    items: list[BatchItem] = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    seen: dict[str, int] = {}  # id -> its line: results are matched to items by id
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            items.append(BatchItem(str(row.get("id", number)), str(row["query"]), context=row.get("context"),
                                   paths=row.get("paths")))
        except (ValueError, KeyError, TypeError, AttributeError, ConfigurationError) as exc:
            raise ConfigurationError(f"{path}:{number}: {exc}") from exc
        first = seen.setdefault(items[-1].id, number)
        if first != number:
            raise ConfigurationError(
                f"{path}:{number}: duplicate id {items[-1].id!r} (line {first} has it too): each item needs an "
                "id of its own, since results are matched to items by id"
            )
    if not items:
        raise ConfigurationError(f"{path} holds no items")
    return items


def build_rlm(root: str, sub: str | None, policy: str | None, shared: str | None, max_turns: int,
              sandbox: str = "local") -> RLM:
    """The RLM of one worker (pickled by reference into each Ray actor; ``sandbox`` is a
    ``--sandbox`` string, built in the worker)."""
    options: dict[str, Any] = {"shared": shared} if shared else {}
    dispatcher = Dispatcher.from_policy(policy, **options) if policy else Dispatcher(**options)
    rlm = RLM(root=root, sub=sub, dispatcher=dispatcher, max_turns=max_turns, sandbox=build_sandbox(sandbox))
    if policy:
        dispatcher.check_limits_used([rlm.root, *rlm.sub_models.values()], source=f"the policy {policy}")
    return rlm


def _row(outcome: BatchResult) -> dict[str, Any]:
    row: dict[str, Any] = {"id": outcome.id, "attempts": outcome.attempts}
    if outcome.result is not None:
        usage = outcome.result.total_usage
        row.update(answer=outcome.result.answer, turns=outcome.result.turns, input_tokens=usage.input_tokens,
                   output_tokens=usage.output_tokens, cost_usd=outcome.result.cost_usd,
                   duration_s=round(outcome.result.duration, 3))
    else:
        error = outcome.error
        row["error"] = f"{type(error).__name__}: {error}" if error is not None else "unknown"
    return row


def _internal(failure: Exception) -> InternalError:
    error = InternalError(f"{type(failure).__name__}: {str(failure)[:300]}")
    error.__cause__ = failure
    return error


async def _in_process(rlm: RLM, items: list[BatchItem], concurrency: int,
                      attempts: int) -> AsyncIterator[BatchEvent]:
    """The same events as :meth:`RayBatch.stream`, for runs in this process."""
    send, receive = anyio.create_memory_object_stream[BatchEvent](max_buffer_size=len(items) * 3)
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(item: BatchItem) -> None:
        async with limiter:
            for attempt in range(1, attempts + 1):
                await send.send(BatchEvent("submitted", item.id, attempt))
                try:
                    context = item.context if item.context is not None else (
                        await anyio.to_thread.run_sync(_load, list(item.paths or ())))
                    result = await rlm.run(context, item.query)
                except Exception as failure:  # one item's failure, whatever it is, never ends the batch
                    exc = failure if isinstance(failure, RLMError) else _internal(failure)
                    if attempt < attempts and isinstance(exc, BatchPolicy().retry_on):
                        await send.send(BatchEvent("retrying", item.id, attempt, detail=str(exc)))
                        continue
                    outcome = BatchResult(item.id, attempt, error=exc)
                    await send.send(BatchEvent("failed", item.id, attempt, detail=str(exc), outcome=outcome))
                    return
                outcome = BatchResult(item.id, attempt, result=result)
                await send.send(BatchEvent("done", item.id, attempt, outcome=outcome))
                return

    async def run_all() -> None:
        async with send, anyio.create_task_group() as tg:
            for item in items:
                tg.start_soon(one, item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_all)
        async with receive:
            async for event in receive:
                yield event


def _load(paths: list[str]) -> Any:
    from .context import load_context_files

    return load_context_files(paths).context


class _Progress:
    """A rich progress bar on a terminal (the ``cli`` extra), a line per finished item otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.finished, self.failed = total, stream, 0, 0
        self._bar: Any = None
        if getattr(stream, "isatty", lambda: False)():
            try:
                from rich.console import Console
                from rich.progress import Progress

                self._bar = Progress(console=Console(file=stream), transient=False)
                self._task = self._bar.add_task("runs", total=total)
            except ImportError:
                self._bar = None

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc_info)

    def update(self, event: BatchEvent) -> None:
        if event.kind in ("done", "failed"):
            self.finished += 1
            self.failed += event.kind == "failed"
            if self._bar is not None:
                self._bar.update(self._task, completed=self.finished,
                                 description=f"runs ({self.failed} failed)" if self.failed else "runs")
            else:
                print(f"[{self.finished}/{self.total}] {event.id}: {event.kind} (attempt {event.attempt})",
                      file=self.stream, flush=True)
        elif event.kind == "retrying" and self._bar is None:
            print(f"retrying {event.id} (attempt {event.attempt} failed: {event.detail[:120]})", file=self.stream)


async def _batch(args: argparse.Namespace, items: list[BatchItem], out: TextIO) -> int:
    # the sandbox is chosen here, once: the flag, else the policy file's [sandbox], else local
    policy_file = load_policy(args.policy) if args.policy else None
    sandbox = chosen_sandbox(args.sandbox, policy_file.sandbox if policy_file is not None else None)
    factory = functools.partial(build_rlm, args.root, args.sub, args.policy, args.shared, args.max_turns, sandbox)
    failed = 0
    with _Progress(len(items), sys.stderr) as progress:
        if args.ray:
            policy = BatchPolicy(actors=args.actors, runs_per_actor=args.runs_per_actor,
                                 max_attempts=args.max_attempts)
            address = None if args.ray == "local" else args.ray
            local: dict[str, object] = {}
            if address is None:  # a local instance talks over loopback only (the CLI is the application)
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
                local = {"_node_ip_address": "127.0.0.1", "include_dashboard": False}
            async with RayBatch(factory, policy=policy, address=address, init_options=local) as batch:
                async for event in batch.stream(items):
                    progress.update(event)
                    if event.outcome is not None:
                        failed += event.kind == "failed"
                        print(json.dumps(_row(event.outcome), ensure_ascii=False), file=out, flush=True)
        else:
            rlm = factory()
            try:
                async for event in _in_process(rlm, items, args.runs_per_actor, args.max_attempts):
                    progress.update(event)
                    if event.outcome is not None:
                        failed += event.kind == "failed"
                        print(json.dumps(_row(event.outcome), ensure_ascii=False), file=out, flush=True)
            finally:
                await rlm.aclose()
                await rlm.dispatcher.aclose()
    print(f"{len(items) - failed} of {len(items)} answered", file=sys.stderr)
    return 0 if failed == 0 else 1


def batch_main(args: argparse.Namespace) -> int:
    """Run ``rlmflow batch``; exit 0 when every item was answered, 1 when some failed, 2 on bad input."""
    if args.verbose:  # only rlmflow's own logger
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("rlmflow").addHandler(handler)
        logging.getLogger("rlmflow").setLevel(logging.INFO)
    try:
        items = read_items(args.input)
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(args.output, "w", encoding="utf-8")) if args.output else sys.stdout
            return anyio.run(_batch, args, items, out)
    except ConfigurationError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
