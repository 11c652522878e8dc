"""Adversarial suite, part 3: what the sandbox sends (issue 17, rows F1, F3, F4, F7 and F9).

Model code runs in the worker's own process, so it can write anything on the worker's socket:
frames of any shape, numbers of any value, at any time, from any thread, with the current cell's
id (which it can read). Each case drives a real session with cell code as the attacker and
asserts what the host does: a frame outside its op's schema replaces the worker (the cell
reports it, the run goes on); sizes are cut before work; time is counted; cleanup survives any
directory shape. Every case here failed (or hung until its safety net) before issue 17.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from rlmflow import RLM, LocalSandbox, ModelRequest, ScriptedModel
from rlmflow.sandbox import scratch
from rlmflow.sandbox.local import LocalSandboxSession

from .adversarial_helpers import CONTEXT, CURRENT_CELL_ID, assert_kept, bridge, raw_frames, remember, tree_cpu_seconds
from .helpers import repl, turn_script

pytestmark = pytest.mark.anyio

SAFETY = 30.0
"""Seconds: only a safety net. Each case ends within a few seconds when the host holds; before
the fix, the hanging ones ran into it."""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def session() -> AsyncIterator[LocalSandboxSession]:
    async with LocalSandbox(cell_timeout=10, max_output_chars=2000).session(CONTEXT, bridge) as opened:
        yield opened




def call_frame(
    call_id: str = "10**9",
    fn: str = "'llm_query_many'",
    payload: str = "msgpack.packb({'prompts': ['x' * 1000]})",
    extra: str = "",
) -> str:
    """A ``call`` frame's msgpack body as a Python expression (each field an expression too)."""
    return f"msgpack.packb({{'op': 'call', 'id': {call_id}, 'fn': {fn}, 'payload': {payload}{extra}}})"


def result_frame(**fields: str) -> str:
    """A ``result`` frame for the running cell (after CURRENT_CELL_ID), ``fields`` overriding
    (Python expressions; the value ``"DROP"`` removes a key)."""
    frame = {
        "op": "'result'",
        "id": "cell_id",
        "output": "'forged'",
        "output_chars": "6",
        "error": "None",
        "interrupted": "False",
        "duration": "0.1",
        **fields,
    }
    body = ", ".join(f"{key!r}: {value}" for key, value in frame.items() if value != "DROP")
    return f"msgpack.packb({{{body}}})"


def seconds_of_cpu(seconds: float, then: str = "") -> str:
    """Cell code computing for ``seconds`` of the worker's CPU time (however loaded the machine)."""
    return f"_t = time.process_time()\nwhile time.process_time() - _t < {seconds}:\n    pass\n{then}"


DEEP_CHAIN = (
    "import os\n_fd = os.open('.', os.O_RDONLY)\nfor _ in range(1100):\n    os.mkdir('d', dir_fd=_fd)\n"
    "    _child = os.open('d', os.O_RDONLY, dir_fd=_fd)\n    os.close(_fd)\n    _fd = _child\nos.close(_fd)\n"
)
"""Cell code making a directory chain 1,100 levels deep in scratch (``shutil.rmtree`` recurses)."""


# ------------------------------------------------------------------ F1: the host never blocks on a worker


async def test_a_call_id_that_kills_the_reader_then_a_flood_cannot_hang_the_host() -> None:
    # A map as a call id killed the worker's reader thread (int({})); then 4,000 calls filled the
    # socket with replies nobody read: the host blocked in send holding its lock, and the
    # interrupt waited on that lock forever.
    flood = f"[{call_frame('{}')}] + [{call_frame()}] * 4000"
    async with LocalSandbox(cell_timeout=2, interrupt_grace=0.5).session(CONTEXT, bridge) as session:
        await remember(session)
        with anyio.fail_after(SAFETY):
            result = await session.execute(raw_frames(flood, then="time.sleep(60)"))
            assert result.restarted and "bad frame" in (result.error or ""), result
            assert "call whose id" in (result.error or "")
            await assert_kept(session, kept=False)


async def test_a_worker_that_stops_reading_cannot_block_the_host() -> None:
    # The reader is stopped from inside (no bad frame at all), then a flood of valid calls.
    stop_reading = (
        "import time, wire\nwire.read_frame_blocking = lambda *args, **kwargs: time.sleep(3600)\n"
        "budget()\n"  # the reader delivers this reply, then calls the replaced function
    )
    flood = f"[{call_frame()}] * 4000"
    async with LocalSandbox(cell_timeout=1, interrupt_grace=0.5).session(CONTEXT, bridge) as session:
        with anyio.fail_after(SAFETY):
            result = await session.execute(stop_reading + raw_frames(flood, then="time.sleep(60)"))
            after = await session.execute("1 + 1")
    assert result.timed_out and result.restarted, result
    assert after.output.strip() == "2"


async def test_a_run_whose_cell_breaks_the_protocol_goes_on_and_is_told() -> None:
    attack = raw_frames(f"[{call_frame('{}')}] + [{call_frame()}] * 4000", then="time.sleep(60)")

    def root(request: ModelRequest) -> str:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        return repl(attack if turn == 0 else "FINAL('survived')")

    sandbox = LocalSandbox(cell_timeout=2, interrupt_grace=0.5)
    async with RLM(root=ScriptedModel(root, name="root"), sandbox=sandbox, max_turns=3) as rlm:
        with anyio.fail_after(SAFETY):
            result = await rlm.run(CONTEXT, "what does it say?")
    assert result.answer == "survived"
    assert "VARIABLES WERE LOST" in result.transcript[0].feedback


@pytest.mark.parametrize(
    "frame",
    [
        call_frame("True"),
        call_frame("0"),
        call_frame("-1"),
        call_frame("2**64 - 1"),
        call_frame("1.5"),
        call_frame("'7'"),
        call_frame(fn="7"),
        call_frame(fn="'f' * 65"),
        call_frame(payload="'not bytes'"),
        call_frame(extra=", 'more': 1"),
        "msgpack.packb({'op': 'call', 'id': 10**9, 'payload': msgpack.packb({})})",
    ],
    ids=[
        "id-bool",
        "id-zero",
        "id-negative",
        "id-uint64",
        "id-float",
        "id-text",
        "fn-int",
        "fn-too-long",
        "payload-text",
        "unknown-key",
        "no-fn",
    ],
)
async def test_a_malformed_call_replaces_the_worker(session: LocalSandboxSession, frame: str) -> None:
    await remember(session)
    result = await session.execute(raw_frames(frame))
    assert result.restarted and "bad frame" in (result.error or ""), result
    await assert_kept(session, kept=False)


@pytest.mark.parametrize(
    "frame",
    [
        "{'op': 'ready', 'load_seconds': 0.0, 'report': {'layers': []}}",
        "{'op': 'failed', 'error': 'pretend'}",
        "{'op': 'exec', 'id': 1, 'code': ''}",
        "{'op': 'reply', 'id': 1, 'ok': True, 'value': None}",
        "{'op': 'nonsense'}",
    ],
    ids=["ready", "failed", "exec", "reply", "unknown"],
)
async def test_a_frame_of_another_op_mid_cell_replaces_the_worker(session: LocalSandboxSession, frame: str) -> None:
    result = await session.execute(raw_frames(f"msgpack.packb({frame})"))
    assert result.restarted and "bad frame" in (result.error or ""), result
    assert "unexpected" in (result.error or "")


# ------------------------------------------------------ F3: numbers that are not numbers, trees of any depth


@pytest.mark.parametrize("value", ["float('inf')", "float('nan')"], ids=["inf", "nan"])
async def test_a_tampered_output_counter_is_no_exception(session: LocalSandboxSession, value: str) -> None:
    result = await session.execute(f"import sys\nsys.stdout.total = {value}\nprint('x')")
    assert result.output.strip() == "x" and result.error is None and not result.restarted, result
    assert 0 <= result.output_chars < 100


@pytest.mark.parametrize(
    "fields",
    [
        {"output_chars": "float('inf')"},
        {"output_chars": "float('nan')"},
        {"output_chars": "-1"},
        {"duration": "float('nan')"},
        {"duration": "float('inf')"},
        {"duration": "-1.0"},
        {"output": "[1, 2]"},
        {"error": "7"},
        {"final": "{'answer': 1}"},
        {"interrupted": "'yes'"},
        {"id": "{}"},
        {"id": "cell_id + 1"},
        {"output": "DROP"},
        {"crashed": "True"},  # the host's own flag for a crash: not the worker's to set
    ],
    ids=[
        "output_chars-inf",
        "output_chars-nan",
        "output_chars-negative",
        "duration-nan",
        "duration-inf",
        "duration-negative",
        "output-not-text",
        "error-not-text",
        "final-not-text",
        "interrupted-not-bool",
        "id-a-map",
        "id-of-another-cell",
        "output-missing",
        "unknown-key",
    ],
)
async def test_a_result_outside_its_schema_replaces_the_worker(
    session: LocalSandboxSession, fields: dict[str, str]
) -> None:
    result = await session.execute(CURRENT_CELL_ID + raw_frames(result_frame(**fields), then="time.sleep(0.5)"))
    assert result.restarted and "bad frame" in (result.error or ""), result
    assert result.output_chars == 0 and math.isfinite(result.duration)


@pytest.mark.parametrize("ending", ["quota", "crash", "close"])
async def test_a_deep_directory_chain_in_scratch_is_removed(ending: str) -> None:
    # bubblewrap's scratch is a tmpfs that dies with its namespace: the host's own directory is
    # what has to be removed, so the chain is built there
    config = LocalSandbox(bubblewrap=False, scratch_files=500 if ending == "quota" else 10_000)
    async with config.session("ctx", bridge) as session:
        home = Path((await session.execute("import os\nprint(os.getcwd())")).output.strip())
        code = DEEP_CHAIN + ("os._exit(1)" if ending == "crash" else "")
        result = await session.execute(code)
        if ending == "quota":
            assert any("ScratchQuotaExceeded" in note for note in result.notes), result
        if ending == "crash":
            assert result.restarted
        if ending != "close":
            listing = await session.execute("import os\nprint(os.listdir('.'))")
            assert listing.output.strip() == "[]"
        else:
            assert result.error is None
    assert not home.parent.exists()


def test_the_sweep_removes_a_deep_stale_scratch_and_nothing_it_links_to(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()  # its pid is now the pid of a dead host
    stale = tmp_path / f"rlmflow-{scratch._pid_namespace()}-{dead.pid}-abcd1234"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not scratch")
    level = stale / "work"
    level.mkdir(parents=True)
    for _ in range(1100):
        (level / "link").symlink_to(outside)
        level = level / "d"
        level.mkdir()
    scratch._sweep_stale(tmp_path)  # what the next host does at its first session
    assert not stale.exists()
    assert (outside / "keep").read_text() == "not scratch"


async def test_a_final_answer_survives_a_deep_scratch_tree() -> None:
    sandbox = LocalSandbox(bubblewrap=False)
    async with RLM(root=turn_script([DEEP_CHAIN + "FINAL('done')"]), sandbox=sandbox, max_turns=2) as rlm:
        result = await rlm.run("ctx", "make a deep tree")
    assert result.answer == "done"


async def test_a_run_whose_cell_breaks_its_output_counter_ends_normally() -> None:
    code = "import sys\nsys.stdout.total = float('inf')\nprint('x')\nFINAL('counted')"
    async with RLM(root=turn_script([code]), sandbox=LocalSandbox(), max_turns=2) as rlm:
        result = await rlm.run("ctx", "count")
    assert result.answer == "counted"


# -------------------------------------------------------- F4: sizes bounded before the host works on them


async def _max_stall(action: Any) -> tuple[Any, float]:
    """Run ``action()`` while a ticker measures the longest the event loop went without running it,
    in CPU seconds of the loop's thread: the work the host did on the loop between two turns,
    whatever else the machine runs (the wall time between turns grows with the load)."""
    stall = 0.0
    outcome: list[Any] = []

    async def tick() -> None:
        nonlocal stall
        last = time.thread_time()  # this task runs in the loop's thread
        while True:
            await anyio.sleep(0.005)
            now = time.thread_time()
            stall = max(stall, now - last)
            last = now

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        outcome.append(await action())
        tg.cancel_scope.cancel()
    return outcome[0], stall


@pytest.mark.parametrize(
    ("code", "field"),
    [("raise ValueError('\\x00' * 8_000_000)", "error"), ("FINAL('\\x00' * 8_000_000)", "final")],
    ids=["error", "final"],
)
async def test_a_huge_error_or_answer_is_cut_in_the_worker(session: LocalSandboxSession, code: str, field: str) -> None:
    result, stall = await _max_stall(lambda: session.execute(code))
    text = getattr(result, field) or ""
    assert "characters omitted ...]" in text and " of 8,000," in text, text[:200]
    assert len(text) < 1_000_000  # 200,000 characters kept, each NUL shown as four
    # about 3.5 s before (a safety margin here)
    assert stall < 1.0, f"the event loop computed {stall:.2f} s without a turn"
    assert not result.restarted


async def test_the_host_cuts_a_forged_long_error_and_answer_before_sanitising_them() -> None:
    # within what a frame's strings may hold (the worker's caps, six bytes a character), over the
    # 200,000 characters an error or an answer may have: cut with a note, then sanitised
    forged = result_frame(error="'\\x00' * 300_000", final="'\\x07' * 250_000")
    async with LocalSandbox().session(CONTEXT, bridge) as session:
        result, stall = await _max_stall(
            lambda: session.execute(CURRENT_CELL_ID + raw_frames(forged, then="time.sleep(0.5)"))
        )
    assert result.error is not None and "of 300,000 characters omitted" in result.error
    assert result.final is not None and "of 250,000 characters omitted" in result.final
    assert len(result.error) < 1_000_000 and len(result.final) < 1_000_000
    assert stall < 1.0, f"the event loop computed {stall:.2f} s without a turn"


async def test_a_forged_huge_string_is_refused_before_it_is_decoded() -> None:
    # no result the worker writes holds a string this long: refused by its length, undecoded
    forged = result_frame(error="'\\x00' * 8_000_000")
    async with LocalSandbox().session(CONTEXT, bridge) as session:
        result, stall = await _max_stall(
            lambda: session.execute(CURRENT_CELL_ID + raw_frames(forged, then="time.sleep(0.5)"))
        )
    assert result.restarted and "bad frame" in (result.error or ""), (result.error or "")[:300]
    assert stall < 1.0, f"the event loop computed {stall:.2f} s without a turn"


# --------------------------------------------------------------------------------- F7: time counts


async def test_compute_while_a_call_is_in_flight_counts_against_the_cell() -> None:
    async def slow_bridge(fn: str, args: dict[str, Any]) -> Any:
        if fn == "llm_query_many" and args["prompts"] == ["slow"]:
            await anyio.sleep(SAFETY)  # a slow sub-model; cancelled when the cell ends
        return await bridge(fn, args)

    code = (
        "import threading, time\nthreading.Thread(target=lambda: llm_query('slow'), daemon=True).start()\n"
        "time.sleep(0.2)\n"  # from here on a host call of this cell is in flight
        + seconds_of_cpu(3, then="print('computed')")
    )
    async with LocalSandbox(cell_timeout=1, interrupt_grace=1).session(CONTEXT, slow_bridge) as session:
        with anyio.fail_after(SAFETY):
            result = await session.execute(code)
            after = await session.execute("1 + 1")
    assert result.timed_out and "computed" not in result.output, result
    assert after.output.strip() == "2"


async def test_threads_a_cell_leaves_running_do_not_compute_between_cells() -> None:
    burner = (
        "import threading\ndef burn():\n    while True:\n        pass\n"
        "threading.Thread(target=burn, daemon=True).start()"
    )
    async with LocalSandbox(cell_timeout=5).session(CONTEXT, bridge) as session:
        started = await session.execute(burner)
        assert started.error is None
        assert session._incarnation is not None
        pid = session._incarnation.process.pid
        before = tree_cpu_seconds(pid)
        await anyio.sleep(0.5)  # the root model's turn, between two cells
        between = tree_cpu_seconds(pid) - before
        later = await session.execute("print('next')")  # the thread runs again, in this cell's time
    assert between < 0.05, f"the worker computed {between:.2f} s between cells"
    assert later.output.strip() == "next" and not later.restarted


async def test_a_forged_result_buys_no_time_and_costs_the_worker() -> None:
    # The forged result carries the running cell's id and a valid shape: the host cannot tell it
    # from the worker's own (both come from the same process). What it gets: the rest of the cell
    # waits, frozen, and runs in the next cell's time; its true result then breaks the protocol.
    forge = CURRENT_CELL_ID + raw_frames(result_frame(), then=seconds_of_cpu(1, then="print('real end')"))
    async with LocalSandbox(cell_timeout=10).session(CONTEXT, bridge) as session:
        forged = await session.execute(forge)
        assert session._incarnation is not None
        pid = session._incarnation.process.pid
        before = tree_cpu_seconds(pid)
        await anyio.sleep(0.3)  # between two cells
        between = tree_cpu_seconds(pid) - before
        with anyio.fail_after(SAFETY):
            following = await session.execute("print('next cell')")
    assert forged.output == "forged"
    assert between < 0.05, f"the forged cell computed {between:.2f} s between cells"
    assert following.restarted and "bad frame" in (following.error or ""), following
    assert "next cell" not in following.output and "real end" not in following.output


async def test_a_cancelled_cell_does_not_run_on_into_the_next() -> None:
    async with LocalSandbox(cell_timeout=30).session(CONTEXT, bridge) as session:
        with anyio.move_on_after(0.3) as scope:  # a deadline while the cell sleeps
            await session.execute("import time\ntime.sleep(5)")
        assert scope.cancelled_caught
        with anyio.fail_after(SAFETY):
            following = await session.execute("print('next')")
    assert following.output.strip() == "next"
    assert any("restarted" in note for note in following.notes), following


# ------------------------------------------------------------------------- F9: durations are numbers


async def test_a_replaced_clock_cannot_make_a_duration_nan(session: LocalSandboxSession) -> None:
    replaced = await session.execute(
        "import time\n_clock = time.perf_counter\ntime.perf_counter = lambda: float('nan')"
    )
    during = await session.execute("1 + 1")
    await session.execute("time.perf_counter = _clock")
    for result in (replaced, during):
        assert math.isfinite(result.duration) and result.duration >= 0 and not result.restarted, result
        json.dumps({"duration": result.duration}, allow_nan=False)


async def test_a_call_too_big_to_decode_quickly_is_refused_before_decoding_and_the_cell_goes_on() -> None:
    # decoding holds the event loop (~1 ms per MB): arguments past MAX_CALL_PAYLOAD are refused unread
    code = (
        "host = next(c.cell_contents for c in llm_query_many.__closure__ if callable(c.cell_contents))\n"
        "try:\n    host('llm_query_many', {'prompts': ['x' * 80_000_000]})\n"
        "except Exception as e:\n    print(type(e).__name__, str(e)[:200])\nprint('alive')"
    )
    async with LocalSandbox().session(CONTEXT, bridge) as session:
        cell = await session.execute(code)
    assert "split the batch" in cell.output and "alive" in cell.output and not cell.restarted
