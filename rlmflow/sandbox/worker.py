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

import ast
import io
import itertools
import json
import linecache
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import helpers_prelude
import isolation
import wire

# ---------------------------------------------------------------- errors seen by model code


class RLMError(Exception):
    """Base of the errors that host calls raise inside the sandbox."""


class BudgetExceededError(RLMError):
    """The run's budget cannot pay for this call; nothing was sent."""


class ContextOverflowError(RLMError):
    """The prompt is too long for the model: split it into smaller chunks."""


class ModelCallError(RLMError):
    """A model call failed after the host's retries."""


class SandboxRequestError(RLMError):
    """The host refused the request (an unknown model name, a batch or prompt too large...)."""


class BatchError(RLMError):
    """Some prompts of a batch failed. ``results`` has ``None`` at ``failed_indices``."""

    def __init__(self, message: str, results: list[Any], errors: dict[int, RLMError]) -> None:
        super().__init__(message)
        self.results = results
        self.errors = errors
        self.failed_indices = sorted(errors)


_ERROR_TYPES: dict[str, type[RLMError]] = {
    "BudgetExceededError": BudgetExceededError,
    "ContextOverflowError": ContextOverflowError,
    "SandboxRequestError": SandboxRequestError,
}


def _error_from_wire(error: dict[str, Any]) -> RLMError:
    message = str(error.get("message", "error"))
    if error.get("type") == "BatchError":
        errors = {int(i): _error_from_wire(e) for i, e in (error.get("errors") or {}).items()}
        return BatchError(message, list(error.get("results") or []), errors)
    cls = _ERROR_TYPES.get(str(error.get("type")), ModelCallError)
    return cls(message)


# ---------------------------------------------------------------- output capture


class _CappedText(io.TextIOBase):
    """Keeps the first and last ``cap // 2`` characters written and counts the rest."""

    def __init__(self, cap: int) -> None:
        self._half = max(1, cap // 2)
        self._head: list[str] = []
        self._head_len = 0
        self._tail = ""
        self.total = 0
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        written = len(s)
        with self._lock:
            self.total += len(s)
            room = self._half - self._head_len
            if room > 0:
                self._head.append(s[:room])
                self._head_len += min(room, len(s))
                s = s[room:]
            if s:
                self._tail = (self._tail + s)[-self._half :]
        return written

    def render(self) -> str:
        head = "".join(self._head)
        shown = len(head) + len(self._tail)
        if shown >= self.total:
            return head + self._tail
        omitted = self.total - shown
        return f"{head}\n[... {omitted:,} of {self.total:,} characters omitted ...]\n{self._tail}"


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
        try:
            while True:
                message = wire.read_frame_blocking(self._sock, self.max_frame)
                if message is None:
                    break
                op = message["op"]
                if op == "exec":
                    self._cells.put(message)
                elif op == "reply":
                    with self._pending_lock:
                        slot = self._pending.get(int(message["id"]))
                    if slot is not None:
                        slot[1] = message
                        slot[0].set()
                elif op == "interrupt":
                    # delivered to the main thread: a blocking call there returns EINTR and raises
                    signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
                elif op == "shutdown":
                    break
        except (OSError, wire.FrameError):
            pass
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
            raise _error_from_wire(reply.get("error") or {})
        return reply.get("value")

    # -- the API model code sees ------------------------------------------------
    def install_api(self, context: Any) -> None:
        worker = self

        def llm_query(prompt: str, *, model: str | None = None, max_tokens: int | None = None) -> str:
            """Ask a sub-LLM one question; returns its answer as a string."""
            return llm_query_many([prompt], model=model, max_tokens=max_tokens)[0]

        def llm_query_many(prompts: list[str], *, model: str | None = None, max_tokens: int | None = None) -> list[str]:
            """Ask many prompts concurrently; answers come back in input order."""
            prompts = list(prompts)
            if not all(isinstance(p, str) for p in prompts):
                raise TypeError("llm_query_many expects a list of strings")
            if not prompts:
                return []
            result: list[str] = worker.call_host("llm_query_many", prompts=prompts, model=model, max_tokens=max_tokens)
            return result

        def rlm_query(prompt: str, context: Any = None) -> str:
            """Run a child RLM on ``context`` (default: this sandbox's context) and return its answer."""
            return rlm_query_many([prompt], [context])[0]

        def rlm_query_many(prompts: list[str], contexts: list[Any] | None = None) -> list[str]:
            """Run one child RLM per prompt, concurrently; answers in input order."""
            prompts = list(prompts)
            contexts = list(contexts) if contexts is not None else [None] * len(prompts)
            items = [{"prompt": p, "context": c} for p, c in zip(prompts, contexts, strict=True)]
            result: list[str] = worker.call_host("rlm_query_many", items=items)
            return result

        def FINAL(value: Any) -> None:
            """Submit the final answer of the run."""
            worker._final[:] = [value]

        def budget() -> dict[str, Any]:
            """What the run may still spend (calls, tokens, cost, seconds, depth)."""
            result: dict[str, Any] = worker.call_host("budget")
            return result

        self.namespace.update(
            {
                "__name__": "__main__",
                "__builtins__": __builtins__,
                "context": context,
                "llm_query": llm_query,
                "llm_query_many": llm_query_many,
                "rlm_query": rlm_query,
                "rlm_query_many": rlm_query_many,
                "FINAL": FINAL,
                "budget": budget,
                "RLMError": RLMError,
                "BatchError": BatchError,
                "BudgetExceededError": BudgetExceededError,
                "ContextOverflowError": ContextOverflowError,
                "ModelCallError": ModelCallError,
                "SandboxRequestError": SandboxRequestError,
            }
        )
        helpers_prelude.install(self.namespace)  # grep(), chunks(): vetted helpers for small models

    # -- cells ---------------------------------------------------------------------
    def run_cell(self, code: str) -> dict[str, Any]:
        self._cell_counter += 1
        filename = f"<cell {self._cell_counter}>"
        out = _CappedText(self.max_output_chars)
        self._final.clear()
        error: str | None = None
        interrupted = False
        started = time.perf_counter()
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        try:
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
            tree = ast.parse(code, filename=filename)
            last_expr = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last_expr = ast.Expression(tree.body[-1].value)
                tree.body.pop()
            exec(compile(tree, filename, "exec"), self.namespace)
            if last_expr is not None:  # show the value of a trailing expression, like a REPL
                value = eval(compile(last_expr, filename, "eval"), self.namespace)
                if value is not None:
                    print(repr(value))
        except KeyboardInterrupt:
            interrupted = True
            error = "KeyboardInterrupt: the cell was interrupted (time limit); variables are kept"
        except SyntaxError as exc:
            error = "".join(traceback.format_exception_only(type(exc), exc))
        except BaseException as exc:  # SystemExit included: model code must not end the worker
            error = _format_user_traceback(exc, filename)
        finally:
            sys.stdout, sys.stderr = saved
        reply: dict[str, Any] = {
            "op": "result",
            "output": out.render(),
            "output_chars": out.total,
            "error": error,
            "interrupted": interrupted,
            "duration": time.perf_counter() - started,
        }
        if self._final:
            reply["final"] = _answer_text(self._final[0])
        return reply

    def serve(self) -> None:
        threading.Thread(target=self._reader, name="rlmflow-reader", daemon=True).start()
        while True:
            try:
                message = self._cells.get()
                if message is None:
                    return
                reply = self.run_cell(str(message["code"]))
                reply["id"] = message["id"]
                self.send(reply)
            except KeyboardInterrupt:
                continue  # an interrupt that raced the end of a cell: nothing to stop


def _answer_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _format_user_traceback(exc: BaseException, filename: str) -> str:
    """The traceback from the first frame of model code on: the worker's own frames are noise."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell "):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


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
    started = time.perf_counter()
    try:
        report = isolation.harden(init.get("isolation") or {})
        context = _load_context(init["context_path"], init["context_kind"])
    except Exception as exc:
        worker.send({"op": "failed", "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(3)
    worker.install_api(context)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    worker.send({"op": "ready", "load_seconds": time.perf_counter() - started, "report": report})
    worker.serve()


if __name__ == "__main__":
    main()
