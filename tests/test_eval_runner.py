"""The runner end to end (scripted root, fake OpenAI provider), resume, scoring and the report."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import ContextOverflowError, Dispatcher, OpenAIModel, ScriptedModel
from rlmflow.eval import (
    DatasetError,
    DirectApproach,
    EvalItem,
    EvalProgress,
    ItemResult,
    RLMApproach,
    format_markdown,
    read_results,
    run_eval,
    summarise,
    write_charts,
)

from .fakes import FakeOpenAIServer
from .helpers import turn_script

pytestmark = pytest.mark.anyio

FILLER = "Nothing of note happened on this day in the town. " * 400


def items() -> list[EvalItem]:
    fact = "Archive record: the combination of the strongbox of Imogen Ashby is 4817."
    decoy = "Archive record: the combination of the strongbox of Imogen Ashford is 2290."
    mc = EvalItem(id="mc", question="Which town hosted the fair?", answer="B",
                  choices={"A": "Padua", "B": "Verona", "C": "Messina", "D": "Belmont"},
                  context=FILLER + "The fair was held in Verona that year. " + FILLER, context_chars=40_000)
    value = EvalItem(id="value", question="What is the combination of the strongbox of Imogen Ashby?",
                     answer="4817", context=FILLER + decoy + FILLER + fact + FILLER, context_chars=60_000)
    return [mc, value]


ROOT_CELLS = [
    "import re\nhits = [m.start() for m in re.finditer(r'Archive record|fair was held', context)]\nprint(len(hits))",
    "answers = llm_query_many([context[max(0, i - 40): i + 120] for i in hits])\nprint(answers)",
    "m = re.search(r'strongbox of Imogen Ashby is (\\d+)', context)\n"
    "FINAL(m.group(1) if m else 'The answer is B')",
]


async def test_end_to_end_base_and_rlm_with_fake_provider(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    results = tmp_path / "results.jsonl"
    async with FakeOpenAIServer(root_marker="Exactly one choice is correct", root_reply="The answer is (B).") as server:
        sub = OpenAIModel("fake-sub", base_url=server.base_url, timeout=10)
        base_model = OpenAIModel("fake-base", base_url=server.base_url, timeout=10)
        root = turn_script(ROOT_CELLS)
        dispatcher = Dispatcher(tracer_provider=provider)
        progress = EvalProgress()
        finished = await run_eval(
            items(),
            [DirectApproach(base_model, name="base"), RLMApproach(root, sub, tracer_provider=provider),
             DirectApproach(base_model, name="long-context", window=1000)],
            results=results, dispatcher=dispatcher, concurrency=3, progress=progress, tracer_provider=provider,
        )
        await sub.aclose()
        await base_model.aclose()
    assert (progress.done, progress.total, progress.resumed) == (6, 6, 0)
    rows = {(r.item_id, r.approach): r for r in read_results(results)}
    assert len(rows) == 6 and {(r.item_id, r.approach) for r in finished} == set(rows)
    # base: one call each; the fake's root reply answers the multiple-choice item, not the value item
    assert rows["mc", "base"].correct and rows["mc", "base"].answer == "B" and rows["mc", "base"].turns == 1
    assert rows["value", "base"].success and not rows["value", "base"].correct
    # a declared window below the prompt: a failure detected before sending, never truncated
    overflow = rows["value", "long-context"]
    assert not overflow.success and overflow.error_type == "ContextOverflowError" and overflow.input_tokens == 0
    # rlm: three turns, one sub-call per hit, through the fake provider
    rlm = rows["value", "rlm"]
    assert rlm.correct and rlm.answer == "4817" and rlm.turns == 3 and rlm.sub_calls == 2
    assert rows["mc", "rlm"].correct and rows["mc", "rlm"].sub_calls == 1
    assert rlm.input_tokens > 0 and rlm.cost_usd is None  # the fake model has no price: unknown, not $0
    assert rlm.trace_id and len(rlm.trace_id) == 32
    spans = exporter.get_finished_spans()
    item_traces = {format(s.context.trace_id, "032x") for s in spans if s.name == "rlm.eval.item"}
    assert rlm.trace_id in item_traces  # the run's spans hang under the item's span
    assert len(server.admitted) == 2 + 3  # two base calls, three sub-calls; the overflow was never sent
    assert progress.correct == sum(r.correct for r in rows.values())


async def test_resume_skips_finished_items_and_retries_failed(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    calls: list[str] = []

    def reply(request: object) -> str | BaseException:
        text = request.messages[-1].content  # type: ignore[attr-defined]
        calls.append(text)
        if "Imogen" in text and len(calls) < 10:
            return ContextOverflowError("prompt too long", provider="scripted", model="m")
        return "Answer: 4817" if "Imogen" in text else "B"

    model = ScriptedModel(reply, name="m")
    first = await run_eval(items(), [DirectApproach(model)], results=results)
    assert [(r.item_id, r.success) for r in sorted(first, key=lambda r: r.item_id)] == [("mc", True),
                                                                                          ("value", False)]
    by_id = {r.item_id: r for r in read_results(results)}  # lines are written as items finish, in any order
    assert by_id["value"].error_type == "ContextOverflowError"  # the provider's own error
    # an interrupted write leaves half a line: ignored
    with results.open("a") as fh:
        fh.write('{"item_id": "mc", "appro')
    progress = EvalProgress()
    again = await run_eval(items(), [DirectApproach(model)], results=results, progress=progress)
    assert len(calls) == 2 and progress.resumed == 2 and progress.total == 0 and len(again) == 2
    for _ in range(8):
        calls.append("filler")  # the scripted provider now accepts the long prompt
    retried = await run_eval(items(), [DirectApproach(model)], results=results, retry_failed=True)
    assert len(calls) == 11  # only the failed item ran again
    assert {r.item_id: r.correct for r in retried} == {"mc": True, "value": True}
    assert {r.item_id: r.correct for r in read_results(results)} == {"mc": True, "value": True}
    results.write_text(results.read_text() + '{"item_id": 3}\n')
    with pytest.raises(DatasetError, match="line 5"):
        read_results(results)


async def test_cost_cap_stops_starting_items(tmp_path: Path) -> None:
    from rlmflow import Budget, ModelResponse, Price, Pricing, Usage

    model = ScriptedModel(lambda r: ModelResponse("B", Usage(1_000_000, 0, 1), "priced"), name="priced")
    dispatcher = Dispatcher(pricing=Pricing(overrides={"priced": Price(1.0, 0.0)}))
    progress = EvalProgress()
    many = [EvalItem(id=f"q{i}", question="Which?", answer="B", choices={"A": "x", "B": "y"}, context="doc")
            for i in range(5)]
    await run_eval(many, [DirectApproach(model)], results=tmp_path / "r.jsonl", dispatcher=dispatcher,
                   concurrency=1, item_budget=Budget(max_cost_usd=1.5), max_cost_usd=2.5, progress=progress)
    rows = read_results(tmp_path / "r.jsonl")
    assert [r.success for r in rows].count(True) == 2  # $1 each; a third would need $1.5 of the $0.5 left
    assert {r.error_type for r in rows if not r.success} == {"BudgetExceededError"}
    assert sum(r.cost_usd or 0 for r in rows) <= 2.5


def recorded(tmp_path: Path) -> Path:
    rows = []
    for i in range(10):
        for approach, ok, right, latency in (("base", i < 6, i < 3, 2.0 + i), ("rlm", True, i < 8, 10.0 + i)):
            rows.append(ItemResult(
                item_id=f"q{i}", approach=approach, model="claude-x", expected="A", answer="A" if right else "C",
                correct=right, success=ok, turns=1 if approach == "base" else 4, sub_calls=0 if approach == "base"
                else 6, input_tokens=1000, output_tokens=10, cost_usd=0.01, latency_s=latency, trace_id=None,
                error_type=None if ok else "ContextOverflowError", context_chars=100_000 * (i + 1),
            ).__dict__)
    path = tmp_path / "recorded.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_from_recorded_results(tmp_path: Path) -> None:
    results = read_results(recorded(tmp_path))
    base, rlm = summarise(results)
    assert (base.success_rate, base.accuracy, rlm.success_rate, rlm.accuracy) == (0.6, 0.3, 1.0, 0.8)
    assert (base.latency_p50, base.latency_p95, rlm.latency_p50) == (6.0, 11.0, 14.0)
    assert base.errors == {"ContextOverflowError": 4} and rlm.mean_sub_calls == 6.0
    text = format_markdown(results, title="Financial QA")
    assert "| Model | Approach | Success Rate | Accuracy |" in text
    assert "| claude-x | Base | 60.0% (6/10) | 30.0% (3/10) |" in text
    assert "| claude-x | RLM | 100.0% (10/10) | 80.0% (8/10) |" in text
    assert "| claude-x | RLM | 10 | $0.1000 | $0.0100 | 14.0 s | 19.0 s | 4.0 | 6.0 | 10,000 / 100 |" in text
    assert "- claude-x / base: ContextOverflowError x4" in text


def test_report_charts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    charts = write_charts(read_results(recorded(tmp_path)), tmp_path / "img", prefix="fin")
    assert [c.name for c in charts] == ["fin_by_approach.png", "fin_by_length.png"]
    assert all(c.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and c.stat().st_size > 5000 for c in charts)


async def test_cli_eval_resume_and_report(tmp_path: Path) -> None:
    """The installed command: eval over the wire, a rerun that resumes, then the report with charts."""
    dataset = tmp_path / "items.jsonl"
    dataset.write_text("".join(json.dumps({"id": f"q{i}", "context": FILLER, "question": f"Pick {i}",
                                            "answer": "B", "choices": ["no", "yes"]}) + "\n" for i in range(3)))
    results = tmp_path / "res.jsonl"
    reply = "```repl\nFINAL('B')\n```"
    async with FakeOpenAIServer(root_marker="Exactly one choice is correct", root_reply=reply) as server:
        command = [sys.executable, "-m", "rlmflow.cli", "eval", "--dataset", str(dataset), "--approach", "base,rlm",
                   "--root", f"openai:fake@{server.base_url}", "--concurrency", "3", "--results", str(results)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        done = await anyio.run_process(command, env=env, check=False)
        assert done.returncode == 0, done.stderr.decode()
        requests = server.counters.requests
        assert requests == 6  # three base calls and three one-turn runs
        again = await anyio.run_process(command, env=env, check=False)
        assert again.returncode == 0 and server.counters.requests == requests
        assert "6 resumed" in again.stderr.decode()
    rows = read_results(results)
    assert len(rows) == 6 and all(r.correct for r in rows)
    out = tmp_path / "report"
    shown = await anyio.run_process([sys.executable, "-m", "rlmflow.cli", "eval", "report", str(results),
                                     "--out", str(out)], check=False)
    assert shown.returncode == 0, shown.stderr.decode()
    assert "| fake | RLM | 100.0% (3/3) | 100.0% (3/3) |" in shown.stdout.decode()
    assert sorted(p.name for p in out.iterdir()) == ["eval_by_approach.png", "eval_by_length.png", "eval_report.md"]


async def test_cli_eval_rerun_with_the_cache_pays_only_for_what_changed(tmp_path: Path) -> None:
    def items(questions: list[str]) -> Path:
        dataset = tmp_path / f"items{len(list(tmp_path.glob('items*')))}.jsonl"
        dataset.write_text("".join(json.dumps({"id": f"q{i}", "context": f"{FILLER} (document {i})",
                                                "question": question, "answer": "B", "choices": ["no", "yes"]})
                                    + "\n" for i, question in enumerate(questions)))
        return dataset

    reply = "```repl\nparts = llm_query_many(['part %d of ' % i + context[-40:] for i in range(4)])\nFINAL('B')\n```"
    cache = tmp_path / "cache.sqlite"
    async with FakeOpenAIServer(root_marker="Exactly one choice is correct", root_reply=reply) as server:
        def command(dataset: Path, results: str) -> list[str]:
            return [sys.executable, "-m", "rlmflow.cli", "eval", "--dataset", str(dataset), "--approach", "base,rlm",
                    "--root", f"openai:fake@{server.base_url}", "--concurrency", "3",
                    "--results", str(tmp_path / results), "--cache", str(cache)]

        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        questions = ["Pick 0", "Pick 1", "Pick 2"]
        first = await anyio.run_process(command(items(questions), "first.jsonl"), env=env, check=False)
        assert first.returncode == 0, first.stderr.decode()
        paid = server.counters.requests
        assert paid == 3 * (1 + 1 + 4)  # per item: the base call, the run's one root turn, its 4 sub-calls
        again = await anyio.run_process(command(items(questions), "again.jsonl"), env=env, check=False)
        assert again.returncode == 0, again.stderr.decode()
        assert server.counters.requests == paid  # every item run again, nothing sent
        questions[1] = "Pick one"
        changed = await anyio.run_process(command(items(questions), "changed.jsonl"), env=env, check=False)
        assert changed.returncode == 0, changed.stderr.decode()
    # the changed item's base call and its run's root turn; its sub-calls ask what was asked before
    assert server.counters.requests - paid == 2
    assert [row.correct for row in read_results(tmp_path / "again.jsonl")] == [True] * 6
