"""A request's prompt tokens where an exact count matters: the provider's count, else the estimate.

Bedrock (``CountTokens``) and Anthropic (``/v1/messages/count_tokens``) count a request's input
tokens as the model will be billed for them, without running it: a
:class:`~rlmflow.models.base.TokenCountingModel`. Everywhere else rlmflow uses the model's
``count_tokens`` (about four characters a token for a hosted model, its tokenizer for a local
one). A count is a request, and can fail (throttled, a model the provider does not count for,
the network, the timeout): :class:`PromptCounter` then falls back to ``count_tokens``, logs why,
and never raises. A model the provider refused to count for (a :class:`FatalModelError`: an
unsupported model, no permission) is not asked again by that counter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import anyio.to_thread

from .._exceptions import FatalModelError, ModelError
from .base import LanguageModel, ModelRequest, TokenCountingModel

__all__ = ["CountStatistics", "PromptCount", "PromptCounter"]

_log = logging.getLogger("rlmflow")


@dataclass(frozen=True, slots=True)
class PromptCount:
    """A request's prompt tokens: ``exact`` when the provider counted them, else the model's
    ``count_tokens`` (``fallback`` then says why the provider's count was not used, if it was asked)."""

    tokens: int
    exact: bool
    fallback: str | None = None

    def describe(self) -> str:
        """``"1,234 tokens, counted by the provider"`` or ``"~1,234 tokens, estimated"``."""
        if self.exact:
            return f"{self.tokens:,} tokens, counted by the provider"
        return f"~{self.tokens:,} tokens, estimated"


@dataclass(frozen=True, slots=True)
class CountStatistics:
    """What a :class:`PromptCounter` has done: counts by the provider, estimates, failed counts,
    and the error that made it stop asking (``None`` while it asks)."""

    exact: int
    estimated: int
    failures: int
    refused: str | None


class PromptCounter:
    """Counts the prompt tokens of requests to one model, exactly where its provider offers it.

    ``timeout`` bounds each count (seconds; the model's own client timeouts apply within it):
    a count that takes longer is a failure, and the estimate is used.
    """

    def __init__(self, model: LanguageModel, *, timeout: float = 30.0) -> None:
        self.model = model
        self.timeout = timeout
        self._exact = self._estimated = self._failures = 0
        self._refused: str | None = None

    @property
    def asks_provider(self) -> bool:
        """Whether the next count asks the provider (its model counts, and has not been refused)."""
        return isinstance(self.model, TokenCountingModel) and self._refused is None

    async def count(self, request: ModelRequest) -> PromptCount:
        """The prompt tokens of ``request``: the provider's count, or (no count, or a failed one) the estimate."""
        fallback: str | None = None
        model = self.model
        if isinstance(model, TokenCountingModel) and self._refused is None:
            try:
                with anyio.fail_after(self.timeout):
                    tokens = await model.count_request_tokens(request)
            except (ModelError, TimeoutError) as exc:
                fallback = self._failed(exc)
            else:
                self._exact += 1
                return PromptCount(int(tokens), True)
        self._estimated += 1
        text = "\n".join(m.content for m in request.messages)
        # a local model's tokenizer may take a while over megabytes: off the event loop
        return PromptCount(await anyio.to_thread.run_sync(self.model.count_tokens, text), False, fallback)

    def _failed(self, exc: Exception) -> str:
        self._failures += 1
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else f"no count within {self.timeout:g}s"
        where = f"{self.model.provider}:{self.model.name}"
        if isinstance(exc, FatalModelError):
            self._refused = reason
            _log.warning("the provider does not count tokens for %s (%s): its prompts are estimated from now on",
                         where, reason)
        else:
            _log.warning("counting the prompt tokens of %s failed (%s): estimated instead", where, reason)
        return reason

    def statistics(self) -> CountStatistics:
        return CountStatistics(self._exact, self._estimated, self._failures, self._refused)

    def __repr__(self) -> str:
        state = "estimates" if not self.asks_provider else "asks the provider"
        return (f"PromptCounter({self.model.provider}:{self.model.name}, {state}, exact={self._exact}, "
                f"estimated={self._estimated}, failures={self._failures})")
