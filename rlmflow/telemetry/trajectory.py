"""An opt-in JSONL record of runs, for replay, debugging and ``rlmflow trace``.

One line per event: ``run_start``, ``turn``, ``call`` (every model call, root and sub, at every
depth), ``run_end``. The context is recorded once, by its sha256 and sizes (never its text), and
cell outputs are capped, so the file grows with the work done, not with turns x context.

    async with RLM(..., trajectory=Trajectory("run.jsonl")) as rlm:
        await rlm.run(document, query)

Writes go to a buffered file (a few hundred bytes each); the file is flushed at the end of every
run and closed by :meth:`close` (``RLM.aclose`` calls it).
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

from .._text import cap_text
from .._util import json_line

__all__ = ["Trajectory"]


class Trajectory:
    """Appends run events to a JSONL file. Safe to share between concurrent runs."""

    def __init__(self, path: str | Path, *, max_output_chars: int = 2000) -> None:
        self.path = Path(path)
        self.max_output_chars = max_output_chars
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._contexts: set[str] = set()

    def _write(self, record: dict[str, Any]) -> None:
        line = json_line(record, default=_jsonable)
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line + "\n")

    def context(self, sha256: str, info: dict[str, Any]) -> None:
        """Record a context once per file, by hash."""
        if sha256 in self._contexts:
            return
        self._contexts.add(sha256)
        self._write({"type": "context", "sha256": sha256, **info})

    def event(self, kind: str, **fields: Any) -> None:
        self._write({"type": kind, **fields})

    def cap(self, text: str | None) -> str | None:
        return None if text is None else cap_text(text, self.max_output_chars)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
