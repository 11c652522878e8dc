"""The host side of the local sandbox: one worker process per session, driven over a socketpair.

A session owns one worker at a time. A cell that overruns its time gets a real SIGINT (the
namespace survives); if it does not stop within the grace period the worker is killed and
replaced, ``context`` is reloaded and the cell's result says that variables were lost. A worker
that crashes or sends a bad frame is replaced the same way; the host never goes down with it.

Time the worker spends waiting for the host (sub-LLM calls) does not count against the cell
timeout: the watchdog pauses while any host call of the cell is in flight.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from .._exceptions import BatchError, RLMError, SandboxCrashedError
from .._util import single_exception
from ..telemetry.logs import get_logger
from . import wire
from .base import Bridge, CellResult, Context

__all__ = ["LocalSandbox", "LocalSandboxSession", "error_to_wire"]

_WORKER = Path(__file__).with_name("worker.py")
_logger = get_logger("rlmflow.sandbox")


class LocalSandbox:
    """Runs cells in a hardened local Python process (see :mod:`rlmflow.sandbox.isolation`).

    A configuration object: each run opens its own session (and its own worker) with
    :meth:`session`. Options are keyword-only:

    - ``cell_timeout``: seconds of computation a cell may use (waiting for sub-LLMs is free);
    - ``interrupt_grace``: seconds between the SIGINT and the SIGKILL;
    - ``max_output_chars``: cap of a cell's printed output (head and tail kept);
    - ``memory_bytes``, ``max_open_files``, ``max_file_bytes``: rlimits of the worker;
    - ``landlock``: restrict the worker's filesystem, TCP and signals where the kernel allows;
    - ``env``: extra environment variables for the worker (nothing of the host's is passed);
    - ``python``: the interpreter (default: the host's).
    """

    def __init__(
        self,
        *,
        cell_timeout: float = 120.0,
        interrupt_grace: float = 2.0,
        max_output_chars: int = 20_000,
        memory_bytes: int | None = 8 << 30,
        max_open_files: int | None = 256,
        max_file_bytes: int | None = 1 << 30,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME,
        landlock: bool = True,
        env: Mapping[str, str] | None = None,
        python: str | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        if cell_timeout <= 0 or interrupt_grace < 0:
            raise ValueError("cell_timeout must be > 0 and interrupt_grace >= 0")
        self.cell_timeout = cell_timeout
        self.interrupt_grace = interrupt_grace
        self.max_output_chars = max_output_chars
        self.memory_bytes = memory_bytes
        self.max_open_files = max_open_files
        self.max_file_bytes = max_file_bytes
        self.max_frame_bytes = max_frame_bytes
        self.landlock = landlock
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.start_timeout = start_timeout

    @asynccontextmanager
    async def session(self, context: Context, bridge: Bridge) -> AsyncIterator[LocalSandboxSession]:
        """Start a worker with ``context`` loaded; stop it and delete its scratch files on exit."""
        with single_exception():
            async with anyio.create_task_group() as tg:
                session = LocalSandboxSession(self, bridge, tg)
                try:
                    await session._start(context)
                    yield session
                finally:
                    with anyio.CancelScope(shield=True):
                        await session._close()
                    tg.cancel_scope.cancel()

    def __repr__(self) -> str:
        return f"LocalSandbox(cell_timeout={self.cell_timeout}, landlock={self.landlock})"


@dataclass
class _Cell:
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


class _Incarnation:
    """One worker process and its socket."""

    def __init__(self, process: anyio.abc.Process, stream: anyio.abc.SocketStream, max_frame: int) -> None:
        self.process = process
        self.stream = stream
        self.receiver = BufferedByteReceiveStream(stream)
        self.max_frame = max_frame
        self.send_lock = anyio.Lock()
        self.stderr_tail: deque[bytes] = deque(maxlen=64)
        self.dead = anyio.Event()
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
        return wire.decode(body)

    def kill(self) -> None:
        self.expected_exit = True
        if self.process.returncode is None:
            try:
                self.process.kill()
            except ProcessLookupError:
                pass

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "worker unresponsive"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def stderr_text(self, limit: int = 1500) -> str:
        text = b"".join(self.stderr_tail).decode("utf-8", "replace").strip()
        return text[-limit:]


class LocalSandboxSession:
    """A live local sandbox. Created by :meth:`LocalSandbox.session`."""

    def __init__(self, config: LocalSandbox, bridge: Bridge, tg: anyio.abc.TaskGroup) -> None:
        self._config = config
        self._bridge = bridge
        self._tg = tg
        self._lock = anyio.Lock()
        self._cell: _Cell | None = None
        self._cell_ids = 0
        self._incarnation: _Incarnation | None = None
        self._dir: Path | None = None
        self._context_path: Path | None = None
        self._context_kind = "text"
        self.restarts = 0
        self.isolation: list[str] = []
        self.load_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    async def _start(self, context: Context) -> None:
        self._dir = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="rlmflow-")))
        self._context_kind = "text" if isinstance(context, str) else "json"
        self._context_path = self._dir / "context" / ("context.txt" if self._context_kind == "text" else "context.json")
        await anyio.to_thread.run_sync(_write_context, self._context_path, context)
        (self._dir / "work").mkdir()
        await self._spawn()

    async def _spawn(self) -> None:
        assert self._dir is not None and self._context_path is not None
        config = self._config
        work = self._dir / "work"
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(work),
            "TMPDIR": str(work),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
            **config.env,
        }
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await anyio.open_process(
                [config.python, "-I", "-X", "faulthandler", str(_WORKER), str(child.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                cwd=str(work),
                env=env,
                pass_fds=[child.fileno()],
                start_new_session=True,  # a Ctrl-C in the terminal belongs to the host, not the worker
            )
        except OSError as exc:
            parent.close()
            raise SandboxCrashedError(f"cannot start the sandbox worker with {config.python}: {exc}") from exc
        finally:
            child.close()
        stream = await anyio.abc.UNIXSocketStream.from_socket(parent)
        incarnation = _Incarnation(process, stream, config.max_frame_bytes)
        self._tg.start_soon(self._drain_stderr, incarnation)
        init = {
            "op": "init",
            "context_path": str(self._context_path),
            "context_kind": self._context_kind,
            "max_output_chars": config.max_output_chars,
            "max_frame": config.max_frame_bytes,
            "isolation": {
                "rlimits": {
                    "memory_bytes": config.memory_bytes,
                    "max_open_files": config.max_open_files,
                    "max_file_bytes": config.max_file_bytes,
                },
                "landlock": config.landlock,
                "read_paths": [str(self._context_path.parent), str(_WORKER.parent)],
                "write_paths": [str(work)],
            },
        }
        try:
            await incarnation.send(init)
            with anyio.fail_after(config.start_timeout):
                ready = await incarnation.receive()
        except (TimeoutError, OSError, anyio.BrokenResourceError, wire.FrameError) as exc:
            incarnation.kill()
            await self._reap(incarnation)
            raise SandboxCrashedError(
                f"the sandbox worker did not start ({type(exc).__name__}: {exc}) {incarnation.stderr_text()}",
                returncode=incarnation.process.returncode,
            ) from exc
        if ready is None or ready.get("op") != "ready":
            incarnation.kill()
            await self._reap(incarnation)
            detail = (ready or {}).get("error") or incarnation.stderr_text() or incarnation.describe_exit()
            raise SandboxCrashedError(
                f"the sandbox worker failed to start: {detail}", returncode=incarnation.process.returncode
            )
        self.isolation = list(ready.get("isolation") or [])
        self.load_seconds = float(ready.get("load_seconds", 0.0))
        self._incarnation = incarnation
        self._tg.start_soon(self._read_loop, incarnation)

    async def _restart(self) -> None:
        old = self._incarnation
        if old is not None:
            old.kill()
            await self._reap(old)
        self.restarts += 1
        _logger.warning("sandbox worker restarted", restarts=self.restarts)
        await self._spawn()

    async def _reap(self, incarnation: _Incarnation) -> None:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(5):
                await incarnation.process.wait()
            await incarnation.stream.aclose()
            incarnation.dead.set()

    async def _close(self) -> None:
        incarnation, self._incarnation = self._incarnation, None
        if incarnation is not None and incarnation.process.returncode is None:
            incarnation.expected_exit = True
            try:
                await incarnation.send({"op": "shutdown"})
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            with anyio.move_on_after(1):
                await incarnation.process.wait()
            incarnation.kill()
        if incarnation is not None:
            await self._reap(incarnation)
        if self._dir is not None:
            await anyio.to_thread.run_sync(shutil.rmtree, self._dir, True)

    # -- tasks -------------------------------------------------------------------------------
    async def _drain_stderr(self, incarnation: _Incarnation) -> None:
        stream = incarnation.process.stderr
        if stream is None:
            return
        try:
            async for chunk in stream:
                incarnation.stderr_tail.append(chunk[-4096:])
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def _read_loop(self, incarnation: _Incarnation) -> None:
        try:
            while True:
                message = await incarnation.receive()
                if message is None:
                    break
                op = message["op"]
                if op == "result":
                    cell = self._cell
                    if cell is not None and cell.id == message.get("id"):
                        cell.finish(message)
                elif op == "call":
                    self._tg.start_soon(self._serve_call, incarnation, self._cell, message)
        except wire.FrameError as exc:
            incarnation.failure = f"the worker sent a bad frame ({exc})"
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        unexpected = not incarnation.expected_exit
        # Let a dying worker exit on its own first: signalling a just-exited child makes Popen
        # reap it behind asyncio's back, and its exit status is lost.
        with anyio.CancelScope(shield=True):
            if incarnation.failure is None:
                with anyio.move_on_after(2):
                    await incarnation.process.wait()
            if incarnation.process.returncode is None:
                incarnation.kill()
                with anyio.move_on_after(5):
                    await incarnation.process.wait()
        cell = self._cell
        if cell is not None and unexpected:
            reason = incarnation.failure or f"the worker {incarnation.describe_exit()}"
            stderr = incarnation.stderr_text()
            cell.finish(
                {
                    "op": "result",
                    "output": "",
                    "output_chars": 0,
                    "error": f"SandboxCrash: {reason} while running this cell."
                    + (f"\nworker stderr:\n{stderr}" if stderr else ""),
                    "crashed": True,
                }
            )

    async def _serve_call(self, incarnation: _Incarnation, cell: _Cell | None, message: dict[str, Any]) -> None:
        call_id = message.get("id")
        if cell is not None:
            cell.in_flight += 1
            cell.bump()
        reply: dict[str, Any]
        try:
            with anyio.CancelScope() as scope:
                if cell is not None:
                    cell.call_scopes.add(scope)
                value = await self._bridge(str(message.get("fn")), dict(message.get("args") or {}))
                reply = {"op": "reply", "id": call_id, "ok": True, "value": value}
            if scope.cancelled_caught:
                reply = _error_reply(call_id, RLMError("the cell ended before this call finished"))
        except RLMError as exc:
            reply = _error_reply(call_id, exc)
        except Exception as exc:  # a bug on the host side must still answer the waiting thread
            _logger.exception("host call failed", fn=message.get("fn"))
            reply = _error_reply(call_id, RLMError(f"internal error in the host: {type(exc).__name__}: {exc}"))
        finally:
            if cell is not None:
                cell.call_scopes.discard(scope)
                cell.in_flight -= 1
                cell.bump()
        try:
            await incarnation.send(reply)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the worker is gone; its cell already reports that

    # -- cells -------------------------------------------------------------------------------
    async def execute(self, code: str) -> CellResult:
        """Run ``code`` in the persistent namespace. Errors in the code come back in the result."""
        async with self._lock:
            notes: list[str] = []
            incarnation = self._incarnation
            if incarnation is None or incarnation.dead.is_set() or incarnation.process.returncode is not None:
                await self._restart()
                notes.append("The sandbox had stopped and was restarted: variables were lost, context is reloaded.")
                incarnation = self._incarnation
            assert incarnation is not None
            self._cell_ids += 1
            cell = _Cell(self._cell_ids)
            self._cell = cell
            try:
                await incarnation.send({"op": "exec", "id": cell.id, "code": code})
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the read loop reports the crash to the cell
            try:
                timed_out = await self._supervise(cell, incarnation)
            finally:
                self._cell = None
                for scope in list(cell.call_scopes):
                    scope.cancel()
            reply = cell.reply or {}
            restarted = False
            if reply.get("crashed") or reply.get("killed"):
                with anyio.CancelScope(shield=True):
                    await self._restart()
                restarted = True
                notes.append(
                    "The sandbox worker was replaced: ALL VARIABLES WERE LOST. `context` is loaded again; "
                    "recompute what you need."
                )
            return CellResult(
                output=str(reply.get("output", "")),
                output_chars=int(reply.get("output_chars", 0)),
                error=reply.get("error"),
                final=reply.get("final"),
                duration=float(reply.get("duration", 0.0)),
                timed_out=timed_out,
                restarted=restarted,
                notes=tuple(notes),
            )

    async def _supervise(self, cell: _Cell, incarnation: _Incarnation) -> bool:
        """Wait for the cell; interrupt it when its own compute time runs out. True if it timed out."""
        remaining = self._config.cell_timeout
        while not cell.done.is_set():
            changed = cell.changed
            if cell.in_flight:  # paused: the worker waits for the host, not computing
                await changed.wait()
                continue
            started = anyio.current_time()
            with anyio.move_on_after(remaining) as scope:
                await changed.wait()
            if not scope.cancelled_caught:
                remaining -= anyio.current_time() - started
                continue
            await self._interrupt(cell, incarnation)
            return True
        return False

    async def _interrupt(self, cell: _Cell, incarnation: _Incarnation) -> None:
        timeout = self._config.cell_timeout
        try:
            incarnation.process.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
        with anyio.move_on_after(self._config.interrupt_grace):
            await cell.done.wait()
        if cell.done.is_set():
            if cell.reply is not None and cell.reply.get("interrupted"):
                cell.reply["error"] = (
                    f"TimeoutError: the cell ran past its {timeout:g} s limit and was interrupted. "
                    "Variables are kept. Work on smaller slices or use llm_query_many for slow steps."
                )
            return
        incarnation.expected_exit = True
        cell.finish(
            {
                "op": "result",
                "output": "",
                "output_chars": 0,
                "error": f"TimeoutError: the cell ran past its {timeout:g} s limit and did not stop on interrupt "
                "(a C-level loop?); the worker was killed.",
                "killed": True,
            }
        )
        incarnation.kill()


def _write_context(path: Path, context: Context) -> None:
    path.parent.mkdir(parents=True)
    text = context if isinstance(context, str) else json.dumps(context, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o444)


def _error_reply(call_id: Any, exc: RLMError) -> dict[str, Any]:
    return {"op": "reply", "id": call_id, "ok": False, "error": error_to_wire(exc)}


def error_to_wire(exc: RLMError) -> dict[str, Any]:
    """An RLMError as a msgpack-able map the worker turns back into an exception."""
    wire_error: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message}
    if isinstance(exc, BatchError):
        wire_error["results"] = list(exc.results)
        wire_error["errors"] = {index: error_to_wire(err) for index, err in exc.errors.items()}
    return wire_error

