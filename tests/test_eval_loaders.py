"""Loaders: LongBench v2 JSON, Markdown pairs and user JSONL, with malformed items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlmflow.eval import DatasetError, ItemFilter, load_dataset, load_jsonl, load_longbench_json

# CI has ../shared beside the repository; a worktree under /work/wt/<name> finds it one level higher
_REPO = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (_REPO.parent / "shared", _REPO.parent.parent / "shared") if p.is_dir()),
              _REPO.parent / "shared") / "data" / "longbench_v2"


def longbench_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {
        "_id": "abc123", "domain": "Multi-Document QA", "sub_domain": "Financial", "difficulty": "easy",
        "length": "short", "question": "Which?", "choice_A": "one", "choice_B": "two", "choice_C": "three",
        "choice_D": "four", "answer": "C", "context": "the document",
    }
    row.update(changes)
    return row


def test_longbench_json_list_and_lines(tmp_path: Path) -> None:
    listed = tmp_path / "data.json"
    listed.write_text(json.dumps([longbench_row(), longbench_row(_id="x2", difficulty="hard", answer="A")]))
    items = load_longbench_json(listed)
    assert [i.id for i in items] == ["abc123", "x2"]
    first = items[0]
    assert first.choices == {"A": "one", "B": "two", "C": "three", "D": "four"}
    assert first.answer == "C" and first.load_context() == "the document" and first.context_chars == 12
    lines = tmp_path / "data.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in [longbench_row(), longbench_row(_id="x2")]) + "\n")
    assert [i.id for i in load_dataset(lines)] == ["abc123", "x2"]
    hard = load_dataset(listed, item_filter=ItemFilter(difficulty=["HARD"]))
    assert [i.id for i in hard] == ["x2"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"choice_B": None}, "choice_B"),
        ({"answer": "E"}, "answer"),
        ({"question": "   "}, "question"),
        ({"context": 42.5}, None),  # numbers become text: not an error
        ({"context": ["a"]}, "context"),
    ],
)
def test_longbench_malformed_names_item_and_field(tmp_path: Path, changes: dict[str, object],
                                                  field: str | None) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([longbench_row(), longbench_row(_id="broken", **changes)]))
    if field is None:
        assert len(load_longbench_json(path)) == 2
        return
    with pytest.raises(DatasetError) as caught:
        load_longbench_json(path)
    assert caught.value.item == "broken" and caught.value.field == field
    assert "broken" in str(caught.value) and field in str(caught.value) and "bad.json" in str(caught.value)


def test_longbench_not_json_and_not_objects(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[{"_id": 1,')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_longbench_json(path)
    path.write_text(json.dumps([longbench_row(), "oops"]))
    with pytest.raises(DatasetError, match="item #1"):
        load_longbench_json(path)


MARKDOWN = """# Metadata

- ID: {id}
- Domain: Code Repository Understanding
- Subdomain: Code repo QA
- Difficulty: hard
- Length: medium

# Question

Which function?

# Choices

- A: alpha
- B: beta
- C: gamma
- D: delta

# Answer

{answer}
"""


def write_pair(directory: Path, name: str, *, answer: str = "B", context: bool = True, text: str | None = None) -> None:
    (directory / f"{name}.md").write_text(text if text is not None else MARKDOWN.format(id=name, answer=answer))
    if context:
        (directory / f"{name}_context.txt").write_text("def beta(): pass\n" * 10)


def test_markdown_pairs(tmp_path: Path) -> None:
    write_pair(tmp_path, "sample_001_hard_medium")
    sub = tmp_path / "more"
    sub.mkdir()
    write_pair(sub, "sample_002_easy_long", answer="D")
    (tmp_path / "README.md").write_text("# not an item")
    items = load_dataset(tmp_path)
    assert [i.id for i in items] == ["sample_001_hard_medium", "sample_002_easy_long"]
    assert items[0].question == "Which function?" and items[0].answer == "B"
    assert items[0].choices["C"] == "gamma" and items[0].difficulty == "hard" and items[0].length == "medium"
    assert items[0].sub_domain == "Code repo QA" and items[0].load_context().startswith("def beta")
    assert items[1].answer == "D" and items[0].context_chars == len("def beta(): pass\n" * 10)
    assert [i.id for i in load_dataset(tmp_path, item_filter=ItemFilter(domain=["code repo"], limit=1))] == [
        "sample_001_hard_medium"
    ]


@pytest.mark.parametrize(
    ("kind", "field"),
    [("no-context", "context"), ("bad-answer", "answer"), ("no-choice", "choices"), ("no-question", "question")],
)
def test_markdown_malformed(tmp_path: Path, kind: str, field: str) -> None:
    write_pair(tmp_path, "sample_001_easy_short")
    name = "sample_009_easy_short"
    text = MARKDOWN.format(id=name, answer="B")
    if kind == "bad-answer":
        text = MARKDOWN.format(id=name, answer="Z")
    elif kind == "no-choice":
        text = text.replace("- C: gamma\n", "")
    elif kind == "no-question":
        text = text.replace("# Question\n\nWhich function?\n", "")
    write_pair(tmp_path, name, text=text, context=kind != "no-context")
    with pytest.raises(DatasetError) as caught:
        load_dataset(tmp_path)
    assert caught.value.item == name and caught.value.field == field
    assert name in str(caught.value)


def test_user_jsonl(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text("the key is under the mat")
    rows = [
        {"id": "q1", "context_path": "doc.txt", "question": "Where is the key?", "answer": "under the mat"},
        {"context": "x" * 50, "question": "Pick", "answer": "b", "choices": ["yes", "no"]},
        {"id": "q3", "context": "y", "question": "Pick", "answer": "A", "choices": {"a": "up", "b": "down"}},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_dataset(path)
    assert [i.id for i in items] == ["q1", "line 2", "q3"]
    assert items[0].load_context() == "the key is under the mat" and not items[0].multiple_choice
    assert items[1].choices == {"A": "yes", "B": "no"} and items[1].answer == "B"
    assert items[2].choices == {"A": "up", "B": "down"}


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"question": "q", "answer": "a"}, "context"),
        ({"context_path": "missing.txt", "question": "q", "answer": "a"}, "context_path"),
        ({"context": "c", "answer": "a"}, "question"),
        ({"context": "c", "question": "q", "answer": "a", "choices": "abcd"}, "choices"),
        ({"context": "c", "question": "q", "answer": "C", "choices": ["x", "y"]}, "answer"),
    ],
)
def test_user_jsonl_malformed(tmp_path: Path, row: dict[str, object], field: str) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": "ok", "context": "c", "question": "q", "answer": "a"}) + "\n"
                    + json.dumps({"id": "bad", **row}) + "\n")
    with pytest.raises(DatasetError) as caught:
        load_jsonl(path)
    assert (caught.value.item, caught.value.field) == ("bad", field)


def test_user_jsonl_bad_line_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "context": "c", "question": "q", "answer": "x"}\n{oops\n')
    with pytest.raises(DatasetError, match="line 2"):
        load_dataset(path)
    path.write_text('{"id": "a", "context": "c", "question": "q", "answer": "x"}\n' * 2)
    with pytest.raises(DatasetError, match="duplicate id"):
        load_dataset(path)
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "absent.jsonl")


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/longbench_v2 is not beside the repository")
def test_shared_longbench_copy_loads() -> None:
    items = load_dataset(SHARED)
    financial = [i for i in items if i.sub_domain == "Financial"]
    code = [i for i in items if i.domain == "Code Repository Understanding"]
    assert (len(financial), len(code)) == (14, 31)  # as its README says
    assert all(i.answer in "ABCD" and len(i.choices) == 4 and i.context_chars > 0 for i in items)
