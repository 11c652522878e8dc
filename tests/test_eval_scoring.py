"""Answer extraction on tricky replies; a refusal, a hedge or no answer is wrong."""

from __future__ import annotations

import pytest

from rlmflow.eval import extract_choice, extract_value, is_refusal, score

CHOICES = {"A": "7%", "B": "6%", "C": "5%", "D": "4%"}


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("D", "D"),
        ("d", None),  # a lowercase letter alone is not a choice
        ("(C)", "C"),
        ("**B**", "B"),
        ("The answer is (C).", "C"),
        ("Answer: D", "D"),
        ("answer:B", "B"),
        ('{"answer": "b"}', "B"),
        ("Final answer: A", "A"),
        ("The correct option is B because the ratio rises.", "B"),
        ("A careful reading of the report shows the answer is C.", "C"),
        ("A careful reading of the report supports D.", "D"),
        ("The answer is B. Wait, re-checking the totals, the answer is D.", "D"),
        ("It is either A or B.", None),  # a hedge
        ("B or C, hard to say", None),
        ("I cannot determine the answer from the document.", None),
        ("", None),
        ("   \n", None),
        ("4%", "D"),  # the choice's text, no letter
        ("The increase must be 4%.", "D"),
        ("Choice E", None),  # not a choice
        ("FINAL('C')", "C"),
        ("I think it is (B), not the others.", "B"),
        ("A is right.", "A"),
    ],
)
def test_extract_choice(reply: str, letter: str | None) -> None:
    assert extract_choice(reply, CHOICES) == letter


@pytest.mark.parametrize(
    ("reply", "expected", "correct"),
    [
        ("4817", "4817", True),
        ("The combination is 4817.", "4817", True),
        ("Answer: 4,817", "4817", True),
        ("4817 or 2290", "4817", False),  # two numbers: a hedge
        ("I could not find it", "4817", False),
        ("The total is 1,234 bushels.", "1234", True),
        ("1234.0", "1234", True),
        ("12345", "1234", False),
        ("Thomas Vincent", "Thomas Vincent", True),
        ("The key was left with the gatekeeper, Thomas Vincent.", "Thomas Vincent", True),
        ("Thomas Vincentson", "Thomas Vincent", False),
        ("'utf-8'", "'utf-8'", True),
        ("The default is `None`.", "None", True),
        ("Nonetheless unsure", "None", False),
        ("The answer is True", "True", True),
        ("x " * 400 + "Thomas Vincent", "Thomas Vincent", False),  # a dump, not an answer
        ("", "4817", False),
        ("Unknown", "4817", False),
    ],
)
def test_score_values(reply: str, expected: str, correct: bool) -> None:
    assert score(reply, expected)[1] is correct


def test_score_choices_and_none() -> None:
    assert score("The answer is D", "D", CHOICES) == ("D", True)
    assert score("The answer is C", "D", CHOICES) == ("C", False)
    assert score(None, "D", CHOICES) == (None, False)
    assert score("not sure", "D", CHOICES) == (None, False)


def test_refusals_and_values() -> None:
    assert is_refusal("There is not enough information in the text.")
    assert is_refusal("I am unable to find the ledger")
    assert not is_refusal("The key is under the mat")
    assert extract_value("Final answer: 42.") == "42"
    assert extract_value("I don't know") is None
    assert extract_value("  ") is None
