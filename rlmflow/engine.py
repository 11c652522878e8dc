"""``RLM``: configuration and shared resources of Recursive Language Model runs.

One :class:`RLM` holds the models, the sandbox factory, the Dispatcher and the policies; each
``run`` is an independent :class:`rlmflow.run._Run` with its own sandbox session, ledger and
transcript.
"""

from __future__ import annotations

import anyio
import anyio.to_thread
from opentelemetry import metrics, trace

from . import prompts
from ._exceptions import ConfigurationError
from .context import validate_context
from .dispatch.budget import Budget, BudgetLedger
from .dispatch.dispatcher import Dispatcher
from .dispatch.lane import RunShare
from .models.base import LanguageModel
from .models.registry import DEFAULT_MODEL, ModelRegistry
from .result import RLMResult, RunProgress, Turn
from .run import _Run
from .sandbox.base import Context, Sandbox
from .sandbox.local import LocalSandbox
from .telemetry.trajectory import Trajectory

__all__ = ["RLM", "RLMResult", "RunProgress", "Turn"]


class RLM:
    """A Recursive Language Model: ``await RLM(...).run(context, query)``.

    - ``root``: the model that writes code (a model string or a ``LanguageModel``);
    - ``sub``: the model behind ``llm_query`` (default: the root model);
    - ``sandbox``: where code runs (default :class:`LocalSandbox`);
    - ``dispatcher``: share one between RLMs of a service so they share rate limits;
    - ``budget``: caps on tokens, cost, calls, time, depth and turns (see :class:`Budget`);
    - ``max_turns``: root turns before the run must answer; ``max_depth``: ``rlm_query``
      nesting (0 makes ``rlm_query`` a plain ``llm_query``);
    - ``root_max_tokens`` / ``sub_max_tokens``: generation caps per call;
    - ``max_feedback_chars``: how much of a cell's output the root sees;
    - ``history_chars``: the root's transcript is trimmed (oldest turns first) to this size;
    - ``run_weight`` / ``run_max_concurrency``: this RLM's runs' fair share of shared lanes and
      their own cap on sub-calls in flight;
    - ``dedup``: send identical sub-prompts of a run once and reuse the answer;
    - ``trajectory``: a :class:`Trajectory` that records every run as JSONL (``rlmflow trace``);
    - ``capture_content``: put prompts, replies, code and outputs into span attributes, each cut
      to this many characters (0, the default, records lengths and hashes only);
    - ``tracer_provider`` / ``meter_provider``: where spans and metrics go (default: the global
      OpenTelemetry providers, which do nothing until the application configures them).

    Use as ``async with RLM(...) as rlm`` to close models created from strings.
    """

    def __init__(
        self,
        *,
        root: str | LanguageModel = DEFAULT_MODEL,
        sub: str | LanguageModel | None = None,
        sandbox: Sandbox | None = None,
        dispatcher: Dispatcher | None = None,
        budget: Budget | None = None,
        max_turns: int = 12,
        max_depth: int = 1,
        root_max_tokens: int = 1024,
        sub_max_tokens: int = 512,
        max_feedback_chars: int = 4000,
        history_chars: int = 24_000,
        max_repeated_errors: int = 4,
        run_weight: float = 1.0,
        run_max_concurrency: int | None = None,
        dedup: bool = True,
        system_prompt: str | None = None,
        trajectory: Trajectory | None = None,
        capture_content: int = 0,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if max_turns < 1:
            raise ConfigurationError("max_turns must be at least 1")
        if max_depth < 0:
            raise ConfigurationError("max_depth must be >= 0")
        self._registry = ModelRegistry()
        self.root = self._registry.resolve(root)
        self.sub = self._registry.resolve(sub) if sub is not None else self.root
        self.sandbox: Sandbox = sandbox or LocalSandbox()
        self.dispatcher = dispatcher or Dispatcher(tracer_provider=tracer_provider, meter_provider=meter_provider)
        self.budget = budget or Budget()
        self.max_turns = min(max_turns, self.budget.max_turns or max_turns)
        self.max_depth = min(max_depth, self.budget.max_depth if self.budget.max_depth is not None else max_depth)
        self.root_max_tokens = root_max_tokens
        self.sub_max_tokens = sub_max_tokens
        self.max_feedback_chars = max_feedback_chars
        self.history_chars = history_chars
        self.max_repeated_errors = max_repeated_errors
        self.run_weight = run_weight
        self.run_max_concurrency = run_max_concurrency
        self.dedup = dedup
        self.system_prompt = system_prompt or prompts.SYSTEM_PROMPT
        self.trajectory = trajectory
        self.capture_content = capture_content
        self._tracer = trace.get_tracer("rlmflow", tracer_provider=tracer_provider)

    async def __aenter__(self) -> RLM:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the models this RLM created from model strings, and the trajectory file."""
        await self._registry.aclose()
        if self.trajectory is not None:
            await anyio.to_thread.run_sync(self.trajectory.close)

    def resolve_model(self, model: str | LanguageModel) -> LanguageModel:
        return self._registry.resolve(model)

    async def run(self, context: Context, query: str, *, progress: RunProgress | None = None) -> RLMResult:
        """Answer ``query`` over ``context``.

        Raises :class:`ContextError` for an unusable context, :class:`NoAnswerError` when the
        turns run out without ``FINAL``, :class:`BudgetExceededError` when the budget stops the
        root, :class:`SandboxError` when no sandbox can run. Each of these carries the work
        done so far on ``.partial`` (an :class:`RLMResult` with an empty answer).
        """
        context = validate_context(context)
        if not isinstance(query, str) or not query.strip():
            raise ConfigurationError("the query is empty: ask a question")
        ledger = BudgetLedger(self.budget)
        share = RunShare(weight=self.run_weight, max_concurrency=self.run_max_concurrency)
        run = _Run(self, context, query, depth=0, ledger=ledger, share=share, progress=progress or RunProgress())
        return await run.execute(parent=None)
