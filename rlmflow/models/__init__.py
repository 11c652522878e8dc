"""Models behind one :class:`LanguageModel` protocol; provider SDKs are imported lazily."""

from .base import (
    LanguageModel,
    Message,
    ModelRequest,
    ModelResponse,
    StreamingLanguageModel,
    StreamingView,
    TextCallback,
    TokenCountingModel,
    Usage,
    estimate_tokens,
)
from .counting import PromptCount, PromptCounter
from .registry import DEFAULT_MODEL, ModelRegistry, parse_model_string
from .scripted import ScriptedModel

__all__ = [
    "DEFAULT_MODEL",
    "LanguageModel",
    "Message",
    "ModelRegistry",
    "ModelRequest",
    "ModelResponse",
    "PromptCount",
    "PromptCounter",
    "ScriptedModel",
    "StreamingLanguageModel",
    "StreamingView",
    "TextCallback",
    "TokenCountingModel",
    "Usage",
    "estimate_tokens",
    "parse_model_string",
]
