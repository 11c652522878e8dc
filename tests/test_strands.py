"""Strands Agents three ways: a strands Model as ours, ours as a strands Model, a strands Agent as root."""

from __future__ import annotations

import json
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from strands import Agent
from strands.models.model import Model
from strands.types.content import Messages
from strands.types.streaming import StreamEvent

from rlmflow import (
    RLM,
    Budget,
    BudgetExceededError,
    BudgetLedger,
    Dispatcher,
    ModelRequest,
    NoAnswerError,
    RetryPolicy,
    ScriptedModel,
    ThrottledError,
)
from rlmflow.models.strands import DispatchedModel, StrandsModel

from .fakes.fake_bedrock import FakeBedrockServer
from .fakes.fake_openai import answer_for
from .helpers import turn_script

pytestmark = pytest.mark.anyio

CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.fixture
async def bedrock(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeBedrockServer]:
    async with FakeBedrockServer() as fake:
        for name, value in fake.credentials_env().items():
            monkeypatch.setenv(name, value)
        yield fake


def strands_bedrock(server: FakeBedrockServer) -> Model:
    from botocore.config import Config
    from strands.models.bedrock import BedrockModel

    return BedrockModel(model_id=CLAUDE, region_name="us-east-1", endpoint_url=server.base_url,
                        boto_client_config=Config(retries={"total_max_attempts": 1}))


# -- (a) a strands Model as an rlmflow LanguageModel ---------------------------------------------------
async def test_strands_bedrock_model_as_sub_model(bedrock: FakeBedrockServer) -> None:
    sub = StrandsModel(strands_bedrock(bedrock))
    assert (sub.provider, sub.name) == ("aws.bedrock", CLAUDE)
    root = turn_script([
        "answers = llm_query_many(['first question', 'second question'])\nprint(answers)",
        "FINAL(' | '.join(answers))",
    ])
    async with RLM(root=root, sub=sub, dispatcher=Dispatcher()) as rlm:
        result = await rlm.run("a document", "what?")
    assert result.answer == f"{answer_for('first question')} | {answer_for('second question')}"
    sub_calls = [c for c in result.calls if c.role == "sub"]
    assert len(sub_calls) == 2 and all(c.output_tokens == 8 and c.cost_usd for c in sub_calls)
    assert bedrock.bad_signatures == 0 and len(bedrock.requests_seen) == 2  # ConverseStream, signed by boto3


async def test_strands_throttle_is_ours(bedrock: FakeBedrockServer) -> None:
    sub = StrandsModel(strands_bedrock(bedrock))
    with pytest.raises(ThrottledError):
        await sub.request(ModelRequest.from_prompt("[[throttle]] hi"))


# -- (b) an rlmflow model as a strands Model, governed by the Dispatcher --------------------------------
async def test_rlmflow_model_inside_a_strands_agent_is_governed() -> None:
    flaky = ScriptedModel([ThrottledError("slow down"), "the answer is 42"], name="flaky")
    records: list[Any] = []
    dispatcher = Dispatcher(retry=RetryPolicy(base_delay=0.001, max_delay=0.01))
    model = DispatchedModel(flaky, dispatcher=dispatcher, record=records.append, max_tokens=64)
    agent = Agent(model=model, callback_handler=None, retry_strategy=None)
    result = await agent.invoke_async("what is the answer?")
    assert "the answer is 42" in str(result)
    assert len(records) == 1 and (records[0].attempts, records[0].throttles) == (2, 1)  # the Dispatcher retried
    assert flaky.requests[-1].messages[-1].content == "what is the answer?"

    capped = DispatchedModel(ScriptedModel(["never"]), dispatcher=dispatcher,
                             ledger=BudgetLedger(Budget(max_calls=0)))
    with pytest.raises(BudgetExceededError):
        await Agent(model=capped, callback_handler=None, retry_strategy=None).invoke_async("hi")


# -- (c) a strands Agent as the root -------------------------------------------------------------------
REPORTS = 24


def make_reports() -> tuple[str, int]:
    rng = random.Random(3)
    words = ["market", "quarter", "supply", "margin", "region", "forecast", "volume"]
    parts, total = [], 0
    for index in range(REPORTS):
        revenue = rng.randint(10, 999)
        total += revenue
        body = " ".join(rng.choice(words) for _ in range(400))
        parts.append(f"=== REPORT {index} ===\n{body}\nRevenue: {revenue} units.\n{body[:300]}")
    return "\n".join(parts), total


CELLS = [
    "import re\nstarts = [m.start() for m in re.finditer(r'=== REPORT \\d+ ===', context)]\nprint(len(starts))",
    "chunks = [context[s:e] for s, e in zip(starts, starts[1:] + [len(context)])]\n"
    "answers = llm_query_many([f'What revenue does this report state? {c}' for c in chunks])\nprint(answers[:3])",
    "total = sum(int(a) for a in answers)\nFINAL(f'total={total}')",
]


def revenue_sub() -> ScriptedModel:
    def reply(request: ModelRequest) -> str:
        found = re.search(r"Revenue: (\d+) units", request.messages[-1].content)
        return found.group(1) if found else "0"

    return ScriptedModel(reply, name="analyst")


class ScriptedToolModel(Model):
    """A strands Model that calls execute_python with CELLS[k] on its k-th turn (k = tool results seen)."""

    def __init__(self) -> None:
        self.calls = 0

    def update_config(self, **model_config: Any) -> None:
        return None

    def get_config(self) -> dict[str, Any]:
        return {"model_id": "scripted-strands"}

    async def structured_output(self, *args: Any, **kwargs: Any) -> AsyncGenerator[dict[str, Any], None]:
        raise NotImplementedError
        yield {}

    async def stream(self, messages: Messages, *args: Any, **kwargs: Any) -> AsyncGenerator[StreamEvent, None]:
        self.calls += 1
        turn = sum(1 for m in messages for block in m["content"] if "toolResult" in block)
        code = CELLS[min(turn, len(CELLS) - 1)]
        yield {"messageStart": {"role": "assistant"}}
        yield {"contentBlockStart": {"start": {"toolUse": {"toolUseId": f"t{turn}", "name": "execute_python"}}}}
        yield {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps({"code": code})}}}}
        yield {"contentBlockStop": {}}
        yield {"messageStop": {"stopReason": "tool_use"}}
        yield {"metadata": {"usage": {"inputTokens": 100 + turn, "outputTokens": 20, "totalTokens": 120 + turn},
                            "metrics": {"latencyMs": 1}}}


async def test_strands_root_reproduces_the_reference_flow() -> None:
    document, total = make_reports()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    root = ScriptedToolModel()
    sub = revenue_sub()
    async with RLM(root=root, sub=sub, dispatcher=Dispatcher(), tracer_provider=provider) as rlm:
        assert rlm.root_style == "strands"
        strands_result = await rlm.run(document, "What is the total revenue of all reports?")
    assert strands_result.answer == f"total={total}"
    assert strands_result.turns == 3 and root.calls == 3
    root_calls = [c for c in strands_result.calls if c.role == "root"]
    assert len(root_calls) == 3 and [c.input_tokens for c in root_calls] == [100, 101, 102]
    assert strands_result.usage["scripted-strands"].calls == 3

    spans = exporter.get_finished_spans()
    (run_span,) = [s for s in spans if s.name == "invoke_agent rlm"]
    by_id = {s.context.span_id: s for s in spans}

    def under_run(span: Any) -> bool:
        while span.parent is not None:
            if span.parent.span_id == run_span.context.span_id:
                return True
            span = by_id.get(span.parent.span_id)
            if span is None:
                return False
        return False

    # strands' own spans reach the RLM's tracer provider and nest under the run
    strands_names = {"invoke_agent rlm-root", "execute_event_loop_cycle", "execute_tool execute_python"}
    strands_spans = [s for s in spans if s.name in strands_names]
    assert {s.name for s in strands_spans} == strands_names and all(under_run(s) for s in strands_spans)
    assert sum(1 for s in spans if s.name == "rlm.turn") == 3
    assert sum(1 for s in spans if s.name.startswith("chat ") and under_run(s)) == 3 + REPORTS

    # the same question through the code root style: same answer, same sub-call accounting
    code_sub = revenue_sub()
    async with RLM(root=turn_script(CELLS), sub=code_sub, dispatcher=Dispatcher()) as rlm:
        assert rlm.root_style == "code"
        code_result = await rlm.run(document, "What is the total revenue of all reports?")
    assert code_result.answer == strands_result.answer
    assert code_result.usage["analyst"] == strands_result.usage["analyst"]
    assert [r.messages[-1].content for r in code_sub.requests] == [r.messages[-1].content for r in sub.requests]


async def test_a_strands_root_that_never_answers_runs_out_of_turns() -> None:
    class Looping(ScriptedToolModel):
        async def stream(self, messages: Messages, *args: Any, **kwargs: Any) -> AsyncGenerator[StreamEvent, None]:
            async for event in super().stream([], *args, **kwargs):  # always the first cell
                yield event

    async with RLM(root=Looping(), sub=revenue_sub(), dispatcher=Dispatcher(), max_turns=2) as rlm:
        with pytest.raises(NoAnswerError, match="without calling FINAL") as caught:
            await rlm.run("=== REPORT 0 ===\nRevenue: 5 units.", "total?")
    assert caught.value.partial.turns == 2


def test_strands_model_strings_select_the_style() -> None:
    from rlmflow.models.strands import strands_root_model

    model = strands_root_model(f"strands:bedrock:{CLAUDE}@us-west-2")
    assert (model.provider, model.name) == ("aws.bedrock", CLAUDE)
    assert model.strands_model.get_config()["model_id"] == CLAUDE


# -- the reference architecture over the wire: strands' BedrockModel root, aioboto3 sub-calls -----------
HAIKU = "us.anthropic.claude-haiku-4-5-20251001-v1:0"


def scripted_tool_root(body: dict[str, Any]) -> dict[str, Any]:
    """The fake's root: CELLS[k] as an execute_python call, k = tool results in the conversation."""
    turn = sum(1 for m in body["messages"] for block in m["content"] if "toolResult" in block)
    return {"name": "execute_python", "input": {"code": CELLS[min(turn, len(CELLS) - 1)]}}


def revenue_reply(prompt: str) -> str:
    found = re.search(r"Revenue: (\d+) units", prompt)
    return found.group(1) if found else "0"


async def test_reference_architecture_on_the_wire(
    bedrock: FakeBedrockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", bedrock.base_url)
    bedrock.tool_reply, bedrock.reply = scripted_tool_root, revenue_reply
    document, total = make_reports()
    async with RLM(root=f"strands:bedrock:{CLAUDE}@us-east-1", sub=f"bedrock:{HAIKU}@us-east-1",
                   dispatcher=Dispatcher()) as rlm:
        result = await rlm.run(document, "What is the total revenue of all reports?")
    assert result.answer == f"total={total}" and result.turns == 3
    roots = [c for c in result.calls if c.role == "root"]
    subs = [c for c in result.calls if c.role == "sub"]
    assert len(roots) == 3 and {c.model for c in roots} == {CLAUDE}
    assert len(subs) == REPORTS and {c.model for c in subs} == {HAIKU}
    assert all(c.cost_usd for c in roots + subs)  # both priced from genai-prices
    root_requests = [b for b in bedrock.requests_seen if "toolConfig" in b]
    assert len(root_requests) == 3 and bedrock.bad_signatures == 0
    tools = root_requests[0]["toolConfig"]["tools"]
    assert [t["toolSpec"]["name"] for t in tools] == ["execute_python"]


async def test_the_cli_runs_a_strands_root(
    bedrock: FakeBedrockServer, tmp_path: Any
) -> None:
    import os
    import sys

    import anyio

    bedrock.tool_reply, bedrock.reply = scripted_tool_root, revenue_reply
    document, total = make_reports()
    path = tmp_path / "reports.txt"
    path.write_text(document)
    env = {**os.environ, "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": bedrock.base_url}
    done = await anyio.run_process(
        [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(path), "--query", "Total revenue?",
         "--root", f"strands:bedrock:{CLAUDE}@us-east-1", "--sub", f"bedrock:{HAIKU}@us-east-1"],
        env=env, check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == f"total={total}"
