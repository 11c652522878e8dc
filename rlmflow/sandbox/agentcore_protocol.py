"""What crosses between the host and a remote AgentCore session, and how the host checks it.

Internal to :mod:`rlmflow.sandbox.agentcore`. Everything the remote side sends is untrusted: cell
code can replace the runtime that prints the status lines. A status line is bounded before it is
decoded (characters, then items), decoded as strict JSON (no ``NaN``/``Infinity``, no infinite
floats, bounded nesting), then checked against the schema of its ``state`` (:data:`SCHEMAS`:
allowed keys, types, ranges, finite numbers) and against what the host expects: the current
cell, call ids never seen before in the cell, a bounded number of calls in flight. Anything else
is :class:`Malformed`: the host replaces the session and the cell reports it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

MARKER = "\x1erlmflow-status:"  # must equal agentcore_runtime.MARKER
HOST_FUNCTIONS = frozenset({"llm_query_many", "rlm_query_many", "budget"})
MAX_CALLS_PER_STATUS = 1024
MAX_CALLS_IN_FLIGHT = 1024
"""Host calls of one cell being served at once (reported and not answered)."""
MAX_ITEMS = 200_000
"""Arrays, objects and their elements in one status line (as for the local worker's frames)."""
MAX_ARGS_DEPTH = 16
"""Nesting of a host call's arguments (``rlm_query_many`` needs 4)."""
MAX_ID = 2**53
MAX_SECONDS = 1e9
_UNCOUNTED = 3 * MAX_ITEMS  # a line this short cannot hold more than MAX_ITEMS items
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


class SessionLost(Exception):
    """The remote session or its interpreter is gone: a restart can go on."""


class Malformed(Exception):
    """The remote side sent something the host does not accept: a protocol violation."""


class Stuck(Exception):
    """A control call did not answer in time (a hung runtime, or C code holding the interpreter)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer to a control call within {seconds:g} s")
        self.seconds = seconds


class Busy(Exception):
    """Threads of an earlier cell computed longer than a cell may between cells."""

    def __init__(self, cpu: float) -> None:
        super().__init__(f"{cpu:.1f} CPU-seconds used between cells")
        self.cpu = cpu


# -- decoding ----------------------------------------------------------------------------------
def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number the host accepts")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


def status_line(result: dict[str, Any], limit: int) -> str:
    """The last status line of a control call's output, bounded to ``limit`` characters."""
    text: str = result["stdout"]
    at = text.rfind(MARKER)
    if at < 0:
        detail = (result["stderr"] or text)[-500:]
        raise Malformed(f"no status from the remote runtime (error={result['is_error']}): {detail}")
    line = text[at + len(MARKER) :].split("\n", 1)[0]
    if len(line) > limit:
        raise Malformed(f"a status line of {len(line):,} characters")
    return line


def decode_status(line: str) -> dict[str, Any]:
    """A status line as an object with a ``state``: items counted before anything is allocated.

    Long lines are counted first: the structural characters outside strings bound the arrays,
    objects and elements that decoding would build (``[],`` repeated becomes one list per three
    characters, twenty times its size in memory).
    """
    if len(line) > _UNCOUNTED and line.count("[") + line.count("{") + line.count(",") > MAX_ITEMS:
        bare = _STRINGS.sub("", line)  # the same count without what is inside strings
        if bare.count("[") + bare.count("{") + bare.count(",") > MAX_ITEMS:
            raise Malformed(f"a status line of more than {MAX_ITEMS:,} items")
    try:
        status = json.loads(line, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep to decode
        raise Malformed(f"a status line that is not strict JSON ({type(exc).__name__})") from None
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        raise Malformed("a status that is not an object with a state")
    return status


def parse_status(result: dict[str, Any], limit: int) -> dict[str, Any]:
    """The status of a control call's output, decoded (not yet checked against its schema)."""
    return decode_status(status_line(result, limit))


# -- the schema of each state ----------------------------------------------------------------------
Check = Callable[[Any], bool]


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value < MAX_ID


def _cell(value: Any) -> bool:
    return type(value) is int and 0 < value < MAX_ID


def _seconds(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= MAX_SECONDS


def _text(value: Any) -> bool:
    return type(value) is str


def _text_or_none(value: Any) -> bool:
    return value is None or type(value) is str


def _flag(value: Any) -> bool:
    return type(value) is bool


def _sha256(value: Any) -> bool:
    return type(value) is str and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _calls(value: Any) -> bool:
    return type(value) is list and 0 < len(value) <= MAX_CALLS_PER_STATUS


SCHEMAS: dict[str, tuple[dict[str, Check], dict[str, Check]]] = {
    # state: ({required key: check}, {optional key: check}); no other key is accepted
    "ready": ({"chars": _count, "sha256": _sha256}, {"load_seconds": _seconds}),
    "running": ({"cell": _cell}, {"cpu": _seconds}),
    "calls": ({"cell": _cell, "calls": _calls}, {"cpu": _seconds}),
    "done": ({"cell": _cell, "output": _text}, {
        "output_chars": _count, "error": _text_or_none, "error_chars": _count, "final": _text_or_none,
        "final_chars": _count, "interrupted": _flag, "duration": _seconds, "cpu": _seconds,
    }),
    "busy": ({"cell": _cell}, {"cpu": _seconds}),
    "lost": ({}, {}),
    "error": ({"message": _text}, {}),
}
CELL_STATES = frozenset({"running", "calls", "done", "busy", "lost"})
"""What a control call about a cell may answer (``error``: the runtime failed, a violation)."""


def check_status(status: dict[str, Any], cell_id: int | None, states: frozenset[str] = CELL_STATES) -> dict[str, Any]:
    """``status`` if its state is one of ``states`` and it fits that state's schema and the cell."""
    state = status.get("state")
    if state == "error" and "error" not in states:
        message = status.get("message")
        raise Malformed(f"the remote runtime failed: {str(message)[:200] if isinstance(message, str) else '?'}")
    if state not in states or state not in SCHEMAS:
        raise Malformed(f"unexpected status {short(status)}")
    required, optional = SCHEMAS[state]
    for key, value in status.items():
        if key == "state":
            continue
        check = required.get(key) or optional.get(key)
        if check is None:
            raise Malformed(f"a {state!r} status with a key the host does not accept: {str(key)[:40]!r}")
        if not check(value):
            raise Malformed(f"the {state!r} status's {key!r} has the wrong type or is out of range")
    missing = [key for key in required if key not in status]
    if missing:
        raise Malformed(f"a {state!r} status without {missing[0]!r}")
    if "cell" in required and status["cell"] != cell_id:
        raise Malformed(f"a {state!r} status for cell {status['cell']!r} while running cell {cell_id}")
    return status


def cpu(status: dict[str, Any]) -> float:
    """CPU seconds the remote process used between the previous control call and this one."""
    return float(status.get("cpu", 0.0))


def _depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        children = item.values() if type(item) is dict else item
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return True


def valid_calls(
    status: dict[str, Any], cell_id: int, *, after: int = 0, room: int = MAX_CALLS_IN_FLIGHT
) -> list[tuple[int, str, dict[str, Any]]]:
    """The host calls of a ``calls`` status: (id, function, arguments), ids in increasing order.

    Each id must be greater than ``after`` (the highest id seen before in this cell) and than
    the id before it: an id reported twice, or again after its answer, is a violation (the
    runtime numbers calls in the order it reports them). At most ``room`` calls may be added to
    those in flight.
    """
    check_status(status, cell_id, frozenset({"calls"}))
    calls = status["calls"]
    if len(calls) > room:
        raise Malformed(f"more than {MAX_CALLS_IN_FLIGHT} host calls in flight at once")
    valid = []
    last = after
    for call in calls:
        if type(call) is not dict or set(call) != {"id", "fn", "args"}:
            raise Malformed("a host call that is not an object of id, fn and args")
        call_id, fn, args = call["id"], call["fn"], call["args"]
        if type(call_id) is not int or not 0 < call_id < MAX_ID:
            raise Malformed("a host call without a valid id")
        if call_id <= last:
            raise Malformed(f"host call id {call_id} reported twice or out of order")
        if fn not in HOST_FUNCTIONS or type(args) is not dict:
            raise Malformed(f"a request for an unknown host function {str(fn)[:40]!r}")
        if not _depth_ok(args, MAX_ARGS_DEPTH):
            raise Malformed(f"host call arguments nested deeper than {MAX_ARGS_DEPTH}")
        last = call_id
        valid.append((call_id, str(fn), args))
    return valid


def check_done(status: dict[str, Any], cell_id: int) -> dict[str, Any]:
    """A cell's result, if it is the current cell's and fits the schema; defaults filled in."""
    check_status(status, cell_id, frozenset({"done"}))
    output, error, final = status["output"], status.get("error"), status.get("final")
    return {
        "state": "done",
        "cell": cell_id,
        "output": output,
        "output_chars": max(status.get("output_chars", 0), len(output)),
        "error": error,
        "error_chars": max(status.get("error_chars", 0), len(error or "")),
        "final": final,
        "final_chars": max(status.get("final_chars", 0), len(final or "")),
        "interrupted": status.get("interrupted", False),
        "duration": float(status.get("duration", 0.0)),
    }


def check_ready(status: dict[str, Any]) -> dict[str, Any]:
    """The boot status: the context's length and digest as the remote session read them."""
    return check_status(status, None, frozenset({"ready"}))


# -- text ----------------------------------------------------------------------------------------
def capped(output: Any, chars: Any, cap: int) -> tuple[str, int]:
    text = output if isinstance(output, str) else ""
    total = chars if type(chars) is int and chars >= len(text) else len(text)
    limit = cap + 200  # room for the remote's own "[... omitted ...]" line
    if len(text) > limit:
        half = max(1, cap // 2)
        text = f"{text[:half]}\n[... output cut by the host: {total:,} characters in all ...]\n{text[-half:]}"
    return text, total


def cut(text: str, limit: int, total: int = 0) -> str:
    """``text`` in at most ``limit`` characters: head and tail, and its true length between."""
    if len(text) <= limit:
        return text
    note = f"\n[... cut by the host: {max(total, len(text)):,} characters in all ...]\n"
    half = max(0, (limit - len(note)) // 2)
    return f"{text[:half]}{note}{text[len(text) - half:] if half else ''}"


def cut_answer(text: str, limit: int, total: int = 0) -> str:
    """An answer in at most ``limit`` characters: its head, and its true length."""
    if len(text) <= limit:
        return text
    note = f"\n[answer cut by the sandbox host: {max(total, len(text)):,} characters in all]"
    return text[: max(0, limit - len(note))] + note


def pieces(text: str, limit: int) -> list[str]:
    """``text`` cut so that each piece, JSON-encoded as botocore sends it, is at most ``limit`` bytes."""
    pieces = []
    offset = 0
    size = limit
    while True:
        piece = text[offset : offset + size]
        encoded = len(json.dumps(piece))
        if encoded > limit and size > 1:  # escapes of non-ASCII text: shrink to fit
            size = max(1, size * limit // encoded - 16)
            continue
        pieces.append(piece)
        offset += len(piece)
        if offset >= len(text):
            return pieces
        size = limit


def short(status: dict[str, Any]) -> str:
    """A bounded description of a status (its state and keys), for messages."""
    keys = ", ".join(str(key)[:20] for key in list(status)[:8])
    return f"{str(status.get('state'))[:40]!r} with keys {keys}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def explain(operation: str, code: str, message: str, attempts: int) -> str:
    hint = ""
    if code == "ThrottlingException":
        hint = f" (still throttled after {attempts} attempts)"
    elif code == "AccessDeniedException":
        hint = (" (the caller needs bedrock-agentcore:StartCodeInterpreterSession, InvokeCodeInterpreter and "
                "StopCodeInterpreterSession)")
    elif code == "ServiceQuotaExceededException":
        hint = " (too many concurrent sessions: lower the run concurrency or ask for a higher quota)"
    return f"AgentCore {operation} failed: {code}: {message}{hint}"


async def read_result(stream: Any, limit: int) -> dict[str, Any]:
    """The text of an InvokeCodeInterpreter event stream, at most ``limit`` characters of it.

    Prefers ``structuredContent.stdout``/``stderr``; falls back on the text of ``content``
    blocks. botocore has already bounded each event (24 MB) before decoding it.
    """
    seen = 0
    stdout: list[str] = []
    other: list[str] = []
    is_error = False
    async for event in stream:
        result = event.get("result") if isinstance(event, dict) else None
        if not isinstance(result, dict):
            continue
        is_error = is_error or bool(result.get("isError"))
        structured = result.get("structuredContent")
        texts: list[tuple[list[str], Any]] = []
        if isinstance(structured, dict) and isinstance(structured.get("stdout"), str):
            texts.append((stdout, structured["stdout"]))
            texts.append((other, structured.get("stderr")))
        else:
            for block in result.get("content") or []:
                if isinstance(block, dict):
                    texts.append((stdout, block.get("text")))
                    resource = block.get("resource")
                    if isinstance(resource, dict):
                        texts.append((stdout, resource.get("text")))
        for sink, text in texts:
            if not isinstance(text, str):
                continue
            seen += len(text)
            if seen > limit:
                raise Malformed(f"the remote session sent more than {limit:,} characters in one response")
            sink.append(text)
    return {"stdout": "".join(stdout), "stderr": "".join(other), "is_error": is_error}
