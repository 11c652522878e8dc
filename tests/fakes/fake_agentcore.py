"""A local server speaking the AgentCore Code Interpreter data-plane API, executing code for real.

For tests and benchmarks only; it binds to 127.0.0.1. It answers the three operations the
sandbox uses with the shapes of botocore's ``bedrock-agentcore`` service model (restJson):

- ``PUT /code-interpreters/{id}/sessions/start`` starts a Python process for the session
  (:mod:`tests.fakes.fake_agentcore_kernel`, an empty environment, a scratch directory);
- ``POST /code-interpreters/{id}/tools/invoke`` runs ``executeCode`` in that process with
  persistent state and does ``writeFiles`` / ``readFiles`` / ``listFiles`` / ``removeFiles`` in
  the scratch directory; the answer is an AWS event stream (binary frames with CRCs);
- ``PUT /code-interpreters/{id}/sessions/stop?sessionId=`` ends the process.

Requests must carry a valid SigV4 signature for the credentials given (checked with botocore):
else AWS's common errors, ``InvalidSignatureException`` (a signature that does not match),
``UnrecognizedClientException`` (an unknown access key) or ``MissingAuthenticationTokenException``
(none), all 403. Every other error is one botocore's ``bedrock-agentcore`` model declares for the
operation, with its status and members (:data:`ERRORS`; ``tests/test_fakes_vs_botocore.py``
checks them and every reply against the model): ``ValidationException`` (400, with ``reason`` and
``fieldList``), ``ResourceNotFoundException`` (404: a stopped or expired session),
``ServiceQuotaExceededException`` (402: past ``max_sessions`` live sessions),
``ConflictException`` (409: an ``executeCode`` while another runs in the same session, one
execution at a time as in a kernel), and any of them injected with ``throttle`` / ``fail``
(answered before the stream) or ``stream_fail`` (an exception event inside InvokeCodeInterpreter's
event stream, in the lowerCamelCase name the model gives it). A ``clientToken`` given to
StartCodeInterpreterSession makes it idempotent: the same token answers the same session.
Everything received is recorded in ``requests`` and ``sessions`` for tests to inspect.

    async with FakeAgentCoreServer() as server:
        sandbox = AgentCoreSandbox(endpoint_url=server.endpoint_url, region_name="us-east-1", ...)
"""

from __future__ import annotations

import base64
import datetime
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

__all__ = ["AUTH_ERRORS", "ERRORS", "FakeAgentCoreServer", "FakeSession", "RecordedRequest", "encode_event"]

#: The errors the fake answers (code -> HTTP status, default message), each declared by botocore's
#: model for StartCodeInterpreterSession, InvokeCodeInterpreter and StopCodeInterpreterSession, and
#: (in lowerCamelCase) in InvokeCodeInterpreter's event stream.
ERRORS: dict[str, tuple[int, str]] = {
    "ValidationException": (400, "The input fails to satisfy the constraints specified by the service."),
    "ServiceQuotaExceededException": (402, "The request would exceed the quota of concurrent sessions."),
    "AccessDeniedException": (403, "You do not have sufficient permissions to perform this action."),
    "ResourceNotFoundException": (404, "The specified resource does not exist."),
    "ConflictException": (409, "The session is running another execution."),
    "ThrottlingException": (429, "Rate exceeded"),
    "InternalServerException": (500, "The service encountered an internal error. Try again."),
}
#: AWS's common authentication errors (not in the service model; every AWS API answers them).
AUTH_ERRORS: dict[str, tuple[int, str]] = {
    "MissingAuthenticationTokenException": (403, "Missing Authentication Token"),
    "UnrecognizedClientException": (403, "The security token included in the request is invalid."),
    "InvalidSignatureException": (403, "The request signature we calculated does not match the signature you "
                                  "provided. Check your AWS Secret Access Key and signing method."),
}

_KERNEL = Path(__file__).with_name("fake_agentcore_kernel.py")
_HEADER = struct.Struct(">I")
_TOOLS = {"executeCode", "executeCommand", "readFiles", "listFiles", "removeFiles", "writeFiles",
          "startCommandExecution", "getTask", "stopTask"}


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths + CRC), string headers, payload, message CRC."""
    encoded = b"".join(
        bytes([len(name)]) + name.encode() + b"\x07" + len(value.encode()).to_bytes(2, "big") + value.encode()
        for name, value in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + _HEADER.pack(zlib.crc32(prelude)) + encoded + payload
    return message + _HEADER.pack(zlib.crc32(message))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


@dataclass
class RecordedRequest:
    """One request as received (arguments after JSON decoding)."""

    operation: str
    session_id: str | None
    tool: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeSession:
    """A session: its process, its directory and what happened to it."""

    id: str
    name: str
    timeout: int
    directory: Path
    process: anyio.abc.Process
    traceparent: str | None = None
    stopped: bool = False
    executions: int = 0
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class _Error(Exception):
    def __init__(self, status: int, code: str, body: dict[str, Any]) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.body = body

    @classmethod
    def of(cls, code: str, message: str | None = None) -> _Error:
        """The error ``code`` with its status and the members the model requires."""
        status, default = ERRORS.get(code) or AUTH_ERRORS[code]
        body: dict[str, Any] = {"message": message or default}
        if code == "ValidationException":
            body["reason"] = "FieldValidationFailed"
        return cls(status, code, body)


def _validation(message: str, name: str) -> _Error:
    return _Error(400, "ValidationException", {
        "message": message, "reason": "FieldValidationFailed", "fieldList": [{"name": name, "message": message}],
    })


class FakeAgentCoreServer:
    """An aiohttp server on 127.0.0.1 implementing the Code Interpreter data plane.

    - ``access_key`` / ``secret_key`` / ``region``: the credentials requests must be signed with;
    - ``throttle``: operation name -> how many of the next requests get a ``ThrottlingException``;
    - ``fail``: operation name -> the error codes (of :data:`ERRORS`) the next requests get, in order,
      before any stream;
    - ``stream_fail``: tool name (``executeCode``, ``writeFiles``...) -> the error codes the next
      calls of that tool get as an exception event inside the stream (after the 200), the tool not run;
    - ``max_sessions``: live sessions allowed at once (more: ``ServiceQuotaExceededException``);
    - ``max_session_timeout``: larger ``sessionTimeoutSeconds`` get a ``ValidationException``;
    - ``latency``: seconds added to every request (a network round trip, for benchmarks);
    - ``on_request``: called with each request as it is recorded (tests wait on it);
    - ``on_execute``: called with the session once an ``executeCode`` runs in it (holding the session);
    - ``python``: the interpreter of the session processes (default: this one).
    """

    def __init__(
        self,
        *,
        access_key: str = "AKIDFAKEAGENTCORE",
        secret_key: str = "fake-secret-key",
        region: str = "us-east-1",
        python: str | None = None,
        latency: float = 0.0,
        port: int = 0,
    ) -> None:
        self.credentials = Credentials(access_key, secret_key)
        self.region = region
        self.python = python or sys.executable
        self.throttle: dict[str, int] = {}
        self.fail: dict[str, list[str]] = {}
        self.stream_fail: dict[str, list[str]] = {}
        self.max_sessions: int | None = None
        self.conflicts = 0
        self._tokens: dict[str, str] = {}  # clientToken -> session id
        self.max_session_timeout = 28800
        self.latency = latency
        self.on_request: Callable[[RecordedRequest], None] | None = None
        self.on_execute: Callable[[FakeSession], None] | None = None
        self.requests: list[RecordedRequest] = []
        self.sessions: dict[str, FakeSession] = {}
        self.rejected_signatures = 0
        self._port = port
        self._runner: web.AppRunner | None = None
        self._root = Path(tempfile.mkdtemp(prefix="fake-agentcore-"))
        self.endpoint_url = ""

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> FakeAgentCoreServer:
        app = web.Application(client_max_size=256 << 20, middlewares=[self._errors])
        app.router.add_put("/code-interpreters/{identifier}/sessions/start", self._start)
        app.router.add_post("/code-interpreters/{identifier}/tools/invoke", self._invoke)
        app.router.add_put("/code-interpreters/{identifier}/sessions/stop", self._stop)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint_url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            for session in list(self.sessions.values()):
                await self._end(session)
            if self._runner is not None:
                await self._runner.cleanup()
            await anyio.to_thread.run_sync(shutil.rmtree, self._root, True)

    @property
    def live_sessions(self) -> list[FakeSession]:
        return [s for s in self.sessions.values() if not s.stopped]

    async def expire(self, session_id: str) -> None:
        """End a session as its timeout would: later requests for it get ResourceNotFoundException."""
        await self._end(self.sessions[session_id])

    def tool_calls(self, tool: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.operation == "InvokeCodeInterpreter" and tool in (None, r.tool)]

    # -- HTTP plumbing -------------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            body = await request.read()
            if self.latency:
                await anyio.sleep(self.latency)
            self._check_signature(request, body)
            response: web.StreamResponse = await handler(request)
            return response
        except _Error as exc:
            return web.json_response(exc.body, status=exc.status, headers={"x-amzn-ErrorType": exc.code})

    def _check_signature(self, request: web.Request, body: bytes) -> None:
        authorization = request.headers.get("Authorization", "")
        try:
            signed = authorization.split("SignedHeaders=")[1].split(",")[0].split(";")
            claimed = authorization.split("Signature=")[1].strip()
            scope = authorization.split("Credential=")[1].split(",")[0]
        except IndexError:
            self.rejected_signatures += 1
            raise _Error.of("MissingAuthenticationTokenException") from None
        if not scope.startswith(self.credentials.access_key + "/"):
            self.rejected_signatures += 1
            raise _Error.of("UnrecognizedClientException")
        headers = {name: request.headers.get(name, "") for name in signed}
        aws_request = AWSRequest(method=request.method, url=f"http://{request.host}{request.raw_path}",
                                 headers=headers, data=body)
        aws_request.context["timestamp"] = request.headers.get("X-Amz-Date", "")
        signer = SigV4Auth(self.credentials, "bedrock-agentcore", self.region)
        expected = signer.signature(signer.string_to_sign(aws_request, signer.canonical_request(aws_request)),
                                    aws_request)
        if expected != claimed:
            self.rejected_signatures += 1
            raise _Error.of("InvalidSignatureException")

    def _record(self, request: RecordedRequest) -> None:
        self.requests.append(request)
        if self.on_request is not None:
            self.on_request(request)

    def _throttled(self, operation: str) -> None:
        """The error injected for this request of ``operation`` (``throttle``, then ``fail``), if any."""
        left = self.throttle.get(operation, 0)
        if left > 0:
            self.throttle[operation] = left - 1
            raise _Error.of("ThrottlingException")
        planned = self.fail.get(operation)
        if planned:
            raise _Error.of(planned.pop(0))

    def _session(self, request: web.Request, session_id: str | None) -> FakeSession:
        session = self.sessions.get(session_id or "")
        if session is None or session.stopped:
            raise _Error(404, "ResourceNotFoundException", {"message": f"session {session_id} not found"})
        return session

    @staticmethod
    async def _json(request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            raise _Error(400, "ValidationException", {"message": "body is not JSON", "reason": "CannotParse"}) from None
        if not isinstance(body, dict):
            raise _Error(400, "ValidationException", {"message": "body is not an object", "reason": "CannotParse"})
        return body

    # -- operations -----------------------------------------------------------------------------
    async def _start(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        self._record(RecordedRequest("StartCodeInterpreterSession", None, body=body,
                                             headers=dict(request.headers)))
        self._throttled("StartCodeInterpreterSession")
        timeout = body.get("sessionTimeoutSeconds", 900)
        if not isinstance(timeout, int) or not 1 <= timeout <= self.max_session_timeout:
            raise _validation(f"sessionTimeoutSeconds must be between 1 and {self.max_session_timeout}",
                              "sessionTimeoutSeconds")
        token = body.get("clientToken")
        known = self.sessions.get(self._tokens.get(token, "")) if isinstance(token, str) else None
        if known is not None:  # a retried start: the session the first one started
            return web.json_response({
                "codeInterpreterIdentifier": request.match_info["identifier"], "sessionId": known.id,
                "createdAt": _now(),
            })
        if self.max_sessions is not None and len(self.live_sessions) >= self.max_sessions:
            raise _Error.of("ServiceQuotaExceededException",
                            f"the account's quota of {self.max_sessions} concurrent sessions is reached")
        session_id = uuid.uuid4().hex[:26].upper()
        directory = self._root / session_id
        directory.mkdir()
        process = await anyio.open_process(
            [self.python, "-I", str(_KERNEL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=str(directory),
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(directory)},
        )
        self.sessions[session_id] = FakeSession(
            session_id, str(body.get("name", "")), timeout, directory, process, request.headers.get("traceparent")
        )
        if isinstance(token, str):
            self._tokens[token] = session_id
        return web.json_response({
            "codeInterpreterIdentifier": request.match_info["identifier"], "sessionId": session_id,
            "createdAt": _now(),
        })

    async def _stop(self, request: web.Request) -> web.StreamResponse:
        session_id = request.query.get("sessionId")
        self._record(RecordedRequest("StopCodeInterpreterSession", session_id, headers=dict(request.headers)))
        self._throttled("StopCodeInterpreterSession")
        session = self._session(request, session_id)
        await self._end(session)
        return web.json_response({
            "codeInterpreterIdentifier": request.match_info["identifier"], "sessionId": session.id,
            "lastUpdatedAt": _now(),
        })

    async def _end(self, session: FakeSession) -> None:
        session.stopped = True
        if session.process.returncode is None:
            session.process.kill()
        with anyio.CancelScope(shield=True):
            await session.process.wait()
            await session.process.aclose()

    async def _invoke(self, request: web.Request) -> web.StreamResponse:
        session_id = request.headers.get("x-amzn-code-interpreter-session-id")
        body = await self._json(request)
        tool = body.get("name")
        arguments = body.get("arguments") or {}
        self._record(RecordedRequest("InvokeCodeInterpreter", session_id, str(tool), arguments, body,
                                             dict(request.headers)))
        self._throttled("InvokeCodeInterpreter")
        if tool not in _TOOLS:
            raise _validation(f"unknown tool {tool!r}", "name")
        session = self._session(request, session_id)
        planned = self.stream_fail.get(str(tool))
        if planned:  # accepted, then an exception event instead of a result
            return await self._stream(request, session, exception=planned.pop(0))
        if tool == "executeCode":
            if session.lock.locked():  # one execution at a time in a session
                self.conflicts += 1
                raise _Error.of("ConflictException", f"session {session.id} is running another execution")
            result = await self._execute(session, arguments)
        elif tool in ("writeFiles", "readFiles", "listFiles", "removeFiles"):
            result = await anyio.to_thread.run_sync(self._files, session, tool, arguments)
        else:
            raise _validation(f"the fake does not implement {tool}", "name")
        return await self._stream(request, session, result=result)

    async def _stream(self, request: web.Request, session: FakeSession, *, result: dict[str, Any] | None = None,
                      exception: str | None = None) -> web.StreamResponse:
        """InvokeCodeInterpreter's 200: an event stream of the result, or of one exception event."""
        response = web.StreamResponse(headers={
            "Content-Type": "application/vnd.amazon.eventstream",
            "x-amzn-code-interpreter-session-id": session.id,
        })
        await response.prepare(request)
        if exception is not None:
            body = _Error.of(exception).body
            await response.write(encode_event(
                {":message-type": "exception", ":exception-type": exception[:1].lower() + exception[1:],
                 ":content-type": "application/json"},
                json.dumps(body).encode("utf-8"),
            ))
        else:
            await response.write(encode_event(
                {":message-type": "event", ":event-type": "result", ":content-type": "application/json"},
                json.dumps(result).encode("utf-8"),
            ))
        await response.write_eof()
        return response

    async def _execute(self, session: FakeSession, arguments: dict[str, Any]) -> dict[str, Any]:
        if arguments.get("language", "python") != "python":
            raise _validation("the fake runs python only", "arguments.language")
        code = str(arguments.get("code", ""))
        async with session.lock:  # one execution at a time, as in a kernel
            session.executions += 1
            stdin, stdout = session.process.stdin, session.process.stdout
            assert stdin is not None and stdout is not None
            data = json.dumps({"code": code}).encode("utf-8")
            try:
                await stdin.send(_HEADER.pack(len(data)) + data)
                if self.on_execute is not None:
                    self.on_execute(session)
                reply = await _receive_frame(stdout)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, OSError):
                raise _Error(404, "ResourceNotFoundException", {"message": "the session ended"}) from None
        text = reply["stdout"] + reply["stderr"]
        return {
            "content": [{"type": "text", "text": text}],
            "structuredContent": {"stdout": reply["stdout"], "stderr": reply["stderr"],
                                  "exitCode": 1 if reply["error"] else 0, "executionTime": reply["ms"]},
            "isError": bool(reply["error"]),
        }

    def _path(self, session: FakeSession, raw: Any, name: str) -> Path:
        path = str(raw or "")
        if not path or path.startswith("/") or ".." in Path(path).parts:
            raise _validation(f"path {path!r} must be relative and stay in the session", name)
        return session.directory / path

    def _files(self, session: FakeSession, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if tool == "writeFiles":
            blocks = arguments.get("content") or []
            for block in blocks:
                target = self._path(session, block.get("path"), "arguments.content.path")
                target.parent.mkdir(parents=True, exist_ok=True)
                if "blob" in block:
                    target.write_bytes(base64.b64decode(block["blob"]))
                else:
                    target.write_text(str(block.get("text", "")), encoding="utf-8")
            return {"content": [{"type": "text", "text": f"Successfully wrote {len(blocks)} file(s)"}],
                    "isError": False}
        if tool == "readFiles":
            content = []
            for raw in arguments.get("paths") or []:
                target = self._path(session, raw, "arguments.paths")
                if not target.is_file():
                    return {"content": [{"type": "text", "text": f"File not found: {raw}"}], "isError": True}
                content.append({"type": "resource", "resource": {
                    "type": "text", "uri": f"file://{raw}", "text": target.read_text(encoding="utf-8")}})
            return {"content": content, "isError": False}
        if tool == "removeFiles":
            for raw in arguments.get("paths") or []:
                self._path(session, raw, "arguments.paths").unlink(missing_ok=True)
            return {"content": [{"type": "text", "text": "removed"}], "isError": False}
        directory = self._path(session, arguments.get("directoryPath") or ".", "arguments.directoryPath")
        links = [{"type": "resource_link", "name": p.name, "uri": f"file://{p.relative_to(session.directory)}",
                  "size": p.stat().st_size} for p in sorted(directory.iterdir())]
        return {"content": links, "isError": False}


async def _receive_frame(stream: anyio.abc.ByteReceiveStream) -> dict[str, Any]:
    buffer = bytearray()
    while len(buffer) < _HEADER.size:
        buffer += await stream.receive()
    (length,) = _HEADER.unpack(buffer[: _HEADER.size])
    while len(buffer) < _HEADER.size + length:
        buffer += await stream.receive()
    reply: dict[str, Any] = json.loads(bytes(buffer[_HEADER.size : _HEADER.size + length]))
    return reply
