"""Where model-written code runs: the protocol, the local worker and its isolation, AgentCore.

The AgentCore backend imports botocore; it is loaded when first named, not with ``rlmflow``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agentcore import AgentCoreSandbox, AgentCoreSandboxSession

__all__ = ["AgentCoreSandbox", "AgentCoreSandboxSession"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import agentcore

        return getattr(agentcore, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
