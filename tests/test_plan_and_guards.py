"""The plan turn and the answer guards: the form, its programs, and what is never an answer (no model)."""

from __future__ import annotations

import json
import re

import pytest

from rlmflow import RLM, ModelRequest, ScriptedModel
from rlmflow._run.guards import answer_problem, unwrap_final
from rlmflow._run.plan import (
    COMBINE_SCHEMA,
    KINDS,
    LOOKUP_AND_ONE_SURE,
    LOOKUP_SURE,
    SOURCES,
    Plan,
    kind_request,
    make_plan,
    offers_options,
    parse_combine,
    parse_plan,
    parse_scores,
    plan_request,
    render,
    settle,
    source_request,
)

from .helpers import turn_script

pytestmark = pytest.mark.anyio

QUERY = "How many of the harbour master's notes report a storm?"


def test_parse_plan_reads_the_form_and_refuses_what_is_not_one() -> None:
    form = {"kind": "total", "records": "receipt", "about": "the river mill", "unit": "florins"}
    assert parse_plan("Here: " + json.dumps(form)) == Plan("total", "receipt", "the river mill", "florins")
    assert parse_plan('{"kind": "guess", "records": "x"}') is None
    assert parse_plan('{"kind": "count", "records": ""}') is None
    assert parse_plan("no form at all") is None
    assert parse_plan('{"kind": "count", "records": "payment", "about": "", "unit": "crowns"}') == Plan(
        "total", "payment", "", "crowns")  # a count has no unit: amounts are added
    counted = '{"kind": "count", "records": "shipment", "about": "Antwerp", "unit": "tons"}'
    assert parse_plan(counted, "How many tons went to Antwerp?") == Plan("total", "shipment", "Antwerp", "tons")
    # a unit the question does not name is the root's own: the count stands
    assert parse_plan(counted, "What is the number of shipments that went to Antwerp?") == Plan(
        "count", "shipment", "Antwerp", "tons")
    assert parse_plan(counted.replace("tons", "crowns"), "How many crowns did Antwerp pay?").kind == "total"


def test_parse_combine_names_a_kind_or_none() -> None:
    assert parse_combine('{"combine": "max"}') == "largest"
    assert parse_combine(' {"combine": "add"} ') == "total"
    assert parse_combine('{"combine": "min"}') == "smallest"
    assert parse_combine('{"combine": "count"}') == "count"
    assert parse_combine('{"combine": "median"}') is None
    assert parse_combine('{"kind": "total", "records": "x"}') is None
    assert parse_combine("max") is None


@pytest.mark.parametrize(("kind", "combined", "settled"), [
    ("total", "largest", "largest"),  # one biggest amount wins over the form's total
    ("total", "smallest", "smallest"),
    ("count", "largest", "largest"),
    ("largest", "total", "total"),  # adding wins over the form's largest
    ("total", "count", "total"),  # a narrow "count" is not trusted over amounts
    ("count", "total", "total"),  # "add" over a count that names a unit the question does not
    ("lookup", "largest", "lookup"),  # a lookup is never changed
    ("largest", None, "largest"),
])
def test_settle_keeps_the_kind_each_answer_is_trusted_for(kind: str, combined: str | None, settled: str) -> None:
    form = Plan(kind, "payment", "the mill", "crowns")
    assert settle(form, combined) == Plan(settled, "payment", "the mill", "crowns")


def test_a_narrow_add_leaves_a_count_without_a_unit_to_the_document() -> None:
    assert settle(Plan("count", "delivery", "slate"), "total") == Plan("count", "delivery", "slate", or_total=True)
    assert settle(Plan("count", "delivery", "slate"), "count") == Plan("count", "delivery", "slate")


@pytest.mark.parametrize(("question", "answer"), [
    # the form put the unit in the records' label; the records write amounts before "florins"
    ("How many florins did the river mill hand over altogether?", "500"),
    # no word of the question follows the records' amounts: they are counted
    ("How many receipts name the river mill?", "3"),
])
async def test_a_count_the_narrow_question_adds_is_a_total_only_if_the_records_state_the_questions_unit(
        question: str, answer: str) -> None:
    form = {"kind": "count", "records": "receipt", "about": "river mill", "unit": ""}
    async with RLM(root=plan_root(form, combine="add"), sub=ScriptedModel(judge), plan_first=True) as rlm:
        result = await rlm.run(RECEIPTS, question)
    assert (result.answer, result.turns) == (answer, 1)


def test_a_lookup_plan_is_a_first_search() -> None:
    assert render(Plan("lookup", "strongbox")) == "print(grep('strongbox'))"


RECEIPTS = "\n\n".join([
    "A paragraph of a play that mentions the river mill and a payment of 5 marks.",
    "Receipt 4471. Received from the river mill, on 3 May, the sum of 90 florins, for rope.",
    "Filler text.",
    "Receipt 812. Received from the east farm, on 9 June, the sum of 45 florins, for tar.",
    "Receipt 5120. Received from the river mill, on 28 October, the sum of 310 florins, for salt.",
    "More filler.",
    "Receipt 77. Received from the glassworks, on 1 April, the sum of 12 florins, for nails.",
    "Receipt 78. Received from the river mill, on 2 April, the sum of 100 florins, for wool.",
])
# a CSV file's lines scattered through prose, in another unit too; the form's label ("coat") matches prose only
LEDGER_LINES = "\n\n".join([
    "CLOWN.\nIf this be a horseman's coat, it hath seen hot service; the Saltmarsh Tannery knows it.",
    "1611-03-13,5105,Saltmarsh Tannery,payment,169,florins",
    "Filler text.",
    "1611-02-11,3557,Saltmarsh Tannery,payment,39,florins",
    "1611-03-23,1455,Saltmarsh Tannery,payment,17,guilders",
    "1611-04-02,2201,Ravensholt Mill,payment,98,florins",
    "LEONTES.\nIn my green velvet coat, my dagger muzzled.",
    "1611-08-15,1164,Saltmarsh Tannery,payment,351,florins",
])
NOTES = "\n\n".join([
    "Harbour master's note, 3 May: a gale tore the sails.",
    "Prose.",
    "Harbour master's note, 4 May: calm water all day.",
    "Harbour master's note, 5 May: thunder and high seas.",
])


def plan_root(form: dict[str, str], then: str = "FINAL('fallback')", combine: str = "",
              lookup: float | None = None, one: float = 1.0) -> ScriptedModel:
    """A root that fills the form on its plan call, answers ``combine`` (none when empty) when asked
    how amounts combine, and writes ``then`` on later turns. With ``lookup``, it scores choices: it
    gives "lookup" that probability in the form (the rest to a count, then a total), and ``one`` to
    "one" fact as the answer's source (the rest to a maximum)."""

    def reply(request: ModelRequest) -> str:
        if request.choices:
            assert lookup is not None, "a root that does not score choices was asked to"
            if tuple(request.choices) == SOURCES:
                return json.dumps({"one": one, "count": 0, "add": 0, "max": 1 - one, "min": 0})
            rest = 1 - lookup
            return json.dumps({"lookup": lookup, "count": rest * 0.6, "total": rest * 0.4, "largest": 0, "smallest": 0})
        if request.json_schema == COMBINE_SCHEMA:
            return json.dumps({"combine": combine}) if combine else "{}"
        if request.json_schema is not None:
            return json.dumps(form)
        return f"```repl\n{then}\n```"

    return ScriptedModel(reply, name="root", scores_choices=lookup is not None)


def judge(request: ModelRequest) -> str:
    record = request.messages[-1].content.split("Record: ")[-1].splitlines()[0]
    if "the amount" in request.messages[-1].content.splitlines()[-1]:
        amount = re.search(r"(\d+) florins", record)
        return f"Answer: {amount.group(1) if amount else 'none'}"
    return "Answer: yes" if "gale" in record or "thunder" in record else "Answer: no"


@pytest.mark.parametrize(("form", "context", "answer"), [
    ({"kind": "total", "records": "receipt", "about": "river mill", "unit": "florins"}, RECEIPTS, "500"),
    ({"kind": "largest", "records": "receipt", "about": "", "unit": "florins"}, RECEIPTS, "310"),
    ({"kind": "smallest", "records": "receipt", "about": "", "unit": ""}, RECEIPTS, "12"),
    ({"kind": "count", "records": "receipt", "about": "river mill", "unit": ""}, RECEIPTS, "3"),
    # the label asked for matches prose only; the payer's name finds the labelled records
    ({"kind": "total", "records": "payment", "about": "river mill", "unit": "florins"}, RECEIPTS, "500"),
    # rows of one layout name the payer; the label matches prose; guilders are another unit
    ({"kind": "total", "records": "coat", "about": "Saltmarsh Tannery", "unit": "florins"}, LEDGER_LINES, "559"),
    ({"kind": "smallest", "records": "coat", "about": "Saltmarsh Tannery", "unit": "florins"}, LEDGER_LINES, "39"),
    ({"kind": "count", "records": "coat", "about": "Saltmarsh Tannery", "unit": ""}, LEDGER_LINES, "4"),
    # no note names "a storm": the sub-model judges each note, in one batch
    ({"kind": "count", "records": "harbour master's notes", "about": "a storm", "unit": ""}, NOTES, "2"),
])
async def test_each_kind_of_plan_answers_in_its_first_turn(form: dict[str, str], context: str, answer: str) -> None:
    async with RLM(root=plan_root(form), sub=ScriptedModel(judge), plan_first=True) as rlm:
        result = await rlm.run(context, "a question")
    assert result.answer == answer
    assert result.turns == 1


async def test_a_unit_the_question_does_not_name_gives_way_to_the_one_it_does() -> None:
    form = {"kind": "total", "records": "payment", "about": "Saltmarsh Tannery", "unit": "dollars"}
    async with RLM(root=plan_root(form), sub=ScriptedModel(judge), plan_first=True) as rlm:
        result = await rlm.run(LEDGER_LINES, "What did Saltmarsh Tannery pay altogether, in florins?")
    assert (result.answer, result.turns) == ("559", 1)


async def test_the_narrow_combine_answer_settles_a_form_that_named_total() -> None:
    form = {"kind": "total", "records": "receipt", "about": "", "unit": "florins"}
    root = plan_root(form, combine="max")
    async with RLM(root=root, sub=ScriptedModel(judge), plan_first=True) as rlm:
        result = await rlm.run(RECEIPTS, "a question")
    assert (result.answer, result.turns) == ("310", 1)
    assert [request.json_schema == COMBINE_SCHEMA for request in root.requests] == [False, True]


async def test_a_lookup_form_asks_nothing_more_before_the_loop() -> None:
    form = {"kind": "lookup", "records": "strongbox", "about": "", "unit": ""}
    root = plan_root(form, "FINAL('under the stage')", combine="max")
    async with RLM(root=root, plan_first=True) as rlm:
        result = await rlm.run(RECEIPTS, "Where was the strongbox?")
    assert result.answer == "under the stage"
    assert not any(request.json_schema == COMBINE_SCHEMA for request in root.requests)


def test_parse_scores_reads_one_probability_per_choice_or_nothing() -> None:
    scores = {"lookup": 0.55, "count": 0.3, "total": 0.1, "largest": 0.05, "smallest": 0}
    assert parse_scores(json.dumps(scores), KINDS) == {kind: float(p) for kind, p in scores.items()}
    assert parse_scores(json.dumps({**scores, "median": 0.1}), KINDS) is None
    assert parse_scores(json.dumps({**scores, "count": 1.5}), KINDS) is None
    assert parse_scores(json.dumps({**scores, "count": True}), KINDS) is None
    assert parse_scores(json.dumps({kind: 0.2 for kind in KINDS if kind != "smallest"}), KINDS) is None
    assert parse_scores(json.dumps(scores), SOURCES) is None
    # a model that does not score choices writes a form instead
    assert parse_scores('{"kind": "lookup", "records": "key", "about": "", "unit": ""}', KINDS) is None


def test_a_question_with_lettered_options_offers_options() -> None:
    assert offers_options("Which is true? (A) It rose. (B) It fell. (C) Both.")
    assert offers_options("Which is true?\nA. It rose.\nB. It fell.")
    assert not offers_options("What did (A) Smith pay?")
    assert not offers_options("What was the top price paid for a horse at the fair, in crowns?")


QUESTION = "Find the lowest fine the court handed to Martin Croy."


@pytest.mark.parametrize(("lookup", "one", "combine", "kind", "asked"), [
    (0.9, 0.9, "min", "lookup", ["form", "kinds", "source"]),  # sure both ways: the lookup stands
    (LOOKUP_SURE - 0.01, 1.0, "min", "smallest", ["form", "kinds", "source", "combine"]),  # unsure of the kind
    (0.8, LOOKUP_AND_ONE_SURE / 0.8 - 0.01, "min", "smallest", ["form", "kinds", "source", "combine"]),  # of one fact
    (0.8, LOOKUP_AND_ONE_SURE / 0.8 + 0.01, "min", "lookup", ["form", "kinds", "source"]),
    (0.3, 1.0, "", "count", ["form", "kinds", "source", "combine"]),  # no narrow answer: the likeliest other kind
    (None, 1.0, "min", "lookup", ["form"]),  # a root that does not score choices is not asked
])
async def test_a_doubted_lookup_is_an_aggregation_of_the_kind_the_narrow_question_names(
        lookup: float | None, one: float, combine: str, kind: str, asked: list[str]) -> None:
    root = plan_root({"kind": "lookup", "records": "fine", "about": "Martin Croy", "unit": "crowns"},
                     combine=combine, lookup=lookup, one=one)
    planned = await make_plan(root.request, QUESTION, scores_choices=root.scores_choices)
    assert planned.plan == Plan(kind, "fine", "Martin Croy", "crowns")
    assert planned.lookup_probability == lookup and planned.form is not None and planned.form.kind == "lookup"
    names = {"form": lambda r: r.json_schema is not None and r.json_schema != COMBINE_SCHEMA,
             "kinds": lambda r: tuple(r.choices) == KINDS, "source": lambda r: tuple(r.choices) == SOURCES,
             "combine": lambda r: r.json_schema == COMBINE_SCHEMA}
    assert [next(name for name, test in names.items() if test(r)) for r in root.requests] == asked


async def test_a_question_that_offers_options_stays_a_lookup_however_unsure() -> None:
    root = plan_root({"kind": "lookup", "records": "risk", "about": "", "unit": ""}, combine="max", lookup=0.1, one=0)
    asked = "Which risk does the report rank largest? (A) Currency (B) Supply (C) Rates (D) Labour"
    planned = await make_plan(root.request, asked, scores_choices=True)
    assert planned.plan is not None and planned.plan.kind == "lookup" and len(root.requests) == 1


def test_the_source_request_scores_where_the_answer_comes_from() -> None:
    request = source_request(QUESTION)
    assert request.choices == SOURCES and request.messages[-1].content == '{"answer": "'
    assert request.messages[1].content == f"Question: {QUESTION}"


def test_the_kind_request_continues_the_form_prompt_up_to_the_kind() -> None:
    request = kind_request("Who holds the key?")
    assert request.choices == KINDS
    assert [m.role for m in request.messages] == ["system", "user", "assistant"]
    assert request.messages[-1].content == '{"kind": "'
    # the form's own prompt is its beginning, so llama.cpp evaluates only the opening again
    assert tuple(request.messages[:2]) == tuple(plan_request("Who holds the key?").messages)


async def test_an_unsure_lookup_form_runs_the_program_its_narrow_answer_names() -> None:
    form = {"kind": "lookup", "records": "receipt", "about": "", "unit": "florins"}
    root = plan_root(form, "FINAL('from the loop')", combine="max", lookup=0.45)
    async with RLM(root=root, sub=ScriptedModel(judge), plan_first=True) as rlm:
        result = await rlm.run(RECEIPTS, "What was the top price on any receipt, in florins?")
    assert (result.answer, result.turns) == ("310", 1)


async def test_a_sure_lookup_form_goes_to_the_free_form_loop() -> None:
    form = {"kind": "lookup", "records": "receipt", "about": "", "unit": "florins"}
    root = plan_root(form, "FINAL('from the loop')", combine="max", lookup=0.9)
    async with RLM(root=root, sub=ScriptedModel(judge), plan_first=True) as rlm:
        result = await rlm.run(RECEIPTS, "What did receipt 4471 say, in florins?")
    assert result.answer == "from the loop"
    assert not any(request.json_schema == COMBINE_SCHEMA for request in root.requests)


async def test_a_count_with_a_unit_the_question_does_not_name_is_counted() -> None:
    # the 0.5B root's form for "How frequently ...?": a count "in times"; the amounts are not added
    form = {"kind": "count", "records": "receipt", "about": "river mill", "unit": "times"}
    async with RLM(root=plan_root(form, combine="count"), sub=ScriptedModel(judge), plan_first=True) as rlm:
        result = await rlm.run(RECEIPTS, "How frequently does a receipt name the river mill?")
    assert (result.answer, result.turns) == ("3", 1)


async def test_a_plan_that_finds_no_record_goes_on_in_the_free_form_loop() -> None:
    form = {"kind": "count", "records": "invoice", "about": "", "unit": ""}
    async with RLM(root=plan_root(form, "FINAL('from the loop')"), plan_first=True) as rlm:
        result = await rlm.run(RECEIPTS, "a question")
    assert result.answer == "from the loop"
    assert result.turns == 2


@pytest.mark.parametrize(("form", "context"), [
    # the sub-model says no to every note: no record kept, so no count of 0
    ({"kind": "count", "records": "harbour master's notes", "about": "a storm", "unit": ""}, NOTES),
    # records found but no amount read in any: no total of 0
    ({"kind": "total", "records": "harbour master's notes", "about": "", "unit": "florins"},
     "\n\n".join(["Harbour master's note: calm.", "Prose.", "Harbour master's note: a gale.",
                  "Harbour master's note: fog."])),
])
async def test_a_plan_that_kept_nothing_or_read_no_amount_goes_on_in_the_free_form_loop(
        form: dict[str, str], context: str) -> None:
    no = ScriptedModel(lambda request: "It says nothing of it. Answer: no")
    async with RLM(root=plan_root(form, "FINAL('from the loop')"), sub=no, plan_first=True) as rlm:
        result = await rlm.run(context, "a question")
    assert (result.answer, result.turns) == ("from the loop", 2)


async def test_plan_first_is_off_for_other_roots_by_default() -> None:
    async with RLM(root=turn_script(["FINAL('direct')"])) as rlm:
        assert not rlm.settings.plan_first
        assert (await rlm.run("text", "q")).answer == "direct"


@pytest.mark.parametrize("answer", [
    "1 match(es) for 'text",
    "grep('storm'): 3 match(es) (first 2 shown)",
    "records('note'): 4 record(s) in the whole context",
    "Juliet's nurse speaking to in the first scene she appears in?",
    'FINAL("Verona")',
    # an unclosed call (a long value cut short): seen as an answer before, from a 0.5B root
    'Final("186: Hor.\nWhere, my lord?\n\nHam.\nIn my mind\'s eye, Horatio.',
    "  ",
])
def test_what_is_never_an_answer(answer: str) -> None:
    assert answer_problem(answer, "Who is Juliet's nurse speaking to in the first scene she appears in?")


def test_the_end_of_the_question_with_a_number_is_not_an_answer() -> None:
    question = "What is the most Saltmarsh Tannery ever paid at once, in guilders?"
    assert answer_problem('Saltmarsh Tannery ever paid at once, in guilders?": 198', question)
    assert answer_problem("Saltmarsh Tannery paid 300 guilders at once.", question) is None
    assert answer_problem("300", question) is None


@pytest.mark.parametrize("answer", ["2", "Romeo", "the nurse speaks to Lady Capulet", "blue", "a storm at sea"])
def test_real_answers_pass(answer: str) -> None:
    assert answer_problem(answer, "Who is Juliet's nurse speaking to? Is it red or blue? Was it a storm?") is None


def test_a_literal_final_call_gives_its_value() -> None:
    assert unwrap_final('FINAL("Verona")') == "Verona"
    assert unwrap_final("final(42)") == "42"
    assert unwrap_final("FINAL(the third trapdoor)") == "the third trapdoor"
    assert unwrap_final("Verona") == "Verona"


async def test_a_final_that_echoes_the_question_or_a_tool_line_is_refused_and_the_root_goes_on() -> None:
    cells = [f"FINAL({QUERY!r})", "FINAL(repr(grep('gale')))", "FINAL('2')"]
    async with RLM(root=turn_script(cells), plan_first=False) as rlm:
        result = await rlm.run(NOTES, QUERY)
    assert result.answer == "2"
    assert result.turns == 3


async def test_a_literal_final_in_words_gives_its_value_and_an_echo_in_words_is_not_taken() -> None:
    replies = iter(["```repl\nprint(grep('gale'))\n```", f'FINAL("{QUERY}")', 'FINAL("2")'])

    def reply(request: ModelRequest) -> str:
        return next(replies)

    async with RLM(root=ScriptedModel(reply), plan_first=False, max_turns=3) as rlm:
        result = await rlm.run(NOTES, QUERY)
    assert result.answer == "2"
