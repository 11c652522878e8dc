"""A blocking entry point for scripts and notebooks without an event loop.

This is the one place rlmflow starts an event loop; nothing in the library's async paths calls
it. Inside async code, use ``await RLM(...).run(...)`` instead.
"""

from __future__ import annotations

from typing import Any

import anyio

from .engine import RLM, RLMResult
from .sandbox.base import Context

__all__ = ["run_sync"]


def run_sync(context: Context, query: str, **options: Any) -> RLMResult:
    """Build an ``RLM(**options)``, answer ``query`` over ``context`` and close it.

    Raises ``RuntimeError`` if called from a running event loop.
    """

    async def main() -> RLMResult:
        async with RLM(**options) as rlm:
            return await rlm.run(context, query)

    return anyio.run(main)
