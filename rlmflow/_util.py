"""Small helpers shared by several modules."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

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
