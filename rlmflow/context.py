"""Checking a context value and loading one from files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ._exceptions import ContextError
from .sandbox.base import Context

__all__ = ["LoadedContext", "context_digest", "context_size", "load_context_files", "validate_context"]


def validate_context(context: object) -> Context:
    """Return ``context`` if it is a non-empty str, list of str or dict of str; else raise ContextError."""
    if isinstance(context, str):
        if not context.strip():
            raise ContextError("the context is empty: give the document text to work on")
        return context
    if isinstance(context, Mapping):
        if not context:
            raise ContextError("the context is an empty dict: give at least one named document")
        for name, text in context.items():
            if not isinstance(name, str) or not isinstance(text, str):
                raise ContextError(f"a dict context maps names (str) to documents (str); got {name!r}: "
                                   f"{type(text).__name__}")
        if not any(text.strip() for text in context.values()):
            raise ContextError("every document of the context is empty")
        return context
    if isinstance(context, Sequence) and not isinstance(context, (bytes, bytearray)):
        if not context:
            raise ContextError("the context is an empty list: give at least one document")
        for index, text in enumerate(context):
            if not isinstance(text, str):
                raise ContextError(f"a list context holds str documents; item {index} is {type(text).__name__}")
        if not any(text.strip() for text in context):
            raise ContextError("every document of the context is empty")
        return list(context)
    if isinstance(context, (bytes, bytearray)):
        raise ContextError("the context is bytes: decode it to str first (e.g. data.decode('utf-8', 'replace'))")
    raise ContextError(f"unsupported context type {type(context).__name__}: use str, list[str] or dict[str, str]")


def context_size(context: Context) -> int:
    """Characters in all documents of ``context``."""
    if isinstance(context, str):
        return len(context)
    documents = context.values() if isinstance(context, Mapping) else context
    return sum(len(text) for text in documents)


def context_digest(context: Context) -> str:
    """sha256 of the context (its JSON form for several documents). Hashes 100 MB in ~0.2 s:
    call it from a worker thread in async code."""
    text = context if isinstance(context, str) else json.dumps(context, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()


@dataclass
class LoadedContext:
    """Documents read from files, and what was odd about them (for the user, not the model)."""

    context: Context
    warnings: list[str] = field(default_factory=list)


def _read_document(path: Path, warnings: list[str]) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ContextError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise ContextError(f"{path} is a directory; pass the files inside it") from None
    except OSError as exc:
        raise ContextError(f"cannot read {path}: {exc.strerror or exc}") from None
    if b"\x00" in data[:8192]:
        raise ContextError(f"{path} looks binary (it contains NUL bytes); convert it to text first")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd")
        warnings.append(
            f"{path} is not valid UTF-8 (first bad byte at offset {exc.start}); decoded with "
            f"replacement characters ({bad:,} replaced)"
        )
        return text


def load_context_files(paths: Sequence[str | Path]) -> LoadedContext:
    """One file gives a str context; several give a dict keyed by file name (made unique)."""
    if not paths:
        raise ContextError("no context file given")
    warnings: list[str] = []
    documents: dict[str, str] = {}
    for raw in paths:
        path = Path(raw)
        name = path.name
        suffix = 2
        while name in documents:
            name = f"{path.name}#{suffix}"
            suffix += 1
        documents[name] = _read_document(path, warnings)
    context: Context = next(iter(documents.values())) if len(documents) == 1 else documents
    return LoadedContext(validate_context(context), warnings)
