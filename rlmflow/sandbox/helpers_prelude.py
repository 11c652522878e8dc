"""Vetted helpers for model code in the sandbox: ``grep``, ``chunks`` and the record helpers.

Small root models (0.5B-1.5B) often write the search-and-slice code of an RLM turn wrongly (an
off-by-one slice, a regex that fails on a special character, a print that dumps megabytes);
they call a documented helper correctly far more often. Both helpers read ``context`` from the
namespace at call time, and both return plain lists (of str) whose ``repr`` is a short summary,
so a bare ``grep("key")`` as the last line of a cell shows something useful and never floods.

The record helpers are the steps of an aggregation, each with an obvious name: ``records``
collects every record of a kind over the whole context (never only the first match),
``ask_each`` asks the sub-model one short question about each record in one batch,
``keep_yes``/``count_yes`` and ``unit_of``/``in_unit``/``numbers``/``total`` combine the answers in Python. Each result
prints as a count and a few samples, so a root sees the parts before it answers.

Standard library only: the worker (stdlib + msgpack) imports this file by path, like its other
siblings, and :func:`install` adds the helpers to the namespace. It never imports ``rlmflow``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["Answers", "Chunks", "Hits", "Records", "install"]

_PREVIEW = 160
# words too common to stand for a phrase when grep falls back to one word of it
_COMMON = frozenset((
    "that", "this", "with", "from", "what", "where", "when", "which", "have", "were", "there", "their",
    "they", "them", "than", "then", "about", "into", "according", "does", "said", "says", "will", "would",
    "could", "should", "been", "being", "your", "some", "other", "only", "over", "such",
))


class Hits(list):  # type: ignore[type-arg]
    """Snippets around matches (a list of str); ``positions`` holds (document, offset) per hit."""

    def __init__(
        self, snippets: list[str], positions: list[tuple[Any, int]], total: int, pattern: str, word: str | None = None
    ) -> None:
        super().__init__(snippets)
        self.positions = positions
        self.total = total
        self.pattern = pattern
        self.word = word  # set when the whole pattern matched nothing and these are one word's matches

    def __repr__(self) -> str:
        if not self:
            return f"grep({self.pattern!r}): no match (try one distinctive word)"
        shown = f" (first {len(self)} shown)" if self.total > len(self) else ""
        if self.word is not None:
            head = f"grep({self.pattern!r}): no match for the whole phrase; {self.total} match(es) for {self.word!r}"
        else:
            head = f"grep({self.pattern!r}): {self.total} match(es)"
        lines = [head + shown]
        for index, snippet in enumerate(self):
            lines.append(f"[{index}] {snippet}")
        return "\n".join(lines)

    __str__ = __repr__


class Chunks(list):  # type: ignore[type-arg]
    """Consecutive pieces of the context (a list of str) that together hold all of it."""

    def __repr__(self) -> str:
        sizes = [len(c) for c in self]
        head = f"{len(self)} chunk(s), {min(sizes, default=0):,}-{max(sizes, default=0):,} characters each"
        previews = [f"[{i}] begins: {c[:80]!r}" for i, c in enumerate(self[:5])]
        more = [f"... and {len(self) - 5} more"] if len(self) > 5 else []
        return "\n".join([head, *previews, *more])

    __str__ = __repr__


def _documents(context: Any) -> Iterator[tuple[Any, str]]:
    if isinstance(context, str):
        yield None, context
    elif isinstance(context, Mapping):
        yield from ((name, str(text)) for name, text in context.items())
    elif isinstance(context, (list, tuple)):
        yield from enumerate(str(text) for text in context)
    else:
        yield None, str(context)


def _compile(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    flags = re.IGNORECASE if ignore_case else 0
    try:
        return re.compile(pattern, flags)
    except re.error:  # "what is $5?" or "f(x" : search for the words as written
        return re.compile(re.escape(pattern), flags)


def install(namespace: dict[str, Any]) -> Callable[..., str]:
    """Add ``grep`` and ``chunks`` to a sandbox namespace (they read ``namespace['context']``) and
    ``Final``/``final`` as aliases of ``FINAL``; return the function that tells what a cell
    established. It is the worker's, not the namespace's: cell code cannot redefine what the
    worker reports after each cell."""
    helpers: dict[str, Any] = {
        "grep": _grep_for(namespace), "chunks": _chunks_for(namespace), "records": _records_for(namespace),
        "ask_each": _ask_each_for(namespace), "keep_yes": keep_yes, "count_yes": count_yes,
        "numbers": _numbers_for(namespace), "total": total, "in_unit": in_unit,
        "unit_of": unit_of,
    }
    reserved = set(namespace) | set(helpers)  # taken before any cell ran: never reported as established
    namespace.update(helpers)
    if "FINAL" in namespace:  # small models write Final(...) or final(...) as often as FINAL(...)
        namespace.setdefault("Final", namespace["FINAL"])
        namespace.setdefault("final", namespace["FINAL"])
    return _established_for(namespace, reserved)


# -- grep ---------------------------------------------------------------------------------------------
def _grep_for(namespace: Mapping[str, Any]) -> Callable[..., Hits]:
    def grep(pattern: str, window: int = 300, max_hits: int = 20, ignore_case: bool = True) -> Hits:
        """Find ``pattern`` (a regex, or plain words) in ``context``.

        Returns up to ``max_hits`` snippets: each match with ``window`` characters on each side,
        prefixed by its position ("@12,345: ..."). Use ``grep(...).positions`` for the offsets.
        """
        if not isinstance(pattern, str) or not pattern:
            raise TypeError("grep(pattern): give the text or regex to search for, as a non-empty str")
        window = max(0, int(window))
        context = namespace.get("context", "")
        hits = _search(context, _compile(pattern, ignore_case), pattern, window, max_hits)
        if hits.total or " " not in pattern.strip():
            return hits
        return _best_word(context, pattern, window, max_hits, ignore_case) or hits

    return grep


def _best_word(context: Any, pattern: str, window: int, max_hits: int, ignore_case: bool) -> Hits | None:
    """The matches of the phrase's most specific word that occurs (fewest matches), if any.

    Small models search for a whole phrase of the question, which the text rarely repeats
    verbatim: grep falls back to this.
    """
    best: Hits | None = None
    for word in sorted(set(re.findall(r"[A-Za-z][A-Za-z'-]{3,}", pattern)), key=len, reverse=True):
        if word.lower() in _COMMON:
            continue
        found = _search(context, _compile(re.escape(word), ignore_case), pattern, window, max_hits, word=word)
        if found.total and (best is None or found.total < best.total):
            best = found
    return best


def _search(
    context: Any, compiled: re.Pattern[str], pattern: str, window: int, max_hits: int, word: str | None = None
) -> Hits:
    snippets: list[str] = []
    positions: list[tuple[Any, int]] = []
    total = 0
    for name, text in _documents(context):
        for match in compiled.finditer(text):
            total += 1
            if len(snippets) < max_hits:
                start, end = max(0, match.start() - window), min(len(text), match.end() + window)
                where = f"@{match.start():,}" if name is None else f"{name!r} @{match.start():,}"
                snippets.append(f"{where}: {text[start:end]}")
                positions.append((name, match.start()))
    return Hits(snippets, positions, total, pattern, word)


# -- chunks -------------------------------------------------------------------------------------------
def _chunks_for(namespace: Mapping[str, Any]) -> Callable[..., Chunks]:
    def chunks(n: int = 10) -> Chunks:
        """Split ``context`` into pieces, cutting at line ends where possible.

        ``chunks(10)``: ten pieces of about equal size; ``chunks(20000)`` (1000 or more): pieces of
        about 20,000 characters each. Several documents are joined, each headed by its name.
        """
        n = int(n)
        if n < 1:
            raise ValueError("chunks(n): n must be at least 1")
        text = _joined(namespace.get("context", ""))
        cuts = _cuts_by_size(text, n) if n >= 1000 else _cuts_by_count(text, n)
        pieces = [text[a:b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True) if b > a]
        return Chunks(pieces)

    return chunks


def _joined(context: Any) -> str:
    """The context as one text: a lone unnamed document as it is, several each headed by its name."""
    parts = list(_documents(context))
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    return "\n\n".join(f"=== document {name!r} ===\n{body}" for name, body in parts)


def _cuts_by_size(text: str, size: int) -> list[int]:
    """Ends of pieces of about ``size`` characters, each cut at the last line end before it."""
    cuts, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start + size // 2, end)
            end = newline + 1 if newline != -1 else end
        cuts.append(end)
        start = end
    return cuts


def _cuts_by_count(text: str, n: int) -> list[int]:
    """Ends of ``n`` pieces of about equal size, each target moved to the next line end nearby."""
    step = len(text) / n
    cuts: list[int] = []
    for index in range(1, n):
        target = int(index * step)
        newline = text.find("\n", target, target + max(1, int(step) // 2))
        cut = newline + 1 if newline != -1 else target
        if (not cuts or cut > cuts[-1]) and cut < len(text):
            cuts.append(cut)
    cuts.append(len(text))
    return cuts


# -- records: collect, ask about each, combine -------------------------------------------------------
_RECORD_MAX = 1500  # a paragraph longer than this is not one record: the matching line is
# a number, not a part of a date or a code ("1611-03-13", "12/05"): those are never amounts
_NUMBER = re.compile(r"(?<![\w.])(?<!\d[-/])-?\d[\d,]*(?:\.\d+)?(?![\w])(?![-/]\d)")
_YES = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


class Records(list):  # type: ignore[type-arg]
    """Every record (a paragraph, or a line of a long one) of the context that matched; ``pattern``
    is what matched (after any fallback), ``asked`` what the caller asked for, ``labelled`` whether
    they share a label (records of a kind) rather than being matches in running prose."""

    def __init__(self, items: list[str], asked: str, pattern: str, having: str = "", *, labelled: bool = False) -> None:
        super().__init__(items)
        self.asked, self.pattern, self.having = asked, pattern, having
        self.labelled = labelled  # the records share labels ("Invoice 12: ..."): not matches in running prose

    def __repr__(self) -> str:
        how = f"{self.asked!r}" if self.pattern == self.asked else f"{self.asked!r} (matched as {self.pattern!r})"
        having = f" having {self.having!r}" if self.having else ""
        lines = [f"records({how}){having}: {len(self)} record(s) in the whole context"]
        lines += [f"[{i}] {_one_line(item)}" for i, item in enumerate(self[:3])]
        if len(self) > 3:
            lines.append(f"... and {len(self) - 3} more")
        return "\n".join(lines)

    __str__ = __repr__


class Answers(list):  # type: ignore[type-arg]
    """The sub-model's short answer about each record, in the records' order."""

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for answer in self:
            counts[str(answer)] = counts.get(str(answer), 0) + 1
        tally = ", ".join(f"{a!r} x{n}" for a, n in sorted(counts.items(), key=lambda kv: -kv[1])[:6])
        return f"{len(self)} answer(s): {tally}"

    __str__ = __repr__


def _one_line(text: str, limit: int = _PREVIEW) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _stem(word: str) -> str:
    """A word without its possessive or plural ending: "travellers'" and "notes" match "Traveller's note"."""
    word = re.sub(r"(?:'s|s'|')$", "", word.lower())
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def _loose(phrase: str) -> str | None:
    """A regex for ``phrase`` that tolerates plurals, possessives and any separators between its words."""
    words = [_stem(w) for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9'-]*", phrase)]
    words = [w for w in words if w]
    if not words:
        return None
    return r"\W+".join(rf"{re.escape(w)}\w*'?s?" for w in words)


def _units(text: str) -> Iterator[str]:
    """The records a text can hold: its paragraphs, or the lines of a paragraph too long to be one."""
    for paragraph in re.split(r"\n\s*\n", text):
        if len(paragraph) <= _RECORD_MAX:
            if paragraph.strip():
                yield paragraph.strip()
        else:
            yield from (line.strip() for line in paragraph.splitlines() if line.strip())


def _collect(context: Any, compiled: re.Pattern[str]) -> list[str]:
    found: list[str] = []
    for _, text in _documents(context):
        for unit in _units(text):
            match = compiled.search(unit)
            if match is None:
                continue
            if len(unit) > _RECORD_MAX:  # one huge line: the match with some text around it
                unit = unit[max(0, match.start() - 300): match.end() + 300]
            found.append(unit)
    return found


_LABEL = re.compile(r"[^\n:|,.;(\[\]=0-9#-]{2,60}")


def _label(unit: str) -> str:
    """A record's label: its opening words, up to the first punctuation or digit ("Harbour
    master's note, 3 May: ..." -> "harbour master's note")."""
    found = _LABEL.match(unit.lstrip())
    return " ".join(found.group(0).lower().split()) if found else ""


def _shape(unit: str) -> str:
    """A record's layout: its first line with each word run written ``a`` and each number ``9``
    ("1611-03-13,5105,Saltmarsh Tannery,payment,169,florins" -> "9-9-9,9,a,a,9,a"); records of
    one table, CSV file or form share it whatever their values."""
    line = unit.lstrip().split("\n", 1)[0][:200]
    line = re.sub(r"\d+", "9", re.sub(r"[A-Za-z'][A-Za-z' ]*", "a", line))
    return re.sub(r"\s+", "", line)


def _structured(shape: str) -> bool:
    """Whether a layout is a row of fields (a number and three separators or more), not a line of prose."""
    return "9" in shape and sum(1 for char in shape if char not in "a9") >= 3


def _families(found: list[str], asked: str) -> tuple[list[str], bool]:
    """The matches that are records rather than prose, and whether they share labels (records of
    a kind do). Keep the matches whose label is shared by two or more of them and names the asked
    words; failing that, those of the largest label shared by three or more, and those laid out in
    fields; failing that, when three or more share a layout of fields (rows of a table, lines of a
    CSV file, blocks of a form), those laid out in fields (a line of prose is not; a letter that
    states a date and an amount may be); failing that, all."""
    labels = [_label(unit) for unit in found]
    sizes: dict[str, int] = {}
    for label in labels:
        if label:
            sizes[label] = sizes.get(label, 0) + 1
    words = [_stem(w) for w in re.findall(r"[A-Za-z]{3,}", asked)]
    named = {label for label, n in sizes.items() if n >= 2 and any(w in label for w in words)}
    if named:
        return [unit for unit, label in zip(found, labels, strict=True) if label in named], True
    shapes = [_shape(unit) for unit in found]
    shared = [label for label, n in sizes.items() if n >= 3]
    if shared:  # and those laid out in fields: letters with other greetings are records too, a speech is not
        largest = max(shared, key=lambda label: sizes[label])
        return [unit for unit, label, shape in zip(found, labels, shapes, strict=True)
                if label == largest or _structured(shape)], True
    counts: dict[str, int] = {}
    for shape in shapes:
        if _structured(shape):
            counts[shape] = counts.get(shape, 0) + 1
    if any(n >= 3 for n in counts.values()):  # rows of fields: the lines of prose are left out
        return [unit for unit, shape in zip(found, shapes, strict=True) if _structured(shape)], True
    return found, False


def _contains_all(record: str, having: str) -> bool:
    words = [_stem(w) for w in re.findall(r"[A-Za-z0-9][A-Za-z0-9'-]*", having)]
    low = record.lower()
    return all(w in low for w in words if w)


def _records_for(namespace: Mapping[str, Any]) -> Callable[..., Records]:
    def records(pattern: str, having: str = "") -> Records:
        """Every record of ``context`` that matches ``pattern`` (words or a regex, any case): the
        paragraph around each match, or the line when the paragraph is very long. All of them, in
        document order, each once. ``having``: keep only records that also contain these words.
        Matches in running prose are left out when the others share a label ("Invoice 12: ...").

        A phrase that matches nothing is retried with plurals, possessives and separators loosened
        ("travellers' notes" finds "Traveller's note:").
        """
        if not isinstance(pattern, str) or not pattern.strip():
            raise TypeError("records(pattern): give the words or regex every record contains, as a non-empty str")
        context = namespace.get("context", "")
        used = pattern
        found = _collect(context, _compile(pattern, True))
        loose = _loose(pattern)
        if not found and loose is not None:
            used = loose
            found = _collect(context, re.compile(loose, re.IGNORECASE))
        if not found:  # the phrase as a whole is not there: its words, one at a time, the longest
            # whose matches are records of a kind (a word of the phrase may be only in prose:
            # "slate delivery" where the rows say "slate"), else the longest that matches at all
            for word in sorted(set(re.findall(r"[A-Za-z]{4,}", pattern)), key=len, reverse=True):
                if word.lower() not in _COMMON:
                    matches, labelled = _families(
                        _collect(context, re.compile(re.escape(_stem(word)), re.IGNORECASE)), word)
                    if matches and (labelled or not found):
                        found, used = matches, _stem(word)
                    if labelled and matches:
                        break
        found, labelled = _families(found, pattern)
        if having:
            found = [r for r in found if _contains_all(r, having)]
        return Records(found, pattern, used, having, labelled=labelled)

    return records


_ASK_TEMPLATE = """\
Read one record from a long document and answer a question about that record only. Say in one short
sentence what the record says, then end with "Answer: " and the answer.

Record: The old cat slept all afternoon on the warm roof.
Question: Does this record mention an animal?
The record is about a cat sleeping. A cat is an animal. Answer: yes

Record: The price of bread rose by two pence at the market.
Question: Does this record mention an animal?
The record is about the price of bread. Bread is not an animal. Answer: no

Record: Invoice 12, 3 May: paid 40 crowns for nails.
Question: How many crowns were paid?
The record says 40 crowns were paid for nails. Answer: 40

Record: {record}
Question: {question}
"""


def _short_answer(reply: str) -> str:
    """The part after the last "Answer:", or the whole reply, stripped of quotes and a final period."""
    tail = reply.rpartition("Answer:")[2] if "Answer:" in reply else reply
    tail = tail.strip().splitlines()[0] if tail.strip() else ""
    return tail.strip(" \t\"'`*.").strip()


def _ask_each_for(namespace: Mapping[str, Any]) -> Callable[..., Answers]:
    def ask_each(items: list[str], question: str) -> Answers:
        """Ask the sub-model ``question`` about each item (a record), all in one batch; the short
        answers ("yes", "no", "42", ...) come back in the items' order."""
        if isinstance(items, str):
            raise TypeError("ask_each(items, question): items is a list of records, e.g. records('invoice')")
        if not isinstance(question, str) or not question.strip():
            raise TypeError("ask_each(items, question): give the question to ask about each record")
        items = list(items)
        if not items:
            return Answers([])
        prompts = [_ASK_TEMPLATE.format(record=_one_line(item, 1200), question=question.strip()) for item in items]
        replies = namespace["llm_query_many"](prompts)
        return Answers(_short_answer(str(reply)) for reply in replies)

    return ask_each


def _is_yes(answer: Any) -> bool:
    found = _YES.search(str(answer))
    return found is not None and found.group(1).lower() == "yes"


def keep_yes(items: list[Any], answers: list[Any]) -> list[Any]:
    """The items whose answer (same position) says yes."""
    if len(items) != len(answers):
        raise ValueError(f"keep_yes: {len(items)} items but {len(answers)} answers")
    return [item for item, answer in zip(items, answers, strict=True) if _is_yes(answer)]


def count_yes(answers: list[Any]) -> int:
    """How many answers say yes."""
    return sum(1 for answer in answers if _is_yes(answer))


def _to_number(text: str) -> float | int:
    value = float(text.replace(",", ""))
    return int(value) if value.is_integer() else value


def _unit_word(unit: str) -> str:
    """A regex for the unit as a whole word, singular or plural: "florins" finds "florin" and
    "florins", "marks" never "market", "pay" never "payer"."""
    return rf"{re.escape(_stem(unit.split()[0]))}(?:e?s)?\b"


def names_unit(text: str, unit: str) -> bool:
    """Whether ``text`` names ``unit`` as a word, singular or plural (the host's plan turn asks
    this of a question, as :func:`in_unit` asks it of records)."""
    return bool(unit.strip()) and re.search(rf"\b{_unit_word(unit)}", text, re.IGNORECASE) is not None


def _amount_patterns(unit: str) -> list[str]:
    """Where a record states an amount in ``unit``, most exact first: just before the unit ("90
    florins", "90 gold florins"), just after it ("florins: 90"), then across a field separator
    ("90,florins", "| 90 | florins |", "amount: 90\ncurrency: florins"; no other number between)."""
    word, number = _unit_word(unit), _NUMBER.pattern
    return [rf"({number})\s*(?:[A-Za-z]+\s+){{0,2}}?{word}", rf"\b{word}\s*[:=]?\s*({number})",
            rf"({number})[^\d.!?]{{1,16}}?\b{word}", rf"\b{word}\W{{0,3}}\s*[:=]?\s*({number})"]


def _amount(record: str, unit: str) -> float | int | None:
    """The number of ``record`` that goes with ``unit``, else its only number; ``None`` when that
    is ambiguous."""
    if isinstance(unit, str) and unit.strip():
        for pattern in _amount_patterns(unit):
            near = re.search(pattern, record, re.IGNORECASE)
            if near:
                return _to_number(near.group(1))
    found = _NUMBER.findall(record)
    return _to_number(found[0]) if len(found) == 1 else None


def unit_of(items: list[Any], unit: str, question: str = "", about: str = "", label: str = "") -> str:
    """The unit the items state their amounts in: ``unit`` when some item names it; else the word
    of ``question`` (not one of ``about``'s, nor of the records' ``label``: "payment" follows a
    record's number in a row like "5212,Brother Osric,payment,30,florins") written after an amount
    in the most items, a third of them at least (a form may name a unit the question does not, or
    none); else ``unit``."""
    texts = [str(item) for item in items]
    if isinstance(unit, str) and any(names_unit(text, unit) for text in texts):
        return unit
    skip = {_stem(word) for word in re.findall(r"[A-Za-z]+", f"{about} {label}")}
    words = {word.lower() for word in re.findall(r"[A-Za-z]{4,}", str(question)[:500])}  # not "the", "for"
    best, most = unit, max(1, (len(texts) + 2) // 3) - 1
    for word in sorted(words - _COMMON):
        if _stem(word) in skip:
            continue
        before = _amount_patterns(word)[::2]  # an amount, then the unit: never a label before a number
        stated = sum(1 for text in texts if any(re.search(p, text, re.IGNORECASE) for p in before))
        if stated > most:
            best, most = word, stated
    return best


def in_unit(items: list[Any], unit: str) -> list[Any]:
    """The items that name ``unit`` (amounts in other units left out: "florins" keeps "90 florins",
    not "17 guilders"); all of them when none does (the unit may be in a table's header)."""
    if not isinstance(unit, str) or not unit.strip():
        return list(items)
    named = [item for item in items if names_unit(str(item), unit)]
    return named if named else list(items)


def _numbers_for(namespace: Mapping[str, Any]) -> Callable[..., list[float | int]]:
    def numbers(items: list[str], unit: str = "") -> list[float | int]:
        """The amount in each item: the number next to ``unit`` (e.g. "florins"), else the item's
        only number; items where that is unclear are asked of the sub-model in one batch. An item
        with no amount counts 0."""
        values: list[float | int | None] = [_amount(str(item), unit) for item in items]
        unclear = [i for i, value in enumerate(values) if value is None]
        if unclear:
            question = f"How many {unit} does it state? Answer with the number only." if unit else \
                "What is the amount in this record? Answer with the number only."
            answers = _ask_each_for(namespace)([items[i] for i in unclear], question)
            for i, answer in zip(unclear, answers, strict=True):
                found = _NUMBER.findall(str(answer))
                values[i] = _to_number(found[0]) if found else 0
        return [0 if value is None else value for value in values]

    return numbers


def total(values: list[Any]) -> float | int:
    """The sum of numbers (numbers inside strings are read: "90 florins" counts 90)."""
    result: float | int = 0
    for value in values:
        if isinstance(value, (int, float)):
            result += value
        else:
            found = _NUMBER.findall(str(value))
            result += _to_number(found[0]) if found else 0
    return result


# -- what a cell established --------------------------------------------------------------------------
def _established_for(namespace: dict[str, Any], reserved: set[str]) -> Callable[..., str]:
    seen: dict[str, tuple[int, int]] = {}  # the marks after the previous call

    def established(limit: int = 6, width: int = 100) -> str:
        """The variables the last cell created or changed, one short line each ("" if none).

        The worker calls it after each cell so the root model sees what its code established,
        not only what it printed. Changes are told by identity and size, so an in-place append counts.
        """
        current = _marks(namespace, reserved)
        changed = [name for name, mark in current.items() if seen.get(name) != mark]
        seen.clear()
        seen.update(current)
        lines = [_describe(name, namespace[name], width) for name in changed[:limit]]
        if len(changed) > limit:
            lines.append(f"... and {len(changed) - limit} more: {', '.join(changed[limit:])}")
        return "\n".join(lines)

    return established


def _marks(namespace: dict[str, Any], reserved: set[str]) -> dict[str, tuple[int, int]]:
    """(identity, size) of each variable a cell may have set: not private names, helpers, callables or modules."""
    current: dict[str, tuple[int, int]] = {}
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in reserved or callable(value) or type(value).__name__ == "module":
            continue
        try:
            size = len(value)
        except TypeError:
            size = -1
        current[name] = (id(value), size)
    return current


def _describe(name: str, value: Any, width: int) -> str:
    """One line: the name, its repr cut to ``width``, its type and extent."""
    try:
        text = repr(value)
    except Exception:  # a user object whose repr fails: name its type only
        text = f"<{type(value).__name__}>"
    text = text if len(text) <= width else text[: width - 3] + "..."
    extent = f", {len(value):,} items" if isinstance(value, (list, tuple, dict, set)) else (
        f", {len(value):,} characters" if isinstance(value, str) else "")
    return f"{name} = {text} ({type(value).__name__}{extent})"
