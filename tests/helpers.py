"""Shared builders for tests: scripted roots that play a fixed sequence of code cells."""

from __future__ import annotations

import importlib.util
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rlmflow import ModelRequest, ScriptedModel


def repl(code: str) -> str:
    return f"Let me run this.\n```repl\n{code}\n```"


def turn_script(cells: Sequence[str], *, name: str = "root") -> ScriptedModel:
    """A root that answers turn k of a run with cells[k]; child runs (depth > 0) get FINAL(context)."""

    def reply(request: ModelRequest) -> str:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        return repl(cells[min(turn, len(cells) - 1)])

    return ScriptedModel(reply, name=name)


def echo_sub(transform: Callable[[str], str] = lambda p: p[:10], *, name: str = "sub") -> ScriptedModel:
    return ScriptedModel(lambda r: transform(r.messages[-1].content), name=name)


@contextmanager
def refused_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections for as long as the block runs: the kernel picks
    a free one (bind to 0) and the socket holds it without listening, so nothing else can take it
    and a connection gets ECONNREFUSED at once (no port assumed closed, no check-then-use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def load_example(name: str = "service") -> Any:
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def killed_once(command: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool]) -> str:
    """Run ``command`` until ``ready()`` holds, then SIGKILL it (a deploy, an OOM kill); what it
    printed. Fails if the process ends on its own first, or after 60 s."""
    import signal

    import anyio

    with log.open("wb") as err:
        process = await anyio.open_process(command, env=env, stdout=err, stderr=err)
        try:
            with anyio.fail_after(60):
                while not ready():
                    assert process.returncode is None, log.read_text()
                    await anyio.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await process.aclose()
    return log.read_text()
