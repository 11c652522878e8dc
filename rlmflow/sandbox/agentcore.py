"""The AgentCore Code Interpreter as a sandbox: cells run in a remote AWS session without credentials.

The ``bedrock-agentcore`` data-plane API (in botocore already; the SDK package is not needed) is
driven with an aioboto3 client. A session:

1. ``StartCodeInterpreterSession`` (timeout, ``traceparent`` of the current span);
2. ``writeFiles`` of the context in chunks of bounded size;
3. one ``executeCode`` that installs :mod:`rlmflow.sandbox.agentcore_runtime` and loads
   ``context`` (its length and SHA-256 are checked against the host's);
4. per cell: a control call starts the cell in a thread of the remote interpreter and returns as
   soon as the cell ends or asks the host something (``llm_query_many``, ``rlm_query_many``,
   ``budget``); the host serves requests through its bridge (the Dispatcher: budgets, limits and
   spans as locally), then resumes the cell with the answers (inline, or with ``writeFiles`` when
   large); a cell that computes long is followed with short polls;
5. ``StopCodeInterpreterSession`` on close, error and cancellation (shielded).

Everything the remote side prints is untrusted: bounded before it is decoded, checked against
the schema of its state (:mod:`.agentcore_protocol`) before the host acts on it, and never used to
build a URL, a path, a credential or a client. A status that does not fit is a protocol violation:
the session is replaced as after a crash and the cell reports it; every control call has a
deadline, so no answer (or none at all) from the remote side can hold a cell past its time.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from botocore.config import Config
from botocore.eventstream import ParserError
from botocore.exceptions import BotoCoreError, ClientError
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .._exceptions import ConfigurationError, RLMError, SandboxError, SandboxProtocolError
from .._sandbox_string import DEFAULT_IDENTIFIER, SANDBOX_FORMS, split_sandbox_string
from .._text import sanitize_text
from .._util import single_exception
from ..dispatch.retry import RetryPolicy
from ..telemetry.logs import get_logger
from .agentcore_protocol import (
    MARKER,
    MAX_CALLS_IN_FLIGHT,
    Busy,
    Malformed,
    SessionLost,
    Stuck,
    capped,
    check_done,
    check_ready,
    check_status,
    cpu,
    cut,
    cut_answer,
    decode_status,
    explain,
    pieces,
    read_result,
    sha256,
    status_line,
    valid_calls,
)
from .base import Bridge, CellResult, Context, Isolation, Sandbox, SandboxReport
from .local import error_to_wire

__all__ = ["DEFAULT_IDENTIFIER", "SANDBOX_FORMS", "AgentCoreSandbox", "AgentCoreSandboxSession",
           "parse_sandbox_string", "sandbox_from_string"]

_REMOTE_MODULES = (  # (module name in the remote interpreter, source file); the runtime's imports first
    ("_rlmflow_cellapi", Path(__file__).with_name("cellapi.py")),
    ("_rlmflow_helpers", Path(__file__).with_name("helpers_prelude.py")),
    ("_rlmflow_runtime", Path(__file__).with_name("agentcore_runtime.py")),
)
_SESSION_ID = re.compile(r"[0-9a-zA-Z]{1,40}")
_ENVELOPE = 2048  # room for the JSON around a request's payload
_LOST = ("ResourceNotFoundException",)
# Retried with backoff: what botocore's model of the three operations marks as passing (a 429, and
# InternalServerException, a 5xx fault "that will resolve itself with retries"), in the HTTP answer
# or as an exception event in the stream. Safe to send again: a retried start carries the first
# one's clientToken, file calls are idempotent, and each control call names its cell (the runtime
# does not start a cell twice; replies are taken once). Quota, conflict, validation and access
# errors are not retried.
_RETRIED = frozenset({"ThrottlingException", "InternalServerException"})
_HINTS = {
    "InvalidSignatureException": " (the request was signed with other credentials than the caller's, or the "
                                 "clock is off)",
    "UnrecognizedClientException": " (the access key is not known to AWS)",
    "ConflictException": " (another execution is running in the session)",
}
_ON_LOOP = 20_000  # characters decoded or sanitised on the event loop (~10 ms at worst); more in a thread
_MAX_ERROR_CHARS = 200_000
_logger = get_logger("rlmflow.sandbox")

Sleep = Callable[[float], Awaitable[None]]


class AgentCoreSandbox:
    """Runs cells in Amazon Bedrock AgentCore Code Interpreter sessions, one per run.

    A configuration object; options are keyword-only:

    - ``session``: an ``aioboto3.Session`` (default: a new one, credentials from the usual chain);
    - ``region_name`` / ``endpoint_url``: where the data-plane API is (``endpoint_url`` points the
      client at a local fake in tests);
    - ``identifier``: the code interpreter (default ``aws.codeinterpreter.v1``, the system one);
    - ``session_timeout``: ``sessionTimeoutSeconds`` of each session (1-28800);
    - ``cell_timeout`` / ``interrupt_grace``: compute seconds per cell (waiting for the host is
      free), and how long an interrupted cell has to stop before the session is replaced;
    - ``max_output_chars``: cap of a cell's printed output (head and tail kept);
    - ``max_answer_chars``: cap of a ``FINAL`` answer (its head kept, with its true length; errors
      keep head and tail within ``max(20_000, 4 * max_output_chars)``, at most 200,000);
    - ``poll_wait``: the longest a control call waits in the remote session for an event;
    - ``max_request_bytes``: the largest request body sent (aiohttp warns past 1 MiB); the
      context goes in ``writeFiles`` chunks of this size, and a control call whose arguments
      (the cell's code, the answers) would not fit has them written to files first;
    - ``max_response_chars``: the most text the host reads from one call's event stream;
    - ``max_request_chars``: the largest host request the remote runtime sends (checked there);
    - ``retry``: backoff for throttled API calls; ``sleep``: how to wait (tests inject one);
    - ``client_config``: a ``botocore.config.Config`` merged over the defaults;
    - ``start_timeout`` / ``stop_timeout``: bounds of the (shielded) start and stop calls;
    - ``control_grace``: how much longer than the cell's remaining time (plus ``interrupt_grace``)
      a control call may take before the session is taken as stuck and replaced (C code holding
      the interpreter, or a runtime that cell code broke).
    """

    def __init__(
        self,
        *,
        session: Any = None,
        region_name: str | None = None,
        endpoint_url: str | None = None,
        identifier: str = DEFAULT_IDENTIFIER,
        session_timeout: int = 3600,
        cell_timeout: float = 120.0,
        interrupt_grace: float = 2.0,
        max_output_chars: int = 20_000,
        max_answer_chars: int = 200_000,
        poll_wait: float = 2.0,
        max_request_bytes: int = 1_000_000,
        max_response_chars: int = 64 << 20,
        max_request_chars: int = 32 << 20,
        retry: RetryPolicy | None = None,
        sleep: Sleep | None = None,
        client_config: Config | None = None,
        stop_timeout: float = 10.0,
        start_timeout: float = 60.0,
        control_grace: float = 30.0,
    ) -> None:
        if not 1 <= session_timeout <= 28800:
            raise ValueError("session_timeout must be between 1 and 28800 seconds")
        if cell_timeout <= 0 or interrupt_grace < 0 or poll_wait <= 0 or control_grace <= 0:
            raise ValueError("cell_timeout, poll_wait and control_grace must be > 0, interrupt_grace >= 0")
        if max_output_chars < 1 or max_answer_chars < 1000:
            raise ValueError("max_output_chars must be >= 1 and max_answer_chars >= 1000")
        if max_request_bytes < 16384 or max_response_chars < 1024:
            raise ValueError("max_request_bytes must be >= 16384 and max_response_chars >= 1024")
        self._session = session
        self.region_name = region_name
        self.endpoint_url = endpoint_url
        self.identifier = identifier
        self.session_timeout = session_timeout
        self.cell_timeout = cell_timeout
        self.interrupt_grace = interrupt_grace
        self.max_output_chars = max_output_chars
        self.max_answer_chars = max_answer_chars
        self.max_error_chars = min(_MAX_ERROR_CHARS, max(20_000, 4 * max_output_chars))
        self.control_grace = control_grace
        self.poll_wait = poll_wait
        self.max_request_bytes = max_request_bytes
        self.max_response_chars = max_response_chars
        self.max_request_chars = max_request_chars
        self.retry = retry or RetryPolicy(max_attempts=5, base_delay=0.2, max_delay=5.0)
        self.sleep: Sleep = sleep or anyio.sleep
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        # botocore's own retries off: throttles are retried here, where a test can inject the sleep.
        # Its read timeout outlasts a control call's own deadline, which ends the cell, not the run.
        read_timeout = max(60.0, 4 * poll_wait, cell_timeout + interrupt_grace + control_grace + 10)
        config = Config(retries={"total_max_attempts": 1}, read_timeout=read_timeout, connect_timeout=10)
        self.client_config = config.merge(client_config) if client_config is not None else config

    def _boto_session(self) -> Any:
        if self._session is None:
            import aioboto3

            self._session = aioboto3.Session()
        return self._session

    @asynccontextmanager
    async def session(self, context: Context, bridge: Bridge) -> AsyncIterator[AgentCoreSandboxSession]:
        """Start a remote session with ``context`` loaded; stop it on exit, error or cancellation.

        Raises :class:`rlmflow.SandboxError` when the session cannot be started or loaded.
        """
        client_cm = self._boto_session().client(
            "bedrock-agentcore", region_name=self.region_name, endpoint_url=self.endpoint_url,
            config=self.client_config,
        )
        with single_exception():
            async with client_cm as client:
                session = AgentCoreSandboxSession(self, client, bridge)
                try:
                    await session._open(context)
                    yield session
                finally:
                    with anyio.CancelScope(shield=True):
                        await session._close()

    def __repr__(self) -> str:
        return (f"AgentCoreSandbox(identifier={self.identifier!r}, region_name={self.region_name!r}, "
                f"cell_timeout={self.cell_timeout})")


class AgentCoreSandboxSession:
    """A live remote session. Created by :meth:`AgentCoreSandbox.session`."""

    def __init__(self, config: AgentCoreSandbox, client: Any, bridge: Bridge) -> None:
        self._config = config
        self._client = client
        self._bridge = bridge
        self._lock = anyio.Lock()
        self._session_id: str | None = None
        self._context_text = ""
        self._context_kind = "text"
        self._context_sha = ""
        self._cell_ids = 0
        self._files = 0
        self._started_at = 0.0
        self._closed = False
        self.restarts = 0
        self.session_ids: list[str] = []
        self.load_seconds = 0.0
        self.api_calls = 0

    @property
    def report(self) -> SandboxReport:
        """What confines the code: a remote microVM that has no host files, processes or credentials.

        Inside it, programs can run and the network is what the code interpreter's network mode
        allows (the system interpreter: S3 and DNS); rlmflow's runtime needs none of it.
        """
        return SandboxReport(
            backend="agentcore",
            mode="remote",
            layers=(f"AgentCore Code Interpreter {self._config.identifier} (remote microVM, no credentials)",),
            missing=("exec: programs can run inside the remote session",
                     "network: set by the code interpreter's network mode, not by rlmflow"),
            filesystem=True,
            network=False,
            exec=False,
            processes=True,
        )

    @property
    def session_id(self) -> str | None:
        """The current remote session id (changes when the session is replaced)."""
        return self._session_id

    # -- API calls -----------------------------------------------------------------------------
    def _trace_headers(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
        return {"traceParent": carrier["traceparent"]} if "traceparent" in carrier else {}

    async def _api(self, operation: str, **kwargs: Any) -> Any:
        """One API call, retried when throttled; errors become SandboxError or SessionLost."""
        attempt = 0
        while True:
            attempt += 1
            self.api_calls += 1
            try:
                return await getattr(self._client, operation)(**kwargs, **self._trace_headers())
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                message = str(exc.response.get("Error", {}).get("Message", ""))[:500]
                if code in _RETRIED and attempt < self._config.retry.max_attempts:
                    await self._config.sleep(self._config.retry.delay(attempt))
                    continue
                if code in _LOST and self._session_id is not None:
                    raise SessionLost(f"{code}: {message}") from exc
                raise SandboxError(_explain(operation, code, message, attempt)) from exc
            except BotoCoreError as exc:
                raise SandboxError(f"AgentCore {operation} failed: {type(exc).__name__}: {exc}") from exc

    async def _invoke(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """InvokeCodeInterpreter; returns the result event (text bounded before it is kept)."""
        assert self._session_id is not None
        attempt = 0
        while True:
            attempt += 1
            response = await self._api(
                "invoke_code_interpreter", codeInterpreterIdentifier=self._config.identifier,
                sessionId=self._session_id, name=tool, arguments=arguments,
            )
            stream = response["stream"]
            try:
                return await read_result(stream, self._config.max_response_chars)
            except ClientError as exc:  # an exception event inside the stream (named in lowerCamelCase)
                code = str(exc.response.get("Error", {}).get("Code", ""))
                code = code[:1].upper() + code[1:]
                message = str(exc.response.get("Error", {}).get("Message", "") or exc)[:500]
                if code in _RETRIED and attempt < self._config.retry.max_attempts:
                    await self._config.sleep(self._config.retry.delay(attempt))
                    continue
                if code in _LOST:
                    raise SessionLost(f"{code}: {message}") from exc
                raise SandboxError(_explain(tool, code, message, attempt)) from exc
            except ParserError as exc:  # an event botocore refuses to read (over 24 MB, a bad checksum)
                raise Malformed(f"an unreadable event stream ({type(exc).__name__}: {str(exc)[:200]})") from None
            finally:
                stream.close()  # a response left unread (oversized) must not hold its connection

    # -- session lifecycle -------------------------------------------------------------------------
    async def _open(self, context: Context) -> None:
        self._context_kind = "text" if isinstance(context, str) else "json"
        text = context if isinstance(context, str) else json.dumps(context, ensure_ascii=False)
        self._context_text = text
        self._context_sha = await anyio.to_thread.run_sync(sha256, text)
        await self._start_remote()

    async def _start_remote(self) -> None:
        started = anyio.current_time()
        # Shielded: a start cancelled in flight would leave a session nobody knows the id of to stop.
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._config.start_timeout) as deadline:
            response = await self._api(  # one clientToken for its retries: a retried start is the same session
                "start_code_interpreter_session", codeInterpreterIdentifier=self._config.identifier,
                name=f"rlmflow-{uuid.uuid4().hex[:12]}", sessionTimeoutSeconds=self._config.session_timeout,
                clientToken=str(uuid.uuid4()),
            )
        if deadline.cancelled_caught:
            raise SandboxError(f"StartCodeInterpreterSession did not answer within {self._config.start_timeout:g} s")
        session_id = response.get("sessionId") if isinstance(response, dict) else None
        if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
            raise SandboxProtocolError("StartCodeInterpreterSession returned no valid sessionId")
        self._session_id = session_id
        self._started_at = started
        self.session_ids.append(session_id)
        try:
            await self._load()
            self.load_seconds = anyio.current_time() - started
        except (Malformed, SessionLost) as exc:  # no model code ran yet, but the remote side is not trusted
            with anyio.CancelScope(shield=True):
                await self._stop()
            raise SandboxError(f"the remote session did not load the context: {str(exc)[:300]}") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop()
            raise

    async def _load(self) -> None:
        """Write the context and the runtime into the new session and boot the runtime."""
        await anyio.lowlevel.checkpoint()  # a cancellation that came during the start lands here
        paths = await self._write_parts("context", self._context_text)
        config = {
            "context_paths": paths, "context_kind": self._context_kind,
            "max_output_chars": self._config.max_output_chars,
            "max_request_chars": self._config.max_request_chars,
            "max_error_chars": self._config.max_error_chars,
            "max_answer_chars": self._config.max_answer_chars,
        }
        install = "import sys as _rlmflow_sys, types as _rlmflow_types\n"
        # The helpers model code may call (grep, chunks) and the runtime become modules of the
        # remote interpreter, apart from the namespace model code runs in.
        for module, path in _REMOTE_MODULES:
            source = await anyio.to_thread.run_sync(path.read_text, "utf-8")
            module_paths = await self._write_parts("runtime", source)
            install += (
                f"_rlmflow_module = _rlmflow_types.ModuleType({module!r})\n"
                f"_rlmflow_source = ''.join(open(p, encoding='utf-8').read() for p in {module_paths!r})\n"
                f"exec(compile(_rlmflow_source, {path.name!r}, 'exec'), _rlmflow_module.__dict__)\n"
                f"_rlmflow_sys.modules[{module!r}] = _rlmflow_module\n"
            )
        status = check_ready(await self._control("boot", config, prefix=install))
        if status["chars"] != len(self._context_text) or status["sha256"] != self._context_sha:
            raise SandboxError("the context read back in the remote session differs from the one written")

    async def _write_parts(self, kind: str, text: str) -> list[str]:
        """Write ``text`` in files whose requests stay under ``max_request_bytes``; their paths, in order.

        The paths are the host's own choice: nothing from the remote side names a file.
        """
        self._files += 1
        paths = []
        limit = self._config.max_request_bytes - _ENVELOPE
        if len(text) < limit // 8:
            parts = pieces(text, limit)
        else:  # encoding megabytes to measure them: not on the event loop
            parts = await anyio.to_thread.run_sync(pieces, text, limit)
        for index, piece in enumerate(parts):
            path = f".rlmflow/{kind}/{self._files:06d}-{index:05d}.txt"
            block = {"path": path, "text": piece}
            result = await self._invoke("writeFiles", {"content": [block]})
            if result["is_error"]:
                raise SandboxError(f"writeFiles failed in the remote session: {result['stdout'][:300]}")
            paths.append(path)
        return paths

    async def _close(self) -> None:
        self._closed = True
        await self._stop()

    async def _stop(self) -> None:
        session_id, self._session_id = self._session_id, None
        if session_id is None:
            return
        with anyio.move_on_after(self._config.stop_timeout):
            try:
                await self._client.stop_code_interpreter_session(
                    codeInterpreterIdentifier=self._config.identifier, sessionId=session_id, **self._trace_headers()
                )
                self.api_calls += 1
            except ClientError as exc:  # it times out on its own; say so and go on
                if exc.response.get("Error", {}).get("Code") not in _LOST:
                    _logger.warning("could not stop the AgentCore session", session_id=session_id,
                                    error=str(exc)[:200])
            except BotoCoreError as exc:
                _logger.warning("could not stop the AgentCore session", session_id=session_id, error=str(exc)[:200])

    async def _restart(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._stop()
        self.restarts += 1
        _logger.warning("AgentCore session replaced", restarts=self.restarts)
        await self._start_remote()

    # -- control calls -----------------------------------------------------------------------------
    async def _control(
        self, method: str, args: dict[str, Any], *, prefix: str = "", deadline: float | None = None
    ) -> dict[str, Any]:
        """One control call: its decoded status (checked against a schema by the caller).

        ``deadline`` bounds the ``executeCode`` call (not the writing of large arguments before
        it): past it the remote session is :class:`Stuck`.
        """
        text = json.dumps(args, ensure_ascii=False, default=str)
        payload = base64.b64encode(text.encode("utf-8")).decode("ascii")
        if len(payload) + len(prefix) + _ENVELOPE > self._config.max_request_bytes:
            spilled = {"args_paths": await self._write_parts("args", text)}
            payload = base64.b64encode(json.dumps(spilled).encode("utf-8")).decode("ascii")
        code = (
            prefix + "import sys as _rlmflow_sys\n"
            "_rlmflow_rt = _rlmflow_sys.modules.get('_rlmflow_runtime')\n"
            f"if _rlmflow_rt is None: print({MARKER!r} + '{{\"state\": \"lost\"}}')\n"
            f"else: _rlmflow_rt.control({method!r}, {payload!r})\n"
        )
        arguments = {"code": code, "language": "python", "clearContext": False}
        if deadline is None:
            result = await self._invoke("executeCode", arguments)
        else:
            with anyio.move_on_after(deadline) as scope:
                result = await self._invoke("executeCode", arguments)
            if scope.cancelled_caught:
                raise Stuck(deadline)
        line = status_line(result, self._config.max_response_chars)
        if len(line) <= _ON_LOOP:
            return decode_status(line)
        return await anyio.to_thread.run_sync(decode_status, line)  # megabytes of calls: off the event loop

    async def _cell_control(self, method: str, args: dict[str, Any], remaining: float) -> tuple[dict[str, Any], float]:
        """A control call about the current cell, bounded in time; (its status, seconds it took)."""
        config = self._config
        deadline = max(remaining, args["wait"]) + config.interrupt_grace + config.control_grace
        started = anyio.current_time()
        status = await self._control(method, args, deadline=deadline)
        return status, anyio.current_time() - started

    # -- cells -----------------------------------------------------------------------------------
    async def execute(self, code: str) -> CellResult:
        """Run ``code`` in the remote namespace. Errors in the code come back in the result.

        Raises :class:`rlmflow.SandboxError` when the remote session cannot go on (access
        denied, throttled past the retries, unreachable endpoint).
        """
        async with self._lock:
            if self._closed:
                raise SandboxError("this AgentCore sandbox session is closed")
            notes: list[str] = []
            expired = anyio.current_time() - self._started_at >= self._config.session_timeout - 5
            if self._session_id is None or expired:  # a cell must not start in a session known to be gone
                await self._restart()
                notes.append("The sandbox session had ended and was restarted: variables were lost, context is "
                             "reloaded.")
            reply, timed_out = await self._cell(code, notes)
            return await self._result(reply, timed_out, notes)

    async def _cell(self, code: str, notes: list[str]) -> tuple[dict[str, Any], bool]:
        """Run the cell; whatever the remote side does, a reply (host-made if need be) and whether it timed out."""
        timeout = self._config.cell_timeout
        for attempt in (1, 2):
            self._cell_ids += 1
            try:
                return await self._run_cell(self._cell_ids, code)
            except Busy as exc:
                if attempt == 2:
                    return await self._violation(Malformed("a new session answered 'busy'"))
                _logger.warning("AgentCore session busy between cells", cpu=exc.cpu)
                await self._restart()
                notes.append(
                    f"Threads of an earlier cell kept computing between cells ({exc.cpu:.1f} CPU-seconds, more than "
                    f"the {timeout:g} s a cell may use): the sandbox session was replaced before this cell ran, ALL "
                    "VARIABLES WERE LOST. `context` is loaded again. Join the threads a cell starts."
                )
            except Stuck as exc:
                _logger.warning("AgentCore control call stuck", seconds=exc.seconds)
                await self._restart()
                return {
                    "error": f"TimeoutError: the sandbox did not answer for {exc.seconds:g} s (C code holding the "
                    "interpreter past the cell's time limit, or a broken runtime); the session was replaced.",
                    "restart": True,
                }, True
            except (SessionLost, Malformed) as exc:
                # Not run again: the cell itself may be what ended the session (os._exit, memory).
                return await self._violation(exc)
        raise AssertionError("unreachable")

    async def _violation(self, exc: Exception) -> tuple[dict[str, Any], bool]:
        lost = isinstance(exc, SessionLost)
        reason = "the remote session ended" if lost else "a protocol violation: a malformed response"
        _logger.warning("AgentCore cell failed", reason=str(exc)[:200])
        await self._restart()
        return {"error": f"SandboxCrash: {reason} ({str(exc)[:300]}) while running this cell.", "restart": True}, False

    async def _result(self, reply: dict[str, Any], timed_out: bool, notes: list[str]) -> CellResult:
        """The cell's result: every text cut to its bound first, then sanitised (long ones off the loop)."""
        config = self._config
        restarted = bool(reply.get("restart"))
        if restarted:
            notes.append(
                "The sandbox session was replaced: ALL VARIABLES WERE LOST. `context` is loaded again; "
                "recompute what you need."
            )
        output, output_chars = capped(reply.get("output"), reply.get("output_chars"), config.max_output_chars)
        texts = (
            _Text(output, output_chars, config.max_output_chars + 200, cut),
            _Text.of(reply, "error", config.max_error_chars, cut),
            _Text.of(reply, "final", config.max_answer_chars, cut_answer),
        )
        # remote text goes to the root model, logs and terminals: shown, never obeyed (as locally)
        if sum(len(text.text or "") for text in texts) <= _ON_LOOP:
            shown = _sanitize_all(texts)
        else:
            shown = await anyio.to_thread.run_sync(_sanitize_all, texts)
        return CellResult(
            output=shown[0] or "",
            output_chars=output_chars,
            error=shown[1],
            final=shown[2],
            duration=float(reply.get("duration", 0.0)),
            timed_out=timed_out,
            restarted=restarted or bool(notes),
            notes=tuple(notes),
        )

    async def _run_cell(self, cell_id: int, code: str) -> tuple[dict[str, Any], bool]:
        send, receive = anyio.create_memory_object_stream[tuple[int, dict[str, Any]]](MAX_CALLS_IN_FLIGHT)
        with single_exception():
            async with send, receive, anyio.create_task_group() as tg:
                try:
                    outcome = await self._drive(tg, send, receive, cell_id, code)
                finally:
                    tg.cancel_scope.cancel()  # host calls the finished cell no longer waits for
        return outcome

    async def _drive(
        self, tg: anyio.abc.TaskGroup, send: Any, receive: Any, cell_id: int, code: str
    ) -> tuple[dict[str, Any], bool]:
        """Start the cell, serve its host calls, poll while it computes; (result, timed out).

        Time counts against the cell while a control call runs (the remote computes meanwhile) and,
        while the host serves the cell's calls, as the CPU the remote reports for that wait; a look
        every ``poll_wait`` seconds of such a wait, so that a cell cannot compute unseen behind a
        long call. Only a status that fits its schema is acted on.
        """
        config = self._config
        remaining = config.cell_timeout
        pending: set[int] = set()
        last_id = 0  # call ids only grow within a cell
        method = "start"
        args: dict[str, Any] = {"cell": cell_id, "code": code, "idle_limit": config.cell_timeout}
        looking = served = False  # this call only looks at the remote's CPU / the host served calls before it
        while True:
            args["wait"] = 0.0 if looking else min(config.poll_wait, max(remaining, 0.0))
            raw, spent = await self._cell_control(method, args, remaining)
            status = check_status(raw, cell_id)
            state = status["state"]
            if not looking:  # a 'running' sooner than the wait asked for is not honest: the wait counts
                remaining -= max(spent, args["wait"]) if state == "running" else spent
            remaining -= cpu(status) if served else 0.0
            if state == "done":
                return check_done(status, cell_id), False
            if state == "lost":
                raise SessionLost("the remote interpreter lost the rlmflow runtime")
            if state == "busy":
                if method != "start":
                    raise Malformed("a 'busy' status while the cell runs")
                raise Busy(cpu(status))
            if state == "calls":
                calls = valid_calls(status, cell_id, after=last_id, room=MAX_CALLS_IN_FLIGHT - len(pending))
                last_id = calls[-1][0]
                for call_id, fn, call_args in calls:
                    pending.add(call_id)
                    tg.start_soon(self._serve, send.clone(), call_id, fn, call_args)
            replies: dict[str, Any] = {}
            served = bool(pending) and remaining > 0
            if served:  # the cell waits for the host: no polling, but a look now and then
                with anyio.move_on_after(config.poll_wait):
                    call_id, reply = await receive.receive()
                    replies[str(call_id)] = reply
                    pending.discard(call_id)
            while True:
                try:
                    call_id, reply = receive.receive_nowait()
                except anyio.WouldBlock:
                    break
                replies[str(call_id)] = reply
                pending.discard(call_id)
            looking = served and not replies
            if remaining <= 0:
                return await self._interrupt(cell_id), True
            if replies:
                method, args = "resume", {"cell": cell_id, "replies": replies}
            else:
                method, args = "poll", {"cell": cell_id}

    async def _serve(self, send: Any, call_id: int, fn: str, args: dict[str, Any]) -> None:
        async with send:
            try:
                value = await self._bridge(fn, args)
                reply: dict[str, Any] = {"ok": True, "value": value}
            except RLMError as exc:
                reply = {"ok": False, "error": error_to_wire(exc)}
            except Exception as exc:  # a bug on the host side must still answer the waiting thread
                _logger.exception("host call failed", fn=fn)
                reply = {"ok": False, "error": {"type": "RLMError",
                                                "message": f"internal error in the host: {type(exc).__name__}"}}
            await send.send((call_id, reply))

    async def _interrupt(self, cell_id: int) -> dict[str, Any]:
        timeout = self._config.cell_timeout
        try:
            raw, _ = await self._cell_control("interrupt", {"cell": cell_id, "wait": self._config.interrupt_grace}, 0.0)
            status = check_status(raw, cell_id)
        except (Malformed, Stuck):
            status = {}
        if status.get("state") == "done":
            reply = check_done(status, cell_id)
            if reply.get("interrupted"):
                reply["error"] = (
                    f"TimeoutError: the cell ran past its {timeout:g} s limit and was interrupted. "
                    "Variables are kept. Work on smaller slices or use llm_query_many for slow steps."
                )
            return reply
        await self._restart()
        return {
            "error": f"TimeoutError: the cell ran past its {timeout:g} s limit and did not stop on interrupt "
            "(a C-level loop or sleep?); the session was replaced.",
            "restart": True,
        }


def _explain(operation: str, code: str, message: str, attempts: int) -> str:
    return explain(operation, code, message, attempts) + _HINTS.get(code, "")


@dataclass(frozen=True, slots=True)
class _Text:
    """A text from the remote side, its true length, its bound and how to cut it to that bound."""

    text: str | None
    total: int
    limit: int
    cutter: Callable[[str, int, int], str]

    @classmethod
    def of(cls, reply: dict[str, Any], key: str, limit: int, cutter: Callable[[str, int, int], str]) -> _Text:
        text = reply.get(key)
        text = text if isinstance(text, str) else None
        total = reply.get(f"{key}_chars")
        return cls(text, total if type(total) is int else len(text or ""), limit, cutter)

    def shown(self) -> str | None:
        """Cut before it is sanitised (the work is bounded whatever was sent), cut again if
        escaping control characters made it longer; the note keeps the true length."""
        if self.text is None:
            return None
        shown = sanitize_text(self.cutter(self.text, self.limit, self.total))
        return shown if len(shown) <= self.limit else self.cutter(shown, self.limit, self.total)


def _sanitize_all(texts: tuple[_Text, ...]) -> tuple[str | None, ...]:
    return tuple(text.shown() for text in texts)


# -- the --sandbox string of the command line ----------------------------------------------------------
def parse_sandbox_string(spec: str) -> tuple[str, str | None, str | None]:
    """Split a ``--sandbox`` string into (kind, identifier, region); :class:`ConfigurationError` if malformed.

    ``local`` is the local worker process; ``agentcore[:IDENTIFIER][@REGION]`` the AgentCore Code
    Interpreter (identifier default :data:`DEFAULT_IDENTIFIER`, region default the AWS chain's).
    The grammar is :mod:`rlmflow._sandbox_string`'s, which the policy file's ``[sandbox]`` shares.
    """
    try:
        return split_sandbox_string(spec)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def sandbox_from_string(spec: str, *, cell_timeout: float = 120.0, isolation: Isolation = "auto") -> Sandbox:
    """The sandbox a ``--sandbox`` string names (``isolation`` applies to the local one only).

    The AgentCore sandbox finds its credentials, and without ``@REGION`` its region, through the
    standard AWS chain; botocore's ``AWS_ENDPOINT_URL_BEDROCK_AGENTCORE`` points it at another
    endpoint (a local fake), as ``AWS_ENDPOINT_URL_BEDROCK_RUNTIME`` does Bedrock models.
    """
    kind, identifier, region = parse_sandbox_string(spec)
    if kind == "local":
        from .local import LocalSandbox

        return LocalSandbox(cell_timeout=cell_timeout, isolation=isolation)
    return AgentCoreSandbox(identifier=identifier or DEFAULT_IDENTIFIER, region_name=region, cell_timeout=cell_timeout)
