"""A blocking entry point for scripts and notebooks without an event loop.

This is the one place rlmflow starts an event loop; nothing in the library's async paths calls
it. Inside async code, use ``await RLM(...).run(...)`` instead.
"""

from __future__ import annotations

import anyio

from .dispatch.budget import Budget
from .engine import RLM, RLMResult
from .models.base import LanguageModel
from .models.registry import DEFAULT_MODEL
from .sandbox.base import Context, Sandbox

__all__ = ["run_sync"]


def run_sync(
    context: Context,
    query: str,
    *,
    root: str | LanguageModel = DEFAULT_MODEL,
    sub: str | LanguageModel | None = None,
    budget: Budget | None = None,
    max_turns: int = 12,
    max_depth: int = 1,
    sandbox: Sandbox | None = None,
) -> RLMResult:
    """Build an ``RLM`` with these settings, answer ``query`` over ``context`` and close it.

    For every other setting build an :class:`RLM` and ``await rlm.run(...)`` in async code.
    Raises ``RuntimeError`` if called from a running event loop, and what :meth:`RLM.run` raises.
    """

    async def main() -> RLMResult:
        async with RLM(root=root, sub=sub, budget=budget, max_turns=max_turns, max_depth=max_depth,
                       sandbox=sandbox) as rlm:
            return await rlm.run(context, query)

    return anyio.run(main)
