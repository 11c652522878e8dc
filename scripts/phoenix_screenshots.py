"""Screenshots of the Phoenix UI for docs/tracing.md, made from a real run.

    scripts/setup/test-phoenix.sh                 # Phoenix in its own venv, and Debian's chromium
    .venv/bin/python scripts/phoenix_screenshots.py docs/img

Starts ``phoenix serve`` on free ports of 127.0.0.1 (working directory in a temporary directory,
no telemetry, no external resources), answers one question with ``rlmflow run`` against the fake
OpenAI-compatible provider (so the sub-calls' answers are the fake's ``answer:<hash>``) with
``--capture-content``, and has headless Chromium (resolving nothing but 127.0.0.1) photograph the
run's tree with the root span, the root model's call and the cell selected, and the trace list.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

# run as a script (sys.path[0] is scripts/): the repository root for the project's test doubles
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from tests.fakes import FakeOpenAIServer

CACHE = Path(os.environ.get("RLMFLOW_CACHE_DIR") or Path.home() / ".cache" / "rlmflow")
PHOENIX = Path(os.environ.get("RLMFLOW_PHOENIX_VENV") or CACHE / "venv-phoenix") / "bin" / "phoenix"
PROJECT = "rlmflow"
QUERY = "QUARTERLY: Which regions grew, and which one shrank?"
DOCUMENT = (
    "Quarterly report. North: revenue rose 12% on new contracts. South: revenue fell 4% after a plant closure. "
    * 6
    + "East: revenue rose 7%, led by services. West: flat, with costs down 3%. " * 6
)
ROOT_REPLY = """The report is short; I will ask a helper about each half and combine the answers.
```repl
half = len(context) // 2
halves = [context[:half], context[half:]]
answers = llm_query_many(['Which regions grew or shrank? ' + h[:400] for h in halves])
for name, answer in zip(['first half', 'second half'], answers):
    print(name, '->', answer)
FINAL('Regions: ' + '; '.join(answers))
```"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _shoot(url: str, out: Path, profile: Path) -> None:
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--window-size=1600,1000",
         "--virtual-time-budget=20000", "--hide-scrollbars", f"--screenshot={out}", url],
        check=True, capture_output=True, timeout=180,
    )
    print(f"wrote {out}", file=sys.stderr)


async def _run(collector: str, workdir: Path) -> None:
    document = workdir / "quarterly.txt"
    document.write_text(DOCUMENT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PHOENIX_"))}
    env.update({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector}/v1/traces", "PHOENIX_PROJECT_NAME": PROJECT})
    async with FakeOpenAIServer(root_marker="QUARTERLY", root_reply=ROOT_REPLY, latency=0.05) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rlmflow.cli", "run", "--context", str(document), "--query", QUERY,
            "--root", f"openai:gpt-4o-mini@{server.base_url}", "--capture-content", "4000", env=env,
        )
        if await process.wait() != 0:
            raise SystemExit("rlmflow run failed")


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/img")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        port, grpc_port = _free_port(), _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PHOENIX_HOST": "127.0.0.1", "PHOENIX_PORT": str(port),
               "PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_WORKING_DIR": str(home / "data"),
               "PHOENIX_TELEMETRY_ENABLED": "false", "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false"}
        with (home / "phoenix.log").open("wb") as log:
            phoenix = subprocess.Popen([str(PHOENIX), "serve"], cwd=home, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 240
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.monotonic() > deadline or phoenix.poll() is not None:
                        raise SystemExit("phoenix serve did not start") from None
                time.sleep(0.5)
            asyncio.run(_run(url, home))
            spans: list[dict[str, object]] = []
            while len(spans) < 7 and time.monotonic() < deadline + 60:  # Phoenix ingests in the background
                time.sleep(0.5)
                response = httpx.get(f"{url}/v1/projects/{PROJECT}/spans", params={"limit": 100})
                spans = response.json()["data"] if response.status_code == 200 else []
            project_id = next(p["id"] for p in httpx.get(f"{url}/v1/projects").json()["data"] if p["name"] == PROJECT)
            by_name = {str(s["name"]): s for s in reversed(spans)}  # the root model's chat is the first chat
            trace_id = by_name["invoke_agent rlm"]["context"]["trace_id"]  # type: ignore[index]
            page = f"{url}/projects/{project_id}/traces/{trace_id}"
            profile = home / "chromium"
            root_id = by_name["invoke_agent rlm"]["id"]
            _shoot(f"{page}?selectedSpanNodeId={root_id}", out_dir / "phoenix-run.png", profile)
            chat = next(s for s in spans if s["name"] == "chat gpt-4o-mini"
                        and s["parent_id"] == by_name["rlm.turn"]["context"]["span_id"])  # type: ignore[index]
            _shoot(f"{page}?selectedSpanNodeId={chat['id']}", out_dir / "phoenix-llm.png", profile)
            _shoot(f"{page}?selectedSpanNodeId={by_name['execute_code']['id']}", out_dir / "phoenix-cell.png", profile)
            _shoot(f"{url}/projects/{project_id}/traces", out_dir / "phoenix-traces.png", profile)
        finally:
            phoenix.terminate()
            phoenix.wait(timeout=30)


if __name__ == "__main__":
    main()
