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

import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import anyio
from opentelemetry import trace
from opentelemetry.context import Context as OtelContext

from .._exceptions import BatchError, ContextError, RLMError, SandboxRequestError
from .._util import single_exception
from ..context import context_size, validate_context
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
    "llm_query_many": frozenset({"prompts", "model", "max_tokens"}),
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
        # dedup: (lane, max_tokens) -> prompt -> answer, oldest first; failures are not kept (a later
        # batch retries); at most max_dedup_chars characters of prompts and answers, oldest evicted
        self._answers: OrderedDict[tuple[str, int], OrderedDict[str, str]] = OrderedDict()
        self._answers_chars = 0

    async def __call__(self, fn: str, args: Any) -> Any:
        if not isinstance(args, Mapping):
            raise SandboxRequestError(f"the arguments of {str(fn)[:60]!r} must be a map")
        allowed = _ARGUMENTS.get(fn) if isinstance(fn, str) else None
        if allowed is None:
            raise SandboxRequestError(f"unknown host function {str(fn)[:60]!r}")
        _refuse_unknown(args, allowed, f"{fn}()")
        if fn == "llm_query_many":
            return await self.llm_query_many(
                self._prompts(args.get("prompts")),
                self._model(args.get("model")),
                self._max_tokens(args.get("max_tokens")),
            )
        if fn == "rlm_query_many":
            return await self.rlm_query_many(self._children(args.get("items")))
        return self.budget_view()

    # -- validation of untrusted requests ----------------------------------------------------------
    @property
    def _limits(self) -> BridgeLimits:
        return self._settings.bridge_limits

    def _prompts(self, raw: Any) -> list[str]:
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
            if len(prompt) > limits.max_prompt_chars:
                raise SandboxRequestError(
                    f"prompt {index} has {len(prompt):,} characters; the limit is {limits.max_prompt_chars:,}: "
                    "send a smaller slice"
                )
            total += len(prompt)
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
    async def llm_query_many(self, prompts: list[str], sub: LanguageModel, max_tokens: int) -> list[str]:
        """Answers in input order; a failed item raises :class:`BatchError` after all finished."""
        settings, state = self._settings, self._state
        # A batch has one lane and one max_tokens, so within it a prompt alone is the dedup key:
        # no per-item key tuples to build and hash again on the way back (10,000 items per batch).
        answered: dict[str, str] | None = None
        to_send = prompts
        if settings.dedup:  # each distinct prompt not answered before in this run is sent once
            key = (settings.dispatcher.lane_key(sub), max_tokens)
            answered = self._answers.get(key)
            if answered is None:
                answered = self._answers[key] = OrderedDict()
            to_send = [prompt for prompt in dict.fromkeys(prompts) if prompt not in answered]
        self._admit_sub_calls(len(to_send))
        requests = [ModelRequest(messages=(Message("user", prompt),), max_tokens=max_tokens) for prompt in to_send]
        started = time.monotonic()
        self._recorder.emit(BatchStarted, size=len(prompts), sent=len(requests), model=sub.name)
        with settings.tracer.start_as_current_span(
            attr.SPAN_BATCH,
            context=self._cell_span(),
            attributes=span_attributes.batch_start(
                size=len(prompts), deduplicated=len(prompts) - len(requests), depth=state.depth, prompts=prompts,
                capture=settings.capture_content,
            ),
        ) as span:
            state.progress.calls_in_flight += len(requests)
            try:
                outcomes = await self._calls.ask_many(sub, requests, parent=trace.set_span_in_context(span))
            finally:
                state.progress.calls_in_flight -= len(requests)
            results, errors = _answers_in_order(prompts, to_send, outcomes, answered)
            if answered is not None:
                self._count_cached(to_send, outcomes)
            self._recorder.emit(
                BatchFinished, size=len(prompts), failed=len(errors), duration=time.monotonic() - started
            )
            span.set_attributes(
                span_attributes.batch_end(answers=results, failed=len(errors), capture=settings.capture_content)
            )
            if errors:
                raise _batch_error("calls", results, errors)
            return cast("list[str]", results)  # no failure: every item holds its answer

    def _count_cached(self, sent: list[str], outcomes: list[ModelResponse | RLMError]) -> None:
        """Add this batch's answers to the dedup cache's size; evict the oldest past its bound."""
        self._answers_chars += sum(
            len(prompt) + len(outcome.text)
            for prompt, outcome in zip(sent, outcomes, strict=True)
            if not isinstance(outcome, RLMError)
        )
        while self._answers_chars > self._limits.max_dedup_chars and self._answers:
            key, bucket = next(iter(self._answers.items()))
            if not bucket:
                del self._answers[key]
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


def _answers_in_order(
    prompts: list[str],
    sent: list[str],
    outcomes: list[ModelResponse | RLMError],
    answered: dict[str, str] | None,
) -> tuple[list[str | None], dict[int, RLMError]]:
    """Each prompt's answer (``None`` where it failed) and the failures by index.

    Without dedup ``sent`` is ``prompts`` and the outcomes line up with them. With it, fresh
    answers join ``answered`` (the run's) and every prompt, repeated or answered by an earlier
    batch, reads its answer there.
    """
    if answered is None:
        errors = {i: outcome for i, outcome in enumerate(outcomes) if isinstance(outcome, RLMError)}
        return [None if isinstance(outcome, RLMError) else outcome.text for outcome in outcomes], errors
    failed: dict[str, RLMError] = {}
    for prompt, outcome in zip(sent, outcomes, strict=True):
        if isinstance(outcome, RLMError):
            failed[prompt] = outcome
        else:
            answered[prompt] = outcome.text
    results = [answered.get(prompt) for prompt in prompts]
    if not failed:
        return results, {}
    errors = {i: failed[prompt] for i, prompt in enumerate(prompts) if prompt in failed}
    for index in errors:  # even if a concurrent batch answered the prompt meanwhile
        results[index] = None
    return results, errors


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
