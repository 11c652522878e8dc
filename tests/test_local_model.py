"""The real embedded model (Qwen2.5-Coder-0.5B via llama.cpp) as the sub-model of a run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from rlmflow import RLM, LocalModel, ModelRequest

from .helpers import turn_script

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DOCUMENT = Path(__file__).parents[1] / "examples" / "data" / "shakespeare_plays.txt"


@pytest.fixture(scope="module")
def local_model() -> Iterator[LocalModel]:
    pytest.importorskip("llama_cpp", reason="the 'local' extra is installed by scripts/install.sh")
    model = LocalModel("qwen2.5-coder-0.5b", context_window=4096)
    yield model
    anyio.run(model.aclose)


async def test_embedded_model_reads_chunks_found_by_search(local_model: LocalModel) -> None:
    text = DOCUMENT.read_text(encoding="utf-8")
    cells = [
        "import re\nhits = [m.start() for m in re.finditer(r'strongbox', context)]\n"
        "decoys = [context.find('Enter Hamlet'), context.find('Exit Prospero')]\nprint(len(hits))",
        "snippets = [context[max(0, i - 600): i + 600] for i in hits + decoys]\n"
        "answers = llm_query_many([s + '\\n\\nQuestion: Where was the strongbox hidden? Answer briefly.' "
        "for s in snippets])\nprint(answers)",
        "FINAL(answers[0])",
    ]
    async with RLM(root=turn_script(cells), sub=local_model, sub_max_tokens=48) as rlm:
        result = await rlm.run(text, "Where was the company's strongbox hidden?")
    assert "trapdoor" in result.answer.lower()
    sub_calls = [c for c in result.calls if c.model == "qwen2.5-coder-0.5b"]
    assert len(sub_calls) == 3 and all(c.error is None for c in sub_calls)
    assert all(c.input_tokens > 100 and 0 < c.output_tokens <= 48 for c in sub_calls)


async def test_prompt_larger_than_the_window_is_a_context_overflow(local_model: LocalModel) -> None:
    from rlmflow import ContextOverflowError

    with pytest.raises(ContextOverflowError) as caught:
        await local_model.request(ModelRequest.from_prompt("word " * 5000, max_tokens=16))
    assert caught.value.context_window == 4096
