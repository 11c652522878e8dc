"""The seam between the engine and a sandbox: what a sandbox must do, and what a cell returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

Context = str | Sequence[str] | Mapping[str, str]
"""A document, a list of documents, or named documents."""

Bridge = Callable[[str, dict[str, Any]], Awaitable[Any]]
"""The host function sandbox code reaches: ``await bridge("llm_query_many", {"prompts": [...]})``.

It raises :class:`rlmflow.RLMError` subclasses; the sandbox turns them into exceptions of the
same name inside model code.
"""


@dataclass(frozen=True, slots=True)
class CellResult:
    """What one executed cell produced.

    ``output`` is stdout and stderr interleaved, already capped (head + tail) by the sandbox;
    ``output_chars`` is the true length. ``final`` is the answer given to ``FINAL`` in this
    cell, if any. ``restarted`` means the worker was replaced and variables were lost.
    """

    output: str
    output_chars: int
    error: str | None = None
    final: str | None = None
    duration: float = 0.0
    timed_out: bool = False
    restarted: bool = False
    notes: Sequence[str] = field(default_factory=tuple)

    @property
    def has_final(self) -> bool:
        return self.final is not None


class SandboxSession(Protocol):
    """A live sandbox with ``context`` loaded and a persistent namespace."""

    async def execute(self, code: str) -> CellResult:
        """Run one cell. Never raises for errors in the code; raises ``SandboxError`` if the
        sandbox itself cannot go on."""
        ...

    @property
    def restarts(self) -> int:
        """How many times the worker was replaced."""
        ...


class Sandbox(Protocol):
    """A factory of sandbox sessions; one session per run (children get their own)."""

    def session(self, context: Context, bridge: Bridge) -> AbstractAsyncContextManager[SandboxSession]:
        """Open a session with ``context`` preloaded and ``bridge`` serving host calls."""
        ...
