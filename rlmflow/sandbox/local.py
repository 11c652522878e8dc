"""The host side of the local sandbox: one worker process per session, driven over a socketpair.

A session owns one worker at a time. A cell that overruns its time gets a real SIGINT (the
namespace survives); if it does not stop within the grace period the worker is killed and
replaced, ``context`` is reloaded and the cell's result says that variables were lost. A worker
that crashes or sends a bad frame is replaced the same way; the host never goes down with it.

A cell's time is its wall time while none of its host calls is in flight, and the worker's CPU
time while one is (waiting for a sub-LLM is free; computing meanwhile is not). Between cells the
worker is stopped (SIGSTOP), so threads a cell left behind cannot compute or call the host until
the next cell, whose time they then use.

The host trusts nothing the worker sends: frames are bounded before they are read and while
they decode, each is checked against its op's schema before it is acted on (a violation replaces
the worker), and text is cut and sanitised before it reaches the root model. The host never
waits on the worker: its frames go through an outbox drained by one task. Closing a session (at
the end of a run, on cancellation or on a deadline) kills the worker's whole process group at once.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread

from .._exceptions import IsolationUnavailableError, RLMError, SandboxCrashedError
from .._text import sanitize_text
from .._util import single_exception
from ..telemetry.logs import get_logger
from . import scratch, wire
from .base import Bridge, CellResult, Context, Isolation, SandboxReport
from .incarnation import (
    Cell,
    Incarnation,
    ProtocolViolation,
    call_args,
    check_call,
    check_result,
    error_reply,
    error_to_wire,
    first_child,
    number,
)
from .layers import host_layers, make_report, warn_once, worker_command, worker_env

__all__ = ["IsolationUnavailableError", "LocalSandbox", "LocalSandboxSession", "error_to_wire"]

_WORKER = Path(__file__).with_name("worker.py")
_logger = get_logger("rlmflow.sandbox")
# How deep the current task is in nested sessions: a child's session waits only for sessions of
# its own depth, so a parent holding a slot never deadlocks its children.
_DEPTH: ContextVar[int] = ContextVar("rlmflow_sandbox_depth", default=0)
# Texts longer than this (in total) are sanitised in a thread, off the event loop.
_SANITIZE_ON_LOOP = 50_000
_CPUS = os.cpu_count() or 1  # how fast a worker's threads can spend CPU time


def _encodable(code: str) -> str:
    """``code`` as UTF-8 can carry it: a lone surrogate (a model's output may hold one) is written
    as its escape, which means the same character inside a string literal."""
    if code.isascii():
        return code
    try:
        code.encode("utf-8")
    except UnicodeEncodeError:
        return code.encode("utf-8", "backslashreplace").decode("utf-8")
    return code


class LocalSandbox:
    """Runs cells in a confined local Python process (see ``docs/security.md``).

    A configuration object: each run opens its own session (and its own worker) with
    :meth:`session`. Options are keyword-only:

    - ``isolation``: ``"auto"`` (the strongest layers available; one warning per process names
      what is missing), ``"strict"`` (raise :class:`IsolationUnavailableError` unless filesystem,
      network, exec and process confinement all hold) or ``"none"`` (no confinement);
    - ``cell_timeout``: seconds of computation a cell may use (waiting for sub-LLMs is free);
    - ``interrupt_grace``: seconds between the interrupt and the kill;
    - ``max_output_chars``: cap of a cell's printed output (head and tail kept);
    - ``memory_bytes``, ``max_open_files``, ``max_file_bytes``: rlimits of the worker;
    - ``scratch_bytes``, ``scratch_files``: quota of the scratch directory (a size-capped tmpfs
      under bubblewrap; otherwise checked after each cell and the directory emptied past it);
    - ``max_sessions``: sessions running at once per nesting depth; more wait in a queue;
    - ``bubblewrap``: use bubblewrap where it works (``isolation="none"`` never does);
    - ``seccomp``: load the seccomp filter (off: code may start processes and open sockets
      again, so ``strict`` refuses to run);
    - ``env``: extra environment variables for the worker (nothing of the host's is passed);
    - ``python``: the interpreter (default: the host's).
    """

    def __init__(
        self,
        *,
        isolation: Isolation = "auto",
        cell_timeout: float = 120.0,
        interrupt_grace: float = 2.0,
        max_output_chars: int = 20_000,
        memory_bytes: int | None = 8 << 30,
        max_open_files: int | None = 256,
        max_file_bytes: int | None = 1 << 30,
        scratch_bytes: int = 2 << 30,
        scratch_files: int = 10_000,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME,
        max_sessions: int = 8,
        bubblewrap: bool = True,
        seccomp: bool = True,
        env: Mapping[str, str] | None = None,
        python: str | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        if cell_timeout <= 0 or interrupt_grace < 0:
            raise ValueError("cell_timeout must be > 0 and interrupt_grace >= 0")
        if isolation not in ("auto", "strict", "none"):
            raise ValueError(f"isolation must be 'auto', 'strict' or 'none', not {isolation!r}")
        if max_sessions < 1 or scratch_bytes < 1 or scratch_files < 1:
            raise ValueError("max_sessions, scratch_bytes and scratch_files must be >= 1")
        self.isolation: Isolation = isolation
        self.cell_timeout = cell_timeout
        self.interrupt_grace = interrupt_grace
        self.max_output_chars = max_output_chars
        self.memory_bytes = memory_bytes
        self.max_open_files = max_open_files
        self.max_file_bytes = max_file_bytes
        self.scratch_bytes = scratch_bytes
        self.scratch_files = scratch_files
        self.max_frame_bytes = max_frame_bytes
        self.max_sessions = max_sessions
        self.bubblewrap = bubblewrap and isolation != "none"
        self.seccomp = seccomp and isolation != "none"
        self.env = dict(env or {})
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self._limiters: weakref.WeakKeyDictionary[Any, dict[int, anyio.CapacityLimiter]] = weakref.WeakKeyDictionary()

    @asynccontextmanager
    async def session(self, context: Context, bridge: Bridge) -> AsyncIterator[LocalSandboxSession]:
        """Start a worker with ``context`` loaded; kill it and delete its scratch files on exit.

        Waits while ``max_sessions`` sessions of the same nesting depth are open. Raises
        :class:`IsolationUnavailableError` in strict mode when a confinement is missing, and
        ``SandboxCrashedError`` when the worker cannot start.
        """
        depth = _DEPTH.get()
        loop = anyio.lowlevel.current_token().native_token  # a limiter belongs to one event loop
        per_depth = self._limiters.get(loop)
        if per_depth is None:
            per_depth = self._limiters[loop] = {}
        limiter = per_depth.get(depth)
        if limiter is None:
            limiter = per_depth[depth] = anyio.CapacityLimiter(self.max_sessions)
        async with limiter:
            token = _DEPTH.set(depth + 1)
            try:
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
            finally:
                _DEPTH.reset(token)

    def __repr__(self) -> str:
        return f"LocalSandbox(isolation={self.isolation!r}, cell_timeout={self.cell_timeout})"


class LocalSandboxSession:
    """A live local sandbox. Created by :meth:`LocalSandbox.session`.

    ``report`` is the :class:`SandboxReport` of the current worker (probed when it started),
    ``isolation`` its layers as strings, ``restarts`` how many times the worker was replaced,
    ``load_seconds`` how long the worker took to read the context.
    """

    def __init__(self, config: LocalSandbox, bridge: Bridge, tg: anyio.abc.TaskGroup) -> None:
        self._config = config
        self._bridge = bridge
        self._tg = tg
        self._lock = anyio.Lock()
        self._cell: Cell | None = None
        self._cell_ids = 0
        self._incarnation: Incarnation | None = None
        self._dir: Path | None = None
        self._context: scratch.ContextFile | None = None
        self._bwrap: str | None = None
        self._missing: list[str] = []
        self.restarts = 0
        self.isolation: list[str] = []
        self.report = SandboxReport(backend="local", mode=config.isolation)
        self.load_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    async def _start(self, context: Context) -> None:
        config = self._config
        if config.isolation != "none":
            host = await anyio.to_thread.run_sync(host_layers)
            if config.bubblewrap and host.bwrap:
                self._bwrap = host.bwrap
            elif config.bubblewrap and host.bwrap_problem:
                self._missing.append(host.bwrap_problem)
            if not config.seccomp:
                self._missing.append("seccomp (disabled by seccomp=False)")
        self._dir = await anyio.to_thread.run_sync(scratch.make_scratch)
        self._context = await anyio.to_thread.run_sync(scratch.acquire_context, context)
        await self._spawn()
        if config.isolation == "strict" and not self.report.confined:
            raise IsolationUnavailableError(
                f"isolation='strict' refused to run: {self.report.summary()}", report=self.report
            )
        warn_once(self.report)

    async def _spawn(self) -> None:
        assert self._dir is not None and self._context is not None
        config = self._config
        work = self._dir / "work"
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = worker_command(
            python=config.python,
            worker=_WORKER,
            fd=child.fileno(),
            bwrap=self._bwrap,
            read_only=[str(_WORKER.parent), str(self._context.path.parent)],
            scratch=str(work),
            scratch_bytes=config.scratch_bytes,
        )
        env = worker_env(work, config.env)
        # stderr goes to a file of the host's (outside the worker's work directory), not a pipe: a
        # pipe held open by a dying namespace left its transport to the garbage collector, and a
        # file needs no reader; its tail is read only to explain a failure
        stderr_path = self._dir / f"stderr-{self.restarts}.log"
        stderr_file = await anyio.to_thread.run_sync(stderr_path.open, "wb")
        try:
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr_file,
                cwd=str(work),
                env=env,
                pass_fds=[child.fileno()],
                # its own process group, killed whole; a Ctrl-C in the terminal belongs to the host
                start_new_session=True,
            )
        except OSError as exc:
            parent.close()
            raise SandboxCrashedError(f"cannot start the sandbox worker with {config.python}: {exc}") from exc
        finally:
            child.close()
            stderr_file.close()
        stream = await anyio.abc.UNIXSocketStream.from_socket(parent)
        incarnation = Incarnation(
            process,
            stream,
            config.max_frame_bytes,
            bwrap=self._bwrap is not None,
            max_output_chars=config.max_output_chars,
            stderr_path=stderr_path,
        )
        self._tg.start_soon(incarnation.write_loop)
        confine = config.isolation != "none"
        init = {
            "op": "init",
            "context_path": str(self._context.path),
            "context_kind": self._context.kind,
            "max_output_chars": config.max_output_chars,
            "max_frame": config.max_frame_bytes,
            "isolation": {
                "rlimits": {
                    "memory_bytes": config.memory_bytes,
                    "max_open_files": config.max_open_files,
                    "max_file_bytes": min(config.max_file_bytes or config.scratch_bytes, config.scratch_bytes),
                },
                # inside bubblewrap the worker's parent is the namespace's init, not this process
                "parent_pid": None if self._bwrap else os.getpid(),
                "capabilities": confine,
                "seccomp": confine and config.seccomp,
                "landlock": confine,
                "read_paths": [str(self._context.path.parent), str(_WORKER.parent)],
                "write_paths": [str(work)],
            },
        }
        try:
            incarnation.post(init)
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
                f"the sandbox worker failed to start: {sanitize_text(str(detail)[:2000])}",
                returncode=incarnation.process.returncode,
            )
        # sent before any model code ran, so trusted to say what it applied; still only read with care
        worker_report = ready.get("report")
        worker_report = worker_report if isinstance(worker_report, dict) else {}
        self.report = make_report(config.isolation, worker_report, bwrap=self._bwrap is not None, missing=self._missing)
        self.isolation = list(self.report.layers)
        self.load_seconds = number(ready.get("load_seconds"))
        await anyio.to_thread.run_sync(incarnation.attach)
        self._incarnation = incarnation
        self._tg.start_soon(self._read_loop, incarnation)

    async def _restart(self) -> None:
        old = self._incarnation
        if old is not None:
            old.kill()
            await self._reap(old)
        self.restarts += 1
        _logger.warning("sandbox worker restarted", restarts=self.restarts)
        if self._dir is not None and self._bwrap is None:
            # a new worker starts from an empty scratch directory, as bubblewrap's new tmpfs does
            await anyio.to_thread.run_sync(scratch.empty, self._dir / "work")
        await self._spawn()

    async def _reap(self, incarnation: Incarnation) -> None:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(5):
                await incarnation.process.wait()
            if incarnation.reading:
                # Let the read loop take the dead worker's end of stream itself before the socket
                # is closed: anyio's aclose() resolves a pending receive while the socket's
                # readiness callback for that same receive may already be queued in this loop
                # iteration, and that callback then fails ("Exception in callback
                # Future.set_result(None)": InvalidStateError), as after 1 in 20 to 100 client
                # disconnects in tests/test_service_disconnect.py under load. Bounded: something
                # else may still hold the worker's end.
                with anyio.move_on_after(1):
                    await incarnation.read_done.wait()
            # the same race on the writing side: a send blocked on a worker that stopped reading
            # is cancelled, and given a turn of the loop to drop its readiness callback, first
            incarnation.close_outbox()
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            incarnation.release()
            await incarnation.stream.aclose()
            incarnation.dead.set()

    async def _close(self) -> None:
        # Killed at once, busy or idle: nothing in the worker is worth waiting for, and a run's
        # deadline or cancellation must not wait for model code.
        incarnation, self._incarnation = self._incarnation, None
        if incarnation is not None:
            incarnation.kill()
            await self._reap(incarnation)
        if self._dir is not None:
            await anyio.to_thread.run_sync(scratch.remove_tree, self._dir)
        if self._context is not None:
            context, self._context = self._context, None
            await anyio.to_thread.run_sync(scratch.release_context, context)

    # -- tasks -------------------------------------------------------------------------------
    async def _read_loop(self, incarnation: Incarnation) -> None:
        try:
            await self._read_frames(incarnation)
        finally:
            incarnation.reading = False
            incarnation.read_done.set()

    async def _read_frames(self, incarnation: Incarnation) -> None:
        try:
            while True:
                incarnation.reading = True
                message = await incarnation.receive()
                incarnation.reading = False
                if message is None:
                    break
                op = message["op"]
                if op == "result":
                    cell = self._cell
                    result = check_result(message, cell, self._config.max_output_chars)
                    assert cell is not None  # check_result refuses a result when no cell runs
                    cell.finish(result)
                elif op == "call":
                    check_call(message)
                    # backpressure: a worker flooding calls waits (and times out), the host's tasks stay bounded
                    await incarnation.calls.acquire()
                    cell = self._cell
                    if cell is None or cell.done.is_set():  # a thread of an ended cell: not served
                        refused = RLMError("no cell is running: host calls are served only while their cell runs")
                        incarnation.post(error_reply(message["id"], refused), incarnation.calls.release)
                        continue
                    self._tg.start_soon(self._serve_call, incarnation, cell, message)
                else:  # ready/failed are read by _spawn, before any model code ran; nothing else exists
                    raise ProtocolViolation(f"an unexpected {op[:40]!r} frame")
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

    async def _serve_call(self, incarnation: Incarnation, cell: Cell, message: dict[str, Any]) -> None:
        call_id = message["id"]
        cell.in_flight += 1
        cell.bump()
        reply: dict[str, Any]
        try:
            with anyio.CancelScope() as scope:
                cell.call_scopes.add(scope)
                value = await self._bridge(message["fn"], call_args(message))
                reply = {"op": "reply", "id": call_id, "ok": True, "value": value}
            if scope.cancelled_caught:
                reply = error_reply(call_id, RLMError("the cell ended before this call finished"))
        except RLMError as exc:
            reply = error_reply(call_id, exc)
        except wire.FrameError as exc:  # refused before any work: the worker and its state go on
            reply = error_reply(call_id, RLMError(f"the host refused this call's arguments: {exc}"))
        except Exception as exc:  # a bug on the host side must still answer the waiting thread
            _logger.exception("host call failed", fn=message["fn"])
            reply = error_reply(call_id, RLMError(f"internal error in the host: {type(exc).__name__}: {exc}"))
        finally:
            cell.call_scopes.discard(scope)
            cell.in_flight -= 1
            cell.bump()
        try:  # queued, never awaited: the call's slot is free once the reply is written
            incarnation.post(reply, incarnation.calls.release)
        except Exception as exc:  # a value msgpack cannot carry: still answer
            _logger.exception("host call reply not encodable", fn=message["fn"])
            failed = RLMError(f"internal error in the host: {type(exc).__name__}: {exc}")
            incarnation.post(error_reply(call_id, failed), incarnation.calls.release)

    # -- cells -------------------------------------------------------------------------------
    async def execute(self, code: str) -> CellResult:
        """Run ``code`` in the persistent namespace. Errors in the code come back in the result."""
        async with self._lock:
            notes: list[str] = []
            incarnation = self._incarnation
            if (
                incarnation is None
                or incarnation.expected_exit
                or incarnation.dead.is_set()
                or incarnation.process.returncode is not None
            ):
                await self._restart()
                notes.append(
                    "The sandbox had stopped and was restarted: variables were lost (and scratch files), "
                    "context is reloaded."
                )
                incarnation = self._incarnation
            assert incarnation is not None
            self._cell_ids += 1
            cell = Cell(self._cell_ids, started=anyio.current_time())
            exec_frame = {"op": "exec", "id": cell.id, "code": _encodable(code)}
            self._cell = cell
            incarnation.post(exec_frame)
            incarnation.thaw()  # after the frame: the worker wakes to find it waiting
            try:
                timed_out = await self._supervise(cell, incarnation)
            finally:
                self._cell = None
                for scope in list(cell.call_scopes):
                    scope.cancel()
                if not cell.done.is_set():  # cancelled (a deadline, the run's end): its state is unknown
                    incarnation.kill()
            reply = cell.reply or {}
            restarted = False
            if reply.get("crashed") or reply.get("killed"):
                with anyio.CancelScope(shield=True):
                    await self._restart()
                restarted = True
                notes.append(
                    "The sandbox worker was replaced: ALL VARIABLES WERE LOST, and the files it wrote. "
                    "`context` is loaded again; recompute what you need."
                )
            else:
                incarnation.freeze()  # threads the cell left running wait for the next cell
                quota_note = await self._check_quota()
                if quota_note:
                    notes.append(quota_note)
            output, error, final, established = await self._sanitized(reply)
            return CellResult(
                output=output,
                established=established or "",
                output_chars=int(number(reply.get("output_chars"))),
                error=error,
                final=final,
                duration=max(0.0, (cell.ended or anyio.current_time()) - cell.started),  # the host's clock
                timed_out=timed_out,
                restarted=restarted,
                notes=tuple(notes),
            )

    @staticmethod
    async def _sanitized(reply: dict[str, Any]) -> tuple[str, str | None, str | None, str | None]:
        """Output, error and answer with control characters made visible; already cut to size
        (``check_result``), and sanitised off the event loop when long."""
        texts = [reply.get("output", ""), reply.get("error"), reply.get("final"), reply.get("established")]

        def clean() -> list[str | None]:
            return [None if text is None else sanitize_text(str(text)) for text in texts]

        if sum(len(text) for text in texts if isinstance(text, str)) > _SANITIZE_ON_LOOP:
            cleaned = await anyio.to_thread.run_sync(clean)
        else:
            cleaned = clean()
        return cleaned[0] or "", cleaned[1], cleaned[2], cleaned[3]

    async def _check_quota(self) -> str | None:
        """The scratch quota (files and bytes; bubblewrap's tmpfs also caps bytes itself) is checked
        after each cell; past it the scratch directory is emptied. Returns a note for the model."""
        assert self._dir is not None and self._incarnation is not None
        config = self._config
        work = self._dir / "work"
        bwrap_pid = self._incarnation.process.pid if self._incarnation.bwrap else None

        def check() -> tuple[Path, scratch.ScratchUsage] | None:  # one thread hop per cell
            where = work
            if bwrap_pid is not None:  # the tmpfs lives in the namespace: seen through its init's root
                inner = first_child(bwrap_pid)
                if inner is None:
                    return None
                where = Path(f"/proc/{inner}/root") / work.relative_to("/")
            return where, scratch.measure(where, stop_files=config.scratch_files, stop_bytes=config.scratch_bytes)

        checked = await anyio.to_thread.run_sync(check)
        if checked is None:
            return None
        work, usage = checked
        if usage.files <= config.scratch_files and usage.bytes <= config.scratch_bytes:
            return None
        await anyio.to_thread.run_sync(scratch.empty, work)
        _logger.warning("sandbox scratch over quota: emptied", files=usage.files, bytes=usage.bytes)
        return (
            f"ScratchQuotaExceeded: the scratch directory passed its quota ({config.scratch_files:,} files, "
            f"{config.scratch_bytes:,} bytes) and was emptied. Variables are kept; files are not."
        )

    async def _supervise(self, cell: Cell, incarnation: Incarnation) -> bool:
        """Wait for the cell; interrupt it when its own time runs out. True if it timed out.

        While none of the cell's host calls is in flight its wall time counts; while one is, the
        worker waits for the host (free) but another thread may compute meanwhile, so the worker
        process's CPU time counts instead, polled often enough that it cannot run far past the limit.
        """
        remaining = self._config.cell_timeout
        cpu_mark: float | None = None
        while not cell.done.is_set():
            changed = cell.changed
            if cell.in_flight:
                if cpu_mark is None:
                    cpu_mark = incarnation.cpu_seconds()
                    if cpu_mark is None:  # no /proc to tell: waiting for the host is not counted
                        await changed.wait()
                        continue
                with anyio.move_on_after(min(0.25, max(0.01, remaining / _CPUS))):
                    await changed.wait()
                now = incarnation.cpu_seconds()
                if now is not None:
                    remaining -= now - cpu_mark
                cpu_mark = now
            else:
                cpu_mark = None
                started = anyio.current_time()
                with anyio.move_on_after(remaining) as scope:
                    await changed.wait()
                remaining = 0.0 if scope.cancelled_caught else remaining - (anyio.current_time() - started)
            if remaining <= 0 and not cell.done.is_set():
                await self._interrupt(cell, incarnation)
                return True
        return False

    async def _interrupt(self, cell: Cell, incarnation: Incarnation) -> None:
        """Ask the worker to interrupt the cell; past ``interrupt_grace``, kill it. Waits on nothing
        else: the frame is queued (a worker that stopped reading never gets it, and is killed)."""
        timeout = self._config.cell_timeout
        incarnation.post({"op": "interrupt"})  # its reader thread signals the main thread (bubblewrap hides its pid)
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
