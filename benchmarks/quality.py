"""Quality on generated tasks that exceed the embedded model's window: RLM against a direct call.

Generates tasks (``needle``, ``ledger``, ``notes``, ``code``) at three sizes from the demo corpus,
then runs ``base`` (the whole document in one call to the 0.5B model: beyond its window, so it
fails by design and costs nothing) and ``rlm`` with each available embedded root (0.5B, and 1.5B
when its weights are installed) over the 0.5B sub-model. Writes a Markdown table, two PNG charts
and the per-item JSONL under ``--out``, and a JSON summary to benchmarks/results/quality.json.

Long-running (minutes per RLM item on a laptop CPU): not part of .ci/run.

    python benchmarks/quality.py                                  # defaults: 3 kinds x 3 sizes
    python benchmarks/quality.py --kinds needle --sizes 100KB --max-turns 4   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import anyio
from _common import write_result

from rlmflow import Budget, Dispatcher, LocalModel, LocalSandbox
from rlmflow.eval import (
    DirectApproach,
    EvalProgress,
    RLMApproach,
    format_markdown,
    generate_task,
    load_dataset,
    read_results,
    run_eval,
    summarise,
    write_charts,
    write_tasks,
)
from rlmflow.models.weights import KNOWN_WEIGHTS

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "examples" / "data" / "shakespeare_plays.txt"


def installed(alias: str) -> bool:
    spec = KNOWN_WEIGHTS[alias]
    return all(importlib.util.find_spec(spec.part_module(i)) is not None for i in range(1, spec.parts + 1))


async def main(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = CORPUS.read_text(encoding="utf-8")
    wanted = [tuple(t.split(":")) for t in args.tasks.split(",")] if args.tasks else [
        (kind, size) for size in args.sizes.split(",") for kind in args.kinds.split(",")]
    tasks = [generate_task(kind, size=size, seed=args.seed, corpus=corpus) for kind, size in wanted]
    dataset = write_tasks(tasks, args.tasks_dir)  # megabytes of generated text: kept out of the repository
    items = load_dataset(dataset)
    roots = [alias for alias in args.roots.split(",") if installed(alias)]
    skipped = [alias for alias in args.roots.split(",") if alias not in roots]
    for alias in skipped:
        print(f"skipping root {alias}: weights not installed ({KNOWN_WEIGHTS[alias].install_hint()})")
    sub = LocalModel("qwen2.5-coder-0.5b")
    models = {alias: (sub if alias == "qwen2.5-coder-0.5b" else LocalModel(alias)) for alias in roots}
    def rlm(alias: str) -> RLMApproach:
        return RLMApproach(models[alias], sub, max_turns=args.max_turns, sandbox=LocalSandbox(cell_timeout=60))

    subset_roots = set(args.subset_roots.split(",")) if args.subset_roots else set()
    subset = set(args.subset.split(",")) if args.subset else {i.id for i in items}
    # (items, approaches) passes: a slow root may run on a subset of the items only
    passes = [(items, [DirectApproach(sub, name="base"), *(rlm(a) for a in roots if a not in subset_roots)])]
    slow = [rlm(a) for a in roots if a in subset_roots]
    if slow:
        passes.append(([i for i in items if i.id in subset], slow))
    results = out / "results.jsonl"
    progress = EvalProgress()
    started = time.monotonic()

    async def report_progress() -> None:
        shown = 0
        while True:
            await anyio.sleep(1)
            if progress.done > shown and progress.last is not None:
                shown = progress.done
                r = progress.last
                print(f"[{progress.done}/{progress.total}] {r.item_id} {r.approach} {r.model}: "
                      f"{'correct' if r.correct else 'wrong' if r.success else 'failed ' + str(r.error_type)} "
                      f"(answer {r.answer!r}, expected {r.expected!r}) {r.turns} turns {r.latency_s:.0f}s",
                      flush=True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(report_progress)
        dispatcher = Dispatcher()
        for pass_items, approaches in passes:
            await run_eval(pass_items, approaches, results=results, dispatcher=dispatcher, concurrency=1,
                           item_budget=Budget(deadline=args.item_deadline), progress=progress)
        tg.cancel_scope.cancel()
    for model in {id(m): m for m in [sub, *models.values()]}.values():
        await model.aclose()
    rows = read_results(results)
    table = format_markdown(rows, title="Generated tasks beyond the embedded model's window")
    per_item = ["", "| Item | Approach | Model | Answer | Expected | Correct | Turns | Sub-calls | Time |",
                "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r.context_chars, r.item_id, r.approach, r.model)):
        per_item.append(f"| {r.item_id} | {r.approach} | {r.model} | {r.answer or r.error_type or '-'} | "
                        f"{r.expected} | {'yes' if r.correct else 'no'} | {r.turns} | {r.sub_calls} | "
                        f"{r.latency_s:.0f} s |")
    text = table + "\n".join(per_item) + "\n"
    (out / "quality.md").write_text(text, encoding="utf-8")
    charts = write_charts(rows, out, prefix="quality")
    print(text)
    print("charts:", ", ".join(str(c) for c in charts))
    write_result("quality", {
        "kinds": args.kinds, "sizes": args.sizes, "seed": args.seed, "max_turns": args.max_turns,
        "roots": roots, "skipped_roots": skipped, "seconds": round(time.monotonic() - started, 1),
        "summaries": [
            {"model": s.model, "approach": s.approach, "items": s.items, "success_rate": s.success_rate,
             "accuracy": s.accuracy, "latency_p50": s.latency_p50, "latency_p95": s.latency_p95,
             "mean_turns": s.mean_turns, "mean_sub_calls": s.mean_sub_calls}
            for s in summarise(rows)
        ],
    })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="needle,ledger,notes")
    parser.add_argument("--sizes", default="100KB,300KB,1MB")
    parser.add_argument("--tasks", default="", help="kind:size,... instead of the kinds x sizes grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--roots", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    parser.add_argument("--subset-roots", default="", help="roots that run only on --subset (slow ones)")
    parser.add_argument("--subset", default="", help="item ids for --subset-roots (default: all)")
    parser.add_argument("--max-turns", type=int, default=6)
    parser.add_argument("--item-deadline", type=float, default=600.0, help="seconds per RLM item")
    parser.add_argument("--out", default=str(ROOT / "docs" / "quality"))
    parser.add_argument("--tasks-dir", default=str(Path(tempfile.gettempdir()) / "rlmflow-quality-tasks"))
    sys.exit(anyio.run(main, parser.parse_args()))
