"""Every span name and attribute key rlmflow emits, in one place.

Two vocabularies are written side by side: the OpenTelemetry GenAI semantic conventions
(``gen_ai.*``, still marked "Development"; names as in opentelemetry-semantic-conventions 0.66b2,
semconv 1.41) and OpenInference (``openinference.span.kind``, ``input.value``, ``llm.*``), which
Arize Phoenix and other OpenInference tools read. When either moves, only this module changes.
"""

from __future__ import annotations

# GenAI semantic conventions
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
# parts of gen_ai.usage.input_tokens (which includes them) read from and written to a prompt cache
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS = "gen_ai.usage.cache_creation.input_tokens"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
GEN_AI_TOOL_DESCRIPTION = "gen_ai.tool.description"
GEN_AI_TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"  # JSON; captured content only
GEN_AI_TOOL_CALL_RESULT = "gen_ai.tool.call.result"  # captured content only
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"

OPERATION_CHAT = "chat"
OPERATION_INVOKE_AGENT = "invoke_agent"
OPERATION_EXECUTE_TOOL = "execute_tool"
TOOL_TYPE_FUNCTION = "function"
TOOL_EXECUTE_CODE = "execute_code"  # the tool name of a sandbox cell

# OpenInference (https://arize-ai.github.io/openinference/spec/semantic_conventions.html)
OI_SPAN_KIND = "openinference.span.kind"
OI_KIND_AGENT = "AGENT"
OI_KIND_CHAIN = "CHAIN"
OI_KIND_TOOL = "TOOL"
OI_KIND_LLM = "LLM"
OI_PROJECT_NAME = "openinference.project.name"  # a resource attribute: Phoenix's project
INPUT_VALUE = "input.value"
INPUT_MIME_TYPE = "input.mime_type"
OUTPUT_VALUE = "output.value"
OUTPUT_MIME_TYPE = "output.mime_type"
MIME_TEXT = "text/plain"
MIME_JSON = "application/json"
LLM_MODEL_NAME = "llm.model_name"
LLM_PROVIDER = "llm.provider"
LLM_TOKEN_COUNT_PROMPT = "llm.token_count.prompt"
LLM_TOKEN_COUNT_COMPLETION = "llm.token_count.completion"
LLM_TOKEN_COUNT_TOTAL = "llm.token_count.total"
LLM_TOKEN_COUNT_CACHE_READ = "llm.token_count.prompt_details.cache_read"
LLM_TOKEN_COUNT_CACHE_WRITE = "llm.token_count.prompt_details.cache_write"
LLM_INPUT_MESSAGES = "llm.input_messages"  # flattened: llm.input_messages.<i>.message.role
LLM_OUTPUT_MESSAGES = "llm.output_messages"
MESSAGE_ROLE = "message.role"
MESSAGE_CONTENT = "message.content"
TOOL_NAME = "tool.name"
TOOL_PARAMETERS = "tool.parameters"
SESSION_ID = "session.id"
METADATA = "metadata"

# rlmflow's own
RLM_RUN_ID = "rlm.run_id"
RLM_DEPTH = "rlm.depth"
RLM_TURN = "rlm.turn"
RLM_ROLE = "rlm.call.role"  # "root" or "sub"
RLM_COST_USD = "rlm.cost_usd"
RLM_BATCH_SIZE = "rlm.batch.size"
RLM_BATCH_FAILED = "rlm.batch.failed"
RLM_QUEUE_WAIT_S = "rlm.queue_wait_s"
RLM_ATTEMPTS = "rlm.call.attempts"
RLM_THROTTLES = "rlm.call.throttles"
RLM_CALL_SOURCE = "rlm.call.source"  # "cache" or "journal": answered without a provider request
RLM_DEDUPLICATED = "rlm.batch.deduplicated"
RLM_CELL_DURATION_S = "rlm.cell.duration_s"
RLM_CELL_OUTPUT_CHARS = "rlm.cell.output_chars"
RLM_SANDBOX_RESTARTS = "rlm.sandbox.restarts"
RLM_CONTEXT_CHARS = "rlm.context.chars"
RLM_CONTEXT_SHA256 = "rlm.context.sha256"
RLM_PROMPT_CHARS = "rlm.prompt.chars"
RLM_PROMPT_SHA256 = "rlm.prompt.sha256"
RLM_LANE = "rlm.lane"
RLM_QUERY_CHARS = "rlm.query.chars"
RLM_QUERY_SHA256 = "rlm.query.sha256"
RLM_ANSWER_CHARS = "rlm.answer.chars"
RLM_ANSWER_SHA256 = "rlm.answer.sha256"
RLM_CELL_CODE_CHARS = "rlm.cell.code_chars"
RLM_METADATA_PREFIX = "rlm.metadata."  # + the key of a run(metadata=...) pair
# opt-in content capture (RLM(capture_content=N)): every text truncated to N characters.
# Messages are JSON in the GenAI "parts" shape: [{"role": ..., "parts": [{"type": "text", "content": ...}]}]
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"  # [{"type": "text", "content": ...}]

# metrics
METRIC_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_OPERATION_DURATION = "gen_ai.client.operation.duration"
METRIC_QUEUE_WAIT = "rlm.client.queue_wait"
METRIC_COST = "rlm.client.cost"
# input tokens read from / written to a prompt cache, by rlm.cache.operation ("read" or "write")
METRIC_CACHE_TOKENS = "rlm.client.cache.tokens"
RLM_CACHE_OPERATION = "rlm.cache.operation"
METRIC_THROTTLES = "rlm.client.throttles"
METRIC_RETRIES = "rlm.client.retries"
METRIC_ANSWERED = "rlm.client.answered_without_request"  # by rlm.call.source: cache or journal
METRIC_LANE_IN_FLIGHT = "rlm.lane.in_flight"
METRIC_LANE_LIMIT = "rlm.lane.concurrency_limit"
# what a call spent beyond its budget reservation (a metric by quantity, and a span event)
METRIC_BUDGET_OVERRUN = "rlm.budget.overrun"
EVENT_BUDGET_OVERRUN = "rlm.budget.overrun"
RLM_BUDGET_QUANTITY = "rlm.budget.quantity"
RLM_BUDGET_LIMIT = "rlm.budget.limit"  # the cap that stopped a run (max_calls, deadline, ...)
# what a run and its children spent, on the run's span; not gen_ai.usage.*, which dashboards sum
# over every span of a trace (they would count each call twice)
RLM_RUN_CALLS = "rlm.run.calls"
RLM_RUN_INPUT_TOKENS = "rlm.run.input_tokens"
RLM_RUN_OUTPUT_TOKENS = "rlm.run.output_tokens"
RLM_RUN_COST_USD = "rlm.run.cost_usd"
RLM_RUN_CACHE_READ_TOKENS = "rlm.run.cache_read_tokens"
RLM_RUN_CACHE_WRITE_TOKENS = "rlm.run.cache_write_tokens"

# span names
SPAN_RUN = "invoke_agent rlm"
SPAN_TURN = "rlm.turn"
SPAN_EXECUTE = "execute_code"
SPAN_BATCH = "llm_query_many"


def chat_span_name(model: str) -> str:
    return f"{OPERATION_CHAT} {model}"
# the sandbox's isolation report on the run span (SandboxReport.attributes)
RLM_SANDBOX_BACKEND = "rlm.sandbox.backend"
RLM_SANDBOX_ISOLATION = "rlm.sandbox.isolation"
RLM_SANDBOX_LAYERS = "rlm.sandbox.layers"
RLM_SANDBOX_MISSING = "rlm.sandbox.missing"
RLM_SANDBOX_CONFINED = "rlm.sandbox.confined"
RLM_SANDBOX_PROPERTY_PREFIX = "rlm.sandbox."  # + filesystem, network, exec, processes
