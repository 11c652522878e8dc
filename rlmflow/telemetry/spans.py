"""The attributes of each span rlmflow writes, built from plain values.

The span sites (the run loop, the dispatcher) call one function here per span start or end, so
the shape of what dashboards read lives in one module: the GenAI conventions' attributes beside
OpenInference's (span kind, ``input.value``/``output.value``, ``llm.*``).

Content (the query, the answer, prompts, replies, cell code and output) is written only when
``capture`` is a positive number of characters, each text cut to that many; otherwise only sizes
and SHA-256 digests, which identify a text without revealing it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from .._text import sanitize_text, traceback_summary
from . import attributes as attr

__all__ = [
    "Attributes",
    "batch_end",
    "batch_start",
    "cell_end",
    "cell_start",
    "chat_end",
    "chat_start",
    "input_messages",
    "output_messages",
    "run_end",
    "run_failed",
    "run_start",
    "run_totals",
    "server_of",
    "system_instructions",
    "turn_start",
]

Attributes = dict[str, Any]

_REGION = re.compile(r"[a-z]{2}(?:-gov)?-[a-z]+-\d")


class ChatMessage(Protocol):
    """What a message needs for capture: ``rlmflow.models.base.Message`` is one."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _text_parts(text: str, limit: int) -> list[dict[str, str]]:
    return [{"type": "text", "content": text[:limit]}]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def system_instructions(messages: Iterable[ChatMessage], limit: int) -> str | None:
    """``gen_ai.system_instructions``: the system messages' text as a list of parts, or ``None``."""
    parts = [part for m in messages if m.role == "system" for part in _text_parts(m.content, limit)]
    return _json(parts) if parts else None


def input_messages(messages: Iterable[ChatMessage], limit: int) -> str:
    """``gen_ai.input.messages``: the chat history without system messages, in the parts shape."""
    return _json([{"role": m.role, "parts": _text_parts(m.content, limit)} for m in messages if m.role != "system"])


def output_messages(text: str, limit: int, finish_reason: str | None = None) -> str:
    """``gen_ai.output.messages``: one assistant message in the parts shape."""
    message: dict[str, Any] = {"role": "assistant", "parts": _text_parts(text, limit)}
    if finish_reason:
        message["finish_reason"] = finish_reason
    return _json([message])


def _flattened(prefix: str, messages: Sequence[tuple[str, str]], limit: int) -> Attributes:
    """OpenInference's flattened message list: ``llm.input_messages.<i>.message.role`` ..."""
    out: Attributes = {}
    for index, (role, content) in enumerate(messages):
        out[f"{prefix}.{index}.{attr.MESSAGE_ROLE}"] = role
        out[f"{prefix}.{index}.{attr.MESSAGE_CONTENT}"] = content[:limit]
    return out


# -- the run (root span of a trace, or a child run under the cell that called rlm_query) -------------
def run_start(
    *, run_id: str, depth: int, root_model: str, context_chars: int, context_sha256: str, query: str, capture: int,
    parent_run_id: str | None = None,
) -> Attributes:
    """Attributes of ``invoke_agent rlm`` at its start: an AGENT whose input is the query."""
    out: Attributes = {
        attr.GEN_AI_OPERATION_NAME: attr.OPERATION_INVOKE_AGENT,
        attr.GEN_AI_AGENT_NAME: "rlm",
        attr.GEN_AI_REQUEST_MODEL: root_model,
        attr.OI_SPAN_KIND: attr.OI_KIND_AGENT,
        attr.RLM_RUN_ID: run_id,
        attr.RLM_DEPTH: depth,
        attr.RLM_CONTEXT_CHARS: context_chars,
        attr.RLM_CONTEXT_SHA256: context_sha256,
        attr.RLM_QUERY_CHARS: len(query),
        attr.RLM_QUERY_SHA256: _sha256(query),
    }
    if parent_run_id is not None:
        out[attr.METADATA] = _json({"parent_run_id": parent_run_id})
    if capture > 0:
        out[attr.INPUT_VALUE] = query[:capture]
        out[attr.INPUT_MIME_TYPE] = attr.MIME_TEXT
        out[attr.GEN_AI_INPUT_MESSAGES] = _json([{"role": "user", "parts": _text_parts(query, capture)}])
    return out


def run_totals(
    *, calls: int, input_tokens: int, output_tokens: int, cost_usd: float, cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
) -> Attributes:
    """What a run (its children included) spent, on its span however it ended."""
    return {
        attr.RLM_RUN_CALLS: calls,
        attr.RLM_RUN_INPUT_TOKENS: input_tokens,
        attr.RLM_RUN_OUTPUT_TOKENS: output_tokens,
        attr.RLM_RUN_COST_USD: cost_usd,
        attr.RLM_RUN_CACHE_READ_TOKENS: cache_read_tokens,
        attr.RLM_RUN_CACHE_WRITE_TOKENS: cache_write_tokens,
    }


def run_failed(*, error_type: str, limit: str | None) -> Attributes:
    """Why a run ended without an answer: ``error.type`` and, for a budget stop, the cap hit."""
    out: Attributes = {attr.ERROR_TYPE: error_type}
    if limit:
        out[attr.RLM_BUDGET_LIMIT] = limit
    return out


def run_end(*, answer: str | None, capture: int) -> Attributes:
    """Attributes of ``invoke_agent rlm`` at its end; nothing when the run gave no answer."""
    if answer is None:
        return {}
    out: Attributes = {attr.RLM_ANSWER_CHARS: len(answer), attr.RLM_ANSWER_SHA256: _sha256(answer)}
    if capture > 0:
        out[attr.OUTPUT_VALUE] = answer[:capture]
        out[attr.OUTPUT_MIME_TYPE] = attr.MIME_TEXT
        out[attr.GEN_AI_OUTPUT_MESSAGES] = output_messages(answer, capture)
    return out


# -- a turn and its cells -------------------------------------------------------------------------
def turn_start(*, turn: int, depth: int) -> Attributes:
    """Attributes of ``rlm.turn``: a CHAIN holding the root model's call and the cells it wrote."""
    return {attr.RLM_TURN: turn, attr.RLM_DEPTH: depth, attr.OI_SPAN_KIND: attr.OI_KIND_CHAIN}


def cell_start(*, depth: int, code: str, capture: int) -> Attributes:
    """Attributes of ``execute_code`` at its start: the GenAI ``execute_tool`` operation, a TOOL."""
    out: Attributes = {
        attr.GEN_AI_OPERATION_NAME: attr.OPERATION_EXECUTE_TOOL,
        attr.GEN_AI_TOOL_NAME: attr.TOOL_EXECUTE_CODE,
        attr.GEN_AI_TOOL_TYPE: attr.TOOL_TYPE_FUNCTION,
        attr.OI_SPAN_KIND: attr.OI_KIND_TOOL,
        attr.TOOL_NAME: attr.TOOL_EXECUTE_CODE,
        attr.RLM_DEPTH: depth,
        attr.RLM_CELL_CODE_CHARS: len(code),
    }
    if capture > 0:
        arguments = _json({"code": code[:capture]})
        out[attr.GEN_AI_TOOL_CALL_ARGUMENTS] = arguments
        out[attr.TOOL_PARAMETERS] = arguments
        out[attr.INPUT_VALUE] = code[:capture]
        out[attr.INPUT_MIME_TYPE] = attr.MIME_TEXT
    return out


def cell_end(
    *, output: str, error: str | None, duration: float, output_chars: int, restarts: int, capture: int
) -> Attributes:
    """Attributes of ``execute_code`` at its end: what the cell printed (captured) and how it went."""
    out: Attributes = {
        attr.RLM_CELL_DURATION_S: duration,
        attr.RLM_CELL_OUTPUT_CHARS: output_chars,
        attr.RLM_SANDBOX_RESTARTS: restarts,
    }
    if error:
        out[attr.ERROR_TYPE] = traceback_summary(error).split(":")[0][:100] or "Error"
    if capture > 0:
        # sandbox text: cut before sanitising (it may be huge), and it may hold terminal escapes
        result = sanitize_text(output[:capture] + (error or "")[:capture])[:capture]
        out[attr.GEN_AI_TOOL_CALL_RESULT] = result
        out[attr.OUTPUT_VALUE] = result
        out[attr.OUTPUT_MIME_TYPE] = attr.MIME_TEXT
    return out


# -- llm_query_many -------------------------------------------------------------------------------
def batch_start(*, size: int, deduplicated: int, depth: int, prompts: Sequence[str], capture: int) -> Attributes:
    """Attributes of ``llm_query_many`` at its start: a CHAIN over its sub-calls."""
    out: Attributes = {
        attr.OI_SPAN_KIND: attr.OI_KIND_CHAIN,
        attr.RLM_BATCH_SIZE: size,
        attr.RLM_DEDUPLICATED: deduplicated,
        attr.RLM_DEPTH: depth,
    }
    if capture > 0:
        out[attr.INPUT_VALUE] = _json([p[:capture] for p in prompts])
        out[attr.INPUT_MIME_TYPE] = attr.MIME_JSON
    return out


def batch_end(*, answers: Sequence[str | None], failed: int, capture: int) -> Attributes:
    """Attributes of ``llm_query_many`` at its end (answers in prompt order; ``None`` for a failure)."""
    out: Attributes = {}
    if failed:
        out[attr.RLM_BATCH_FAILED] = failed
    if capture > 0:
        out[attr.OUTPUT_VALUE] = _json([a[:capture] if a is not None else None for a in answers])
        out[attr.OUTPUT_MIME_TYPE] = attr.MIME_JSON
    return out


# -- a model call ---------------------------------------------------------------------------------
def server_of(endpoint: str | None) -> tuple[str, int | None] | None:
    """``server.address`` and ``server.port`` of a model's endpoint: a base URL's host and port,
    or a bare host or AWS region (``us-east-1`` -> Bedrock Runtime's regional host)."""
    if not endpoint:
        return None
    if "://" in endpoint:
        parsed = urlsplit(endpoint)
        return (parsed.hostname, parsed.port) if parsed.hostname else None
    if _REGION.fullmatch(endpoint):
        return f"bedrock-runtime.{endpoint}.amazonaws.com", None
    return endpoint, None


def chat_start(
    *, provider: str, model: str, max_tokens: int, depth: int, role: str, prompt_chars: int,
    messages: Sequence[ChatMessage], capture: int, endpoint: str | None = None,
) -> Attributes:
    """Attributes of ``chat {model}`` (a CLIENT span) at its start: an LLM span."""
    out: Attributes = {
        attr.GEN_AI_OPERATION_NAME: attr.OPERATION_CHAT,
        attr.GEN_AI_PROVIDER_NAME: provider,
        attr.GEN_AI_REQUEST_MODEL: model,
        attr.GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
        attr.OI_SPAN_KIND: attr.OI_KIND_LLM,
        attr.LLM_MODEL_NAME: model,
        attr.LLM_PROVIDER: provider,
        attr.RLM_DEPTH: depth,
        attr.RLM_ROLE: role,
        attr.RLM_PROMPT_CHARS: prompt_chars,
    }
    server = server_of(endpoint)
    if server is not None:
        out[attr.SERVER_ADDRESS] = server[0]
        if server[1] is not None:
            out[attr.SERVER_PORT] = server[1]
    if capture > 0:
        instructions = system_instructions(messages, capture)
        if instructions is not None:
            out[attr.GEN_AI_SYSTEM_INSTRUCTIONS] = instructions
        out[attr.GEN_AI_INPUT_MESSAGES] = input_messages(messages, capture)
        out.update(_flattened(attr.LLM_INPUT_MESSAGES, [(m.role, m.content) for m in messages], capture))
        last_user = next((m.content for m in reversed(messages) if m.role == "user"), "")
        out[attr.INPUT_VALUE] = last_user[:capture]
        out[attr.INPUT_MIME_TYPE] = attr.MIME_TEXT
    return out


def chat_end(
    *, response_model: str, input_tokens: int, output_tokens: int, text: str, finish_reason: str | None,
    capture: int, cache_read_tokens: int = 0, cache_write_tokens: int = 0,
) -> Attributes:
    """OpenInference's usage, and the reply when captured, for a finished ``chat`` span.

    The GenAI response attributes (``gen_ai.response.model``, ``gen_ai.usage.*``) are the
    dispatcher's; these go beside them.
    """
    out: Attributes = {
        attr.LLM_TOKEN_COUNT_PROMPT: input_tokens,
        attr.LLM_TOKEN_COUNT_COMPLETION: output_tokens,
        attr.LLM_TOKEN_COUNT_TOTAL: input_tokens + output_tokens,
    }
    if cache_read_tokens or cache_write_tokens:
        out[attr.LLM_TOKEN_COUNT_CACHE_READ] = cache_read_tokens
        out[attr.LLM_TOKEN_COUNT_CACHE_WRITE] = cache_write_tokens
    if response_model:
        out[attr.LLM_MODEL_NAME] = response_model
    if capture > 0:
        out[attr.GEN_AI_OUTPUT_MESSAGES] = output_messages(text, capture, finish_reason)
        out.update(_flattened(attr.LLM_OUTPUT_MESSAGES, [("assistant", text)], capture))
        out[attr.OUTPUT_VALUE] = text[:capture]
        out[attr.OUTPUT_MIME_TYPE] = attr.MIME_TEXT
    return out
