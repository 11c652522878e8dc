"""The sandbox worker: runs model-written cells in a persistent namespace.

Started by the host as ``python -I worker.py FD`` with an allowlisted environment and a scratch
directory as cwd. Standard library and msgpack only: this file never imports ``rlmflow``.

Threads:
- the main thread executes cells (so a real SIGINT from the host interrupts them);
- a reader thread owns the socket's read side: it queues ``exec`` requests for the main thread,
  hands ``reply`` frames to whichever thread (main or a user thread) is waiting for them, turns
  ``interrupt`` into a SIGINT for the main thread, and ends the process at ``shutdown`` or when
  the host's end of the socket closes (whatever the main thread is doing).
Writes are serialised by a lock, so sandbox code may call ``llm_query`` from any thread.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cellapi
import helpers_prelude
import isolation
import wire

_clock = time.perf_counter  # bound now: cell code may replace time.perf_counter

# ---------------------------------------------------------------- the worker


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, list[Any]] = {}  # id -> [threading.Event, reply]
        self._pending_lock = threading.Lock()
        self._cells: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._final: list[Any] = []
        self._cell_counter = 0
        self.namespace: dict[str, Any] = {}
        self.max_output_chars = 20_000
        self.max_frame = wire.DEFAULT_MAX_FRAME

    # -- socket ------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        data = wire.encode(message)
        with self._send_lock:
            self._sock.sendall(data)

    def _reader(self) -> None:
        # Whatever stops this loop (the host gone, a bad frame, an exception cell code injected
        # into this thread) ends the process: a worker that cannot hear the host is useless.
        try:
            while True:
                message = wire.read_frame_blocking(self._sock, self.max_frame)
                if message is None:
                    break
                op = message["op"]
                if op == "exec":
                    self._cells.put(message)
                elif op == "reply":
                    call_id = message.get("id")
                    with self._pending_lock:
                        slot = self._pending.get(call_id) if type(call_id) is int else None
                    if slot is not None:
                        slot[1] = message
                        slot[0].set()
                elif op == "interrupt":
                    # delivered to the main thread: a blocking call there returns EINTR and raises
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                elif op == "shutdown":
                    break
        finally:
            os._exit(0)  # the host is gone or done: nothing here is worth finishing

    def call_host(self, fn: str, **args: Any) -> Any:
        """Send a request to the host and block this thread until the reply comes."""
        call_id = next(self._ids)
        slot: list[Any] = [threading.Event(), None]
        with self._pending_lock:
            self._pending[call_id] = slot
        # The arguments travel as a nested msgpack document, so the host can refuse them (too big,
        # too many items) and still answer this call: the worker and its variables survive.
        payload = wire.pack(args)
        if len(payload) + 256 > self.max_frame:
            raise ValueError(f"the arguments of {fn} are {len(payload):,} bytes, over the limit of {self.max_frame:,}")
        try:
            self.send({"op": "call", "id": call_id, "fn": fn, "payload": payload})
            slot[0].wait()
        finally:
            with self._pending_lock:
                self._pending.pop(call_id, None)
        reply = slot[1]
        if not reply.get("ok"):
            raise cellapi.error_from_wire(reply.get("error") or {})
        return reply.get("value")

    # -- the API model code sees ------------------------------------------------
    def install_api(self, context: Any) -> None:
        worker = self

        def submit(value: Any) -> None:
            worker._final[:] = [value]

        self.namespace.update(
            {
                "__name__": "__main__",
                "__builtins__": __builtins__,
                "context": context,
                **cellapi.api(lambda fn, args: worker.call_host(fn, **args), submit),
            }
        )
        # grep(), chunks(): vetted helpers for small models; what a cell established, told after each
        self._established = helpers_prelude.install(self.namespace)

    # -- cells ---------------------------------------------------------------------
    def run_cell(self, code: str) -> dict[str, Any]:
        self._cell_counter += 1
        filename = f"<cell {self._cell_counter}>"
        out = cellapi.CappedText(self.max_output_chars)
        self._final.clear()
        started = _clock()
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        try:
            error, interrupted = cellapi.run_code(code, filename, self.namespace)
        finally:
            sys.stdout, sys.stderr = saved
        return self._report(out, error, interrupted, _clock() - started)

    def _report(self, out: cellapi.CappedText, error: str | None, interrupted: bool, duration: Any) -> dict[str, Any]:
        """The result frame of a cell, valid whatever the cell did to the objects behind it.

        Cell code runs in this process and may have tampered with the output buffer (a counter
        set to ``inf``) or the clock; error and answer are cut to ``wire.MAX_TEXT_CHARS``; text
        that UTF-8 cannot carry (lone surrogates) is escaped. The host checks all of it again.
        """
        total = out.total
        if not (type(total) is int and 0 <= total < 1 << 63):
            out.total = total = 0  # a counter the cell broke: what is kept is all that is known
        output = _text(out.render(), self.max_output_chars)
        reply: dict[str, Any] = {
            "op": "result",
            "output": output,
            "output_chars": max(total, len(output)),
            "error": None if error is None else _text(error, wire.MAX_TEXT_CHARS),
            "interrupted": bool(interrupted),
            "duration": duration if type(duration) is float and 0.0 <= duration < 1e9 else 0.0,
        }
        if self._final:
            reply["final"] = _text(cellapi.answer_text(self._final[0]), wire.MAX_TEXT_CHARS)
        try:  # part of the cell (its watchdog runs): names, types and sizes of what it set
            established = self._established()
        except Exception:
            established = ""
        reply["established"] = _text(established if type(established) is str else "", wire.MAX_ESTABLISHED_CHARS)
        return reply

    def serve(self) -> None:
        threading.Thread(target=self._reader, name="rlmflow-reader", daemon=True).start()
        while True:
            try:
                message = self._cells.get()
                if message is None:
                    return
                cell_id = message["id"]
                try:
                    reply = self.run_cell(str(message["code"]))
                except Exception as exc:  # the cell broke the worker's own objects: say so, keep serving
                    error = f"SandboxError: the worker could not report this cell ({type(exc).__name__})"
                    self._final.clear()
                    reply = self._report(cellapi.CappedText(self.max_output_chars), error, False, 0.0)
                reply["id"] = cell_id
                self.send(reply)
            except KeyboardInterrupt:
                continue  # an interrupt that raced the end of a cell: nothing to stop


def _text(value: Any, limit: int) -> str:
    """``value`` as text within ``limit`` (plus a note) that msgpack can encode."""
    text: str = wire.cut_text(value if type(value) is str else str(value), limit)
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _load_context(path: str, kind: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh) if kind == "json" else fh.read()


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    worker = Worker(sock)
    init = wire.read_frame_blocking(sock)
    if init is None or init.get("op") != "init":
        sys.exit(2)
    worker.max_output_chars = int(init.get("max_output_chars", 20_000))
    worker.max_frame = int(init.get("max_frame", wire.DEFAULT_MAX_FRAME))
    started = _clock()
    try:
        report = isolation.harden(init.get("isolation") or {})
        context = _load_context(init["context_path"], init["context_kind"])
    except Exception as exc:
        worker.send({"op": "failed", "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(3)
    worker.install_api(context)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker.send({"op": "ready", "load_seconds": _clock() - started, "report": report})
    worker.serve()


if __name__ == "__main__":
    main()
