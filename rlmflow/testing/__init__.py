"""Offline doubles for tests and benchmarks: scripted models and a fake provider server."""

from ..models.scripted import ScriptedModel
from .fake_anthropic import FakeAnthropicServer
from .fake_bedrock import FakeBedrockServer
from .fake_openai import FakeOpenAIServer, FaultPlan

__all__ = ["FakeAnthropicServer", "FakeBedrockServer", "FakeOpenAIServer", "FaultPlan", "ScriptedModel"]
