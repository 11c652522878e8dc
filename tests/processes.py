"""Sandbox worker processes seen from /proc: which run below this test process, and waiting for
them to go (tests of runs that are stopped: no worker may outlive its run)."""

from __future__ import annotations

import os
from pathlib import Path

import anyio


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def worker_processes() -> set[tuple[int, int]]:
    """(pid, start time) of each live sandbox worker process descended from this test process, at
    any depth: bubblewrap puts two processes of its own between us and the worker's Python, and
    their command lines name worker.py too. A start time tells a reused pid from the worker."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
    found: set[tuple[int, int]] = set()
    stack = list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        stat = _stat(pid)
        if stat is not None and stat[1] != "Z" and b"worker.py" in cmdline:
            found.add((pid, stat[2]))
    return found


def alive(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Those of ``processes`` still running, wherever they were reparented (zombies are gone)."""
    return {(pid, start) for pid, start in processes if (stat := _stat(pid)) and stat[2] == start and stat[1] != "Z"}


async def wait_for_worker() -> set[tuple[int, int]]:
    """The sandbox workers below us once one has started (a session starts its worker lazily)."""
    with anyio.move_on_after(30):  # a safety net; it starts within a second
        while not worker_processes():  # noqa: ASYNC110 - /proc has no event to wait on
            await anyio.sleep(0.01)
    return worker_processes()


async def gone(processes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Wait until none of ``processes`` runs and no worker is left below us; return what still runs
    after 10 s (a safety net: a stopped run ends its worker at once, in practice)."""
    with anyio.move_on_after(10):
        while alive(processes) | worker_processes():  # noqa: ASYNC110 - /proc has no event to wait on
            await anyio.sleep(0.01)
    return alive(processes) | worker_processes()
