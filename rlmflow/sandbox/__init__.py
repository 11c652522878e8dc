"""Where model-written code runs: the protocol, the local worker and its isolation, AgentCore."""

from .agentcore import AgentCoreSandbox, AgentCoreSandboxSession

__all__ = ["AgentCoreSandbox", "AgentCoreSandboxSession"]
