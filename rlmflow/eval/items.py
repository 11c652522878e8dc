"""One evaluation question, and the error a malformed dataset raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .._exceptions import ConfigurationError

__all__ = ["LETTERS", "DatasetError", "EvalItem"]

LETTERS = ("A", "B", "C", "D")


class DatasetError(ConfigurationError):
    """A dataset item is malformed. ``source`` is the file, ``item`` the item's id or position,
    ``field`` the offending field (``None`` when the whole item or file is unusable)."""

    def __init__(self, message: str, *, source: str, item: str | None = None, field: str | None = None) -> None:
        where = source + (f", item {item}" if item is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")
        self.source = source
        self.item = item
        self.field = field


@dataclass(frozen=True)
class EvalItem:
    """A question over a long context with a known answer.

    ``choices`` maps letters to options for multiple-choice items (the answer is then a letter);
    free-form items have no choices and an answer value. The context is kept on disk when it
    comes from a file (``context_path``) and read only when the item runs, so a dataset of large
    documents does not sit in memory at once.
    """

    id: str
    question: str
    answer: str
    choices: dict[str, str] = field(default_factory=dict)
    context: str | None = None
    context_path: Path | None = None
    context_chars: int = 0
    domain: str = ""
    sub_domain: str = ""
    difficulty: str = ""
    length: str = ""
    source: str = ""

    def load_context(self) -> str:
        """The context text. Blocking for a file: call it from a worker thread in async code."""
        if self.context is not None:
            return self.context
        if self.context_path is None:  # pragma: no cover - the loaders never build such an item
            raise DatasetError("no context", source=self.source, item=self.id, field="context")
        try:
            return self.context_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DatasetError(f"cannot read {self.context_path}: {exc}", source=self.source, item=self.id,
                               field="context_path") from exc

    @property
    def multiple_choice(self) -> bool:
        return bool(self.choices)

    def prompt(self) -> str:
        """The question as the models see it: choices listed, and how to answer."""
        if not self.choices:
            return f"{self.question}\n\nAnswer with the exact value only (a name, number or short phrase)."
        options = "\n".join(f"({letter}) {text}" for letter, text in self.choices.items())
        return (
            f"{self.question}\n\n{options}\n\n"
            "Exactly one choice is correct. Answer with its letter only: A, B, C or D."
        )
