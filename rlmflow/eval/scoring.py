"""Reading the answer out of a model's reply, and scoring it.

The rules are strict on purpose, so that a hedge never scores: a reply that names two different
letters without saying which is the answer, a refusal, or an empty reply yields no answer, and
no answer is wrong. An explicit marker ("the answer is C", "Answer: (C)", ``{"answer": "C"}``)
beats letters elsewhere in the text; of several markers the last one wins ("... actually, the
answer is D"). A reply that repeats one choice's text and no letter is read as that choice.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

__all__ = ["extract_choice", "extract_value", "is_refusal", "score"]

_REFUSAL = re.compile(
    r"(?i)\b(?:i\s+(?:can(?:no|')t|could\s*n[o']t|am\s+(?:not\s+able|unable)|do\s*n[o']t\s+know)|"
    r"unable\s+to\s+(?:determine|find|answer)|cannot\s+(?:be\s+)?(?:determined|determine|answer|find)|"
    r"not\s+(?:enough|sufficient)\s+information|no\s+answer|insufficient\s+information|"
    r"(?:is|was)\s+not\s+(?:found|mentioned|stated|given)|unknown)\b"
)
_MARKER = re.compile(
    r"(?i:answer|choice|option|final)(?i:\s*(?:is|would\s+be|should\s+be))?\s*[:=]?\s*"
    r"[\"'*(\[{]*\s*([A-Z])(?!\w)"
)
_JSON_ANSWER = re.compile(r"(?i)[\"']answer[\"']\s*:\s*[\"']\s*\(?([A-Z])\)?\s*[\"']")
# a letter standing alone: "B", "(B)", "**B**", "B.", "B)"
_LONE = re.compile(r"(?<![\w'])\(?\*{0,2}([A-Z])\*{0,2}\)?(?![\w'])")
# "A good point": the article, not choice A ("A or B" and "A is right" still name the choice)
_ARTICLE = re.compile(r"\s+(?!(?:or|and|is|was|nor|vs|because|seems|since|but|fits)\b)[a-z]")


def is_refusal(reply: str) -> bool:
    """Whether the reply declines to answer ("I cannot determine...", "not enough information")."""
    return bool(_REFUSAL.search(reply))


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[`*_\"'“”‘’]", "", text)
    text = re.sub(r"[^\w.%/-]+", " ", text)
    text = re.sub(r"(?<!\d)[.](?!\d)", " ", text)  # sentence dots, not decimal points or file names
    text = re.sub(r"\b(?:the|a|an)\b", " ", text)
    return " ".join(text.split())


def extract_choice(reply: str, choices: Mapping[str, str]) -> str | None:
    """The letter a reply chooses among ``choices`` ({letter: text}), or ``None`` if it chooses none."""
    letters = set(choices)
    text = reply.strip()
    if not text:
        return None
    found = [m.group(1).upper() for m in _JSON_ANSWER.finditer(text)]
    found += [m.group(1).upper() for m in _MARKER.finditer(text)]
    found = [letter for letter in found if letter in letters]
    if found:
        return found[-1]
    lone = {
        m.group(1) for m in _LONE.finditer(text)
        if not (m.group(1) == "A" and m.end() == m.start() + 1 and _ARTICLE.match(text, m.end()))
    } & letters
    if len(lone) == 1:
        return lone.pop()
    if lone:
        return None  # two letters and no marker: a hedge
    normal = _normalise(text)
    matching = [letter for letter, option in choices.items() if _normalise(option) and _normalise(option) in normal]
    if len(matching) == 1 and not is_refusal(text):
        return matching[0]
    return None


_VALUE_MARKER = re.compile(r"(?i)(?:final\s+answer|answer|result|total)\s*(?:is|:|=)\s*")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_value(reply: str) -> str | None:
    """The value a free-form reply gives: what follows the last "answer is"/"Answer:" marker, else
    the whole reply, without quotes or a trailing full stop; ``None`` for an empty reply or a refusal."""
    text = reply.strip()
    if not text or is_refusal(text):
        return None
    markers = list(_VALUE_MARKER.finditer(text))
    if markers:
        text = text[markers[-1].end():]
    text = text.strip().strip("`*\"' ").rstrip(".").strip()
    return text or None


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def _value_correct(value: str, expected: str) -> bool:
    expected_number = _number(expected.strip())
    if expected_number is not None:
        numbers = {_number(n) for n in _NUMBER.findall(value)}
        numbers.discard(None)
        return numbers == {expected_number}  # every number given is the right one: no hedging
    want, got = _normalise(expected), _normalise(value)
    if not want or len(got) > max(200, 5 * len(want)):
        return False  # a long dump that happens to contain the answer is not an answer
    return re.search(rf"(?<![\w]){re.escape(want)}(?![\w])", got) is not None


def score(reply: str | None, expected: str, choices: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """``(extracted answer, correct)`` of a reply. Multiple-choice when ``choices`` is given."""
    if reply is None:
        return None, False
    if choices:
        letter = extract_choice(reply, choices)
        return letter, letter is not None and letter == expected.strip().upper()
    value = extract_value(reply)
    return value, value is not None and _value_correct(value, expected)
