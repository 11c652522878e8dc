"""``llm_query_many(prompts, prefix=...)``: the shared part first, cached, and checked at the boundary."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rlmflow import RLM, BridgeLimits, ScriptedModel
from rlmflow.models.anthropic import AnthropicModel
from rlmflow.models.base import LanguageModel
from rlmflow.models.bedrock import BedrockModel

from .fakes.fake_anthropic import FakeAnthropicServer
from .fakes.fake_bedrock import FakeBedrockServer
from .helpers import turn_script
from .test_trust_boundary import RAW

pytestmark = pytest.mark.anyio

CHUNK = "Record: the ship Vessel-7 docked at berth 3 carrying copper (400 tonnes). " * 80  # ~1,500 tokens
QUESTIONS = ["Which ship?", "Which berth?", "What cargo?", "How many tonnes?", "Docked or left?"]
CELL = f"answers = llm_query_many({QUESTIONS!r}, prefix=context)\nFINAL(repr(answers))"


@pytest.fixture
async def bedrock_server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeBedrockServer]:
    # a reply takes 50 ms: requests sent together with the first one would all miss its write
    async with FakeBedrockServer(latency=0.05) as fake:
        for name, value in fake.credentials_env().items():
            monkeypatch.setenv(name, value)
        yield fake


async def run_batch(sub: LanguageModel) -> list[object]:
    try:
        async with RLM(root=turn_script([CELL]), sub=sub) as rlm:
            result = await rlm.run(CHUNK, "ask about the record")
    finally:
        await sub.aclose()
    assert result.answer.startswith("[")
    return [c for c in result.calls if c.role == "sub"]


async def test_a_bedrock_batch_writes_its_prefix_once_and_reads_it_after(bedrock_server: FakeBedrockServer) -> None:
    calls = await run_batch(BedrockModel("us.anthropic.claude-sonnet-4-5-20250929-v1:0", region="us-east-1",
                                         endpoint_url=bedrock_server.base_url))
    bodies = bedrock_server.requests_seen
    assert len(bodies) == len(QUESTIONS)
    for body in bodies:  # one user message: the prefix, its cache point, then the question
        (message,) = body["messages"]
        assert message["content"][:2] == [{"text": CHUNK}, {"cachePoint": {"type": "default"}}]
    assert sorted(b["messages"][0]["content"][2]["text"] for b in bodies) == sorted(QUESTIONS)
    writes = [c.cache_write_tokens for c in calls]  # type: ignore[attr-defined]
    reads = [c.cache_read_tokens for c in calls]  # type: ignore[attr-defined]
    assert writes[0] > 1024 and writes[1:] == [0] * (len(QUESTIONS) - 1)
    assert reads == [0] + [writes[0]] * (len(QUESTIONS) - 1)


async def test_an_anthropic_batch_writes_its_prefix_once_and_reads_it_after() -> None:
    async with FakeAnthropicServer(latency=0.05) as server:
        calls = await run_batch(AnthropicModel("claude-sonnet-4-5", base_url=server.base_url, api_key=server.api_key))
        first = server.requests_seen[0]["messages"][0]["content"]
    assert first[0] == {"type": "text", "text": CHUNK, "cache_control": {"type": "ephemeral"}}
    assert [c.cache_read_tokens > 0 for c in calls] == [False] + [True] * (len(QUESTIONS) - 1)  # type: ignore[attr-defined]


async def test_a_model_without_a_cache_gets_the_prefix_as_its_first_message() -> None:
    sub = ScriptedModel(lambda r: f"{len(r.messages)}:{r.messages[0].content[:6]}:{r.messages[-1].content}", name="sub")
    cells = ["FINAL(repr(llm_query_many(['a', 'b'], prefix='LEDGER ')))"]
    async with RLM(root=turn_script(cells), sub=sub) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == "['2:LEDGER:a', '2:LEDGER:b']"
    assert all(r.messages[0].cache_point and not r.messages[1].cache_point for r in sub.requests)


async def test_dedup_tells_prefixes_apart() -> None:
    sub = ScriptedModel(lambda r: r.messages[0].content + r.messages[-1].content, name="sub")
    cells = ["FINAL(repr([llm_query('q', prefix='A'), llm_query('q', prefix='B'), llm_query('q', prefix='A'), "
             "llm_query('q')]))"]
    async with RLM(root=turn_script(cells), sub=sub) as rlm:  # dedup is on by default
        result = await rlm.run("doc", "q?")
    assert result.answer == "['Aq', 'Bq', 'Aq', 'qq']"
    assert len(sub.requests) == 3  # the second ('A', 'q') was answered from the first


async def test_bad_prefixes_are_refused_before_any_call() -> None:
    """Wrong types (through the API and past it, on the raw channel) and sizes over the limits
    (the prefix counts in each prompt's size and once in the batch's) raise inside the cell."""
    attacks = {
        "api_not_str": "llm_query_many(['a'], prefix=5)",
        "raw_not_str": "w.call_host('llm_query_many', prompts=['a'], prefix=['x'])",
        "raw_map": "w.call_host('llm_query_many', prompts=['a'], prefix={'provider': 'openai'})",
        "too_long": "llm_query_many(['a'], prefix='p' * 101)",
        "with_prompt": "llm_query_many(['a' * 50], prefix='p' * 60)",
        "batch": "llm_query_many(['a' * 30, 'b' * 30], prefix='p' * 50)",
    }
    code = RAW + "out = {}\n"
    for name, call in attacks.items():
        code += f"try:\n    {call}\n    out[{name!r}] = 'accepted'\n"
        code += f"except Exception as e:\n    out[{name!r}] = (type(e).__name__, str(e))\n"
    code += "print(out)\nFINAL(repr(out))"
    sub = ScriptedModel(lambda r: "x", name="sub")
    limits = BridgeLimits(max_prompt_chars=100, max_batch_chars=100)
    async with RLM(root=turn_script([code]), sub=sub, bridge_limits=limits) as rlm:
        result = await rlm.run("doc", "q?")
    out = eval(result.answer)  # the cell's own repr of a dict of str tuples
    assert out["api_not_str"] == ("TypeError", "prefix must be a string, not int")
    assert out["raw_not_str"] == ("SandboxRequestError", "prefix must be a string, not list")
    assert out["raw_map"][0] == "SandboxRequestError"
    assert out["too_long"][0] == "SandboxRequestError" and "the prefix has 101 characters" in out["too_long"][1]
    assert out["with_prompt"][0] == "SandboxRequestError" and "with the prefix's 60" in out["with_prompt"][1]
    assert out["batch"][0] == "SandboxRequestError" and "110 characters" in out["batch"][1]
    assert sub.requests == []


def test_the_system_prompt_documents_prefix() -> None:
    from rlmflow.prompts import SYSTEM_PROMPT

    assert "prefix=" in SYSTEM_PROMPT

