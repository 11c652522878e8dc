"""The plan turn: a small root names the kind of question and fills a form; a template per kind does the rest.

A 0.5B-1.5B root names the kind of a question reliably (lookup, count, total, largest,
smallest), and the word that marks the records it is about, but it rarely writes the whole
aggregation itself (collect every record, ask about each, combine). So its first turn is a form
(:data:`PLAN_SCHEMA`, decoded under a grammar where the model supports one), and
:func:`render` turns the form into the program of its kind, built from the sandbox's record
helpers: ``records`` over the whole context, ``ask_each`` in one batch when a record needs
judging, ``numbers``/``total``/``count_yes`` in Python, the parts printed, and ``FINAL`` only
when some record was found. A lookup becomes a first ``grep`` and the free-form loop goes on.

Nothing here reads the words of a particular question: the form's fields come from the root, and
the rules below are about the form (is ``ask`` a yes/no question? did ``having`` match?).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..models.base import Message, ModelRequest

__all__ = ["KINDS", "PLAN_SCHEMA", "Plan", "is_yes_no_question", "parse_plan", "plan_request", "render"]

KINDS = ("lookup", "count", "total", "largest", "smallest")

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "kind": {"type": "string", "enum": list(KINDS)},
        "records": {"type": "string"},
        "unit": {"type": "string"},
        "having": {"type": "string"},
        "ask": {"type": "string"},
    },
    "required": ["kind", "records", "unit", "having", "ask"],
}

PLAN_SYSTEM = """\
You plan how to answer a question about a long document. The document may hold many records
(notes, lines, entries, letters) scattered through it. Code will find the records and read each
one. Reply with one JSON object:
- kind: "lookup" (one fact), "count" (how many records), "total" (add up amounts), "largest" or
  "smallest" (one amount among the records).
- records: a word or two that appears in every record the question is about (its label or
  kind), e.g. "invoice", "ship's log". For a lookup: the most distinctive word to search for.
- unit: what the amounts are counted in (e.g. "crowns", "tons"), or "" if none.
- having: a name, item or place from the question that every record to use must contain, or "".
- ask: a yes/no question about ONE record, when deciding needs reading (e.g. "Does this entry
  describe a repair?"), or "".

Examples:
Question: How many of the inspector's reports mention a broken lock?
{"kind": "count", "records": "inspector", "unit": "", "having": "", "ask": "Does this report mention a broken lock?"}
Question: What is the total weight of copper shipped, adding every cargo entry?
{"kind": "total", "records": "cargo entry", "unit": "tons", "having": "copper", "ask": ""}
Question: What was the largest single donation from the Guild of Weavers?
{"kind": "largest", "records": "donation", "unit": "", "having": "Guild of Weavers", "ask": ""}
Question: How many invoices were issued to Harlow Mills?
{"kind": "count", "records": "invoice", "unit": "", "having": "Harlow Mills", "ask": ""}
Question: According to the letters, what colour was the captain's coat?
{"kind": "lookup", "records": "coat", "unit": "", "having": "", "ask": ""}"""

_YES_NO_START = re.compile(
    r"^(is|are|was|were|does|do|did|has|have|had|can|could|will|would|should|shall|may|might|must)\b", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Plan:
    """The root's form: the kind of question and the blanks of that kind's program."""

    kind: str
    records: str
    unit: str = ""
    having: str = ""
    ask: str = ""


def plan_request(query: str, *, max_tokens: int = 160, temperature: float = 0.0, note: str = "") -> ModelRequest:
    """The root call that fills the form (``note``: what went wrong with a previous form)."""
    user = f"Question: {query}" + (f"\n\n{note}" if note else "")
    return ModelRequest(
        messages=(Message("system", PLAN_SYSTEM), Message("user", user)),
        max_tokens=max_tokens, temperature=temperature, json_schema=PLAN_SCHEMA,
    )


def parse_plan(reply: str) -> Plan | None:
    """The form in ``reply`` (the first JSON object in it), or ``None`` when there is none usable."""
    start = reply.find("{")
    if start == -1:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(reply[start:])
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        return None
    fields = {name: _clean(data.get(name)) for name in ("records", "unit", "having", "ask")}
    if not fields["records"]:
        return None
    return Plan(kind=str(data["kind"]), **fields)


def _clean(value: Any) -> str:
    return " ".join(str(value).split())[:200] if isinstance(value, (str, int, float)) else ""


def is_yes_no_question(text: str) -> bool:
    """Whether ``text`` asks yes or no about one record (a question copied from the task, "how many
    ...?", is not one: asked of each record it has no yes/no answer)."""
    return bool(_YES_NO_START.match(text.strip())) and text.strip().endswith("?")


def render(plan: Plan) -> str:
    """The program of the plan's kind, with its blanks filled (sandbox code, shown to the root)."""
    if plan.kind == "lookup":
        return f"print(grep({plan.records!r}))"
    lines = [f"found = records({plan.records!r})", "print(found)", "kept = found"]
    if plan.having:
        judge = f"Is this record about {plan.having} (or a kind of {plan.having})?"
        lines += [
            f"kept = records({plan.records!r}, having={plan.having!r})",
            "if found and not kept:  # no record names it: judge each one",
            f"    kept = keep_yes(found, ask_each(found, {judge!r}))",
        ]
    if plan.ask and is_yes_no_question(plan.ask):
        lines += [f"verdicts = ask_each(kept, {plan.ask!r})", "print(verdicts)", "kept = keep_yes(kept, verdicts)"]
    lines.append('print(len(kept), "record(s) kept; first:", kept[:2])')
    if plan.kind == "count":
        lines.append("answer = len(kept)")
    else:
        lines += [f"values = numbers(kept, unit={plan.unit!r})", 'print("amounts:", values)']
        combine = {"total": "total(values)", "largest": "max(values, default=0)", "smallest": "min(values, default=0)"}
        lines.append(f"answer = {combine[plan.kind]}")
    lines += ['print("answer:", answer)', "if found:", "    FINAL(str(answer))"]
    return "\n".join(lines)
