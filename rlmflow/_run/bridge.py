"""The host side of the sandbox bridge: what sandbox code may ask of the host, checked first.

Sandbox code is written by a model, and a prompt injection hidden in the document can write it
too, so every request it sends is untrusted input. :class:`HostBridge` validates each one before
acting on it:

- a function name from a fixed set (``llm_query_many``, ``rlm_query_many``, ``budget``);
- models named only by the aliases the :class:`rlmflow.RLM` was given (``"default"`` is the
  sub-model): no client, URL, path or credential is ever built from a sandbox value;
- ``max_tokens`` clamped to the policy; items per batch, characters per prompt and per batch,
  sub-calls per run and child contexts bounded (:class:`BridgeLimits`).

A refused request raises :class:`rlmflow.SandboxRequestError` inside the model's code, with a
message the model can act on; nothing else of the run is lost.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import anyio
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext

from .._exceptions import BatchError, BudgetExceededError, ContextError, RLMError, SandboxRequestError
from .._util import single_exception
from ..context import context_size, validate_context
from ..dispatch.records import CallRecord
from ..events import BatchFinished, BatchStarted
from ..models.base import LanguageModel, Message, ModelRequest, ModelResponse
from ..result import RLMResult
from ..sandbox.base import Context
from ..telemetry import attributes as attr
from ..telemetry import spans as span_attributes
from .calls import CallScope
from .recorder import RunRecorder
from .settings import DEFAULT_ALIAS, BridgeLimits, RunSettings
from .state import RunState

__all__ = ["HostBridge", "SpawnChild"]

# the arguments each host function takes (what cellapi sends); any other key is refused
_ARGUMENTS: dict[str, frozenset[str]] = {
    "llm_query_many": frozenset({"prompts", "model", "max_tokens", "prefix"}),
    "rlm_query_many": frozenset({"items"}),
    "budget": frozenset(),
}
_CHILD_KEYS = frozenset({"prompt", "context"})

SpawnChild = Callable[[str, Context | None], Awaitable[RLMResult]]
"""Runs an ``rlm_query`` child (query, its context or ``None`` for the parent's) to its result."""


class HostBridge:
    """Serves the host functions one run's sandbox code calls; one per run."""

    def __init__(
        self,
        settings: RunSettings,
        state: RunState,
        *,
        calls: CallScope,
        recorder: RunRecorder,
        spawn: SpawnChild,
        cell_span: Callable[[], OtelContext | None],
    ) -> None:
        self._settings = settings
        self._state = state
        self._calls = calls
        self._recorder = recorder
        self._spawn = spawn
        self._cell_span = cell_span  # the span of the cell whose code is calling, if any
        # dedup: (lane, max_tokens, prefix digest) -> prompt -> answer, oldest first; failures are not
        # kept (a later batch retries); at most max_dedup_chars characters of prompts and answers,
        # oldest evicted
        self._answers: OrderedDict[tuple[str, int, str], OrderedDict[str, str]] = OrderedDict()
        self._answers_chars = 0
        self._flights: dict[tuple[str, int, str], dict[str, _Flight]] = {}  # prompts being sent now

    async def __call__(self, fn: str, args: Any) -> Any:
        if not isinstance(args, Mapping):
            raise SandboxRequestError(f"the arguments of {str(fn)[:60]!r} must be a map")
        allowed = _ARGUMENTS.get(fn) if isinstance(fn, str) else None
        if allowed is None:
            raise SandboxRequestError(f"unknown host function {str(fn)[:60]!r}")
        _refuse_unknown(args, allowed, f"{fn}()")
        if fn == "llm_query_many":
            prefix = self._prefix(args.get("prefix"))
            return await self.llm_query_many(
                self._prompts(args.get("prompts"), prefix=len(prefix)),
                self._model(args.get("model")),
                self._max_tokens(args.get("max_tokens")),
                prefix=prefix,
            )
        if fn == "rlm_query_many":
            return await self.rlm_query_many(self._children(args.get("items")))
        return self.budget_view()

    # -- validation of untrusted requests ----------------------------------------------------------
    @property
    def _limits(self) -> BridgeLimits:
        return self._settings.bridge_limits

    def _prefix(self, raw: Any) -> str:
        """The text every prompt of a batch starts with ("" for none)."""
        if raw is None:
            return ""
        if not isinstance(raw, str):
            raise SandboxRequestError(f"prefix must be a string, not {type(raw).__name__}")
        if len(raw) > self._limits.max_prompt_chars:
            raise SandboxRequestError(
                f"the prefix has {len(raw):,} characters; the limit is {self._limits.max_prompt_chars:,} "
                "(with each prompt): send a smaller slice"
            )
        return raw

    def _prompts(self, raw: Any, *, prefix: int = 0) -> list[str]:
        """The batch's prompts; each is sent after a ``prefix``-character prefix (its size counts
        in each prompt's limit, and once in the batch's)."""
        limits = self._limits
        if not isinstance(raw, list | tuple):
            raise SandboxRequestError("prompts must be a list of strings")
        if len(raw) > limits.max_batch_items:
            raise SandboxRequestError(
                f"a batch of {len(raw)} prompts is more than the {limits.max_batch_items} allowed at once; "
                "split it into smaller batches"
            )
        total = 0
        for index, prompt in enumerate(raw):
            if not isinstance(prompt, str):
                raise SandboxRequestError(f"prompt {index} is a {type(prompt).__name__}, not a string")
            if len(prompt) + prefix > limits.max_prompt_chars:
                with_prefix = f" (with the prefix's {prefix:,})" if prefix else ""
                raise SandboxRequestError(
                    f"prompt {index} has {len(prompt) + prefix:,} characters{with_prefix}; the limit is "
                    f"{limits.max_prompt_chars:,}: send a smaller slice"
                )
            total += len(prompt)
        total += prefix
        if total > limits.max_batch_chars:
            raise SandboxRequestError(
                f"the batch holds {total:,} characters; the limit is {limits.max_batch_chars:,}: split it"
            )
        return list(raw)

    def _model(self, alias: Any) -> LanguageModel:
        """The sub-model named by ``alias``: only the RLM's own aliases, never a model string."""
        models = self._settings.sub_models
        if alias is None:
            return models[DEFAULT_ALIAS]
        if isinstance(alias, str) and alias in models:
            return models[alias]
        shown = repr(alias[:60]) if isinstance(alias, str) else type(alias).__name__
        raise SandboxRequestError(
            f"unknown model {shown}: sandbox code can only use these models: {', '.join(sorted(models))}"
        )

    def _max_tokens(self, raw: Any) -> int:
        default = self._settings.sub_max_tokens
        if raw is None:
            return min(default, self._limits.max_output_tokens)
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise SandboxRequestError(f"max_tokens must be an integer, not {type(raw).__name__}")
        return max(1, min(raw, self._limits.max_output_tokens))

    def _children(self, raw: Any) -> list[tuple[str, Any]]:
        limits = self._limits
        if not isinstance(raw, list | tuple):
            raise SandboxRequestError("rlm_query_many expects a list of prompts")
        if len(raw) > limits.max_batch_items:
            raise SandboxRequestError(
                f"{len(raw)} child runs at once is more than the {limits.max_batch_items} allowed"
            )
        children: list[tuple[str, Any]] = []
        for index, item in enumerate(raw):
            if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str):
                raise SandboxRequestError(f"child {index} needs a string prompt")
            _refuse_unknown(item, _CHILD_KEYS, f"child {index}")
            prompt: str = item["prompt"]
            if len(prompt) > limits.max_prompt_chars:
                raise SandboxRequestError(f"the prompt of child {index} has {len(prompt):,} characters; too long")
            context = item.get("context")
            if context is not None:
                try:
                    context = validate_context(context)
                except ContextError as exc:
                    raise SandboxRequestError(f"the context of child {index} is unusable: {exc.message}") from None
                size = context_size(context)
                if size > limits.max_child_context_chars:
                    raise SandboxRequestError(
                        f"the context of child {index} has {size:,} characters; the limit is "
                        f"{limits.max_child_context_chars:,}"
                    )
            children.append((prompt, context))
        return children

    def _admit_sub_calls(self, count: int) -> None:
        state = self._state
        if state.ledger.budget.max_calls is not None:
            return  # the budget caps calls exactly
        cap = self._limits.max_sub_calls
        tree = state.tree
        if tree.sub_calls + count > cap:
            raise SandboxRequestError(
                f"this run has sent {tree.sub_calls} sub-calls and may send {cap} in all; "
                f"{count} more would pass that: aggregate what you have and answer"
            )
        tree.sub_calls += count

    # -- the host functions ---------------------------------------------------------------------
    async def llm_query_many(
        self, prompts: list[str], sub: LanguageModel, max_tokens: int, *, prefix: str = ""
    ) -> list[str]:
        """Answers in input order; a failed item raises :class:`BatchError` after all finished.

        A ``prefix`` goes before every prompt, as a message of its own marked for the provider's
        prompt cache (:attr:`Message.cache_point`): the first call writes it, the others read it.

        With dedup, each distinct prompt of the run is sent once: one answered before is read
        from the run's answers, and one another batch is sending right now (another thread of
        the sandbox code) waits for that batch's outcome instead of being sent again.
        """
        settings, state = self._settings, self._state
        known: dict[str, str | RLMError] = {}
        joined: dict[str, _Flight] = {}
        fresh = prompts
        flights: dict[str, _Flight] | None = None
        if settings.dedup:
            # A batch has one lane and one max_tokens, so within it a prompt alone is the key:
            # no per-item key tuples to build and hash again on the way back (10,000 items).
            key = _dedup_key(settings.dispatcher.lane_key(sub), max_tokens, prefix)
            answered = self._answers.get(key)
            flights = self._flights.setdefault(key, {})
            fresh = []
            for prompt in dict.fromkeys(prompts):
                if answered is not None and prompt in answered:
                    known[prompt] = answered[prompt]
                elif prompt in flights:
                    joined[prompt] = flights[prompt]
                else:
                    fresh.append(prompt)
        self._admit_sub_calls(len(fresh))
        started = time.monotonic()
        self._recorder.emit(BatchStarted, size=len(prompts), sent=len(fresh), model=sub.name)
        with settings.tracer.start_as_current_span(
            attr.SPAN_BATCH,
            context=self._cell_span(),
            attributes=span_attributes.batch_start(
                size=len(prompts), deduplicated=len(prompts) - len(fresh), depth=state.depth, prompts=prompts,
                capture=settings.capture_content,
            ),
        ) as span:
            parent = trace.set_span_in_context(span)
            ask = _Ask(sub, max_tokens, prefix, parent)
            if flights is None:
                outcomes = [_text_or_error(o) for o in await self._send(ask, fresh)]
            else:
                known.update(await self._fly(ask, fresh, flights))
                known.update(await self._join(ask, joined))
                self._remember(ask, known)
                outcomes = [known[prompt] for prompt in prompts]
            results: list[str | None] = [None if isinstance(o, RLMError) else o for o in outcomes]
            errors = {i: o for i, o in enumerate(outcomes) if isinstance(o, RLMError)}
            self._recorder.emit(
                BatchFinished, size=len(prompts), failed=len(errors), duration=time.monotonic() - started
            )
            span.set_attributes(
                span_attributes.batch_end(answers=results, failed=len(errors), capture=settings.capture_content)
            )
            if errors:
                raise _batch_error("calls", results, errors)
            return cast("list[str]", results)  # no failure: every item holds its answer

    async def _send(self, ask: _Ask, prompts: list[str]) -> list[ModelResponse | RLMError]:
        requests = [ModelRequest(messages=ask.messages(prompt), max_tokens=ask.max_tokens) for prompt in prompts]
        progress = self._state.progress
        landed = 0
        record = self._calls.record

        def land(call: CallRecord) -> None:  # each call leaves "in flight" as it lands, not with its batch
            nonlocal landed
            landed += 1
            progress.calls_in_flight -= 1
            record(call)

        progress.calls_in_flight += len(requests)
        calls = replace(self._calls, record=land)
        try:
            if not ask.warms_cache or len(requests) < 2:
                return await calls.ask_many(ask.sub, requests, parent=ask.parent)
            # a prefix is cached once a reply to it has begun: requests sent at the same moment as
            # the first would each write it again, so the first goes alone and the others read it
            first = await calls.ask_many(ask.sub, requests[:1], parent=ask.parent)
            return first + await calls.ask_many(ask.sub, requests[1:], parent=ask.parent)
        except BudgetExceededError as exc:
            self._budget_refused(exc)
            raise
        finally:
            progress.calls_in_flight -= len(requests) - landed  # those that never landed (refused, cancelled)

    def _budget_refused(self, exc: BudgetExceededError) -> None:
        """Note the run's first budget refusal: the loop tells the root once, then the run ends."""
        if self._state.budget_stop is None:
            self._state.budget_stop = exc

    async def _fly(self, ask: _Ask, prompts: list[str], flights: dict[str, _Flight]) -> dict[str, str | RLMError]:
        """Send ``prompts`` as this batch's flight, which concurrent batches asking them can join."""
        if not prompts:
            return {}
        flight = _Flight()
        for prompt in prompts:
            flights[prompt] = flight
        try:
            outcomes = await self._send(ask, prompts)
            flight.outcomes.update(zip(prompts, map(_text_or_error, outcomes), strict=True))
        finally:
            for prompt in prompts:
                if flights.get(prompt) is flight:
                    del flights[prompt]
            flight.done.set()  # joiners of a flight that ended without outcomes send for themselves
        return flight.outcomes

    async def _join(self, ask: _Ask, joined: dict[str, _Flight]) -> dict[str, str | RLMError]:
        """The outcomes of prompts other batches were sending when this one came."""
        outcomes: dict[str, str | RLMError] = {}
        orphans: list[str] = []
        for prompt, flight in joined.items():
            await flight.done.wait()
            outcome = flight.outcomes.get(prompt)
            if outcome is None:
                orphans.append(prompt)
            else:
                outcomes[prompt] = outcome
        if orphans:
            self._admit_sub_calls(len(orphans))
            sent = await self._send(ask, orphans)
            outcomes.update(zip(orphans, map(_text_or_error, sent), strict=True))
        return outcomes

    def _remember(self, ask: _Ask, outcomes: dict[str, str | RLMError]) -> None:
        """Keep the answers (not the failures: a later batch retries them) for the run's next batches."""
        key = _dedup_key(self._settings.dispatcher.lane_key(ask.sub), ask.max_tokens, ask.prefix)
        answered = self._answers.get(key)
        if answered is None:
            answered = self._answers[key] = OrderedDict()
        added = 0
        for prompt, outcome in outcomes.items():
            if not isinstance(outcome, RLMError) and prompt not in answered:
                answered[prompt] = outcome
                added += len(prompt) + len(outcome)
        self._answers_chars += added
        while self._answers_chars > self._limits.max_dedup_chars and self._answers:
            oldest_key, bucket = next(iter(self._answers.items()))
            if not bucket:
                del self._answers[oldest_key]
                continue
            prompt, answer = bucket.popitem(last=False)
            self._answers_chars -= len(prompt) + len(answer)

    async def rlm_query_many(self, children: list[tuple[str, Any]]) -> list[str]:
        """One child run per item (its own sandbox, a child ledger); plain sub-calls at the depth limit."""
        state = self._state
        if state.depth + 1 > state.options.max_depth:
            prompts = [f"{context}\n\n{prompt}" if isinstance(context, str) and context else prompt
                       for prompt, context in children]
            return await self.llm_query_many(self._prompts(prompts), self._model(None), self._max_tokens(None))
        self._admit_sub_calls(len(children))  # a child run counts as a sub-call of its parent
        results: list[str | None] = [None] * len(children)
        errors: dict[int, RLMError] = {}
        slots = state.tree.slots_at(state.depth + 1, self._limits.max_concurrent_children)

        async def child(index: int, prompt: str, context: Any) -> None:
            try:
                outcome = await self._spawn(prompt, context)
                results[index] = outcome.answer
            except RLMError as exc:
                errors[index] = exc
                if isinstance(exc, BudgetExceededError):
                    self._budget_refused(exc)
            finally:
                slots.release()

        with single_exception():
            async with anyio.create_task_group() as tg:
                for index, (prompt, context) in enumerate(children):
                    # a child starts when a sandbox slot frees, not before: no task per waiting child
                    await slots.acquire()
                    tg.start_soon(child, index, prompt, context)
        if errors:
            raise _batch_error("child runs", results, errors)
        return [r or "" for r in results]

    def budget_view(self) -> dict[str, Any]:
        """What the run may still spend, as sandbox code sees it from ``budget()``."""
        state = self._state
        remaining = state.ledger.remaining()
        spent = state.ledger.spent
        return {
            "calls_left": remaining["calls"],
            "input_tokens_left": remaining["input_tokens"],
            "output_tokens_left": remaining["output_tokens"],
            "cost_usd_left": remaining["cost_usd"],
            "seconds_left": state.seconds_left(),
            "turns_left": state.options.max_turns - len(state.transcript) - 1,
            "depth": state.depth,
            "max_depth": state.options.max_depth,
            "models": sorted(self._settings.sub_models),
            "spent": {
                "calls": spent.calls,
                "input_tokens": spent.input_tokens,
                "output_tokens": spent.output_tokens,
                "cost_usd": round(spent.cost_usd, 6),
            },
        }


@dataclass(frozen=True, slots=True)
class _Ask:
    """How one batch's prompts are sent: the model, the output limit, the shared prefix, the span."""

    sub: LanguageModel
    max_tokens: int
    prefix: str
    parent: OtelContext

    @property
    def warms_cache(self) -> bool:
        """The batch has a prefix and its model caches prompts: its first call should go first."""
        return bool(self.prefix) and getattr(self.sub, "caches_prompts", False) is True

    def messages(self, prompt: str) -> tuple[Message, ...]:
        if not self.prefix:
            return (Message("user", prompt),)
        # the prefix first, marked: the provider caches it once and reads it for every other prompt
        return Message("user", self.prefix, cache_point=True), Message("user", prompt)


def _dedup_key(lane: str, max_tokens: int, prefix: str) -> tuple[str, int, str]:
    """What answers are remembered under: a prompt means the same only after the same prefix
    (held as its digest, not as a second copy of the text)."""
    return lane, max_tokens, hashlib.sha256(prefix.encode("utf-8", "surrogatepass")).hexdigest() if prefix else ""


@dataclass(eq=False)
class _Flight:
    """Prompts one batch is sending; batches that ask the same prompts meanwhile wait for it."""

    done: anyio.Event = field(default_factory=anyio.Event)
    outcomes: dict[str, str | RLMError] = field(default_factory=dict)


def _text_or_error(outcome: ModelResponse | RLMError) -> str | RLMError:
    return outcome if isinstance(outcome, RLMError) else outcome.text


def _batch_error(what: str, results: list[str | None], errors: dict[int, RLMError]) -> BatchError:
    """The error of a batch some items of which failed; the others' results ride along."""
    first = errors[min(errors)]
    return BatchError(
        f"{len(errors)} of {len(results)} {what} failed (first, item {min(errors)}: "
        f"{type(first).__name__}: {first.message}); the other results are in .results",
        results=results,
        errors=errors,
    )


def _refuse_unknown(args: Mapping[Any, Any], allowed: frozenset[str], what: str) -> None:
    """Refuse keys a host function does not take (they would otherwise live as long as the call)."""
    if len(args) > len(allowed) or any(key not in allowed for key in args):
        unknown = next((key for key in args if key not in allowed), None)
        shown = repr(unknown[:40]) if isinstance(unknown, str) else type(unknown).__name__
        raise SandboxRequestError(
            f"{what} takes {', '.join(sorted(allowed)) or 'no arguments'}; got an unknown argument {shown}"
        )
