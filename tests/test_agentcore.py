"""The AgentCore sandbox against a local fake of the data-plane API that really runs the code.

The fake checks SigV4 signatures made by aioboto3, answers with real event-stream frames, and runs
each session in a Python process of its own; these tests drive it exactly as AWS would be driven.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from rlmflow import RLM, ModelRequest, SandboxError, ScriptedModel
from rlmflow.dispatch.retry import RetryPolicy
from rlmflow.sandbox import AgentCoreSandbox
from rlmflow.sandbox.agentcore_protocol import MARKER, Malformed, check_done, parse_status, pieces, valid_calls
from rlmflow.sandbox.base import Context

from .fakes.fake_agentcore import FakeAgentCoreServer, encode_event
from .helpers import repl, turn_script

pytestmark = pytest.mark.anyio

ACCESS_KEY, SECRET_KEY = "AKIDHOSTONLY0001", "host-secret-key-never-remote"


@pytest.fixture
async def server() -> AsyncIterator[FakeAgentCoreServer]:
    async with FakeAgentCoreServer(access_key=ACCESS_KEY, secret_key=SECRET_KEY) as fake:
        yield fake


def make_sandbox(server: FakeAgentCoreServer, *, secret: str = SECRET_KEY, **options: Any) -> AgentCoreSandbox:
    session = aioboto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=secret, region_name="us-east-1")
    return AgentCoreSandbox(session=session, region_name="us-east-1", endpoint_url=server.endpoint_url, **options)


async def no_calls(fn: str, args: dict[str, Any]) -> Any:
    raise AssertionError(f"unexpected host call {fn}")


def context_writes(server: FakeAgentCoreServer) -> list[str]:
    return [w.arguments["content"][0]["text"] for w in server.tool_calls("writeFiles")
            if "/context/" in w.arguments["content"][0]["path"]]


def context_written(server: FakeAgentCoreServer) -> str:
    return "".join(context_writes(server))


def everything_sent(server: FakeAgentCoreServer) -> str:
    return json.dumps([{"body": r.body, "arguments": r.arguments} for r in server.requests])


async def test_full_run_fans_out_through_the_host_and_finishes(server: FakeAgentCoreServer) -> None:
    document = "".join(f"[part {i}] " + "filler " * 400 for i in range(6))
    cells = [
        "parts = [p for p in context.split('[part ') if p]\n"
        "answers = llm_query_many(['summarise: ' + p[:12] for p in parts])\n"
        "print(len(answers), budget()['depth'])",
        "FINAL(' | '.join(answers))",
    ]
    sub = ScriptedModel(lambda r: r.messages[-1].content.upper(), name="sub")
    provider = TracerProvider()
    sandbox = make_sandbox(server, max_request_bytes=16384)
    async with RLM(root=turn_script(cells), sub=sub, sandbox=sandbox, tracer_provider=provider) as rlm:
        result = await rlm.run(document, "Summarise each part.")

    assert result.answer == " | ".join(f"SUMMARISE: {i}] FILLER FI" for i in range(6))
    assert len(sub.requests) == 6 and result.turns == 2
    assert result.transcript[0].cells[0].output.strip() == "6 0"
    # one remote session, its context written in bounded chunks, stopped at the end
    assert len(server.sessions) == 1 and not server.live_sessions
    assert context_written(server) == document and len(context_writes(server)) == 2
    # every request was signed with the host's credentials and carried the run's trace
    assert server.rejected_signatures == 0
    (session,) = server.sessions.values()
    assert session.traceparent is not None and result.trace_id in session.traceparent
    assert all(result.trace_id in r.headers.get("traceparent", "") for r in server.tool_calls())
    assert result.sandbox is not None and result.sandbox.backend == "agentcore" and result.sandbox.filesystem


async def test_rlm_query_children_get_sessions_of_their_own(server: FakeAgentCoreServer) -> None:
    def reply(request: ModelRequest) -> str:
        task = request.messages[1].content
        if "Question: child" in task:
            return repl("FINAL('leaf:' + context[:5] + ':' + llm_query('q'))")
        return repl("FINAL(' '.join(rlm_query_many(['child a', 'child b'], ['alpha doc', 'beta doc'])))")

    sub = ScriptedModel(lambda r: "sub", name="sub")
    root = ScriptedModel(reply, name="root")
    async with RLM(root=root, sub=sub, sandbox=make_sandbox(server), max_depth=1) as rlm:
        result = await rlm.run("parent document", "top")
    assert result.answer == "leaf:alpha:sub leaf:beta :sub"
    assert len(server.sessions) == 3 and not server.live_sessions


async def test_context_written_in_chunks_reads_back_equal(server: FakeAgentCoreServer) -> None:
    text = "".join(f"{i}: naïve café — 東京 🚀 line\n" for i in range(4000))
    sandbox = make_sandbox(server, max_request_bytes=16384)
    async with sandbox.session(text, no_calls) as session:
        code = "import hashlib\nprint(len(context), hashlib.sha256(context.encode()).hexdigest())"
        cell = await session.execute(code)
    assert cell.error is None
    assert cell.output.split() == [str(len(text)), hashlib.sha256(text.encode()).hexdigest()]
    assert context_written(server) == text
    encoded = [len(json.dumps(piece)) for piece in context_writes(server)]
    assert max(encoded) <= 16384 and len(encoded) >= math.ceil(len(json.dumps(text)) / 16384)


@pytest.mark.parametrize("context", [["first doc", "second doc"], {"a.txt": "alpha", "b.txt": "beta"}])
async def test_lists_and_dicts_arrive_as_python_values(server: FakeAgentCoreServer, context: Context) -> None:
    async with make_sandbox(server).session(context, no_calls) as session:
        cell = await session.execute("print(type(context).__name__, context)")
    assert cell.output.strip() == f"{type(context).__name__} {context}"


async def test_state_persists_errors_and_output_cap(server: FakeAgentCoreServer) -> None:
    async with make_sandbox(server, max_output_chars=1000).session("ctx", no_calls) as session:
        assert (await session.execute("x = 20\ndef double(v):\n    return 2 * v")).error is None
        assert (await session.execute("len(chunks(1)), len(grep('ct'))")).output == "(1, 1)\n"  # the helpers
        assert (await session.execute("double(x) + 2")).output == "42\n"
        failed = await session.execute("undefined_name")
        assert failed.error is not None and "NameError" in failed.error and "<cell 4>" in failed.error
        flood = await session.execute("print('y' * 100_000)")
        assert flood.output_chars == 100_001 and len(flood.output) < 1200 and "omitted" in flood.output
        assert (await session.execute("import threading\nthreading.Thread(target=print, args=('bg',)).start()\n"
                                      "import time; time.sleep(0.05)\nprint(x)")).output == "bg\n20\n"
        assert session.restarts == 0


async def test_control_characters_from_the_remote_side_are_shown_not_obeyed(server: FakeAgentCoreServer) -> None:
    async with make_sandbox(server).session("ctx", no_calls) as session:
        result = await session.execute(
            "print('\\x1b[2J\\x1b]0;owned\\x07red\\rback')\nFINAL('\\x1b[1mbold\\x1b[0m answer')\n"
            "raise ValueError('\\x1b[5mblink')"
        )
    for text in (result.output, result.final or "", result.error or ""):
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "red\\x0dback" in result.output and result.final == "bold answer"


async def test_session_stopped_when_a_run_is_cancelled_in_a_host_call(server: FakeAgentCoreServer) -> None:
    scope = anyio.CancelScope()

    async def cancelling_bridge(fn: str, args: dict[str, Any]) -> Any:
        scope.cancel()
        await anyio.sleep_forever()

    with scope:
        async with make_sandbox(server).session("ctx", cancelling_bridge) as session:
            await session.execute("llm_query('never answered')")
    assert scope.cancelled_caught
    (fake,) = server.sessions.values()
    assert fake.stopped and fake.process.returncode is not None
    assert server.requests[-1].operation == "StopCodeInterpreterSession"


async def test_session_stopped_when_cancelled_during_an_api_call(server: FakeAgentCoreServer) -> None:
    sandbox = make_sandbox(server, poll_wait=30.0)  # the start call waits in the remote session for the cell

    async def run() -> None:
        async with sandbox.session("ctx", no_calls) as session:
            await session.execute("while True:\n    pass")

    cell_started = anyio.Event()
    server.on_request = lambda r: ".control('start'" in r.arguments.get("code", "") and cell_started.set()
    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await cell_started.wait()
        tg.cancel_scope.cancel()
    assert len(server.sessions) == 1 and not server.live_sessions
    assert server.requests[-1].operation == "StopCodeInterpreterSession"


async def test_timeout_interrupts_and_keeps_variables_or_replaces_the_session(server: FakeAgentCoreServer) -> None:
    sandbox = make_sandbox(server, cell_timeout=1.0, interrupt_grace=0.5, poll_wait=0.2)
    async with sandbox.session("ctx", no_calls) as session:
        await session.execute("kept = 'yes'")
        loop = await session.execute("while True:\n    pass")
        assert loop.timed_out and not loop.restarted
        assert loop.error is not None and loop.error.startswith("TimeoutError") and "Variables are kept" in loop.error
        assert (await session.execute("kept")).output == "'yes'\n"
        first = session.session_id
        hang = await session.execute("import time\ntime.sleep(60)")  # C-level: no interrupt reaches it
        assert hang.timed_out and hang.restarted and "replaced" in (hang.error or "")
        assert session.session_id != first and server.sessions[str(first)].stopped
        after = await session.execute("print(len(context), 'kept' in globals())")
        assert after.output == "3 False\n"


async def test_a_cell_that_kills_the_interpreter_is_reported_and_replaced(server: FakeAgentCoreServer) -> None:
    async with make_sandbox(server, max_request_bytes=16384).session("ctx", no_calls) as session:
        await session.execute("import os\nos.chdir('/')\nv = 1")
        big = await session.execute("x = '" + "y" * 30_000 + "'\nprint(len(x), os.getcwd())")  # args as files
        assert big.output == "30000 /\n"
        dead = await session.execute("import os\nos._exit(3)")
        assert dead.restarted and dead.error is not None and dead.error.startswith("SandboxCrash")
        assert (await session.execute("print('v' in globals(), context)")).output == "False ctx\n"
    assert len(server.sessions) == 2 and not server.live_sessions


async def test_expired_session_is_replaced_and_the_cell_reported(server: FakeAgentCoreServer) -> None:
    async with make_sandbox(server).session("ctx", no_calls) as session:
        await session.execute("v = 1")
        await server.expire(str(session.session_id))
        lost = await session.execute("print('v' in globals(), context)")
        assert lost.restarted and lost.error is not None and "ResourceNotFoundException" in lost.error
        assert any("variables" in note.lower() for note in lost.notes)
        cell = await session.execute("print('v' in globals(), context)")
    assert cell.output == "False ctx\n" and not cell.restarted
    assert len(server.sessions) == 2 and not server.live_sessions
    with pytest.raises(SandboxError, match="closed"):  # no session is started behind a closed one's back
        await session.execute("1")
    assert len(server.sessions) == 2


FORGE = "import sys\nrt = sys.modules['_rlmflow_runtime']\nrt._dispatch = lambda method, args: STATUS\n"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("{'state': 'calls', 'cell': 2, 'calls': [{'id': 1, 'fn': 'open_url', 'args': {'url': 'http://x'}}]}",
         "unknown host function"),
        ("{'state': 'calls', 'cell': 2, 'calls': [{'id': '1', 'fn': 'budget', 'args': {}}]}", "valid id"),
        ("{'state': 'done', 'cell': 2, 'output': 'z' * 3_000_000, 'error': None}", "more than"),
        ("{'state': 'done', 'cell': 2, 'output': ['not', 'text'], 'error': None}", "wrong type"),
        ("{'state': 'done', 'cell': 99, 'output': '', 'error': None}", "cell 99"),
        ("{'state': 'teleport'}", "unexpected status"),
    ],
)
async def test_forged_or_oversized_answers_from_the_remote_side(
    server: FakeAgentCoreServer, status: str, expected: str
) -> None:
    """Code in the remote session replaces the runtime's answers: the host refuses and recovers."""
    calls: list[str] = []

    async def recording_bridge(fn: str, args: dict[str, Any]) -> Any:
        calls.append(fn)
        return {}

    sandbox = make_sandbox(server, max_response_chars=1_000_000)
    async with sandbox.session("ctx", recording_bridge) as session:
        assert (await session.execute(FORGE.replace("STATUS", status))).error is None
        cell = await session.execute("print('second cell')")
        assert cell.restarted and cell.error is not None and cell.error.startswith("SandboxCrash")
        assert expected in cell.error
        assert (await session.execute("print(context)")).output == "ctx\n"
    assert calls == []
    assert len(server.sessions) == 2 and not server.live_sessions


async def test_no_host_credentials_or_environment_reach_the_remote_session(
    server: FakeAgentCoreServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = {"OPENAI_API_KEY": "sk-planted-openai-0001", "AWS_SESSION_TOKEN": "planted-session-token-0002",
               "RLMFLOW_SECRET_PLANT": "planted-value-0003"}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    cells = ["import os\nprint(sorted(os.environ))\nanswer = llm_query('what is 6 * 7?')",
             "FINAL(answer)"]
    sub = ScriptedModel(lambda r: "42", name="sub")
    async with RLM(root=turn_script(cells), sub=sub, sandbox=make_sandbox(server)) as rlm:
        result = await rlm.run("document", "question")
    assert result.answer == "42"
    seen_remote = result.transcript[0].cells[0].output
    sent = everything_sent(server)
    for name, value in planted.items():
        assert name not in seen_remote and value not in sent
    assert SECRET_KEY not in sent and ACCESS_KEY not in sent


async def test_large_answers_and_cells_travel_as_files(server: FakeAgentCoreServer) -> None:
    async def big_bridge(fn: str, args: dict[str, Any]) -> Any:
        return [p * 5000 for p in args["prompts"]]

    sandbox = make_sandbox(server, max_request_bytes=16384)
    async with sandbox.session("ctx", big_bridge) as session:
        cell = await session.execute("r = llm_query_many(['ab', 'cd'])\nprint([len(x) for x in r], r[1][:4])")
        assert cell.output == "[10000, 10000] cdcd\n"
        spilled = len([w for w in server.tool_calls("writeFiles") if "/args/" in w.arguments["content"][0]["path"]])
        assert spilled == 2  # ~27 kB of encoded answers in parts under 16 kB
        long_cell = "total = 0\n" + "total += 1\n" * 3000 + "print(total)"
        assert (await session.execute(long_cell)).output == "3000\n"
    assert max(len(json.dumps(r.body)) for r in server.requests) <= 16384


async def test_host_calls_from_several_threads_of_a_cell(server: FakeAgentCoreServer) -> None:
    in_flight, most = 0, 0
    release = anyio.Event()

    async def slow_bridge(fn: str, args: dict[str, Any]) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        if most == 4:
            release.set()
        with anyio.move_on_after(2):  # served together when the remote reports them together
            await release.wait()
        in_flight -= 1
        return [p.upper() for p in args["prompts"]]

    code = ("from concurrent.futures import ThreadPoolExecutor\n"
            "with ThreadPoolExecutor(4) as pool:\n"
            "    print(sorted(pool.map(llm_query, ['a', 'b', 'c', 'd'])))")
    async with make_sandbox(server).session("ctx", slow_bridge) as session:
        cell = await session.execute(code)
    assert cell.error is None and cell.output == "['A', 'B', 'C', 'D']\n"
    assert most >= 2  # at least some calls of different threads were in flight at once


async def test_host_errors_reach_model_code_as_exceptions(server: FakeAgentCoreServer) -> None:
    from rlmflow import BatchError, ThrottledError

    async def failing_bridge(fn: str, args: dict[str, Any]) -> Any:
        raise BatchError("1 of 2 failed", results=["ok", None], errors={1: ThrottledError("slow down")})

    async with make_sandbox(server).session("ctx", failing_bridge) as session:
        cell = await session.execute(
            "try:\n    llm_query_many(['a', 'b'])\nexcept BatchError as e:\n    print(e.results, e.failed_indices)"
        )
    assert cell.error is None and cell.output == "['ok', None] [1]\n"


async def test_throttled_calls_are_retried_with_the_injected_sleep(server: FakeAgentCoreServer) -> None:
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    server.throttle = {"StartCodeInterpreterSession": 2, "InvokeCodeInterpreter": 1}
    sandbox = make_sandbox(server, sleep=fake_sleep, retry=RetryPolicy(max_attempts=4, base_delay=0.1, seed=1))
    async with sandbox.session("ctx", no_calls) as session:
        assert (await session.execute("1 + 1")).output == "2\n"
    assert len(waits) == 3 and all(w >= 0 for w in waits)


async def test_throttled_past_the_retries_is_a_sandbox_error(server: FakeAgentCoreServer) -> None:
    server.throttle = {"StartCodeInterpreterSession": 10}
    sandbox = make_sandbox(server, sleep=lambda s: anyio.lowlevel.checkpoint(), retry=RetryPolicy(max_attempts=2))
    with pytest.raises(SandboxError, match=r"ThrottlingException.*after 2 attempts"):
        async with sandbox.session("ctx", no_calls):
            pass
    assert not server.sessions


async def test_validation_and_access_errors_are_explained(server: FakeAgentCoreServer) -> None:
    server.max_session_timeout = 600
    with pytest.raises(SandboxError, match="ValidationException: sessionTimeoutSeconds must be between 1 and 600"):
        async with make_sandbox(server, session_timeout=3600).session("ctx", no_calls):
            pass
    with pytest.raises(SandboxError, match=r"AccessDeniedException.*InvokeCodeInterpreter"):
        async with make_sandbox(server, secret="wrong-secret").session("ctx", no_calls):
            pass
    assert server.rejected_signatures == 1 and not server.sessions


def test_event_frames_parse_with_botocore() -> None:
    from botocore.eventstream import EventStreamBuffer

    buffer = EventStreamBuffer()
    frame = encode_event({":message-type": "event", ":event-type": "result"}, b'{"content": []}')
    buffer.add_data(frame + frame)
    messages = list(buffer)
    assert len(messages) == 2 and messages[0].headers[":event-type"] == "result"
    assert messages[1].payload == b'{"content": []}'



@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=0, max_size=3000), limit=st.integers(min_value=16, max_value=700))
def test_pieces_fit_the_request_bound_and_rebuild_the_text(text: str, limit: int) -> None:
    parts = pieces(text, limit)
    assert "".join(parts) == text
    assert all(len(json.dumps(part)) <= limit for part in parts)
    assert all(parts) or parts == [""]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=120, deadline=None)
@given(status=st.dictionaries(st.sampled_from(["state", "cell", "calls", "output", "error", "final", "x"]),
                              json_values, max_size=6))
def test_any_status_is_accepted_in_shape_or_refused(status: dict[str, Any]) -> None:
    line = MARKER + json.dumps(status)
    try:
        parsed = parse_status({"stdout": "noise\n" + line + "\n", "stderr": "", "is_error": False}, 10_000)
        calls = valid_calls(parsed, 1) if parsed.get("state") == "calls" else []
        done = check_done(parsed, 1) if parsed.get("state") == "done" else None
    except Malformed:
        return
    for call_id, fn, args in calls:
        assert type(call_id) is int and fn in {"llm_query_many", "rlm_query_many", "budget"} and isinstance(args, dict)
    if done is not None:
        assert isinstance(done["output"], str) and done["cell"] == 1
