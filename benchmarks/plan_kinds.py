"""How the embedded root names the kind of a question: the plan turn's form and its narrow second question.

The plan turn (``rlmflow/_run/plan.py``) is only as good as the kind it settles on: an aggregation
named a ``lookup`` goes to the free-form loop, which does not aggregate; a lookup named an
aggregation runs a program that answers a number. This asks the real embedded root (no document,
no sub-model: the kind depends on the question alone) for the form of each question of
``benchmarks/data/plan_kinds.jsonl`` (written questions of five kinds, in several wordings, and the
generator's needle and code questions) and of the first LongBench v2 items in ``../shared`` (none
is an aggregation over records), settles it as a run does, and writes the share named right per
kind and every miss to benchmarks/results/plan_kinds.json.

About 7 s per question on 2 quiet cores (two root calls for an aggregation; for a lookup, one,
and two scored calls with the embedded root).

    python benchmarks/plan_kinds.py
    python benchmarks/plan_kinds.py --root local:qwen2.5-coder-1.5b --longbench 0
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import anyio
from _common import ROOT, write_result

from rlmflow._run.plan import make_plan
from rlmflow.eval import load_dataset
from rlmflow.models.base import scores_choices
from rlmflow.models.registry import build_model, parse_model_string

QUESTIONS = Path(__file__).with_name("data") / "plan_kinds.jsonl"
LONGBENCH = ROOT.parent / "shared" / "data" / "longbench_v2"


def questions(longbench: int) -> list[tuple[str, str, str]]:
    """(kind wanted, source, question): the written set, then ``longbench`` items of each subset."""
    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    asked = [(row["kind"], row["source"], row["question"]) for row in rows]
    for subset in ("financial_multidoc_qa", "code_repository_qa"):
        if longbench and (LONGBENCH / subset).is_dir():
            items = load_dataset(LONGBENCH / subset)[:longbench]
            asked += [("lookup", "longbench_v2", item.prompt()) for item in items]
    return asked


async def main(args: argparse.Namespace) -> None:
    model = build_model(*parse_model_string(args.root))
    asked = questions(args.longbench)
    started = time.monotonic()
    right, seen, misses = Counter[str](), Counter[str](), []
    unsure: list[dict[str, object]] = []
    for wanted, source, question in asked:
        planned = await make_plan(model.request, question, scores_choices=scores_choices(model))
        named = planned.plan.kind if planned.plan is not None else None
        form = planned.form.kind if planned.form is not None else None
        seen[wanted] += 1
        right[wanted] += named == wanted
        row = {"wanted": wanted, "source": source, "form": form, "lookup_probability": planned.lookup_probability,
               "one_probability": planned.one_probability,
               "combine": planned.combined, "settled": named, "question": question[:200]}
        if named != wanted:
            misses.append(row)
        if form == "lookup" and named != "lookup":
            unsure.append(row)
    seconds = time.monotonic() - started
    result = {
        "root": args.root, "questions": len(asked), "seconds": round(seconds, 1),
        "right": sum(right.values()),
        "per_kind": {kind: {"right": right[kind], "of": seen[kind]} for kind in seen},
        "misses": misses,
        "lookup_forms_made_aggregations": unsure,
    }
    for kind in seen:
        print(f"{kind:9} {right[kind]:3}/{seen[kind]}")
    print(f"{result['right']}/{len(asked)} in {seconds:.0f} s")
    write_result("plan_kinds", result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="local:qwen2.5-coder-0.5b", help="the root model (a model string)")
    parser.add_argument("--longbench", type=int, default=7, help="LongBench v2 items per subset (0: none)")
    anyio.run(main, parser.parse_args())
