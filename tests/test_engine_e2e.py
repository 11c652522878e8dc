"""End to end through the public API with a scripted root over a generated 5 MB document."""

from __future__ import annotations

import random
import re

import pytest

from rlmflow import RLM, ModelRequest, ScriptedModel, Usage
from rlmflow.models.base import estimate_tokens

from .helpers import turn_script

pytestmark = pytest.mark.anyio

CHUNKS = 60
CHUNK = 90_000


def make_document() -> tuple[str, dict[int, int]]:
    """Sixty 90 kB sections; some hold 'ledger entry: N coins'. Returns text and the planted amounts."""
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "lantern", "harbor"]
    sections, planted = [], {}
    for index in range(CHUNKS):
        body = " ".join(rng.choice(words) for _ in range(CHUNK // 6))
        if index % 3 == 0:
            planted[index] = index * 10 + 1
            middle = len(body) // 2
            body = body[:middle] + f" ledger entry: {planted[index]} coins " + body[middle:]
        sections.append(f"=== SECTION {index} ===\n" + body[:CHUNK])
    return "\n".join(sections), planted


async def test_search_fan_out_aggregate_final() -> None:
    document, planted = make_document()
    assert len(document) >= 5_000_000
    cells = [
        "import re\nstarts = [m.start() for m in re.finditer(r'=== SECTION \\d+ ===', context)]\nprint(len(starts))",
        "chunks = [context[s:e] for s, e in zip(starts, starts[1:] + [len(context)])]\n"
        "answers = llm_query_many([f'Find the ledger entry. {c}' for c in chunks])\n"
        "print(len(answers))",
        "total = sum(int(a) for a in answers)\nFINAL(f'total={total}')",
    ]
    root = turn_script(cells)

    def sub_reply(request: ModelRequest) -> str:
        found = re.search(r"ledger entry: (\d+) coins", request.messages[-1].content)
        return found.group(1) if found else "0"

    sub = ScriptedModel(sub_reply, name="sub")
    async with RLM(root=root, sub=sub) as rlm:
        result = await rlm.run(document, "What is the sum of all ledger entries?")

    assert result.answer == f"total={sum(planted.values())}"
    assert result.turns == 3
    # exactly one sub-call per section, each on its own section, submitted in order
    assert len(sub.requests) == CHUNKS
    sections = [int(re.search(r"=== SECTION (\d+) ===", r.messages[-1].content).group(1)) for r in sub.requests]
    assert sections == list(range(CHUNKS))
    # per-call usage is each call's own, not the batch's last
    sub_calls = [c for c in result.calls if c.model == "sub"]
    assert len(sub_calls) == CHUNKS
    expected_inputs = sorted(estimate_tokens(r.messages[-1].content) for r in sub.requests)
    assert sorted(c.input_tokens for c in sub_calls) == expected_inputs
    assert result.usage["sub"] == Usage(
        sum(expected_inputs), sum(c.output_tokens for c in sub_calls), CHUNKS
    )
    assert result.usage["root"].calls == 3
    # the root saw metadata only: no 10 kB stretch of the body reached it
    probe = document[2_000_000:2_000_200]
    for request in root.requests:
        text = "".join(m.content for m in request.messages)
        assert probe not in text
        assert len(text) < 40_000
    assert result.spent.calls == CHUNKS + 3


async def test_context_metadata_for_dict_and_list() -> None:
    seen: list[str] = []

    def root_reply(request: ModelRequest) -> str:
        seen.append(request.messages[1].content)
        return "```repl\nFINAL(str(sorted(context)) if isinstance(context, dict) else str(len(context)))\n```"

    async with RLM(root=ScriptedModel(root_reply)) as rlm:
        named = await rlm.run({"a.txt": "x" * 10, "b.txt": "y" * 20}, "names?")
        listed = await rlm.run(["one", "two", "three"], "how many?")
    assert named.answer == "['a.txt', 'b.txt']"
    assert listed.answer == "3"
    assert "'b.txt': 20 characters" in seen[0]
    assert "list of 3 documents" in seen[1]
