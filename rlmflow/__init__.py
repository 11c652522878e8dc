"""rlmflow: Recursive Language Models on asyncio.

A root model writes Python over a long ``context`` held in a sandbox; sub-LLM calls fan out
through one Dispatcher under rate and budget control.

    async with RLM(root="local:qwen2.5-coder-0.5b") as rlm:
        result = await rlm.run(document, "Who wrote the letter?")
"""

from typing import TYPE_CHECKING

from ._exceptions import (
    BatchError,
    BudgetExceededError,
    ConfigurationError,
    ContextError,
    ContextOverflowError,
    FatalModelError,
    InternalError,
    IsolationUnavailableError,
    ModelError,
    ModelNotReadyError,
    NoAnswerError,
    NotInJournalError,
    QuotaExhaustedError,
    RLMError,
    SandboxCrashedError,
    SandboxError,
    SandboxProtocolError,
    SandboxRequestError,
    SharedStateUnavailableError,
    ThrottledError,
    TransientModelError,
    UnknownModelError,
)
from ._run.settings import BridgeLimits
from .context import load_context_files, validate_context
from .dispatch.budget import Budget, BudgetLedger, Spend
from .dispatch.dispatcher import Dispatcher
from .dispatch.lane import LaneStatistics, RunShare
from .dispatch.limits import Limits, Priority
from .dispatch.pricing import Price, Pricing
from .dispatch.process import default_dispatcher, set_default_dispatcher
from .dispatch.records import CallRecord
from .dispatch.redis_budget import SharedBudget
from .dispatch.retry import RetryPolicy
from .dispatch.shared import SharedConfig, SharedState
from .engine import RLM, RLMResult, RunProgress, Turn
from .events import (
    AnswerReady,
    AnyRunEvent,
    BatchFinished,
    BatchStarted,
    CellFinished,
    CodeSubmitted,
    Heartbeat,
    RootText,
    RunEvent,
    RunFailed,
    RunStarted,
    SubCallDone,
    TurnStarted,
)
from .models.base import LanguageModel, Message, ModelRequest, ModelResponse, Usage
from .models.caching import PromptCache
from .models.local import LocalModel
from .models.scripted import ScriptedModel
from .result import partial_result
from .sandbox.base import CellResult, Sandbox, SandboxSession
from .sandbox.local import LocalSandbox
from .stream import RunStream
from .sync import run_sync

if TYPE_CHECKING:
    from .models.anthropic import AnthropicModel
    from .models.bedrock import BedrockModel
    from .models.openai import OpenAIModel
    from .sandbox.agentcore import AgentCoreSandbox

from ._version import __version__ as __version__

# Remote providers and the AgentCore sandbox are imported when first named, so `import rlmflow`
# loads no HTTP or AWS client.
_LAZY = {
    "AgentCoreSandbox": ".sandbox.agentcore",
    "AnthropicModel": ".models.anthropic",
    "BedrockModel": ".models.bedrock",
    "OpenAIModel": ".models.openai",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "RLM",
    "AgentCoreSandbox",
    "AnswerReady",
    "AnthropicModel",
    "AnyRunEvent",
    "BatchError",
    "BatchFinished",
    "BatchStarted",
    "BedrockModel",
    "BridgeLimits",
    "Budget",
    "BudgetExceededError",
    "BudgetLedger",
    "CallRecord",
    "CellFinished",
    "CellResult",
    "CodeSubmitted",
    "ConfigurationError",
    "ContextError",
    "ContextOverflowError",
    "Dispatcher",
    "FatalModelError",
    "Heartbeat",
    "InternalError",
    "IsolationUnavailableError",
    "LaneStatistics",
    "LanguageModel",
    "Limits",
    "LocalModel",
    "LocalSandbox",
    "Message",
    "ModelError",
    "ModelNotReadyError",
    "ModelRequest",
    "ModelResponse",
    "NoAnswerError",
    "NotInJournalError",
    "OpenAIModel",
    "Price",
    "Pricing",
    "Priority",
    "PromptCache",
    "QuotaExhaustedError",
    "RLMError",
    "RLMResult",
    "RetryPolicy",
    "RootText",
    "RunEvent",
    "RunFailed",
    "RunProgress",
    "RunShare",
    "RunStarted",
    "RunStream",
    "Sandbox",
    "SandboxCrashedError",
    "SandboxError",
    "SandboxProtocolError",
    "SandboxRequestError",
    "SandboxSession",
    "ScriptedModel",
    "SharedBudget",
    "SharedConfig",
    "SharedState",
    "SharedStateUnavailableError",
    "Spend",
    "SubCallDone",
    "ThrottledError",
    "TransientModelError",
    "Turn",
    "TurnStarted",
    "UnknownModelError",
    "Usage",
    "default_dispatcher",
    "load_context_files",
    "partial_result",
    "run_sync",
    "set_default_dispatcher",
    "validate_context",
]
