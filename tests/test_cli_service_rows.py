"""Issue 20's command-line and provider rows: a hosted endpoint without its key fails at once, the
seed's stack (Strands root + AgentCore + Bedrock) from the command line, the CLI's messages."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from rlmflow import RLM, AnthropicModel, ConfigurationError, OpenAIModel
from rlmflow.models import guard

from .fakes.fake_agentcore import FakeAgentCoreServer
from .fakes.fake_bedrock import FakeBedrockServer
from .helpers import turn_script

KEYS = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in KEYS:
        monkeypatch.delenv(name, raising=False)


# -- a hosted endpoint without its key ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("root", "variable"),
    [("openai:gpt-4o-mini", "OPENAI_API_KEY"), ("anthropic:claude-sonnet-4-5", "ANTHROPIC_API_KEY"),
     ("openai:meta-llama/llama-3.1-8b@https://openrouter.ai/api/v1", "OPENAI_API_KEY")],
)
def test_a_hosted_endpoint_without_its_key_is_refused_at_once(no_keys: None, root: str, variable: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    loopback_only = guard._request_check

    def record(url: str) -> None:  # the hook every model request passes before it is sent
        asked.append(url)
        if loopback_only is not None:
            loopback_only(url)

    monkeypatch.setattr(guard, "_request_check", record)
    rlm = RLM(root=root)
    started = time.monotonic()
    with pytest.raises(ConfigurationError, match=variable):
        rlm.check("a document", "a question?")
    assert asked == []  # no request
    assert time.monotonic() - started < 10.0  # no retries' backoff (generous: a loaded machine is slow)


@pytest.mark.anyio
async def test_run_refuses_a_hosted_sub_model_without_its_key_before_any_turn(no_keys: None) -> None:
    root = turn_script(["FINAL('never')"])
    async with RLM(root=root, sub="anthropic:claude-haiku-4-5") as rlm:
        with pytest.raises(ConfigurationError, match="ANTHROPIC_API_KEY"):
            await rlm.run("a document", "a question?")
    assert root.requests == []  # type: ignore[attr-defined]


def test_keys_from_the_environment_or_arguments_satisfy_the_check(no_keys: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    OpenAIModel("gpt-4o-mini", api_key="sk-test").check_ready()
    AnthropicModel("claude-sonnet-4-5", api_key="sk-ant-test").check_ready()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-env")
    OpenAIModel("gpt-4o-mini").check_ready()
    AnthropicModel("claude-sonnet-4-5").check_ready()


@pytest.mark.parametrize("base_url", [
    "http://127.0.0.1:8000/v1", "http://localhost:11434/v1", "http://[::1]:8080/v1",
    "https://vllm.internal.example.com/v1",  # a self-hosted server behind TLS
])
def test_local_and_self_hosted_servers_need_no_key(no_keys: None, monkeypatch: pytest.MonkeyPatch,
                                                   base_url: str) -> None:
    OpenAIModel("my-model", base_url=base_url).check_ready()
    AnthropicModel("claude-sonnet-4-5", base_url=base_url).check_ready()
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)  # the base URL from the environment
    monkeypatch.setenv("ANTHROPIC_BASE_URL", base_url)
    OpenAIModel("qwen2.5").check_ready()
    AnthropicModel("claude-sonnet-4-5").check_ready()
    RLM(root="openai:qwen2.5", sub="anthropic:claude-haiku-4-5").check("a document", "a question?")


def test_the_cli_says_which_variable_to_set(no_keys: None, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from rlmflow import cli

    doc = tmp_path / "doc.txt"
    doc.write_text("hello")
    started = time.monotonic()
    code = cli.main(["run", "--context", str(doc), "--query", "q?", "--root", "openai:gpt-4o-mini"])
    err = capsys.readouterr().err
    assert code == 2 and "OPENAI_API_KEY" in err and "ConfigurationError" in err, err
    assert time.monotonic() - started < 5.0


# -- the seed's stack from the command line ------------------------------------------------------------
CLAUDE = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
HAIKU = "us.anthropic.claude-haiku-4-5-20251001-v1:0"
CELLS = [
    "parts = [p for p in context.split('=== ') if p.strip()]\nprint(len(parts))",
    "values = llm_query_many(['Revenue of: ' + p for p in parts])\nprint(values)",
    "FINAL('total=' + str(sum(int(v) for v in values)))",
]


def _tool_root(body: dict[str, Any]) -> dict[str, Any]:
    turn = sum(1 for m in body["messages"] for block in m["content"] if "toolResult" in block)
    return {"name": "execute_python", "input": {"code": CELLS[min(turn, len(CELLS) - 1)]}}


def _revenue(prompt: str) -> str:
    import re

    found = re.search(r"Revenue: (\d+) units", prompt)
    return found.group(1) if found else "0"


def _reports() -> tuple[str, int]:
    values = [120, 75, 310, 42]
    return "".join(f"=== report {i}\nRevenue: {v} units\n" for i, v in enumerate(values)), sum(values)


async def _stack_cli(tmp_path: Path, command: list[str]) -> tuple[anyio.abc.Process | Any, FakeAgentCoreServer,
                                                                 FakeBedrockServer]:
    """Run the CLI in a subprocess with the whole stack pointed at local fakes by botocore's variables."""
    async with FakeBedrockServer() as bedrock:
        bedrock.tool_reply, bedrock.reply = _tool_root, _revenue
        async with FakeAgentCoreServer(access_key=bedrock.access_key, secret_key=bedrock.secret_key) as agentcore:
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(bedrock.credentials_env())
            env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"] = bedrock.base_url
            env["AWS_ENDPOINT_URL_BEDROCK_AGENTCORE"] = agentcore.endpoint_url
            done = await anyio.run_process([sys.executable, "-m", "rlmflow.cli", *command], env=env, check=False,
                                           cwd=tmp_path)
    return done, agentcore, bedrock


@pytest.mark.anyio
async def test_rlmflow_run_drives_strands_agentcore_and_bedrock(tmp_path: Path) -> None:
    document, total = _reports()
    (tmp_path / "reports.txt").write_text(document)
    done, agentcore, bedrock = await _stack_cli(tmp_path, [
        "run", "--sandbox", "agentcore@us-east-1", "--context", "reports.txt", "--query", "Total revenue?",
        "--root", f"strands:bedrock:{CLAUDE}@us-east-1", "--sub", f"bedrock:{HAIKU}@us-east-1",
    ])
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == f"total={total}"
    # the cells ran in the AgentCore fake's sessions, not in a local worker; every request signed
    operations = {r.operation for r in agentcore.requests}
    assert {"StartCodeInterpreterSession", "InvokeCodeInterpreter", "StopCodeInterpreterSession"} <= operations
    assert "llm_query_many" in json.dumps([r.arguments for r in agentcore.requests])
    assert agentcore.rejected_signatures == 0 and bedrock.bad_signatures == 0
    assert len([b for b in bedrock.requests_seen if "toolConfig" in b]) == 3  # the Strands root's turns


@pytest.mark.anyio
async def test_rlmflow_batch_and_eval_take_the_sandbox_too(tmp_path: Path) -> None:
    document, total = _reports()
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "query": "Total revenue?", "context": document}))
    done, agentcore, _ = await _stack_cli(tmp_path, [
        "batch", "--sandbox", "agentcore:aws.codeinterpreter.v1@us-east-1", "--input", "items.jsonl",
        "--root", f"strands:bedrock:{CLAUDE}@us-east-1", "--sub", f"bedrock:{HAIKU}@us-east-1",
    ])
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout.decode())["answer"] == f"total={total}"
    assert any(r.operation == "InvokeCodeInterpreter" for r in agentcore.requests)

    (tmp_path / "eval.jsonl").write_text(json.dumps({"id": "e1", "question": "Total revenue?", "context": document,
                                                     "answer": str(total)}))
    done, agentcore, _ = await _stack_cli(tmp_path, [
        "eval", "--sandbox", "agentcore@us-east-1", "--dataset", "eval.jsonl", "--approach", "rlm",
        "--root", f"strands:bedrock:{CLAUDE}@us-east-1", "--sub", f"bedrock:{HAIKU}@us-east-1",
        "--results", "results.jsonl",
    ])
    assert done.returncode == 0, done.stderr.decode()
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert row["correct"] and row["answer"] == str(total), row  # the scorer keeps the number
    assert row["model"] == f"{CLAUDE} + {HAIKU}"  # named as base's rows name the model under the Agent
    assert any(r.operation == "InvokeCodeInterpreter" for r in agentcore.requests)


@pytest.mark.anyio
async def test_the_policy_files_sandbox_runs_the_stack_and_the_flag_overrides_it(tmp_path: Path) -> None:
    """``[sandbox]`` in the policy file chooses AgentCore as ``--sandbox`` would; ``--sandbox local``
    given as well wins, and the AgentCore endpoint then sees nothing."""
    document, total = _reports()
    (tmp_path / "reports.txt").write_text(document)
    (tmp_path / "policy.toml").write_text('[sandbox]\nkind = "agentcore"\nregion = "us-east-1"\n')
    command = ["run", "--policy", "policy.toml", "--context", "reports.txt", "--query", "Total revenue?",
               "--root", f"strands:bedrock:{CLAUDE}@us-east-1", "--sub", f"bedrock:{HAIKU}@us-east-1"]
    done, agentcore, _ = await _stack_cli(tmp_path, command)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == f"total={total}"
    operations = {r.operation for r in agentcore.requests}
    assert {"StartCodeInterpreterSession", "InvokeCodeInterpreter", "StopCodeInterpreterSession"} <= operations
    done, agentcore, _ = await _stack_cli(tmp_path, [*command, "--sandbox", "local"])
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == f"total={total}"
    assert agentcore.requests == []  # the cells ran in a local worker


@pytest.mark.parametrize(("spec", "expected"), [
    ("local", ("local", None, None)),
    ("agentcore", ("agentcore", None, None)),
    ("agentcore@eu-west-1", ("agentcore", None, "eu-west-1")),
    ("agentcore:my_interp-0a1B2c", ("agentcore", "my_interp-0a1B2c", None)),
    ("agentcore:aws.codeinterpreter.v1@us-gov-west-1", ("agentcore", "aws.codeinterpreter.v1", "us-gov-west-1")),
])
def test_sandbox_strings(spec: str, expected: tuple[str, str | None, str | None]) -> None:
    from rlmflow.sandbox.agentcore import AgentCoreSandbox, parse_sandbox_string, sandbox_from_string

    assert parse_sandbox_string(spec) == expected
    built = sandbox_from_string(spec, cell_timeout=30)
    if expected[0] == "agentcore":
        assert isinstance(built, AgentCoreSandbox) and built.region_name == expected[2]
        assert built.identifier == (expected[1] or "aws.codeinterpreter.v1") and built.cell_timeout == 30


@pytest.mark.parametrize("command", ["run", "batch", "eval"])
@pytest.mark.parametrize("spec", ["docker", "agentcore:", "agentcore@moon", "local:strict"])
def test_a_bad_sandbox_string_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
                                               spec: str) -> None:
    from rlmflow import cli

    rest = {"run": ["--context", "x", "--query", "q"], "batch": ["--input", "x"], "eval": ["--dataset", "x"]}[command]
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--sandbox", spec, *rest])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --sandbox" in err and "agentcore[:IDENTIFIER][@REGION]" not in err and "use one of" in err, err


# -- the command line's messages -----------------------------------------------------------------------
class _Lines:
    """A stream the CLI's plain status lines go to, read by the test while the run goes on."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@pytest.mark.anyio
async def test_the_status_line_counts_answered_calls_out_of_flight(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`rlmflow run` over a 26-call batch of which 9 answered says 17 in flight, not 26."""
    from aiohttp import web

    from rlmflow import cli

    release = anyio.Event()
    fan_out = "```repl\nprint(len(llm_query_many([f'item {i}' for i in range(26)])))\n```"

    async def completions(request: web.Request) -> web.Response:
        body = await request.json()
        messages = body["messages"]
        if messages[0]["role"] == "system":  # the root: fan out, then answer
            turn = sum(m["role"] == "assistant" for m in messages)
            text = fan_out if turn == 0 else "```repl\nFINAL('done')\n```"
        else:
            index = int(messages[-1]["content"].split()[-1])
            if index >= 9:
                await release.wait()
            text = str(index)
        return web.json_response({"model": body["model"], "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}],
                                  "usage": {"prompt_tokens": 5, "completion_tokens": 1}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    doc = tmp_path / "doc.txt"
    doc.write_text("a document")
    lines = _Lines()
    monkeypatch.setattr(sys, "stderr", lines)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        async with anyio.create_task_group() as tg:
            codes: list[int] = []

            async def run() -> None:
                codes.append(await anyio.to_thread.run_sync(cli.main, [
                    "run", "--context", str(doc), "--query", "q?", "--root", f"openai:root@{url}",
                    "--sub", f"openai:sub@{url}"]))

            tg.start_soon(run)
            with anyio.fail_after(30):
                while "sub-calls 9 done" not in lines.text:  # noqa: ASYNC110 (the CLI's own output)
                    await anyio.sleep(0.02)
            await anyio.sleep(0.6)  # more redraws: nothing else lands while the 17 wait
            release.set()
    finally:
        await runner.cleanup()
    assert codes == [0], lines.text
    nine = [line for line in lines.text.splitlines() if "sub-calls 9 done" in line]
    assert nine and all("9 done, 17 in flight" in line for line in nine), lines.text
    assert "26 done, 0 in flight" in lines.text


@pytest.mark.parametrize(("spec", "says"), [
    ("openai:", "names no model after 'openai:'"),
    ("anthropic:", "names no model after 'anthropic:'"),
    ("bedrock:", "names no model after 'bedrock:'"),
    ("nosuch:", "unknown provider 'nosuch'"),
])
def test_an_empty_model_name_says_so(spec: str, says: str) -> None:
    from rlmflow import UnknownModelError
    from rlmflow.models.registry import parse_model_string

    with pytest.raises(UnknownModelError) as raised:
        parse_model_string(spec)
    assert says in str(raised.value) and "provider prefix" not in str(raised.value)


def test_eval_generate_without_a_corpus_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """As installed from a wheel: no examples/ directory where it runs."""
    from rlmflow import cli

    monkeypatch.chdir(tmp_path)
    code = cli.main(["eval", "generate", "--kinds", "needle", "--sizes", "100KB", "--out", "tasks"])
    err = capsys.readouterr().err
    assert code == 2 and "--corpus" in err and "Traceback" not in err, err
    code = cli.main(["eval", "generate", "--kinds", "needle", "--corpus", "missing.txt", "--out", "tasks"])
    err = capsys.readouterr().err
    assert code == 2 and "missing.txt" in err, err
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} of some filler text, long enough to fill." for i in range(60)))
    code = cli.main(["eval", "generate", "--kinds", "needle", "--sizes", "100KB", "--corpus", str(corpus),
                     "--out", "tasks"])
    assert code == 0 and (tmp_path / "tasks" / "tasks.jsonl").is_file()


def test_batch_refuses_duplicate_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rlmflow import cli

    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(row) for row in [
        {"id": "a", "query": "q1", "context": "x"}, {"id": "b", "query": "q2", "context": "x"},
        {"id": "a", "query": "q3", "context": "x"},
    ]))
    code = cli.main(["batch", "--input", str(items), "--root", "openai:fake@http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert code == 2 and "duplicate id 'a'" in err and ":3:" in err and "line 1" in err, err
    items.write_text(json.dumps({"query": "q1", "context": "x"}) + "\n" + json.dumps({"id": "1", "query": "q2",
                                                                                       "context": "x"}))
    code = cli.main(["batch", "--input", str(items), "--root", "openai:fake@http://127.0.0.1:9/v1"])
    assert code == 2 and "duplicate id '1'" in capsys.readouterr().err
