"""The span tree of a run, read from an in-memory exporter (no global provider is set)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rlmflow import RLM, ScriptedModel

from .helpers import turn_script

pytestmark = pytest.mark.anyio


async def test_run_turn_execute_batch_and_chat_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    secret = "PLAINTEXT-OF-THE-DOCUMENT "
    root = turn_script(["print(len(context))", "r = llm_query_many(['a', 'bb', 'ccc'])\nFINAL(','.join(r))"])
    sub = ScriptedModel(lambda r: r.messages[-1].content.upper(), name="sub")
    async with RLM(root=root, sub=sub, tracer_provider=provider) as rlm:
        result = await rlm.run(secret * 1000, "q?")
    assert result.answer == "A,BB,CCC"
    spans = {s.context.span_id: s for s in exporter.get_finished_spans()}
    by_name: dict[str, list] = {}
    for span in spans.values():
        by_name.setdefault(span.name, []).append(span)
    (run,) = by_name["invoke_agent rlm"]
    assert result.trace_id == format(run.context.trace_id, "032x")
    assert len(by_name["rlm.turn"]) == 2 and all(t.parent.span_id == run.context.span_id for t in by_name["rlm.turn"])
    (batch,) = by_name["llm_query_many"]
    assert spans[batch.parent.span_id].name == "execute_code"
    sub_chats = by_name["chat sub"]
    assert len(sub_chats) == 3 and all(c.parent.span_id == batch.context.span_id for c in sub_chats)
    assert sorted(c.attributes["gen_ai.usage.input_tokens"] for c in sub_chats) == [1, 1, 1]
    root_chats = by_name["chat root"]
    assert all(spans[c.parent.span_id].name == "rlm.turn" for c in root_chats)
    assert all(c.attributes["gen_ai.provider.name"] == "scripted" for c in root_chats)
    for span in spans.values():  # no document text in any attribute
        assert all(secret not in str(value) for value in span.attributes.values())
