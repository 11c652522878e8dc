"""The seam between the engine and a sandbox: what a sandbox must do, and what a cell returns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..telemetry import attributes as attr

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
    ``established`` names the variables the cell created or changed, one short line each, as the
    sandbox's own code (not the cell's namespace) reports them ("" where a sandbox does not).
    """

    output: str
    output_chars: int
    error: str | None = None
    final: str | None = None
    duration: float = 0.0
    timed_out: bool = False
    restarted: bool = False
    notes: Sequence[str] = field(default_factory=tuple)
    established: str = ""

    @property
    def has_final(self) -> bool:
        return self.final is not None


Isolation = Literal["auto", "strict", "none"]
"""``auto``: the strongest layers available, one warning per process naming what is missing;
``strict``: refuse to run unless filesystem, network, exec and process confinement all hold;
``none``: no confinement (resource limits and lifecycle only), chosen explicitly."""


@dataclass(frozen=True, slots=True)
class SandboxReport:
    """Which isolation layers hold for a sandbox session, probed when its worker started.

    ``layers`` describes each applied layer; ``missing`` names each layer the mode wanted but
    the platform lacks, with the reason. The four booleans are the properties ``strict`` needs:
    ``filesystem`` (host files beyond the runtime and context unreadable, nothing writable but
    scratch), ``network`` (no socket can be opened, or only inside an empty network namespace),
    ``exec`` (no program can be executed, ``memfd`` included), ``processes`` (no new process,
    no signal or ptrace to another). ``confined`` is all four.
    """

    backend: str
    mode: str
    layers: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    filesystem: bool = False
    network: bool = False
    exec: bool = False
    processes: bool = False

    @property
    def confined(self) -> bool:
        return self.filesystem and self.network and self.exec and self.processes

    def attributes(self) -> dict[str, Any]:
        """The report as OpenTelemetry span attributes (``rlm.sandbox.*``)."""
        return {
            attr.RLM_SANDBOX_BACKEND: self.backend,
            attr.RLM_SANDBOX_ISOLATION: self.mode,
            attr.RLM_SANDBOX_LAYERS: list(self.layers),
            attr.RLM_SANDBOX_MISSING: list(self.missing),
            attr.RLM_SANDBOX_CONFINED: self.confined,
            **{
                f"{attr.RLM_SANDBOX_PROPERTY_PREFIX}{name}": getattr(self, name)
                for name in ("filesystem", "network", "exec", "processes")
            },
        }

    def summary(self) -> str:
        """One line for ``rlmflow run -v`` and logs."""
        held = [name for name in ("filesystem", "network", "exec", "processes") if getattr(self, name)]
        text = f"sandbox {self.backend} isolation={self.mode}: confines {', '.join(held) or 'nothing'}"
        if self.missing:
            text += f"; missing: {'; '.join(self.missing)}"
        return text


class SandboxSession(Protocol):
    """A live sandbox with ``context`` loaded and a persistent namespace.

    A session may also expose ``report`` (a :class:`SandboxReport`); the engine reads it with
    ``getattr`` so backends that cannot probe their isolation still fit.
    """

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
