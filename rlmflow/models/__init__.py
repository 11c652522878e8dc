"""Models behind one :class:`LanguageModel` protocol; provider SDKs are imported lazily."""

from .base import (
    LanguageModel,
    Message,
    ModelRequest,
    ModelResponse,
    StreamingLanguageModel,
    StreamingView,
    TextCallback,
    Usage,
    estimate_tokens,
)
from .registry import DEFAULT_MODEL, ModelRegistry, parse_model_string
from .scripted import ScriptedModel

__all__ = [
    "DEFAULT_MODEL",
    "LanguageModel",
    "Message",
    "ModelRegistry",
    "ModelRequest",
    "ModelResponse",
    "ScriptedModel",
    "StreamingLanguageModel",
    "StreamingView",
    "TextCallback",
    "Usage",
    "estimate_tokens",
    "parse_model_string",
]
