"""The real embedded model (Qwen2.5-Coder-0.5B via llama.cpp) as the sub-model of a run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from rlmflow import RLM, LocalModel, Message, ModelRequest

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


async def test_cancelling_a_call_stops_generation_and_frees_the_model(local_model: LocalModel) -> None:
    """A cancelled call returns at once and stops llama.cpp at its next token; the model then
    serves the next call (one generation at a time: a stuck one would block it)."""
    await local_model.load()
    llama = local_model._llama
    generate = llama.create_chat_completion
    written: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:  # what llama.cpp returns, even to an abandoned call
        out = generate(*args, **kwargs)
        written.append(out["usage"]["completion_tokens"])
        return out

    llama.create_chat_completion = counting
    try:
        long_job = ModelRequest.from_prompt("Count from 1 to 5000, one number per line.", max_tokens=2000)
        with anyio.move_on_after(0.5) as scope:
            await local_model.request(long_job)
        assert scope.cancelled_caught
        reply = await local_model.request(ModelRequest.from_prompt("Say OK.", max_tokens=4))
    finally:
        del llama.create_chat_completion
    assert reply.text.strip() and reply.usage.output_tokens <= 4
    # counted in tokens, not seconds (a busy machine is slower, never wrong): left to run, the job
    # fills its 2000 tokens; stopped at its next token, it wrote what 0.5 s allows
    cancelled, answered = written
    assert cancelled < 500 and answered <= 4


async def test_choices_are_scored_by_the_model_not_written(local_model: LocalModel) -> None:
    """A request with ``choices`` comes back as each choice's probability as the reply's
    continuation (after the opening the last assistant message writes); nothing is generated."""
    opening = (Message("system", "You answer geography questions in one word."),
               Message("user", "What is the capital of France?"), Message("assistant", "The capital of France is"))
    choices = (" Paris", " Berlin", " a small village in Peru")
    reply = await local_model.request(ModelRequest(messages=opening, choices=choices, max_tokens=16))
    scores = json.loads(reply.text)
    assert set(scores) == set(choices) and sum(scores.values()) == pytest.approx(1, abs=1e-3)
    assert scores[" Paris"] > 0.9 and scores[" Berlin"] > scores[" a small village in Peru"]
    # the choices' own tokens after the prompt's (the longest choice is several tokens long)
    assert reply.usage.input_tokens > 20 and reply.usage.output_tokens >= 6 and reply.finish_reason == "stop"
    # choices of several tokens, in either order: each is scored on its own, after the prompt alone
    longer = (" Paris, on the Seine.", " Paris, in Texas.", " Lyon, on the Rhone.")
    forward = json.loads((await local_model.request(ModelRequest(messages=opening, choices=longer))).text)
    backward = json.loads((await local_model.request(ModelRequest(messages=opening, choices=longer[::-1]))).text)
    assert forward == pytest.approx(backward, abs=1e-3)
    assert forward[" Paris, on the Seine."] > forward[" Paris, in Texas."]


async def test_scoring_choices_leaves_the_next_reply_as_it_was(local_model: LocalModel) -> None:
    """Scoring reuses and moves llama.cpp's cache of the prompt; the next generation must not read
    what the scoring left there."""
    ask = ModelRequest.from_prompt("Write the word hello three times, separated by commas.", max_tokens=12)
    before = (await local_model.request(ask)).text
    scored = ModelRequest(messages=(*ask.messages, Message("assistant", "hello,")), choices=(" hello", " world"))
    assert json.loads((await local_model.request(scored)).text)[" hello"] > 0.5
    assert (await local_model.request(ask)).text == before


async def test_choices_beyond_the_window_are_a_context_overflow(local_model: LocalModel) -> None:
    from rlmflow import ContextOverflowError

    with pytest.raises(ContextOverflowError):
        await local_model.request(ModelRequest(messages=(Message("user", "word " * 5000),), choices=("a", "b")))
