"""Events of a run, as they happen: for progress displays, UIs and server-sent events.

``async for event in rlm.stream(context, query)`` yields these in order. Every event names its
run (``run_id``) and depth, so a child run's events (``rlm_query``) can be told from the root's.
Events hold lengths, counts and short texts the root model already saw; the document never
appears in them. ``to_dict()`` gives a JSON-ready form with the event's ``kind``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from ._util import finite

__all__ = [
    "AnswerReady",
    "AnyRunEvent",
    "BatchFinished",
    "BatchStarted",
    "CellFinished",
    "CodeSubmitted",
    "Diverged",
    "EventSink",
    "Heartbeat",
    "RootText",
    "RunEvent",
    "RunFailed",
    "RunStarted",
    "SubCallDone",
    "TurnStarted",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEvent:
    """Base of all events: which run, at which depth, and when (``time.time()``)."""

    kind: ClassVar[str] = "event"
    run_id: str
    depth: int
    at: float
    seq: int = 0
    """The event's place in its stream: 1, 2, 3... over a run and its children (a heartbeat
    repeats the last one), so a client that reconnects can say where it was."""

    def to_dict(self) -> dict[str, Any]:
        """The event's fields and its ``kind``, ready for ``json.dumps`` (strict JSON: a number
        that is not finite, which only a hostile sandbox could cause, is ``None``)."""
        fields: dict[str, Any] = finite(asdict(self))
        return {"kind": self.kind, **fields}


@dataclass(frozen=True, slots=True, kw_only=True)
class RunStarted(RunEvent):
    """A run started. ``query`` is the caller's question for a root run; a child's question was
    written by sandbox code (it may quote the document), so only its length is given."""

    kind: ClassVar[Literal["run_started"]] = "run_started"
    query: str
    query_chars: int
    context_chars: int
    root_model: str
    sub_model: str
    parent_run_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TurnStarted(RunEvent):
    kind: ClassVar[Literal["turn_started"]] = "turn_started"
    turn: int
    max_turns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RootText(RunEvent):
    """A piece of the root model's reply as it is generated (models that stream: Bedrock,
    Anthropic, OpenAI-compatible)."""

    kind: ClassVar[Literal["root_text"]] = "root_text"
    turn: int
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CodeSubmitted(RunEvent):
    """The root model's reply of one turn yielded this code block (one event per block)."""

    kind: ClassVar[Literal["code"]] = "code"
    turn: int
    code: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CellFinished(RunEvent):
    """A code block ran; ``output`` is what the root model will see (capped, sanitised)."""

    kind: ClassVar[Literal["cell_output"]] = "cell_output"
    turn: int
    output: str
    output_chars: int
    error: str | None
    duration: float
    restarted: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchStarted(RunEvent):
    """Sandbox code asked for ``size`` sub-calls; ``sent`` of them go out (the rest are reused)."""

    kind: ClassVar[Literal["batch_started"]] = "batch_started"
    size: int
    sent: int
    model: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchFinished(RunEvent):
    kind: ClassVar[Literal["batch_finished"]] = "batch_finished"
    size: int
    failed: int
    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class SubCallDone(RunEvent):
    """One model call finished (root turns and sub-calls alike; ``role`` tells which).

    ``source`` is ``"cache"`` or ``"journal"`` for a call answered without a provider request
    (a cache hit costs nothing; a journal's answer costs what the run paid for it before).
    """

    kind: ClassVar[Literal["call_done"]] = "call_done"
    role: str
    model: str
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    duration: float
    error: str | None
    cache_read_tokens: int = 0  # parts of input_tokens read from / written to the provider's prompt cache
    cache_write_tokens: int = 0
    source: Literal["cache", "journal"] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AnswerReady(RunEvent):
    """The run ended with an answer; the stream's last event for a successful root run."""

    kind: ClassVar[Literal["answer"]] = "answer"
    answer: str
    turns: int
    cost_usd: float | None
    duration: float
    limited: str | None = None  # the budget cap that cut the work short, if one did


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFailed(RunEvent):
    """The run ended without an answer (``error`` is the exception's type name)."""

    kind: ClassVar[Literal["run_failed"]] = "run_failed"
    error: str
    message: str
    turns: int



@dataclass(frozen=True, slots=True, kw_only=True)
class Diverged(RunEvent):
    """A resumed run's cells printed otherwise than the journal recorded at ``turn`` (code that
    is not deterministic): from there the run goes on live, not from its record."""

    kind: ClassVar[Literal["diverged"]] = "diverged"
    turn: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(RunEvent):
    """Nothing happened for a while (a long model call, a long cell): the stream is alive.

    Sent by :class:`~rlmflow.RunStream` to its reader, never to an ``events=`` sink."""

    kind: ClassVar[Literal["heartbeat"]] = "heartbeat"
    phase: str


AnyRunEvent = (
    RunStarted | TurnStarted | RootText | CodeSubmitted | CellFinished | BatchStarted | BatchFinished
    | SubCallDone | AnswerReady | RunFailed | Diverged | Heartbeat
)
"""Every event a stream yields, as a union a type checker narrows on ``event.kind``."""

EventSink = Callable[[RunEvent], None]
"""Receives a run's events as they happen; must not block (it runs on the event loop)."""
