"""One worker process of a local sandbox session, and the host's handling of its messages.

Everything that comes from the worker is untrusted: frames are bounded before they are read
(``wire.check_length``) and while they decode (``wire.decode_untrusted``), then checked against
the schema of their op (:func:`check_result`, :func:`check_call`) before anything acts on them.
The host never waits on the worker: frames to it go through an outbox that one writer task
drains, so a worker that stops reading blocks only that task (see ``docs/security.md``).
"""

from __future__ import annotations

import math
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from .._exceptions import BatchError, RLMError
from . import wire

__all__ = [
    "MAX_CALLS_IN_FLIGHT",
    "Cell",
    "Incarnation",
    "ProtocolViolation",
    "call_args",
    "check_call",
    "check_result",
    "error_reply",
    "error_to_wire",
    "first_child",
    "max_str_bytes",
    "number",
]

MAX_CALLS_IN_FLIGHT = 256
"""Host calls of one worker served (or answered and not yet written) at once; the worker's
further frames wait to be read."""
MAX_ID = (1 << 63) - 1
"""The largest call id the host accepts (the worker counts from 1)."""
MAX_FN_CHARS = 64
"""The longest function name a call may carry (the bridge then checks it against its own set)."""
DECODE_ON_LOOP = 4 << 20
"""Frames up to this size are decoded on the event loop (a few milliseconds); larger ones in a thread."""
MAX_DURATION = 1e9
"""Seconds: a cell's reported duration is a finite number in [0, MAX_DURATION]."""


class ProtocolViolation(wire.FrameError):
    """A frame that decodes but is not one the protocol allows here: the worker is replaced."""


def max_str_bytes(max_output_chars: int) -> int:
    """The longest string a frame from the worker may hold, in bytes: the worker cuts output to
    ``max_output_chars`` and errors and answers to ``wire.MAX_TEXT_CHARS`` (plus a note), and a
    character takes at most 6 bytes once escaped. A longer one is refused before it is decoded
    (decoding 200 MB of text holds the interpreter for 0.2 s); the call arguments inside a
    ``payload`` are binary here and decoded on their own."""
    return 6 * (max(max_output_chars, wire.MAX_TEXT_CHARS) + wire.CUT_NOTE_ROOM) + 1024


@dataclass
class Cell:
    """One executing cell: the watchdog's view of it."""

    id: int
    in_flight: int = 0
    reply: dict[str, Any] | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    changed: anyio.Event = field(default_factory=anyio.Event)
    call_scopes: set[anyio.CancelScope] = field(default_factory=set)
    started: float = 0.0
    ended: float | None = None

    def bump(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def finish(self, reply: dict[str, Any]) -> None:
        if self.reply is None:  # the first outcome wins (a reply racing a kill)
            self.reply = reply
            self.ended = anyio.current_time()
            self.done.set()
            self.bump()


class Incarnation:
    """One worker process, its socket, and the host's outbox to it."""

    def __init__(
        self,
        process: anyio.abc.Process,
        stream: anyio.abc.SocketStream,
        max_frame: int,
        *,
        bwrap: bool,
        max_output_chars: int = 20_000,
        stderr_path: Path | None = None,
    ) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self.bwrap = bwrap
        self.stream = stream
        self.receiver = BufferedByteReceiveStream(stream)
        self.max_frame = max_frame
        self.max_str = max_str_bytes(max_output_chars)
        self.dead = anyio.Event()
        self.reading = False  # the host's read loop waits on the socket
        self.read_done = anyio.Event()  # the read loop has ended
        self.calls = anyio.Semaphore(MAX_CALLS_IN_FLIGHT)
        self.expected_exit = False
        self.failure: str | None = None
        self.writer_scope = anyio.CancelScope()
        self._raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # non-blocking, as anyio uses it
        self._outbox: deque[tuple[bytes, Callable[[], None] | None]] = deque()
        self._wake = anyio.Event()
        self._sending = False
        self._closed = False
        # the worker itself (under bubblewrap, bwrap's grandchild), found once it is ready: a pidfd
        # to signal it and its /proc stat file held open, both bound to that process (never to a
        # later one that reuses its pid)
        self._pidfd: int | None = None
        self._stat_fd: int | None = None
        self._frozen = False

    # -- to the worker: never waits ------------------------------------------------------------
    def post(self, message: dict[str, Any], on_sent: Callable[[], None] | None = None) -> None:
        """Queue ``message`` for the worker and return at once; ``on_sent`` runs once it is written
        (or dropped: the worker is gone). The queue is bounded by its callers: one reply per call
        slot (released by ``on_sent``), one ``exec`` and one ``interrupt`` per cell."""
        data = wire.encode(message)
        if self._closed:
            if on_sent is not None:
                on_sent()
            return
        if not self._outbox and not self._sending:
            # nothing queued and no frame half-written: write what the socket takes now, queue the rest
            try:
                sent = self._raw.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:  # the worker is gone; the read loop reports it
                self.close_outbox()
                if on_sent is not None:
                    on_sent()
                return
            if sent == len(data):
                if on_sent is not None:
                    on_sent()
                return
            data = data[sent:]
        self._outbox.append((data, on_sent))
        self._wake.set()

    async def write_loop(self) -> None:
        """Drain the outbox into the socket. A worker that stops reading blocks only this task,
        which ends when the worker is killed (see ``Incarnation.close_outbox``)."""
        try:
            with self.writer_scope:
                while True:
                    if not self._outbox:
                        await self._wake.wait()
                        self._wake = anyio.Event()
                        continue
                    data, on_sent = self._outbox.popleft()
                    self._sending = True
                    try:
                        await self.stream.send(data)
                    finally:
                        self._sending = False
                        if on_sent is not None:
                            on_sent()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            self.close_outbox()

    def close_outbox(self) -> None:
        """Stop writing: queued frames are dropped (their ``on_sent`` runs)."""
        self._closed = True
        self.writer_scope.cancel()
        while self._outbox:
            _, on_sent = self._outbox.popleft()
            if on_sent is not None:
                on_sent()

    # -- from the worker -----------------------------------------------------------------------
    async def receive(self) -> dict[str, Any] | None:
        try:
            header = await self.receiver.receive_exactly(wire.HEADER.size)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            return None
        (length,) = wire.HEADER.unpack(header)
        wire.check_length(length, self.max_frame)
        try:
            if length <= DECODE_ON_LOOP:
                return wire.decode_untrusted(await self.receiver.receive_exactly(length), max_str=self.max_str)
            # a big frame (up to max_frame, 256 MB: a call's binary payload) is read in pieces,
            # joined and decoded in a thread: allocating or copying it whole on the event loop
            # would hold it for 100 ms and more (the join lets go of the interpreter lock)
            pieces: list[bytes] = []
            missing = length
            while missing:
                piece = await self.receiver.receive(min(missing, 1 << 20))
                pieces.append(piece)
                missing -= len(piece)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            raise wire.FrameError("stream ended inside a frame") from None
        return await anyio.to_thread.run_sync(partial(_join_and_decode, pieces, self.max_str))

    # -- the process ---------------------------------------------------------------------------
    def attach(self) -> None:
        """Find the worker process (bwrap's grandchild under bubblewrap) and hold a pidfd to it.

        Called once the worker is ready, before any model code ran (so no process of its own yet).
        Blocking (reads /proc): call from a thread.
        """
        pid = self.process.pid
        for _ in range(4):  # bwrap -> bwrap (the namespace's init) -> python
            child = first_child(pid)
            if child is None:
                break
            pid = child
        try:
            self._stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._stat_fd = None
        if hasattr(os, "pidfd_open"):
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:
                self._pidfd = None

    def freeze(self) -> None:
        """Stop the worker (SIGSTOP) between cells: its threads cannot compute or call the host
        until :meth:`thaw`. Through a pidfd, so a reused pid is never signalled."""
        self._frozen = True
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self._frozen:
            self._frozen = False
            self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        if self.process.returncode is not None:
            return
        try:
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, signum)
            elif not self.bwrap and hasattr(os, "killpg"):  # the worker is our child, not yet reaped
                os.kill(self.process.pid, signum)
        except OSError:
            pass

    def cpu_seconds(self) -> float | None:
        """User + system time of the worker process, all its threads; ``None`` where /proc cannot
        tell (then the watchdog pauses while host calls are in flight). One ``pread`` of a held
        procfs file (a few microseconds, no disk), so it is read on the event loop."""
        if self._stat_fd is None:
            return None
        try:
            data = os.pread(self._stat_fd, 4096, 0)
        except OSError:  # the worker is gone
            return None
        fields = data[data.rfind(b")") + 2 :].split()  # after the command name, which may hold anything
        if len(fields) < 13:
            return None
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

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

    def release(self) -> None:
        """After the process is reaped: stop writing, let go of the pidfd and the stat file."""
        self.close_outbox()
        for name in ("_pidfd", "_stat_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

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
        """The end of what the worker wrote to stderr (read only to explain a failure: a few KB)."""
        if self.stderr_path is None:
            return ""
        try:
            with self.stderr_path.open("rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - 4 * limit))
                tail = file.read()
        except OSError:
            return ""
        return tail.decode("utf-8", "replace").strip()[-limit:]


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _join_and_decode(pieces: list[bytes], max_str: int) -> dict[str, Any]:
    body = b"".join(pieces)
    pieces.clear()
    return wire.decode_untrusted(body, max_str=max_str)


def first_child(pid: int) -> int | None:
    """The first child of ``pid`` (bubblewrap's namespace init), if the kernel lists it."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            children = fh.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def number(value: Any) -> float:
    """A number the worker reported; anything else (``inf`` and NaN included) counts as 0."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            converted = float(value)
        except OverflowError:
            return 0.0
        if math.isfinite(converted):
            return converted
    return 0.0


# -- the schemas: one per op from the worker ------------------------------------------------------
# A frame is checked whole before anything acts on it: its keys (all required ones present, no
# other), each value's type (``bool`` is not an ``int``), ranges and finiteness, and ids against
# what the host expects. Anything else is a ProtocolViolation: the read loop kills the worker and
# the cell reports a crash, as for a frame that does not decode.

MAX_CALL_PAYLOAD = 72 * 1024 * 1024
"""Bytes of one host call's arguments: a default batch (64 M characters of prompts) and its framing."""

_RESULT_REQUIRED = frozenset({"op", "id", "output", "output_chars", "error", "interrupted", "duration"})
_RESULT_KEYS = _RESULT_REQUIRED | {"final", "established"}
_CALL_KEYS = frozenset({"op", "id", "fn", "payload"})


def _keys(message: dict[str, Any], required: frozenset[str], allowed: frozenset[str]) -> None:
    keys = message.keys()
    if not required <= keys or not keys <= allowed:
        missing, unknown = sorted(required - keys), sorted(str(k)[:40] for k in keys - allowed)[:5]
        raise ProtocolViolation(f"a {message['op']} frame with keys missing {missing} or unknown {unknown}")


def _int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def check_call(message: dict[str, Any]) -> None:
    """A ``call`` frame: ``id`` an int in [1, MAX_ID], ``fn`` a short string, ``payload`` bytes."""
    _keys(message, _CALL_KEYS, _CALL_KEYS)
    if not _int(message["id"], 1, MAX_ID):
        raise ProtocolViolation("a call whose id is not an integer in [1, 2**63)")
    fn = message["fn"]
    if type(fn) is not str or not 0 < len(fn) <= MAX_FN_CHARS:
        raise ProtocolViolation(f"a call whose fn is not a string of 1 to {MAX_FN_CHARS} characters")
    if type(message["payload"]) is not bytes:
        raise ProtocolViolation("a call without a binary payload")


def check_result(message: dict[str, Any], cell: Cell | None, max_output_chars: int) -> dict[str, Any]:
    """A ``result`` frame, for the running cell: the result with its texts cut to size.

    ``id`` must be the running cell's (a result when no cell runs, for another cell, or a second
    one for the same cell is a violation); ``output``, ``error`` (or nil), ``final`` and
    ``established`` (both optional) strings; ``output_chars`` an int in [0, MAX_ID]; ``duration``
    a finite number in [0, MAX_DURATION]; ``interrupted`` a bool. ``output`` is cut to ``max_output_chars``, error
    and answer to ``wire.MAX_TEXT_CHARS`` (each with a note of its true length) before anything
    else looks at them.
    """
    _keys(message, _RESULT_REQUIRED, _RESULT_KEYS)
    cell_id = message["id"]
    if cell is None or cell.done.is_set():
        raise ProtocolViolation("a result while no cell is running")
    if not _int(cell_id, 0, MAX_ID) or cell_id != cell.id:
        raise ProtocolViolation(f"a result for another cell than the running one ({cell.id})")
    output, error, final = message["output"], message["error"], message.get("final")
    if type(output) is not str or not (error is None or type(error) is str):
        raise ProtocolViolation("a result whose output or error is not a string")
    if "final" in message and type(final) is not str:
        raise ProtocolViolation("a result whose final answer is not a string")
    established = message.get("established", "")
    if type(established) is not str:
        raise ProtocolViolation("a result whose note on established variables is not a string")
    if not _int(message["output_chars"], 0, MAX_ID):
        raise ProtocolViolation("a result whose output_chars is not an integer >= 0")
    duration = message["duration"]
    if type(duration) not in (int, float) or not 0 <= duration <= MAX_DURATION:  # NaN fails both
        raise ProtocolViolation("a result whose duration is not a finite number >= 0")
    if type(message["interrupted"]) is not bool:
        raise ProtocolViolation("a result whose interrupted flag is not a bool")
    result = {
        "output": wire.cut_text(output, max_output_chars),
        "output_chars": message["output_chars"],
        "error": None if error is None else wire.cut_text(error, wire.MAX_TEXT_CHARS),
        "interrupted": message["interrupted"],
        "duration": float(duration),
    }
    if isinstance(final, str):
        result["final"] = wire.cut_text(final, wire.MAX_TEXT_CHARS)
    result["established"] = wire.cut_text(established, wire.MAX_ESTABLISHED_CHARS)
    return result


def call_args(message: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments, decoded with the same bounds as a frame; ``FrameError`` past them.

    At most :data:`MAX_CALL_PAYLOAD` bytes are decoded: decoding holds the event loop (about a
    millisecond per megabyte of strings, and a thread would not release it), so a bigger payload
    is refused before it is looked at.
    """
    payload = message.get("payload")
    if not isinstance(payload, bytes):
        raise wire.FrameError("a call without a binary payload")
    if len(payload) > MAX_CALL_PAYLOAD:
        raise wire.FrameError(
            f"the arguments take {len(payload):,} bytes; one call may send {MAX_CALL_PAYLOAD:,}: split the batch"
        )
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
