"""Scoring a request's ``choices`` with a llama.cpp model: how likely it finds each, not which it would write.

A greedy reply says which choice a small model prefers, not by how much; a caller that knows the
model over-picks one choice (the 0.5B root names many aggregations a "lookup") needs the margin.
Each choice is scored as the continuation of the chat prompt: the prompt's shared tokens are
evaluated once (reusing what llama.cpp already holds of them), then each choice's own tokens one
at a time, summing their log-probabilities. Only llama-cpp-python's public API is used (its
version is pinned by the ``local`` extra).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .base import Message

__all__ = ["ChoiceScores", "chat_prompt", "score_choices"]


@dataclass(frozen=True, slots=True)
class ChoiceScores:
    """Each choice's probability (normalized over the choices), the prompt's tokens and the choices' own."""

    probabilities: dict[str, float]
    prompt_tokens: int
    choice_tokens: int


class Aborted(Exception):
    """The caller was cancelled between two evaluations."""


def chat_prompt(llama: Any, messages: Sequence[Message]) -> str:
    """The prompt text for ``messages`` in the GGUF's own chat template, ready for the reply, as
    llama.cpp's chat completion builds it; a last ``assistant`` message is left open, as the
    reply's beginning."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    written = list(messages)
    opening = written.pop().content if written and written[-1].role == "assistant" else ""
    template = llama.metadata.get("tokenizer.chat_template")
    rows: list[Any] = [{"role": m.role, "content": m.content} for m in written]
    if not template:  # a GGUF without a template: ChatML, which the embedded models use
        text = "".join(f"<|im_start|>{row['role']}\n{row['content']}<|im_end|>\n" for row in rows)
        return text + "<|im_start|>assistant\n" + opening
    eos, bos = llama.token_eos(), llama.token_bos()
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=llama.detokenize([eos], special=True).decode("utf-8", "replace") if eos != -1 else "",
        bos_token=llama.detokenize([bos], special=True).decode("utf-8", "replace") if bos != -1 else "",
    )
    return str(formatter(messages=rows).prompt) + opening


def score_choices(llama: Any, messages: Sequence[Message], choices: Sequence[str], abort: threading.Event,
                  *, window: int) -> ChoiceScores:
    """Each of ``choices`` scored as the reply to ``messages`` (see :mod:`rlmflow.models.llama_choices`).

    Raises :class:`ValueError` when the longest choice does not fit the ``window``, and
    :class:`Aborted` when ``abort`` is set between two evaluations. Call it holding the model's lock.
    """
    import llama_cpp
    import numpy as np

    prompt = chat_prompt(llama, messages)
    sequences = [llama.tokenize((prompt + choice).encode("utf-8"), add_bos=True, special=True) for choice in choices]
    longest = max(len(tokens) for tokens in sequences)
    if longest > window:
        raise ValueError(f"a prompt of {longest} tokens with its longest choice exceeds the window of {window}")
    shared = _shared_length(sequences)
    shared = min(shared, min(len(tokens) for tokens in sequences) - 1)  # each choice keeps a token of its own
    if shared < 1:
        raise ValueError("choices must continue a prompt")
    prefix = sequences[0][:shared]

    def log_probabilities() -> Any:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama.ctx, -1), shape=(llama.n_vocab(),))
        shifted = logits.astype(np.float64) - float(logits.max())
        return shifted - math.log(float(np.exp(shifted).sum()))

    # keep what llama.cpp holds of the prefix, but evaluate at least its last token: the logits
    # read next must be the prefix's own
    held = _shared_length([list(llama.input_ids[: llama.n_tokens]), prefix])
    scores: list[float] = []
    choice_tokens = 0
    try:
        llama.n_tokens = min(held, shared - 1)
        llama.eval(prefix[llama.n_tokens:])
        first = log_probabilities()
        for tokens in sequences:
            llama.n_tokens = shared
            score = float(first[tokens[shared]])
            for position in range(shared + 1, len(tokens)):
                if abort.is_set():
                    raise Aborted
                llama.eval([tokens[position - 1]])
                score += float(log_probabilities()[tokens[position]])
                choice_tokens += 1
            scores.append(score)
    finally:
        llama.reset()  # what llama.cpp holds past the prompt is a choice's: the next call starts afresh
    best = max(scores)
    weights = [math.exp(score - best) for score in scores]
    probabilities = {choice: weight / sum(weights) for choice, weight in zip(choices, weights, strict=True)}
    return ChoiceScores(probabilities, shared, choice_tokens + len(choices))


def _shared_length(sequences: Sequence[Sequence[int]]) -> int:
    shared = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        shared += 1
    return shared
