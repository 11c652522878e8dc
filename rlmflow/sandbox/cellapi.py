"""What model code sees of the host, the same in every sandbox: the API and its errors.

Both the local worker (``worker.py``) and the AgentCore runtime (``agentcore_runtime.py``) run
model code with ``llm_query``/``llm_query_many``/``rlm_query``/``rlm_query_many``/``FINAL``/
``budget`` and the error classes host calls raise; this module defines them once. Standard
library only: the worker imports it by path, and the AgentCore backend ships its source to the
remote interpreter as the module ``_rlmflow_cellapi``. It never imports ``rlmflow``.
"""

from __future__ import annotations

import ast
import io
import json
import linecache
import re
import threading
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["CappedText", "answer_text", "api", "error_from_wire", "format_user_traceback", "run_code"]

HostCall = Callable[[str, dict[str, Any]], Any]
"""Sends one host call (function name, arguments) and returns its value or raises its error."""


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


_ERRORS: dict[str, type[RLMError]] = {
    cls.__name__: cls
    for cls in (RLMError, BudgetExceededError, ContextOverflowError, ModelCallError, SandboxRequestError, BatchError)
}


def error_from_wire(error: Any) -> RLMError:
    """The exception a host call's error map stands for (unknown types: ``ModelCallError``)."""
    if not isinstance(error, dict):
        return ModelCallError("the host call failed")
    message = str(error.get("message", "error"))
    if error.get("type") == "BatchError":
        errors = {int(i): error_from_wire(e) for i, e in (error.get("errors") or {}).items()}
        return BatchError(message, list(error.get("results") or []), errors)
    return _ERRORS.get(str(error.get("type")), ModelCallError)(message)


def api(host: HostCall, submit: Callable[[Any], None]) -> dict[str, Any]:
    """The names model code gets: host functions over ``host``, ``FINAL`` over ``submit``, errors."""

    def llm_query(
        prompt: str, *, model: str | None = None, max_tokens: int | None = None, prefix: str | None = None
    ) -> str:
        """Ask a sub-LLM one question; returns its answer as a string."""
        return llm_query_many([prompt], model=model, max_tokens=max_tokens, prefix=prefix)[0]

    def llm_query_many(
        prompts: list[str], *, model: str | None = None, max_tokens: int | None = None, prefix: str | None = None
    ) -> list[str]:
        """Ask many prompts concurrently; answers come back in input order.

        ``prefix``: text every prompt shares (a long instruction, or one chunk asked many
        questions), sent once before each prompt and cached by the provider where it can be,
        so each prompt after the first pays a fraction of its price.
        """
        prompts = list(prompts)
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("llm_query_many expects a list of strings")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, not {type(prefix).__name__}")
        if not prompts:
            return []
        args: dict[str, Any] = {"prompts": prompts, "model": model, "max_tokens": max_tokens}
        if prefix:
            args["prefix"] = prefix
        result: list[str] = host("llm_query_many", args)
        return result

    def rlm_query(prompt: str, context: Any = None) -> str:
        """Run a child RLM on ``context`` (default: this sandbox's context) and return its answer."""
        return rlm_query_many([prompt], [context])[0]

    def rlm_query_many(prompts: list[str], contexts: list[Any] | None = None) -> list[str]:
        """Run one child RLM per prompt, concurrently; answers in input order."""
        prompts = list(prompts)
        contexts = list(contexts) if contexts is not None else [None] * len(prompts)
        items = [{"prompt": p, "context": c} for p, c in zip(prompts, contexts, strict=True)]
        result: list[str] = host("rlm_query_many", {"items": items})
        return result

    def FINAL(value: Any) -> None:
        """Submit the final answer of the run."""
        submit(value)

    def budget() -> dict[str, Any]:
        """What the run may still spend (calls, tokens, cost, seconds, depth)."""
        result: dict[str, Any] = host("budget", {})
        return result

    return {
        "llm_query": llm_query,
        "llm_query_many": llm_query_many,
        "rlm_query": rlm_query,
        "rlm_query_many": rlm_query_many,
        "FINAL": FINAL,
        "budget": budget,
        **_ERRORS,
    }


class CappedText(io.TextIOBase):
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
            self.total += written
            room = self._half - self._head_len
            if room > 0:
                self._head.append(s[:room])
                self._head_len += min(room, written)
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


def answer_text(value: Any) -> str:
    """What ``FINAL(value)`` submits: a string as it is, anything else as JSON (or its repr)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


_HOST_PATH = re.compile(r'File "(/[^"\n]+)"')
_LIBRARY_ROOT = re.compile(r".*/(?:site-packages|dist-packages|lib/python\d+\.\d+)/")


def _short_path(match: re.Match[str]) -> str:
    """A library frame named as the model knows it (``json/decoder.py``), not by the host's paths."""
    path = match.group(1)
    short = _LIBRARY_ROOT.sub("", path)
    return f'File "{short if short != path else path.rsplit("/", 1)[-1]}"'


def format_user_traceback(exc: BaseException) -> str:
    """The traceback from the first frame of model code on: the sandbox's own frames are noise,
    and no frame shows where the host keeps its files (``/usr/lib/python3.11/json/decoder.py`` is
    ``json/decoder.py``; a sandbox helper is its file name), chained exceptions included."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell "):
        tb = tb.tb_next
    return _HOST_PATH.sub(_short_path, "".join(traceback.format_exception(type(exc), exc, tb)))


def run_code(code: str, filename: str, namespace: dict[str, Any]) -> tuple[str | None, bool]:
    """Run one cell in ``namespace``, echoing a trailing expression's value like a REPL.

    Returns (the error text or ``None``, whether a KeyboardInterrupt stopped it). Every exception,
    ``SystemExit`` included, becomes error text: model code must not end its sandbox.
    """
    try:
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename=filename)
        last_expr = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last_expr = ast.Expression(tree.body[-1].value)
            tree.body.pop()
        exec(compile(tree, filename, "exec"), namespace)
        if last_expr is not None:
            value = eval(compile(last_expr, filename, "eval"), namespace)
            if value is not None:
                print(repr(value))
    except KeyboardInterrupt:
        return "KeyboardInterrupt: the cell was interrupted (time limit); variables are kept", True
    except SyntaxError as exc:
        return "".join(traceback.format_exception_only(type(exc), exc)), False
    except BaseException as exc:
        return format_user_traceback(exc), False
    return None, False
