"""One worker process of a local sandbox session, and the host's handling of its messages.

Everything that comes from the worker is untrusted: frames are bounded before they are read
(``wire.check_length``) and while they decode (``wire.decode_untrusted``).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .._exceptions import BatchError, RLMError
from . import wire

__all__ = [
    "MAX_CALLS_IN_FLIGHT",
    "Cell",
    "Incarnation",
    "call_args",
    "error_reply",
    "error_to_wire",
    "first_child",
    "number",
]

MAX_CALLS_IN_FLIGHT = 256
"""Host calls of one worker served at once; the worker's further frames wait to be read."""


@dataclass
class Cell:
    """One executing cell: the watchdog's view of it."""

    id: int
    in_flight: int = 0
    reply: dict[str, Any] | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    call_scopes: set[anyio.CancelScope] = field(default_factory=set)

    def bump(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def finish(self, reply: dict[str, Any]) -> None:
        if self.reply is None:  # the first outcome wins (a reply racing a kill)
            self.reply = reply
            self.done.set()
            self.bump()


class Incarnation:
    """One worker process and its socket."""

    def __init__(
        self, process: anyio.abc.Process, stream: anyio.abc.SocketStream, max_frame: int, *, bwrap: bool
    ) -> None:
        self.process = process
        self.bwrap = bwrap
        self.stream = stream
        self.receiver = BufferedByteReceiveStream(stream)
        self.max_frame = max_frame
        self.send_lock = anyio.Lock()
        self.stderr_tail: deque[bytes] = deque(maxlen=64)
        self.dead = anyio.Event()
        self.stderr_done = anyio.Event()
        self.calls = anyio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self.expected_exit = False
        self.failure: str | None = None

    async def send(self, message: dict[str, Any]) -> None:
        data = wire.encode(message)
        async with self.send_lock:
            await self.stream.send(data)

    async def receive(self) -> dict[str, Any] | None:
        try:
            header = await self.receiver.receive_exactly(wire.HEADER.size)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            return None
        (length,) = wire.HEADER.unpack(header)
        wire.check_length(length, self.max_frame)
        try:
            body = await self.receiver.receive_exactly(length)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            raise wire.FrameError("stream ended inside a frame") from None
        return wire.decode_untrusted(body)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (bubblewrap's namespace dies with it)."""
        self.expected_exit = True
        if self.process.returncode is None:
            try:
                if hasattr(os, "killpg"):
                    os.killpg(self.process.pid, signal.SIGKILL)
                else:  # pragma: no cover - Windows has no process groups to kill
                    self.process.kill()
            except (ProcessLookupError, PermissionError):
                pass

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "worker unresponsive"
        if self.bwrap and code > 128:  # bubblewrap exits with 128 + the signal that ended the worker
            code = 128 - code
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def stderr_text(self, limit: int = 1500) -> str:
        text = b"".join(self.stderr_tail).decode("utf-8", "replace").strip()
        return text[-limit:]


def first_child(pid: int) -> int | None:
    """The first child of ``pid`` (bubblewrap's namespace init), if the kernel lists it."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            children = fh.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def number(value: Any) -> float:
    """A number the worker reported; anything else counts as 0."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def call_args(message: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments, decoded with the same bounds as a frame; ``FrameError`` past them."""
    payload = message.get("payload")
    if not isinstance(payload, bytes):
        raise wire.FrameError("a call without a binary payload")
    args = wire.unpack_untrusted(payload)
    if not isinstance(args, dict):
        raise wire.FrameError("a call's arguments are not a map")
    return args


def error_reply(call_id: Any, exc: RLMError) -> dict[str, Any]:
    return {"op": "reply", "id": call_id, "ok": False, "error": error_to_wire(exc)}


def error_to_wire(exc: RLMError) -> dict[str, Any]:
    """An RLMError as a msgpack-able map the worker turns back into an exception."""
    wire_error: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message}
    if isinstance(exc, BatchError):
        wire_error["results"] = list(exc.results)
        wire_error["errors"] = {index: error_to_wire(err) for index, err in exc.errors.items()}
    return wire_error
