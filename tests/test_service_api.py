"""The service API: per-run options, tenant ledgers, the shared default Dispatcher, cancellation
with partial results, deadlines, the event stream, and the example ASGI app over SSE."""

from __future__ import annotations

import json
import time

import anyio
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import (
    RLM,
    AnswerReady,
    BatchError,
    Budget,
    BudgetExceededError,
    BudgetLedger,
    ModelRequest,
    NoAnswerError,
    RunEvent,
    RunFailed,
    RunStarted,
    ScriptedModel,
    default_dispatcher,
)

from .helpers import load_example, repl, turn_script
from .processes import gone, wait_for_worker, worker_processes

pytestmark = pytest.mark.anyio

FAN_OUT = "a = llm_query_many([f'item {i}' for i in range(5)])\nprint(len(a))"


async def test_per_run_overrides_and_metadata() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    root = turn_script(["print(1)", "print(2)", "FINAL('late')"])
    async with RLM(root=root, max_turns=5, tracer_provider=provider) as rlm:
        with pytest.raises(NoAnswerError) as caught:
            await rlm.run("doc", "q?", max_turns=2, metadata={"tenant": "acme"})
        partial = caught.value.partial
        assert partial.turns == 2 and partial.metadata == {"tenant": "acme"}
        result = await rlm.run("doc", "q?")  # the RLM's own default again
    assert result.answer == "late" and result.turns == 3
    runs = [s for s in exporter.get_finished_spans() if s.name.startswith("invoke_agent")]
    assert runs[0].attributes["rlm.metadata.tenant"] == "acme"
    assert "rlm.metadata.tenant" not in runs[1].attributes


async def test_tenant_ledger_is_shared_and_never_overspent() -> None:
    tenant = BudgetLedger(Budget(max_calls=12))
    sub = ScriptedModel(lambda r: "x", name="sub")
    root = turn_script([FAN_OUT, FAN_OUT, FAN_OUT, "FINAL('done')"])

    async def one(rlm: RLM, results: list[object]) -> None:
        try:
            results.append(await rlm.run("doc", "q?", ledger=tenant))
        except BudgetExceededError as exc:
            results.append(exc)

    results: list[object] = []
    async with RLM(root=root, sub=sub) as rlm, anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one, rlm, results)
    assert tenant.spent.calls <= 12
    assert tenant.spent.calls == len(sub.requests) + len(root.requests)
    stopped = [r for r in results if isinstance(r, BudgetExceededError)]
    assert stopped, "a 12-call tenant cap cannot pay for three 19-call runs"
    # every call paid for is accounted to exactly one run, finished or stopped
    spent = [r.spent.calls if not isinstance(r, BudgetExceededError) else r.partial.spent.calls for r in results]
    assert sum(spent) == tenant.spent.calls


async def test_rlms_share_the_default_dispatcher_and_their_own_tracer() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sub = ScriptedModel(lambda r: "x", name="shared-sub")
    first = RLM(root=turn_script([FAN_OUT, "FINAL('1')"]), sub=sub, tracer_provider=provider)
    second = RLM(root=turn_script([FAN_OUT, "FINAL('2')"]), sub=sub)
    assert first.dispatcher is second.dispatcher is default_dispatcher()
    await first.run("doc", "q?")
    await second.run("doc", "q?")
    lane = next(s for s in default_dispatcher().statistics() if s.key.endswith("shared-sub"))
    assert lane.completed == 10
    chat = [s for s in exporter.get_finished_spans() if s.name.startswith("chat")]
    assert len(chat) == 7  # the first RLM's 2 root turns + 5 sub-calls; none of the second's


async def test_deadline_stops_a_busy_cell_and_keeps_the_partial_result() -> None:
    root = turn_script(["print('warm')", "import time\ntime.sleep(60)"])
    workers: set[tuple[int, int]] = set()

    def on_event(event: RunEvent) -> None:
        if event.kind == "code" and "sleep" in getattr(event, "code", ""):
            workers.update(worker_processes())  # the worker (and bubblewrap's processes) of this run

    # the deadline leaves room to start the worker and run the first turn under load (1.5 s did not)
    deadline = 5.0
    async with RLM(root=root) as rlm:
        started = time.monotonic()
        with pytest.raises(BudgetExceededError) as caught:
            await rlm.run("doc", "q?", deadline=deadline, events=on_event)
        elapsed = time.monotonic() - started
    assert caught.value.limit == "deadline"
    assert caught.value.partial.turns == 1 and caught.value.partial.calls
    assert elapsed < deadline + 2.0  # generous here; benchmarks/ measures the real overshoot
    assert workers, "the worker of the run was not found while it ran"
    assert await gone(workers) == set()


async def test_cancelled_run_reraises_with_partial_and_leaves_no_worker() -> None:
    root = turn_script(["print('warm')", "import time\ntime.sleep(60)"])
    caught: list[BaseException] = []
    sleeping = anyio.Event()
    workers: set[tuple[int, int]] = set()

    def on_event(event: RunEvent) -> None:
        if event.kind == "code" and "sleep" in getattr(event, "code", ""):
            workers.update(worker_processes())
            sleeping.set()

    async with RLM(root=root) as rlm:

        async def run() -> None:
            try:
                await rlm.run("doc", "q?", events=on_event)
            except BaseException as exc:
                caught.append(exc)
                raise

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await sleeping.wait()
            await anyio.sleep(0.2)  # inside time.sleep in the cell
            tg.cancel_scope.cancel()
    assert isinstance(caught[0], anyio.get_cancelled_exc_class())
    partial = caught[0].partial  # type: ignore[attr-defined]
    assert partial.turns == 1 and len(partial.calls) == 2
    assert workers, "the worker of the run was not found while it ran"
    assert await gone(workers) == set()


async def test_stream_yields_events_in_order() -> None:
    sub = ScriptedModel(lambda r: "x", name="sub")
    async with RLM(root=turn_script([FAN_OUT, "FINAL('streamed')"]), sub=sub) as rlm:
        stream = rlm.stream("doc", "q?", metadata={"request": "r1"})
        kinds = [event.kind async for event in stream]
        result = await stream.wait()
    assert result.answer == "streamed"
    assert kinds[0] == "run_started" and kinds[-1] == "answer"
    assert kinds.count("turn_started") == 2 and kinds.count("code") == 2
    assert kinds.count("call_done") == 7 and kinds.count("batch_started") == 1
    assert kinds.index("batch_started") < kinds.index("batch_finished") < kinds.index("cell_output")


async def test_stream_reports_failure_and_reader_leaving_cancels_the_run() -> None:
    root = turn_script(["print('no final')"])
    async with RLM(root=root, max_turns=2) as rlm:
        stream = rlm.stream("doc", "q?")
        events = [event async for event in stream]
        assert isinstance(events[0], RunStarted) and isinstance(events[-1], RunFailed)
        assert events[-1].error == "NoAnswerError"
        with pytest.raises(NoAnswerError):
            await stream.wait()

        slow = RLM(root=turn_script(["import time\ntime.sleep(60)"]))
        workers: set[tuple[int, int]] = set()
        async with slow.stream("doc", "q?") as events_:
            async for event in events_:
                if event.kind == "code":
                    workers = await wait_for_worker()
                    break
        assert workers, "the worker of the run was not found while it ran"
        assert await gone(workers) == set()


async def test_history_is_trimmed_for_small_windows() -> None:
    turns = iter(range(100))

    def reply(request: ModelRequest) -> str:  # the transcript is trimmed: count turns here
        n = next(turns)  # each cell differs: a repeated cell with the same output would end the run early
        return repl(f"print('x' * 3000, {n})" if n < 6 else "FINAL('ok')")

    root = ScriptedModel(reply, name="root")
    async with RLM(root=root, history_chars=9000, max_feedback_chars=4000) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == "ok"
    last = root.requests[-1].messages
    assert sum(len(m.content) for m in last[2:]) < 9000
    assert any("earlier messages omitted" in m.content for m in last)
    assert last[0].role == "system" and "Question: q?" in last[1].content


async def test_a_failing_child_does_not_lose_its_siblings() -> None:
    def root_reply(request: ModelRequest) -> str:
        text = request.messages[1].content
        turns = sum(1 for m in request.messages if m.role == "assistant")
        if "child-bad" in text:
            return repl("raise ValueError('child broke')")
        if "child-" in text:
            return repl("FINAL('fine')")
        if turns == 0:
            return repl(
                "try:\n    rlm_query_many(['child-a', 'child-bad', 'child-c'])\n"
                "except BatchError as e:\n    print(e.failed_indices, e.results)"
            )
        return repl("FINAL('parent done')")

    async with RLM(root=ScriptedModel(root_reply, name="root"), max_turns=3, max_repeated_errors=2) as rlm:
        result = await rlm.run("doc", "parent")
    assert result.answer == "parent done"
    assert "[1] ['fine', None, 'fine']" in result.transcript[0].feedback
    assert BatchError.__name__ == "BatchError"




async def test_example_service_streams_sse_and_charges_the_tenant() -> None:
    service = load_example()
    sub = ScriptedModel(lambda r: "x", name="sub")
    rlm = RLM(root=turn_script([FAN_OUT, "FINAL('over sse')"]), sub=sub)
    app = service.create_app(rlm)  # type: ignore[attr-defined]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service.test") as client:
        response = await client.post("/runs", json={"document": "doc", "query": "q?", "tenant": "acme"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [f for f in response.text.split("\n\n") if f.strip()]
        names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
        assert names[0] == "run_started" and names[-1] == "answer"
        answer = json.loads(frames[-1].split("\n")[1].removeprefix("data: "))
        assert answer["answer"] == "over sse" and answer["kind"] == "answer"
        spend = (await client.get("/tenants/acme/spend")).json()
        assert spend["calls"] == 7
        bad = await client.post("/runs", json={"query": "no document"})
        assert bad.status_code == 400
    assert AnswerReady.kind == "answer"


async def test_usage_above_the_reservation_is_reported_as_overrun() -> None:
    """A provider that ignores max_tokens: the run's result says by how much it went over."""
    from rlmflow import ModelResponse, Usage

    sub = ScriptedModel(lambda r: ModelResponse(text="long", usage=Usage(10, r.max_tokens + 500, 1), model="sub"),
                        name="sub")
    root = turn_script(["a = llm_query_many(['x', 'y'], max_tokens=20)", "FINAL('ok')"])
    async with RLM(root=root, sub=sub) as rlm:
        result = await rlm.run("doc", "q?", budget=Budget(max_output_tokens=100_000))
    assert result.overrun.output_tokens == 2 * 500
    assert result.spent.output_tokens >= 2 * 520


async def test_a_streaming_root_shows_its_reply_as_it_arrives() -> None:
    from rlmflow import OpenAIModel, RootText

    from .fakes import FakeOpenAIServer

    reply = "Counting now.\n```repl\nFINAL(str(context.count('beta')))\n```"
    async with FakeOpenAIServer(root_marker="COUNT-BETA", root_reply=reply) as server:
        root = OpenAIModel("fake", base_url=server.base_url)
        try:
            async with RLM(root=root) as rlm:
                stream = rlm.stream("alpha beta " * 50, "COUNT-BETA please")
                pieces = [e for e in [event async for event in stream] if isinstance(e, RootText)]
                result = await stream.wait()
        finally:
            await root.aclose()
    assert result.answer == "50"
    assert len(pieces) > 1 and "".join(p.text for p in pieces) == reply
