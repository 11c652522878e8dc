"""What a run is given: the RLM's frozen settings and the caller's per-run options.

The bottom of the run package: values only. :class:`RunSettings` is built once by
:class:`rlmflow.RLM` and handed down to every part of a run (lifecycle, loops, cells, bridge,
recorder), which read it and never reach back up to the ``RLM``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry import trace

from ..dispatch.dispatcher import Dispatcher
from ..durable.cache import CallCache
from ..models.base import LanguageModel
from ..sandbox.base import Sandbox
from ..telemetry.trajectory import Trajectory

__all__ = ["DEFAULT_ALIAS", "BridgeLimits", "RunOptions", "RunSettings"]

DEFAULT_ALIAS = "default"
"""The alias under which sandbox code reaches the sub-model (``llm_query(p)`` with no ``model``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BridgeLimits:
    """What sandbox code may ask of the host in one run; requests beyond these are refused.

    - ``max_batch_items``: prompts in one ``llm_query_many`` (or children in one
      ``rlm_query_many``);
    - ``max_prompt_chars`` / ``max_batch_chars``: size of one prompt and of one batch;
    - ``max_output_tokens``: the largest ``max_tokens`` sandbox code may ask for (larger values
      are clamped to it);
    - ``max_sub_calls``: sub-calls a whole run (children included) may send when its budget sets
      no ``max_calls`` (a safety net against runaway loops);
    - ``max_child_context_chars``: size of a context passed to ``rlm_query``;
    - ``max_concurrent_children``: child runs (each with its own sandbox) running at once per
      depth of one run tree; more wait for a slot (each run has its own slots, so one run's
      children never hold up another's);
    - ``max_answer_chars``: the longest answer ``FINAL`` can give (longer ones are cut, and the
      cut is stated);
    - ``max_dedup_chars``: characters of prompts and answers a run keeps to answer repeated
      prompts (``RLM(dedup=True)``); past it the oldest are forgotten (and would be sent again).
    """

    max_batch_items: int = 10_000
    max_prompt_chars: int = 2_000_000
    max_batch_chars: int = 64_000_000
    max_output_tokens: int = 16_384
    max_sub_calls: int = 10_000
    max_child_context_chars: int = 64_000_000
    max_concurrent_children: int = 4
    max_answer_chars: int = 200_000
    max_dedup_chars: int = 32_000_000

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 1:
                raise ValueError(f"BridgeLimits.{name} must be at least 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class RunSettings:
    """Everything about an RLM's runs that does not change from one run to the next.

    ``tracer`` is the RLM's; ``capture_content`` is how many characters of prompts, code and
    outputs go into span attributes (0: none); ``cache`` answers requests asked before, by any
    run that shares it; ``plan_first``: the code-block root's first turn is the plan form of
    :mod:`rlmflow._run.plan`.
    """

    root: LanguageModel
    root_style: Literal["code", "strands"]
    sub: LanguageModel
    sub_models: Mapping[str, LanguageModel]
    bridge_limits: BridgeLimits
    sandbox: Sandbox
    dispatcher: Dispatcher
    tracer: trace.Tracer
    system_prompt: str
    root_max_tokens: int
    sub_max_tokens: int
    max_feedback_chars: int
    history_chars: int
    max_repeated_errors: int
    dedup: bool
    trajectory: Trajectory | None
    capture_content: int
    cache: CallCache | None = None
    plan_first: bool = False


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The settings of one run: the RLM's defaults with the caller's per-run overrides applied."""

    max_turns: int
    max_depth: int
    deadline: float | None
    metadata: Mapping[str, str] = field(default_factory=dict)
