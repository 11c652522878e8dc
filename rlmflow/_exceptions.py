"""The exception tree of rlmflow.

Every error the library raises derives from :class:`RLMError`::

    RLMError
    ├── ConfigurationError          bad arguments, an unknown model string, missing extra
    │   ├── UnknownModelError
    │   └── SharedStateUnavailableError  Redis for shared lanes/budgets unreachable at start
    ├── ContextError                the document cannot be loaded (missing, empty, unreadable)
    ├── ModelError                  a model call failed (carries provider, model, status)
    │   ├── ThrottledError          429 / ThrottlingException          (retried)
    │   ├── QuotaExhaustedError     a daily or account quota is spent  (retried)
    │   ├── ModelNotReadyError      a cold or loading model             (retried)
    │   ├── TransientModelError     5xx, timeouts, connection resets    (retried)
    │   ├── ContextOverflowError    prompt + max_tokens exceed the window
    │   └── FatalModelError         auth, bad request, unknown model id
    ├── BudgetExceededError         a budget cap would be crossed (carries what was spent)
    ├── SandboxError                the sandbox process failed
    │   ├── SandboxCrashedError     the worker died (segfault, os._exit, OOM)
    │   ├── SandboxProtocolError    an oversized or malformed frame
    │   └── IsolationUnavailableError  isolation="strict" and a confinement is missing
    ├── SandboxRequestError         sandbox code asked for something the host refuses
    ├── BatchError                  some items of an llm_query_many failed (carries partial results)
    ├── NoAnswerError               the run ended without FINAL (carries the transcript)
    ├── NotInJournalError           a replay met a request its journal does not hold
    └── InternalError               anything else that stopped a run (the original is its __cause__)

Exceptions are picklable (``__reduce__``), so they survive process boundaries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "BatchError",
    "BudgetExceededError",
    "ConfigurationError",
    "ContextError",
    "ContextOverflowError",
    "FatalModelError",
    "InternalError",
    "IsolationUnavailableError",
    "ModelError",
    "ModelNotReadyError",
    "NoAnswerError",
    "NotInJournalError",
    "QuotaExhaustedError",
    "RLMError",
    "SandboxCrashedError",
    "SandboxError",
    "SandboxProtocolError",
    "SandboxRequestError",
    "SharedStateUnavailableError",
    "ThrottledError",
    "TransientModelError",
    "UnknownModelError",
]


class RLMError(Exception):
    """Base class of every rlmflow error.

    ``partial``, when set by the engine, is the run so far (an ``RLMResult`` with an empty
    answer): usage, cost, calls and transcript of work already paid for.
    """

    partial: Any = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[RLMError], message: str, state: dict[str, Any]) -> RLMError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class ConfigurationError(RLMError):
    """Invalid configuration: arguments that cannot work, or a missing optional dependency."""


class UnknownModelError(ConfigurationError):
    """A model string that names no known provider or model."""


class SharedStateUnavailableError(ConfigurationError):
    """Redis cannot be reached (or the ``redis`` extra is missing) when shared state starts."""


class ContextError(RLMError):
    """The context (document) cannot be used: missing, unreadable or empty."""


class ModelError(RLMError):
    """A model call failed. ``retryable`` tells whether the Dispatcher may try again."""

    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        model: str | None = None,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.retry_after = retry_after


class ThrottledError(ModelError):
    """The provider refused the call for rate (HTTP 429, ``ThrottlingException``)."""

    retryable = True


class QuotaExhaustedError(ModelError):
    """A quota of the account is spent; retried with long backoff."""

    retryable = True


class ModelNotReadyError(ModelError):
    """The model is loading or warming up."""

    retryable = True


class TransientModelError(ModelError):
    """A server error, timeout or broken connection."""

    retryable = True


class ContextOverflowError(ModelError):
    """Prompt plus ``max_tokens`` exceed the model's context window. Split the input and retry."""

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int | None = None,
        context_window: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window


class FatalModelError(ModelError):
    """A call that cannot succeed by retrying: authentication, bad request, unknown model id."""


class BudgetExceededError(RLMError):
    """A call or turn would cross a budget cap; nothing was sent for it.

    ``limit`` names the cap, ``spent`` maps each tracked quantity to what was already used.
    """

    def __init__(self, message: str, *, limit: str, spent: dict[str, float] | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.spent = dict(spent or {})


class SandboxError(RLMError):
    """The sandbox could not run code."""


class SandboxCrashedError(SandboxError):
    """The worker process died; ``returncode`` is its exit status (negative: killed by a signal)."""

    def __init__(self, message: str, *, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


class SandboxProtocolError(SandboxError):
    """The worker sent an oversized or malformed frame."""


class IsolationUnavailableError(SandboxError):
    """``isolation="strict"`` was asked for and a required confinement does not hold here.

    ``report`` is what the platform offers (a ``SandboxReport``).
    """

    def __init__(self, message: str, *, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class SandboxRequestError(RLMError):
    """Sandbox code asked the host for something it refuses: a model that is not one of the
    RLM's aliases, an oversized batch or prompt, more sub-calls than the run may send.

    Raised inside the model's code, with a message saying what is allowed; the run goes on.
    """


class BatchError(RLMError):
    """Some items of a batch failed after every other item finished.

    ``results`` holds one entry per prompt (``None`` where the item failed);
    ``errors`` maps the failed indices to their exceptions.
    """

    def __init__(self, message: str, *, results: Sequence[str | None], errors: dict[int, RLMError]) -> None:
        super().__init__(message)
        self.results = list(results)
        self.errors = dict(errors)

    @property
    def failed_indices(self) -> list[int]:
        return sorted(self.errors)


class NoAnswerError(RLMError):
    """The run ended without ``FINAL``: the transcript and usage so far are kept on ``partial``."""

    def __init__(self, message: str, *, partial: Any = None) -> None:
        super().__init__(message)
        self.partial = partial


class NotInJournalError(RLMError):
    """A replayed run (``RLM(replay=...)``) asked for a model call its journal does not hold: a
    replay sends nothing, so the run cannot go on (its code or its inputs differ from the record)."""


class InternalError(RLMError):
    """A run stopped for a reason none of the other errors names: a bug in rlmflow or in a
    component it drives. The original exception is the ``__cause__``; the work already paid for
    is on ``partial`` as for every error that ends a run."""
