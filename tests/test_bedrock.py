"""Bedrock through real aioboto3 (signed requests, event-stream parsing) against a local fake."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from rlmflow import (
    RLM,
    BudgetLedger,
    ContextOverflowError,
    Dispatcher,
    FatalModelError,
    Limits,
    ModelNotReadyError,
    ModelRequest,
    QuotaExhaustedError,
    RetryPolicy,
    ThrottledError,
    TransientModelError,
    UnknownModelError,
)
from rlmflow.models import Message, estimate_tokens, parse_model_string
from rlmflow.models.bedrock import BedrockModel

from .fakes.fake_bedrock import FakeBedrockServer, encode_event
from .fakes.fake_openai import answer_for
from .helpers import turn_script

pytestmark = pytest.mark.anyio

CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeBedrockServer]:
    async with FakeBedrockServer() as fake:
        for name, value in fake.credentials_env().items():
            monkeypatch.setenv(name, value)
        yield fake


def bedrock(server: FakeBedrockServer, model_id: str = CLAUDE, **options: object) -> BedrockModel:
    return BedrockModel(model_id, region="us-east-1", endpoint_url=server.base_url, **options)  # type: ignore[arg-type]


async def test_converse_signed_with_usage_and_cache_tokens(server: FakeBedrockServer) -> None:
    server.cache_read_tokens, server.cache_write_tokens = 3, 2
    model = bedrock(server)
    try:
        response = await model.request(
            ModelRequest(messages=ModelRequest.from_prompt("what is in the ledger?", system="be brief").messages,
                         max_tokens=64, temperature=0.2, top_p=0.9, stop=("END",))
        )
    finally:
        await model.aclose()
    assert response.text == answer_for("what is in the ledger?")
    sent = server.requests_seen[0]
    assert sent["modelId"] == CLAUDE and sent["system"] == [{"text": "be brief"}]
    assert sent["inferenceConfig"] == {"maxTokens": 64, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]}
    prompt_tokens = server.count_tokens("be brief" + "what is in the ledger?")
    usage = response.usage
    assert (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens) == (prompt_tokens, 3, 2)
    assert usage.output_tokens == 8 and not usage.estimated
    assert server.bad_signatures == 0


async def test_a_wrong_secret_fails_the_signature_check(
    server: FakeBedrockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    model = bedrock(server)
    try:
        with pytest.raises(FatalModelError, match="InvalidSignatureException"):
            await model.request(ModelRequest.from_prompt("hi"))
    finally:
        await model.aclose()
    assert server.bad_signatures == 1


async def test_converse_stream_hands_out_pieces(server: FakeBedrockServer) -> None:
    pieces: list[str] = []
    model = bedrock(server, stream=True, on_text=pieces.append)
    try:
        response = await model.request(ModelRequest.from_prompt("stream me"))
    finally:
        await model.aclose()
    assert len(pieces) > 1 and "".join(pieces) == response.text == answer_for("stream me")
    assert response.finish_reason == "end_turn" and response.usage.output_tokens == 8


@pytest.mark.parametrize("stream", [False, True], ids=["converse", "converse-stream"])
@pytest.mark.parametrize(
    ("directive", "code", "error", "retryable"),
    [
        ("throttle", "ThrottlingException", ThrottledError, True),
        # Converse has no ServiceQuotaExceededException: a spent daily quota is a ThrottlingException
        ("quota", "ThrottlingException", QuotaExhaustedError, True),
        ("not-ready", "ModelNotReadyException", ModelNotReadyError, True),
        ("server-error", "InternalServerException", TransientModelError, True),
        ("overloaded", "ServiceUnavailableException", TransientModelError, True),
        ("model-timeout", "ModelTimeoutException", TransientModelError, True),
        ("model-error", "ModelErrorException", TransientModelError, True),
        ("denied", "AccessDeniedException", FatalModelError, False),
        ("not-found", "ResourceNotFoundException", FatalModelError, False),
        ("invalid", "ValidationException", FatalModelError, False),  # not about length: no ContextOverflowError
    ],
)
async def test_errors_are_classified(
    server: FakeBedrockServer, directive: str, code: str, error: type[Exception], retryable: bool, stream: bool
) -> None:
    """Each error Converse and ConverseStream declare in botocore's model, as the Dispatcher's class."""
    from botocore.exceptions import ClientError
    from botocore.session import get_session

    operation = "ConverseStream" if stream else "Converse"
    declared = {e.name for e in get_session().get_service_model("bedrock-runtime").operation_model(operation)
                .error_shapes}
    model = bedrock(server, stream=stream)
    try:
        with pytest.raises(error) as caught:
            await model.request(ModelRequest.from_prompt(f"[[{directive}]] hello"))
    finally:
        await model.aclose()
    assert type(caught.value) is error and caught.value.retryable is retryable  # type: ignore[attr-defined]
    cause = caught.value.__cause__
    assert isinstance(cause, ClientError) and cause.response["Error"]["Code"] == code and code in declared
    assert server.counters.requests == 1  # botocore's own retries are off


async def test_tool_results_must_answer_the_previous_turns_tool_uses(server: FakeBedrockServer) -> None:
    """Bedrock refuses a toolResult whose toolUseId is not one of the previous turn's toolUse blocks;
    the fake does too (it used to drop toolResult blocks), so a Strands root that mixed up ids fails."""
    import aioboto3
    from botocore.exceptions import ClientError

    from rlmflow.models.bedrock import translate_botocore

    tool = {"tools": [{"toolSpec": {"name": "execute_python", "inputSchema": {"json": {"type": "object"}}}}]}

    def conversation(result_id: str) -> list[dict[str, object]]:
        return [
            {"role": "user", "content": [{"text": "run it"}]},
            {"role": "assistant", "content": [{"toolUse": {"toolUseId": "tooluse_a", "name": "execute_python",
                                                           "input": {"code": "1"}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": result_id,
                                                         "content": [{"text": "printed 1"}]}}]},
        ]

    async with aioboto3.Session().client("bedrock-runtime", endpoint_url=server.base_url) as client:
        paired = await client.converse(modelId=CLAUDE, messages=conversation("tooluse_a"), toolConfig=tool)
        assert paired["stopReason"] == "end_turn"
        with pytest.raises(ClientError) as mixed_up:
            await client.converse(modelId=CLAUDE, messages=conversation("tooluse_b"), toolConfig=tool)
        with pytest.raises(ClientError) as no_config:
            await client.converse(modelId=CLAUDE, messages=conversation("tooluse_a"))
    error = mixed_up.value.response["Error"]
    assert error["Code"] == "ValidationException"
    assert mixed_up.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert "Expected toolResult blocks at messages.2.content for the following Ids: tooluse_a" in error["Message"]
    assert "toolConfig" in no_config.value.response["Error"]["Message"]
    translated = translate_botocore(mixed_up.value, provider="aws.bedrock", model=CLAUDE)
    assert type(translated) is FatalModelError and not translated.retryable
    # the tool result is part of the prompt the fake counted
    assert paired["usage"]["inputTokens"] == server.count_tokens("run it" + '{"code": "1"}' + "printed 1")


async def test_too_long_input_is_context_overflow(server: FakeBedrockServer) -> None:
    server.context_window = 50
    model = bedrock(server)
    try:
        with pytest.raises(ContextOverflowError, match="too long"):
            await model.request(ModelRequest.from_prompt("word " * 400))
    finally:
        await model.aclose()


async def test_a_throttle_mid_stream_after_partial_output(server: FakeBedrockServer) -> None:
    pieces: list[str] = []
    model = bedrock(server)
    try:
        with pytest.raises(ThrottledError, match=r"after \d+ characters of output"):
            await model.request_stream(ModelRequest.from_prompt("[[stream-throttle]] go"), pieces.append)
        assert len(pieces) == 1  # the first piece arrived before the exception event
        # through the Dispatcher the throttled stream is retried and the second attempt completes
        dispatcher = Dispatcher(retry=RetryPolicy(base_delay=0.001, max_delay=0.01))
        streaming = bedrock(server, stream=True)
        try:
            response = await dispatcher.call(
                streaming, ModelRequest.from_prompt("[[stream-throttle x1]] again"), ledger=BudgetLedger()
            )
        finally:
            await streaming.aclose()
    finally:
        await model.aclose()
    assert response.text == answer_for("[[stream-throttle x1]] again")
    (lane,) = dispatcher.statistics()
    assert lane.retries == 1


async def test_retries_belong_to_the_dispatcher(server: FakeBedrockServer) -> None:
    records = []
    dispatcher = Dispatcher(retry=RetryPolicy(base_delay=0.001, max_delay=0.01))
    model = bedrock(server)
    try:
        await dispatcher.call(model, ModelRequest.from_prompt("[[throttle x2]] hi"), ledger=BudgetLedger(),
                              record=records.append)
        with pytest.raises(FatalModelError):
            await dispatcher.call(model, ModelRequest.from_prompt("[[denied]] hi"), ledger=BudgetLedger())
    finally:
        await model.aclose()
    assert records[0].attempts == 3 and records[0].throttles == 2
    assert server.counters.requests == 4  # three attempts, then one that is not retried


async def test_one_client_per_region_shared_and_closed_by_the_last(server: FakeBedrockServer) -> None:
    first, second = bedrock(server), bedrock(server, "us.anthropic.claude-haiku-4-5-20251001-v1:0")
    await first.request(ModelRequest.from_prompt("a"))
    await second.request(ModelRequest.from_prompt("b"))
    assert first._shared is second._shared and first._shared is not None
    shared = first._shared
    await first.aclose()
    assert shared.users == 1
    await second.aclose()
    assert shared.users == 0


async def test_pool_reaches_the_lane_ceiling(server: FakeBedrockServer) -> None:
    """botocore's pool would cap fan-out (at 8 here); the lane sizes it to its ceiling of 48."""
    server.meet = 48  # each request waits for the 48th: a pool of 8 would stop at 8
    dispatcher = Dispatcher(limits={"aws.bedrock": Limits(max_concurrency=48, initial_concurrency=48)})
    model = bedrock(server, max_pool_connections=8)
    try:
        requests = [ModelRequest.from_prompt(f"item {i}", max_tokens=16) for i in range(48)]
        results = await dispatcher.call_many(model, requests, ledger=BudgetLedger())
        assert model._shared is not None and model._shared.client.meta.config.max_pool_connections == 48
        assert model._shared.users == 1  # 48 first calls at once joined the client once
    finally:
        await model.aclose()
    assert [r.text for r in results] == [answer_for(f"item {i}") for i in range(48)]  # type: ignore[union-attr]
    assert server.peak_in_flight == 48


async def test_claude_output_weighs_five_on_bedrock(server: FakeBedrockServer) -> None:
    dispatcher = Dispatcher()
    claude, llama = bedrock(server), bedrock(server, "meta.llama3-70b-instruct-v1:0")
    try:
        assert dispatcher.lane(claude).limits.output_weight == 5.0
        assert dispatcher.lane(llama).limits.output_weight == 1.0
        configured = Dispatcher(limits={f"aws.bedrock:{CLAUDE}": Limits(rpm=50, output_weight=5.0)})
        assert configured.lane(claude).limits == Limits(rpm=50, output_weight=5.0)  # by provider:model
        assert dispatcher.lane_key(claude) == f"aws.bedrock:{CLAUDE}@{server.base_url}"
    finally:
        await claude.aclose()
        await llama.aclose()


async def test_a_run_with_bedrock_sub_calls(server: FakeBedrockServer) -> None:
    root = turn_script([
        "parts = [context[i:i + 40] for i in range(0, len(context), 40)]\n"
        "answers = llm_query_many([f'summarise: {p}' for p in parts])\nprint(len(answers))",
        "FINAL(answers[0])",
    ])
    sub = bedrock(server)
    document = "".join(f"report {i} says the sky is {i}. " for i in range(10))
    try:
        async with RLM(root=root, sub=sub) as rlm:
            result = await rlm.run(document, "what do the reports say?")
    finally:
        await sub.aclose()  # an RLM closes only the models it built from strings
    parts = [document[i : i + 40] for i in range(0, len(document), 40)]
    assert result.answer == answer_for(f"summarise: {parts[0]}")
    sub_calls = [c for c in result.calls if c.role == "sub"]
    assert len(sub_calls) == len(parts) == server.counters.admitted
    assert all(c.provider == "aws.bedrock" and c.output_tokens == 8 and c.input_tokens > 0 for c in sub_calls)
    assert all(c.cost_usd is not None and c.cost_usd > 0 for c in sub_calls)  # genai-prices knows the profile
    assert result.usage[CLAUDE].calls == len(parts)


def test_event_stream_frames_parse_with_botocore() -> None:
    from botocore.eventstream import EventStreamBuffer

    buffer = EventStreamBuffer()
    buffer.add_data(encode_event({":event-type": "messageStop"}, b'{"stopReason":"end_turn"}'))
    (message,) = list(buffer)
    assert message.headers[":event-type"] == "messageStop" and message.payload == b'{"stopReason":"end_turn"}'



@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        (f"bedrock:{CLAUDE}", ("bedrock", CLAUDE, None)),
        (f"bedrock:{CLAUDE}@eu-west-1", ("bedrock", CLAUDE, "eu-west-1")),
        ("bedrock:amazon.nova-pro-v1:0@us-gov-west-1", ("bedrock", "amazon.nova-pro-v1:0", "us-gov-west-1")),
    ],
)
def test_bedrock_model_strings(spec: str, parsed: tuple[str, str, str | None]) -> None:
    assert parse_model_string(spec) == parsed


@pytest.mark.parametrize("spec", ["bedrock:", f"bedrock:{CLAUDE}@not a region", "bedrock:@us-east-1"])
def test_malformed_bedrock_strings(spec: str) -> None:
    with pytest.raises(UnknownModelError):
        parse_model_string(spec)


async def test_a_run_from_a_bedrock_model_string(server: FakeBedrockServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint comes from botocore's own AWS_ENDPOINT_URL_BEDROCK_RUNTIME, the region from the string."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", server.base_url)
    server.reply = lambda prompt: "```repl\nFINAL('from bedrock')\n```"
    async with RLM(root=f"bedrock:{CLAUDE}@us-east-1") as rlm:
        assert isinstance(rlm.root, BedrockModel) and rlm.root.region == "us-east-1"
        result = await rlm.run("some text", "what?")
    assert result.answer == "from bedrock" and server.bad_signatures == 0
    assert result.calls[0].provider == "aws.bedrock" and result.calls[0].cost_usd is not None


async def test_errors_surface_in_sandbox_code_after_retries(server: FakeBedrockServer) -> None:
    """Retried throttles succeed; a refused call and a too-long prompt reach the code as typed errors."""
    server.context_window = 200
    root = turn_script([
        "try:\n"
        "    llm_query_many(['[[throttle x2]] fine', '[[denied]] no', 'long ' * 400, 'plain'])\n"
        "except BatchError as e:\n"
        "    kinds = {i: type(err).__name__ for i, err in e.errors.items()}\n"
        "    FINAL(f'{e.failed_indices} {kinds} {e.results[0]} {e.results[3]}')",
    ])
    sub = bedrock(server)
    dispatcher = Dispatcher(retry=RetryPolicy(base_delay=0.001, max_delay=0.01))
    try:
        async with RLM(root=root, sub=sub, dispatcher=dispatcher) as rlm:
            result = await rlm.run("doc", "q?")
    finally:
        await sub.aclose()
    kinds = "{1: 'ModelCallError', 2: 'ContextOverflowError'}"
    assert result.answer == f"[1, 2] {kinds} {answer_for('[[throttle x2]] fine')} {answer_for('plain')}"
    failed = sorted((c.error, c.attempts) for c in result.calls if c.error)
    assert failed == [("ContextOverflowError", 1), ("FatalModelError", 1)]
    assert [c.throttles for c in result.calls if c.role == "sub" and c.error is None] in ([2, 0], [0, 2])


async def test_a_streaming_view_shares_the_model_lane(server: FakeBedrockServer) -> None:
    from rlmflow.models.base import StreamingLanguageModel, StreamingView

    model = bedrock(server)
    assert isinstance(model, StreamingLanguageModel)
    pieces: list[str] = []
    view = StreamingView(model, pieces.append)
    dispatcher = Dispatcher()
    try:
        response = await dispatcher.call(view, ModelRequest.from_prompt("live"), ledger=BudgetLedger())
    finally:
        await model.aclose()
    assert "".join(pieces) == response.text == answer_for("live") and len(pieces) > 1
    assert dispatcher.lane(view) is dispatcher.lane(model)


async def test_hidden_concurrency_limit_and_status_faults_lose_nothing(server: FakeBedrockServer) -> None:
    """The OpenAI fake's knobs on the Bedrock wire: a hidden limit of 4 in flight and random 503s."""
    server.latency, server.max_concurrency, server.status_faults = 0.02, 4, {503: 0.1}
    dispatcher = Dispatcher(limits={"aws.bedrock": Limits(max_concurrency=32, initial_concurrency=32)},
                            retry=RetryPolicy(base_delay=0.001, max_delay=0.01, max_attempts=20, max_throttles=200))
    model = bedrock(server)
    try:
        requests = [ModelRequest.from_prompt(f"n{i}", max_tokens=8) for i in range(60)]
        results = await dispatcher.call_many(model, requests, ledger=BudgetLedger())
    finally:
        await model.aclose()
    assert [getattr(r, "text", r) for r in results] == [answer_for(f"n{i}") for i in range(60)]
    assert server.peak_in_flight <= 4 and server.counters.over_concurrency > 0
    assert server.counters.faults.get("status_503", 0) > 0


def test_the_fake_sends_every_exception_the_model_declares_for_converse_stream() -> None:
    """botocore's model of ConverseStream's event stream names its in-stream exceptions: the fake can
    send each one, and the client retries those the model gives a 5xx or 429 status or says to retry."""
    from botocore.exceptions import EventStreamError
    from botocore.session import get_session

    from rlmflow.models.bedrock import translate_botocore

    from .fakes.fake_bedrock import STREAM_ERRORS

    service = get_session().get_service_model("bedrock-runtime")
    stream = service.shape_for("ConverseStreamOutput")
    declared = {name: shape for name, shape in stream.members.items() if shape.metadata.get("exception")}
    sent = {code[:1].lower() + code[1:] for code, _ in STREAM_ERRORS.values()}
    assert sent == set(declared) and len(sent) == 5
    for name, shape in declared.items():
        error = EventStreamError({"Error": {"Code": name, "Message": "in the stream"}}, "ConverseStream")
        translated = translate_botocore(error, provider="aws.bedrock", model=CLAUDE)
        status = shape.metadata["error"]["httpStatusCode"]
        retry = status >= 500 or status == 429 or "retry your request" in shape.documentation.lower()
        assert translated.retryable is retry, name
    assert {"end_turn", "max_tokens", "tool_use"} <= set(service.shape_for("StopReason").enum)


# -- CountTokens ---------------------------------------------------------------------------------------
def ledger_request() -> ModelRequest:
    return ModelRequest(messages=(Message("system", "be brief", cache_point=True),
                                  Message("user", "what is in the ledger?")), max_tokens=64)


async def test_count_tokens_is_what_the_same_request_is_billed(server: FakeBedrockServer) -> None:
    """CountTokens through aioboto3 (signed, on the shared client) answers the prompt tokens the
    same Converse request's usage reports: the provider's count, not the host's estimate."""
    server.tokenizer = lambda text: len(text) // 2  # this model counts twice what the estimate says
    model = bedrock(server)
    request = ledger_request()
    try:
        counted = await model.count_request_tokens(request)
        response = await model.request(request)
    finally:
        await model.aclose()
    text = "be brief" + "what is in the ledger?"
    assert counted == response.usage.input_tokens == server.count_tokens(text) == len(text) // 2
    assert counted != estimate_tokens(text)
    # the inference profile is counted as the foundation model it routes to (CountTokens takes no profile)
    assert server.counts_seen == [{"modelId": "anthropic.claude-sonnet-4-5-20250929-v1:0", "input": {"converse": {
        "system": [{"text": "be brief"}],
        "messages": [{"role": "user", "content": [{"text": "what is in the ledger?"}]}]}}}]
    assert server.bad_signatures == 0 and len(server.admitted) == 1  # a count is not a model call


@pytest.mark.parametrize(
    ("model_id", "prompt", "error", "match"),
    [
        ("amazon.nova-pro-v1:0", "hi", FatalModelError, "doesn't support counting tokens"),
        ("arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc", "hi", FatalModelError,
         "doesn't support counting tokens"),
        (CLAUDE, "[[count-throttle]] hi", ThrottledError, "ThrottlingException|throttled"),
        (CLAUDE, "[[count-overloaded]] hi", TransientModelError, "ServiceUnavailableException"),
        (CLAUDE, "[[count-denied]] hi", FatalModelError, "AccessDeniedException"),
    ],
)
async def test_count_tokens_errors_are_classified(
    server: FakeBedrockServer, model_id: str, prompt: str, error: type[Exception], match: str
) -> None:
    model = bedrock(server, model_id)
    try:
        with pytest.raises(error, match=match) as caught:
            await model.count_request_tokens(ModelRequest.from_prompt(prompt))
        answered = await model.request(ModelRequest.from_prompt(prompt))  # a count's directive is the count's only
    finally:
        await model.aclose()
    assert type(caught.value) is error and answered.text == answer_for(prompt)
