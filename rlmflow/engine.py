"""``RLM``: configuration and shared resources of Recursive Language Model runs.

One :class:`RLM` holds the models, the sandbox factory, the Dispatcher and the policies, frozen
into one :class:`~rlmflow._run.settings.RunSettings` when it is built; each ``run`` is an
independent run (:mod:`rlmflow._run`) with its own state, sandbox session, ledger and transcript,
handed those settings and nothing else of the ``RLM``. Per-run settings (budget, deadline, turns,
metadata, a tenant's ledger) are arguments of :meth:`RLM.run` and :meth:`RLM.stream`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import anyio.to_thread
from opentelemetry import metrics, trace

from . import prompts
from ._exceptions import BudgetExceededError, ConfigurationError
from ._run.lifecycle import execute_run
from ._run.settings import DEFAULT_ALIAS, BridgeLimits, RunOptions, RunSettings
from ._run.state import RunState
from ._version import __version__
from .context import context_digest, validate_context
from .dispatch.budget import Budget, BudgetLedger
from .dispatch.dispatcher import Dispatcher
from .dispatch.lane import RunShare
from .dispatch.process import default_dispatcher
from .durable.cache import CallCache
from .durable.choice import open_cache, open_journal
from .durable.journal import JournalRun, RunJournal
from .durable.memory import CallMemory, first_turns, inherited_turns
from .events import EventSink
from .models.base import LanguageModel
from .models.registry import DEFAULT_MODEL, ModelRegistry
from .result import RLMResult, RunProgress, Turn
from .sandbox.base import Context, Sandbox
from .sandbox.local import LocalSandbox
from .stream import RunStream
from .telemetry.metrics import CallMetrics
from .telemetry.scope import CallTelemetry, use_telemetry
from .telemetry.trajectory import Trajectory

if TYPE_CHECKING:
    from strands.models.model import Model as StrandsModel

__all__ = ["RLM", "RLMResult", "RunProgress", "Turn"]

_HISTORY_CHARS = 100_000
_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _root_style_of(root: object) -> Literal["code", "strands"]:
    if isinstance(root, str):
        return "strands" if root.startswith("strands:") else "code"
    is_strands = any(f"{c.__module__}.{c.__name__}" == "strands.models.model.Model" for c in type(root).__mro__)
    return "strands" if is_strands else "code"


def default_history_chars(root: LanguageModel) -> int:
    """How much of its transcript a root is given by default: three characters per token of the
    window it declares, at most 100,000 characters (about 25,000 tokens)."""
    window = getattr(root, "context_window", None)
    return min(_HISTORY_CHARS, 3 * window) if isinstance(window, int) and window > 0 else _HISTORY_CHARS


def _plans_first(root: LanguageModel) -> bool:
    """Whether a root plans through the form by default: the embedded (small) llama.cpp models do."""
    return root.provider == "llama.cpp"


class RLM:
    """A Recursive Language Model: ``await RLM(...).run(context, query)``.

    - ``root``: the model that writes code (a model string or a ``LanguageModel``);
    - ``root_style``: ``"code"`` (the root replies with code blocks) or ``"strands"`` (a strands
      Agent drives the run through one ``execute_python`` tool; see :mod:`rlmflow._run.strands_loop`);
      by default ``"strands"`` exactly when ``root`` is a ``strands:`` string or a strands Model;
    - ``sub``: the model behind ``llm_query`` (default: the root model);
    - ``sub_models``: more models sandbox code may use, by alias: ``{"fast": ..., "strong": ...}``
      lets code call ``llm_query(p, model="fast")``; ``"default"`` is always ``sub``. Sandbox
      code can name no other model: model strings, URLs and paths from it are refused;
    - ``bridge_limits``: what sandbox code may ask of the host (batch sizes, prompt sizes,
      ``max_tokens``, sub-calls per run, concurrent child runs; see :class:`BridgeLimits`);
    - ``sandbox``: where code runs (default :class:`LocalSandbox`);
    - ``dispatcher``: where model calls are scheduled; by default the process-wide one
      (:func:`rlmflow.default_dispatcher`), so every RLM of a service shares the lanes;
    - ``budget``: default caps of each run on tokens, cost, calls, time, depth and turns (see
      :class:`Budget`; ``run(budget=...)`` replaces it for one run);
    - ``max_turns``: root turns before the run must answer; ``max_depth``: ``rlm_query``
      nesting (0 makes ``rlm_query`` a plain ``llm_query``);
    - ``root_max_tokens`` / ``sub_max_tokens``: generation caps per call;
    - ``max_feedback_chars``: how much of a cell's output the root sees;
    - ``history_chars``: the root's transcript is trimmed (oldest turns first, in coarse steps
      that keep a cached prefix) to this size; by default three characters per token of a root
      that declares its ``context_window`` (24,576 for the embedded 8,192-token model), at most
      100,000 (what a hosted root is given: its whole run then stays in its prompt cache);
    - ``run_weight`` / ``run_max_concurrency``: this RLM's runs' fair share of shared lanes and
      their own cap on sub-calls in flight;
    - ``dedup``: send identical sub-prompts of a run once and reuse the answer;
    - ``trajectory``: a :class:`Trajectory` that records every run as JSONL (``rlmflow trace``);
    - ``journal``: a :class:`~rlmflow.durable.journal.Journal` (or its SQLite file's path, or a
      ``redis://`` URL for a :class:`~rlmflow.durable.redis_journal.RedisJournal`) that
      records every run as it goes, every paid call included, so a run whose process died can
      be resumed without paying again (:meth:`resume`; ``docs/durability.md``);
    - ``replay``: a journal every run is answered from instead of the providers (no request is
      sent; one the journal lacks raises :class:`NotInJournalError`): offline, free pipeline tests;
    - ``cache``: a :class:`~rlmflow.durable.cache.CallCache` (or an SQLite file's path for a
      :class:`~rlmflow.durable.cache.SQLiteCallCache`, or a ``redis://`` URL for a
      :class:`~rlmflow.durable.redis_cache.RedisCallCache`) shared across runs: a request asked
      before (same model, settings and messages) is answered from it, sent and charged nothing,
      and marked ``cached`` in its record, span, metric and event; root calls included unless
      the cache says otherwise (``docs/durability.md``);
    - ``prompt_cache``: ``False`` makes the models this RLM builds from model strings ask their
      provider for no prompt caching (on by default where the provider offers it: Bedrock and
      Anthropic Claude models; ``docs/caching.md``); models passed in keep their own setting;
    - ``capture_content``: put prompts, replies, code and outputs into span attributes, each cut
      to this many characters (0, the default, records lengths and hashes only);
    - ``plan_first``: the root's first turn fills a form (the kind of question, the word that
      marks its records, what to ask of each) and a program of that kind runs it: collect every
      record, ask the sub-model about each in one batch, combine in Python (see
      :mod:`rlmflow._run.plan`); by default on for an embedded llama.cpp root (a small model),
      off for others, which plan their own code;
    - ``tracer_provider`` / ``meter_provider``: where spans and metrics go (default: the global
      OpenTelemetry providers, which do nothing until the application configures them).

    Use as ``async with RLM(...) as rlm`` to close models created from strings.
    """

    def __init__(
        self,
        *,
        root: str | LanguageModel | StrandsModel = DEFAULT_MODEL,
        root_style: Literal["code", "strands"] | None = None,
        sub: str | LanguageModel | None = None,
        sub_models: Mapping[str, str | LanguageModel] | None = None,
        bridge_limits: BridgeLimits | None = None,
        sandbox: Sandbox | None = None,
        dispatcher: Dispatcher | None = None,
        budget: Budget | None = None,
        max_turns: int = 12,
        max_depth: int = 1,
        root_max_tokens: int = 1024,
        sub_max_tokens: int = 512,
        max_feedback_chars: int = 4000,
        history_chars: int | None = None,
        max_repeated_errors: int = 4,
        run_weight: float = 1.0,
        run_max_concurrency: int | None = None,
        dedup: bool = True,
        system_prompt: str | None = None,
        trajectory: Trajectory | None = None,
        journal: RunJournal | str | Path | None = None,
        replay: RunJournal | str | Path | None = None,
        cache: CallCache | str | Path | None = None,
        prompt_cache: bool = True,
        capture_content: int = 0,
        plan_first: bool | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        if max_turns < 1:
            raise ConfigurationError("max_turns must be at least 1")
        if max_depth < 0:
            raise ConfigurationError("max_depth must be >= 0")
        self._registry = ModelRegistry(prompt_cache=prompt_cache)
        self.root_style: Literal["code", "strands"] = root_style or _root_style_of(root)
        """``"code"`` or ``"strands"``: how the root model drives a run."""
        if self.root_style == "strands":
            from .models.strands import strands_root_model

            root_model: LanguageModel = strands_root_model(root, prompt_cache=prompt_cache)
        elif isinstance(root, str | LanguageModel):
            root_model = self._registry.resolve(root)
        else:
            raise ConfigurationError(
                f"root must be a model string, a LanguageModel or a strands Model, not {type(root).__name__}"
            )
        sub_model = self._registry.resolve(sub) if sub is not None else root_model
        aliases: dict[str, LanguageModel] = {DEFAULT_ALIAS: sub_model}
        for alias, model in (sub_models or {}).items():
            if alias == DEFAULT_ALIAS or not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
                raise ConfigurationError(
                    f"invalid model alias {alias!r}: use letters, digits, '_', '.', '-' (and not {DEFAULT_ALIAS!r}, "
                    "which is always the sub-model)"
                )
            aliases[alias] = self._registry.resolve(model)
        self.budget = budget or Budget()
        """Each run's default caps (``run(budget=...)`` replaces them for one run)."""
        self.max_turns = min(max_turns, self.budget.max_turns or max_turns)
        self.max_depth = min(max_depth, self.budget.max_depth if self.budget.max_depth is not None else max_depth)
        self.run_weight = run_weight
        self.run_max_concurrency = run_max_concurrency
        if journal is not None and replay is not None:
            raise ConfigurationError("a run is journaled or replayed, not both: give journal= or replay=")
        self._owns_journal = isinstance(journal, str | Path) or isinstance(replay, str | Path)
        self.journal: RunJournal | None = open_journal(journal) if isinstance(journal, str | Path) else journal
        """Where every run is recorded as it goes, so it can be resumed (:meth:`resume`)."""
        self._replay: RunJournal | None = open_journal(replay) if isinstance(replay, str | Path) else replay
        self._owns_cache = isinstance(cache, str | Path)
        self.cache: CallCache | None = open_cache(cache) if isinstance(cache, str | Path) else cache
        """Where answers are kept across runs, if anywhere."""
        tracer = trace.get_tracer("rlmflow", tracer_provider=tracer_provider)
        self.settings = RunSettings(
            root=root_model, root_style=self.root_style, sub=sub_model, sub_models=aliases,
            bridge_limits=bridge_limits or BridgeLimits(), sandbox=sandbox or LocalSandbox(),
            dispatcher=dispatcher or default_dispatcher(), tracer=tracer,
            system_prompt=system_prompt or prompts.SYSTEM_PROMPT, root_max_tokens=root_max_tokens,
            sub_max_tokens=sub_max_tokens, max_feedback_chars=max_feedback_chars,
            history_chars=history_chars if history_chars is not None else default_history_chars(root_model),
            max_repeated_errors=max_repeated_errors, dedup=dedup, trajectory=trajectory,
            capture_content=capture_content, cache=self.cache,
            plan_first=_plans_first(root_model) if plan_first is None else plan_first,
        )
        """What every run of this RLM is given (frozen)."""
        # Calls of this RLM's runs report to its own providers even on a shared Dispatcher.
        self._telemetry: CallTelemetry | None = None
        if tracer_provider is not None or meter_provider is not None:
            self._telemetry = CallTelemetry(tracer, CallMetrics(meter_provider, self.dispatcher.lanes))

    @property
    def root(self) -> LanguageModel:
        """The model that writes code."""
        return self.settings.root

    @property
    def sub(self) -> LanguageModel:
        """The model behind ``llm_query``."""
        return self.settings.sub

    @property
    def sub_models(self) -> Mapping[str, LanguageModel]:
        """The models sandbox code may name, by alias (``"default"`` is :attr:`sub`)."""
        return self.settings.sub_models

    @property
    def dispatcher(self) -> Dispatcher:
        """Where this RLM's model calls are scheduled."""
        return self.settings.dispatcher

    @property
    def sandbox(self) -> Sandbox:
        """Where this RLM's runs execute code."""
        return self.settings.sandbox

    async def __aenter__(self) -> RLM:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the models this RLM created from model strings, the trajectory file, and the journal
        and cache files it opened from paths."""
        await self._registry.aclose()
        trajectory = self.settings.trajectory
        if trajectory is not None:
            await anyio.to_thread.run_sync(trajectory.close)
        for journal in (self.journal, self._replay):
            if journal is not None and self._owns_journal:
                await anyio.to_thread.run_sync(journal.close)
        if self.cache is not None and self._owns_cache:
            await self.cache.aclose()

    async def run(
        self,
        context: Context,
        query: str,
        *,
        budget: Budget | None = None,
        deadline: float | None = None,
        max_turns: int | None = None,
        max_depth: int | None = None,
        metadata: Mapping[str, str] | None = None,
        ledger: BudgetLedger | None = None,
        progress: RunProgress | None = None,
        events: EventSink | None = None,
    ) -> RLMResult:
        """Answer ``query`` over ``context``.

        Per-run settings override the RLM's: ``budget`` (replaces the RLM's), ``deadline``
        (seconds for the whole run, children included), ``max_turns``, ``max_depth``;
        ``metadata`` (string pairs) goes onto the run's span, events, trajectory and result.
        ``ledger``: a shared :class:`BudgetLedger` (a tenant's, a batch's) the run draws from:
        its spend is charged there too, and once that ledger is exhausted every run drawing
        from it stops. ``events`` receives :mod:`rlmflow.events` as they happen (see also
        :meth:`stream`); ``progress`` is updated live.

        Raises :class:`ContextError` for an unusable context, :class:`NoAnswerError` when the
        turns run out without ``FINAL``, :class:`BudgetExceededError` when a cap or the deadline
        stops the run, :class:`SandboxError` when no sandbox can run. Each of these carries the
        work done so far on ``.partial`` (an :class:`RLMResult` with an empty answer); so does
        the ``CancelledError`` of a cancelled run, which is re-raised as it must be.
        """
        return await self._start(context, query, budget=budget, deadline=deadline, max_turns=max_turns,
                                 max_depth=max_depth, metadata=metadata, ledger=ledger, progress=progress,
                                 events=events, resumed=None)

    async def _start(
        self,
        context: Context,
        query: str,
        *,
        budget: Budget | None,
        deadline: float | None,
        max_turns: int | None,
        max_depth: int | None,
        metadata: Mapping[str, str] | None,
        ledger: BudgetLedger | None,
        progress: RunProgress | None,
        events: EventSink | None,
        resumed: JournalRun | None,
        fork_turn: int | None = None,
    ) -> RLMResult:
        context, run_budget, options = self._prepare(context, query, budget, deadline, max_turns, max_depth,
                                                     metadata, ledger)
        run_ledger = ledger.child(run_budget) if ledger is not None else BudgetLedger(run_budget)
        share = RunShare(weight=self.run_weight, max_concurrency=self.run_max_concurrency)
        state = RunState(context, query, options=options, ledger=run_ledger, share=share,
                         progress=progress or RunProgress(),
                         run_id=resumed.run_id if resumed is not None and fork_turn is None else None)
        if resumed is not None and fork_turn is not None:
            calls, roots = first_turns(resumed.calls, fork_turn)
            state.tree.memory = CallMemory(
                journal=self.journal, run_id=state.run_id, recorded=calls, root_turns=roots,
                turns=[turn for turn in resumed.turns if turn.turn <= fork_turn],
                forked_from=(resumed.run_id, fork_turn),
            )
        elif resumed is not None:
            # a fork's first turns were another root's: answered in order, as when it was forked
            inherited = resumed.settings.get("forked_at_turn")
            roots, calls = inherited_turns(resumed.calls, inherited if isinstance(inherited, int) else 0)
            state.tree.memory = CallMemory(journal=self.journal, run_id=resumed.run_id, recorded=calls,
                                           root_turns=roots, turns=resumed.turns)
        elif self._replay is not None:
            recorded = await anyio.to_thread.run_sync(self._replay.all_calls)
            state.tree.memory = CallMemory(journal=None, run_id=state.run_id, recorded=recorded, strict=True)
        elif self.journal is not None:
            state.tree.memory = CallMemory(journal=self.journal, run_id=state.run_id)
        with use_telemetry(self._telemetry):
            return await execute_run(self.settings, state, events=events, parent=None)

    async def resume(
        self,
        context: Context,
        run_id: str | None = None,
        *,
        budget: Budget | None = None,
        deadline: float | None = None,
        progress: RunProgress | None = None,
        events: EventSink | None = None,
    ) -> RLMResult:
        """Continue a journaled run that did not answer (its process was killed, it was cancelled,
        a budget stopped it): the latest such run of this RLM's journal unless ``run_id`` names one.

        The journal holds the document's digest, not the document: pass the same ``context``. A
        fresh sandbox runs the recorded turns again; every model call the run had already paid
        for is answered from the journal (no request is sent, the ledger is charged what it cost)
        and the run goes on live from its last recorded call. If re-run code prints otherwise than
        it did (not deterministic), ``result.diverged_at`` says from which turn the run went on
        live. The result's ``replayed_calls`` counts the calls answered from the journal.

        Raises :class:`ConfigurationError` without a journal, for an unknown run, a run recorded
        by another rlmflow version or over another document; then what :meth:`run` raises.
        """
        journal = self.journal
        if journal is None:
            raise ConfigurationError("resume needs RLM(journal=...): the journal the run was recorded in")
        chosen = run_id or await anyio.to_thread.run_sync(journal.latest_unfinished)
        if chosen is None:
            raise ConfigurationError(f"{journal.where} holds no run without an answer to resume")
        context, recorded = await self._recorded(journal, chosen, context)
        settings = recorded.settings
        return await self._start(
            context, recorded.query, budget=budget, deadline=deadline, max_turns=settings.get("max_turns"),
            max_depth=settings.get("max_depth"), metadata=settings.get("metadata"), ledger=None, progress=progress,
            events=events, resumed=recorded,
        )

    async def fork(
        self,
        context: Context,
        run_id: str,
        *,
        turn: int,
        budget: Budget | None = None,
        deadline: float | None = None,
        max_turns: int | None = None,
        progress: RunProgress | None = None,
        events: EventSink | None = None,
    ) -> RLMResult:
        """A new run that starts as the journaled run ``run_id`` did and goes its own way after
        its first ``turn`` root turns: those turns' replies and every call they made are answered
        from the journal (nothing sent, the ledger charged what they cost), then this RLM's root
        (another model, another system prompt) continues live under this call's budget.

        Build an RLM with the root, prompt or budget to try, on the parent's journal, and pass
        the parent's ``context``. The fork is journaled as a run of its own, which records
        ``forked_from`` and ``forked_at_turn`` in its settings; the parent is left as it was.

        Raises :class:`ConfigurationError` without a journal, for an unknown run, a ``turn``
        outside ``0..`` the run's recorded turns, or what :meth:`resume` refuses; then what
        :meth:`run` raises.
        """
        journal = self.journal
        if journal is None:
            raise ConfigurationError("fork needs RLM(journal=...): the journal the run was recorded in")
        context, recorded = await self._recorded(journal, run_id, context)
        recorded_turns = sum(call.role == "root" and call.depth == 0 for call in recorded.calls)
        if isinstance(turn, bool) or not isinstance(turn, int) or not 0 <= turn <= recorded_turns:
            raise ConfigurationError(
                f"run {run_id} has {recorded_turns} recorded root turns: fork it at a turn from 0 to "
                f"{recorded_turns}, not {turn!r}"
            )
        settings = recorded.settings
        return await self._start(
            context, recorded.query, budget=budget, deadline=deadline,
            max_turns=max_turns if max_turns is not None else settings.get("max_turns"),
            max_depth=settings.get("max_depth"), metadata=settings.get("metadata"), ledger=None, progress=progress,
            events=events, resumed=recorded, fork_turn=turn,
        )

    async def _recorded(self, journal: RunJournal, run_id: str, context: Context) -> tuple[Context, JournalRun]:
        """The journal's record of ``run_id``, checked against this rlmflow and ``context``."""
        recorded = await anyio.to_thread.run_sync(journal.read_run, run_id)
        if recorded is None:
            raise ConfigurationError(f"{journal.where} holds no run {run_id!r}")
        if recorded.version != __version__:
            raise ConfigurationError(
                f"run {run_id} was recorded by rlmflow {recorded.version}; this is {__version__}: its calls "
                "may not be asked the same way (start it again)"
            )
        context = validate_context(context)
        digest = await anyio.to_thread.run_sync(context_digest, context)
        if digest != recorded.context_sha256:
            raise ConfigurationError(
                f"run {run_id} was recorded over another document (sha256 {recorded.context_sha256[:12]}..., this "
                f"one is {digest[:12]}...): pass the same document"
            )
        return context, recorded

    def check(
        self,
        context: Context,
        query: str,
        *,
        budget: Budget | None = None,
        deadline: float | None = None,
        max_turns: int | None = None,
        max_depth: int | None = None,
        metadata: Mapping[str, str] | None = None,
        ledger: BudgetLedger | None = None,
    ) -> None:
        """Everything :meth:`run` would refuse before it starts, checked now, without a sandbox or
        a model call: a service calls it before it answers its client (so bad input gets a 4xx,
        not a 200 followed by a failure). Same arguments as :meth:`run`.

        Raises :class:`ContextError` for an unusable context; :class:`ConfigurationError` for an
        empty query, bad options or metadata, a cost cap on a model whose price is unknown, or a
        hosted model without its credentials; :class:`BudgetExceededError` when ``ledger`` (a
        tenant's) has nothing left to spend.
        """
        self._prepare(context, query, budget, deadline, max_turns, max_depth, metadata, ledger)

    def _prepare(
        self,
        context: Context,
        query: str,
        budget: Budget | None,
        deadline: float | None,
        max_turns: int | None,
        max_depth: int | None,
        metadata: Mapping[str, str] | None,
        ledger: BudgetLedger | None,
    ) -> tuple[Context, Budget, RunOptions]:
        """The validated context, the run's budget and options; see :meth:`check`."""
        context = validate_context(context)
        if not isinstance(query, str) or not query.strip():
            raise ConfigurationError("the query is empty: ask a question")
        run_budget = budget if budget is not None else self.budget
        if not isinstance(run_budget, Budget):
            raise ConfigurationError(f"budget must be a Budget, not {type(run_budget).__name__}")
        if ledger is not None and not isinstance(ledger, BudgetLedger):
            raise ConfigurationError(f"ledger must be a BudgetLedger, not {type(ledger).__name__}")
        options = self._options(run_budget, deadline, max_turns, max_depth, metadata)
        models = [self.root, *self.sub_models.values()]
        for model in models:  # a cost cap needs every price before anything is sent
            self.dispatcher.check_budget(model, run_budget)
            if ledger is not None:
                self.dispatcher.check_budget(model, ledger)
            ready = getattr(model, "check_ready", None)
            if callable(ready):  # credentials of a hosted endpoint, without a request
                ready()
        if ledger is not None:
            spent = next((q for q, left in ledger.remaining().items() if left is not None and left <= 0), None)
            if spent is not None:
                raise BudgetExceededError(
                    f"the ledger this run would draw from has no {spent} left", limit=f"max_{spent}",
                    spent={q: float(getattr(ledger.spent, q)) for q in ("calls", "input_tokens", "output_tokens",
                                                                          "cost_usd")},
                )
        return context, run_budget, options

    def stream(
        self,
        context: Context,
        query: str,
        *,
        budget: Budget | None = None,
        deadline: float | None = None,
        max_turns: int | None = None,
        max_depth: int | None = None,
        metadata: Mapping[str, str] | None = None,
        ledger: BudgetLedger | None = None,
        heartbeat: float = 15.0,
        max_buffered: int = 10_000,
    ) -> RunStream:
        """Run like :meth:`run`, yielding :mod:`rlmflow.events` as they happen.

        ``async for event in rlm.stream(context, query)``: the last event is an
        :class:`~rlmflow.events.AnswerReady` or a :class:`~rlmflow.events.RunFailed` of depth 0.
        Afterwards ``.result`` / ``.error`` hold the outcome, and ``await stream.wait()``
        returns the result or raises the error. Use ``async with rlm.stream(...) as events``
        to be sure the run is cancelled if you stop reading early. A reader waiting ``heartbeat``
        seconds gets a :class:`~rlmflow.events.Heartbeat`; past ``max_buffered`` unread events
        the per-call ones are shed (see :class:`RunStream`).

        Bad input raises here, at the call, as :meth:`check` does (so a service can answer its
        client with an error before it sends a 200); once it returns, the stream always ends with
        one of those two events.
        """
        self.check(context, query, budget=budget, deadline=deadline, max_turns=max_turns, max_depth=max_depth,
                   metadata=metadata, ledger=ledger)  # bad input raises here, before any event
        return RunStream(
            lambda sink: self.run(
                context, query, budget=budget, deadline=deadline, max_turns=max_turns, max_depth=max_depth,
                metadata=metadata, ledger=ledger, events=sink,
            ),
            heartbeat=heartbeat,
            max_buffered=max_buffered,
        )

    def _options(
        self,
        budget: Budget,
        deadline: float | None,
        max_turns: int | None,
        max_depth: int | None,
        metadata: Mapping[str, str] | None,
    ) -> RunOptions:
        turns = max_turns if max_turns is not None else self.max_turns
        if budget.max_turns is not None:
            turns = min(turns, budget.max_turns)
        depth = max_depth if max_depth is not None else self.max_depth
        if budget.max_depth is not None:
            depth = min(depth, budget.max_depth)
        if turns < 1 or depth < 0:
            raise ConfigurationError("max_turns must be at least 1 and max_depth at least 0")
        if deadline is None:
            deadline = budget.deadline
        if deadline is not None and deadline <= 0:
            raise ConfigurationError("the deadline must be a positive number of seconds")
        pairs = dict(metadata or {})
        for key, value in pairs.items():
            if not isinstance(key, str) or not isinstance(value, str) or not _ALIAS.fullmatch(key):
                raise ConfigurationError(f"metadata must map simple string keys to strings; got {key!r}")
        return RunOptions(max_turns=turns, max_depth=depth, deadline=deadline, metadata=pairs)
