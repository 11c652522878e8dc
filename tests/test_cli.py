"""The command line: answers, bad input and exit codes (scripted models, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlmflow import cli


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"\x00\x01binary", "looks binary")],
)
def test_unusable_files_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes,
                               message: str) -> None:
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    code, _, err = run(capsys, "run", "--context", str(path), "--query", "q")
    assert code == 3 and message in err


def test_missing_file_and_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "run", "--context", str(tmp_path / "nope.txt"), "--query", "q")
    assert code == 3 and "no such file" in err
    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    code, _, err = run(capsys, "run", "--context", str(doc), "--query", "q", "--root", "nosuch:model")
    assert code == 2 and "unknown provider" in err


def test_non_utf8_is_decoded_with_a_warning(tmp_path: Path) -> None:
    from rlmflow import load_context_files

    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    loaded = load_context_files([path, path])
    assert isinstance(loaded.context, dict) and list(loaded.context) == ["latin1.txt", "latin1.txt#2"]
    assert "not valid UTF-8" in loaded.warnings[0] and "\ufffd" in loaded.context["latin1.txt"]


@pytest.mark.anyio
async def test_cli_answers_over_the_wire_and_exports_otlp(tmp_path: Path) -> None:
    """The installed command against a fake OpenAI server, exporting spans to a fake OTLP collector."""
    import os
    import sys

    import anyio
    from aiohttp import web

    from .fakes import FakeOpenAIServer

    received: list[bytes] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=200, content_type="application/x-protobuf", body=b"")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    app.router.add_post("/v1/metrics", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    collector = f"http://127.0.0.1:{runner.addresses[0][1]}"
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta " * 1000)
    trajectory = tmp_path / "run.jsonl"
    reply = "```repl\nFINAL(str(context.count('beta')))\n```"
    try:
        async with FakeOpenAIServer(root_marker="COUNT-BETA", root_reply=reply) as server:
            env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": collector, "OTEL_SERVICE_NAME": "rlmflow-test"}
            done = await anyio.run_process(
                [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(doc), "--query", "COUNT-BETA please",
                 "--root", f"openai:fake@{server.base_url}", "--trajectory", str(trajectory), "-v"],
                env=env, check=False,
            )
    finally:
        await runner.cleanup()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "1000"
    assert "sandbox: " in done.stderr.decode()  # -v reports the isolation that held
    assert any(b"invoke_agent rlm" in body for body in received)  # spans arrived as OTLP protobuf
    assert any(b"gen_ai.client.token.usage" in body for body in received)  # and metrics
    assert trajectory.read_text().count('"type": "run_end"') == 1


async def _cli_against(server_kwargs: dict[str, object], tmp_path: Path, *args: str,
                       interrupt_when: str | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``python -m rlmflow.cli run`` with the fake OpenAI server as its root model; the exit code and
    stderr. ``interrupt_when``: send SIGINT once a progress line on stderr contains this text;
    ``env``: variables added to the command's environment."""
    import os
    import signal
    import subprocess
    import sys

    import anyio

    from .fakes import FakeOpenAIServer

    doc = tmp_path / "doc.txt"
    doc.write_text("alpha beta " * 100)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no account of the caller's
    async with FakeOpenAIServer(root_marker="EXIT-CODE", **server_kwargs) as server:  # type: ignore[arg-type]
        command = [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(doc), "--query", "EXIT-CODE?",
                   "--root", f"openai:fake@{server.base_url}", *args]
        environment = {**inherited, **(env or {})}
        async with await anyio.open_process(command, stdout=subprocess.DEVNULL, env=environment) as process:
            assert process.stderr is not None
            err = b""
            with anyio.fail_after(120):  # a safety net: each run ends in seconds
                async for chunk in process.stderr:
                    err += chunk
                    if interrupt_when is not None and interrupt_when.encode() in err:
                        process.send_signal(signal.SIGINT)
                        interrupt_when = None
                code = await process.wait()
    return code, err.decode()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("server", "args", "expected", "message"),
    [
        ({"root_reply": "I will not write code."}, ("--max-turns", "2"), 1, "NoAnswerError"),
        ({"root_reply": "```repl\nprint(len(llm_query_many(['a', 'b', 'c'])))\n```"}, ("--max-calls", "2"), 4,
         "BudgetExceededError"),
        ({"status_faults": {400: 1.0}}, (), 5, "injected 400"),
    ],
    ids=["1-no-answer", "4-budget", "5-model"],
)
async def test_run_exit_codes_as_documented(tmp_path: Path, server: dict[str, object], args: tuple[str, ...],
                                            expected: int, message: str) -> None:
    code, err = await _cli_against(server, tmp_path, *args)
    assert code == expected, err
    assert message in err


@pytest.mark.anyio
async def test_run_interrupted_in_a_cell_exits_130(tmp_path: Path) -> None:
    reply = "```repl\nimport time\ntime.sleep(60)\n```"
    code, err = await _cli_against({"root_reply": reply}, tmp_path, interrupt_when="| running code |")
    assert code == 130, err
    assert "interrupted" in err


@pytest.mark.anyio
async def test_run_exits_6_when_no_sandbox_can_run(tmp_path: Path) -> None:
    """Exit code 6 (sandbox failure): the AgentCore Code Interpreter refuses to start a session
    (a local fake of its data plane, found through botocore's standard endpoint variable)."""
    from .fakes.fake_agentcore import FakeAgentCoreServer

    async with FakeAgentCoreServer() as agentcore:
        agentcore.fail["StartCodeInterpreterSession"] = ["AccessDeniedException"]
        env = {"AWS_ACCESS_KEY_ID": agentcore.credentials.access_key,
               "AWS_SECRET_ACCESS_KEY": agentcore.credentials.secret_key, "AWS_REGION": agentcore.region,
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL_BEDROCK_AGENTCORE": agentcore.endpoint_url}
        code, err = await _cli_against({"root_reply": "```repl\nFINAL('never')\n```"}, tmp_path,
                                       "--sandbox", "agentcore@us-east-1", env=env)
        starts = [r for r in agentcore.requests if r.operation == "StartCodeInterpreterSession"]
    assert code == 6, err
    assert "SandboxError" in err and "AccessDeniedException" in err
    assert len(starts) == 1 and agentcore.live_sessions == []  # refused once, not retried; nothing left
