"""Dataset loaders: LongBench v2 (original JSON and the Markdown-pair copy) and a user's JSONL.

- LongBench v2 JSON: a list (or JSON lines) of ``{_id, domain, sub_domain, difficulty, length,
  question, choice_A..choice_D, answer, context}``.
- Markdown pairs: a directory of ``sample_NNN_<difficulty>_<length>.md`` (metadata, question,
  choices, answer) each beside ``..._context.txt``; sub-directories are searched too.
- User JSONL: one ``{"question", "answer", "context" | "context_path", "choices"?, "id"?}`` per
  line; ``choices`` is a list (lettered A, B, ...) or a ``{letter: text}`` map, and
  ``context_path`` is relative to the JSONL file.

Every loader raises :class:`DatasetError` naming the file, the item and the field at fault.
Loading is blocking file I/O: call it from a worker thread in async code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .items import LETTERS, DatasetError, EvalItem

__all__ = ["ItemFilter", "load_dataset", "load_jsonl", "load_longbench_json", "load_longbench_markdown"]


@dataclass(frozen=True)
class ItemFilter:
    """Which items to keep. Each field matches case-insensitively; empty means any.

    ``domain`` matches the domain or the sub-domain as a substring ("financial", "code");
    ``difficulty`` and ``length`` are sets of exact labels (``easy``/``hard``,
    ``short``/``medium``/``long``); ``max_chars`` drops larger contexts; ``limit`` keeps the first N.
    """

    domain: Sequence[str] = ()
    difficulty: Sequence[str] = ()
    length: Sequence[str] = ()
    ids: Sequence[str] = ()
    max_chars: int | None = None
    limit: int | None = None

    def keep(self, item: EvalItem) -> bool:
        if self.domain and not any(
            d.lower() in item.domain.lower() or d.lower() in item.sub_domain.lower() for d in self.domain
        ):
            return False
        if self.difficulty and item.difficulty.lower() not in {d.lower() for d in self.difficulty}:
            return False
        if self.length and item.length.lower() not in {x.lower() for x in self.length}:
            return False
        if self.ids and item.id not in set(self.ids):
            return False
        return not (self.max_chars is not None and item.context_chars > self.max_chars)

    def apply(self, items: Iterable[EvalItem]) -> list[EvalItem]:
        kept = [item for item in items if self.keep(item)]
        return kept[: self.limit] if self.limit is not None else kept


def _text(raw: dict[str, Any], key: str, *, source: str, item: str, required: bool = True) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise DatasetError("missing", source=source, item=item, field=key)
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DatasetError(f"expected text, got {type(value).__name__}", source=source, item=item, field=key)
    if required and not value.strip():
        raise DatasetError("empty", source=source, item=item, field=key)
    return value


def _letter(answer: str, choices: dict[str, str], *, source: str, item: str) -> str:
    letter = answer.strip().strip("()").upper()
    if letter not in choices:
        raise DatasetError(f"answer {answer!r} is not one of the choices {', '.join(choices)}", source=source,
                           item=item, field="answer")
    return letter


def _longbench_item(raw: Any, index: int, source: str) -> EvalItem:
    if not isinstance(raw, dict):
        raise DatasetError(f"expected an object, got {type(raw).__name__}", source=source, item=f"#{index}")
    item_id = str(raw.get("_id") or f"#{index}")
    choices = {letter: _text(raw, f"choice_{letter}", source=source, item=item_id) for letter in LETTERS}
    context = _text(raw, "context", source=source, item=item_id)
    return EvalItem(
        id=item_id,
        question=_text(raw, "question", source=source, item=item_id),
        answer=_letter(_text(raw, "answer", source=source, item=item_id), choices, source=source, item=item_id),
        choices=choices,
        context=context,
        context_chars=len(context),
        domain=_text(raw, "domain", source=source, item=item_id, required=False),
        sub_domain=_text(raw, "sub_domain", source=source, item=item_id, required=False),
        difficulty=_text(raw, "difficulty", source=source, item=item_id, required=False),
        length=_text(raw, "length", source=source, item=item_id, required=False),
        source=source,
    )


def _json_rows(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not valid JSON ({exc})", source=str(path)) from exc
        if not isinstance(rows, list):  # pragma: no cover - a '[' always parses to a list
            raise DatasetError("expected a JSON list of items", source=str(path))
        return rows
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"line {number} is not valid JSON ({exc.msg})", source=str(path),
                               item=f"line {number}") from exc
    return rows


def load_longbench_json(path: str | Path) -> list[EvalItem]:
    """Items of a LongBench v2 file in its original form (a JSON list or JSON lines)."""
    path = Path(path)
    return [_longbench_item(raw, index, str(path)) for index, raw in enumerate(_json_rows(path))]


_SECTION = re.compile(r"^#\s+(\w+)\s*$", re.MULTILINE)
_BULLET = re.compile(r"^-\s*([^:]+?)\s*:\s?(.*)$")
_METADATA_KEYS = {"id": "id", "domain": "domain", "subdomain": "sub_domain", "sub-domain": "sub_domain",
                  "difficulty": "difficulty", "length": "length"}


def _markdown_item(path: Path) -> EvalItem:
    source = str(path)
    text = path.read_text(encoding="utf-8")
    sections: dict[str, str] = {}
    marks = list(_SECTION.finditer(text))
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        end = following.start() if following else len(text)
        sections[mark.group(1).lower()] = text[mark.end():end].strip()
    name = path.stem
    metadata: dict[str, str] = {}
    for line in sections.get("metadata", "").splitlines():
        found = _BULLET.match(line.strip())
        if found and found.group(1).strip().lower() in _METADATA_KEYS:
            metadata[_METADATA_KEYS[found.group(1).strip().lower()]] = found.group(2).strip()
    item_id = metadata.get("id") or name
    for key in ("question", "choices", "answer"):
        if not sections.get(key):
            raise DatasetError(f"no '# {key.title()}' section", source=source, item=item_id, field=key)
    choices: dict[str, str] = {}
    for line in sections["choices"].splitlines():
        found = _BULLET.match(line.strip())
        if found and found.group(1).strip().upper() in LETTERS:
            choices[found.group(1).strip().upper()] = found.group(2).strip()
    missing = [letter for letter in LETTERS if not choices.get(letter)]
    if missing:
        raise DatasetError(f"choice(s) {', '.join(missing)} missing or empty", source=source, item=item_id,
                           field="choices")
    context_path = path.with_name(f"{name}_context.txt")
    if not context_path.is_file():
        raise DatasetError(f"the context file {context_path.name} is missing", source=source, item=item_id,
                           field="context")
    # a file name like sample_018_easy_long.md carries difficulty and length when metadata lacks them
    parts = name.split("_")
    return EvalItem(
        id=item_id,
        question=sections["question"],
        answer=_letter(sections["answer"].split()[0], choices, source=source, item=item_id),
        choices=choices,
        context_path=context_path,
        context_chars=context_path.stat().st_size,  # bytes: close to characters, known without reading
        domain=metadata.get("domain", ""),
        sub_domain=metadata.get("sub_domain", ""),
        difficulty=metadata.get("difficulty") or (parts[-2] if len(parts) >= 4 else ""),
        length=metadata.get("length") or (parts[-1] if len(parts) >= 4 else ""),
        source=source,
    )


def load_longbench_markdown(directory: str | Path) -> list[EvalItem]:
    """Items of a directory of Markdown pairs (``sample_*.md`` + ``sample_*_context.txt``), sorted by file name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError("not a directory", source=str(directory))
    files = sorted((p for p in directory.rglob("*.md") if p.name.lower() != "readme.md"), key=lambda p: (p.name, p))
    if not files:
        raise DatasetError("no Markdown items (*.md) found", source=str(directory))
    return [_markdown_item(path) for path in files]


def _choices(raw: Any, *, source: str, item: str) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, list):
        if not 2 <= len(raw) <= 26 or not all(isinstance(c, str) and c.strip() for c in raw):
            raise DatasetError("choices must be 2-26 non-empty strings", source=source, item=item, field="choices")
        return {chr(ord("A") + i): text for i, text in enumerate(raw)}
    if isinstance(raw, dict) and raw and all(
        isinstance(k, str) and len(k.strip()) == 1 and k.strip().isalpha() and isinstance(v, str)
        for k, v in raw.items()
    ):
        return {k.strip().upper(): v for k, v in raw.items()}
    raise DatasetError("choices must be a list of strings or a {letter: text} map", source=source, item=item,
                       field="choices")


def _user_item(raw: Any, number: int, base: Path, source: str) -> EvalItem:
    if not isinstance(raw, dict):
        raise DatasetError(f"expected an object, got {type(raw).__name__}", source=source, item=f"line {number}")
    item_id = str(raw.get("id") or raw.get("_id") or f"line {number}")
    choices = _choices(raw.get("choices"), source=source, item=item_id)
    answer = _text(raw, "answer", source=source, item=item_id)
    if choices:
        answer = _letter(answer, choices, source=source, item=item_id)
    context: str | None = None
    context_path: Path | None = None
    if raw.get("context") is not None:
        context = _text(raw, "context", source=source, item=item_id)
        chars = len(context)
    elif raw.get("context_path") is not None:
        context_path = base / _text(raw, "context_path", source=source, item=item_id)
        if not context_path.is_file():
            raise DatasetError(f"no file at {context_path}", source=source, item=item_id, field="context_path")
        chars = context_path.stat().st_size
    else:
        raise DatasetError("missing: give 'context' or 'context_path'", source=source, item=item_id,
                           field="context")
    return EvalItem(
        id=item_id,
        question=_text(raw, "question", source=source, item=item_id),
        answer=answer,
        choices=choices,
        context=context,
        context_path=context_path,
        context_chars=int(raw.get("context_chars") or chars),
        domain=str(raw.get("domain") or ""),
        sub_domain=str(raw.get("sub_domain") or ""),
        difficulty=str(raw.get("difficulty") or ""),
        length=str(raw.get("length") or ""),
        source=source,
    )


def load_jsonl(path: str | Path) -> list[EvalItem]:
    """Items of a user's JSONL file (see the module docstring for the fields)."""
    path = Path(path)
    source = str(path)
    items: list[EvalItem] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"not valid JSON ({exc.msg})", source=source, item=f"line {number}") from exc
        items.append(_user_item(raw, number, path.parent, source))
    return items


def _is_longbench_row(raw: Any) -> bool:
    return isinstance(raw, dict) and ("choice_A" in raw or "_id" in raw)


def load_dataset(path: str | Path, *, item_filter: ItemFilter | None = None) -> list[EvalItem]:
    """Load any supported form, chosen by what ``path`` is and holds, then filter.

    A directory is read as Markdown pairs; a file whose rows have ``choice_A`` or ``_id`` as
    LongBench v2 JSON; any other ``.jsonl`` as a user's JSONL. Duplicate ids are an error.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError("no such file or directory", source=str(path))
    if path.is_dir():
        items = load_longbench_markdown(path)
    else:
        rows = _json_rows(path)
        if rows and _is_longbench_row(rows[0]):
            items = [_longbench_item(raw, index, str(path)) for index, raw in enumerate(rows)]
        else:
            items = load_jsonl(path)
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DatasetError("duplicate id", source=str(path), item=item.id, field="id")
        seen.add(item.id)
    return (item_filter or ItemFilter()).apply(items)
