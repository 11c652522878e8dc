"""Generated aggregation and classification tasks: records of several formats, questions of several wordings.

Each task plants 8 to 16 records of one format (chosen by the seed) between corpus paragraphs,
among records of the same format about other subjects (decoys), and asks one of several
wordings of its question:

- ``total``: the sum of one payer's payments (formats: a ledger sentence, a pipe-separated
  entry, a receipt; dates and record numbers add numbers that are not amounts);
- ``count``: how many register entries are of one cargo (the cargo is named in each entry);
- ``classify``: how many notes report one class of thing (stormy weather, a bird, a complaint):
  the notes of one class share no word that the others lack, so a reader must judge each;
- ``largest``: the largest single payment of one payer.

:func:`derive` reads the answer back from the text alone (the generator's verification).
"""

from __future__ import annotations

import random
import re
from typing import Any

__all__ = ["RECORD_KINDS", "build", "derive"]

RECORD_KINDS = ("total", "count", "classify", "largest")

_PAYERS = ["the northern quarry", "the river mill", "the abbey kitchen", "the east farm", "the harbour office",
           "the weavers' hall", "the glassworks"]
_UNITS = ["florins", "crowns", "ducats"]
_ITEMS = ["lamp oil", "rope", "timber", "salt", "candles", "nails", "wool", "tar"]
_MONTHS = ["January", "March", "April", "June", "August", "October", "November"]
_PAYMENT_FORMATS = [
    ("Ledger, {day} {month}: {payer} paid {amount} {unit} for {item}.",
     r"Ledger, \d+ \w+: (?P<payer>the [\w' ]+?) paid (?P<amount>\d+) (?P<unit>\w+) for [\w ]+\."),
    ("PAYMENT #{number} | payer: {payer} | item: {item} | amount: {amount} {unit}",
     r"PAYMENT #\d+ \| payer: (?P<payer>the [\w' ]+?) \| item: [\w ]+ \| amount: (?P<amount>\d+) (?P<unit>\w+)"),
    ("Receipt {number}. Received from {payer}, on {day} {month}, the sum of {amount} {unit}, for {item}.",
     r"Receipt \d+\. Received from (?P<payer>the [\w' ]+?), on \d+ \w+, the sum of (?P<amount>\d+) (?P<unit>\w+),"),
]
_TOTAL_QUESTIONS = [
    "What is the total amount {payer} paid, adding up every payment record in the document? Answer with the number.",
    "Across all the payment records scattered through the document, how many {unit} did {payer} pay in total? "
    "Answer with the number.",
    "Sum every payment made by {payer} in the document. What is the total, in {unit}? Answer with the number.",
]
_LARGEST_QUESTIONS = [
    "What was the largest single payment made by {payer}? Answer with the number.",
    "Of all the payments by {payer} recorded in the document, which amount was the biggest? Answer with the number.",
    "What is the highest amount {payer} paid in any one payment record? Answer with the number.",
]

_SHIPS = ["Swallow", "Good Hope", "Marigold", "Saint Anne", "Pelican", "Falcon", "Mermaid", "Unicorn"]
_CARGOES = ["salt", "wine", "iron", "grain", "cloth", "coal"]
_CARGO_FORMATS = [
    ("Port register, {day} {month}: the {ship} unloaded {amount} barrels of {cargo}.",
     r"Port register, \d+ \w+: the [\w ]+? unloaded \d+ barrels of (?P<cargo>\w+)\."),
    ("REGISTER | ship={ship} | cargo={cargo} | barrels={amount}",
     r"REGISTER \| ship=[\w ]+ \| cargo=(?P<cargo>\w+) \| barrels=\d+"),
    ("Register entry {number}: the {ship} came in with a load of {cargo}.",
     r"Register entry \d+: the [\w ]+? came in with a load of (?P<cargo>\w+)\."),
]
_COUNT_QUESTIONS = [
    "How many shipments of {cargo} does the port register record? Answer with the number.",
    "Count the register entries for {cargo} in the document. How many are there? Answer with the number.",
    "According to the register entries, how many times was {cargo} brought in? Answer with the number.",
]

# classify: (label format, class name in questions, phrases of the class, phrases of the others)
_THEMES: dict[str, dict[str, Any]] = {
    "storm": {
        "record": "{label} {day} {month}: {text}",
        "labels": ["Harbour master's note,", "Note of the harbour master,"],
        "questions": [
            "How many of the harbour master's notes report a storm? Answer with the number.",
            "Of the harbour master's notes in the document, how many describe stormy weather? Answer with the number.",
            "Count the harbour master's notes that tell of a storm. How many are there? Answer with the number.",
        ],
        "yes": ["a gale tore the sails of two boats and drove them onto the shingle",
                "thunder rolled all night and waves broke over the harbour wall",
                "a squall came in from the west and no boat dared leave",
                "the wind howled and rain lashed the quay until dawn",
                "lightning struck the mast of a brig and the sea ran high"],
        "no": ["the water lay still and the boats went out at first light",
               "a light breeze and clear skies; the fishing was good",
               "fog lifted gently by mid-morning and trade went on as usual",
               "warm sunshine; the children swam off the steps",
               "a quiet day, the tide slack and the nets dried on the wall",
               "calm seas and a fair wind for the ferry"],
    },
    "bird": {
        "record": "{label} {day} {month}: near the {place} I saw a {text}, and watched it for a while.",
        "labels": ["Field diary,", "Walker's diary entry,"],
        "questions": [
            "How many of the diary entries describe a bird? Answer with the number.",
            "Of the field diary entries in the document, how many are about a bird? Answer with the number.",
            "Count the diary entries in which the animal seen is a bird. How many? Answer with the number.",
        ],
        "yes": ["heron", "wren", "kestrel", "lapwing", "curlew", "magpie", "osprey", "owl"],
        "no": ["otter", "badger", "hare", "stoat", "trout", "fox", "hedgehog", "toad", "deer"],
    },
    "complaint": {
        "record": "{label} {day} {month}: {text}",
        "labels": ["Letter to the council,", "Letter received by the council,"],
        "questions": [
            "How many of the letters to the council are complaints? Answer with the number.",
            "Of the letters the council received, how many complain about something? Answer with the number.",
            "Count the letters to the council that make a complaint. How many are there? Answer with the number.",
        ],
        "yes": ["the drains on Mill Lane have overflowed for a week and nobody has come",
                "the night carts wake my children at three every morning; this must stop",
                "I was overcharged at the market scales again and demand my money back",
                "the bridge railing is broken and my neighbour nearly fell into the river",
                "your clerk was rude to me and refused to take my petition"],
        "no": ["thank you for mending the lamp on the corner so quickly",
               "I write to offer my barn for the harvest dance",
               "please send me a copy of the new market rules",
               "my son would like to apprentice with the town surveyor",
               "the choir wishes to sing at the spring fair, with your leave",
               "congratulations on the new fountain in the square"],
    },
}
_PLACES = ["mill", "ford", "old bridge", "chapel wall", "orchard", "weir"]


def _day(rng: random.Random) -> dict[str, Any]:
    return {"day": rng.randint(1, 28), "month": rng.choice(_MONTHS), "number": rng.randint(100, 9999)}


def _payments(rng: random.Random) -> tuple[int, str, str, list[tuple[str, int]], list[str]]:
    fmt = rng.randrange(len(_PAYMENT_FORMATS))
    unit = rng.choice(_UNITS)
    payer, *others = rng.sample(_PAYERS, 4)
    own = rng.randint(4, 8)
    rows = [(payer, rng.randint(11, 499)) for _ in range(own)]
    rows += [(rng.choice(others), rng.randint(11, 499)) for _ in range(rng.randint(4, 8))]
    rng.shuffle(rows)
    template = _PAYMENT_FORMATS[fmt][0]
    records = [template.format(payer=p, amount=a, unit=unit, item=rng.choice(_ITEMS), **_day(rng)) for p, a in rows]
    return fmt, unit, payer, rows, records


def build(kind: str, rng: random.Random) -> tuple[str, str, list[str], dict[str, Any]]:
    """(question, answer, records, key) of a task of ``kind`` (one of :data:`RECORD_KINDS`)."""
    if kind in ("total", "largest"):
        fmt, unit, payer, rows, records = _payments(rng)
        amounts = [a for p, a in rows if p == payer]
        wordings = _TOTAL_QUESTIONS if kind == "total" else _LARGEST_QUESTIONS
        question = rng.choice(wordings).format(payer=payer, unit=unit)
        answer = sum(amounts) if kind == "total" else max(amounts)
        return question, str(answer), records, {"format": fmt, "payer": payer, "records": len(rows)}
    if kind == "count":
        fmt = rng.randrange(len(_CARGO_FORMATS))
        cargo, *others = rng.sample(_CARGOES, 4)
        cargoes = [cargo] * rng.randint(3, 8) + [rng.choice(others) for _ in range(rng.randint(5, 9))]
        rng.shuffle(cargoes)
        template = _CARGO_FORMATS[fmt][0]
        records = [template.format(ship=rng.choice(_SHIPS), cargo=c, amount=rng.randint(5, 90), **_day(rng))
                   for c in cargoes]
        question = rng.choice(_COUNT_QUESTIONS).format(cargo=cargo)
        return question, str(cargoes.count(cargo)), records, {"format": fmt, "cargo": cargo, "records": len(records)}
    if kind == "classify":
        name = rng.choice(sorted(_THEMES))
        theme = _THEMES[name]
        label = rng.choice(theme["labels"])
        yes = rng.sample(theme["yes"], rng.randint(2, min(5, len(theme["yes"]))))
        no = rng.sample(theme["no"], rng.randint(3, min(6, len(theme["no"]))))
        texts = yes + no
        rng.shuffle(texts)
        records = [theme["record"].format(label=label, text=t, place=rng.choice(_PLACES), **_day(rng)) for t in texts]
        question = rng.choice(theme["questions"])
        return question, str(len(yes)), records, {"theme": name, "label": label, "records": len(records)}
    raise ValueError(f"unknown record kind {kind!r}")


def derive(kind: str, text: str, key: dict[str, Any]) -> str:
    """The answer as the text alone says it; raises ValueError when the planted records are not all there."""
    if kind in ("total", "largest"):
        found = [m.groupdict() for m in re.finditer(_PAYMENT_FORMATS[key["format"]][1], text)]
        if len(found) != key["records"]:
            raise ValueError(f"{len(found)} payment records in the text, {key['records']} planted")
        amounts = [int(f["amount"]) for f in found if f["payer"] == key["payer"]]
        return str(sum(amounts) if kind == "total" else max(amounts))
    if kind == "count":
        cargoes = [m.group("cargo") for m in re.finditer(_CARGO_FORMATS[key["format"]][1], text)]
        if len(cargoes) != key["records"]:
            raise ValueError(f"{len(cargoes)} register entries in the text, {key['records']} planted")
        return str(cargoes.count(key["cargo"]))
    if kind == "classify":
        theme = _THEMES[key["theme"]]
        lines = [line for line in text.split("\n") if line.startswith(key["label"])]
        if len(lines) != key["records"]:
            raise ValueError(f"{len(lines)} notes in the text, {key['records']} planted")
        classes = [[p for p in theme["yes"] + theme["no"] if re.search(rf"\b{re.escape(p)}\b", line)]
                   for line in lines]
        if any(len(c) != 1 for c in classes):
            raise ValueError("a note matches no phrase, or several")
        return str(sum(c[0] in theme["yes"] for c in classes))
    raise ValueError(f"unknown record kind {kind!r}")
