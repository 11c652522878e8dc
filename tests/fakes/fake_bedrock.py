"""A local server speaking Bedrock's Converse, ConverseStream and CountTokens, for tests and benchmarks.

It answers what aioboto3 sends to ``endpoint_url``: ``POST /model/{modelId}/converse`` (JSON),
``POST /model/{modelId}/converse-stream`` (the AWS event-stream binary framing) and
``POST /model/{modelId}/count-tokens`` (``{"input": {"converse": {...}}}`` or
``{"input": {"invokeModel": {"body": <base64 JSON>}}}``, answered ``{"inputTokens": N}``: the
prompt tokens the same Converse request's usage reports). CountTokens counts for the models of
``count_models`` only (by default the bare Claude foundation-model ids, as Bedrock: an inference
profile id such as ``us.anthropic...`` or another model is a ``ValidationException`` "doesn't
support counting tokens"); its errors are :data:`COUNT_ERRORS`, those botocore's model declares
for it (``[[count-<kind>]]`` sends one). Every
request must carry a SigV4 signature, which the fake checks by signing the request again with
botocore and the dummy credentials it was given. Errors have Bedrock's shapes
(``x-amzn-ErrorType`` and ``{"message": ...}``), and each is one botocore's model declares for
Converse and ConverseStream (:data:`ERRORS`; ``tests/test_fakes_vs_botocore.py`` checks them and
every reply against the model): a spent quota is a ``ThrottlingException`` ("Too many tokens per
day"), as Converse answers it. Requests are checked as Bedrock checks them: the conversation
starts with a user message and alternates, ``toolUse`` / ``toolResult`` blocks need a
``toolConfig``, and the message after an assistant's ``toolUse`` blocks must hold a ``toolResult``
for each of their ``toolUseId`` s and no more (else a ``ValidationException``); tool results and
tool inputs count in the prompt. ``stopReason`` is ``max_tokens`` when the reply was cut at the
request's ``maxTokens``. In-stream faults, from a ``[[stream-<kind>]]`` directive
or the ``stream_faults`` knob, come after the first piece of text: ``cut`` ends the stream cleanly
there (no ``contentBlockStop``, ``messageStop`` or ``metadata``), ``torn`` the same inside a
frame; the kinds of
:data:`STREAM_ERRORS` send the exception events botocore's model declares for ConverseStream
(``throttlingException``, ``internalServerException``, ``serviceUnavailableException``,
``modelStreamErrorException``, ``validationException``). ``never_stream=True`` answers
ConverseStream with a plain Converse reply (JSON). A ``tool_reply`` function makes it answer
requests that offer tools with a ``toolUse`` block (a scripted Strands root). Limits, faults and latency are those of
:class:`~tests.fakes.FakeOpenAIServer`; prompt directives are listed in ``_fake_base``.

    async with FakeBedrockServer(latency=0.05) as server:
        model = BedrockModel("us.anthropic.claude-sonnet-4-5-20250929-v1:0", region="us-east-1",
                             endpoint_url=server.base_url)

with ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` set to the fake's ``access_key`` /
``secret_key`` (``server.credentials_env()``), so credentials still come from the standard chain.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import struct
import zlib
from collections.abc import Callable, Collection
from typing import Any

from aiohttp import web

from ._fake_base import Admission, FakeProviderBase
from ._prompt_cache import CacheUse, Prompt

__all__ = ["COUNT_ERRORS", "ERRORS", "SIGNATURE_ERROR", "STREAM_ERRORS", "FakeBedrockServer", "encode_event"]

#: Every error the fake answers before a reply: directive -> (HTTP status, Bedrock error code, message).
#: ``[[<directive>]]`` in a prompt sends it; the fault plans send ``throttle``, ``server-error`` and
#: ``overloaded``; ``too-long`` comes from the context window, ``invalid-request`` (the message
#: varies) from the request checks.
ERRORS: dict[str, tuple[int, str, str]] = {
    "throttle": (429, "ThrottlingException", "Too many requests, please wait before trying again."),
    # Converse has no ServiceQuotaExceededException (botocore's model lists it for InvokeModel*,
    # ApplyGuardrail and StartAsyncInvoke only): a spent daily quota is a throttle that says so
    "quota": (429, "ThrottlingException", "Too many tokens per day, please wait before trying again."),
    "not-ready": (429, "ModelNotReadyException", "The model is not ready to serve inference requests."),
    "server-error": (500, "InternalServerException", "The server encountered an internal error."),
    "overloaded": (503, "ServiceUnavailableException", "The service is unavailable. Try again later."),
    "denied": (403, "AccessDeniedException", "You don't have access to the model with the specified model ID."),
    "not-found": (404, "ResourceNotFoundException",
                  "This model version has reached the end of its life. Please refer to the AWS documentation "
                  "for more details."),
    "model-timeout": (408, "ModelTimeoutException", "Model has timed out in processing the request. Try your "
                      "request again."),
    "model-error": (424, "ModelErrorException", "The system encountered an unexpected error during processing. "
                    "Try your request again."),
    "invalid": (400, "ValidationException", "The provided model identifier is invalid."),
    "invalid-request": (400, "ValidationException", "Malformed input request, please reformat your input and try "
                        "again."),
    "too-long": (400, "ValidationException", "Input is too long for requested model."),
    "cache-points": (400, "ValidationException", "The number of cache points in the request exceeds the "
                     "maximum allowed."),
}
#: The errors CountTokens answers (it declares AccessDenied, ResourceNotFound, Throttling, InternalServer,
#: ServiceUnavailable and Validation): ``[[count-<kind>]]`` sends one; ``unsupported`` answers a model
#: CountTokens does not count for (an inference profile id among them).
COUNT_ERRORS: dict[str, tuple[int, str, str]] = {
    **{kind: ERRORS[kind] for kind in ("throttle", "server-error", "overloaded", "denied", "not-found",
                                       "invalid-request")},
    "unsupported": (400, "ValidationException", "The provided model doesn't support counting tokens."),
}
# The ids CountTokens takes by default: Claude foundation models, bare or as a foundation-model ARN.
_COUNTED_MODEL = re.compile(r"(arn:aws[\w-]*:bedrock:[\w-]*::foundation-model/)?anthropic\.claude-[\w.:-]+")
#: Extra members of an error's body, as botocore's model gives them (ModelErrorException's).
_ERROR_FIELDS: dict[str, dict[str, Any]] = {"model-error": {"originalStatusCode": 500}}
#: A request whose SigV4 signature does not match (one of AWS's common errors, not in the model).
SIGNATURE_ERROR = (403, "InvalidSignatureException", "The request signature we calculated does not match the "
                   "signature you provided. Check your AWS Secret Access Key and signing method.")
#: In-stream exceptions (kind -> the botocore shape, its fields), as ConverseStream's event stream declares them.
STREAM_ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "throttle": ("ThrottlingException", {"message": ERRORS["throttle"][2]}),
    "server-error": ("InternalServerException", {"message": ERRORS["server-error"][2]}),
    "overloaded": ("ServiceUnavailableException", {"message": ERRORS["overloaded"][2]}),
    "model-stream-error": ("ModelStreamErrorException", {
        "message": "The model stream was interrupted.", "originalStatusCode": 500,
        "originalMessage": "An internal error occurred while streaming.",
    }),
    "validation": ("ValidationException", {"message": "The model returned an invalid tool use."}),
}
_REFUSED_UNADMITTED = ("too-long", "throttle", "server-error", "overloaded")
_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                   r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})")


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One message of the AWS event-stream framing (string headers only).

    prelude (total length, headers length, CRC32 of both) | headers | payload | CRC32 of all.
    """
    encoded = b"".join(
        struct.pack("!B", len(name)) + name.encode() + b"\x07" + struct.pack("!H", len(value.encode()))
        + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack("!II", 16 + len(encoded) + len(payload), len(encoded))
    message = prelude + struct.pack("!I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack("!I", zlib.crc32(message))


def _event(kind: str, body: dict[str, Any]) -> bytes:
    return encode_event(
        {":event-type": kind, ":content-type": "application/json", ":message-type": "event"},
        json.dumps(body).encode(),
    )


def _exception(code: str, fields: dict[str, Any]) -> bytes:
    lower = code[:1].lower() + code[1:]  # in a stream, exceptions are named in lowerCamelCase
    return encode_event(
        {":exception-type": lower, ":content-type": "application/json", ":message-type": "exception"},
        json.dumps(fields).encode(),
    )


class FakeBedrockServer(FakeProviderBase):
    """Bedrock's runtime API on 127.0.0.1; ``base_url`` is the ``endpoint_url`` for aioboto3."""

    def __init__(
        self,
        *,
        access_key: str = "AKIDFAKEFAKEFAKE",
        secret_key: str = "fake-secret",
        region: str = "us-east-1",
        check_signatures: bool = True,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        tool_reply: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
        count_models: Collection[str] | None = None,
        **knobs: Any,
    ) -> None:
        super().__init__(**knobs)
        # the model ids CountTokens counts for (None: Claude foundation-model ids, as Bedrock)
        self.count_models = None if count_models is None else set(count_models)
        # Plays a tool-using root: given a request that offers tools (``toolConfig``), the tool
        # call to answer with ({"name": ..., "input": {...}}), or None for a text answer.
        self.tool_reply = tool_reply
        self._tool_uses = 0
        self.cache_read_tokens = cache_read_tokens
        self.cache_write_tokens = cache_write_tokens
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.check_signatures = check_signatures
        self.bad_signatures = 0

    def credentials_env(self) -> dict[str, str]:
        """Environment variables that make the standard AWS chain find this fake's credentials."""
        # nothing else in the chain: no shared files, no instance metadata
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region, "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/model/{model_id}/converse", self._converse)
        app.router.add_post("/model/{model_id}/converse-stream", self._converse_stream)
        app.router.add_post("/model/{model_id}/count-tokens", self._count_tokens)

    # -- requests -------------------------------------------------------------------------------------
    async def _read_signed(self, request: web.Request) -> bytes:
        """The body of a request whose SigV4 signature holds (else the 403 AWS answers is raised)."""
        raw = await request.read()
        if self.check_signatures and not self._signed(request, raw):
            self.bad_signatures += 1
            _status, code, message = SIGNATURE_ERROR  # 403
            raise web.HTTPForbidden(
                text=json.dumps({"message": message}), headers={"x-amzn-ErrorType": code},
                content_type="application/json",
            )
        return raw

    async def _read(self, request: web.Request) -> tuple[dict[str, Any], str, str, int]:
        body = json.loads(await self._read_signed(request))
        body["modelId"] = request.match_info["model_id"]
        self.requests_seen.append(body)
        texts = [_block_text(b) for m in body.get("messages", []) for b in m.get("content", [])
                 if "cachePoint" not in b]
        max_tokens = int((body.get("inferenceConfig") or {}).get("maxTokens") or 512)
        return body, _prompt(body).text, texts[-1] if texts else "", max_tokens

    def _signed(self, request: web.Request, raw: bytes) -> bool:
        """Sign the request again with botocore and compare: the client really signed it."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        match = _AUTH.fullmatch(request.headers.get("Authorization", ""))
        if match is None or match.group(1) != self.access_key or match.group(4) != "bedrock":
            return False
        signed = match.group(5).split(";")
        headers = {name: request.headers.get(name, "") for name in signed}
        copy = AWSRequest(method=request.method, url=str(request.url), headers=headers, data=raw)
        copy.context["timestamp"] = request.headers.get("X-Amz-Date", "")
        auth = SigV4Auth(Credentials(self.access_key, self.secret_key), "bedrock", match.group(3))
        canonical = auth.canonical_request(copy)
        return bool(auth.signature(auth.string_to_sign(copy, canonical), copy) == match.group(6))

    def _refuse(self, kind: str, prompt_tokens: int = 0, *, message: str | None = None) -> web.Response:
        kind = "server-error" if kind == "server_error" else kind
        status, code, default = ERRORS[kind] if kind in ERRORS else COUNT_ERRORS[kind]
        message = message or default
        if kind == "too-long":
            message = f"{message} ({prompt_tokens} tokens > {self.context_window} maximum)"
        body = {"message": message, **_ERROR_FIELDS.get(kind, {})}
        return web.json_response(body, status=status, headers={"x-amzn-ErrorType": code})

    async def _admitted(
        self, request: web.Request
    ) -> tuple[Admission | web.Response, dict[str, Any], str, int, str | None]:
        """Read, check and admit a request; a refusal comes back as the response to send."""
        body, prompt, last, max_tokens = await self._read(request)
        invalid = _invalid_conversation(body)
        if invalid is not None:
            return self._refuse("invalid-request", message=invalid), body, last, max_tokens, None
        if self.prompt_cache.too_many(_prompt(body)):
            return self._refuse("cache-points"), body, last, max_tokens, None
        kind = self.directive(prompt)
        if kind is not None and not self.scripted_elsewhere(kind):
            return self._refuse(kind), body, last, max_tokens, kind
        admission = self.admit(prompt, last, max_tokens)
        if admission.error in _REFUSED_UNADMITTED:
            return self._refuse(admission.error or "", admission.prompt_tokens), body, last, max_tokens, kind
        admission.cache = self.prompt_cache.use(str(body.get("modelId")), _prompt(body), ready_in=self.latency)
        await self.delay(admission, request)
        if admission.error == "server_error":
            return self._refuse("server_error"), body, last, max_tokens, kind
        return admission, body, last, max_tokens, kind

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        if not self.enter():
            return self._refuse("throttle")
        try:
            admission, body, last, max_tokens, _kind = await self._admitted(request)
            if isinstance(admission, web.Response):
                return admission
            return web.json_response(self._converse_reply(admission, body, last, max_tokens))
        finally:
            self.leave()

    def _converse_reply(self, admission: Admission, body: dict[str, Any], last: str, max_tokens: int
                        ) -> dict[str, Any]:
        """Converse's JSON reply (also ConverseStream's, with ``never_stream``)."""
        use = self.tool_reply(body) if self.tool_reply is not None and "toolConfig" in body else None
        text, output, capped = self.answer(last, max_tokens) if use is None else ("", self.output_tokens, False)
        self.settle(admission, output)
        content = [{"text": text}] if use is None else [{"toolUse": {**use, "toolUseId": self._tool_id()}}]
        return {
            "output": {"message": {"role": "assistant", "content": content}},
            "stopReason": "tool_use" if use is not None else "max_tokens" if capped else "end_turn",
            "usage": self._usage(admission.prompt_tokens, output, admission.cache),
            "metrics": {"latencyMs": int(self.latency * 1000)},
        }

    async def _converse_stream(self, request: web.Request) -> web.StreamResponse:
        if not self.enter():
            return self._refuse("throttle")
        try:
            admission, body, last, max_tokens, kind = await self._admitted(request)
            if isinstance(admission, web.Response):
                return admission
            if self.never_stream:
                return web.json_response(self._converse_reply(admission, body, last, max_tokens))
            use = self.tool_reply(body) if self.tool_reply is not None and "toolConfig" in body else None
            response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
            await response.prepare(request)
            await response.write(_event("messageStart", {"role": "assistant"}))
            if use is not None:
                return await self._stream_tool_use(response, admission, use, admission.cache)
            text, output, capped = self.answer(last, max_tokens)
            fault = self.stream_fault_of(kind)
            pieces = self.pieces(text)
            for piece in pieces[:1] if fault is not None else pieces:
                await response.write(_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": piece}}))
                await asyncio.sleep(0)
            if fault is not None:  # after the first piece: an exception event, or ("cut") a clean end
                if fault == "torn":  # the connection ends cleanly inside a frame
                    await response.write(_event("contentBlockStop", {"contentBlockIndex": 0})[:20])
                elif fault != "cut":
                    await response.write(_exception(*STREAM_ERRORS[fault]))
                self.settle(admission, self.count_tokens(pieces[0]))
                await response.write_eof()
                return response
            await response.write(_event("contentBlockStop", {"contentBlockIndex": 0}))
            await response.write(_event("messageStop", {"stopReason": "max_tokens" if capped else "end_turn"}))
            await response.write(_event("metadata", {
                "usage": self._usage(admission.prompt_tokens, output, admission.cache),
                "metrics": {"latencyMs": 1},
            }))
            self.settle(admission, output)
            await response.write_eof()
            return response
        finally:
            self.leave()

    async def _count_tokens(self, request: web.Request) -> web.Response:
        """CountTokens: the prompt tokens of a Converse (or InvokeModel) input, as that request's
        usage would report them; nothing is admitted to the RPM/TPM window (a count is free)."""
        raw = await self._read_signed(request)
        model_id = request.match_info["model_id"]
        try:
            body = json.loads(raw)
        except ValueError:
            return self._refuse("invalid-request")
        self.counts_seen.append({**body, "modelId": model_id} if isinstance(body, dict) else {"modelId": model_id})
        counted = body.get("input") if isinstance(body, dict) else None
        if not isinstance(counted, dict) or len(counted) != 1 or not {"converse", "invokeModel"} >= set(counted):
            return self._refuse("invalid-request", message="input must set exactly one of converse and invokeModel.")
        if not self._counts_for(model_id):
            return self._refuse("unsupported")
        if "converse" in counted:
            if not isinstance(counted["converse"], dict):
                return self._refuse("invalid-request")
            invalid = _invalid_conversation(counted["converse"])
            if invalid is not None:
                return self._refuse("invalid-request", message=invalid)
            prompt: str | None = _prompt(counted["converse"]).text
        else:
            prompt = _invoke_model_prompt(counted["invokeModel"])
            if prompt is None:
                return self._refuse("invalid-request")
        kind = self.count_directive(prompt)
        if kind is not None:
            return self._refuse(kind)
        if self.count_latency:
            await asyncio.sleep(self.count_latency)
        return web.json_response({"inputTokens": self.count_tokens(prompt)})

    def _counts_for(self, model_id: str) -> bool:
        if self.count_models is not None:
            return model_id in self.count_models
        return _COUNTED_MODEL.fullmatch(model_id) is not None

    def _tool_id(self) -> str:
        self._tool_uses += 1
        return f"tooluse_{self._tool_uses}"

    async def _stream_tool_use(
        self, response: web.StreamResponse, admission: Admission, use: dict[str, Any], cache: CacheUse
    ) -> web.StreamResponse:
        start = {"toolUse": {"toolUseId": self._tool_id(), "name": use["name"]}}
        await response.write(_event("contentBlockStart", {"contentBlockIndex": 0, "start": start}))
        delta = {"toolUse": {"input": json.dumps(use.get("input") or {})}}
        await response.write(_event("contentBlockDelta", {"contentBlockIndex": 0, "delta": delta}))
        await response.write(_event("contentBlockStop", {"contentBlockIndex": 0}))
        await response.write(_event("messageStop", {"stopReason": "tool_use"}))
        await response.write(_event("metadata", {
            "usage": self._usage(admission.prompt_tokens, self.output_tokens, cache), "metrics": {"latencyMs": 1},
        }))
        self.settle(admission, self.output_tokens)
        await response.write_eof()
        return response

    def _usage(self, prompt_tokens: int, output: int, cache: CacheUse) -> dict[str, int]:
        """Converse's usage: ``inputTokens`` leaves out the tokens read from or written to the
        cache; the cache fields are sent when the request had cache points (as Bedrock does).
        ``cache_read_tokens`` / ``cache_write_tokens``, when set, are reported instead of the
        cache's own figures, whatever the request."""
        read, write = cache.read, cache.write
        if self.cache_read_tokens or self.cache_write_tokens:
            read = min(self.cache_read_tokens, prompt_tokens)
            write = min(self.cache_write_tokens, prompt_tokens - read)
        usage = {"inputTokens": prompt_tokens - read - write, "outputTokens": output,
                 "totalTokens": prompt_tokens + output}
        if cache.points or read or write:
            usage |= {"cacheReadInputTokens": read, "cacheWriteInputTokens": write}
        return usage


def _prompt(body: dict[str, Any]) -> Prompt:
    """A Converse request's blocks (system, then messages) and its cache points, for the cache."""
    prompt = Prompt()
    for block in body.get("system") or []:
        if "cachePoint" in block:
            prompt.point()
        else:
            prompt.add("system", str(block.get("text", "")))
    for message in body.get("messages") or []:
        for block in message.get("content") or []:
            if "cachePoint" in block:
                prompt.point()
            else:
                prompt.add(str(message.get("role")), _block_text(block))
    return prompt


def _invoke_model_prompt(counted: Any) -> str | None:
    """The prompt of CountTokens' ``invokeModel`` input: its ``body`` (a blob: base64 on the wire)
    read as the model's native request (Anthropic's Messages body for Claude); None if it is not one."""
    from .fake_anthropic import _prompt as anthropic_prompt

    try:
        native = json.loads(base64.b64decode(counted["body"], validate=True))
        if not isinstance(native, dict) or not native.get("messages"):
            return None
        return anthropic_prompt(native).text
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def _block_text(block: dict[str, Any]) -> str:
    """What a content block adds to the prompt: its text, a tool's input, a tool result's content."""
    if "text" in block:
        return str(block["text"])
    if "toolUse" in block:
        return json.dumps(block["toolUse"].get("input") or {})
    if "toolResult" in block:
        content = block["toolResult"].get("content") or []
        return "".join(str(c["text"]) if "text" in c else json.dumps(c.get("json")) for c in content)
    return ""


def _invalid_conversation(body: dict[str, Any]) -> str | None:
    """What Converse's request checks refuse in ``body``'s messages (the ValidationException's
    message), or None: roles, and every assistant ``toolUse`` answered by one ``toolResult``."""
    messages = body.get("messages") or []
    if not messages or messages[0].get("role") != "user":
        return "A conversation must start with a user message. Try again with a conversation that starts with a " \
               "user message."
    for before, after in itertools.pairwise(messages):
        if before.get("role") == after.get("role"):
            return "A conversation must alternate between user and assistant roles. Make sure the conversation " \
                   "alternates between user and assistant roles and try again."
    blocks = [b for m in messages for b in m.get("content") or []]
    if "toolConfig" not in body and any("toolUse" in b or "toolResult" in b for b in blocks):
        return "The toolConfig field must be defined when using toolUse and toolResult content blocks."
    used: list[str] = []  # the toolUseIds of the previous (assistant) turn
    for index, message in enumerate(messages):
        content = message.get("content") or []
        if message.get("role") == "assistant":
            used = [b["toolUse"].get("toolUseId", "") for b in content if "toolUse" in b]
            continue
        results = [b["toolResult"].get("toolUseId", "") for b in content if "toolResult" in b]
        if len(results) > len(used):
            return (f"The number of toolResult blocks at messages.{index}.content exceeds the number of toolUse "
                    "blocks of previous turn.")
        missing = [tool_id for tool_id in used if tool_id not in results]
        if missing:
            return f"Expected toolResult blocks at messages.{index}.content for the following Ids: {', '.join(missing)}"
        used = []
    return None
