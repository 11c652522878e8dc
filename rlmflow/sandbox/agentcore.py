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

Everything the remote side prints is untrusted: bounded before it is decoded, validated in shape,
and never used to build a URL, a path, a credential or a client.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .._exceptions import RLMError, SandboxError, SandboxProtocolError
from .._text import sanitize_text
from .._util import single_exception
from ..dispatch.retry import RetryPolicy
from ..telemetry.logs import get_logger
from .agentcore_protocol import (
    MARKER,
    MAX_CALLS_PER_STATUS,
    Malformed,
    SessionLost,
    capped,
    check_done,
    cut,
    explain,
    number,
    parse_status,
    pieces,
    read_result,
    sha256,
    short,
    valid_calls,
)
from .base import Bridge, CellResult, Context, SandboxReport
from .local import error_to_wire

__all__ = ["DEFAULT_IDENTIFIER", "AgentCoreSandbox", "AgentCoreSandboxSession"]

DEFAULT_IDENTIFIER = "aws.codeinterpreter.v1"
_REMOTE_MODULES = (  # (module name in the remote interpreter, source file); the runtime's imports first
    ("_rlmflow_cellapi", Path(__file__).with_name("cellapi.py")),
    ("_rlmflow_helpers", Path(__file__).with_name("helpers_prelude.py")),
    ("_rlmflow_runtime", Path(__file__).with_name("agentcore_runtime.py")),
)
_SESSION_ID = re.compile(r"[0-9a-zA-Z]{1,40}")
_ENVELOPE = 2048  # room for the JSON around a request's payload
_LOST = ("ResourceNotFoundException",)
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
    - ``poll_wait``: the longest a control call waits in the remote session for an event;
    - ``max_request_bytes``: the largest request body sent (aiohttp warns past 1 MiB); the
      context goes in ``writeFiles`` chunks of this size, and a control call whose arguments
      (the cell's code, the answers) would not fit has them written to files first;
    - ``max_response_chars``: the most text the host reads from one call's event stream;
    - ``max_request_chars``: the largest host request the remote runtime sends (checked there);
    - ``retry``: backoff for throttled API calls; ``sleep``: how to wait (tests inject one);
    - ``client_config``: a ``botocore.config.Config`` merged over the defaults;
    - ``start_timeout`` / ``stop_timeout``: bounds of the (shielded) start and stop calls.
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
        poll_wait: float = 2.0,
        max_request_bytes: int = 1_000_000,
        max_response_chars: int = 64 << 20,
        max_request_chars: int = 32 << 20,
        retry: RetryPolicy | None = None,
        sleep: Sleep | None = None,
        client_config: Config | None = None,
        stop_timeout: float = 10.0,
        start_timeout: float = 60.0,
    ) -> None:
        if not 1 <= session_timeout <= 28800:
            raise ValueError("session_timeout must be between 1 and 28800 seconds")
        if cell_timeout <= 0 or interrupt_grace < 0 or poll_wait <= 0:
            raise ValueError("cell_timeout and poll_wait must be > 0, interrupt_grace >= 0")
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
        self.poll_wait = poll_wait
        self.max_request_bytes = max_request_bytes
        self.max_response_chars = max_response_chars
        self.max_request_chars = max_request_chars
        self.retry = retry or RetryPolicy(max_attempts=5, base_delay=0.2, max_delay=5.0)
        self.sleep: Sleep = sleep or anyio.sleep
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        # botocore's own retries off: throttles are retried here, where a test can inject the sleep
        config = Config(retries={"total_max_attempts": 1}, read_timeout=max(60.0, 4 * poll_wait), connect_timeout=10)
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
                if code == "ThrottlingException" and attempt < self._config.retry.max_attempts:
                    await self._config.sleep(self._config.retry.delay(attempt))
                    continue
                if code in _LOST and self._session_id is not None:
                    raise SessionLost(f"{code}: {message}") from exc
                raise SandboxError(explain(operation, code, message, attempt)) from exc
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
            except ClientError as exc:  # an exception event inside the stream
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code.lower() == "throttlingexception" and attempt < self._config.retry.max_attempts:
                    await self._config.sleep(self._config.retry.delay(attempt))
                    continue
                if code.lower() == "resourcenotfoundexception":
                    raise SessionLost(code) from exc
                raise SandboxError(explain(tool, code, str(exc)[:500], attempt)) from exc
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
            response = await self._api(
                "start_code_interpreter_session", codeInterpreterIdentifier=self._config.identifier,
                name=f"rlmflow-{uuid.uuid4().hex[:12]}", sessionTimeoutSeconds=self._config.session_timeout,
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
            await anyio.lowlevel.checkpoint()  # a cancellation that came during the start lands here
            paths = await self._write_parts("context", self._context_text)
            config = {
                "context_paths": paths, "context_kind": self._context_kind,
                "max_output_chars": self._config.max_output_chars,
                "max_request_chars": self._config.max_request_chars,
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
            status = await self._control("boot", config, prefix=install)
            if status.get("state") != "ready":
                raise SandboxError(f"the remote session did not load the context: {short(status)}")
            if status.get("chars") != len(self._context_text) or status.get("sha256") != self._context_sha:
                raise SandboxError("the context read back in the remote session differs from the one written")
            self.load_seconds = anyio.current_time() - started
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._stop()
            raise

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
    async def _control(self, method: str, args: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
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
        result = await self._invoke("executeCode", {"code": code, "language": "python", "clearContext": False})
        return parse_status(result, self._config.max_response_chars)

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
            self._cell_ids += 1
            try:
                reply, timed_out = await self._run_cell(self._cell_ids, code)
            except (SessionLost, Malformed) as exc:
                # Not run again: the cell itself may be what ended the session (os._exit, memory).
                reason = "the remote session ended" if isinstance(exc, SessionLost) else "a malformed response"
                _logger.warning("AgentCore cell failed", reason=str(exc)[:200])
                await self._restart()
                reply, timed_out = {"error": f"SandboxCrash: {reason} ({str(exc)[:300]}) while running this cell.",
                                    "restart": True}, False
            restarted = bool(reply.get("restart"))
            if restarted:
                notes.append(
                    "The sandbox session was replaced: ALL VARIABLES WERE LOST. `context` is loaded again; "
                    "recompute what you need."
                )
            output, output_chars = capped(reply.get("output"), reply.get("output_chars"),
                                           self._config.max_output_chars)
            error, final = reply.get("error"), reply.get("final")
            # remote text goes to the root model, logs and terminals: shown, never obeyed (as locally)
            return CellResult(
                output=sanitize_text(output),
                output_chars=output_chars,
                error=sanitize_text(cut(error, max(20_000, 4 * self._config.max_output_chars)))
                if isinstance(error, str) else None,
                final=sanitize_text(final) if isinstance(final, str) else None,
                duration=number(reply.get("duration")),
                timed_out=timed_out,
                restarted=restarted or bool(notes),
                notes=tuple(notes),
            )

    async def _run_cell(self, cell_id: int, code: str) -> tuple[dict[str, Any], bool]:
        send, receive = anyio.create_memory_object_stream[tuple[int, dict[str, Any]]](MAX_CALLS_PER_STATUS * 4)
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
        """Start the cell, serve its host calls, poll while it computes; (result, timed out)."""
        config = self._config
        remaining = config.cell_timeout
        in_flight = 0
        method = "start"
        args: dict[str, Any] = {"cell": cell_id, "code": code}
        while True:
            args["wait"] = min(config.poll_wait, max(remaining, 0.0))
            started = anyio.current_time()
            status = await self._control(method, args)
            remaining -= anyio.current_time() - started  # compute time: the remote ran during the call
            state = status.get("state")
            if state == "done":
                return check_done(status, cell_id), False
            if state == "lost":
                raise SessionLost("the remote interpreter lost the rlmflow runtime")
            if state == "calls":
                for call_id, fn, call_args in valid_calls(status, cell_id):
                    in_flight += 1
                    tg.start_soon(self._serve, send.clone(), call_id, fn, call_args)
            elif state != "running" or status.get("cell") != cell_id:
                raise Malformed(f"unexpected status {short(status)}")
            replies: dict[str, Any] = {}
            if in_flight and remaining > 0:
                call_id, reply = await receive.receive()  # the cell waits for the host: no polling
                replies[str(call_id)] = reply
            while True:
                try:
                    call_id, reply = receive.receive_nowait()
                except anyio.WouldBlock:
                    break
                replies[str(call_id)] = reply
            in_flight -= len(replies)
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
        status = await self._control("interrupt", {"cell": cell_id, "wait": self._config.interrupt_grace})
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
