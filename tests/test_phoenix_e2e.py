"""A run exported by the CLI into a real Arize Phoenix server, read back over Phoenix's REST API.

Phoenix lives in its own virtual environment (``scripts/setup/test-phoenix.sh`` installs it);
the test starts ``phoenix serve`` on ports of 127.0.0.1 that the kernel picks (its HTTP port read
from its log), with its working directory in a temporary directory, and stops it. The model is
the fake OpenAI-compatible server, so the run is deterministic and nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from .fakes import FakeOpenAIServer

_CACHE = Path(os.environ.get("RLMFLOW_CACHE_DIR") or Path.home() / ".cache" / "rlmflow")
PHOENIX_VENV = Path(os.environ.get("RLMFLOW_PHOENIX_VENV") or _CACHE / "venv-phoenix")
PHOENIX = PHOENIX_VENV / "bin" / "phoenix"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        not PHOENIX.exists(), reason=f"Phoenix is not installed in {PHOENIX_VENV}: run scripts/setup/test-phoenix.sh"
    ),
]

ROOT_REPLY = """I will split the document in two and ask a helper about each half.
```repl
half = len(context) // 2
answers = llm_query_many(['Summarise in five words: ' + part[:300] for part in (context[:half], context[half:])])
print(answers)
FINAL('two halves: ' + ' | '.join(answers))
```"""
QUERY = "HALVES: what do the two halves of the report say?"
SUB_MODEL = "acme-mini"  # a model Phoenix has no price for until the docs' custom-price recipe adds one
PRICES = {"input": 50.0, "output": 150.0}  # USD per million tokens


_LISTENING = re.compile(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)")


def phoenix_environment(working_dir: Path) -> dict[str, str]:
    """The environment of a private Phoenix on 127.0.0.1 that makes no request of its own outside.

    Its ports are the kernel's choice (port 0: the server binds and the kernel picks a free port),
    never one checked free beforehand and taken in between; the HTTP port is read from the
    server's log (:func:`listening_url`), the gRPC one is not used.
    """
    return {
        **os.environ,
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": "0",
        "PHOENIX_GRPC_PORT": "0",
        "PHOENIX_WORKING_DIR": str(working_dir),
        "PHOENIX_TELEMETRY_ENABLED": "false",
        "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false",
    }


def listening_url(log: bytes) -> str | None:
    """The URL Phoenix's HTTP server listens on, once its log says (uvicorn names the bound port)."""
    found = _LISTENING.search(log)
    return f"http://127.0.0.1:{int(found.group(1))}" if found else None


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A running Phoenix: (base URL, its log file)."""
    home = tmp_path_factory.mktemp("phoenix")
    env = phoenix_environment(home / "data")
    log = home / "phoenix.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(PHOENIX), "serve"], cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240  # a cold start migrates its database: tens of seconds on 2 cores
        url = None
        while True:
            if process.poll() is not None:
                pytest.fail(f"phoenix serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            url = url or listening_url(log.read_bytes())
            try:
                if url is not None and httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"phoenix serve did not answer within 240 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)  # polling a real server's start-up, not waiting for a fixed time
        assert url is not None
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_port_is_read_from_the_servers_log() -> None:
    log = b"INFO:     Application startup complete.\nINFO:     Uvicorn running on http://127.0.0.1:46779 (Press CTRL+C"
    assert listening_url(log) == "http://127.0.0.1:46779"
    assert listening_url(b"Web UI              http://127.0.0.1:0\n") is None  # Phoenix's banner names port 0


def _spans(url: str, project: str, expected: int) -> list[dict[str, Any]]:
    """The project's spans once ``expected`` of them arrived (Phoenix ingests in the background)."""
    deadline = time.monotonic() + 60
    spans: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = httpx.get(f"{url}/v1/projects/{project}/spans", params={"limit": 1000}, timeout=10)
        if response.status_code == 200:
            spans = response.json()["data"]
            if len(spans) >= expected:
                return spans
        time.sleep(0.5)
    raise AssertionError(f"Phoenix holds {len(spans)} spans of {project}, expected {expected}")


def _graphql(url: str, query: str, **variables: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/graphql", json={"query": query, "variables": variables}, timeout=30)
    body: dict[str, Any] = response.json()
    assert not body.get("errors"), body["errors"]
    return body["data"]  # type: ignore[no-any-return]


def _project_id(url: str, name: str) -> str:
    projects = httpx.get(f"{url}/v1/projects", timeout=10).json()["data"]
    return next(str(p["id"]) for p in projects if p["name"] == name)


SPANS_QUERY = """query($id: ID!, $filter: String) { node(id: $id) { ... on Project {
  spans(first: 100, filterCondition: $filter) { edges { node { name costSummary { total { cost } } } } } } } }"""


def _filtered(url: str, project: str, condition: str) -> list[dict[str, Any]]:
    data = _graphql(url, SPANS_QUERY, id=_project_id(url, project), filter=condition)
    return [edge["node"] for edge in data["node"]["spans"]["edges"]]


def _add_custom_price(url: str) -> None:
    """The docs' recipe: a custom model price, then wait until Phoenix's price table has loaded it.

    Phoenix prices spans as they arrive, from a table it reloads every few seconds; probe spans
    (in a project of their own) show when the new price is in force.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    _graphql(url, """mutation($input: CreateModelMutationInput!) { createModel(input: $input) { model { id } } }""",
             input={"name": SUB_MODEL, "namePattern": f"^{SUB_MODEL}$", "provider": "openai", "costs": [
                 {"tokenType": "input", "costPerMillionTokens": PRICES["input"], "kind": "PROMPT"},
                 {"tokenType": "output", "costPerMillionTokens": PRICES["output"], "kind": "COMPLETION"},
             ]})
    provider = TracerProvider(resource=Resource.create({"openinference.project.name": "price-probe"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{url}/v1/traces")))
    tracer = provider.get_tracer("probe")
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            tracer.start_span("probe", attributes={
                "openinference.span.kind": "LLM", "llm.model_name": SUB_MODEL, "llm.provider": "openai",
                "llm.token_count.prompt": 1000, "llm.token_count.completion": 0,
            }).end()
            time.sleep(1)  # polling a real server's background reload
            try:
                if any(s["costSummary"]["total"]["cost"] for s in _filtered(url, "price-probe", "span_kind == 'LLM'")):
                    return
            except StopIteration:  # the probe project is not there yet
                continue
        raise AssertionError("Phoenix never priced the custom model")
    finally:
        provider.shutdown()


def _clean_otel_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_", "RLMFLOW_CAPTURE"))}


async def test_cli_run_lands_in_phoenix_as_a_readable_tree(phoenix: tuple[str, Path], tmp_path: Path) -> None:
    url, log = phoenix
    project = "rlmflow-e2e"
    await anyio.to_thread.run_sync(_add_custom_price, url)
    document = tmp_path / "report.txt"
    document.write_text("The quick brown fox jumps over the lazy dog. " * 30 + "Sales rose in the north. " * 30)
    async with FakeOpenAIServer(root_marker="HALVES", root_reply=ROOT_REPLY) as server:
        env = {
            **_clean_otel_environment(),
            # traces only: Phoenix takes no metrics, so none may be sent
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{url}/v1/traces",
            "PHOENIX_PROJECT_NAME": project,
            "RLMFLOW_CAPTURE_CONTENT": "4000",
        }
        done = await anyio.run_process(
            [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(document), "--query", QUERY,
             "--root", f"openai:gpt-4o-mini@{server.base_url}", "--sub", f"openai:{SUB_MODEL}@{server.base_url}"],
            env=env, check=False,
        )
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    answer = done.stdout.decode().strip()
    assert answer.startswith("two halves: answer:")
    assert "Traceback" not in stderr and "Failed to export" not in stderr and "Exception" not in stderr, stderr
    # Phoenix's side is read with blocking HTTP and subprocesses: off the event loop
    await anyio.to_thread.run_sync(_check_phoenix, url, log, project, answer, tmp_path)


def _check_phoenix(url: str, log: Path, project: str, answer: str, tmp_path: Path) -> None:
    spans = _spans(url, project, expected=7)
    assert len({s["context"]["trace_id"] for s in spans}) == 1  # one trace
    by_id = {s["context"]["span_id"]: s for s in spans}
    kinds = sorted((s["name"], s["span_kind"]) for s in spans)
    assert kinds == sorted([
        ("invoke_agent rlm", "AGENT"), ("rlm.turn", "CHAIN"), ("chat gpt-4o-mini", "LLM"),
        ("execute_code", "TOOL"), ("llm_query_many", "CHAIN"),
        (f"chat {SUB_MODEL}", "LLM"), (f"chat {SUB_MODEL}", "LLM"),
    ])

    def parent(span: dict[str, Any]) -> str | None:
        up = by_id.get(span["parent_id"] or "")
        return up["name"] if up else None

    (root,) = [s for s in spans if s["name"] == "invoke_agent rlm"]
    assert root["parent_id"] is None
    assert root["attributes"]["input.value"] == QUERY and root["attributes"]["output.value"] == answer
    (turn,) = [s for s in spans if s["name"] == "rlm.turn"]
    assert parent(turn) == "invoke_agent rlm"
    (cell,) = [s for s in spans if s["name"] == "execute_code"]
    assert parent(cell) == "rlm.turn"
    assert "llm_query_many(" in cell["attributes"]["input.value"]
    assert "llm_query_many(" in cell["attributes"]["tool.parameters.code"]  # Phoenix unfolds the JSON arguments
    assert "llm_query_many(" in json.loads(cell["attributes"]["gen_ai.tool.call.arguments"])["code"]
    assert "answer:" in cell["attributes"]["output.value"]  # what the cell printed
    (batch,) = [s for s in spans if s["name"] == "llm_query_many"]
    assert parent(batch) == "execute_code"

    chats = [s for s in spans if s["name"].startswith("chat ")]
    assert sorted(parent(c) or "" for c in chats) == ["llm_query_many", "llm_query_many", "rlm.turn"]
    for chat in chats:
        a = chat["attributes"]
        assert chat["name"] == f"chat {a['llm.model_name']}" and a["llm.provider"] == "openai"
        assert int(a["llm.token_count.prompt"]) > 0 and int(a["llm.token_count.completion"]) > 0
        assert a["llm.output_messages.0.message.role"] == "assistant"
        assert a["output.value"] == a["llm.output_messages.0.message.content"]
    (root_chat,) = [c for c in chats if parent(c) == "rlm.turn"]
    a = root_chat["attributes"]
    assert a["llm.input_messages.0.message.role"] == "system"
    assert a["llm.input_messages.1.message.role"] == "user" and QUERY in a["llm.input_messages.1.message.content"]
    assert a["llm.output_messages.0.message.content"] == ROOT_REPLY
    for chat in chats:
        if chat is not root_chat:
            assert chat["attributes"]["llm.input_messages.0.message.content"].startswith("Summarise in five words: ")

    # the docs' filters: Phoenix's condition syntax (== , and, in) over our attributes
    subs = _filtered(url, project, "rlm.call.role == 'sub'")
    assert [s["name"] for s in subs] == [f"chat {SUB_MODEL}"] * 2
    assert [s["name"] for s in _filtered(url, project, "span_kind == 'TOOL' and 'llm_query_many' in input.value")] \
        == ["execute_code"]
    assert [s["name"] for s in _filtered(url, project, "llm.token_count.total > 300")] == ["chat gpt-4o-mini"]
    assert _filtered(url, project, "rlm.depth >= 1") == []  # valid syntax; this run has no rlm_query child
    # the custom price applies to the sub-calls; Phoenix's own table prices the root model
    sub_tokens = [(int(c["attributes"]["llm.token_count.prompt"]), int(c["attributes"]["llm.token_count.completion"]))
                  for c in chats if c is not root_chat]
    expected = sorted((i * PRICES["input"] + o * PRICES["output"]) / 1e6 for i, o in sub_tokens)
    assert sorted(s["costSummary"]["total"]["cost"] for s in subs) == pytest.approx(expected)
    (priced_root,) = _filtered(url, project, "span_kind == 'LLM' and rlm.call.role == 'root'")
    assert priced_root["costSummary"]["total"]["cost"] > 0

    log_text = log.read_text(errors="replace")
    assert "POST /v1/traces" in log_text and "/v1/metrics" not in log_text  # no metrics sent anywhere

    # rlmflow trace reads the same run back, from Phoenix directly and from Phoenix's own export
    report = subprocess.run(
        [sys.executable, "-m", "rlmflow.cli", "trace", "--phoenix", url, "--project", project, "--json"],
        capture_output=True, text=True, timeout=120, env=_clean_otel_environment(),
    )
    assert report.returncode == 0, report.stderr
    totals = json.loads(report.stdout)["totals"]
    assert totals["runs"] == 1 and totals["calls"] == 3 and totals["sub_calls"] == 2
    missing = subprocess.run(
        [sys.executable, "-m", "rlmflow.cli", "trace", "--phoenix", url, "--project", "no-such-project"],
        capture_output=True, text=True, timeout=120, env=_clean_otel_environment(),
    )
    assert missing.returncode == 3 and "no-such-project" in missing.stderr and "Traceback" not in missing.stderr
    exported = httpx.get(f"{url}/v1/projects/{project}/spans/otlpv1", params={"limit": 1000}, timeout=10).json()
    assert "span_id" in exported["data"][0]  # Phoenix's own export is snake_case
    export_file = tmp_path / "phoenix-export.json"
    export_file.write_text(json.dumps(exported))
    from_file = subprocess.run(
        [sys.executable, "-m", "rlmflow.cli", "trace", str(export_file), "--json"],
        capture_output=True, text=True, timeout=120, env=_clean_otel_environment(),
    )
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["totals"] == totals
