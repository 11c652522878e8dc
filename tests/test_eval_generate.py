"""Generated tasks: deterministic, of the asked size, and their answers read back from their text."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from rlmflow.eval import KINDS, GenerationError, generate_task, load_dataset, score, verify_task, write_tasks
from rlmflow.eval import generate_records as records_mod
from rlmflow.eval.generate import _document, _paragraphs, parse_size

CORPUS_PATH = Path(__file__).resolve().parents[1] / "examples" / "data" / "shakespeare_plays.txt"


@pytest.fixture(scope="module")
def corpus() -> str:
    return CORPUS_PATH.read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", KINDS)
def test_tasks_are_deterministic_sized_and_verified(kind: str, corpus: str) -> None:
    task = generate_task(kind, size="100KB", seed=3, corpus=corpus)
    again = generate_task(kind, size=100_000, seed=3, corpus=corpus)
    other = generate_task(kind, size="100KB", seed=4, corpus=corpus)
    assert task == again and task.id == f"{kind}-100KB-s3"
    assert (task.context, task.question) != (other.context, other.question)
    assert 99_000 <= len(task.context) <= 100_000
    verify_task(task)  # also done inside generate_task; here as the spec of what is checked
    assert score(f"The answer is {task.answer}", task.answer)[1]


def test_needle_has_decoys_and_one_true_record(corpus: str) -> None:
    task = generate_task("needle", size="200KB", seed=1, corpus=corpus)
    records = re.findall(r"Archive record: the combination of the ([a-z ]+) of (\w+ \w+) is (\d+)\.", task.context)
    assert len(records) == 6  # the fact and five decoys that differ in one part of the key
    true = [r for r in records if (r[0], r[1]) == (task.key["thing"], task.key["name"])]
    assert [r[2] for r in true] == [task.answer]
    assert len({r[2] for r in records}) == 6


def test_ledger_needs_every_line(corpus: str) -> None:
    task = generate_task("ledger", size="300KB", seed=2, corpus=corpus)
    lines = re.findall(r"received (\d+) bushels of (\w+)", task.context)
    grain = task.key["grain"]
    mine = [int(a) for a, g in lines if g == grain]
    assert len(mine) >= 5 and any(g != grain for _, g in lines) and str(sum(mine)) == task.answer
    assert sum(mine[:-1]) != int(task.answer)  # missing any one line gives a wrong total


def test_notes_share_no_keyword(corpus: str) -> None:
    task = generate_task("notes", size="150KB", seed=5, corpus=corpus)
    notes = re.findall(r"Traveller's note: [^\n]*", task.context)
    assert len(notes) == task.key["notes"]
    from rlmflow.eval.generate import _BIRDS

    bird_notes = [n for n in notes if any(re.search(rf"\b{b}\b", n) for b in _BIRDS)]
    other_notes = [n for n in notes if n not in bird_notes]
    assert str(len(bird_notes)) == task.answer and other_notes
    words = lambda note: set(re.findall(r"[a-z]+", note.lower()))  # noqa: E731
    common_to_birds = set.intersection(*(words(n) for n in bird_notes))
    # every word all bird notes share also appears in other notes: no keyword finds the birds
    assert not [w for w in common_to_birds if not any(w in words(n) for n in other_notes)]


def test_code_question_over_the_stdlib(corpus: str) -> None:
    task = generate_task("code", size="500KB", seed=0)
    assert task.key["path"].endswith(".py") and f"# ===== file: {task.key['path']} =====" in task.context
    assert f"`{task.key['function']}`" in task.question and task.answer


def test_tampered_task_fails_verification(corpus: str) -> None:
    for kind in KINDS:
        task = generate_task(kind, size="100KB", seed=0, corpus=corpus)
        wrong = "42424242" if task.answer != "42424242" else "1"
        with pytest.raises(GenerationError, match="the text says"):
            verify_task(replace(task, answer=wrong))
    ledger = generate_task("ledger", size="100KB", seed=0, corpus=corpus)
    cut = ledger.context.replace("Ledger line:", "Ledger-line:", 1)
    with pytest.raises(GenerationError, match="ledger lines in the text"):
        verify_task(replace(ledger, context=cut))


def test_bad_requests(corpus: str) -> None:
    with pytest.raises(GenerationError, match="outside"):
        generate_task("needle", size="10KB", corpus=corpus)
    with pytest.raises(GenerationError, match="outside"):
        generate_task("needle", size="51MB", corpus=corpus)
    with pytest.raises(GenerationError, match="unknown kind"):
        generate_task("riddle", size="100KB", corpus=corpus)
    with pytest.raises(GenerationError, match="need a corpus"):
        generate_task("ledger", size="100KB")
    with pytest.raises(GenerationError, match="bad size"):
        parse_size("lots")
    assert parse_size("1.5MB") == 1_500_000 and parse_size("250000") == 250_000


def test_large_task_and_written_dataset(tmp_path: Path, corpus: str) -> None:
    big = generate_task("ledger", size="5MB", seed=0, corpus=corpus)  # larger than the corpus: repeated
    assert len(big.context) == pytest.approx(5_000_000, rel=0.01)
    small = generate_task("needle", size="100KB", seed=0, corpus=corpus)
    path = write_tasks([small, big], tmp_path)
    items = load_dataset(path)
    assert [i.id for i in items] == [small.id, big.id]
    assert items[1].load_context() == big.context and items[1].answer == big.answer
    assert items[0].domain == "generated/needle" and items[1].length == "5MB"


# -- record tasks: every layout, every kind, decoys in other units -------------------------------------
SEEDS = range(64)
PAYMENT_KINDS = ("total", "largest", "smallest")


@pytest.fixture(scope="module")
def filler(corpus: str) -> str:
    return "\n\n".join(_paragraphs(corpus)[:80])  # a small corpus: planting stays fast


def _planted(kind: str, seed: int, filler: str) -> tuple[str, str, str, list[str], dict[str, object]]:
    rng = random.Random(f"{kind}:{seed}")
    question, answer, records, key = records_mod.build(kind, rng)
    return question, answer, _document(filler, 12_000, records, rng), records, key


@pytest.mark.parametrize("kind", [*PAYMENT_KINDS, "count"])
def test_record_tasks_read_back_in_every_layout_and_wording(kind: str, filler: str) -> None:
    formats = records_mod.CARGO_FORMATS if kind == "count" else records_mod.PAYMENT_FORMATS
    seen_formats, seen_wordings = set(), set()
    for seed in SEEDS:
        question, answer, text, records, key = _planted(kind, seed, filler)
        assert records_mod.derive(kind, text, key) == answer, (seed, key)
        seen_formats.add(key["format"])
        paragraphs = {p.strip() for p in re.split(r"\n\s*\n", text)}
        for record in records:
            assert record in paragraphs  # one paragraph each (a key-value block too)
            if key["format"] == "json":
                assert json.loads(record)["entry"] > 0
        seen_wordings |= {w for w in records_mod.QUESTIONS[kind]
                          if re.fullmatch(re.escape(w).replace(r"\{payer\}", ".+").replace(r"\{unit\}", r"\w+")
                                          .replace(r"\{cargo\}", r"\w+"), question)}
    assert seen_formats == set(formats) and len(formats) >= 7
    assert len(records_mod.QUESTIONS[kind]) >= 6 and len(seen_wordings) >= 6


@pytest.mark.parametrize("kind", PAYMENT_KINDS)
def test_records_in_other_units_never_count(kind: str, filler: str) -> None:
    with_decoys = set()
    for seed in SEEDS:
        question, answer, text, records, key = _planted(kind, seed, filler)
        if not key["decoys"]:
            continue
        with_decoys.add(key["format"])
        assert re.search(rf"\b{key['unit']}\b", question)  # the question names the unit it asks for
        others = "|".join(u for u in ("florins", "crowns", "ducats", "marks") if u != key["unit"])
        own_elsewhere = [r for r in records if key["payer"] in r and re.search(rf"\b({others})\b", r)]
        assert len(own_elsewhere) >= key["decoys"]
        # the same records in the asked unit would change the answer: the derivation reads the unit
        blind = re.sub(rf"\b({others})\b", str(key["unit"]), text)
        changed = int(records_mod.derive(kind, blind, key))
        assert {"total": changed > int(answer), "largest": changed > int(answer),
                "smallest": changed < int(answer)}[kind], (seed, key)
    assert with_decoys == set(records_mod.PAYMENT_FORMATS)


def test_payers_include_proper_names(filler: str) -> None:
    payers = {_planted("total", seed, filler)[4]["payer"] for seed in SEEDS}
    assert any(not str(p).startswith("the ") and " " in str(p) for p in payers)
    assert any(str(p).startswith("the ") for p in payers)
