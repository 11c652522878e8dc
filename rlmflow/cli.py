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
from ._util import single_exception
from .context import load_context_files
from .dispatch.budget import Budget
from .engine import RLM, RLMResult, RunProgress
from .models.registry import DEFAULT_MODEL
from .sandbox.local import LocalSandbox
from .telemetry.html import render_html
from .telemetry.report import analyse, format_text, load_trace
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
    run.add_argument("--root", default=DEFAULT_MODEL, help=f"root model (default {DEFAULT_MODEL})")
    run.add_argument("--sub", default=None, help="sub-call model (default: the root model)")
    run.add_argument("--max-turns", type=int, default=12)
    run.add_argument("--max-depth", type=int, default=1)
    run.add_argument("--max-calls", type=int, default=None, help="budget: most model calls")
    run.add_argument("--deadline", type=float, default=None, help="budget: seconds for the whole run")
    run.add_argument("--cell-timeout", type=float, default=120.0, help="seconds of compute per cell")
    run.add_argument("--show-transcript", action="store_true", help="print every turn's code and output")
    run.add_argument("--trajectory", metavar="PATH", help="record the run as JSONL (read it with rlmflow trace)")
    run.add_argument("-v", "--verbose", action="store_true", help="log rlmflow's records to stderr")
    add_batch_parser(commands)  # rlmflow batch (rlmflow/_batch_cli.py)
    trace_cmd = commands.add_parser("trace", help="report on a recorded run (trajectory JSONL or OTLP-JSON spans)")
    trace_cmd.add_argument("file", help="a trajectory written with --trajectory, or an OTLP JSON span export")
    trace_cmd.add_argument("--html", metavar="PATH", help="also write a self-contained page with a timeline")
    trace_cmd.add_argument("--json", action="store_true", help="print the analysis as JSON")
    return parser


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
        return (
            f"turn {p.turn}/{p.max_turns} | {p.phase} | sub-calls {p.calls_done} done, "
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
            for block in turn.code:
                print("```repl\n" + block + "\n```", file=sys.stderr)
            print(turn.feedback, file=sys.stderr)
    print(result.answer)
    usage = ", ".join(
        f"{model}: {u.calls} calls, {u.input_tokens:,} in / {u.output_tokens:,} out"
        for model, u in result.usage.items()
    )
    cost = "unknown" if result.cost_usd is None else f"${result.cost_usd:.4f}"
    print(f"[{result.turns} turns, {result.duration:.1f}s, cost {cost}; {usage}]", file=sys.stderr)


def _configure_telemetry() -> tuple[Any, Any]:
    """OTLP export when the standard OTEL_EXPORTER_OTLP_* variables ask for it (the CLI is an app).

    Returns (tracer_provider, meter_provider), both ``None`` when nothing is configured.
    """
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return None, None
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        print("warning: OTEL_EXPORTER_OTLP_ENDPOINT is set but the 'cli' extra is not installed", file=sys.stderr)
        return None, None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "rlmflow")})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    return tracer_provider, meter_provider


async def _run(args: argparse.Namespace) -> int:
    loaded = await anyio.to_thread.run_sync(load_context_files, args.context)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    budget = Budget(max_calls=args.max_calls, deadline=args.deadline)
    progress = RunProgress()
    tracer_provider, meter_provider = _configure_telemetry()
    try:
        return await _answer(args, loaded.context, budget, progress, tracer_provider, meter_provider)
    finally:
        for provider in (tracer_provider, meter_provider):
            if provider is not None:
                await anyio.to_thread.run_sync(provider.shutdown)  # flushes the exporters


async def _answer(
    args: argparse.Namespace, context: Any, budget: Budget, progress: RunProgress, tracer_provider: Any,
    meter_provider: Any,
) -> int:
    async with RLM(
        root=args.root,
        sub=args.sub,
        max_turns=args.max_turns,
        max_depth=args.max_depth,
        budget=budget,
        sandbox=LocalSandbox(cell_timeout=args.cell_timeout),
        trajectory=Trajectory(args.trajectory) if args.trajectory else None,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    ) as rlm:
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
                        result = await rlm.run(context, args.query, progress=progress)
                    finally:
                        tg.cancel_scope.cancel()
            display.refresh()
    assert result is not None
    _print_summary(result, args.show_transcript)
    return 0


def _trace(args: argparse.Namespace) -> int:
    try:
        data = load_trace(args.file)
        analysis = analyse(data)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read {args.file}: {exc}", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(asdict(analysis), indent=2))
    else:
        print(format_text(analysis))
    if args.html:
        Path(args.html).write_text(render_html(data, analysis, title=f"rlmflow run: {args.file}"), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rlmflow`` command."""
    args = _parser().parse_args(argv)
    if args.command == "batch":
        return batch_main(args)
    if args.command == "trace":
        return _trace(args)
    if args.verbose:  # only rlmflow's own logger: the root logger stays as the environment set it
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger = logging.getLogger("rlmflow")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
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
