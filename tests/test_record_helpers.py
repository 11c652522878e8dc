"""The sandbox's record helpers on their own: collect every record, ask about each, combine (no model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[1] / "rlmflow" / "sandbox" / "helpers_prelude.py"
_spec = importlib.util.spec_from_file_location("helpers_prelude_under_test", _PATH)
assert _spec is not None and _spec.loader is not None
prelude: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prelude)

PROSE = "FALSTAFF.\nI will pay thee the money, the payment of a knight, 40 marks.\nAnd more besides."
RECORDS = [
    "Receipt 4471. Received from the river mill, on 3 May, the sum of 90 florins, for rope.",
    "Receipt 812. Received from the east farm, on 9 June, the sum of 45 florins, for tar.",
    "Receipt 5120. Received from the river mill, on 28 October, the sum of 310 florins, for salt.",
    "Receipt 77. Received from the glassworks, on 1 April, the sum of 12 florins, for nails.",
]


def namespace(context: str, replies: Any = None) -> dict[str, Any]:
    sent: list[list[str]] = []

    def many(prompts: list[str]) -> list[str]:
        sent.append(list(prompts))
        return [replies(p) if replies else "It is. Answer: yes" for p in prompts]

    ns: dict[str, Any] = {"context": context, "llm_query_many": many, "sent": sent}
    prelude.install(ns)
    return ns


def document() -> str:
    filler = [f"Paragraph {i} of a play, with words and words." for i in range(200)]
    parts = [*filler[:10], RECORDS[0], *filler[10:90], PROSE, RECORDS[1], *filler[90:150]]
    parts += [RECORDS[2], *filler[150:199], RECORDS[3]]  # the last record at the very end
    return "\n\n".join(parts)


def test_records_collects_every_record_of_the_whole_context_in_order() -> None:
    found = namespace(document())["records"]("receipt")
    assert list(found) == RECORDS
    assert found.labelled
    assert "4 record(s) in the whole context" in repr(found)


def test_prose_that_mentions_the_word_is_not_a_record_when_records_share_a_label() -> None:
    ns = namespace(document())
    assert ns["records"]("river mill") == [RECORDS[0], RECORDS[2]]  # two share the label 'receipt'
    assert PROSE not in ns["records"]("received")


def test_a_phrase_of_the_question_is_matched_loosely() -> None:
    ns = namespace("Intro.\n\nTraveller's note: a heron.\n\nMore.\n\nTraveller's note: an otter.")
    assert len(ns["records"]("travellers' notes")) == 2
    assert len(ns["records"]("Receipts of notes")) == 2  # no phrase match: its words, one at a time


def test_having_keeps_the_records_that_name_it() -> None:
    assert namespace(document())["records"]("receipt", having="River Mill") == [RECORDS[0], RECORDS[2]]


def test_numbers_take_the_amount_next_to_the_unit_not_dates_or_record_numbers() -> None:
    ns = namespace(document())
    values = ns["numbers"](ns["records"]("receipt"), unit="florins")
    assert values == [90, 45, 310, 12]
    assert ns["total"](values) == 457
    assert ns["sent"] == []  # every amount was clear: no sub-call


@pytest.mark.parametrize("record", [
    "1611-03-13,5105,Saltmarsh Tannery,payment,169,florins",  # a CSV line
    "| 5105 | 13 Mar 1611 | Saltmarsh Tannery | 169 | florins | 106 |",  # a table row
    "entry: 5105\ndate: 13 March 1611\npayer: Saltmarsh Tannery\namount: 169\ncurrency: florins\nfolio: 12",
    '{"id": 5105, "date": "1611-03-13", "payer": "Saltmarsh Tannery", "amount": 169, "unit": "florins"}',
    "Folio 12. Received of the Saltmarsh Tannery on 13 March 1611 the sum of 169 florins.",
    "Entry 5105 (1611-03-13): florins 169, from the Saltmarsh Tannery.",
])
def test_numbers_read_the_amount_of_each_record_layout_not_its_dates_or_ids(record: str) -> None:
    ns = namespace("x")
    assert ns["numbers"]([record], unit="florins") == [169]
    assert ns["sent"] == []  # read, not asked


def test_a_date_is_not_a_number() -> None:
    assert prelude._NUMBER.findall("on 1611-03-13 or 12/05, paid 40") == ["40"]


def test_rows_of_one_layout_are_records_and_prose_that_names_the_same_is_not() -> None:
    rows = [f"1611-0{i}-1{i},{5100 + i},Saltmarsh Tannery,payment,{10 * i},florins" for i in range(1, 5)]
    prose = "CLOWN.\nThe Saltmarsh Tannery, 3 miles hence, hath hides."
    found = namespace("\n\n".join(["Filler.", rows[0], prose, *rows[1:], "More filler."]))["records"](
        "Saltmarsh Tannery")
    assert list(found) == rows
    assert found.labelled


def test_a_phrase_not_in_the_text_is_the_word_whose_matches_are_records_not_the_longest_in_prose() -> None:
    # "slate delivery" is not written; "delivery" is (longer, in prose only), "slate" is in the rows
    rows = [f"1611-0{i}-1{i},{7400 + i},old Jessop,slate,{20 + i} loads" for i in range(1, 5)]
    prose = ["CLARENCE.\nHe swore he would labour my delivery.", "I make a broken delivery of the business."]
    found = namespace("\n\n".join(["Filler.", prose[0], *rows[:2], prose[1], *rows[2:]]))["records"]("slate delivery")
    assert list(found) == rows and found.labelled
    # with no word of the phrase in records of a kind, the longest word that matches at all
    found = namespace("\n\n".join(["Filler.", *prose, "A slate roof."]))["records"]("slate delivery")
    assert list(found) == prose


def test_letters_are_records_whatever_their_greeting_and_a_speech_is_not() -> None:
    letters = [f"{greeting}, I acknowledge receipt of {10 * i} florins from Fallowby Farm on the {i}th of May. "
               "Kindly enter it at folio 12. Yours, R. Quill."
               for i, greeting in enumerate(["Dear Master Fenwick"] * 3 + ["Sir", "Good friend Tobias"], start=1)]
    speech = "FALSTAFF.\nFallowby Farm, say you? I owe them nothing."
    found = namespace("\n\n".join(["Filler.", letters[0], speech, *letters[1:]]))["records"]("Fallowby Farm")
    assert list(found) == letters


def test_unit_of_never_takes_the_records_label_that_follows_a_rows_number() -> None:
    # the label follows the row's number across fields, in every row; the unit follows the amount in some
    rows = [f"1611-0{i}-2{i},{5200 + i},Brother Osric,payment,{30 * i},{unit}"
            for i, unit in enumerate(["florins", "guilders", "guilders", "florins", "guilders"], start=1)]
    asked = "Of all the payments Brother Osric made in guilders, which was the largest?"
    assert namespace("x")["unit_of"](rows, "dollars", asked, "Brother Osric", label="payment") == "guilders"


def test_in_unit_leaves_out_amounts_in_other_units_but_keeps_all_when_none_names_it() -> None:
    ns = namespace("x")
    rows = ["169,florins", "17,guilders", "39 florin"]
    assert ns["in_unit"](rows, "florins") == ["169,florins", "39 florin"]
    assert ns["in_unit"](rows, "marks") == rows  # the unit may be in a table's header
    assert ns["in_unit"](["40 crowns at the market", "12 marks"], "marks") == ["12 marks"]  # a whole word
    assert ns["in_unit"](rows, "") == rows


def test_unit_of_replaces_a_unit_no_record_names_by_the_questions_word_after_the_amounts() -> None:
    ns = namespace("x")
    blocks = [f"entry: {4000 + i}\ndate: {i} May 1611\npayer: Widow Agnes Pell\namount: {10 * i}\ncurrency: {unit}"
              for i, unit in enumerate(["guilders", "guilders", "marks", "guilders"], start=1)]
    question = "Sum up all of Widow Agnes Pell's payments in guilders."
    assert ns["unit_of"](blocks, "dollars", question, "Widow Agnes Pell") == "guilders"
    assert ns["unit_of"](blocks, "marks", question, "Widow Agnes Pell") == "marks"  # a record names it: kept
    assert ns["unit_of"](blocks, "", "How much did the widow pay?", "Widow Agnes Pell") == ""  # no such word
    assert ns["unit_of"](blocks, "", question, "") != "widow"  # a name before a number is never a unit
    ledger = [f"Ledger, {i} March: the east farm paid {10 * i} florins for tar." for i in range(1, 5)]
    asked = "Of all the payments by the east farm, which amount was the biggest? Answer with the number."
    assert ns["unit_of"](ledger, "dollars", asked, "east farm") == "dollars"  # "3 March: the" makes no unit of "the"


def test_numbers_ask_the_sub_model_only_about_unclear_records() -> None:
    ns = namespace("x", replies=lambda p: "It says thirty. Answer: 30")
    values = ns["numbers"](["Entry 4 on 9 May: paid 30.", "Paid 12 crowns."], unit="")
    assert values == [30, 12]
    assert len(ns["sent"]) == 1 and len(ns["sent"][0]) == 1


def test_ask_each_asks_about_every_record_in_one_batch_and_reads_the_answer_line() -> None:
    def reply(prompt: str) -> str:
        record = prompt.split("Record: ")[-1].splitlines()[0]
        return "About a mill. Answer: yes." if "river mill" in record else "Not that. Answer: no"

    ns = namespace(document(), replies=reply)
    found = ns["records"]("receipt")
    verdicts = ns["ask_each"](found, "Is this record about the river mill?")
    assert len(ns["sent"]) == 1 and len(ns["sent"][0]) == 4
    assert list(verdicts) == ["yes", "no", "yes", "no"]
    assert ns["count_yes"](verdicts) == 2
    assert ns["keep_yes"](found, verdicts) == [RECORDS[0], RECORDS[2]]


def test_keep_yes_refuses_lists_of_different_lengths() -> None:
    with pytest.raises(ValueError):
        prelude.keep_yes(["a", "b"], ["yes"])
