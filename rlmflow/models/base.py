"""The one interface every model implements, and the values that cross it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from .._exceptions import ModelError

Role = Literal["system", "user", "assistant"]
ReasoningEffort = Literal["minimal", "low", "medium", "high"]
#: Receives each piece of text as a streaming model produces it (the live display of a root turn).
TextCallback = Callable[[str], None]
E = TypeVar("E", bound="ModelError")


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message.

    ``cache_point``: the conversation up to the end of this message is a prefix worth caching
    (a system prompt, a turn of history every later turn repeats, a prefix many prompts share).
    A model that caches prompts sends a cache point there when its rules allow
    (:mod:`rlmflow.models.caching`); the others ignore it. It never changes what the model reads.
    """

    role: Role
    content: str
    cache_point: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens and calls of one call, or summed over many.

    ``input_tokens`` counts every input token the provider processed, cached or not;
    ``cache_read_tokens`` and ``cache_write_tokens`` are the parts of it read from or written to
    a prompt cache (priced differently). ``estimated`` is true when a provider reported no usage
    and the numbers were estimated from the text (a sum is estimated if any part is).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    calls: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    estimated: bool = False
    cached_calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.calls + other.calls,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.estimated or other.estimated,
            self.cached_calls + other.cached_calls,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What is sent to a model: the messages, the generation limit and sampling settings.

    ``temperature`` and ``top_p`` set to ``None`` are left to the provider's default (reasoning
    models reject ``temperature``: their adapters drop it). ``reasoning_effort`` is passed to
    providers that take one (OpenAI reasoning models) and ignored by the others. ``json_schema``:
    the reply must be one JSON object of this schema; models with constrained decoding (the
    embedded llama.cpp model: a grammar built from the schema) enforce it, the others are asked in
    words only, so a caller still parses the reply leniently.

    ``choices``: the reply is to be one of these strings, continuing the messages (a last
    ``assistant`` message is the reply's beginning, written for the model). A model that scores text
    (``scores_choices`` true: the embedded llama.cpp model) generates nothing: its reply is a JSON
    object of each choice's probability, normalized over the choices, so a caller can weigh how sure
    the model is, not only which choice it prefers (its usage counts the choices' tokens as output,
    so ``max_tokens`` should cover them all). The others ignore ``choices`` and reply as usual.
    """

    messages: Sequence[Message]
    max_tokens: int = 1024
    temperature: float | None = 0.0
    stop: Sequence[str] = ()
    top_p: float | None = None
    reasoning_effort: ReasoningEffort | None = None
    json_schema: Mapping[str, Any] | None = None
    choices: Sequence[str] = ()

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


@runtime_checkable
class StreamingLanguageModel(LanguageModel, Protocol):
    """A model that can also hand out its reply piece by piece while it is generated."""

    async def request_stream(self, request: ModelRequest, on_text: TextCallback) -> ModelResponse:
        """Send one request, call ``on_text`` with each piece of text as it arrives, return the whole reply."""
        ...


@runtime_checkable
class TokenCountingModel(LanguageModel, Protocol):
    """A model whose provider counts a request's input tokens exactly, without running the model
    (Bedrock's ``CountTokens``, Anthropic's ``/v1/messages/count_tokens``).

    A count is a request to the provider like any other (its credentials, its timeouts, the test
    guard), free but not instant: use it where an exact count matters (a window check before
    sending a long prompt), :meth:`LanguageModel.count_tokens` everywhere else.
    :class:`rlmflow.models.counting.PromptCounter` asks for one and falls back to the estimate.
    """

    async def count_request_tokens(self, request: ModelRequest) -> int:
        """The input tokens the provider counts for ``request`` (system prompt and messages).

        Raises a :class:`rlmflow.ModelError` subclass as :meth:`request` does: a
        :class:`FatalModelError` when the provider does not count for this model.
        """
        ...


def scores_choices(model: LanguageModel) -> bool:
    """Whether ``model`` answers a request's ``choices`` with their probabilities (:class:`ModelRequest`)."""
    return getattr(model, "scores_choices", False) is True


def split_system(request: ModelRequest) -> tuple[list[str], list[Message]]:
    """The system messages' texts, and the other messages (for APIs that take the system prompt apart)."""
    system = [m.content for m in request.messages if m.role == "system"]
    return system, [m for m in request.messages if m.role != "system"]


def estimated_usage(request: ModelRequest, text: str) -> Usage:
    """Usage estimated from the text, for a provider that reported none; marked ``estimated``."""
    return Usage(sum(estimate_tokens(m.content) for m in request.messages), estimate_tokens(text), 1, estimated=True)


def note_partial_output(error: E, parts: Sequence[str]) -> E:
    """``error`` with the output streamed before it failed: its length added to the message, the
    text itself kept on the error (read it with :func:`partial_output`)."""
    if parts:
        text = "".join(parts)
        error.message = f"{error.message} (after {len(text)} characters of output)"
        error.args = (error.message,)
        error.__dict__["partial_output"] = text  # pickled with the error (RLMError.__reduce__)
    return error


def partial_output(error: BaseException) -> str:
    """The text a streamed reply had produced when it failed (empty if none, or not a stream)."""
    return str(error.__dict__.get("partial_output", ""))


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate: about four characters a token for English and code."""
    return max(1, (len(text) + 3) // 4)


class ModelView:
    """``model`` seen through a wrapper that changes only how a request is made: given to the
    Dispatcher in the model's place, it uses the same lane (provider, name and every other
    attribute are the model's own), and closing it leaves the model to whoever made it."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def name(self) -> str:
        return self.model.name

    def count_tokens(self, text: str) -> int:
        return self.model.count_tokens(text)

    async def request(self, request: ModelRequest) -> ModelResponse:
        return await self.model.request(request)

    async def aclose(self) -> None:
        return None  # the model belongs to whoever made it

    def __getattr__(self, name: str) -> object:  # endpoint, lane_limits, price, reserve_connections...
        return getattr(self.model, name)


class StreamingView(ModelView):
    """``model`` whose :meth:`request` streams, handing each piece of text to ``on_text``.

    For a root model shown live: ``dispatcher.call(StreamingView(root, on_text), ...)`` goes
    through the same lane as ``root``.
    """

    def __init__(self, model: StreamingLanguageModel, on_text: TextCallback) -> None:
        super().__init__(model)
        self.streaming = model
        self.on_text = on_text

    async def request(self, request: ModelRequest) -> ModelResponse:
        return await self.streaming.request_stream(request, self.on_text)
