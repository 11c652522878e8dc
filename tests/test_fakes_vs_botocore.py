"""The Bedrock and AgentCore fakes checked against botocore's service models (issue 18).

botocore's ``bedrock-runtime`` and ``bedrock-agentcore`` models (the JSON the installed botocore
ships) are the source of truth for what AWS answers: each operation's output shape, the errors it
declares with their HTTP status and members, and the events and exceptions of its event stream.
Every reply and every error the fakes can produce is requested here over plain HTTP (signed with
SigV4, read with no SDK in between) and validated against the operation it answers:

- every error table entry of each fake (the prompt directives and the fault plans of the Bedrock
  fake, the ``throttle`` / ``fail`` / ``stream_fail`` / quota / conflict knobs of the AgentCore
  fake), and each in-stream exception;
- the replies: Converse's JSON, ConverseStream's events (text, tool use, max_tokens stops), and
  InvokeCodeInterpreter's results for every tool the fake implements;
- CountTokens: the requests (``input.converse`` and ``input.invokeModel``, also as aioboto3 sends
  them) against its input shape, its ``{"inputTokens": N}`` and every error it answers.

The knobs of each fake are enumerated from its constructor and its public attributes: a knob this
module does not know fails :func:`test_every_knob_is_covered` until it is added here with how it is
checked, and every error code written in a fake's source must be declared by the model for the
operations it answers (or be one of AWS's common authentication errors).
"""

from __future__ import annotations

import ast
import base64
import datetime
import functools
import inspect
import json
import math
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import EventStreamBuffer
from botocore.model import OperationModel, ServiceModel, Shape, StructureShape
from botocore.session import get_session

from .fakes import fake_agentcore, fake_bedrock
from .fakes._fake_base import _STATUS_KINDS
from .fakes.fake_agentcore import FakeAgentCoreServer
from .fakes.fake_bedrock import FakeBedrockServer
from .fakes.fake_openai import FaultPlan

pytestmark = pytest.mark.anyio

FAKES = Path(__file__).parent / "fakes"
#: AWS's common errors, answered by every API before the operation (not in a service's model).
COMMON_ERRORS = {
    "InvalidSignatureException": 403, "UnrecognizedClientException": 403, "MissingAuthenticationTokenException": 403,
}
BEDROCK_OPERATIONS = ("Converse", "ConverseStream")
AGENTCORE_OPERATIONS = ("StartCodeInterpreterSession", "InvokeCodeInterpreter", "StopCodeInterpreterSession")


def service(name: str) -> ServiceModel:
    return get_session().get_service_model(name)


# -- a validator of JSON wire values against botocore shapes ------------------------------------------
def problems(shape: Shape, value: Any, path: str = "$") -> list[str]:
    """What in ``value`` (as decoded from the wire: restJson) does not fit ``shape``."""
    kind = shape.type_name
    if shape.metadata.get("document"):
        return []  # a JSON document: anything
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        if not isinstance(value, dict):
            return [f"{path}: {type(value).__name__} where {shape.name} (structure) is declared"]
        found = []
        body_members = {n: m for n, m in shape.members.items() if not m.serialization.get("location")}
        for key in value:
            if key not in body_members:
                found.append(f"{path}.{key}: not a member of {shape.name}")
        for key in shape.required_members:
            if key in body_members and key not in value:
                found.append(f"{path}.{key}: required by {shape.name}, missing")
        if shape.is_tagged_union and len(value) != 1:
            found.append(f"{path}: a union ({shape.name}) with {len(value)} members set")
        for key, item in value.items():
            if key in body_members:
                found += problems(body_members[key], item, f"{path}.{key}")
        return found
    if kind == "list":
        if not isinstance(value, list):
            return [f"{path}: {type(value).__name__} where a list is declared"]
        return [p for i, item in enumerate(value) for p in problems(shape.member, item, f"{path}[{i}]")]  # type: ignore[attr-defined]
    if kind == "map":
        if not isinstance(value, dict):
            return [f"{path}: {type(value).__name__} where a map is declared"]
        return [p for k, item in value.items() for p in problems(shape.value, item, f"{path}[{k}]")]  # type: ignore[attr-defined]
    if kind == "string":
        if not isinstance(value, str):
            return [f"{path}: {type(value).__name__} where a string is declared"]
        enum = shape.enum  # type: ignore[attr-defined]
        if enum and value not in enum:
            return [f"{path}: {value!r} is not one of {shape.name}'s values {enum}"]
        pattern = shape.metadata.get("pattern")
        if pattern and not re.fullmatch(pattern, value):
            return [f"{path}: {value!r} does not match {shape.name}'s pattern {pattern}"]
        return []
    if kind in ("integer", "long"):
        ok = type(value) is int and shape.metadata.get("min", -math.inf) <= value <= shape.metadata.get("max", math.inf)
        return [] if ok else [f"{path}: {value!r} is not a {kind} in {shape.name}'s range"]
    if kind in ("double", "float"):
        return [] if type(value) in (int, float) else [f"{path}: {value!r} is not a {kind}"]
    if kind == "boolean":
        return [] if type(value) is bool else [f"{path}: {value!r} is not a boolean"]
    if kind == "timestamp":
        if shape.serialization.get("timestampFormat", shape.metadata.get("timestampFormat")) == "iso8601":
            try:
                datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            except ValueError:
                return [f"{path}: {value!r} is not an ISO 8601 timestamp"]
            return []
        return [] if type(value) in (int, float) else [f"{path}: {value!r} is not epoch seconds"]
    if kind == "blob":
        try:
            base64.b64decode(value, validate=True)
        except (ValueError, TypeError):
            return [f"{path}: not base64"]
        return []
    return []  # document: anything


def error_problems(operation: OperationModel, status: int, headers: Any, body: bytes) -> list[str]:
    """An error answer: its code declared by the operation (or common), its status and members the model's."""
    code = headers.get("x-amzn-ErrorType", "").split(":")[0]
    if code in COMMON_ERRORS:
        return [] if status == COMMON_ERRORS[code] else [f"{code}: status {status}, AWS answers {COMMON_ERRORS[code]}"]
    declared = {shape.name: shape for shape in operation.error_shapes}
    if code not in declared:
        return [f"{operation.name} does not declare {code!r} (it declares {sorted(declared)})"]
    shape = declared[code]
    found = problems(shape, json.loads(body), code)
    want = shape.metadata["error"]["httpStatusCode"]
    if status != want:
        found.append(f"{code}: status {status}, the model says {want}")
    return found


def stream_problems(operation: OperationModel, raw: bytes, *, complete: bool = True) -> tuple[list[str], list[str]]:
    """The messages of an event stream, each an event or exception of the operation's stream shape:
    (problems, the event or exception names in order)."""
    stream = operation.get_event_stream_output()
    assert stream is not None
    buffer = EventStreamBuffer()
    buffer.add_data(raw)
    found: list[str] = []
    names: list[str] = []
    for message in buffer:
        headers = message.headers
        kind = headers.get(":message-type")
        name = headers.get(":event-type") if kind == "event" else headers.get(":exception-type")
        names.append(str(name))
        member = stream.members.get(str(name))
        if kind not in ("event", "exception") or member is None:
            found.append(f"{kind} {name!r} is not in {stream.name} ({sorted(stream.members)})")
            continue
        if (kind == "exception") != bool(member.metadata.get("exception")):
            found.append(f"{name!r} sent as an {kind}")
        found += problems(member, json.loads(message.payload or b"{}"), str(name))
    if complete:
        assert buffer._data == b"", "bytes left after the last whole message"
    return found, names


# -- signed requests, read without an SDK --------------------------------------------------------------
async def signed(
    http: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any] | None, *, service_name: str,
    key: str, secret: str, region: str = "us-east-1", headers: dict[str, str] | None = None,
) -> tuple[int, Any, bytes]:
    data = json.dumps(body).encode() if body is not None else b""
    request = AWSRequest(method=method, url=url, data=data,
                         headers={"Content-Type": "application/json", **(headers or {})})
    SigV4Auth(Credentials(key, secret), service_name, region).add_auth(request)
    async with http.request(method, url, data=data, headers=dict(request.headers.items())) as response:
        return response.status, response.headers, await response.read()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# ======================================================================================== Bedrock
def converse_body(prompt: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"text": prompt}]}], "inferenceConfig": {"maxTokens": 64},
            **extra}


async def bedrock_call(
    http: aiohttp.ClientSession, server: FakeBedrockServer, operation: str, body: dict[str, Any],
    *, secret: str | None = None, model_id: str = "fake-model",
) -> tuple[int, Any, bytes]:
    path = {"ConverseStream": "converse-stream", "CountTokens": "count-tokens"}.get(operation, "converse")
    return await signed(http, "POST", f"{server.base_url}/model/{model_id}/{path}", body, service_name="bedrock",
                        key=server.access_key, secret=secret or server.secret_key)


def bedrock_answer_problems(operation: OperationModel, status: int, headers: Any, raw: bytes) -> list[str]:
    if status != 200:
        return error_problems(operation, status, headers, raw)
    if operation.name in ("Converse", "CountTokens"):
        return problems(operation.output_shape, json.loads(raw))
    found, _ = stream_problems(operation, raw)
    return found


def test_the_error_tables_are_the_models() -> None:
    """Each entry of the Bedrock fake's error table (directives, fault plans, the context window, the
    request checks) is declared by Converse and ConverseStream, with the model's status."""
    model = service("bedrock-runtime")
    for operation_name in BEDROCK_OPERATIONS:
        declared = {s.name: s for s in model.operation_model(operation_name).error_shapes}
        for kind, (status, code, _message) in fake_bedrock.ERRORS.items():
            assert code in declared, f"[[{kind}]]: {operation_name} does not declare {code}"
            assert status == declared[code].metadata["error"]["httpStatusCode"], kind
    assert "ServiceQuotaExceededException" not in {s.name for s in model.operation_model("Converse").error_shapes}
    # the statuses of status_faults and the kinds of the fault plan answer with entries of that table
    assert set(_STATUS_KINDS.values()) <= set(fake_bedrock.ERRORS)
    assert {"throttle", "server-error"} <= set(fake_bedrock.ERRORS)
    status, code, _ = fake_bedrock.SIGNATURE_ERROR
    assert COMMON_ERRORS.get(code) == status
    counting = {s.name: s for s in model.operation_model("CountTokens").error_shapes}
    for kind, (status, code, _message) in fake_bedrock.COUNT_ERRORS.items():
        assert code in counting, f"[[count-{kind}]]: CountTokens does not declare {code}"
        assert status == counting[code].metadata["error"]["httpStatusCode"], kind
    stream = model.operation_model("ConverseStream").get_event_stream_output()
    assert stream is not None
    for kind, (code, fields) in fake_bedrock.STREAM_ERRORS.items():
        member = stream.members.get(code[:1].lower() + code[1:])
        assert member is not None and member.metadata.get("exception"), kind
        assert problems(member, fields, kind) == []


@pytest.mark.parametrize("operation_name", BEDROCK_OPERATIONS)
@pytest.mark.parametrize("kind", sorted(fake_bedrock.ERRORS))
async def test_every_bedrock_error_on_the_wire(http: aiohttp.ClientSession, operation_name: str, kind: str) -> None:
    operation = service("bedrock-runtime").operation_model(operation_name)
    async with FakeBedrockServer() as server:
        status, headers, raw = await bedrock_call(http, server, operation_name, converse_body(f"[[{kind}]] hi"))
    assert status != 200 and bedrock_answer_problems(operation, status, headers, raw) == []


@pytest.mark.parametrize("kind", sorted(fake_bedrock.STREAM_ERRORS))
async def test_every_in_stream_exception_on_the_wire(http: aiohttp.ClientSession, kind: str) -> None:
    operation = service("bedrock-runtime").operation_model("ConverseStream")
    async with FakeBedrockServer() as server:
        status, _, raw = await bedrock_call(http, server, "ConverseStream", converse_body(f"[[stream-{kind}]] hi"))
    found, names = stream_problems(operation, raw)
    assert status == 200 and found == []
    assert names[0] == "messageStart" and names[-1] == fake_bedrock.STREAM_ERRORS[kind][0][:1].lower() + \
        fake_bedrock.STREAM_ERRORS[kind][0][1:]


async def test_bedrock_replies_and_fault_plans_on_the_wire(http: aiohttp.ClientSession) -> None:
    """Text, capped and tool-use replies of both operations, refusals of the request checks, a bad
    signature, the hidden concurrency limit, the RPM window, status_faults and the fault plan."""
    model = service("bedrock-runtime")
    converse, stream = model.operation_model("Converse"), model.operation_model("ConverseStream")
    tool_config = {"tools": [{"toolSpec": {"name": "run", "inputSchema": {"json": {"type": "object"}}}}]}
    answers: list[tuple[OperationModel, int, Any, bytes]] = []
    async with FakeBedrockServer(cache_read_tokens=2, cache_write_tokens=1,
                                 tool_reply=lambda body: {"name": "run", "input": {"code": "1"}}) as server:
        for operation in (converse, stream):
            for body in (converse_body("hello"), {**converse_body("hello"), "inferenceConfig": {"maxTokens": 2}},  # cut
                         converse_body("use the tool", toolConfig=tool_config),
                         {"messages": [{"role": "assistant", "content": [{"text": "first"}]}]},  # refused
                         {"messages": [{"role": "user", "content": [{"text": "a"}]},
                                       {"role": "assistant", "content": [{"toolUse": {
                                           "toolUseId": "t1", "name": "run", "input": {}}}]},
                                       {"role": "user", "content": [{"toolResult": {
                                           "toolUseId": "t2", "content": [{"text": "x"}]}}]}],
                          "toolConfig": tool_config}):  # refused: the toolResult answers no toolUse
                answers.append((operation, *await bedrock_call(http, server, operation.name, body)))
            answers.append((operation, *await bedrock_call(http, server, operation.name, converse_body("hi"),
                                                           secret="wrong")))
    async with FakeBedrockServer(rpm=1, status_faults={429: 0.0}) as server:
        for operation in (converse, stream):
            answers.append((operation, *await bedrock_call(http, server, operation.name, converse_body("hi"))))
    async with FakeBedrockServer(quota_refusals=2) as server:  # a spent quota, as the Redis lane tests inject
        for operation in (converse, stream):
            answers.append((operation, *await bedrock_call(http, server, operation.name, converse_body("hi"))))
    for status_code in sorted(_STATUS_KINDS):
        async with FakeBedrockServer(status_faults={status_code: 1.0}) as server:
            answers.append((converse, *await bedrock_call(http, server, "Converse", converse_body("hi"))))
    async with FakeBedrockServer(faults=FaultPlan(throttle=0.5, server_error=0.5), seed=3) as server:
        for i in range(8):
            answers.append((stream, *await bedrock_call(http, server, "ConverseStream", converse_body(f"q{i}"))))
    found = [p for operation, status, headers, raw in answers
             for p in bedrock_answer_problems(operation, status, headers, raw)]
    assert found == []
    statuses = sorted({status for _, status, _, _ in answers})
    assert statuses == [200, 400, 403, 429, 500, 503]
    stops = {json.loads(raw)["stopReason"] for op, status, _, raw in answers if op is converse and status == 200}
    assert stops == {"end_turn", "max_tokens", "tool_use"} <= set(model.shape_for("StopReason").enum)


CACHE_POINT = {"cachePoint": {"type": "default"}}
CLAUDE_PROFILE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"


def cached_body(system: str, turns: list[str], *, points: int = 1) -> dict[str, Any]:
    """A Converse body: ``system`` then a cache point, and user/assistant ``turns`` with a cache
    point after each of the last ``points - 1`` user turns."""
    messages = []
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        content: list[dict[str, Any]] = [{"text": text}]
        if role == "user" and i >= len(turns) - 2 * (points - 1):
            content.append(CACHE_POINT)
        messages.append({"role": role, "content": content})
    return {"system": [{"text": system}, CACHE_POINT], "messages": messages, "inferenceConfig": {"maxTokens": 64}}


async def test_prompt_cache_on_the_wire(http: aiohttp.ClientSession) -> None:
    """Requests with cachePoint blocks fit Converse's request shape; the answers of both operations
    carry cacheReadInputTokens / cacheWriteInputTokens that fit TokenUsage: a write, then a read of
    the same prefix, nothing for a prefix under the minimum, and too many points refused with a
    declared ValidationException."""
    model = service("bedrock-runtime")
    long = "The ledger of the harbour office lists every ship. " * 200  # ~2,500 tokens
    answers: list[tuple[OperationModel, int, Any, bytes]] = []
    usages = []
    async with FakeBedrockServer(cache_min_tokens=1024, max_cache_points=4) as server:
        for operation_name in BEDROCK_OPERATIONS:
            operation = model.operation_model(operation_name)
            body = cached_body(long + operation_name, ["q1", "a1", "q2"], points=2)
            shape_problems = problems(operation.input_shape, body)  # modelId is in the path
            assert shape_problems == []
            for _ in range(2):  # a write, then a read
                status, headers, raw = await bedrock_call(http, server, operation_name, body)
                answers.append((operation, status, headers, raw))
                assert status == 200
                if operation_name == "Converse":
                    usages.append(json.loads(raw)["usage"])
                else:
                    buffer = EventStreamBuffer()
                    buffer.add_data(raw)
                    events = [json.loads(m.payload) for m in buffer if m.headers.get(":event-type") == "metadata"]
                    usages.append(events[0]["usage"])
            short = cached_body("short system prompt", ["q"], points=1)  # under the minimum: not cached
            answers.append((operation, *await bedrock_call(http, server, operation_name, short)))
            usages.append(json.loads(answers[-1][3])["usage"] if operation_name == "Converse" else None)
            too_many = cached_body(long, ["q1", "a1", "q2", "a2", "q3", "a3", "q4"], points=5)
            answers.append((operation, *await bedrock_call(http, server, operation_name, too_many)))
            assert answers[-1][1] == 400 and answers[-1][2]["x-amzn-ErrorType"] == "ValidationException"
    found = [p for operation, status, headers, raw in answers
             for p in bedrock_answer_problems(operation, status, headers, raw)]
    assert found == []
    write, read = usages[0], usages[1]
    assert write["cacheWriteInputTokens"] > 1024 and write["cacheReadInputTokens"] == 0
    assert read["cacheReadInputTokens"] == write["cacheWriteInputTokens"] and read["cacheWriteInputTokens"] == 0
    assert read["inputTokens"] + read["cacheReadInputTokens"] == write["inputTokens"] + write["cacheWriteInputTokens"]
    assert usages[2] is not None and (usages[2]["cacheReadInputTokens"], usages[2]["cacheWriteInputTokens"]) == (0, 0)
    stream_write, stream_read = usages[3], usages[4]  # another prefix (the operation's name is in it)
    assert stream_write["cacheWriteInputTokens"] > 1024 and stream_read["cacheReadInputTokens"] > 1024


FOUNDATION_CLAUDE = "anthropic.claude-sonnet-4-5-20250929-v1:0"


async def test_count_tokens_on_the_wire(http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch) -> None:
    """CountTokens' requests fit its input shape (both members of the ``input`` union, and what
    aioboto3 sends for ``BedrockModel.count_request_tokens``); its answers fit ``CountTokensResponse``
    and each error is one it declares with the model's status: the models it does not count for
    (an inference profile id, another vendor's model), every ``[[count-<kind>]]``, a malformed
    input, a bad signature. The count is the prompt tokens a Converse of the same messages reports."""
    from rlmflow import ModelRequest
    from rlmflow.models.bedrock import BedrockModel

    model = service("bedrock-runtime")
    count = model.operation_model("CountTokens")
    converse = {"system": [{"text": "be brief"}, CACHE_POINT],
                "messages": [{"role": "user", "content": [{"text": "what is in the ledger?"}]},
                             {"role": "assistant", "content": [{"text": "ships"}]},
                             {"role": "user", "content": [{"text": "which came first?"}]}]}
    native = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "system": "be brief",
              "messages": [{"role": "user", "content": "what is in the ledger?"}]}
    invoke = {"invokeModel": {"body": base64.b64encode(json.dumps(native).encode()).decode()}}
    bodies = [({"input": {"converse": converse}}, FOUNDATION_CLAUDE), ({"input": invoke}, FOUNDATION_CLAUDE)]
    for body, _model_id in bodies:
        assert problems(count.input_shape, body) == []
    answers: list[tuple[int, Any, bytes]] = []
    async with FakeBedrockServer(tokenizer=lambda text: len(text) // 3) as server:
        for body, model_id in bodies:
            answers.append(await bedrock_call(http, server, "CountTokens", body, model_id=model_id))
        assert [status for status, _, _ in answers] == [200, 200]
        counted = [json.loads(raw)["inputTokens"] for _, _, raw in answers]
        _, _, raw = await bedrock_call(http, server, "Converse", {**converse, "inferenceConfig": {"maxTokens": 8}},
                                       model_id=FOUNDATION_CLAUDE)
        billed = json.loads(raw)["usage"]
        assert counted[0] == billed["inputTokens"] + billed.get("cacheReadInputTokens", 0) + \
            billed.get("cacheWriteInputTokens", 0)
        assert counted[1] == server.count_tokens("be brief" + "what is in the ledger?")
        refused = [
            await bedrock_call(http, server, "CountTokens", bodies[0][0], model_id=CLAUDE_PROFILE),
            await bedrock_call(http, server, "CountTokens", bodies[0][0], model_id="amazon.nova-pro-v1:0"),
            await bedrock_call(http, server, "CountTokens", {"input": {}}, model_id=FOUNDATION_CLAUDE),
            await bedrock_call(http, server, "CountTokens", {"input": {"converse": converse, **invoke}},
                               model_id=FOUNDATION_CLAUDE),
            await bedrock_call(http, server, "CountTokens", bodies[0][0], model_id=FOUNDATION_CLAUDE, secret="wrong"),
        ]
        for kind in fake_bedrock.COUNT_ERRORS:
            directed = {"messages": [{"role": "user", "content": [{"text": f"[[count-{kind}]] hi"}]}]}
            refused.append(await bedrock_call(http, server, "CountTokens", {"input": {"converse": directed}},
                                              model_id=FOUNDATION_CLAUDE))
        for name, value in server.credentials_env().items():
            monkeypatch.setenv(name, value)
        client = BedrockModel(CLAUDE_PROFILE, region=server.region, endpoint_url=server.base_url)
        try:
            await client.count_request_tokens(ModelRequest.from_prompt("hi", system="be brief"))
        finally:
            await client.aclose()
        sent_by_client = server.counts_seen[-1]
    found = [p for status, headers, raw in answers + refused for p in bedrock_answer_problems(count, status, headers,
                                                                                               raw)]
    assert found == []
    codes = [headers.get("x-amzn-ErrorType") for status, headers, _ in refused]
    assert all(status != 200 for status, _, _ in refused)
    assert codes[:5] == ["ValidationException"] * 4 + ["InvalidSignatureException"]
    assert {json.loads(raw)["message"] for _, _, raw in refused[:2]} == {fake_bedrock.COUNT_ERRORS["unsupported"][2]}
    assert codes[5:] == [code for _, code, _ in fake_bedrock.COUNT_ERRORS.values()]
    assert sent_by_client["modelId"] == FOUNDATION_CLAUDE
    assert problems(count.input_shape, {k: v for k, v in sent_by_client.items() if k != "modelId"}) == []


# ======================================================================================= AgentCore
class AgentCoreWire:
    """Raw signed requests to the AgentCore fake."""

    def __init__(self, http: aiohttp.ClientSession, server: FakeAgentCoreServer) -> None:
        self.http, self.server = http, server
        self.model = service("bedrock-agentcore")
        self.answers: list[tuple[OperationModel, int, Any, bytes]] = []

    async def call(self, operation_name: str, body: dict[str, Any] | None, *, session_id: str | None = None,
                   secret: str | None = None, key: str | None = None) -> tuple[int, Any, bytes]:
        base = f"{self.server.endpoint_url}/code-interpreters/x"
        headers = {}
        if operation_name == "StartCodeInterpreterSession":
            method, url = "PUT", f"{base}/sessions/start"
        elif operation_name == "StopCodeInterpreterSession":
            method, url = "PUT", f"{base}/sessions/stop?sessionId={session_id}"
        else:
            method, url = "POST", f"{base}/tools/invoke"
            headers["x-amzn-code-interpreter-session-id"] = str(session_id)
        credentials = self.server.credentials
        answer = await signed(self.http, method, url, body, service_name="bedrock-agentcore",
                              key=key or credentials.access_key, secret=secret or credentials.secret_key,
                              headers=headers)
        self.answers.append((self.model.operation_model(operation_name), *answer))
        return answer

    async def start(self) -> str:
        status, _, raw = await self.call("StartCodeInterpreterSession", {"sessionTimeoutSeconds": 900})
        assert status == 200
        session_id: str = json.loads(raw)["sessionId"]
        return session_id

    def problems(self) -> list[str]:
        found = []
        for operation, status, headers, raw in self.answers:
            if status != 200:
                found += error_problems(operation, status, headers, raw)
            elif operation.name == "InvokeCodeInterpreter":
                found += problems(operation.output_shape.members["sessionId"], headers.get(
                    "x-amzn-code-interpreter-session-id"), "sessionId header")
                found += stream_problems(operation, raw)[0]
            else:
                found += problems(operation.output_shape, json.loads(raw), operation.name)
        return found


def test_the_agentcore_error_table_is_the_models() -> None:
    model = service("bedrock-agentcore")
    for operation_name in AGENTCORE_OPERATIONS:
        declared = {s.name: s for s in model.operation_model(operation_name).error_shapes}
        for code, (status, _message) in fake_agentcore.ERRORS.items():
            assert code in declared, f"{operation_name} does not declare {code}"
            assert status == declared[code].metadata["error"]["httpStatusCode"], code
    stream = model.operation_model("InvokeCodeInterpreter").get_event_stream_output()
    assert stream is not None
    exceptions = {name for name, member in stream.members.items() if member.metadata.get("exception")}
    assert exceptions == {code[:1].lower() + code[1:] for code in fake_agentcore.ERRORS}  # every one can be sent
    for code, (status, _message) in fake_agentcore.AUTH_ERRORS.items():
        assert COMMON_ERRORS.get(code) == status, code


async def test_every_agentcore_answer_on_the_wire(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Every tool's result, every error of ERRORS before the stream and inside it, the quota, the
    conflict, a lost session, validation failures and the authentication errors."""
    async with FakeAgentCoreServer() as server:
        wire = AgentCoreWire(http, server)
        session_id = await wire.start()
        invoke = "InvokeCodeInterpreter"
        for tool, arguments in [
            ("writeFiles", {"content": [{"path": "a/b.txt", "text": "hello"},
                                        {"path": "c.bin", "blob": base64.b64encode(b"\x00\x01").decode()}]}),
            ("readFiles", {"paths": ["a/b.txt"]}),
            ("readFiles", {"paths": ["missing.txt"]}),  # isError
            ("listFiles", {"directoryPath": "."}),
            ("removeFiles", {"paths": ["a/b.txt"]}),
            ("executeCode", {"code": "print(6 * 7)", "language": "python"}),
            ("executeCode", {"code": "raise ValueError('no')", "language": "python"}),  # isError
            ("executeCode", {"code": "1", "language": "javascript"}),  # ValidationException
            ("readFiles", {"paths": ["/etc/passwd"]}),  # ValidationException
            ("noSuchTool", {}),  # ValidationException
        ]:
            await wire.call(invoke, {"name": tool, "arguments": arguments}, session_id=session_id)
        for code in fake_agentcore.ERRORS:
            for operation in AGENTCORE_OPERATIONS:
                server.fail = {operation: [code]}
                if operation == "StartCodeInterpreterSession":
                    await wire.call(operation, {})
                else:
                    await wire.call(operation, {"name": "listFiles", "arguments": {}}, session_id=session_id)
            server.stream_fail = {"executeCode": [code]}
            await wire.call(invoke, {"name": "executeCode", "arguments": {"code": "1"}}, session_id=session_id)
        server.throttle = {"StopCodeInterpreterSession": 1}
        await wire.call("StopCodeInterpreterSession", None, session_id=session_id)
        server.max_sessions = 1
        await wire.call("StartCodeInterpreterSession", {})  # ServiceQuotaExceededException
        await wire.call("StartCodeInterpreterSession", {"sessionTimeoutSeconds": 10**6})  # ValidationException
        server.max_sessions = None
        token = str(uuid.uuid4())
        await wire.call("StartCodeInterpreterSession", {"clientToken": token})
        await wire.call("StartCodeInterpreterSession", {"clientToken": token})  # the same session again
        await wire.call("StopCodeInterpreterSession", None, session_id=session_id)
        await wire.call(invoke, {"name": "listFiles", "arguments": {}}, session_id=session_id)  # ResourceNotFound
        await wire.call("StartCodeInterpreterSession", {}, secret="wrong")  # InvalidSignatureException
        await wire.call("StartCodeInterpreterSession", {}, key="AKIDUNKNOWN")  # UnrecognizedClientException
        async with http.put(f"{server.endpoint_url}/code-interpreters/x/sessions/start", json={}) as response:
            wire.answers.append((wire.model.operation_model("StartCodeInterpreterSession"), response.status,
                                 response.headers, await response.read()))  # MissingAuthenticationToken
        found = wire.problems()
        codes = {h.get("x-amzn-ErrorType") for _, status, h, _ in wire.answers if status != 200}
        in_stream = [n for op, status, _, raw in wire.answers if status == 200 and op.name == invoke
                     for n in stream_problems(op, raw)[1]]
    assert found == []
    assert codes == set(fake_agentcore.ERRORS) | set(fake_agentcore.AUTH_ERRORS)
    assert set(in_stream) == {"result"} | {code[:1].lower() + code[1:] for code in fake_agentcore.ERRORS}


async def test_a_concurrent_execution_is_a_declared_conflict(http: aiohttp.ClientSession) -> None:
    import anyio

    async with FakeAgentCoreServer() as server:
        wire = AgentCoreWire(http, server)
        session_id = await wire.start()
        code = "import os, time\nwhile not os.path.exists('go'):\n    time.sleep(0.01)"
        running = anyio.Event()
        server.on_execute = lambda session: running.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(wire.call, "InvokeCodeInterpreter",
                                            {"name": "executeCode", "arguments": {"code": code}},
                                            session_id=session_id))
            with anyio.fail_after(60):  # a guard against a fake that never runs it, not a timing check
                await running.wait()  # the first execution holds the session
            status, headers, _ = await wire.call("InvokeCodeInterpreter", {"name": "executeCode",
                                                 "arguments": {"code": "1"}}, session_id=session_id)
            (server.sessions[session_id].directory / "go").touch()
        found = wire.problems()
    assert (status, headers.get("x-amzn-ErrorType")) == (409, "ConflictException") and found == []


# ================================================================================== the knobs
#: Every knob of each fake (constructor parameters and public attributes) and how this module covers
#: it: "wire" knobs change what is answered and are driven above; the rest do not change a reply's
#: shape (timing, bookkeeping, records, the reply's text) or are deliberate departures from the
#: protocol (``never_stream`` answers ConverseStream with JSON; ``stream_faults`` cut and tear streams).
BEDROCK_KNOBS = {
    "wire": {"faults", "status_faults", "rpm", "tpm", "max_concurrency", "context_window", "tool_reply",
             "cache_read_tokens", "cache_write_tokens", "stream_faults", "access_key", "secret_key", "region",
             "check_signatures", "output_tokens", "stream_pieces", "cache_min_tokens", "max_cache_points",
             "cache_ttl", "count_models", "quota_refusals"},
    "no shape": {"latency", "latency_jitter", "window", "seed", "port", "capacity", "reply", "usage",
                 "rate_headers", "root_marker", "root_reply", "concurrency_retry_after", "hold_after", "tokenizer",
                 "count_latency", "latency_of", "quota_retry_after", "meet"},
    "departure": {"never_stream"},
    "records": {"requests_seen", "bad_signatures", "peak_in_flight", "in_flight", "requests_in_flight", "admitted",
                "counters", "base_url", "prompt_cache", "counts_seen", "serving"},
}
AGENTCORE_KNOBS = {
    "wire": {"throttle", "fail", "stream_fail", "max_sessions", "max_session_timeout", "access_key", "secret_key",
             "region", "credentials"},
    "no shape": {"python", "latency", "port", "on_request", "on_execute"},
    "departure": set(),
    "records": {"requests", "sessions", "rejected_signatures", "conflicts", "endpoint_url", "live_sessions"},
}


def knobs(cls: type, instance: Any) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
            names |= {p.name for p in parameters if p.name != "self" and p.kind is p.KEYWORD_ONLY}
    names |= {n for n in vars(instance) if not n.startswith("_")}
    names |= {n for n, v in inspect.getmembers(cls) if isinstance(v, property) and not n.startswith("_")}
    return names


def test_every_knob_is_covered() -> None:
    for cls, instance, known in ((FakeBedrockServer, FakeBedrockServer(), BEDROCK_KNOBS),
                                 (FakeAgentCoreServer, FakeAgentCoreServer(), AGENTCORE_KNOBS)):
        covered = set().union(*known.values())
        assert knobs(cls, instance) - covered == set(), f"{cls.__name__}: knobs this module does not check"


def error_codes_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and re.fullmatch(r"[A-Z][A-Za-z]*Exception", node.value)}


def test_every_error_code_in_the_fakes_sources_is_declared() -> None:
    """An error code written anywhere in a fake (a new knob's) is declared for its operations."""
    bedrock, agentcore = service("bedrock-runtime"), service("bedrock-agentcore")
    for path, model, operations in ((FAKES / "fake_bedrock.py", bedrock, BEDROCK_OPERATIONS),
                                    (FAKES / "fake_agentcore.py", agentcore, AGENTCORE_OPERATIONS)):
        declared = set.intersection(*({s.name for s in model.operation_model(o).error_shapes} for o in operations))
        for operation in operations:  # and the exceptions of the operations' event streams
            stream = model.operation_model(operation).get_event_stream_output()
            declared |= {m.name for m in (stream.members.values() if stream else []) if m.metadata.get("exception")}
        assert error_codes_in(path) - declared - set(COMMON_ERRORS) == set(), path.name


def test_the_validator_finds_what_does_not_fit() -> None:
    """The checks above can fail: what the old fakes sent, and other departures, are found."""
    model = service("bedrock-runtime")
    converse = model.operation_model("Converse")
    reply = {"output": {"message": {"role": "assistant", "content": [{"text": "hi"}]}}, "stopReason": "end_turn",
             "usage": {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}, "metrics": {"latencyMs": 1}}
    assert problems(converse.output_shape, reply) == []
    assert problems(converse.output_shape, {**reply, "stopReason": "length"})  # not a StopReason
    assert problems(converse.output_shape, {**reply, "extra": 1})  # not a member
    assert problems(converse.output_shape, {k: v for k, v in reply.items() if k != "usage"})  # required
    assert problems(converse.output_shape, {**reply, "usage": {**reply["usage"], "inputTokens": "1"}})  # a type
    quota = {"x-amzn-ErrorType": "ServiceQuotaExceededException"}  # the old fake's [[quota]] on Converse
    assert error_problems(converse, 400, quota, b'{"message": "quota"}')
    throttle = {"x-amzn-ErrorType": "ThrottlingException"}
    assert error_problems(converse, 400, throttle, b'{"message": "slow"}')  # the model says 429
    assert error_problems(converse, 429, throttle, b'{"message": "slow"}') == []
    invoke = service("bedrock-agentcore").operation_model("InvokeCodeInterpreter")
    denied = {"x-amzn-ErrorType": "AccessDeniedException"}
    assert error_problems(invoke, 403, denied, b'{"message": "no"}') == []
    validation = {"x-amzn-ErrorType": "ValidationException"}
    assert error_problems(invoke, 400, validation, b'{"message": "no"}')  # its reason is required
    stream = fake_bedrock.encode_event({":message-type": "event", ":event-type": "chunk"}, b"{}")
    assert stream_problems(model.operation_model("ConverseStream"), stream)[0]  # not an event of ConverseStream
