"""Adversarial suite, part 2: resources, frames, output and lifecycles.

Each case asserts the host survives, the documented state semantics (an interrupted cell keeps
the variables; a killed or crashed worker is replaced, context reloaded, variables lost), and
that no process or file outlives its session.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from rlmflow import RLM, IsolationUnavailableError, LocalSandbox, ModelRequest, ScriptedModel
from rlmflow.sandbox import scratch
from rlmflow.sandbox.incarnation import MAX_CALLS_IN_FLIGHT
from rlmflow.sandbox.local import LocalSandboxSession

from .adversarial_helpers import CONTEXT, assert_kept, bridge, need, processes_with_env, remember
from .helpers import repl

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def sandbox() -> AsyncIterator[LocalSandboxSession]:
    config = LocalSandbox(cell_timeout=10, memory_bytes=512 << 20, max_output_chars=2000, scratch_files=200)
    async with config.session(CONTEXT, bridge) as session:
        yield session


@pytest.fixture(scope="module")
async def hasty() -> AsyncIterator[LocalSandboxSession]:
    """A session whose cells may compute for 0.3 s, then have 0.2 s to stop before the kill."""
    async with LocalSandbox(cell_timeout=0.3, interrupt_grace=0.2).session(CONTEXT, bridge) as session:
        yield session


@pytest.fixture(scope="module")
async def interruptible() -> AsyncIterator[LocalSandboxSession]:
    """A session whose cells may compute for 1 s, then have 2 s to stop: a cell that stops on the
    interrupt is not killed for replying slowly under load (within 0.2 s it could be)."""
    async with LocalSandbox(cell_timeout=1.0, interrupt_grace=2).session(CONTEXT, bridge) as session:
        yield session




def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0) and return it. ru_maxrss
    cannot be reset: an earlier test's peak would hide this one's."""
    Path("/proc/self/clear_refs").write_text("5")
    return _vm_hwm_bytes()


def peak_rss_bytes() -> int:
    """The host's peak RSS since :func:`reset_peak_rss`."""
    return _vm_hwm_bytes()


# ------------------------------------------------------------------------- frames (first: peak RSS)


def _raw_send(body: str) -> str:
    """Cell code writing one raw frame (the Python expression ``body``) on the worker's socket."""
    return (
        "import msgpack, os, socket, struct, sys, time\ns = socket.socket(fileno=os.dup(int(sys.argv[1])))\n"
        f"body = {body}\ns.sendall(struct.pack('>I', len(body)) + body)\ntime.sleep(0.2)"
    )


async def test_an_amplifying_call_is_refused_and_nothing_else_is_lost(sandbox: LocalSandboxSession) -> None:
    await remember(sandbox)
    before = reset_peak_rss()
    # 8 MB of one-byte empty maps: eight million dicts (over a gigabyte) if decoded naively
    payload = "b'\\xdd' + (8_000_000).to_bytes(4, 'big') + b'\\x80' * 8_000_000"
    body = f"msgpack.packb({{'op': 'call', 'id': 10**9, 'fn': 'llm_query_many', 'payload': {payload}}})"
    result = await sandbox.execute(_raw_send(body))
    assert result.error is None and not result.restarted
    via_api = await sandbox.execute(
        "try:\n    llm_query_many([''] * 2_000_000)\nexcept RLMError as e:\n    print('refused:', e)"
    )
    assert via_api.output.startswith("refused:") and "refused this call" in via_api.output, via_api
    assert peak_rss_bytes() - before < 300 << 20
    await assert_kept(sandbox)


async def test_an_amplifying_frame_replaces_the_worker_with_bounded_host_memory(sandbox: LocalSandboxSession) -> None:
    before = reset_peak_rss()
    body = "b'\\x82\\xa2op\\xa6result\\xa6output\\xdd' + (8_000_000).to_bytes(4, 'big') + b'\\x90' * 8_000_000"
    result = await sandbox.execute(_raw_send(body))
    assert result.restarted and "bad frame" in (result.error or ""), result
    assert peak_rss_bytes() - before < 300 << 20
    await assert_kept(sandbox, kept=False)


@pytest.mark.parametrize(
    "body",
    [b"\xc1\xc1\xc1", b"\x05", b"\x81\xa2op\x07"],
    ids=["garbage", "not-a-map", "op-not-a-string"],
)
async def test_malformed_frames_replace_the_worker(sandbox: LocalSandboxSession, body: bytes) -> None:
    result = await sandbox.execute(_raw_send(repr(body)))
    assert result.restarted and "bad frame" in (result.error or "")
    await assert_kept(sandbox, kept=False)


async def test_an_oversized_frame_header_is_refused_before_reading(sandbox: LocalSandboxSession) -> None:
    result = await sandbox.execute(
        "import os, socket, sys, time\ns = socket.socket(fileno=os.dup(int(sys.argv[1])))\n"
        "s.sendall(b'\\xff\\xff\\xff\\xff' + b'x' * 1000)\ntime.sleep(0.2)"
    )
    assert result.restarted and "exceeds the limit" in (result.error or "")


# -------------------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    "code",
    ["while True:\n    pass", "import time\ntime.sleep(60)", "import threading\nthreading.Event().wait()"],
    ids=["busy-loop", "sleep", "blocking-wait"],
)
async def test_a_cell_past_its_time_is_interrupted_and_keeps_variables(
    interruptible: LocalSandboxSession, code: str
) -> None:
    await remember(interruptible)
    result = await interruptible.execute(code)
    assert result.timed_out and not result.restarted and "Variables are kept" in (result.error or "")
    await assert_kept(interruptible)


@pytest.mark.parametrize(
    "code",
    [
        "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')",  # a C-level hang: no bytecode, no signal check
        "import time\nwhile True:\n    try:\n        time.sleep(10)\n    except KeyboardInterrupt:\n        pass",
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass",
    ],
    ids=["c-level-hang", "swallowed-interrupt", "ignored-sigint"],
)
async def test_a_cell_that_will_not_stop_is_killed_and_replaced(hasty: LocalSandboxSession, code: str) -> None:
    await remember(hasty)
    result = await hasty.execute(code)
    assert result.timed_out and result.restarted
    await assert_kept(hasty, kept=False)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("x = bytearray(1 << 40)", "MemoryError"),
        ("hog = []\nwhile True:\n    hog.append(bytearray(64 << 20))", "MemoryError"),
        ("import os\nfds = [os.open('/dev/null', os.O_RDONLY) for _ in range(100_000)]", "Too many open files"),
        ("import sys\nsys.setrecursionlimit(100)\ndef f(): f()\nf()", "RecursionError"),
    ],
    ids=["allocation", "memory-bomb", "fd-flood", "deep-recursion"],
)
async def test_exhaustion_fails_inside_the_cell(sandbox: LocalSandboxSession, code: str, expected: str) -> None:
    await remember(sandbox)
    result = await sandbox.execute(code)
    assert expected in (result.error or ""), result
    assert not result.restarted
    await sandbox.execute("hog = fds = x = None")
    await assert_kept(sandbox)


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("import ctypes\nctypes.string_at(0)", "SIGSEGV"),
        ("import os\nos._exit(3)", "status 3"),
        ("import sys\nsys.setrecursionlimit(10**8)\nnested = []\nfor _ in range(200_000):\n    nested = [nested]\n"
         "repr(nested)", "SIGSEGV"),  # the C stack overflows
    ],
    ids=["segfault", "os._exit", "stack-overflow"],
)  # fmt: skip
async def test_a_crash_replaces_the_worker(sandbox: LocalSandboxSession, code: str, expected: str) -> None:
    await remember(sandbox)
    result = await sandbox.execute(code)
    assert result.restarted and expected in (result.error or ""), result
    await assert_kept(sandbox, kept=False)


async def test_print_floods_are_capped(sandbox: LocalSandboxSession) -> None:
    result = await sandbox.execute("for _ in range(20_000):\n    print('flood ' * 10)")
    assert result.output_chars > 1_000_000 and len(result.output) < 2200
    # straight to the worker's stderr pipe, past the capture: the host drains a bounded tail
    raw = await sandbox.execute("import os\nfor _ in range(50):\n    os.write(2, b'\\x1b[2J' * 100_000)")
    assert raw.error is None and (await sandbox.execute("1 + 1")).output.strip() == "2"


async def test_output_of_a_background_thread_after_its_cell(sandbox: LocalSandboxSession) -> None:
    started = await sandbox.execute(
        "import threading, time\n"
        "def late():\n    for _ in range(5):\n        time.sleep(0.05)\n        print('late output')\n"
        "threading.Thread(target=late, daemon=True).start()"
    )
    assert started.error is None
    # lines printed while no cell runs are dropped; lines printed during a later cell appear in it
    later = await sandbox.execute("import time\ntime.sleep(0.4)\nprint('mine')")
    assert later.output.strip().endswith("mine")
    assert set(later.output.split()) <= {"late", "output", "mine"}


async def test_control_characters_never_reach_the_root_model(sandbox: LocalSandboxSession) -> None:
    result = await sandbox.execute(
        "print('\\x1b[2J\\x1b]0;owned\\x07red\\x1b[31m!\\rback\\x00')\nFINAL('\\x1b[1mbold\\x1b[0m answer\\x9b')\n"
        "raise ValueError('\\x1b[5mblink')"
    )
    for text in (result.output, result.final or "", result.error or ""):
        assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text and "\r" not in text
    assert "red!\\x0dback\\x00" in result.output
    assert result.final == "bold answer\\x9b"


# ------------------------------------------------------------------------------------ scratch quota


async def test_too_many_files_empty_the_scratch_directory(sandbox: LocalSandboxSession) -> None:
    await remember(sandbox)
    result = await sandbox.execute("for i in range(500):\n    open(f'f{i}', 'w').close()")
    assert any("ScratchQuotaExceeded" in note for note in result.notes), result
    listing = await sandbox.execute("import os\nprint(len(os.listdir('.')))")
    assert listing.output.strip() == "0"
    await assert_kept(sandbox)


async def test_scratch_bytes_are_capped() -> None:
    config = LocalSandbox(scratch_bytes=4 << 20, max_file_bytes=3 << 20)
    async with config.session("ctx", bridge) as session:
        result = await session.execute(
            "try:\n    for i in range(4):\n        open(f'b{i}', 'wb').write(b'x' * (3 << 20) - 1 if False else "
            "b'x' * ((3 << 20) - 1))\nexcept OSError as e:\n    print('refused', e.strerror)"
        )
    # under bubblewrap the tmpfs itself refuses (No space left); otherwise the host empties scratch
    assert "refused No space left" in result.output or any("ScratchQuotaExceeded" in n for n in result.notes)


# --------------------------------------------------------------------------------------- lifecycle


async def _marker(session: LocalSandboxSession) -> str:
    home = await session.execute("import os\nprint(os.environ['HOME'])")
    return "HOME=" + home.output.strip()


async def test_close_leaves_no_process_and_no_file() -> None:
    async with LocalSandbox().session("a context of its own", bridge) as session:
        marker = await _marker(session)
        assert processes_with_env(marker)
        directory = Path(marker.removeprefix("HOME=")).parent
        context = session._context
    assert context is not None and not context.path.exists()
    assert processes_with_env(marker) == [] and not directory.exists()


@pytest.mark.parametrize("isolation", ["auto", "none"])
async def test_a_cancelled_run_kills_its_worker_and_what_it_forked(isolation: Any) -> None:
    async with LocalSandbox(isolation=isolation, cell_timeout=30).session(CONTEXT, bridge) as session:
        marker = await _marker(session)
        directory = Path(marker.removeprefix("HOME=")).parent
        code = "import os, time\ntry:\n    os.fork()\nexcept OSError:\n    pass\ntime.sleep(30)"  # mid-fork
        with anyio.move_on_after(0.5) as scope:
            await session.execute(code)
        assert scope.cancelled_caught
    assert processes_with_env(marker) == [], "a process outlived its session"
    assert not directory.exists()


def test_a_sigkilled_host_leaves_no_worker_and_its_scratch_is_swept(tmp_path: Path) -> None:
    host = tmp_path / "host.py"
    host.write_text(
        textwrap.dedent(
            """
            import anyio, os, sys
            from rlmflow import LocalSandbox
            async def bridge(fn, args):
                return None
            async def main():
                async with LocalSandbox().session("ctx", bridge) as session:
                    home = await session.execute("import os\\nprint(os.environ['HOME'])")
                    print(home.output.strip(), flush=True)
                    await session.execute("import time\\ntime.sleep(60)")
            anyio.run(main)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, str(host)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert process.stdout is not None
        home = process.stdout.readline().strip()
        assert home, "the host did not start"
        marker = "HOME=" + home
        assert processes_with_env(marker)
    finally:
        process.kill()
        process.wait()
        if process.stdout is not None:
            process.stdout.close()
    deadline = time.monotonic() + 5
    while processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.02)  # a real process dying: no clock to fake
    assert processes_with_env(marker) == [], "the worker outlived its host"
    directory = Path(home).parent
    scratch._sweep_stale(directory.parent)  # what the next host does at its first session
    assert not directory.exists()


async def test_sessions_wait_in_a_queue_per_depth_and_nested_ones_never_deadlock() -> None:
    config = LocalSandbox(max_sessions=1)
    open_now = peak = 0

    async def one(depth: int) -> None:
        nonlocal open_now, peak
        async with config.session("ctx", bridge) as session:
            open_now += 1
            peak = max(peak, open_now)
            await session.execute("1")
            if depth == 0:  # a child while the parent holds its depth's only slot
                await one(1)
            open_now -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one, 0)
    assert peak == 2  # one parent and its child, never two parents


async def test_a_parent_and_its_children_share_one_read_only_context_file() -> None:
    config = LocalSandbox()
    text = "a document for a parent and its child"
    async with config.session(text, bridge) as parent, config.session(text, bridge) as child:
        assert parent._context is not None and child._context is not None
        assert parent._context.path == child._context.path
        path = parent._context.path
    assert not path.exists()


# ------------------------------------------------------------------------------- modes and report


async def test_strict_refuses_and_auto_warns_once_naming_the_missing_layer(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(IsolationUnavailableError) as refused:
        async with LocalSandbox(isolation="strict", seccomp=False).session("ctx", bridge):
            pass
    assert refused.value.report is not None and not refused.value.report.confined
    assert "seccomp" in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="rlmflow"):
        for _ in range(2):
            async with LocalSandbox(seccomp=False).session("ctx", bridge) as session:
                assert session.report.mode == "auto" and not session.report.exec
    warnings = [r for r in caplog.records if "isolation degraded" in r.getMessage()]
    assert len(warnings) == 1 and "seccomp" in warnings[0].getMessage()


async def test_the_report_names_every_layer_and_none_is_explicit() -> None:
    async with LocalSandbox().session("ctx", bridge) as session:
        report = session.report
        need(report, "seccomp", "landlock")
        assert report.confined and report.mode == "auto"
        assert report.attributes()["rlm.sandbox.confined"] is True
    async with LocalSandbox(isolation="none").session("ctx", bridge) as session:
        assert session.report.mode == "none" and not session.report.confined
        assert not any(layer.startswith(("seccomp", "landlock", "bubblewrap")) for layer in session.report.layers)


class CountingSandbox:
    """A LocalSandbox seen from outside: how many of its sessions are open at once."""

    def __init__(self, inner: LocalSandbox) -> None:
        self.inner = inner
        self.open = self.peak = self.total = 0

    @asynccontextmanager
    async def session(self, context: Any, bridge: Any) -> AsyncIterator[LocalSandboxSession]:
        async with self.inner.session(context, bridge) as session:
            self.open += 1
            self.total += 1
            self.peak = max(self.peak, self.open)
            try:
                yield session
            finally:
                self.open -= 1


async def test_twenty_children_never_mean_twenty_one_workers_at_once() -> None:
    def root_reply(request: ModelRequest) -> str:
        if "child-" in request.messages[1].content:  # each child computes a little, then answers
            return repl("import time\ntime.sleep(0.05)\nFINAL(context[:5])")
        if sum(1 for m in request.messages if m.role == "assistant") == 0:
            return repl("answers = rlm_query_many([f'child-{i}' for i in range(20)])\nprint(len(answers), answers[0])")
        return repl("FINAL('parent done')")

    sandbox = CountingSandbox(LocalSandbox(max_sessions=3))
    async with RLM(root=ScriptedModel(root_reply, name="root"), sandbox=sandbox, max_turns=3) as rlm:
        result = await rlm.run("abcdefgh", "parent")
    assert result.answer == "parent done"
    assert "20 abcde" in result.transcript[0].feedback
    assert sandbox.total == 21
    assert sandbox.peak <= 1 + 3  # the parent and at most max_sessions children (a queue, not a failure)


async def test_a_flood_of_calls_keeps_the_host_s_tasks_bounded() -> None:
    in_flight = peak = served = 0

    async def slow_bridge(fn: str, args: dict[str, Any]) -> Any:
        nonlocal in_flight, peak, served
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await anyio.sleep(0.01)  # keeps calls in flight so that they pile up
            served += 1
            return {"calls_left": 1}
        finally:
            in_flight -= 1

    flood = (
        "import msgpack, os, socket, struct, sys, time\ns = socket.socket(fileno=os.dup(int(sys.argv[1])))\n"
        "payload = msgpack.packb({})\n"
        "frame = msgpack.packb({'op': 'call', 'id': 10**9, 'fn': 'budget', 'payload': payload})\n"
        "s.sendall((struct.pack('>I', len(frame)) + frame) * 2000)\ns.close()\n"
        "print(budget())"  # answered once the flood has drained
    )
    async with LocalSandbox(cell_timeout=20).session("ctx", slow_bridge) as session:
        result = await session.execute(flood)
        after = await session.execute("1 + 1")
    assert result.error is None and "calls_left" in result.output, result
    assert served == 2001 and peak <= MAX_CALLS_IN_FLIGHT
    assert after.output.strip() == "2"


@pytest.mark.parametrize("bubblewrap", [True, False], ids=["bubblewrap", "no-bubblewrap"])
async def test_a_replaced_worker_starts_from_an_empty_scratch_directory(bubblewrap: bool) -> None:
    async with LocalSandbox(bubblewrap=bubblewrap).session("ctx", bridge) as session:
        await session.execute("open('notes.txt', 'w').write('kept?')")
        crashed = await session.execute("import os\nos._exit(1)")
        listing = await session.execute("import os\nprint(os.listdir('.'))")
    assert crashed.restarted and any("files it wrote" in note for note in crashed.notes)
    assert listing.output.strip() == "[]"
