"""The part of the AgentCore backend that runs inside the remote Code Interpreter session.

:mod:`rlmflow.sandbox.agentcore` ships this file's source with ``executeCode`` and installs it as
the module ``_rlmflow_runtime`` of the remote interpreter, after :mod:`rlmflow.sandbox.cellapi`
(the API model code sees, shared with the local worker) as ``_rlmflow_cellapi``. Standard library
only; remotely it never imports ``rlmflow``. The remote session holds no credentials and needs no network:

- a model's cell runs in a background thread of the interpreter, in a namespace of its own;
- ``llm_query_many`` / ``rlm_query_many`` / ``budget`` park a request in a mailbox and block that
  thread; the host's next control call (a short ``executeCode``) returns as soon as the cell ends
  or a request is parked, printing one status line;
- the host serves the request through its bridge (the Dispatcher) and delivers the answer with the
  next control call (inline, or in files it wrote with ``writeFiles``), which wakes the thread.

Every control call prints exactly one line ``MARKER + json`` (strict JSON: no ``NaN``); the host
reads the last such line and checks it against the schema of its state
(:mod:`rlmflow.sandbox.agentcore_protocol`). Output of the cell's threads goes to the cell's capped
buffer, never into a status line; errors and answers are cut here too, with their true length.

Each status about a cell carries ``cpu``: the CPU seconds the interpreter used since the previous
control call ended, when nobody was watching (the host serving the cell's calls, or between
cells). The host counts it against the cell; a ``start`` after more than ``idle_limit`` such
seconds (threads of an earlier cell still computing) answers ``busy`` and runs nothing.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import io
import itertools
import json
import os
import sys
import threading
import time
from typing import Any

# Bound now: cell code may replace time.perf_counter (a NaN clock) once it runs.
_perf_counter = time.perf_counter
_process_time = time.process_time
_monotonic = time.monotonic

try:  # in the package (tests, type checking)
    from . import cellapi
except ImportError:  # in the remote interpreter: shipped beside this runtime as a module of its own
    cellapi = sys.modules["_rlmflow_cellapi"]

MARKER = "\x1erlmflow-status:"
_GATHER = 0.002  # seconds between looks for more calls from a cell's other threads
_GATHER_MAX = 0.05  # the longest a status waits for them after the last new call
_HOST_FUNCTIONS = ("llm_query_many", "rlm_query_many", "budget")
_MAX_CALLS = 1024  # calls reported and not yet answered (the host's MAX_CALLS_IN_FLIGHT)


def _cut(text: str, limit: int, *, head_only: bool = False) -> str:
    """``text`` in at most ``limit`` characters, saying how long it was (as the host's cut does)."""
    if len(text) <= limit:
        return text
    if head_only:
        note = f"\n[answer cut in the sandbox: {len(text):,} characters in all]"
        return text[: max(0, limit - len(note))] + note
    note = f"\n[... cut in the sandbox: {len(text):,} characters in all ...]\n"
    half = max(0, (limit - len(note)) // 2)
    return f"{text[:half]}{note}{text[len(text) - half:] if half else ''}"


class _Router(io.TextIOBase):
    """``sys.stdout``/``sys.stderr``: the control thread writes to the interpreter's stream, every
    other thread to the running cell's buffer (or nowhere between cells)."""

    def __init__(self, runtime: _Runtime, inner: Any) -> None:
        self.runtime = runtime
        self.inner = inner

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        runtime = self.runtime
        if threading.get_ident() == runtime.control_thread:
            return int(self.inner.write(s))
        cell = runtime.cell
        if cell is not None and cell.result is None:
            return cell.out.write(s)
        return len(s)

    def flush(self) -> None:
        if threading.get_ident() == self.runtime.control_thread:
            self.inner.flush()


class _Call:
    def __init__(self, call_id: int, fn: str, args: dict[str, Any]) -> None:
        self.id = call_id
        self.fn = fn
        self.args = args
        self.reported = False
        self.reply: dict[str, Any] | None = None
        self.event = threading.Event()


class _Cell:
    def __init__(self, cell_id: int, cap: int) -> None:
        self.id = cell_id
        self.out = cellapi.CappedText(cap)
        self.final: list[Any] = []
        self.pending: dict[int, _Call] = {}
        self.result: dict[str, Any] | None = None
        self.thread: threading.Thread | None = None
        self.threads_before = 0
        self.gathered = 0
        self.gather_until = 0.0


class _Runtime:
    def __init__(self, config: dict[str, Any]) -> None:
        self.max_output_chars = int(config.get("max_output_chars", 20_000))
        self.max_request_chars = int(config.get("max_request_chars", 32 << 20))
        self.max_error_chars = int(config.get("max_error_chars", 80_000))
        self.max_answer_chars = int(config.get("max_answer_chars", 200_000))
        self.last_cpu = _process_time()  # when the last control call ended
        self.away = 0.0  # CPU seconds used since then, measured as a control call begins
        self.control_thread = threading.get_ident()
        self.cond = threading.Condition()
        self.cell: _Cell | None = None
        self.call_ids = itertools.count(1)
        self.namespace: dict[str, Any] = {}
        self.stdout = _Router(self, sys.stdout)
        self.stderr = _Router(self, sys.stderr)

    def install_streams(self) -> None:
        """Route output again if the interpreter replaced ``sys.stdout`` since the last call."""
        self.control_thread = threading.get_ident()
        if sys.stdout is not self.stdout:
            self.stdout.inner = sys.stdout
            sys.stdout = self.stdout
        if sys.stderr is not self.stderr:
            self.stderr.inner = sys.stderr
            sys.stderr = self.stderr

    # -- host calls, from any thread of a cell ---------------------------------------------
    def call_host(self, fn: str, args: dict[str, Any]) -> Any:
        cell = self.cell
        if cell is None or cell.result is not None:
            raise cellapi.RLMError(f"{fn} can only be called while a cell runs")
        size = len(json.dumps(args, ensure_ascii=False))
        if size > self.max_request_chars:
            raise ValueError(
                f"{fn} request of {size:,} characters exceeds the limit of {self.max_request_chars:,}; "
                "send smaller batches"
            )
        with self.cond:  # numbered under the lock: ids reach the host in increasing order
            call = _Call(next(self.call_ids), fn, args)
            cell.pending[call.id] = call
            self.cond.notify_all()
        while not call.event.wait(0.05):  # short waits: an interrupt can reach this thread
            pass
        reply = call.reply or {}
        if not reply.get("ok"):
            raise cellapi.error_from_wire(reply.get("error"))
        return reply.get("value")

    def install_api(self, context: Any) -> None:
        runtime = self

        def submit(value: Any) -> None:
            cell = runtime.cell
            if cell is not None:
                cell.final[:] = [value]

        self.namespace.update(
            {
                "__name__": "__main__",
                "__builtins__": __builtins__,
                "context": context,
                **cellapi.api(runtime.call_host, submit),
            }
        )
        helpers = sys.modules.get("_rlmflow_helpers")  # grep(), chunks(), shipped beside this runtime
        if helpers is not None:
            helpers.install(self.namespace)

    # -- the cell thread ----------------------------------------------------------------------
    def run_cell(self, cell: _Cell, code: str) -> None:
        started = _perf_counter()
        error, interrupted = cellapi.run_code(code, f"<cell {cell.id}>", self.namespace)
        duration = _perf_counter() - started
        result: dict[str, Any] = {
            "state": "done",
            "cell": cell.id,
            "output": cell.out.render(),
            "output_chars": cell.out.total,
            "error": _cut(error, self.max_error_chars) if error is not None else None,
            "error_chars": len(error) if error is not None else 0,
            "interrupted": interrupted,
            "duration": duration if 0 <= duration < 1e9 else 0.0,
        }
        if cell.final:
            try:
                answer = cellapi.answer_text(cell.final[0])
            except BaseException as exc:  # a value whose repr fails must not lose the cell's result
                answer = f"<FINAL value could not be shown: {type(exc).__name__}>"
            result["final"] = _cut(answer, self.max_answer_chars, head_only=True)
            result["final_chars"] = len(answer)
        with self.cond:
            cell.result = result
            self.cond.notify_all()

    # -- control calls, from the interpreter's own thread ------------------------------------------
    def start(self, cell_id: int, code: str, wait: float, idle_limit: float) -> dict[str, Any]:
        previous = self.cell
        if previous is not None and previous.id == cell_id:  # a retried start: do not run it twice
            return self.wait(cell_id, wait)
        if self.away > idle_limit:  # an earlier cell's threads kept computing: the host replaces us
            return {"state": "busy", "cell": cell_id}
        if previous is not None:  # threads left blocked by an earlier cell get an error, not silence
            for call in list(previous.pending.values()):
                call.reply = {"ok": False, "error": {"type": "RLMError", "message": "the cell ended"}}
                call.event.set()
            previous.pending.clear()
        cell = _Cell(cell_id, self.max_output_chars)
        cell.threads_before = threading.active_count()
        self.cell = cell
        cell.thread = threading.Thread(target=self.run_cell, args=(cell, code), name=f"cell-{cell_id}", daemon=True)
        cell.thread.start()
        return self.wait(cell_id, wait)

    def deliver(self, replies: dict[str, Any]) -> None:
        cell = self.cell
        if cell is None:
            return
        with self.cond:
            for key, reply in replies.items():
                call = cell.pending.pop(int(key), None)
                if call is not None:
                    call.reply = reply if isinstance(reply, dict) else {"ok": False}
                    call.event.set()

    def wait(self, cell_id: int, wait: float) -> dict[str, Any]:
        cell = self.cell
        if cell is None or cell.id != cell_id:
            return {"state": "error", "message": f"no cell {cell_id}"}
        deadline = _monotonic() + max(0.0, wait)
        with self.cond:
            while True:
                if cell.result is not None:
                    return cell.result
                in_flight = len([call for call in cell.pending.values() if call.reported])
                fresh = [call for call in cell.pending.values() if not call.reported]
                fresh = fresh[: max(0, _MAX_CALLS - in_flight)]  # the rest once the host answers
                if fresh and self._more_may_come(cell, len(fresh)):
                    self.cond.wait(_GATHER)
                    continue
                if fresh:
                    cell.gathered = 0
                    for call in fresh:
                        call.reported = True
                    return {
                        "state": "calls",
                        "cell": cell.id,
                        "calls": [{"id": c.id, "fn": c.fn, "args": c.args} for c in fresh],
                    }
                left = deadline - _monotonic()
                if left <= 0:
                    return {"state": "running", "cell": cell.id}
                self.cond.wait(left)

    def _more_may_come(self, cell: _Cell, fresh: int) -> bool:
        """Whether threads the cell started are still running and not all waiting for the host.

        Calls of a thread pool arrive a few milliseconds apart; collecting them for one status lets
        the host serve them together (it does not poll while it serves). A cell without threads of
        its own never waits here.
        """
        others = threading.active_count() - cell.threads_before - 1
        if others <= 0:
            return False
        if fresh > cell.gathered:  # new calls keep arriving: give the rest a moment
            cell.gathered = fresh
            cell.gather_until = _monotonic() + _GATHER_MAX
        waiting = len([c for c in cell.pending.values() if c.reply is None])
        return waiting < others + 1 and _monotonic() < cell.gather_until

    def interrupt(self, cell_id: int, wait: float) -> dict[str, Any]:
        cell = self.cell
        if cell is not None and cell.id == cell_id and cell.thread is not None and cell.result is None:
            ident = cell.thread.ident
            if ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))
        return self.wait(cell_id, wait)


_RUNTIME: _Runtime | None = None


# writeFiles paths are relative to the interpreter's working directory when the runtime is installed;
# model code may chdir later, so the runtime keeps the directory it started in.
_BASE = os.getcwd()


def _read_parts(paths: list[str]) -> str:
    parts = []
    for path in paths:
        with open(os.path.join(_BASE, path), encoding="utf-8") as fh:
            parts.append(fh.read())
    return "".join(parts)


def _boot(args: dict[str, Any]) -> dict[str, Any]:
    global _RUNTIME
    started = _perf_counter()
    text = _read_parts(list(args["context_paths"]))
    context = json.loads(text) if args.get("context_kind") == "json" else text
    runtime = _Runtime(args)
    runtime.install_api(context)
    runtime.install_streams()
    _RUNTIME = runtime
    return {
        "state": "ready",
        "chars": len(text),
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "load_seconds": max(0.0, _perf_counter() - started),
    }


def _dispatch(method: str, args: dict[str, Any]) -> dict[str, Any]:
    paths = args.get("args_paths")
    if paths:  # arguments too large for one request came as files
        args = json.loads(_read_parts(list(paths)))
        for path in paths:
            os.remove(os.path.join(_BASE, path))
    if method == "boot":
        return _boot(args)
    runtime = _RUNTIME
    if runtime is None:
        return {"state": "lost"}
    runtime.install_streams()
    wait = float(args.get("wait", 0.0))
    cell_id = int(args.get("cell", 0))
    if method == "start":
        return runtime.start(cell_id, str(args["code"]), wait, float(args.get("idle_limit", 1e9)))
    if method == "resume":
        runtime.deliver(dict(args.get("replies") or {}))
        return runtime.wait(cell_id, wait)
    if method == "poll":
        return runtime.wait(cell_id, wait)
    if method == "interrupt":
        return runtime.interrupt(cell_id, wait)
    return {"state": "error", "message": f"unknown control call {method!r}"}


def control(method: str, payload: str) -> None:
    """Entry point of every host control call: print exactly one status line."""
    entered = _process_time()
    if _RUNTIME is not None:
        _RUNTIME.away = max(0.0, entered - _RUNTIME.last_cpu)
    try:
        args = json.loads(base64.b64decode(payload).decode("utf-8"))
        status = _dispatch(method, args)
        if status.get("state") in ("running", "calls", "done", "busy") and _RUNTIME is not None:
            status = {**status, "cpu": round(_RUNTIME.away, 6)}
        line = MARKER + json.dumps(status, ensure_ascii=True, allow_nan=False)
    except Exception as exc:
        line = MARKER + json.dumps({"state": "error", "message": f"{type(exc).__name__}: {exc}"[:2000]})
    runtime = _RUNTIME
    stream = runtime.stdout.inner if runtime is not None else sys.stdout
    stream.write("\n" + line + "\n")
    stream.flush()
    if runtime is not None:
        runtime.last_cpu = _process_time()
