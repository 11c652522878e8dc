"""The AgentCore backend against a hostile remote session (issue 17: F2, F3, F4, F7, F9).

Cell code runs in the remote interpreter beside rlmflow's runtime and can replace it, so every
status line the host reads may be forged. Each case installs a forgery in one cell, lets the next
cell meet it, and checks that the host refuses the status before acting on it (the session is
replaced as after a crash, the cell reports a protocol violation, the run goes on), that no number
or text outside its bounds reaches a result, and that no answer, or none at all, holds a cell past
its time. Safety nets (``fail_after``) only; no timing is asserted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aioboto3
import anyio
import pytest

from rlmflow import RLM, ScriptedModel
from rlmflow.sandbox import AgentCoreSandbox
from rlmflow.sandbox import agentcore as agentcore_module
from rlmflow.sandbox import agentcore_protocol as protocol
from rlmflow.sandbox.base import CellResult

from .fakes.fake_agentcore import FakeAgentCoreServer
from .helpers import turn_script

pytestmark = pytest.mark.anyio

ACCESS_KEY, SECRET_KEY = "AKIDADVERSARY0017", "host-secret-adversarial-17"
SAFETY = 30  # seconds: a safety net against a hang, never an expectation
MAX_CALLS_IN_FLIGHT, MAX_ITEMS = 1024, 200_000  # the protocol's bounds (checked below), literal so that
# this file also runs against code that lacks them (each case then fails by what it checks)


@pytest.fixture
async def server() -> AsyncIterator[FakeAgentCoreServer]:
    async with FakeAgentCoreServer(access_key=ACCESS_KEY, secret_key=SECRET_KEY) as fake:
        yield fake


def make_sandbox(server: FakeAgentCoreServer, **options: Any) -> AgentCoreSandbox:
    session = aioboto3.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                               region_name="us-east-1")
    return AgentCoreSandbox(session=session, region_name="us-east-1", endpoint_url=server.endpoint_url, **options)


class Recorder:
    """A bridge that answers at once and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, fn: str, args: dict[str, Any]) -> Any:
        self.calls.append((fn, args))
        return [p.upper() for p in args.get("prompts", [])] if fn == "llm_query_many" else {}


def forge_lines(lines: str, *, when: str = "") -> str:
    """Cell code: after the runtime's own status, the next control calls print the raw status
    lines of the Python list ``lines`` (``CELL``: the id of the cell asked about), which the host
    reads as theirs (it reads the last status line). With ``when``, only control calls whose
    arguments hold that text are forged."""
    return (
        "import base64, json, sys\n"
        "rt = sys.modules['_rlmflow_runtime']\n"
        "_real_control = rt.control\n"
        f"_lines = {lines}\n"
        "def _forged(method, payload):\n"
        "    _real_control(method, payload)\n"
        "    args = json.loads(base64.b64decode(payload))\n"
        f"    if not _lines or {when!r} not in json.dumps(args):\n"
        "        return\n"
        "    cell = args.get('cell', 0)\n"
        "    out = rt._RUNTIME.stdout.inner\n"
        "    out.write('\\n' + rt.MARKER + _lines.pop(0).replace('CELL', str(cell)) + '\\n')\n"
        "    out.flush()\n"
        "rt.control = _forged\n"
    )


def forge_edit(edit: str, prelude: str = "") -> str:
    """Cell code: every status the runtime makes passes through ``edit`` (which may rebind ``status``)."""
    body = "".join(f"    {line}\n" for line in edit.splitlines())
    return (
        "import sys\n"
        "rt = sys.modules['_rlmflow_runtime']\n"
        "_real_dispatch = rt._dispatch\n"
        f"{prelude}\n"
        "def _forged(method, args, *rest):\n"
        "    status = _real_dispatch(method, args, *rest)\n"
        f"{body}"
        "    return status\n"
        "rt._dispatch = _forged\n"
    )


def strict_json(cell: CellResult) -> str:
    return json.dumps(dataclasses.asdict(cell), allow_nan=False)


def assert_violation(cell: CellResult, expected: str) -> None:
    assert cell.restarted and cell.error is not None
    assert cell.error.startswith("SandboxCrash") and "protocol violation" in cell.error, cell.error
    assert expected in cell.error, cell.error
    assert math.isfinite(cell.duration) and cell.duration >= 0
    strict_json(cell)


# -- F2: call ids ------------------------------------------------------------------------------
async def test_a_call_id_reported_twice_in_one_state_ends_the_cell(server: FakeAgentCoreServer) -> None:
    """F2: the same id twice in one ``calls`` state made the host count two calls and wait forever
    for the second answer (the cell went on computing, so the host never polled again)."""
    bridge = Recorder()
    sandbox = make_sandbox(server, cell_timeout=3.0, poll_wait=0.2)
    with anyio.fail_after(SAFETY):
        async with sandbox.session("ctx", bridge) as session:
            edit = "if status.get('state') == 'calls':\n    status = dict(status, calls=status['calls'] * 2)"
            assert (await session.execute(forge_edit(edit))).error is None
            cell = await session.execute("x = llm_query('a')\nimport time\ntime.sleep(1)")
            assert_violation(cell, "reported twice")
            assert (await session.execute("print(context)")).output == "ctx\n"
    assert bridge.calls == []  # refused before anything was served
    assert len(server.sessions) == 2 and not server.live_sessions


async def test_a_call_reported_again_after_its_answer_is_not_served_twice(server: FakeAgentCoreServer) -> None:
    """A replayed call (its id answered already) would make the host pay for it again."""
    bridge = Recorder()
    edit = ("if status.get('state') == 'calls':\n"
            "    status = dict(status, calls=_seen + status['calls'])\n"
            "    _seen[:] = status['calls'][-1:]")
    with anyio.fail_after(SAFETY):
        async with make_sandbox(server).session("ctx", bridge) as session:
            assert (await session.execute(forge_edit(edit, prelude="_seen = []"))).error is None
            cell = await session.execute("a = llm_query('a')\nb = llm_query('b')\nprint(a, b)")
            assert_violation(cell, "reported twice")
    assert [args["prompts"] for _, args in bridge.calls] == [["a"]]


async def test_host_calls_in_flight_are_bounded(server: FakeAgentCoreServer) -> None:
    """Each status adds 600 calls the host cannot answer soon: never more than 1024 at once."""
    in_flight = most = 0

    async def bridge(fn: str, args: dict[str, Any]) -> Any:
        nonlocal in_flight, most
        if args["prompts"] != ["slow"]:
            return ["fast"]
        in_flight += 1
        most = max(most, in_flight)
        try:
            await anyio.sleep_forever()
        finally:
            in_flight -= 1

    edit = ("if status.get('state') == 'calls':\n"
            "    extra = []\n"
            "    for _ in range(600):\n"
            "        _next[0] += 1\n"
            "        extra.append({'id': _next[0], 'fn': 'llm_query_many', 'args': {'prompts': ['slow']}})\n"
            "    status = dict(status, calls=status['calls'] + extra)")
    with anyio.fail_after(SAFETY):
        async with make_sandbox(server).session("ctx", bridge) as session:
            assert (await session.execute(forge_edit(edit, prelude="_next = [10**9]"))).error is None
            cell = await session.execute("for i in range(4):\n    llm_query('go')\nprint('done')")
            assert_violation(cell, f"more than {MAX_CALLS_IN_FLIGHT} host calls in flight")
    assert 0 < most <= MAX_CALLS_IN_FLIGHT


# -- F3 / F9 / "What must exist" 1: one schema per state ------------------------------------------------
DONE = '{"state": "done", "cell": CELL, "output": "", "error": null'
CALL = '{"state": "calls", "cell": CELL, "calls": [{"id": 1, "fn": "llm_query_many", "args": '


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        # numbers that are not finite, or out of range (F3, F9)
        (repr([DONE + ', "duration": NaN}']), "not strict JSON"),
        (repr([DONE + ', "duration": Infinity}']), "not strict JSON"),
        (repr([DONE + ', "duration": 1e999}']), "not strict JSON"),
        (repr([DONE + ', "duration": -1.5}']), "out of range"),
        (repr([DONE + ', "output_chars": 1e999}']), "not strict JSON"),
        (repr([DONE + ', "output_chars": -5}']), "out of range"),
        (repr([DONE + ', "output_chars": 100000000000000000000}']), "out of range"),
        (repr([DONE + ', "interrupted": "yes"}']), "wrong type"),
        (repr(['{"state": "running", "cell": CELL, "cpu": NaN}']), "not strict JSON"),
        (repr([CALL + '{"prompts": ["a"], "max_tokens": Infinity}}]}']), "not strict JSON"),
        # keys the host does not know, on a status or on a call
        (repr([DONE + ', "restart": true}']), "key the host does not accept: 'restart'"),
        (repr([DONE + ', "extra": 1}']), "key the host does not accept"),
        (repr(['{"state": "running", "cell": CELL, "x": 1}']), "key the host does not accept"),
        (repr([CALL + '{"prompts": ["a"]}, "via": "x"}]}']), "an object of id, fn and args"),
        # shapes that cost the host before it could look at them
        ("[" + repr(CALL + '{"a": ') + " + '[' * 100000 + ']' * 100000 + '}}]}']", "not strict JSON"),
        ("[" + repr(CALL + '{"a": ') + " + '[' * 20 + ']' * 20 + '}}]}']", "nested deeper than"),
        ("[" + repr(CALL + '{"a": [') + " + '[],' * 400000 + '[]]}}]}']", f"more than {MAX_ITEMS:,} items"),
        # an event botocore refuses to decode (over 24 MB): its ParserError escaped the run
        ("['" + '{"state": "running", "cell": CELL, "pad": "' + "' + 'x' * 13_000_000 + '\"}']",
         "an unreadable event stream"),
    ],
)
async def test_a_status_outside_its_schema_is_a_protocol_violation(
    server: FakeAgentCoreServer, lines: str, expected: str
) -> None:
    bridge = Recorder()
    with anyio.fail_after(SAFETY):
        async with make_sandbox(server, poll_wait=0.2).session("ctx", bridge) as session:
            assert (await session.execute(forge_lines(lines))).error is None
            cell = await session.execute("print('second cell')")
            assert_violation(cell, expected)
            assert (await session.execute("print(context)")).output == "ctx\n"
    assert bridge.calls == []
    assert len(server.sessions) == 2 and not server.live_sessions


async def test_a_nan_duration_never_reaches_a_run_result(server: FakeAgentCoreServer) -> None:
    """F9: a ``done`` with ``NaN`` as its duration made ``"duration": NaN`` in results and JSON."""
    cells = [forge_lines(repr([DONE + ', "duration": NaN}']), when="the forged one"),
             "print('the forged one')", "FINAL('real')"]
    with anyio.fail_after(SAFETY):
        async with RLM(root=turn_script(cells), sub=ScriptedModel(lambda r: "s"), sandbox=make_sandbox(server)) as rlm:
            result = await rlm.run("document", "question")
    durations = [cell.duration for turn in result.transcript for cell in turn.cells]
    assert all(math.isfinite(d) for d in durations)
    json.dumps(durations, allow_nan=False)
    assert result.answer == "real" and "SandboxCrash" in (result.transcript[1].cells[0].error or "")


# -- F4: text of any size ----------------------------------------------------------------------------
class Measured:
    """Records the longest text sanitised and the longest control-call output read by the host."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sanitised = 0
        self.read = 0
        sanitize, read = agentcore_module.sanitize_text, agentcore_module.read_result

        def measured_sanitize(text: str) -> str:
            self.sanitised = max(self.sanitised, len(text))
            return sanitize(text)

        async def measured_read(stream: Any, limit: int) -> dict[str, Any]:
            result = await read(stream, limit)
            self.read = max(self.read, len(result["stdout"]))
            return result

        monkeypatch.setattr(agentcore_module, "sanitize_text", measured_sanitize)
        monkeypatch.setattr(agentcore_module, "read_result", measured_read)


async def test_huge_answers_and_errors_are_cut_in_the_sandbox_and_on_the_host(
    server: FakeAgentCoreServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F4: a FINAL (or an error) of millions of NULs crossed whole and was sanitised whole on the
    event loop (about half a second per million characters)."""
    measured = Measured(monkeypatch)
    with anyio.fail_after(SAFETY):
        async with make_sandbox(server).session("ctx", Recorder()) as session:
            answer = await session.execute("FINAL('\\0' * 3_000_000)")
            error = await session.execute("raise ValueError('\\0' * 3_000_000)")
    assert answer.final is not None and len(answer.final) <= 200_000
    assert "3,000,000 characters in all" in answer.final and answer.final.startswith("\\x00")
    assert error.error is not None and len(error.error) <= 200_000 and "characters in all" in error.error
    assert measured.read <= 6 * 200_000 + 10_000  # cut in the remote runtime (a NUL is 6 characters of JSON)
    assert measured.sanitised <= 200_000  # cut on the host before it is sanitised


async def test_a_forged_huge_answer_is_cut_before_it_is_sanitised(
    server: FakeAgentCoreServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the runtime's own cut bypassed: the host's bound holds alone."""
    measured = Measured(monkeypatch)
    lines = ("[" + repr('{"state": "done", "cell": CELL, "output": "", "error": "') + " + 'e' * 1_000_000 + "
             + repr('", "final": "') + " + " + repr("\\u0000") + " * 1_000_000 + " + repr('"}') + "]")
    with anyio.fail_after(SAFETY):
        async with make_sandbox(server).session("ctx", Recorder()) as session:
            assert (await session.execute(forge_lines(lines))).error is None
            cell = await session.execute("print('second cell')")
    assert not cell.restarted and cell.final is not None and cell.error is not None
    assert len(cell.final) <= 200_000 and "1,000,000 characters in all" in cell.final
    assert len(cell.error) <= 200_000 and "1,000,000 characters in all" in cell.error
    assert measured.sanitised <= 200_000


# -- never a hang: a control call that does not answer ----------------------------------------------------
async def test_a_control_call_that_never_answers_ends_the_cell(server: FakeAgentCoreServer) -> None:
    """A runtime replaced by one that sleeps: the host waited for botocore's 60 s read timeout,
    then the SandboxError ended the whole run; now the cell ends by its own deadline."""
    # 2 s: the cells that must succeed count their control calls' wall time, which load stretches
    sandbox = make_sandbox(server, cell_timeout=2.0, interrupt_grace=0.2, poll_wait=0.2, control_grace=0.5)
    hang = "import sys, time\nsys.modules['_rlmflow_runtime'].control = lambda method, payload: time.sleep(3600)"
    with anyio.fail_after(SAFETY):
        async with sandbox.session("ctx", Recorder()) as session:
            first = session.session_id
            assert (await session.execute(hang)).error is None
            cell = await session.execute("print('never')")
            assert cell.timed_out and cell.restarted and "did not answer" in (cell.error or "")
            assert session.session_id != first
            assert (await session.execute("print(context)")).output == "ctx\n"
    assert not server.live_sessions


# -- F7 / "time counts": compute while the host serves a call, and between cells ---------------------------
SPIN = ("import threading, time\n"
        "def spin():\n"
        "    started = time.process_time()\n"
        "    while time.process_time() - started < SECONDS:\n"
        "        pass\n"
        "    open('spun', 'w').close()\n"
        "threading.Thread(target=spin, daemon=True).start()\n")


async def test_compute_while_a_host_call_is_in_flight_counts_against_the_cell(server: FakeAgentCoreServer) -> None:
    """F7: a thread computed while the cell's own llm_query waited for the host, which counted none
    of it (the host did not look at the remote while it served a call): a cell_timeout of 1 s held
    for as long as the call took, here forever."""
    async def never(fn: str, args: dict[str, Any]) -> Any:
        await anyio.sleep_forever()

    sandbox = make_sandbox(server, cell_timeout=1.0, interrupt_grace=0.5, poll_wait=0.2)
    with anyio.fail_after(SAFETY):
        async with sandbox.session("ctx", never) as session:
            cell = await session.execute(SPIN.replace("SECONDS", "20") + "llm_query('slow')")
    assert cell.timed_out and cell.error is not None and cell.error.startswith("TimeoutError")


async def test_waiting_for_a_slow_host_call_is_still_free(server: FakeAgentCoreServer) -> None:
    """The other side of the rule above (no regression): an idle cell may wait past its time limit."""
    async def slow(fn: str, args: dict[str, Any]) -> Any:
        await anyio.sleep(2.5)
        return ["late"]

    sandbox = make_sandbox(server, cell_timeout=1.0, poll_wait=0.5)
    with anyio.fail_after(SAFETY):
        async with sandbox.session("ctx", slow) as session:
            cell = await session.execute("print(llm_query('slow'))")
    assert cell.error is None and not cell.timed_out and cell.output == "late\n"


async def test_threads_computing_between_cells_get_the_session_replaced(server: FakeAgentCoreServer) -> None:
    """A cell's thread went on computing after the cell ended, unseen and unbounded: past one
    cell's worth of CPU the next cell starts in a new session (and says so). The cells have 2 s
    (the first one's wall time is stretched by load and by the spinning thread's hold on the
    interpreter); the thread spins 3 CPU seconds, more than one cell's worth whatever it spun
    before the cell ended."""
    sandbox = make_sandbox(server, cell_timeout=2.0, poll_wait=0.2)
    safety = 2 * SAFETY  # 3 CPU seconds took 17 s of wall time with 8 busy loops on 2 cores
    with anyio.fail_after(safety):
        async with sandbox.session("ctx", Recorder()) as session:
            first = str(session.session_id)
            assert (await session.execute(SPIN.replace("SECONDS", "3.0") + "kept = 1")).error is None
            for _ in range(safety * 20):  # the thread has used its CPU when it writes this file
                if (server.sessions[first].directory / "spun").exists():
                    break
                await anyio.sleep(0.05)
            cell = await session.execute("print('kept' in globals())")
    assert cell.output == "False\n" and cell.restarted and cell.error is None
    assert any("kept computing between cells" in note for note in cell.notes)
    assert session.session_ids[-1] != first


# -- the schemas themselves ---------------------------------------------------------------------------
def test_every_state_refuses_keys_outside_its_schema() -> None:
    assert (protocol.MAX_CALLS_IN_FLIGHT, protocol.MAX_ITEMS) == (MAX_CALLS_IN_FLIGHT, MAX_ITEMS)
    for state, (required, optional) in protocol.SCHEMAS.items():
        assert "restart" not in required and "restart" not in optional
        with pytest.raises(protocol.Malformed):
            protocol.check_status({"state": state, "cell": 1, "surprise": 1}, 1, frozenset(protocol.SCHEMAS))
    # a runtime that failed, and a state no cell may answer, end the cell as before
    with pytest.raises(protocol.Malformed, match="the remote runtime failed: no cell"):
        protocol.check_status({"state": "error", "message": "no cell"}, 1)
    with pytest.raises(protocol.Malformed, match="unexpected status"):
        protocol.check_status({"state": "ready", "chars": 3, "sha256": "0" * 64}, 1)


def test_decoding_refuses_non_finite_numbers_and_deep_nesting() -> None:
    for line in ('{"state": "done", "d": NaN}', '{"state": "x", "d": -Infinity}', '{"state": "x", "d": 1e400}',
                 '{"state": "x", "d": ' + "[" * 50_000 + "]" * 50_000 + "}"):
        with pytest.raises(protocol.Malformed):
            protocol.decode_status(line)
    status = {"state": "calls", "cell": 1, "calls": [{"id": 3, "fn": "budget", "args": {}}]}
    with pytest.raises(protocol.Malformed, match="reported twice"):
        protocol.valid_calls(status, 1, after=3)
    assert protocol.valid_calls(status, 1, after=2) == [(3, "budget", {})]
