"""Generated tasks with exact answers, deterministic from a seed, 100 KB to 50 MB.

Records are planted between the paragraphs of a public-domain corpus (the demo's Shakespeare,
``examples/data/shakespeare_plays.txt``; any text works), reshuffled and repeated as needed:

- ``needle``: one planted fact among decoys that differ by one word of the key;
- ``ledger``: a sum over every ledger line of one commodity, with other commodities interleaved;
- ``notes``: how many travellers' notes describe a bird; every note shares one template, and only
  the creature's name tells the kind, so no keyword finds the birds: a reader must classify;
- ``total``, ``count``, ``classify``, ``largest``, ``smallest``: aggregations over records of
  several layouts (sentences, receipts, CSV lines, table rows, key-value blocks, JSON lines,
  letters), with decoys in other units, and 9 question wordings per kind
  (:mod:`rlmflow.eval.generate_records`);
- ``code``: the default value of a parameter of a named function in the Python standard
  library's source on this machine (files concatenated, so the answer depends on the Python
  version; still deterministic on one machine).

Every task is checked after generation: the answer is derived again from the generated text
alone (:func:`verify_task`), and a mismatch raises :class:`GenerationError`. Generation is
blocking CPU work: call it from a worker thread in async code.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._exceptions import ConfigurationError
from . import generate_records

__all__ = ["KINDS", "GeneratedTask", "GenerationError", "generate_task", "parse_size", "verify_task", "write_tasks"]

KINDS = ("needle", "ledger", "notes", "code", *generate_records.RECORD_KINDS)
MIN_SIZE, MAX_SIZE = 100_000, 50_000_000


class GenerationError(ConfigurationError):
    """A task cannot be generated as asked, or its answer is not what its text says."""


@dataclass(frozen=True)
class GeneratedTask:
    """A generated question, its exact answer and its document. ``key`` is what verification needs."""

    id: str
    kind: str
    question: str
    answer: str
    context: str
    seed: int
    size: int
    key: dict[str, Any] = field(default_factory=dict)


def parse_size(text: str) -> int:
    """``"100KB"``, ``"1.5MB"``, ``"250000"`` -> characters (decimal units). Raises GenerationError."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)[bB]?\s*", text)
    if not found:
        raise GenerationError(f"bad size {text!r}: use e.g. 100KB, 1MB, 50MB")
    scale = {"": 1, "k": 1_000, "m": 1_000_000}[found.group(2).lower()]
    return int(float(found.group(1)) * scale)


def _paragraphs(corpus: str) -> list[str]:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", corpus) if p.strip()]
    if len(paragraphs) < 20:
        raise GenerationError("the corpus is too small: give at least a few dozen paragraphs of text")
    return paragraphs


def _document(corpus: str, size: int, records: Sequence[str], rng: random.Random) -> str:
    """Corpus paragraphs (shuffled, repeated) to ``size`` characters, ``records`` at random places."""
    source = _paragraphs(corpus)
    budget = size - sum(len(r) + 2 for r in records)
    body: list[str] = []
    total = 0
    while total < budget:
        order = source[:]
        rng.shuffle(order)
        for paragraph in order:
            if total >= budget:
                break
            body.append(paragraph[: budget - total] if total + len(paragraph) > budget else paragraph)
            total += len(body[-1]) + 2
    slots = sorted(rng.sample(range(len(body) + 1), len(records))) if len(records) <= len(body) + 1 else None
    if slots is None:
        raise GenerationError(f"size {size} is too small for {len(records)} records")
    out: list[str] = []
    placed = iter(zip(slots, records, strict=True))
    upcoming = next(placed, None)
    for index in range(len(body) + 1):
        while upcoming is not None and upcoming[0] == index:
            out.append(upcoming[1])
            upcoming = next(placed, None)
        if index < len(body):
            out.append(body[index])
    return "\n\n".join(out)


# -- needle -----------------------------------------------------------------------------------------
_FIRST = ["Rosalind", "Tobias", "Mariana", "Edmund", "Helena", "Cassius", "Imogen", "Leontes", "Perdita", "Orsino"]
_LAST = ["Ashby", "Ashcroft", "Ashford", "Whitlock", "Whitmore", "Whitcombe", "Harwood", "Hartley", "Hargrave"]
_THINGS = ["strongbox", "cellar door", "chapel chest", "granary lock", "map case"]
_NEEDLE = "Archive record: the combination of the {thing} of {name} is {code}."
_NEEDLE_RE = re.compile(r"Archive record: the combination of the ([a-z ]+) of ([A-Z]\w+ [A-Z]\w+) is (\d+)\.")


def _needle(corpus: str, size: int, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    first, last = rng.choice(_FIRST), rng.choice(_LAST)
    thing = rng.choice(_THINGS)
    codes = rng.sample(range(1000, 10000), 6)
    family = [n for n in _LAST if n[:3] == last[:3] and n != last]
    keys = [(thing, f"{first} {last}")]
    keys += [(thing, f"{first} {other}") for other in family]  # near-miss names
    keys += [(other, f"{first} {last}") for other in rng.sample([t for t in _THINGS if t != thing], 2)]
    keys += [(thing, f"{rng.choice([f for f in _FIRST if f != first])} {last}")]
    records = [_NEEDLE.format(thing=t, name=n, code=c) for (t, n), c in zip(keys, codes, strict=False)]
    question = f"According to the archive records in the document, what is the combination of the {thing} of " \
               f"{first} {last}? Answer with the number."
    return question, str(codes[0]), _document(corpus, size, records, rng), {"thing": thing, "name": f"{first} {last}"}


# -- ledger -----------------------------------------------------------------------------------------
_TOWNS = ["Elsinore", "Verona", "Messina", "Illyria", "Belmont", "Dunsinane", "Padua", "Ephesus", "Navarre"]
_GRAINS = ["barley", "wheat", "oats", "rye"]
_LEDGER = "Ledger line: the granary at {town} received {amount} bushels of {grain}."
_LEDGER_RE = re.compile(r"Ledger line: the granary at (\w+) received (\d+) bushels of (\w+)\.")


def _ledger(corpus: str, size: int, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    grain = rng.choice(_GRAINS)
    count = rng.randint(8, 16)
    rows = [(rng.choice(_TOWNS), rng.randint(11, 499), grain if i < count // 2 + 1 else
             rng.choice([g for g in _GRAINS if g != grain])) for i in range(count)]
    rng.shuffle(rows)
    records = [_LEDGER.format(town=t, amount=a, grain=g) for t, a, g in rows]
    total = sum(a for _, a, g in rows if g == grain)
    question = (f"The document has ledger lines scattered through it. Adding up every ledger line, how many "
                f"bushels of {grain} were received in total? Answer with the number.")
    return question, str(total), _document(corpus, size, records, rng), {"grain": grain, "lines": count}


# -- notes ------------------------------------------------------------------------------------------
_BIRDS = ["heron", "wren", "kestrel", "lapwing", "curlew", "nightingale", "magpie", "osprey", "bittern",
          "plover", "linnet", "goldfinch"]
_OTHERS = ["otter", "badger", "hare", "stoat", "trout", "pike", "newt", "adder", "vole", "hedgehog", "toad",
           "weasel", "mole", "salmon"]
_PLACES = ["the mill", "the ford", "the old bridge", "the chapel wall", "the orchard", "the weir", "the common"]
_NOTE_TEMPLATES = [
    "Traveller's note: near {place} I came upon a {creature}, and watched it for a while before moving on.",
    "Traveller's note: by {place} a {creature} kept me company through the grey morning.",
    "Traveller's note: at {place} the children showed me a {creature} they had found that day.",
]
_NOTE_RE = re.compile(r"Traveller's note: [^\n]*?\ba (\w+)(?:,| kept| they)")


def _notes(corpus: str, size: int, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    birds = rng.randint(3, 8)
    others = rng.randint(4, 9)
    creatures = rng.sample(_BIRDS, birds) + rng.sample(_OTHERS, others)
    rng.shuffle(creatures)
    records = [rng.choice(_NOTE_TEMPLATES).format(place=rng.choice(_PLACES), creature=c) for c in creatures]
    question = ("The document contains travellers' notes (each begins \"Traveller's note:\"). How many of "
                "those notes describe a bird? Answer with the number.")
    return question, str(birds), _document(corpus, size, records, rng), {"notes": len(creatures)}


# -- code -------------------------------------------------------------------------------------------
_FILE_HEADER = "# ===== file: {path} ====="
_FILE_RE = re.compile(r"^# ===== file: (\S+) =====$", re.MULTILINE)


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files on this machine (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _defaults(tree: ast.AST) -> dict[str, list[tuple[str, str]]]:
    """function name -> [(parameter, default source)] for functions defined once in the tree."""
    found: dict[str, list[tuple[str, str]]] = {}
    seen: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            seen[node.name] = seen.get(node.name, 0) + 1
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            found[node.name] = [(a.arg, ast.unparse(d)) for a, d in pairs if len(ast.unparse(d)) <= 24]
    return {name: pairs for name, pairs in found.items() if seen[name] == 1 and pairs and not name.startswith("_")}


def _code(size: int, rng: random.Random) -> tuple[str, str, str, dict[str, Any]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    rng.shuffle(files)
    parts: list[str] = []
    total = 0
    for path in files:
        if total >= size:
            break
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(_FILE_HEADER.format(path=path.relative_to(root).as_posix()) + "\n" + source)
        total += len(parts[-1]) + 1
    if total < size:
        raise GenerationError(f"the standard library here has {total:,} characters of source; ask for less")
    text = "\n".join(parts)[:size]
    sections = _sections(text)
    # a function defined once in the whole document, in a file that is complete and parses
    names: dict[str, int] = {}
    for name in re.findall(r"^\s*(?:async\s+)?def (\w+)", text, re.MULTILINE):
        names[name] = names.get(name, 0) + 1
    candidates: list[tuple[str, str, str, str]] = []
    for name, source in sorted(sections.items()):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue  # the last file is cut at the size limit
        for function, pairs in _defaults(tree).items():
            if names.get(function) == 1:
                candidates += [(name, function, parameter, default) for parameter, default in pairs]
    if not candidates:
        raise GenerationError("no suitable function found in the selected source; try another seed")
    chosen, function, parameter, default = rng.choice(candidates)
    question = (f"In the file {chosen} of this Python source, what is the default value of the parameter "
                f"`{parameter}` of the function `{function}`? Answer with the Python expression only.")
    return question, default, text, {"path": chosen, "function": function, "parameter": parameter}


def _sections(text: str) -> dict[str, str]:
    marks = list(_FILE_RE.finditer(text))
    return {
        m.group(1): text[m.end() + 1: (marks[i + 1].start() if i + 1 < len(marks) else len(text))]
        for i, m in enumerate(marks)
    }


# -- public -----------------------------------------------------------------------------------------
def verify_task(task: GeneratedTask) -> None:
    """Derive the answer again from ``task.context`` alone; raise GenerationError if it differs."""
    text = task.context
    if task.kind == "needle":
        values = [m.group(3) for m in _NEEDLE_RE.finditer(text)
                  if (m.group(1), m.group(2)) == (task.key["thing"], task.key["name"])]
        derived = values[0] if len(values) == 1 else f"{len(values)} matching records"
    elif task.kind == "ledger":
        lines = _LEDGER_RE.findall(text)
        if len(lines) != task.key["lines"]:
            raise GenerationError(f"{task.id}: {len(lines)} ledger lines in the text, {task.key['lines']} planted")
        derived = str(sum(int(a) for _, a, g in lines if g == task.key["grain"]))
    elif task.kind == "notes":
        creatures = _NOTE_RE.findall(text)
        if len(creatures) != task.key["notes"] or text.count("Traveller's note:") != task.key["notes"]:
            raise GenerationError(f"{task.id}: {len(creatures)} notes read back, {task.key['notes']} planted")
        if any(c not in _BIRDS and c not in _OTHERS for c in creatures):
            raise GenerationError(f"{task.id}: a note names an unknown creature")
        derived = str(sum(c in _BIRDS for c in creatures))
    elif task.kind == "code":
        source = _sections(text).get(task.key["path"])
        if source is None:
            raise GenerationError(f"{task.id}: file {task.key['path']} not in the text")
        pairs = dict(_defaults(ast.parse(source)).get(task.key["function"], []))
        derived = pairs.get(task.key["parameter"], "(parameter not found)")
        if len(re.findall(rf"^\s*(?:async\s+)?def {re.escape(task.key['function'])}\b", text, re.MULTILINE)) != 1:
            raise GenerationError(f"{task.id}: function {task.key['function']} is not unique in the text")
    elif task.kind in generate_records.RECORD_KINDS:
        try:
            derived = generate_records.derive(task.kind, text, task.key)
        except ValueError as exc:
            raise GenerationError(f"{task.id}: {exc}") from exc
    else:
        raise GenerationError(f"unknown kind {task.kind!r}")
    if derived != task.answer:
        raise GenerationError(f"{task.id}: the text says {derived!r}, the generator said {task.answer!r}")


def generate_task(kind: str, *, size: int | str, seed: int = 0, corpus: str | None = None) -> GeneratedTask:
    """One verified task of ``kind`` (see :data:`KINDS`) with a document of ``size`` characters.

    ``corpus`` (the filler text) is needed for every kind but ``code``. The same arguments give
    the same task. Raises :class:`GenerationError` for an unknown kind, a size outside 100 KB to
    50 MB, a missing corpus, or a task whose answer does not check out.
    """
    chars = parse_size(size) if isinstance(size, str) else int(size)
    if not MIN_SIZE <= chars <= MAX_SIZE:
        raise GenerationError(f"size {chars:,} is outside {MIN_SIZE:,}..{MAX_SIZE:,} characters")
    rng = random.Random(f"{kind}:{chars}:{seed}")  # str seeds are hashed deterministically
    if kind == "code":
        question, answer, text, key = _code(chars, rng)
    elif kind in KINDS:
        if not corpus:
            raise GenerationError(f"{kind} tasks need a corpus of filler text "
                                  "(e.g. examples/data/shakespeare_plays.txt)")
        if kind in generate_records.RECORD_KINDS:
            question, answer, records, key = generate_records.build(kind, rng)
            text = _document(corpus, chars, records, rng)
        else:
            build = {"needle": _needle, "ledger": _ledger, "notes": _notes}[kind]
            question, answer, text, key = build(corpus, chars, rng)
    else:
        raise GenerationError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
    task = GeneratedTask(f"{kind}-{_label(chars)}-s{seed}", kind, question, answer, text, seed, chars, key)
    verify_task(task)
    return task


def _label(chars: int) -> str:
    if chars >= 1_000_000 and chars % 100_000 == 0:
        return f"{chars / 1_000_000:g}MB"
    return f"{chars / 1000:g}KB"


def write_tasks(tasks: Sequence[GeneratedTask], directory: str | Path) -> Path:
    """Write each context to ``<directory>/<id>.txt`` and the items to ``<directory>/tasks.jsonl``
    (the user JSONL form that ``rlmflow eval --dataset`` reads); return the JSONL path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for task in tasks:
        (directory / f"{task.id}.txt").write_text(task.context, encoding="utf-8")
        lines.append(json.dumps({
            "id": task.id, "question": task.question, "answer": task.answer, "context_path": f"{task.id}.txt",
            "domain": f"generated/{task.kind}", "length": _label(task.size), "context_chars": len(task.context),
        }))
    path = directory / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
