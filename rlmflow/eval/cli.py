"""``rlmflow eval``: run approaches over a dataset, ``eval report`` and ``eval generate``.

Application code (it prints and draws a progress bar); ``rlmflow.cli`` only registers it.

    rlmflow eval --dataset ../shared/data/longbench_v2/financial_multidoc_qa --approach base,rlm \\
        --root bedrock:us.anthropic.claude-haiku-4-5-20251001-v1:0 --concurrency 8 --results fin.jsonl
    rlmflow eval report fin.jsonl --out docs/img
    rlmflow eval generate --kinds needle,ledger --sizes 100KB,1MB \\
        --corpus examples/data/shakespeare_plays.txt --out tasks
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from .._exceptions import ConfigurationError, RLMError
from .._util import single_exception
from ..dispatch.budget import Budget
from ..dispatch.dispatcher import Dispatcher
from ..dispatch.policy import load_policy
from ..durable.cache import CallCache
from ..durable.choice import chosen_cache
from ..models.registry import DEFAULT_MODEL, ModelRegistry
from ..sandbox.choice import add_sandbox_argument, build_sandbox, chosen_sandbox
from .approaches import Approach, DirectApproach, RLMApproach
from .generate import KINDS, generate_task, parse_size, write_tasks
from .items import EvalItem
from .loaders import ItemFilter, load_dataset
from .report import format_markdown, write_charts
from .runner import EvalProgress, ItemResult, read_results, run_eval

__all__ = ["add_eval_parser", "eval_main"]

APPROACHES = ("base", "long-context", "rlm")
DEMO_CORPUS = "examples/data/shakespeare_plays.txt"  # in the repository, not in the wheel


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_eval_parser(commands: Any) -> None:
    """Register ``eval`` (with ``report`` and ``generate``) on the main parser's subcommands."""
    ev = commands.add_parser(
        "eval", help="evaluate approaches on a dataset (also: eval report, eval generate)",
        description="Run approaches over a dataset, resumably. `rlmflow eval report RESULTS...` makes tables "
                    "and charts; `rlmflow eval generate` writes generated tasks.",
    )
    ev.add_argument("--dataset", action="append", default=[], metavar="PATH",
                    help="LongBench v2 JSON, a directory of Markdown pairs, or a user JSONL (repeatable)")
    ev.add_argument("--approach", default="rlm", help=f"comma-separated, of {', '.join(APPROACHES)} (default rlm)")
    ev.add_argument("--root", default=DEFAULT_MODEL, help="root model of rlm and the model of base")
    ev.add_argument("--sub", default=None, help="sub-call model of rlm (default: the root model)")
    ev.add_argument("--long-model", default=None, help="the long-window model of long-context (default: --root)")
    ev.add_argument("--window", type=int, default=None, help="base model's window in tokens (default: known)")
    ev.add_argument("--long-window", type=int, default=None, help="long-context model's window in tokens")
    ev.add_argument("--results", default="eval-results.jsonl", help="results JSONL (appended; reruns resume)")
    ev.add_argument("--retry-failed", action="store_true", help="rerun items recorded as failed")
    ev.add_argument("--concurrency", type=int, default=4, help="items in flight at once")
    ev.add_argument("--domain", type=_csv, default=[], help="keep domains/sub-domains containing these words")
    ev.add_argument("--difficulty", type=_csv, default=[], help="easy,hard")
    ev.add_argument("--length", type=_csv, default=[], help="short,medium,long")
    ev.add_argument("--ids", type=_csv, default=[], help="only these item ids")
    ev.add_argument("--max-chars", type=int, default=None, help="drop contexts larger than this")
    ev.add_argument("--limit", type=int, default=None, help="first N items after filtering")
    ev.add_argument("--max-turns", type=int, default=12)
    ev.add_argument("--max-depth", type=int, default=1)
    ev.add_argument("--cell-timeout", type=float, default=120.0)
    add_sandbox_argument(ev)
    ev.add_argument("--max-cost", type=float, default=None, help="USD cap of the whole evaluation")
    ev.add_argument("--item-max-cost", type=float, default=None, help="USD cap per item")
    ev.add_argument("--item-deadline", type=float, default=None, help="seconds per item")
    ev.add_argument("--item-max-calls", type=int, default=None, help="model calls per item")
    ev.add_argument("--policy", default=None, metavar="TOML",
                    help="policy file: lanes, retry, [shared], [sandbox] (docs/policies.md)")
    ev.add_argument("--cache", metavar="PATH", default=None,
                    help="sub-call cache (an SQLite file or a redis:// URL) shared by every approach: a rerun pays "
                    "only for what changed")
    ev.add_argument("--no-prompt-cache", dest="prompt_cache", action="store_false",
                    help="ask Bedrock and Anthropic for no prompt caching (on by default; docs/caching.md)")
    ev.add_argument("--report", action="store_true", help="print the Markdown report at the end")
    ev.add_argument("-v", "--verbose", action="store_true", help="log rlmflow's records to stderr")
    sub = ev.add_subparsers(dest="eval_command", required=False)
    report = sub.add_parser("report", help="Markdown tables and PNG charts from results files")
    report.add_argument("results", nargs="+", help="results JSONL files")
    report.add_argument("--out", default=None, help="directory for report.md and the charts")
    report.add_argument("--title", default=None)
    report.add_argument("--prefix", default="eval", help="chart file name prefix")
    gen = sub.add_parser("generate", help="write generated tasks (a user JSONL with context files)")
    gen.add_argument("--kinds", type=_csv, default=list(KINDS), help=f"of {', '.join(KINDS)}")
    gen.add_argument("--sizes", type=_csv, default=["100KB", "1MB"], help="e.g. 100KB,1MB,10MB (100KB-50MB)")
    gen.add_argument("--seeds", type=_csv, default=["0"], help="one task per kind, size and seed")
    gen.add_argument("--corpus", default=None, metavar="FILE",
                     help=f"filler text: a plain-text file of a few dozen paragraphs or more (default {DEMO_CORPUS} "
                     "when run from a source checkout; the code kind needs none)")
    gen.add_argument("--out", required=True, help="output directory")


def _report(args: argparse.Namespace) -> int:
    results: list[ItemResult] = []
    for path in args.results:
        results += read_results(path)
    if not results:
        print("error: no results in the given files", file=sys.stderr)
        return 2
    markdown = format_markdown(results, title=args.title)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.prefix}_report.md").write_text(markdown, encoding="utf-8")
        for chart in write_charts(results, out, prefix=args.prefix):
            print(f"wrote {chart}", file=sys.stderr)
    return 0


def _corpus(args: argparse.Namespace) -> str:
    """The filler text: --corpus, else the demo corpus of a source checkout; a clear error otherwise."""
    if all(kind == "code" for kind in args.kinds):
        return ""
    if args.corpus is None and not Path(DEMO_CORPUS).is_file():
        raise ConfigurationError(
            f"give --corpus FILE: the filler text the records are planted in (any plain text of a few dozen "
            f"paragraphs or more; the default, {DEMO_CORPUS}, is in the source repository, not in the installed "
            "package), or generate only --kinds code"
        )
    path = Path(args.corpus or DEMO_CORPUS)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the corpus {path}: {exc}") from exc


def _generate(args: argparse.Namespace) -> int:
    corpus = _corpus(args)
    tasks = []
    for size in args.sizes:
        for kind in args.kinds:
            for seed in args.seeds:
                task = generate_task(kind, size=parse_size(size), seed=int(seed), corpus=corpus)
                print(f"{task.id}: {len(task.context):,} chars, answer {task.answer!r}", file=sys.stderr)
                tasks.append(task)
    path = write_tasks(tasks, args.out)
    print(f"wrote {path} ({len(tasks)} tasks)", file=sys.stderr)
    return 0


def _load_items(args: argparse.Namespace) -> list[EvalItem]:
    if not args.dataset:
        raise ConfigurationError("give --dataset PATH (or use `rlmflow eval report` / `rlmflow eval generate`)")
    item_filter = ItemFilter(domain=args.domain, difficulty=args.difficulty, length=args.length, ids=args.ids,
                             max_chars=args.max_chars)
    items: list[EvalItem] = []
    for path in args.dataset:
        items += load_dataset(path, item_filter=item_filter)
    return items[: args.limit] if args.limit is not None else items


class _Display:
    """A rich progress bar on a terminal; a line per finished item otherwise."""

    def __init__(self, progress: EvalProgress, stream: Any) -> None:
        self._p = progress
        self._stream = stream
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._task: Any = None
        self._printed = 0

    def _status(self) -> str:
        p = self._p
        eta = p.eta_s
        return (f"done {p.done}/{p.total} | failed {p.failed} | accuracy {100 * p.accuracy:.1f}% | "
                f"cost ${p.cost_usd:.4f} | running {p.running} | ETA {'?' if eta is None else f'{eta:,.0f}s'}")

    def __enter__(self) -> _Display:
        if self._tty:
            try:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            except ImportError:
                return self
            self._bar = Progress(TextColumn("eval"), BarColumn(), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=Console(file=self._stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self._status(), total=max(1, self._p.total))
        return self

    def refresh(self) -> None:
        p = self._p
        if self._bar is not None:
            self._bar.update(self._task, completed=p.done, total=max(1, p.total), description=self._status())
            return
        if p.done > self._printed and p.last is not None:
            self._printed = p.done
            r = p.last
            verdict = "correct" if r.correct else ("wrong" if r.success else f"failed ({r.error_type})")
            print(f"[{p.done}/{p.total}] {r.item_id} {r.approach}: {verdict}, answer {r.answer!r}, "
                  f"{r.latency_s:.1f}s, {r.turns} turns | {self._status()}", file=self._stream, flush=True)

    def __exit__(self, *exc_info: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


async def _evaluate(args: argparse.Namespace) -> int:
    items = await anyio.to_thread.run_sync(_load_items, args)
    names = _csv(args.approach)
    unknown = [n for n in names if n not in APPROACHES]
    if unknown or not names:
        raise ConfigurationError(f"unknown approach(es) {unknown}; use {', '.join(APPROACHES)}")
    export = args.export  # the application's OTLP wiring from the OTEL_* environment (rlmflow.cli)
    tracer_provider, meter_provider = export.tracer_provider, export.meter_provider
    # one instance per model string: base and rlm share local weights
    registry = ModelRegistry(prompt_cache=args.prompt_cache)
    cache: CallCache | None = None
    try:
        policy = load_policy(args.policy) if args.policy else None
        sandbox = chosen_sandbox(args.sandbox, policy.sandbox if policy is not None else None)
        cache = chosen_cache(args.cache, policy)
        # a strands: root (a Strands Agent driving the run) is rlm's; base calls the model under it
        strands_root = args.root.startswith("strands:")
        plain_root = args.root.removeprefix("strands:")
        root = registry.resolve(plain_root)
        approaches: list[Approach] = []
        for name in names:
            if name == "base":
                approaches.append(DirectApproach(root, name="base", window=args.window, cache=cache))
            elif name == "long-context":
                approaches.append(DirectApproach(registry.resolve(args.long_model or plain_root), name="long-context",
                                                 window=args.long_window, cache=cache))
            else:
                approaches.append(RLMApproach(
                    args.root if strands_root else root, registry.resolve(args.sub) if args.sub else None,
                    max_turns=args.max_turns,
                    max_depth=args.max_depth, sandbox=build_sandbox(sandbox, cell_timeout=args.cell_timeout),
                    tracer_provider=tracer_provider, meter_provider=meter_provider, cache=cache,
                    prompt_cache=args.prompt_cache,
                ))
        dispatcher = (Dispatcher.from_policy(policy, tracer_provider=tracer_provider, meter_provider=meter_provider)
                      if policy is not None
                      else Dispatcher(tracer_provider=tracer_provider, meter_provider=meter_provider))
        models = [registry.resolve(spec) for spec in (plain_root, args.sub, args.long_model) if spec]
        if policy is not None:
            dispatcher.check_limits_used(models, source=f"the policy {args.policy}")
        for model in models:  # a hosted endpoint without its key fails here, before any item runs
            ready = getattr(model, "check_ready", None)
            if callable(ready):
                ready()
        budget = Budget(max_cost_usd=args.item_max_cost, deadline=args.item_deadline, max_calls=args.item_max_calls)
        progress = EvalProgress()
        print(f"{len(items)} items x {len(approaches)} approaches -> {args.results}", file=sys.stderr)
        with _Display(progress, sys.stderr) as display:
            async def refresher() -> None:
                while True:
                    display.refresh()
                    await anyio.sleep(0.5)

            with single_exception():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(refresher)
                    try:
                        results = await run_eval(
                            items, approaches, results=args.results, dispatcher=dispatcher,
                            concurrency=args.concurrency, item_budget=budget, max_cost_usd=args.max_cost,
                            retry_failed=args.retry_failed, progress=progress, tracer_provider=tracer_provider,
                        )
                    finally:
                        tg.cancel_scope.cancel()
            display.refresh()
    finally:
        with anyio.CancelScope(shield=True):
            await registry.aclose()
            if cache is not None:
                await cache.aclose()
            await anyio.to_thread.run_sync(export.shutdown)  # flushes the exporters
    print(f"{progress.resumed} resumed from {args.results}, {progress.done} run in "
          f"{time.monotonic() - progress.started:.1f}s", file=sys.stderr)
    if args.report:
        print(format_markdown(results))
    return 0


def eval_main(args: argparse.Namespace) -> int:
    """Run the ``eval`` command parsed by :func:`add_eval_parser`; returns the exit code."""
    try:
        if args.eval_command == "report":
            return _report(args)
        if args.eval_command == "generate":
            return _generate(args)
        return anyio.run(_evaluate, args)
    except KeyboardInterrupt:
        print("interrupted: finished items are in the results file; rerun to resume", file=sys.stderr)
        return 130
    except RLMError as exc:
        print(f"error: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1
