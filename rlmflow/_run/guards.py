"""What is never an answer: the question echoed back, a tool's own summary line, a literal ``FINAL(...)``.

Small roots end runs with such text: they pass a grep result's summary to ``FINAL``, copy the
question into ``FINAL("...")``, or write ``FINAL("...")`` as words that the plain-answer path
would otherwise take as they are. :func:`unwrap_final` takes the value out of a literal call;
:func:`answer_problem` says why a text is not an answer (``None`` when it may be one). Pure
functions, no I/O: the loop decides what to do with a refused answer.
"""

from __future__ import annotations

import ast
import re

__all__ = ["answer_problem", "unwrap_final"]

_FINAL_CALL = re.compile(r"^\s*(?:FINAL|Final|final)\s*\((.*)\)\s*;?\s*$", re.DOTALL)
_FINAL_OPENING = re.compile(r"^\s*(?:FINAL|Final|final)\s*\(")  # a call cut short has no closing parenthesis
# the summary lines the sandbox helpers print (rlmflow/sandbox/helpers_prelude.py): no answer has them
_TOOL_LINES = re.compile(
    r"\bmatch\(es\)|^grep\(|no match \(try one|^records\(|\brecord\(s\) in the whole context|"
    r"\bchunk\(s\), [\d,]+-[\d,]+ characters|^\d+ answer\(s\): |^Variables your code set:",
    re.IGNORECASE | re.MULTILINE,
)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def unwrap_final(text: str) -> str:
    """``FINAL("x")`` (or ``FINAL(x)``) written as text -> ``x``; any other text as it is."""
    found = _FINAL_CALL.match(text)
    if found is None:
        return text
    inner = found.group(1).strip()
    try:
        value = ast.literal_eval(inner)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return inner.strip("\"'")
    return str(value)


def answer_problem(answer: str, query: str) -> str | None:
    """Why ``answer`` cannot be the answer to ``query``, or ``None``.

    - empty (or only punctuation);
    - a literal ``FINAL(...)`` call, whole or cut short;
    - a summary line of a sandbox helper ("3 match(es) for ...", "records(...): ...");
    - the question echoed back: four words or more, every one of them from the question, and at
      least half of the question's words (a short answer made of the question's words, such as
      "blue" to "red or blue?", is fine);
    - the end of the question copied up to its question mark (a fragment of it with a number
      appended: "ever paid at once, in guilders?\": 198").
    """
    text = answer.strip()
    if not _WORD.search(text.lower()):
        return "it is empty"
    if _FINAL_OPENING.match(text):
        return "it is the text of a FINAL(...) call, not its value"
    if _TOOL_LINES.search(text):
        return "it is a tool's summary line (what grep or another helper printed), not an answer"
    words = _WORD.findall(text.lower())
    asked = _WORD.findall(query.lower())
    if len(words) >= 4 and set(words) <= set(asked) and len(words) * 2 >= len(asked):
        return "it repeats the question instead of answering it"
    ending = _question_ending(query)
    if ending is not None and ending in " ".join(text.lower().split()):
        return "it copies the end of the question (up to its question mark) instead of answering it"
    return None


def _question_ending(query: str) -> str | None:
    """The question's last four words and its question mark, as they are written ("paid at once,
    in guilders?"): an answer never copies them (a copied fragment with a number appended does)."""
    flat = " ".join(query.lower().split())
    mark = flat.rfind("?")
    if mark == -1:
        return None
    words = flat[:mark].split(" ")
    return " ".join(words[-4:]) + "?" if len(words) >= 4 else None
