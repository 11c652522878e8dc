"""The approaches compared on the same items: a direct call (``base``, ``long-context``) and ``rlm``.

A direct call sends the whole context in one prompt. An input beyond the model's window is a
failure, never truncated: it is detected before sending from the model's known window (its
``context_window`` attribute, or ``window=`` given by the caller) and otherwise from the
provider's own error (:class:`ContextOverflowError`). The prompt is measured with the provider's
own count where it offers one (Bedrock, Anthropic: :class:`~rlmflow.models.counting.PromptCounter`),
else with the model's ``count_tokens``. ``long-context`` is the same call made on a long-window model.

Outcome semantics (the reference tables'): ``success`` is false when the item could not be
processed (input over the window, a model, sandbox or budget error); a run that ends without an
answer (turns spent, ``NoAnswerError``) was processed, so it succeeds, and scores as wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import anyio

from .._exceptions import ContextOverflowError, NoAnswerError, RLMError
from .._run.calls import CallScope
from ..dispatch.budget import Budget, BudgetLedger
from ..dispatch.dispatcher import Dispatcher
from ..dispatch.lane import RunShare
from ..dispatch.records import CallRecord
from ..durable.cache import CallCache
from ..engine import RLM
from ..models.base import LanguageModel, Message, ModelRequest
from ..models.counting import PromptCount, PromptCounter
from ..models.registry import parse_model_string
from ..result import RLMResult
from .items import EvalItem

__all__ = ["Approach", "DirectApproach", "Outcome", "RLMApproach", "model_window"]

DIRECT_SYSTEM = (
    "You answer a question about the document the user gives. Read it carefully; answer from the "
    "document only."
)


@dataclass
class Outcome:
    """What one approach produced on one item, before scoring."""

    reply: str | None
    success: bool
    error_type: str | None = None
    error: str | None = None
    turns: int = 0
    sub_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0
    trace_id: str | None = None
    calls: list[CallRecord] = field(default_factory=list)
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    uncached_cost_usd: float | None = 0.0  # what the calls would have cost with no prompt cache

    def add_calls(self, calls: list[CallRecord]) -> None:
        self.calls.extend(calls)
        for call in calls:
            self.input_tokens += call.input_tokens
            self.output_tokens += call.output_tokens
            self.cache_read_tokens += call.cache_read_tokens
            self.cache_write_tokens += call.cache_write_tokens
            if call.role != "root":
                self.sub_calls += 1
            if call.error is None:
                known = self.cost_usd is not None and call.cost_usd is not None
                self.cost_usd = self.cost_usd + call.cost_usd if known else None  # type: ignore[operator]
                uncached = call.cost_without_cache
                known = self.uncached_cost_usd is not None and uncached is not None
                self.uncached_cost_usd = self.uncached_cost_usd + uncached if known else None  # type: ignore[operator]


class Approach(Protocol):
    """One way of answering an item. ``name`` goes in the results (``base``, ``rlm``...)."""

    @property
    def name(self) -> str: ...

    @property
    def model_label(self) -> str:
        """The model(s) as the report shows them."""
        ...

    async def answer(self, item: EvalItem, context: str, *, dispatcher: Dispatcher, budget: Budget) -> Outcome:
        """Answer ``item`` over ``context``; failures are returned in the outcome, not raised."""
        ...

    async def aclose(self) -> None: ...


_PRICE_PROVIDERS = {"aws.bedrock": "aws", "anthropic": "anthropic", "openai": "openai"}


def model_window(model: LanguageModel) -> int | None:
    """The model's context window in tokens, or ``None`` when unknown.

    The model object's own ``context_window`` first (local models know theirs), then the offline
    ``genai-prices`` tables, which list windows for hosted models (Bedrock ids included).
    """
    window = getattr(model, "context_window", None)
    if isinstance(window, int) and window > 0:
        return window
    provider = _PRICE_PROVIDERS.get(model.provider)
    if provider is None:
        return None
    try:
        from genai_prices import data_snapshot

        _, info = data_snapshot.get_snapshot().find_provider_model(model.name, None, provider, None)
    except (ImportError, LookupError):
        return None
    found = getattr(info, "context_window", None)
    return found if isinstance(found, int) and found > 0 else None


class DirectApproach:
    """One direct call with the whole context (``base``; ``long-context`` on a long-window model).

    ``window`` overrides the model's declared window (tokens); with neither, only the provider's
    error can tell an overflow. The prompt is measured by the provider where it counts tokens
    (a count failure falls back to the estimate: logged, never failing the item) and by the
    model's ``count_tokens`` elsewhere; ``count_timeout`` bounds each count (seconds).
    ``max_tokens`` leaves room for a short explanation before the letter.
    ``cache``: an item asked before is answered from it (an evaluation rerun pays nothing for it).
    """

    def __init__(
        self, model: LanguageModel, *, name: str = "base", window: int | None = None, max_tokens: int = 256,
        cache: CallCache | None = None, count_timeout: float = 30.0,
    ) -> None:
        self._model = model
        self._cache = cache
        self._name = name
        self._window = window if window is not None else model_window(model)
        self._max_tokens = max_tokens
        self.counter = PromptCounter(model, timeout=count_timeout)

    @property
    def name(self) -> str:
        return self._name

    @property
    def model_label(self) -> str:
        return self._model.name

    def request(self, item: EvalItem, context: str) -> ModelRequest:
        user = f"<document>\n{context}\n</document>\n\nQuestion: {item.prompt()}"
        return ModelRequest(messages=(Message("system", DIRECT_SYSTEM), Message("user", user)),
                            max_tokens=self._max_tokens)

    async def _prompt_tokens(self, request: ModelRequest, window: int) -> PromptCount:
        chars = request.prompt_chars
        if (chars + 3) // 4 > 2 * window:  # far over the window: no need to count megabytes to know it
            return PromptCount(chars // 4, False)
        return await self.counter.count(request)

    async def answer(self, item: EvalItem, context: str, *, dispatcher: Dispatcher, budget: Budget) -> Outcome:
        request = self.request(item, context)
        if self._window is not None:
            counted = await self._prompt_tokens(request, self._window)
            if counted.tokens + self._max_tokens > self._window:
                return Outcome(
                    None, False, "ContextOverflowError",
                    f"the prompt ({counted.describe()}) plus max_tokens={self._max_tokens} exceeds the "
                    f"{self._window:,}-token window of {self._model.name}; not sent",
                )
        calls: list[CallRecord] = []
        outcome: Outcome
        # a root call of a run of one turn: answered from the cache when asked before
        scope = CallScope(dispatcher=dispatcher, ledger=BudgetLedger(budget), share=RunShare(), depth=0,
                          record=calls.append, capture=0, cache=self._cache)
        try:
            response = await scope.ask_root(self._model, request)
            outcome = Outcome(response.text, True, turns=1)
        except ContextOverflowError as exc:  # the provider said so
            outcome = Outcome(None, False, "ContextOverflowError", exc.message)
        except RLMError as exc:
            outcome = Outcome(None, False, type(exc).__name__, exc.message)
        outcome.add_calls(calls)
        return outcome

    async def aclose(self) -> None:
        return None


class RLMApproach:
    """An :class:`RLM` (root + sub pair) answering each item; one RLM serves every item.

    The RLM is built on the runner's Dispatcher, so every item shares its lanes and limits.
    ``options`` are further :class:`RLM` keyword arguments (``max_turns``, ``sandbox``...).
    """

    def __init__(
        self,
        root: str | LanguageModel,
        sub: str | LanguageModel | None = None,
        *,
        name: str = "rlm",
        **options: object,
    ) -> None:
        self._root = root
        self._sub = sub
        self._name = name
        self._options = options
        self._rlm: RLM | None = None
        self._lock = anyio.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def model_label(self) -> str:
        def label(model: str | LanguageModel) -> str:
            if isinstance(model, str) and model.startswith("strands:"):  # the model under the Strands Agent,
                return parse_model_string(model.removeprefix("strands:"))[1]  # as base's rows name it
            return model if isinstance(model, str) else model.name

        root = label(self._root)
        sub = label(self._sub) if self._sub is not None else root
        return root if sub == root else f"{root} + {sub}"

    async def _get(self, dispatcher: Dispatcher, budget: Budget) -> RLM:
        async with self._lock:
            if self._rlm is None:
                self._rlm = RLM(
                    root=self._root, sub=self._sub, dispatcher=dispatcher, budget=budget,
                    **self._options,  # type: ignore[arg-type]
                )
            return self._rlm

    async def answer(self, item: EvalItem, context: str, *, dispatcher: Dispatcher, budget: Budget) -> Outcome:
        rlm = await self._get(dispatcher, budget)
        result: RLMResult | None
        try:
            result = await rlm.run(context, item.prompt())
            outcome = Outcome(result.answer, True, turns=result.turns, trace_id=result.trace_id)
        except NoAnswerError as exc:  # processed, unanswered: a wrong answer, not a failure
            result = exc.partial if isinstance(exc.partial, RLMResult) else None
            outcome = Outcome(None, True, "NoAnswerError", exc.message)
        except RLMError as exc:
            result = exc.partial if isinstance(exc.partial, RLMResult) else None
            outcome = Outcome(None, False, type(exc).__name__, exc.message)
        if result is not None:
            outcome.turns = result.turns
            outcome.trace_id = result.trace_id
            outcome.add_calls(result.calls)
        return outcome

    async def aclose(self) -> None:
        if self._rlm is not None:
            await self._rlm.aclose()
