"""The interpreter process behind one session of the fake AgentCore Code Interpreter.

Started by :class:`tests.fakes.fake_agentcore.FakeAgentCoreServer` as ``python -I this_file``
with the session directory as cwd and an empty environment. It reads requests from stdin and
writes replies to the saved stdout, each a 4-byte big-endian length and a JSON object. Like a
Jupyter kernel it keeps one global namespace across executions, shows the value of a trailing
expression, and has one persistent ``sys.stdout`` that sends every thread's output to the
execution running at the time (output between executions goes to the next one).

Standard library only; test code, not part of the library's trust boundary.
"""

from __future__ import annotations

import ast
import io
import json
import os
import struct
import sys
import threading
import time
import traceback
from typing import Any, BinaryIO

_HEADER = struct.Struct(">I")


class _KernelStream(io.TextIOBase):
    """Persistent stream: appends to whichever buffer is current, from any thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with self.lock:
            self.buffer.append(s)
        return len(s)

    def take(self) -> str:
        with self.lock:
            text, self.buffer = "".join(self.buffer), []
        return text


def _read(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (length,) = _HEADER.unpack(header)
    body = stream.read(length)
    message: dict[str, Any] = json.loads(body)
    return message


def _write(stream: BinaryIO, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode("utf-8")
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def _execute(code: str, namespace: dict[str, Any], out: _KernelStream, err: _KernelStream) -> dict[str, Any]:
    started = time.perf_counter()
    failed = False
    try:
        tree = ast.parse(code, filename="<execution>")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body[-1].value)
            tree.body.pop()
        exec(compile(tree, "<execution>", "exec"), namespace)
        if last is not None:
            value = eval(compile(last, "<execution>", "eval"), namespace)
            if value is not None:
                out.write(repr(value) + "\n")
    except BaseException:  # a kernel reports every failure and keeps going
        failed = True
        err.write(traceback.format_exc())
    return {
        "stdout": out.take(),
        "stderr": err.take(),
        "error": failed,
        "ms": (time.perf_counter() - started) * 1000,
    }


def main() -> None:
    requests = sys.stdin.buffer
    replies = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # nothing but replies on the protocol stream
    out, err = _KernelStream(), _KernelStream()
    sys.stdout, sys.stderr = out, err
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    while True:
        request = _read(requests)
        if request is None:
            return
        _write(replies, _execute(str(request.get("code", "")), namespace, out, err))


if __name__ == "__main__":
    main()
