"""Shared pieces of the adversarial suite: a hostile-code probe, layer checks and process scans."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rlmflow.sandbox.base import SandboxReport

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
