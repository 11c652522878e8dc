"""The local sandbox: persistence, timeouts, crashes, isolation, framing, output caps, threads."""

from __future__ import annotations

import os
from typing import Any

import pytest

from rlmflow import BatchError, LocalSandbox, ThrottledError

pytestmark = pytest.mark.anyio

CONTEXT = "the quick brown fox " * 50_000


async def echo_bridge(fn: str, args: dict[str, Any]) -> Any:
    if fn == "llm_query_many":
        return [f"echo:{p}" for p in args["prompts"]]
    if fn == "budget":
        return {"calls_left": 7}
    raise AssertionError(fn)


async def test_state_persists_and_trailing_expression_is_shown() -> None:
    async with LocalSandbox().session(CONTEXT, echo_bridge) as sandbox:
        first = await sandbox.execute("n = len(context)\nwords = context.split()")
        second = await sandbox.execute("n, len(words)")
    assert first.error is None and first.output == ""
    assert second.output.strip() == f"({len(CONTEXT)}, 200000)"


async def test_timeout_interrupts_and_keeps_state() -> None:
    async with LocalSandbox(cell_timeout=0.5, interrupt_grace=2).session(CONTEXT, echo_bridge) as sandbox:
        await sandbox.execute("kept = 41")
        slow = await sandbox.execute("import time\nkept += 1\ntime.sleep(30)")
        after = await sandbox.execute("kept")
    assert slow.timed_out and not slow.restarted
    assert "TimeoutError" in (slow.error or "") and "Variables are kept" in (slow.error or "")
    assert after.output.strip() == "42"


async def test_hard_hang_is_killed_and_context_reloaded() -> None:
    # signal.SIG_IGN makes the SIGINT useless: only the kill ends this cell.
    async with LocalSandbox(cell_timeout=0.3, interrupt_grace=0.3).session(CONTEXT, echo_bridge) as sandbox:
        await sandbox.execute("lost = 1")
        hung = await sandbox.execute("import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass")
        lost = await sandbox.execute("lost")
        reloaded = await sandbox.execute("len(context)")
        assert sandbox.restarts == 1
    assert hung.timed_out and hung.restarted
    assert any("VARIABLES WERE LOST" in note for note in hung.notes)
    assert "NameError" in (lost.error or "")
    assert reloaded.output.strip() == str(len(CONTEXT))


async def test_waiting_for_sub_calls_does_not_count_against_the_timeout() -> None:
    async def slow_bridge(fn: str, args: dict[str, Any]) -> Any:
        import anyio

        await anyio.sleep(1.0)
        return ["late"] * len(args["prompts"])

    async with LocalSandbox(cell_timeout=0.5).session(CONTEXT, slow_bridge) as sandbox:
        result = await sandbox.execute("print(llm_query('q'))")
    assert result.error is None and not result.timed_out
    assert result.output.strip() == "late"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("import os\nos._exit(7)", "exited with status 7"),
        ("import ctypes\nctypes.string_at(0)", "killed by SIGSEGV"),
    ],
)
async def test_crash_leaves_host_alive_and_restarts(code: str, expected: str) -> None:
    async with LocalSandbox().session(CONTEXT, echo_bridge) as sandbox:
        crashed = await sandbox.execute(code)
        after = await sandbox.execute("len(context)")
    assert crashed.restarted and expected in (crashed.error or "")
    assert after.output.strip() == str(len(CONTEXT))


async def test_host_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLMFLOW_PLANTED_SECRET", "hunter2")
    async with LocalSandbox().session(CONTEXT, echo_bridge) as sandbox:
        env = await sandbox.execute(
            "import os\nprint(sorted(os.environ))\nprint(os.environ.get('RLMFLOW_PLANTED_SECRET'))"
        )
        proc = await sandbox.execute(
            "try:\n    print(open(f'/proc/{os.getppid()}/environ', 'rb').read().count(b'hunter2'))\n"
            "except OSError as e:\n    print('denied', type(e).__name__)"
        )
        landlock = any(layer.startswith("landlock(") for layer in sandbox.isolation)
    assert "RLMFLOW_PLANTED_SECRET" not in env.output and "hunter2" not in env.output
    assert "None" in env.output
    if landlock:
        assert proc.output.startswith("denied")
    else:  # pragma: no cover - kernels without Landlock
        pytest.skip("Landlock unavailable: /proc/<host>/environ is readable")


async def test_isolation_denies_network_and_exec_where_landlock_is_available() -> None:
    async with LocalSandbox().session(CONTEXT, echo_bridge) as sandbox:
        if not any("tcp-deny" in layer for layer in sandbox.isolation):
            pytest.skip("Landlock ABI < 4 on this kernel")
        net = await sandbox.execute("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)")
        spawn = await sandbox.execute("import subprocess\nsubprocess.run(['/bin/true'])")
        write = await sandbox.execute(f"open({os.path.expanduser('~/rlmflow-escape')!r}, 'w')")
        scratch = await sandbox.execute("open('notes.txt', 'w').write('ok')\nprint(open('notes.txt').read())")
    assert "PermissionError" in (net.error or "")
    assert "PermissionError" in (spawn.error or "")
    assert "PermissionError" in (write.error or "")
    assert scratch.output.strip() == "ok"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff",  # a length far beyond the frame limit
        b"\x00\x00\x00\x03\xc1\xc1\xc1",  # bytes msgpack cannot decode
        b"\x00\x00\x00\x01\x05",  # valid msgpack, but not a map with an op
    ],
)
async def test_malformed_frames_restart_the_worker(payload: bytes) -> None:
    code = (
        "import socket, sys, time\ns = socket.socket(fileno=int(sys.argv[1]))\n"
        f"s.sendall({payload!r})\ntime.sleep(5)"
    )
    async with LocalSandbox().session(CONTEXT, echo_bridge) as sandbox:
        bad = await sandbox.execute(code)
        after = await sandbox.execute("1 + 1")
    assert bad.restarted and "bad frame" in (bad.error or "")
    assert after.output.strip() == "2"


async def test_output_is_capped_head_and_tail_with_true_length() -> None:
    async with LocalSandbox(max_output_chars=1000).session(CONTEXT, echo_bridge) as sandbox:
        result = await sandbox.execute("print('A' * 600 + 'B' * 50_000 + 'Z' * 600)")
    assert result.output_chars == 51_201
    assert result.output.startswith("A" * 500)
    assert result.output.rstrip().endswith("Z" * 499)
    assert "51,201" in result.output and len(result.output) < 1200


async def test_bridge_calls_from_threads_and_budget() -> None:
    code = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(8) as pool:\n"
        "    got = list(pool.map(lambda i: llm_query(f'p{i}'), range(40)))\n"
        "print(got == [f'echo:p{i}' for i in range(40)], budget()['calls_left'])"
    )
    async with LocalSandbox().session(CONTEXT, echo_bridge) as sandbox:
        result = await sandbox.execute(code)
    assert result.error is None
    assert result.output.strip() == "True 7"


async def test_batch_errors_reach_model_code_with_partial_results() -> None:
    async def flaky(fn: str, args: dict[str, Any]) -> Any:
        raise BatchError(
            "1 of 3 failed",
            results=["a", None, "c"],
            errors={1: ThrottledError("slow down", status_code=429)},
        )

    code = (
        "try:\n    llm_query_many(['x', 'y', 'z'])\nexcept BatchError as e:\n"
        "    print(e.results, e.failed_indices, type(e.errors[1]).__name__)"
    )
    async with LocalSandbox().session(CONTEXT, flaky) as sandbox:
        result = await sandbox.execute(code)
    assert result.output.strip() == "['a', None, 'c'] [1] ModelCallError"


async def test_final_and_errors_in_cells() -> None:
    async with LocalSandbox().session(CONTEXT, echo_bridge) as sandbox:
        syntax = await sandbox.execute("def broken(:\n  pass")
        raised = await sandbox.execute("raise SystemExit(3)")
        final = await sandbox.execute("FINAL({'answer': 42})")
    assert "SyntaxError" in (syntax.error or "")
    assert "SystemExit" in (raised.error or "")
    assert final.final == '{"answer": 42}'
