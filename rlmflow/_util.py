"""Small helpers shared by several modules."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


@contextmanager
def single_exception() -> Iterator[None]:
    """Re-raise a task group's lone exception as itself.

    A task group wraps even a single failure in an exception group; callers of the public API
    expect ``SandboxCrashedError``, not a group holding one. Groups of several stay groups.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from inner.__cause__


def json_line(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """``value`` as one line of strict JSON, whatever a sandbox put in it.

    NaN and infinities (which ``json.dumps`` writes as invalid ``NaN``/``Infinity``) become
    ``null``; U+2028 and U+2029 are escaped, since many line readers (``str.splitlines``, browsers'
    JavaScript before ES2019) take them for line ends.
    """
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, default=default)
    except ValueError:  # a non-finite number somewhere: the slow path, rarely taken
        text = json.dumps(finite(value, default), ensure_ascii=False, allow_nan=False, default=default)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def finite(value: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (containers copied)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item, default) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item, default) for item in value]
    if is_dataclass(value) and not isinstance(value, type):
        return finite(asdict(value), default)
    if default is not None and not isinstance(value, str | int | bool | type(None)):
        return finite(default(value))
    return value
