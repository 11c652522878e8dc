"""A deterministic model for tests, documentation and offline development."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence

import anyio

from .._exceptions import FatalModelError
from ..dispatch.pricing import Price
from .base import ModelRequest, ModelResponse, Usage, estimate_tokens

ScriptReply = str | ModelResponse | BaseException
ScriptFunction = Callable[[ModelRequest], ScriptReply | Awaitable[ScriptReply]]


class ScriptedModel:
    """Answers from a list of replies (in order) or from a function of the request.

    A reply may be a string, a full :class:`ModelResponse`, or an exception instance to raise
    (to script failures). Usage is counted with :func:`estimate_tokens` unless the reply is a
    ``ModelResponse``. Every request received is kept in ``requests``, in arrival order.

    Use it as the root model to drive a run from a fixed script, or as the sub-model with a
    function that answers from the prompt. It costs nothing (``price``, read by the Dispatcher).
    ``scores_choices``: it stands for a model that scores a request's ``choices`` (the script
    then writes the probabilities, as :class:`~rlmflow.models.base.ModelRequest` describes).
    """

    price = Price(0.0, 0.0)

    def __init__(
        self,
        replies: Sequence[ScriptReply] | ScriptFunction,
        *,
        name: str = "scripted",
        provider: str = "scripted",
        latency: float = 0.0,
        scores_choices: bool = False,
    ) -> None:
        self._function: ScriptFunction | None = replies if callable(replies) else None
        self._replies = [] if callable(replies) else list(replies)
        self._name = name
        self._provider = provider
        self._latency = latency
        self._scores_choices = scores_choices
        self.requests: list[ModelRequest] = []

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def name(self) -> str:
        return self._name

    @property
    def scores_choices(self) -> bool:
        return self._scores_choices

    def count_tokens(self, text: str) -> int:
        return estimate_tokens(text)

    async def request(self, request: ModelRequest) -> ModelResponse:
        self.requests.append(request)
        index = len(self.requests) - 1
        if self._latency:
            await anyio.sleep(self._latency)
        reply: ScriptReply
        if self._function is not None:
            produced = self._function(request)
            reply = await produced if inspect.isawaitable(produced) else produced
        elif index < len(self._replies):
            reply = self._replies[index]
        else:
            raise FatalModelError(
                f"ScriptedModel {self._name!r} has no reply left for request {index + 1} "
                f"(script holds {len(self._replies)})",
                provider=self._provider,
                model=self._name,
            )
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, ModelResponse):
            return reply
        prompt = "".join(m.content for m in request.messages)
        usage = Usage(estimate_tokens(prompt), estimate_tokens(reply), 1)
        return ModelResponse(text=reply, usage=usage, model=self._name, finish_reason="stop")

    async def aclose(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"ScriptedModel(name={self._name!r}, requests={len(self.requests)})"
