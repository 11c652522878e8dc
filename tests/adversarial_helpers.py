"""Shared pieces of the adversarial suite: a hostile-code probe, layer checks and process scans."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlmflow.sandbox.base import SandboxReport
from rlmflow.sandbox.local import LocalSandboxSession

CONTEXT = "the contents of a document nobody may change " * 1000


async def bridge(fn: str, args: dict[str, Any]) -> Any:
    if fn == "llm_query_many":
        return [f"echo:{p}" for p in args["prompts"]]
    if fn == "budget":
        return {"calls_left": 7}
    raise AssertionError(fn)


def probe(body: str) -> str:
    """Cell code that tries ``body`` and prints ALLOWED, or DENIED with the exception."""
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    return (
        f"try:\n{indented}\n    print('ALLOWED')\n"
        "except BaseException as _e:\n    print('DENIED', type(_e).__name__, _e)\n"
    )


def need(report: SandboxReport, *properties: str) -> None:
    """Skip, naming what is missing, unless the session's report confines every ``properties``."""
    lacking = [name for name in properties if not _holds(report, name)]
    if lacking:
        pytest.skip(f"needs {', '.join(lacking)} confinement; missing here: {'; '.join(report.missing) or 'n/a'}")


def _holds(report: SandboxReport, name: str) -> bool:
    if name in ("seccomp", "bubblewrap", "landlock", "capabilities"):
        return any(layer.startswith(name) for layer in report.layers)
    return bool(getattr(report, name))


def processes_with_env(marker: str) -> list[int]:
    """Pids whose environment contains ``marker`` (the worker's unique ``HOME``), this one excluded."""
    needle = marker.encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
        except OSError:
            continue
        if needle in environ:
            found.append(int(entry.name))
    return found


def pending_connections(listener: Any) -> Iterator[Any]:
    """Connections waiting in a non-blocking listener's backlog (each accepted and closed)."""
    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.close()
        yield conn


def raw_frames(body: str, *, then: str = "time.sleep(0.2)") -> str:
    """Cell code that writes raw frames (``body``: a Python expression of the bytes of one frame's
    msgpack body, or of a list of them) on the worker's own socket, then runs ``then``."""
    return (
        "import msgpack, os, socket, struct, sys, time\n"
        "_s = socket.socket(fileno=os.dup(int(sys.argv[1])))\n"
        f"_bodies = {body}\n"
        "_bodies = [_bodies] if isinstance(_bodies, bytes) else _bodies\n"
        "_s.sendall(b''.join(struct.pack('>I', len(b)) + b for b in _bodies))\n"
        f"{then}"
    )


CURRENT_CELL_ID = (
    "import sys\n_f = sys._getframe()\nwhile _f.f_code.co_name != 'serve':\n    _f = _f.f_back\n"
    "cell_id = _f.f_locals['message']['id']\n"
)
"""Cell code that finds its own cell id (the worker's serve loop holds it): cell code runs in the
worker's process and can read anything the worker knows."""


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its descendants (all threads), from /proc."""
    total = 0.0
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            data = Path(f"/proc/{current}/stat").read_bytes()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        stack.extend(int(child) for child in children)
    return total


async def remember(session: LocalSandboxSession) -> None:
    """Set a variable that a cell after a crash or a restart should (or should not) still see."""
    await session.execute("kept = 'still here'")


async def assert_kept(session: LocalSandboxSession, kept: bool = True) -> None:
    """The variable of :func:`remember` is still there (or gone), and ``context`` is loaded."""
    result = await session.execute("kept")
    if kept:
        assert result.output.strip() == "'still here'", result
    else:
        assert "NameError" in (result.error or ""), result
    assert (await session.execute("len(context)")).output.strip() == str(len(CONTEXT))
