"""Every span name and attribute key rlmflow emits, in one place.

The OpenTelemetry GenAI conventions are still marked "Development"; when they move, only this
module changes.
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
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
ERROR_TYPE = "error.type"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"

OPERATION_CHAT = "chat"
OPERATION_INVOKE_AGENT = "invoke_agent"

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
RLM_DEDUPLICATED = "rlm.batch.deduplicated"
RLM_CELL_DURATION_S = "rlm.cell.duration_s"
RLM_CELL_OUTPUT_CHARS = "rlm.cell.output_chars"
RLM_SANDBOX_RESTARTS = "rlm.sandbox.restarts"
RLM_CONTEXT_CHARS = "rlm.context.chars"
RLM_CONTEXT_SHA256 = "rlm.context.sha256"
RLM_PROMPT_CHARS = "rlm.prompt.chars"
RLM_PROMPT_SHA256 = "rlm.prompt.sha256"
RLM_LANE = "rlm.lane"
# opt-in content capture (RLM(capture_content=N)): truncated to N characters
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
RLM_CELL_CODE = "rlm.cell.code"
RLM_CELL_OUTPUT = "rlm.cell.output"

# metrics
METRIC_TOKEN_USAGE = "gen_ai.client.token.usage"
METRIC_OPERATION_DURATION = "gen_ai.client.operation.duration"
METRIC_QUEUE_WAIT = "rlm.client.queue_wait"
METRIC_COST = "rlm.client.cost"
METRIC_THROTTLES = "rlm.client.throttles"
METRIC_RETRIES = "rlm.client.retries"
METRIC_LANE_IN_FLIGHT = "rlm.lane.in_flight"
METRIC_LANE_LIMIT = "rlm.lane.concurrency_limit"
# what a call spent beyond its budget reservation (a metric by quantity, and a span event)
METRIC_BUDGET_OVERRUN = "rlm.budget.overrun"
EVENT_BUDGET_OVERRUN = "rlm.budget.overrun"
RLM_BUDGET_QUANTITY = "rlm.budget.quantity"

# span names
SPAN_RUN = "invoke_agent rlm"
SPAN_TURN = "rlm.turn"
SPAN_EXECUTE = "execute_code"
SPAN_BATCH = "llm_query_many"


def chat_span_name(model: str) -> str:
    return f"{OPERATION_CHAT} {model}"
