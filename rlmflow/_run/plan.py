"""The plan turn: a small root names the kind of question and fills a form; a template per kind does the rest.

A 0.5B-1.5B root names the kind of a question reliably (lookup, count, total, largest,
smallest), and the word that marks the records it is about, but it rarely writes the whole
aggregation itself (collect every record, ask about each, combine). So its first turn is a form
(:data:`PLAN_SCHEMA`, decoded under a grammar where the model supports one), and
:func:`render` turns the form into the program of its kind, built from the sandbox's record
helpers: ``records`` over the whole context, ``ask_each`` in one batch when a record needs
judging, ``numbers``/``total``/``count_yes`` in Python, the parts printed, and ``FINAL`` only
when some record was kept (and, for amounts, some amount read). A lookup becomes a first
``grep`` and the free-form loop goes on.

A root that scores choices (the embedded llama.cpp model) is also asked, for a lookup form, how
sure it is of that: how likely it finds each kind in the form (:func:`kind_request`), and where
the answer comes from, one fact written once or amounts of many records (:func:`source_request`).
The 0.5B root names many aggregations lookups (most of them superlatives: "the top payment", "the
most modest payment"), but it is unsure of them in one of the two ways (:func:`doubts_lookup`),
and sure of real lookups in both; a doubted lookup is an aggregation, whose kind the narrow
question names. A question that offers lettered options is answered by choosing one: it stays a
lookup.

The kind of an aggregation gets a second, narrower question (:func:`combine_request`: are the
amounts added, or is the answer the biggest or the smallest one?), because the 0.5B root, asked for
the whole form, names "total" for most questions about amounts, whichever way they combine; asked
only that, it tells them apart. The two answers are settled by :func:`settle`.

Nothing here reads the words of a particular question: the form's fields and the scores come from
the root, and the rules below are about the form (does any record name ``about``? a count with a
unit?), the scores, and the question's layout only (does it list lettered options?).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from ..models.base import Message, ModelRequest, ModelResponse
from ..sandbox.helpers_prelude import names_unit

__all__ = [
    "COMBINE_SCHEMA", "KINDS", "LOOKUP_AND_ONE_SURE", "LOOKUP_SURE", "PLAN_SCHEMA", "SOURCES", "Plan", "Planned",
    "combine_request", "doubts_lookup", "kind_request", "make_plan", "offers_options", "parse_combine", "parse_plan",
    "parse_scores", "plan_request", "render", "settle", "source_request",
]

KINDS = ("lookup", "count", "total", "largest", "smallest")

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": list(KINDS)},
        "records": {"type": "string"},
        "about": {"type": "string"},
        "unit": {"type": "string"},
    },
    "required": ["kind", "records", "about", "unit"],
}

PLAN_SYSTEM = """\
You plan how to answer a question about a long document. The document may hold many records
(notes, lines, entries, letters) scattered through it. Code will find the records and read each
one. Reply with one JSON object:
- kind: "lookup" (one fact), "count" (how many records), "total" (add up amounts), "largest" or
  "smallest" (one amount among the records).
- records: the label of the records the question is about, one or two words, e.g. "invoice",
  "inspector's report". For a lookup: the most distinctive word to search for.
- about: the name, item, place or kind of thing each record must be about to count, taken from
  the question (e.g. "copper", "Harlow Mills", "a broken lock"), or "" if every record counts.
- unit: what the amounts are counted in (e.g. "crowns", "tons"), or "" if none.

Examples:
Question: How many of the inspector's reports mention a broken lock?
{"kind": "count", "records": "inspector's report", "about": "a broken lock", "unit": ""}
Question: How many tons of copper were shipped in all, adding every cargo entry?
{"kind": "total", "records": "cargo entry", "about": "copper", "unit": "tons"}
Question: What is the sum of all the fees the Guild of Weavers paid?
{"kind": "total", "records": "fee", "about": "Guild of Weavers", "unit": ""}
Question: What was the largest single donation from the Guild of Weavers?
{"kind": "largest", "records": "donation", "about": "Guild of Weavers", "unit": ""}
Question: How many invoices were issued to Harlow Mills?
{"kind": "count", "records": "invoice", "about": "Harlow Mills", "unit": ""}
Question: According to the letters, what colour was the captain's coat?
{"kind": "lookup", "records": "coat", "about": "", "unit": ""}"""

COMBINES = {"count": "count", "add": "total", "max": "largest", "min": "smallest"}

COMBINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"combine": {"type": "string", "enum": list(COMBINES)}},
    "required": ["combine"],
}

COMBINE_SYSTEM = """\
A question asks about amounts in many records of a document. Say how the amounts are combined
into the answer. Reply with one JSON object {"combine": ...}:
- "count": no amounts: the answer is how many records there are (how many, count, number of).
- "add": all the amounts added together (a total, a sum, how much in all, altogether).
- "max": one amount, the biggest of them (largest, most, highest, maximum, top, greatest, heaviest).
- "min": one amount, the smallest of them (smallest, least, lowest, minimum, cheapest, lightest).

Examples:
Question: How much did the Guild of Weavers pay in fees altogether?
{"combine": "add"}
Question: What was the largest single donation from the Guild of Weavers?
{"combine": "max"}
Question: What is the greatest load any one cart carried?
{"combine": "max"}
Question: What is the sum of the tons of copper in every cargo entry?
{"combine": "add"}
Question: How many of the inspector's reports mention a broken lock?
{"combine": "count"}
Question: Which was the cheapest room the inn let in one night?
{"combine": "min"}"""


@dataclass(frozen=True, slots=True)
class Plan:
    """The root's form: the kind of question and the blanks of that kind's program."""

    kind: str
    records: str
    about: str = ""
    unit: str = ""
    #: a count the narrow question says adds up: its program adds the amounts instead when the
    #: records write them before a word of the question ("How many marks did ... hand over
    #: altogether?" filled in as a count of "mark" records), and counts otherwise ("letters")
    or_total: bool = False


SOURCES = ("one", "count", "add", "max", "min")

SOURCE_SYSTEM = """\
A question asks about a long document that holds many records (payments, deliveries, notes,
letters). Say where its answer comes from. Reply with one JSON object {"answer": ...}:
- "one": one fact written in one place (a name, a date, a reason, one amount stated once).
- "count": how many records there are.
- "add": the amounts of many records added together.
- "max": the biggest amount among many records (largest, most, highest, maximum, top, peak, greatest).
- "min": the smallest amount among many records (smallest, least, lowest, minimum, cheapest, most modest).

Examples:
Question: Who signed the lease of the mill?
{"answer": "one"}
Question: How much did the abbey pay the mason on 4 June?
{"answer": "one"}
Question: What was the largest single donation from the Guild of Weavers?
{"answer": "max"}
Question: How many invoices were issued to Harlow Mills?
{"answer": "count"}
Question: What did the Guild of Weavers pay in fees altogether?
{"answer": "add"}
Question: Which was the cheapest room the inn let in one night?
{"answer": "min"}"""

#: A lookup form is doubted when the root gives "lookup" less than this share in the form, or...
LOOKUP_SURE = 0.55
#: ... when that share times the share it gives "one fact" (:func:`source_request`) is below this.
#: Measured on the 0.5B root (``benchmarks/plan_kinds.py`` and 110 more questions written apart):
#: real lookups that offer no options have a product of 0.28 or more (most above 0.5), and 26 of
#: the 32 aggregations it named lookups one below 0.25 or a share below 0.55.
LOOKUP_AND_ONE_SURE = 0.25


def plan_request(query: str, *, max_tokens: int = 160, temperature: float = 0.0, note: str = "") -> ModelRequest:
    """The root call that fills the form (``note``: what went wrong with a previous form)."""
    user = f"Question: {query}" + (f"\n\n{note}" if note else "")
    return ModelRequest(
        messages=(Message("system", PLAN_SYSTEM), Message("user", user)),
        max_tokens=max_tokens, temperature=temperature, json_schema=PLAN_SCHEMA,
    )


def kind_request(query: str) -> ModelRequest:
    """The form's prompt with its reply opened up to the kind, the kinds as ``choices``: a root that
    scores choices answers how likely it finds each kind (the prompt is the form's, so llama.cpp
    evaluates only the few tokens after it again)."""
    form = plan_request(query)
    return ModelRequest(messages=(*form.messages, Message("assistant", '{"kind": "')),
                        max_tokens=16, temperature=0.0, choices=KINDS)


def source_request(query: str) -> ModelRequest:
    """Where the answer comes from (one fact, or a count, sum, maximum or minimum of records), the
    :data:`SOURCES` as ``choices``: a root that scores choices answers how likely it finds each."""
    return ModelRequest(
        messages=(Message("system", SOURCE_SYSTEM), Message("user", f"Question: {query}"),
                  Message("assistant", '{"answer": "')),
        max_tokens=16, temperature=0.0, choices=SOURCES,
    )


def parse_scores(reply: str, choices: tuple[str, ...]) -> dict[str, float] | None:
    """Each choice's probability from a reply to a request with these ``choices``, or ``None`` when
    the reply is not one object of a probability per choice (a model that does not score choices
    writes something else)."""
    data = _first_object(reply)
    if data is None or set(data) != set(choices):
        return None
    scores = {choice: data[choice] for choice in choices}
    if not all(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1 for p in scores.values()):
        return None
    return {choice: float(p) for choice, p in scores.items()}


def offers_options(question: str) -> bool:
    """Whether ``question`` lists lettered options ("(A) ... (B) ..."): it is answered by choosing one."""
    return all(re.search(rf"(?:^|\s)\(?{letter}[).]\s", question) for letter in "AB")


def doubts_lookup(kinds: dict[str, float], sources: dict[str, float] | None) -> bool:
    """Whether a root that named a question a lookup is unsure of it: "lookup" under
    :data:`LOOKUP_SURE` of the form's kinds, or its product with "one" fact under
    :data:`LOOKUP_AND_ONE_SURE`."""
    return kinds["lookup"] < LOOKUP_SURE or (
        sources is not None and kinds["lookup"] * sources["one"] < LOOKUP_AND_ONE_SURE)


@dataclass(frozen=True, slots=True)
class Planned:
    """What the plan turn settled on (``plan``; ``None``: no usable form), and how: the form
    (``reply``, ``form``), how sure the root was of a lookup (``lookup_probability`` in the form,
    ``one_probability`` of one fact; when asked) and the narrow answer (``combined``, when asked)."""

    plan: Plan | None
    reply: str
    form: Plan | None = None
    lookup_probability: float | None = None
    one_probability: float | None = None
    combined: str | None = None


async def make_plan(ask: Callable[[ModelRequest], Awaitable[ModelResponse]], query: str, *,
                    scores_choices: bool, max_tokens: int = 200) -> Planned:
    """The plan turn's calls to the root (``ask``), and the plan they settle on.

    The form first. A lookup form stands unless the root scores choices, the question offers no
    options, and the root doubts it (:func:`doubts_lookup`); then it is an aggregation, of the kind
    the narrow question names (the likeliest other kind of the form if that answer is unusable).
    Any other form's kind is settled with the narrow answer by :func:`settle`."""
    reply = (await ask(plan_request(query, max_tokens=max_tokens))).text
    form = parse_plan(reply, query)
    if form is None:
        return Planned(None, reply)
    if form.kind != "lookup":
        combined = parse_combine((await ask(combine_request(query))).text)
        return Planned(settle(form, combined), reply, form, combined=combined)
    if not scores_choices or offers_options(query):
        return Planned(form, reply, form)
    kinds = parse_scores((await ask(kind_request(query))).text, KINDS)
    sources = parse_scores((await ask(source_request(query))).text, SOURCES) if kinds is not None else None
    sure = (kinds["lookup"] if kinds else None, sources["one"] if sources else None)
    if kinds is None or not doubts_lookup(kinds, sources):
        return Planned(form, reply, form, *sure)
    combined = parse_combine((await ask(combine_request(query))).text)
    likeliest = max((kind for kind in KINDS if kind != "lookup"), key=kinds.__getitem__)
    return Planned(replace(form, kind=combined or likeliest), reply, form, *sure, combined)


def parse_plan(reply: str, question: str = "") -> Plan | None:
    """The form in ``reply`` (the first JSON object in it), or ``None`` when there is none usable.

    A count with a unit is a total when the ``question`` names that unit (records are counted
    without one); a unit the question does not name is the small root's own ("How frequently does
    the ledger show a payment?" filled in as a count "in times"), so the count stands, and the
    narrow question may still make it a total (:func:`settle`)."""
    data = _first_object(reply)
    if data is None or data.get("kind") not in KINDS:
        return None
    fields = {name: _clean(data.get(name)) for name in ("records", "about", "unit")}
    if not fields["records"]:
        return None
    kind = str(data["kind"])
    if kind == "count" and fields["unit"] and (not question or names_unit(question, fields["unit"])):
        kind = "total"
    return Plan(kind, fields["records"], fields["about"], fields["unit"])


def combine_request(query: str, *, max_tokens: int = 20) -> ModelRequest:
    """The second root call of an aggregation: how the records' amounts are combined, and nothing else."""
    return ModelRequest(
        messages=(Message("system", COMBINE_SYSTEM), Message("user", f"Question: {query}")),
        max_tokens=max_tokens, temperature=0.0, json_schema=COMBINE_SCHEMA,
    )


def parse_combine(reply: str) -> str | None:
    """The kind that ``reply``'s ``combine`` names (``count``, ``total``, ``largest``,
    ``smallest``), or ``None`` when it names none."""
    data = _first_object(reply)
    named = data.get("combine") if data is not None else None
    return COMBINES.get(named) if isinstance(named, str) else None


def settle(plan: Plan, combined: str | None) -> Plan:
    """The plan with its kind settled between the form and the narrower answer ``combined``.

    A biggest or smallest one amount is distinctive: the narrow answer wins whatever the form said.
    Adding wins over a form's largest or smallest. A narrow "count" is not trusted over a form's
    amounts, nor "add" over a form's count without a unit (records are counted unless amounts are
    named): a count that names a unit the question does not (:func:`parse_plan`) is a total when the
    narrow answer adds; one without a unit becomes :attr:`Plan.or_total` (the document decides).
    A lookup is never changed (it is not asked).
    """
    if combined is None or plan.kind == "lookup" or combined == plan.kind:
        return plan
    if combined in ("largest", "smallest") or (combined == "total" and (
            plan.kind in ("largest", "smallest") or (plan.kind == "count" and plan.unit))):
        return replace(plan, kind=combined)
    if combined == "total" and plan.kind == "count":
        return replace(plan, or_total=True)
    return plan


def _first_object(reply: str) -> dict[str, Any] | None:
    """The first JSON object in ``reply`` (a small model may write words around it), if any."""
    start = reply.find("{")
    if start == -1:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(reply[start:])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _clean(value: Any) -> str:
    return " ".join(str(value).split())[:200] if isinstance(value, (str, int, float)) else ""


def render(plan: Plan, question: str = "") -> str:
    """The program of the plan's kind, with its blanks filled (sandbox code, shown to the root).

    ``about`` keeps the records that name it; when none does (a kind of thing, not a name: "a
    storm", "a bird"), the sub-model judges each record in one batch. When the label asked for
    matched only prose (or none of its records names ``about``) but ``about`` finds records of a
    kind (labelled, or rows of one layout), those are the records; when the label matched prose
    only, the lines that name ``about`` are. With a ``unit``, records in other units are left out;
    a unit no record names is replaced by the ``question``'s word the records write after their
    amounts (a small root may fill in a unit of its own).
    """
    if plan.kind == "lookup":
        return f"print(grep({plan.records!r}))"
    lines = [f"found = records({plan.records!r})", "kept = found"]
    if plan.about:
        judge = f"Is this record about {plan.about}?"
        lines += [
            f"named = records({plan.about!r})",
            f"kept = records({plan.records!r}, having={plan.about!r})",
            "if named.labelled and (not found.labelled or not kept):  # the records name it, not the label asked for",
            "    found = kept = named",
            "elif named and not kept and not found.labelled:  # the label matched prose only: the subject's lines",
            "    found = kept = named",
            "print(found)",
            "if found and not kept:  # no record names it: judge each one",
            f"    verdicts = ask_each(found, {judge!r})",
            "    print(verdicts)",
            "    kept = keep_yes(found, verdicts)",
        ]
    else:
        lines.append("print(found)")
    amounts = plan.kind != "count"
    if amounts:
        lines += [f"unit = unit_of(kept, {plan.unit!r}, question={question[:500]!r}, about={plan.about!r}, "
                  f"label={plan.records!r})",
                  "kept = in_unit(kept, unit)"]
    lines.append('print(len(kept), "record(s) kept; first:", kept[:2])')
    if plan.or_total:  # added if the records write their amounts before a word of the question
        lines += [f"unit = unit_of(kept, '', question={question[:500]!r}, about={plan.about!r})",
                  "values, answer = [], len(kept)",
                  "if unit:",
                  "    values = numbers(in_unit(kept, unit), unit=unit)",
                  '    print("amounts in", repr(unit), values)',
                  "    answer = total(values)"]
    elif not amounts:
        lines.append("answer = len(kept)")
    else:
        lines += ["values = numbers(kept, unit=unit)", 'print("amounts in", repr(unit), values)']
        combine = {"total": "total(values)", "largest": "max(values, default=0)", "smallest": "min(values, default=0)"}
        lines.append(f"answer = {combine[plan.kind]}")
    # an answer only from records kept (and, for amounts, some amount read): else the loop goes on
    answered = "kept and (not unit or any(values))" if plan.or_total else "kept and any(values)" if amounts else "kept"
    lines += ['print("answer:", answer)', f"if {answered}:", "    FINAL(str(answer))"]
    return "\n".join(lines)
