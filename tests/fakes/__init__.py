"""The project's test doubles: local servers speaking the providers' real protocols on 127.0.0.1.

Used by the tests, the benchmarks and ``scripts/``; not part of rlmflow's API and not shipped in
the wheel, so their shape may change with the tests (e.g. to follow botocore's service models).
What a user's own test suite can rely on is :func:`rlmflow.testing.network.allow_only_loopback`.

- :mod:`.fake_openai`: OpenAI chat completions, with RPM/TPM windows, latency and faults;
- :mod:`.fake_anthropic`: Anthropic Messages, with server-sent-event streaming;
- :mod:`.fake_bedrock`: Bedrock Converse / ConverseStream (SigV4 checked, event-stream framing);
- :mod:`.fake_agentcore`: the AgentCore Code Interpreter data plane, executing code for real
  (each session a :mod:`.fake_agentcore_kernel` process).
"""

from .fake_anthropic import FakeAnthropicServer
from .fake_bedrock import FakeBedrockServer
from .fake_openai import FakeOpenAIServer, FaultPlan

__all__ = ["FakeAnthropicServer", "FakeBedrockServer", "FakeOpenAIServer", "FaultPlan"]
