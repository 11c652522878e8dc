"""The one interface every model implements, and the values that cross it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and calls of one call, or summed over many."""

    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.calls + other.calls,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What is sent to a model: the messages and the generation limit."""

    messages: Sequence[Message]
    max_tokens: int = 1024
    temperature: float = 0.0
    stop: Sequence[str] = ()

    @classmethod
    def from_prompt(cls, prompt: str, *, max_tokens: int = 1024, system: str | None = None) -> ModelRequest:
        messages = [Message("system", system)] if system else []
        messages.append(Message("user", prompt))
        return cls(messages=tuple(messages), max_tokens=max_tokens)

    @property
    def prompt_chars(self) -> int:
        return sum(len(m.content) for m in self.messages)


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """A model's reply with the usage of this call alone."""

    text: str
    usage: Usage
    model: str
    finish_reason: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class LanguageModel(Protocol):
    """A chat model. Implementations translate ``ModelRequest`` to one provider's wire protocol.

    ``request`` raises a subclass of :class:`rlmflow.ModelError` on failure; it never retries
    (the Dispatcher owns retries) and it must be cancellable.
    """

    @property
    def provider(self) -> str:
        """Provider name as in OpenTelemetry's ``gen_ai.provider.name`` (``openai``, ``aws.bedrock``...)."""
        ...

    @property
    def name(self) -> str:
        """The model id sent to the provider."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this model; an estimate where no tokenizer is available."""
        ...

    async def request(self, request: ModelRequest) -> ModelResponse:
        """Send one request and return the reply."""
        ...

    async def aclose(self) -> None:
        """Release clients and native resources."""
        ...


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: about four characters a token for English and code."""
    return max(1, (len(text) + 3) // 4)
