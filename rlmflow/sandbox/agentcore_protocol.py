"""What crosses between the host and a remote AgentCore session, and how the host checks it.

Internal to :mod:`rlmflow.sandbox.agentcore`. Everything the remote side sends is untrusted: a
status line is bounded, parsed as JSON and checked in shape here before the host acts on it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

MARKER = "\x1erlmflow-status:"  # must equal agentcore_runtime.MARKER
HOST_FUNCTIONS = frozenset({"llm_query_many", "rlm_query_many", "budget"})
MAX_CALLS_PER_STATUS = 1024


class SessionLost(Exception):
    """The remote session or its interpreter is gone: a restart can go on."""


class Malformed(Exception):
    """The remote side sent something the host does not accept."""


def parse_status(result: dict[str, Any], limit: int) -> dict[str, Any]:
    text: str = result["stdout"]
    at = text.rfind(MARKER)
    if at < 0:
        detail = (result["stderr"] or text)[-500:]
        raise Malformed(f"no status from the remote runtime (error={result['is_error']}): {detail}")
    line = text[at + len(MARKER) :].split("\n", 1)[0]
    if len(line) > limit:
        raise Malformed(f"a status line of {len(line):,} characters")
    try:
        status = json.loads(line)
    except ValueError:
        raise Malformed("a status line that is not JSON") from None
    if not isinstance(status, dict) or not isinstance(status.get("state"), str):
        raise Malformed("a status that is not an object with a state")
    return status


def valid_calls(status: dict[str, Any], cell_id: int) -> list[tuple[int, str, dict[str, Any]]]:
    calls = status.get("calls")
    if status.get("cell") != cell_id or not isinstance(calls, list) or not 0 < len(calls) <= MAX_CALLS_PER_STATUS:
        raise Malformed("a malformed list of host calls")
    valid = []
    for call in calls:
        if not isinstance(call, dict):
            raise Malformed("a host call that is not an object")
        call_id, fn, args = call.get("id"), call.get("fn"), call.get("args")
        if type(call_id) is not int or not 0 < call_id < 2**53:
            raise Malformed("a host call without a valid id")
        if fn not in HOST_FUNCTIONS or not isinstance(args, dict):
            raise Malformed(f"a request for an unknown host function {str(fn)[:40]!r}")
        valid.append((call_id, str(fn), args))
    return valid


def capped(output: Any, chars: Any, cap: int) -> tuple[str, int]:
    text = output if isinstance(output, str) else ""
    total = chars if type(chars) is int and chars >= len(text) else len(text)
    limit = cap + 200  # room for the remote's own "[... omitted ...]" line
    if len(text) > limit:
        half = max(1, cap // 2)
        text = f"{text[:half]}\n[... output cut by the host: {total:,} characters in all ...]\n{text[-half:]}"
    return text, total


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


def cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit:,} characters cut by the host ...]\n{text[-half:]}"


def number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def short(status: dict[str, Any]) -> str:
    return json.dumps(status, default=str)[:300]


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


def check_done(status: dict[str, Any], cell_id: int) -> dict[str, Any]:
    """A cell's result status, if it is the current cell's and its fields have the right types."""
    if status.get("cell") != cell_id:
        raise Malformed(f"a result for cell {status.get('cell')!r} while running cell {cell_id}")
    for key, kind in (("output", str), ("error", (str, type(None))), ("final", (str, type(None)))):
        if not isinstance(status.get(key), kind):
            raise Malformed(f"the result's {key!r} has the wrong type")
    return status
