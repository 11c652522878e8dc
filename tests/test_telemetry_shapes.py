"""What dashboards read: GenAI and OpenInference attributes of every span, with and without capture.

The same assertions as the Phoenix end-to-end test, against an in-memory exporter (fast).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from rlmflow import RLM, ScriptedModel

from .helpers import turn_script

pytestmark = pytest.mark.anyio

DOCUMENT = "CONFIDENTIAL-LEDGER-LINE " * 400
QUERY = "How many halves does the ledger have?"
CODE = (
    "half = len(context) // 2\n"
    "r = llm_query_many(['first: ' + context[:30], 'second: ' + context[half:half + 30]])\n"
    "print(r)\nFINAL('two halves: ' + ' | '.join(r))"
)


async def _run(capture: int) -> tuple[dict[str, list[ReadableSpan]], str]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    root = turn_script([CODE], name="root")
    sub = ScriptedModel(lambda r: "summary of " + r.messages[-1].content.split(":")[0], name="sub")
    async with RLM(root=root, sub=sub, capture_content=capture, tracer_provider=provider) as rlm:
        result = await rlm.run(DOCUMENT, QUERY)
    named: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        named.setdefault(span.name, []).append(span)
    return named, result.answer


def _attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_captured_run_has_parts_messages_tool_call_and_openinference_kinds() -> None:
    named, answer = await _run(capture=10_000)
    assert answer == "two halves: summary of first | summary of second"
    kinds = {name: {_attrs(s)["openinference.span.kind"] for s in spans} for name, spans in named.items()}
    assert kinds == {"invoke_agent rlm": {"AGENT"}, "rlm.turn": {"CHAIN"}, "chat root": {"LLM"},
                     "execute_code": {"TOOL"}, "llm_query_many": {"CHAIN"}, "chat sub": {"LLM"}}

    (run,) = named["invoke_agent rlm"]
    a = _attrs(run)
    assert a["input.value"] == QUERY and a["output.value"] == answer
    assert a["rlm.query.sha256"] == hashlib.sha256(QUERY.encode()).hexdigest() and a["rlm.answer.chars"] == len(answer)
    assert json.loads(a["gen_ai.output.messages"]) == [
        {"role": "assistant", "parts": [{"type": "text", "content": answer}]}
    ]

    for chat in named["chat root"] + named["chat sub"]:
        assert chat.kind is SpanKind.CLIENT
        a = _attrs(chat)
        assert a["gen_ai.operation.name"] == "chat" and a["llm.model_name"] == a["gen_ai.request.model"]
        assert a["llm.token_count.total"] == a["gen_ai.usage.input_tokens"] + a["gen_ai.usage.output_tokens"]
        (reply,) = json.loads(a["gen_ai.output.messages"])
        assert reply["role"] == "assistant" and reply["parts"] == [{"type": "text", "content": a["output.value"]}]
        assert a["llm.output_messages.0.message.content"] == a["output.value"]
        for message in json.loads(a["gen_ai.input.messages"]):
            assert message["role"] in ("user", "assistant")  # system instructions go apart
            assert all(part["type"] == "text" and isinstance(part["content"], str) for part in message["parts"])
    (root_chat,) = named["chat root"]
    a = _attrs(root_chat)
    (instructions,) = json.loads(a["gen_ai.system_instructions"])
    assert instructions["type"] == "text" and "context" in instructions["content"]
    assert a["llm.input_messages.0.message.role"] == "system"
    assert a["llm.input_messages.0.message.content"] == instructions["content"]
    assert QUERY in json.loads(a["gen_ai.input.messages"])[0]["parts"][0]["content"]
    assert CODE in a["output.value"]

    (cell,) = named["execute_code"]
    a = _attrs(cell)
    assert a["gen_ai.operation.name"] == "execute_tool" and a["gen_ai.tool.name"] == "execute_code"
    assert json.loads(a["gen_ai.tool.call.arguments"]) == {"code": CODE} and a["input.value"] == CODE
    assert a["gen_ai.tool.call.result"] == a["output.value"] == "['summary of first', 'summary of second']\n"

    (batch,) = named["llm_query_many"]
    a = _attrs(batch)
    assert [p.split(":")[0] for p in json.loads(a["input.value"])] == ["first", "second"]
    assert json.loads(a["output.value"]) == ["summary of first", "summary of second"]


async def test_without_capture_only_sizes_and_hashes() -> None:
    named, answer = await _run(capture=0)
    (run,) = named["invoke_agent rlm"]
    a = _attrs(run)
    assert a["rlm.query.chars"] == len(QUERY) and a["rlm.query.sha256"] == hashlib.sha256(QUERY.encode()).hexdigest()
    assert a["rlm.answer.sha256"] == hashlib.sha256(answer.encode()).hexdigest()
    assert a["rlm.context.chars"] == len(DOCUMENT)
    content_keys = ("input.value", "output.value", "gen_ai.input.messages", "gen_ai.output.messages",
                    "gen_ai.system_instructions", "gen_ai.tool.call.arguments", "gen_ai.tool.call.result")
    for spans in named.values():
        for span in spans:
            a = _attrs(span)
            assert "openinference.span.kind" in a
            assert not any(key in a or key.startswith("llm.input_messages") for key in content_keys)
            assert not any(k.startswith(("llm.input_messages", "llm.output_messages")) for k in a)
            assert all(QUERY not in str(v) and "CONFIDENTIAL" not in str(v) for v in a.values())


async def test_capture_cuts_every_text_to_the_limit() -> None:
    named, _ = await _run(capture=12)
    for spans in named.values():
        for span in spans:
            a = _attrs(span)
            for key in ("input.value", "output.value", "gen_ai.tool.call.result"):
                if key in a and span.name not in ("llm_query_many",):  # the batch's values are JSON lists
                    assert len(a[key]) <= 12, (span.name, key)
            for key in ("gen_ai.input.messages", "gen_ai.output.messages"):
                for message in json.loads(a.get(key, "[]")):
                    assert all(len(part["content"]) <= 12 for part in message["parts"])
