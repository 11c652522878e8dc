"""The sub-call cache across runs: asked again, a request is answered from it, sent and charged nothing."""

from __future__ import annotations

import stat
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import RLM, Budget, ConfigurationError, ModelRequest, ScriptedModel
from rlmflow.durable.cache import CachedAnswer, SQLiteCallCache
from rlmflow.durable.journal import Journal
from rlmflow.events import RunEvent, SubCallDone
from rlmflow.models.base import ModelResponse, ModelView

from .helpers import turn_script

pytestmark = pytest.mark.anyio

PROMPTS = 12
CELLS = [
    f"answers = llm_query_many(['item %d' % i for i in range({PROMPTS})])\nprint(len(answers))",
    "FINAL('total ' + str(sum(len(a) for a in answers)))",
]


def sub_model(failing: str | None = None) -> ScriptedModel:
    async def reply(request: ModelRequest) -> str:
        prompt = request.messages[-1].content
        if prompt == failing:
            raise RuntimeError("the provider failed this one")
        return "ANSWER " + prompt

    return ScriptedModel(reply, name="sub")


def sent(model: ScriptedModel) -> list[str]:
    return [request.messages[-1].content for request in model.requests]


async def test_an_identical_second_run_sends_nothing_and_costs_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache) as rlm:
        first = await rlm.run("the document", "how long are the answers?")
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600

    root, sub = turn_script(CELLS), sub_model()
    events: list[RunEvent] = []
    async with RLM(root=root, sub=sub, cache=cache) as rlm:  # another RLM: as a new process would
        second = await rlm.run("the document", "how long are the answers?", events=events.append)
    assert second.answer == first.answer
    assert root.requests == [] and sub.requests == []  # the root's turns too: same question, same document
    assert second.cost_usd == 0.0 and second.spent.calls == 0
    assert second.usage["sub"].cached_calls == PROMPTS and second.usage["sub"].calls == 0
    assert all(call.cached and call.source == "cache" for call in second.calls)
    done = [event for event in events if isinstance(event, SubCallDone)]
    assert len(done) == PROMPTS + 2 and {event.source for event in done} == {"cache"}


async def test_only_what_changed_is_paid_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    one_by_one = (  # llm_query and llm_query_many ask a prompt the same way: one key
        f"answers = []\nfor i in range({PROMPTS}):\n"
        "    try:\n        answers.append(llm_query('item %d' % i))\n"
        "    except Exception:\n        answers.append('')\nprint(len(answers))"
    )
    async with RLM(root=turn_script([one_by_one, CELLS[1]]), sub=sub_model(failing="item 3"), cache=cache) as rlm:
        await rlm.run("the document", "how long are the answers?")
    changed = [CELLS[0].replace("'item %d' % i", "('item %d' % i if i != 5 else 'other 5')"), CELLS[1]]
    sub, subs_only = sub_model(), SQLiteCallCache(cache, roots=False)  # the root's new code is asked for
    async with RLM(root=turn_script(changed), sub=sub, cache=subs_only) as rlm:
        result = await rlm.run("the document", "how long are the answers?")
    await subs_only.aclose()
    # the failed call left nothing to answer from; the changed prompt was never asked before
    assert sorted(sent(sub)) == ["item 3", "other 5"]
    assert result.usage["sub"].calls == 2 and result.usage["sub"].cached_calls == PROMPTS - 2


async def test_settings_that_change_the_answer_are_part_of_the_key(tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache, sub_max_tokens=100) as rlm:
        await rlm.run("the document", "how long are the answers?")
    sub = sub_model()
    async with RLM(root=turn_script(CELLS), sub=sub, cache=cache, sub_max_tokens=200) as rlm:
        await rlm.run("the document", "how long are the answers?")
    assert len(sent(sub)) == PROMPTS


async def test_root_calls_can_be_left_out(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    for _ in range(2):
        cache = SQLiteCallCache(path, roots=False)
        root, sub = turn_script(CELLS), sub_model()
        async with RLM(root=root, sub=sub, cache=cache) as rlm:
            await rlm.run("the document", "how long are the answers?")
        await cache.aclose()
    assert len(root.requests) == 2 and sub.requests == []


async def test_ttl_and_eviction(tmp_path: Path) -> None:
    now = [1000.0]
    path = tmp_path / "cache.sqlite"
    answer = CachedAnswer("x" * 1000, "sub", "stop", 10, 20)
    cache = SQLiteCallCache(path, ttl=60, max_bytes=5_000, clock=lambda: now[0])
    for index in range(4):
        await cache.store(f"key {index}", answer)
        now[0] += 1
    await cache.aclose()

    cache = SQLiteCallCache(path, ttl=60, max_bytes=5_000, clock=lambda: now[0])  # from the file, not memory
    assert await cache.lookup(["key 0", "key 9"]) == [answer, None]
    now[0] += 1
    await cache.store("key 4", answer)  # past the cap: the least recently used (1, then 2) go
    await cache.aclose()
    cache = SQLiteCallCache(path, ttl=60, max_bytes=5_000, clock=lambda: now[0])
    assert [hit is not None for hit in await cache.lookup([f"key {i}" for i in range(5)])] == [
        True, False, False, True, True
    ]
    now[0] += 61  # every answer is now older than the ttl
    assert await cache.lookup(["key 0", "key 4"]) == [None, None]
    await cache.aclose()


async def test_cache_hits_are_marked_in_spans_and_metrics(tmp_path: Path) -> None:
    cache = tmp_path / "cache.sqlite"
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache) as rlm:
        await rlm.run("the document", "how long are the answers?")
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache, tracer_provider=tracer_provider,
                   meter_provider=MeterProvider(metric_readers=[reader])) as rlm:
        await rlm.run("the document", "how long are the answers?")
    chats = [span for span in exporter.get_finished_spans() if span.name.startswith("chat")]
    assert len(chats) == PROMPTS + 2
    assert {span.attributes["rlm.call.source"] for span in chats if span.attributes} == {"cache"}
    data = reader.get_metrics_data()
    assert data is not None
    points = [point for resource in data.resource_metrics for scope in resource.scope_metrics
              for metric in scope.metrics if metric.name == "rlm.client.answered_without_request"
              for point in metric.data.data_points]
    assert sum(point.value for point in points) == PROMPTS + 2  # type: ignore[attr-defined]
    assert not any(metric.name == "gen_ai.client.token.usage" for resource in data.resource_metrics
                   for scope in resource.scope_metrics for metric in scope.metrics)


async def test_a_cached_answer_in_a_journaled_run_is_journaled_free(tmp_path: Path) -> None:
    cache, journal = tmp_path / "cache.sqlite", tmp_path / "journal.sqlite"
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache) as rlm:
        first = await rlm.run("the document", "how long are the answers?")
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache, journal=journal) as rlm:
        await rlm.run("the document", "how long are the answers?")
    root, sub = turn_script(CELLS), sub_model()
    async with RLM(root=root, sub=sub, replay=journal) as rlm:  # no cache: the journal alone answers
        replayed = await rlm.run("the document", "how long are the answers?")
    assert replayed.answer == first.answer and root.requests == [] and sub.requests == []
    assert replayed.cost_usd == 0.0


@pytest.mark.parametrize("bad", [{"ttl": 0}, {"ttl": -1.0}, {"max_bytes": 0}, {"max_bytes": 1.5}])
async def test_bad_settings_are_refused(tmp_path: Path, bad: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        SQLiteCallCache(tmp_path / "cache.sqlite", **bad)  # type: ignore[arg-type]


async def test_a_file_that_is_not_a_cache_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ConfigurationError, match="cannot be used as a sub-call cache"):
        SQLiteCallCache(path)


async def joined(cache: SQLiteCallCache) -> None:
    """Until every prompt is in flight and another run waits on them."""
    with anyio.fail_after(10):
        while len(cache.in_flight) < PROMPTS or not any(  # noqa: ASYNC110 (the state of two runs: no event)
            flight.done.statistics().tasks_waiting for flight in list(cache.in_flight.values())
        ):
            await anyio.sleep(0.01)


async def test_concurrent_runs_on_one_cache_send_a_request_once(tmp_path: Path) -> None:
    """Two runs asking the same prompts at the same time: one sends each, the other waits for it."""
    both_asked = anyio.Event()
    asked: list[str] = []

    async def slow(request: ModelRequest) -> str:
        asked.append(request.messages[-1].content)
        await both_asked.wait()
        return "ANSWER " + request.messages[-1].content

    cache = SQLiteCallCache(tmp_path / "cache.sqlite", roots=False)
    sub = ScriptedModel(slow, name="sub")
    results: list[str] = []

    async def one_run() -> None:
        async with RLM(root=turn_script(CELLS), sub=sub, cache=cache) as rlm:
            results.append((await rlm.run("the document", "how long are the answers?")).answer)

    async with anyio.create_task_group() as group:
        group.start_soon(one_run)
        group.start_soon(one_run)
        await joined(cache)  # the second run waits on the first's flights instead of sending
        both_asked.set()
    await cache.aclose()
    assert sorted(asked) == sorted(f"item {i}" for i in range(PROMPTS))  # each prompt sent once
    assert results[0] == results[1]
    assert cache.in_flight == {}


COUNT_ANSWERS = [f"answers = llm_query_many(['item %d' % i for i in range({PROMPTS})])\n"
                 "FINAL(str(sum(a.startswith('ANSWER') for a in answers)))"]


def leader_fails(asked: list[str], fail: anyio.Event, answer: anyio.Event | None = None) -> ScriptedModel:
    """A sub-model whose first PROMPTS calls (the leader's) are held until ``fail``, then refused;
    the later ones answer (once ``answer`` is set, if given)."""

    async def reply(request: ModelRequest) -> str:
        asked.append(request.messages[-1].content)
        if len(asked) <= PROMPTS:
            await fail.wait()
            raise RuntimeError("the provider failed")
        if answer is not None:
            await answer.wait()
        return "ANSWER " + request.messages[-1].content

    return ScriptedModel(reply, name="sub")


async def counting_run(cache: SQLiteCallCache, sub: ScriptedModel, answers: list[str], **options: Any) -> None:
    """A run counting the answers of its batch; its answer (or, for the leader, whose batch failed,
    the exception's name) goes to ``answers``."""
    async with RLM(root=turn_script(COUNT_ANSWERS), sub=sub, cache=cache, **options) as rlm:
        try:
            answers.append((await rlm.run("the document", "count")).answer)
        except Exception as exc:
            answers.append(type(exc).__name__)


async def until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 (the state of several runs: no event)
            await anyio.sleep(0.01)


async def test_a_failed_flight_is_sent_again_by_those_who_waited(tmp_path: Path) -> None:
    release = anyio.Event()
    asked: list[str] = []
    cache = SQLiteCallCache(tmp_path / "cache.sqlite", roots=False)
    sub = leader_fails(asked, release)
    answers: list[str] = []
    async with anyio.create_task_group() as group:
        group.start_soon(counting_run, cache, sub, answers)
        group.start_soon(counting_run, cache, sub, answers)
        await joined(cache)
        release.set()
    await cache.aclose()
    assert str(PROMPTS) in answers  # the second run sent each prompt itself and got every answer
    assert len(asked) == 2 * PROMPTS


async def test_a_resent_flight_is_joined_by_a_run_asking_after_the_failure(tmp_path: Path) -> None:
    """The leader's calls fail; the run that waited sends them again; a third run asking now
    waits on that resend instead of paying for its own copy."""
    fail, answer = anyio.Event(), anyio.Event()
    asked: list[str] = []
    cache = SQLiteCallCache(tmp_path / "cache.sqlite", roots=False)
    sub = leader_fails(asked, fail, answer)  # the waiter's resends held until the third run has joined them
    answers: list[str] = []
    async with anyio.create_task_group() as group:
        group.start_soon(partial(counting_run, cache, sub, answers, max_turns=1))
        await until(lambda: len(cache.in_flight) == PROMPTS)
        group.start_soon(partial(counting_run, cache, sub, answers, max_turns=1))
        await joined(cache)
        fail.set()
        await until(lambda: len(asked) == 2 * PROMPTS)  # the waiter's resends, in flight
        group.start_soon(partial(counting_run, cache, sub, answers, max_turns=1))
        await joined(cache)  # the third run waits on the resends
        answer.set()
    await cache.aclose()
    assert answers.count(str(PROMPTS)) == 2  # the waiter and the third run got every answer
    assert len(asked) == 2 * PROMPTS  # the third run sent nothing


async def test_an_answer_with_a_lone_surrogate_is_journaled_and_cached_as_it_was(tmp_path: Path) -> None:
    """Model text may hold a lone surrogate: SQLite cannot store it as TEXT, and the writers kept on."""
    odd = "ANSWER \ud83d half an emoji"
    cells = ["answers = llm_query_many(['a', 'b'])\nprint(len(answers))", "FINAL(answers[0])"]
    cache, journal = tmp_path / "cache.sqlite", tmp_path / "journal.sqlite"
    async with RLM(root=turn_script(cells), sub=ScriptedModel(lambda r: odd, name="sub"), cache=cache,
                   journal=journal) as rlm:
        first = await rlm.run("the document", "what?")
        second = await rlm.run("the document", "what?")  # answered from the cache: the same text
    assert first.answer == second.answer == "ANSWER ? half an emoji"  # the sandbox's wire carries UTF-8 only
    assert rlm.journal is not None and rlm.journal.failure is None and rlm.cache is not None
    reader = Journal(journal)
    record = reader.read_run(first.run_id)
    reader.close()
    assert record is not None and {call.text for call in record.calls if call.role == "sub"} == {odd}
    fresh = SQLiteCallCache(cache)
    assert sum(hit is not None for hit in await fresh.lookup(
        [key for key in [call.key for call in record.calls if call.role == "sub"]])) == 2
    await fresh.aclose()


async def test_a_budget_refusal_reaches_the_sandbox_as_itself_with_a_cache(tmp_path: Path) -> None:
    cell = ("try:\n    llm_query_many(['p%d' % i for i in range(5)])\n"
            "except Exception as exc:\n    FINAL(type(exc).__name__ + ': ' + str(exc)[:60])")
    async with RLM(root=turn_script([cell]), sub=sub_model(), cache=tmp_path / "cache.sqlite",
                   budget=Budget(max_calls=3)) as rlm:
        result = await rlm.run("the document", "how long?")
    assert result.answer.startswith("BudgetExceededError: "), result.answer


def test_a_long_prefix_repeated_across_a_batch_is_hashed_once_and_still_tells_requests_apart() -> None:
    """Sandbox code sets a batch's size and its prefix: keying must not cost prefix x items."""
    from rlmflow import Message
    from rlmflow.durable import keys

    model = ScriptedModel(["x"], name="sub")
    prefix = "a long shared chunk " * 100_000
    before = keys._long_digest.cache_info().misses
    made = {keys.request_key(model, ModelRequest(messages=(Message("user", prefix), Message("user", f"q{i % 50}")),
                                                 max_tokens=64)) for i in range(1000)}
    assert keys._long_digest.cache_info().misses - before == 1
    assert len(made) == 50
    other = keys.request_key(model, ModelRequest(messages=(Message("user", prefix + "!"), Message("user", "q0")),
                                                 max_tokens=64))
    assert other not in made


async def test_answers_the_cache_gave_a_journaled_run_stay_free_when_it_is_replayed(tmp_path: Path) -> None:
    cache, journal = tmp_path / "cache.sqlite", tmp_path / "journal.sqlite"
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache) as rlm:
        await rlm.run("the document", "how long are the answers?")
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=cache, journal=journal) as rlm:
        cached = await rlm.run("the document", "how long are the answers?")
    assert cached.spent.calls == 0
    async with RLM(root=turn_script(CELLS), sub=sub_model(), replay=journal, budget=Budget(max_calls=3)) as rlm:
        replayed = await rlm.run("the document", "how long are the answers?")  # 14 calls, none of them paid
    assert replayed.answer == cached.answer and replayed.spent.calls == 0
    assert replayed.usage["sub"].cached_calls == PROMPTS and replayed.usage["sub"].calls == 0


async def test_an_answer_cut_at_max_tokens_is_not_kept(tmp_path: Path) -> None:
    cut = ScriptedModel(lambda r: "ANSWER " + r.messages[-1].content, name="sub")
    cache = tmp_path / "cache.sqlite"
    for _ in range(2):
        subs_only = SQLiteCallCache(cache, roots=False)
        async with RLM(root=turn_script(CELLS), sub=CutModel(cut), cache=subs_only) as rlm:
            await rlm.run("the document", "how long are the answers?")
        await subs_only.aclose()
    assert len(cut.requests) == 2 * PROMPTS  # asked again: a cut answer is not an answer to keep


class CutModel(ModelView):
    """Every answer of ``model`` reported as cut at the output limit."""

    async def request(self, request: ModelRequest) -> ModelResponse:
        response = await self.model.request(request)
        return ModelResponse(response.text, response.usage, response.model, "length")


def test_a_requests_choices_and_schema_are_part_of_the_key_and_keys_without_them_are_unchanged() -> None:
    from rlmflow.durable.keys import request_key
    from rlmflow.models.base import Message, ModelRequest

    model = ScriptedModel(["x"])
    plain = ModelRequest(messages=(Message("user", "Which kind?"),), max_tokens=16)
    scored = ModelRequest(messages=plain.messages, max_tokens=16, choices=("lookup", "count"))
    keys = {request_key(model, plain), request_key(model, scored),
            request_key(model, ModelRequest(messages=plain.messages, max_tokens=16, choices=("count", "lookup"))),
            request_key(model, ModelRequest(messages=plain.messages, max_tokens=16, json_schema={"type": "object"}))}
    assert len(keys) == 4
    # a request with neither is keyed as before ``choices`` existed (journals and caches written then stay valid)
    assert request_key(model, plain) == "9406b390bc9e43a25d1f1d17f38c6e2cca4561364bad16e1968de68c908ad2b3"
