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
    # 2 s for the cells that must finish (their control calls' wall time counts, and load stretches
    # it); 2 s for the interrupted loop to stop (0.5 s could replace the session under load)
    sandbox = make_sandbox(server, cell_timeout=2.0, interrupt_grace=2.0, poll_wait=0.2)
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
    # a wrong secret is a signature AWS cannot reproduce: InvalidSignatureException (403), not AccessDenied
    with pytest.raises(SandboxError, match=r"InvalidSignatureException: The request signature we calculated"):
        async with make_sandbox(server, secret="wrong-secret").session("ctx", no_calls):
            pass
    assert server.rejected_signatures == 1 and not server.sessions
    server.fail = {"InvokeCodeInterpreter": ["AccessDeniedException"]}
    with pytest.raises(SandboxError, match=r"AccessDeniedException.*InvokeCodeInterpreter"):
        async with make_sandbox(server, session_timeout=600).session("ctx", no_calls):
            pass


def recorded_sleeps() -> tuple[list[float], Any]:
    waits: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        waits.append(seconds)

    return waits, fake_sleep


@pytest.mark.parametrize("code", ["InternalServerException", "ThrottlingException"])
async def test_passing_errors_are_retried_before_the_stream_and_inside_it(
    server: FakeAgentCoreServer, code: str
) -> None:
    """botocore's model has two errors that pass with time (429 and the 500 fault it says resolves
    with retries): both are retried, as the HTTP answer and as an exception event in the stream."""
    waits, fake_sleep = recorded_sleeps()
    server.fail = {"StartCodeInterpreterSession": [code], "InvokeCodeInterpreter": [code]}
    server.stream_fail = {"writeFiles": [code], "executeCode": [code, code]}
    sandbox = make_sandbox(server, sleep=fake_sleep, retry=RetryPolicy(max_attempts=3, base_delay=0.1, seed=1))
    async with sandbox.session("ctx", no_calls) as session:
        assert (await session.execute("x = 6 * 7\nprint(x)")).output == "42\n"
        assert (await session.execute("print(x + 1)")).output == "43\n"  # the same session: nothing lost
    assert len(waits) == 5 and session.restarts == 0 and len(server.sessions) == 1
    assert not any(server.fail.values()) and not any(server.stream_fail.values())


async def test_a_retried_start_carries_one_client_token(server: FakeAgentCoreServer) -> None:
    """StartCodeInterpreterSession is idempotent by its clientToken: a start sent again after a 500
    (which may have started a session) names the same token, so AWS answers the same session."""
    waits, fake_sleep = recorded_sleeps()
    server.fail = {"StartCodeInterpreterSession": ["InternalServerException", "InternalServerException"]}
    async with make_sandbox(server, sleep=fake_sleep).session("ctx", no_calls) as session:
        await session.execute("1")
        await session._restart()  # a new session: a new token
    starts = [r.body.get("clientToken") for r in server.requests if r.operation == "StartCodeInterpreterSession"]
    assert len(starts) == 4 and starts[0] == starts[1] == starts[2] and starts[3] != starts[0]
    assert isinstance(starts[0], str) and len(starts[0]) >= 33  # the model's minimum length
    assert len(server.sessions) == 2 and len(waits) == 2


async def test_a_start_sent_twice_with_its_token_is_one_session(server: FakeAgentCoreServer) -> None:
    session = aioboto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
    async with session.client("bedrock-agentcore", endpoint_url=server.endpoint_url) as client:
        token = "rlmflow-token-0123456789abcdef0123456789"
        first = await client.start_code_interpreter_session(codeInterpreterIdentifier="x", clientToken=token)
        again = await client.start_code_interpreter_session(codeInterpreterIdentifier="x", clientToken=token)
        other = await client.start_code_interpreter_session(codeInterpreterIdentifier="x")
    assert first["sessionId"] == again["sessionId"] != other["sessionId"] and len(server.sessions) == 2


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        ("ServiceQuotaExceededException", "too many concurrent sessions"),
        ("ConflictException", "another execution is running"),
        ("AccessDeniedException", "bedrock-agentcore:StartCodeInterpreterSession"),
        ("ValidationException", ""),
    ],
)
async def test_errors_that_do_not_pass_are_not_retried_in_the_stream(
    server: FakeAgentCoreServer, code: str, hint: str
) -> None:
    waits, fake_sleep = recorded_sleeps()
    async with make_sandbox(server, sleep=fake_sleep).session("ctx", no_calls) as session:
        server.stream_fail = {"executeCode": [code]}
        with pytest.raises(SandboxError, match=rf"executeCode failed: {code}: .*{hint}"):
            await session.execute("1")
    assert waits == [] and len(server.tool_calls("executeCode")) == 2  # the boot, then the refused call


async def test_internal_errors_past_the_retries_are_a_sandbox_error(server: FakeAgentCoreServer) -> None:
    server.fail = {"StartCodeInterpreterSession": ["InternalServerException"] * 3}
    sandbox = make_sandbox(server, sleep=lambda s: anyio.lowlevel.checkpoint(), retry=RetryPolicy(max_attempts=3))
    with pytest.raises(SandboxError, match=r"InternalServerException"):
        async with sandbox.session("ctx", no_calls):
            pass
    assert not server.sessions


async def test_a_session_quota_refuses_the_start(server: FakeAgentCoreServer) -> None:
    server.max_sessions = 1
    async with make_sandbox(server).session("ctx", no_calls):
        with pytest.raises(SandboxError, match=r"ServiceQuotaExceededException.*too many concurrent sessions"):
            async with make_sandbox(server).session("ctx", no_calls):
                pass
    assert len(server.sessions) == 1


async def test_a_session_lost_inside_the_stream_is_a_crash_of_that_cell(server: FakeAgentCoreServer) -> None:
    async with make_sandbox(server).session("ctx", no_calls) as session:
        await session.execute("x = 1")
        server.stream_fail = {"executeCode": ["ResourceNotFoundException"]}
        cell = await session.execute("x = 2")
        after = await session.execute("print('x' in globals())")
    assert cell.error is not None and "SandboxCrash" in cell.error and "ResourceNotFoundException" in cell.error
    assert cell.restarted and session.restarts == 1 and after.output == "False\n"


async def test_one_execution_at_a_time_in_a_session(server: FakeAgentCoreServer) -> None:
    """The fake refuses an executeCode while another runs in the same session (ConflictException, 409)."""
    from botocore.exceptions import ClientError

    boto = aioboto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
    wait = "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.01)\nprint('done')"
    async with boto.client("bedrock-agentcore", endpoint_url=server.endpoint_url) as client:
        started = await client.start_code_interpreter_session(codeInterpreterIdentifier="x")
        session_id = started["sessionId"]
        fake = server.sessions[session_id]

        async def execute(code: str) -> str:
            response = await client.invoke_code_interpreter(
                codeInterpreterIdentifier="x", sessionId=session_id, name="executeCode",
                arguments={"code": code, "language": "python"},
            )
            return "".join([e["result"]["structuredContent"]["stdout"] async for e in response["stream"]])

        outputs: list[str] = []

        async def first() -> None:
            outputs.append(await execute(wait))

        running = anyio.Event()
        server.on_execute = lambda session: running.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            with anyio.fail_after(60):  # a guard against a fake that never runs it, not a timing check
                await running.wait()  # the first execution holds the session
            with pytest.raises(ClientError) as conflict:
                await execute("print('second')")
            (fake.directory / "go").touch()
        assert await execute("print('third')") == "third\n"
    assert outputs == ["done\n"] and server.conflicts == 1
    assert conflict.value.response["Error"]["Code"] == "ConflictException"
    assert conflict.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409


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


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _in_shape(status: dict[str, Any]) -> bool:
    """Whether the host must accept ``status`` about cell 1, from the schema docs/agentcore.md gives
    (written here apart from agentcore_protocol, the code under test)."""
    if not _finite(status) or not isinstance(status.get("state"), str):
        return False  # Infinity is not strict JSON; a status is an object with a state
    state, cell = status["state"], status.get("cell")
    if state == "calls":
        calls = status.get("calls")
        if set(status) - {"state", "cell", "calls"} or type(cell) is not int or cell != 1:
            return False
        if type(calls) is not list or not calls:
            return False
        ids = [c.get("id") if type(c) is dict else None for c in calls]
        return (all(type(c) is dict and set(c) == {"id", "fn", "args"} and type(c["args"]) is dict
                    and c["fn"] in {"llm_query_many", "rlm_query_many", "budget"} for c in calls)
                and all(type(i) is int and 0 < i < 2**53 for i in ids) and ids == sorted(set(ids)))
    if state == "done":
        return (not set(status) - {"state", "cell", "output", "error", "final"} and type(cell) is int and cell == 1
                and type(status.get("output")) is str
                and all(status.get(k) is None or type(status[k]) is str for k in ("error", "final")))
    return True  # other states are only decoded here


_call = st.fixed_dictionaries({"id": st.integers(-1, 4) | json_values,
                               "fn": st.sampled_from(["budget", "llm_query_many", "os.system"]) | json_values,
                               "args": st.just({}) | json_values})
_status_values = {
    "state": st.sampled_from(["done", "calls", "running"]) | json_values,
    "cell": st.sampled_from([1, 2, True, 1.0, "1"]) | json_values,
    "calls": st.lists(_call, max_size=3) | json_values,
    "output": st.text(max_size=10) | json_values,
    "error": st.none() | st.text(max_size=10) | json_values,
    "final": st.none() | st.text(max_size=10) | json_values,
    "x": json_values,
}


_HOST = ["budget", "llm_query_many", "rlm_query_many"]
_valid_statuses = st.fixed_dictionaries(
    {"state": st.just("done"), "cell": st.just(1), "output": st.text(max_size=10)},
    optional={"error": st.none() | st.text(max_size=10), "final": st.none() | st.text(max_size=10)},
) | st.builds(
    lambda ids, fns: {"state": "calls", "cell": 1,
                      "calls": [{"id": i, "fn": f, "args": {}} for i, f in zip(ids, fns, strict=False)]},
    st.lists(st.integers(1, 100), min_size=1, max_size=3, unique=True).map(sorted),
    st.lists(st.sampled_from(_HOST), min_size=3, max_size=3),
)


def _changed(status: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**status, key: value}


_statuses = (
    st.fixed_dictionaries({}, optional=_status_values)  # anything
    | _valid_statuses  # in shape
    | st.builds(_changed, _valid_statuses, st.sampled_from(list(_status_values)), json_values)  # one key changed
)


@settings(max_examples=300, deadline=None)
@given(status=_statuses)
def test_any_status_is_accepted_in_shape_or_refused(status: dict[str, Any]) -> None:
    """Accepted exactly when it fits the documented schema: refusing a status in shape fails this
    test as much as accepting one out of shape (it used to pass whenever Malformed was raised)."""
    line = MARKER + json.dumps(status)
    try:
        parsed = parse_status({"stdout": "noise\n" + line + "\n", "stderr": "", "is_error": False}, 10_000)
        calls = valid_calls(parsed, 1) if parsed.get("state") == "calls" else []
        done = check_done(parsed, 1) if parsed.get("state") == "done" else None
    except Malformed:
        assert not _in_shape(status), status
        return
    assert _in_shape(status), status
    assert [c[0] for c in calls] == [c["id"] for c in status.get("calls", [])] if calls else True
    for _call_id, fn, args in calls:
        assert fn in {"llm_query_many", "rlm_query_many", "budget"} and isinstance(args, dict)
    if done is not None:
        assert done["output"] == status["output"] and done["cell"] == 1


def test_statuses_in_shape_are_accepted() -> None:
    """Examples of each kind the property above must see accepted (a parser refusing all fails here too)."""
    for status in ({"state": "done", "cell": 1, "output": "hi", "error": None, "final": "42"},
                   {"state": "calls", "cell": 1, "calls": [{"id": 1, "fn": "budget", "args": {}},
                                                           {"id": 3, "fn": "llm_query_many", "args": {"p": [1]}}]},
                   {"state": "running", "cell": 1}):
        assert _in_shape(status)
        parsed = parse_status({"stdout": MARKER + json.dumps(status) + "\n", "stderr": "", "is_error": False}, 10_000)
        if status["state"] == "calls":
            assert [c[0] for c in valid_calls(parsed, 1)] == [1, 3]
        elif status["state"] == "done":
            assert check_done(parsed, 1)["final"] == "42"
