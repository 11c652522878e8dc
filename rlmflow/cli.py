"""``rlmflow run`` answers a question over files; ``rlmflow trace`` reports on a recorded run.

This module is an application, not library code: it configures logging and prints.

Exit codes: 0 answered; 1 no answer (turns ran out or a loop); 2 bad arguments or configuration;
3 unusable context; 4 budget exhausted; 5 model failure; 6 sandbox failure; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from . import __version__
from ._batch_cli import add_batch_parser, batch_main
from ._exceptions import (
    BudgetExceededError,
    ConfigurationError,
    ContextError,
    ModelError,
    NoAnswerError,
    RLMError,
    SandboxError,
)
from ._text import sanitize_text
from ._util import single_exception
from .context import load_context_files
from .dispatch.budget import Budget
from .dispatch.dispatcher import Dispatcher
from .dispatch.policy import load_policy
from .durable.choice import chosen_cache, owned_cache
from .engine import RLM, RLMResult, RunProgress
from .eval.cli import add_eval_parser, eval_main
from .events import RunEvent, RunStarted
from .models.registry import DEFAULT_MODEL
from .sandbox.choice import add_sandbox_argument, build_sandbox, chosen_sandbox
from .telemetry.export import Export, ExportConfigurationError, export_from_environment
from .telemetry.html import render_html
from .telemetry.phoenix import PhoenixError, load_phoenix_trace
from .telemetry.report import TraceData, analyse, format_text, load_trace
from .telemetry.trajectory import Trajectory

EXIT_CODES: list[tuple[type[RLMError], int]] = [
    (NoAnswerError, 1),
    (ConfigurationError, 2),
    (ContextError, 3),
    (BudgetExceededError, 4),
    (ModelError, 5),
    (SandboxError, 6),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlmflow", description="Recursive Language Models on asyncio.")
    parser.add_argument("--version", action="version", version=f"rlmflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="answer a question over one or more documents")
    run.add_argument("--context", nargs="+", required=True, metavar="PATH", help="document file(s)")
    run.add_argument("--query", required=True, help="the question")
    run.add_argument("--root", default=DEFAULT_MODEL, help=(
        f"root model (default {DEFAULT_MODEL}): local:<name>, openai:<model>[@url], anthropic:<model>, "
        "bedrock:<model-id>[@region], or strands:bedrock:<model-id>[@region] for a Strands Agent root "
        "(docs/providers.md)"))
    run.add_argument("--sub", default=None, help="sub-call model (default: the root model)")
    run.add_argument("--max-turns", type=int, default=12)
    run.add_argument("--max-depth", type=int, default=1)
    run.add_argument("--max-calls", type=int, default=None, help="budget: most model calls")
    run.add_argument("--max-cost", type=float, default=None, metavar="USD",
                     help="budget: most US dollars the run may spend (the models' prices must be known)")
    run.add_argument("--policy", metavar="TOML",
                     help="a policy file: lanes, retry, [shared], [sandbox] (docs/policies.md)")
    run.add_argument("--deadline", type=float, default=None, help="budget: seconds for the whole run")
    run.add_argument("--cell-timeout", type=float, default=120.0, help="seconds of compute per cell")
    add_sandbox_argument(run)
    run.add_argument("--isolation", choices=("auto", "strict", "none"), default="auto",
                     help="the local sandbox's isolation: the strongest available (auto), refuse to run "
                     "unconfined (strict), or none; -v prints what held")
    run.add_argument("--show-transcript", action="store_true", help="print every turn's code and output")
    run.add_argument("--trajectory", metavar="PATH", help="record the run as JSONL (read it with rlmflow trace)")
    run.add_argument("--journal", metavar="PATH",
                     help="record the run in this journal (an SQLite file, or a redis:// URL shared by replicas), "
                     "so it can be resumed (docs/durability.md)")
    run.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_ID",
                     help="continue the latest run of --journal that has no answer (or RUN_ID), paying nothing twice")
    run.add_argument("--replay", metavar="PATH",
                     help="answer every model call from this journal and send nothing (offline, deterministic)")
    run.add_argument("--cache", metavar="PATH",
                     help="answer requests asked before from this sub-call cache (an SQLite file, or a redis:// "
                     "URL shared by replicas), and keep new answers there; overrides the policy's [cache] "
                     "(docs/durability.md)")
    run.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                     help="ask Bedrock and Anthropic for no prompt caching (on by default; docs/caching.md)")
    run.add_argument("-v", "--verbose", action="store_true", help="log rlmflow's records to stderr")
    run.add_argument(
        "--capture-content", type=int, metavar="N", default=None,
        help="write prompts, replies, code and outputs into spans, each cut to N characters "
        f"(default ${CAPTURE_ENV} or 0: sizes and hashes only)",
    )
    add_batch_parser(commands)  # rlmflow batch (rlmflow/_batch_cli.py)
    trace_cmd = commands.add_parser(
        "trace", help="report on a recorded run (trajectory JSONL, OTLP-JSON spans, or a Phoenix project)"
    )
    trace_cmd.add_argument(
        "file", nargs="?", help="a trajectory written with --trajectory, or an OTLP JSON span export "
        "(a collector's camelCase JSON or Phoenix's snake_case export)"
    )
    trace_cmd.add_argument("--phoenix", metavar="URL", help="read the run from a Phoenix server (e.g. http://127.0.0.1:6006)")
    trace_cmd.add_argument("--project", default="rlmflow", help="the Phoenix project (default rlmflow)")
    trace_cmd.add_argument("--trace-id", help="the trace to read from Phoenix (default: its newest rlmflow run)")
    trace_cmd.add_argument("--html", metavar="PATH", help="also write a self-contained page with a timeline")
    trace_cmd.add_argument("--json", action="store_true", help="print the analysis as JSON")
    add_eval_parser(commands)
    return parser


CAPTURE_ENV = "RLMFLOW_CAPTURE_CONTENT"


def _capture_limit(option: int | None) -> int:
    """Characters of content to capture: the option, else the environment variable, else 0."""
    if option is None:
        raw = os.environ.get(CAPTURE_ENV, "").strip() or "0"
        try:
            option = int(raw)
        except ValueError:
            raise ValueError(f"${CAPTURE_ENV}={raw!r} is not a whole number") from None
    if option < 0:
        raise ValueError("--capture-content must be >= 0 (0: sizes and hashes only)")
    return option


class _Display:
    """Live progress: a redrawn status line on a terminal, a line per change otherwise."""

    def __init__(self, progress: RunProgress, stream: Any) -> None:
        self._progress = progress
        self._stream = stream
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._last = ""
        self._live: Any = None

    def _status(self) -> str:
        p = self._progress
        cost = f"${p.cost_usd:.4f}" if p.cost_usd else "$0"
        # the root's reply as it streams in: on a terminal only (a log would get a line per piece)
        streaming = self._tty and p.root_chars and "thinking" in p.phase
        phase = f"{p.phase} ({p.root_chars:,} chars)" if streaming else p.phase
        return (
            f"turn {p.turn}/{p.max_turns} | {phase} | sub-calls {p.calls_done} done, "
            f"{p.calls_in_flight} in flight | tokens {p.input_tokens:,} in / {p.output_tokens:,} out | "
            f"{cost} | {p.elapsed:5.1f}s"
        )

    def __enter__(self) -> _Display:
        if self._tty:
            try:
                from rich.console import Console
                from rich.live import Live
                from rich.text import Text

                self._text = Text
                self._live = Live(
                    Text(self._status()), console=Console(file=self._stream), refresh_per_second=4, transient=True
                )
                self._live.__enter__()
            except ImportError:
                self._live = None
        return self

    def refresh(self) -> None:
        status = self._status()
        if self._live is not None:
            self._live.update(self._text(status))
            return
        key = status.rsplit("|", 1)[0]  # a plain line only when something but the clock changed
        if key != self._last:
            self._last = key
            print(status, file=self._stream, flush=True)

    def __exit__(self, *exc_info: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)


def _print_summary(result: RLMResult, show_transcript: bool) -> None:
    if show_transcript:
        for turn in result.transcript:
            print(f"\n--- turn {turn.index} ({turn.duration:.1f}s) ---", file=sys.stderr)
            for block in turn.code:  # the root's code may echo what the document planted
                print("```repl\n" + sanitize_text(block) + "\n```", file=sys.stderr)
            print(turn.feedback, file=sys.stderr)
    print(result.answer)
    usage = ", ".join(
        f"{model}: {u.calls} calls, {u.input_tokens:,} in / {u.output_tokens:,} out"
        for model, u in result.usage.items()
    )
    cost = "unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    print(f"[{result.turns} turns, {result.duration:.1f}s, cost {cost}; {usage}]", file=sys.stderr)


async def _run(args: argparse.Namespace) -> int:
    loaded = await anyio.to_thread.run_sync(load_context_files, args.context)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    budget = Budget(max_calls=args.max_calls, max_cost_usd=args.max_cost, deadline=args.deadline)
    progress = RunProgress()
    export: Export = args.export
    try:
        return await _answer(args, loaded.context, budget, progress, export.tracer_provider, export.meter_provider)
    finally:
        await anyio.to_thread.run_sync(export.shutdown)  # flushes the exporters


async def _answer(
    args: argparse.Namespace, context: Any, budget: Budget, progress: RunProgress, tracer_provider: Any,
    meter_provider: Any,
) -> int:
    policy = load_policy(args.policy) if args.policy else None
    dispatcher = (
        Dispatcher.from_policy(policy, tracer_provider=tracer_provider, meter_provider=meter_provider)
        if policy is not None else None
    )
    sandbox = chosen_sandbox(args.sandbox, policy.sandbox if policy is not None else None)
    if args.resume is not None and not args.journal:
        raise ConfigurationError("--resume continues a run of a journal: give --journal PATH too")
    if args.replay and args.journal:
        raise ConfigurationError("--replay answers from a journal and records nothing: drop --journal")

    def announce(event: RunEvent) -> None:  # so an operator can find the run to resume
        if isinstance(event, RunStarted) and event.depth == 0 and rlm.journal is not None:
            print(f"run {event.run_id}, journal {rlm.journal.where} (continue it with --resume {event.run_id})",
                  file=sys.stderr)

    async with owned_cache(chosen_cache(args.cache, policy)) as cache, RLM(
        root=args.root,
        sub=args.sub,
        dispatcher=dispatcher,
        journal=args.journal,
        replay=args.replay,
        cache=cache,
        prompt_cache=args.prompt_cache,
        max_turns=args.max_turns,
        max_depth=args.max_depth,
        budget=budget,
        sandbox=build_sandbox(sandbox, cell_timeout=args.cell_timeout, isolation=args.isolation),
        trajectory=Trajectory(args.trajectory) if args.trajectory else None,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        capture_content=args.capture_content,
    ) as rlm:
        models = [rlm.root, *rlm.sub_models.values()]
        if dispatcher is not None:
            dispatcher.check_limits_used(models, source=f"the policy {args.policy}")
        for model in models:  # a cost cap needs every price before anything is sent
            rlm.dispatcher.check_budget(model, budget)
        with _Display(progress, sys.stderr) as display:
            result: RLMResult | None = None

            async def refresher() -> None:
                while True:
                    display.refresh()
                    await anyio.sleep(0.25)

            with single_exception():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(refresher)
                    try:
                        if args.resume is not None:
                            result = await rlm.resume(context, args.resume or None, budget=budget,
                                                      progress=progress, events=announce)
                        else:
                            result = await rlm.run(context, args.query, progress=progress, events=announce)
                    finally:
                        tg.cancel_scope.cancel()
            display.refresh()
    assert result is not None
    if args.verbose and result.sandbox is not None:
        print(f"sandbox: {result.sandbox.summary()}", file=sys.stderr)
    _print_summary(result, args.show_transcript)
    return 0


def _trace(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.phoenix is None):
        print("error: give a file or --phoenix URL (one of them)", file=sys.stderr)
        return 2
    source = args.file or f"{args.phoenix} project {args.project}"
    try:
        data: TraceData = (
            load_trace(args.file) if args.file
            else load_phoenix_trace(args.phoenix, args.project, trace_id=args.trace_id)
        )
        analysis = analyse(data)
    except (OSError, ValueError, KeyError, PhoenixError) as exc:
        print(f"error: cannot read {source}: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(asdict(analysis), indent=2))
    else:
        print(format_text(analysis))
    if args.html:
        Path(args.html).write_text(render_html(data, analysis, title=f"rlmflow run: {source}"), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlmflow`` command."""
    args = _parser().parse_args(argv)
    if args.command == "batch":
        return batch_main(args)
    if args.command == "trace":
        return _trace(args)
    try:
        args.capture_content = _capture_limit(getattr(args, "capture_content", None))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:  # the CLI is an application: it exports what the standard OTEL_* environment asks for
        args.export = export_from_environment()
    except ExportConfigurationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.verbose:  # only rlmflow's own logger: the root logger stays as the environment set it
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger = logging.getLogger("rlmflow")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if args.command == "eval":
        return eval_main(args)
    try:
        return anyio.run(_run, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RLMError as exc:
        print(f"error: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        partial = exc.partial
        if isinstance(partial, RLMResult) and args.show_transcript:
            _print_summary(partial, True)
        elif isinstance(partial, RLMResult):
            print(f"[work kept: {partial.turns} turns, {len(partial.calls)} model calls]", file=sys.stderr)
        for cls, code in EXIT_CODES:
            if isinstance(exc, cls):
                return code
        return 1


if __name__ == "__main__":
    sys.exit(main())
