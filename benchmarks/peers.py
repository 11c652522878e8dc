"""The same 1,000-chunk fan-out run by rlmflow, the official `rlms` package and DSPy's RLM.

    .venv/bin/python benchmarks/peers.py [--prompts 1000] [--rpm 600] [--tpm 400000]

Each contender gets a fresh fake OpenAI-compatible provider (its own process, 200 ms latency,
RPM/TPM over 60 s windows) that also plays the root model: a request carrying the job's marker
gets a scripted reply whose code fans the chunks out with the contender's batched call. `rlms`
and `dspy` are installed into a throwaway virtual environment (benchmarks/.peers/) by this script
and run with their defaults (their own batch concurrency and client retries). Prints wall time, the ratio to
rlmflow, what the provider refused, lost calls, and tokens each one accounted against the tokens
the provider saw; writes benchmarks/results/peers.json.

DSPy's `dspy.RLM` runs with its `LocalInterpreter`: its default Deno/Pyodide interpreter imports
a module from deno.land, outside the package registries reachable here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import write_result

HERE = Path(__file__).parent
PEERS = HERE / ".peers"
FAKE_PROVIDER = Path(__file__).with_name("fake_provider.py")
MARKER = "FANOUT-JOB-7f3a"
RLMS_VERSION = "0.1.3"
DSPY_VERSION = "3.4.1"


def chunk_code(n: int) -> str:
    return f"prompts = [f'chunk {{i}}: ' + 'lorem ipsum ' * 33 for i in range({n})]\n"


def start_server(args: argparse.Namespace, root_reply: str) -> tuple[subprocess.Popen[str], str]:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as reply_file:
        reply_file.write(root_reply)
    limits = ["--rpm", str(args.rpm), "--tpm", str(args.tpm)] if args.rpm else []
    server = subprocess.Popen(
        [sys.executable, str(FAKE_PROVIDER),
         "--latency", str(args.latency), *limits, "--root-marker", MARKER, "--root-reply", reply_file.name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert server.stdout is not None
    return server, json.loads(server.stdout.readline())["base_url"]


def stop_server(server: subprocess.Popen[str]) -> dict[str, Any]:
    assert server.stdin is not None and server.stdout is not None
    server.stdin.close()
    summary: dict[str, Any] = json.loads(server.stdout.readline() or "{}")
    server.wait(timeout=10)
    return summary


RLMFLOW_DRIVER = """
import json, sys, time, anyio
from rlmflow import RLM, Dispatcher, Limits, OpenAIModel, ScriptedModel
base_url, n, rpm, tpm, code = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
async def main():
    sub = OpenAIModel("fake-sub", base_url=base_url, timeout=120)
    dispatcher = Dispatcher(limits={"openai": Limits(rpm=rpm or None, tpm=tpm or None, max_concurrency=64)})
    root = ScriptedModel(lambda r: "```repl\\n" + code + "\\n```", name="root")
    async with RLM(root=root, sub=sub, dispatcher=dispatcher, sub_max_tokens=64) as rlm:
        started = time.perf_counter()
        result = await rlm.run("a small document", "fan out")
        wall = time.perf_counter() - started
    await sub.aclose()
    usage = result.usage.get("fake-sub")
    print(json.dumps({"wall_s": wall, "answer": result.answer,
                      "accounted_tokens": (usage.input_tokens + usage.output_tokens) if usage else 0,
                      "accounted_calls": usage.calls if usage else 0}))
anyio.run(main)
"""

RLMS_DRIVER = """
import json, sys, time
from rlm import RLM
base_url, marker = sys.argv[1], sys.argv[2]
rlm = RLM(backend="openai", backend_kwargs={"model_name": "fake-sub", "base_url": base_url, "api_key": "x"},
          environment="local", max_iterations=3)
started = time.perf_counter()
result = rlm.completion("a small document", root_prompt=marker + " fan out")
wall = time.perf_counter() - started
usage = {}
summary = getattr(result, "usage_summary", None)
if summary is not None:
    for model, u in summary.model_usage_summaries.items():
        usage[model] = {"calls": u.total_calls, "tokens": u.total_input_tokens + u.total_output_tokens}
print(json.dumps({"wall_s": wall, "answer": str(getattr(result, "response", result)),
                  "accounted_tokens": sum(u["tokens"] for u in usage.values()),
                  "accounted_calls": sum(u["calls"] for u in usage.values())}))
"""


DSPY_DRIVER = """
import json, os, sys, time
import dspy
from dspy.primitives.local_interpreter import LocalInterpreter
base_url, marker, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lm = dspy.LM("openai/fake-sub", api_base=base_url, api_key="x", cache=False, max_tokens=64)
dspy.configure(lm=lm)
rlm = dspy.RLM("context, query -> answer", max_iters=3, max_llm_calls=n + 10, interpreter_factory=LocalInterpreter)
started = time.perf_counter()
result = rlm(context="a small document", query=marker + " fan out")
wall = time.perf_counter() - started
tokens = sum((h.get("usage") or {}).get("total_tokens", 0) for h in lm.history)
print(json.dumps({"wall_s": wall, "answer": str(result.answer), "accounted_tokens": tokens,
                  "accounted_calls": len(lm.history)}))
"""


def ensure_rlms() -> Path:
    python = PEERS / "venv" / "bin" / "python"
    if not python.exists():
        print("installing rlms into benchmarks/.peers/venv (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS / "venv")], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"rlms=={RLMS_VERSION}", f"dspy=={DSPY_VERSION}"], check=True
        )
    return python


def run_driver(python: str, driver: str, *argv: str) -> dict[str, Any]:
    # litellm (under dspy) fetches a price table from the internet unless told to use its own copy
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DSPY_CACHEDIR": str(PEERS / "dspy-cache")}
    done = subprocess.run([python, "-c", driver, *argv], capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_scenario(args: argparse.Namespace, rlms_python: Path) -> dict[str, dict[str, Any]]:
    job = chunk_code(args.prompts)
    contenders: dict[str, dict[str, Any]] = {}
    code = job + "answers = llm_query_many(prompts)\nFINAL(str(sum(a.startswith('answer:') for a in answers)))"
    server, url = start_server(args, "unused")
    contenders["rlmflow"] = run_driver(sys.executable, RLMFLOW_DRIVER, url, str(args.prompts), str(args.rpm or 0),
                                       str(args.tpm or 0), code)
    contenders["rlmflow"]["server"] = stop_server(server)
    rlms_reply = (
        "```repl\n" + job + "answers = llm_query_batched(prompts)\n"
        "answer['content'] = str(sum(str(a).startswith('answer:') for a in answers))\nanswer['ready'] = True\n```"
    )
    server, url = start_server(args, rlms_reply)
    contenders[f"rlms {RLMS_VERSION}"] = run_driver(str(rlms_python), RLMS_DRIVER, url, MARKER)
    contenders[f"rlms {RLMS_VERSION}"]["server"] = stop_server(server)
    dspy_reply = (
        "[[ ## reasoning ## ]]\nFan the chunks out.\n\n[[ ## code ## ]]\n```python\n" + job
        + "answers = llm_query_batched(prompts)\n"
        "SUBMIT(answer=str(sum(str(a).startswith('answer:') for a in answers)))\n```\n\n[[ ## completed ## ]]"
    )
    server, url = start_server(args, dspy_reply)
    contenders[f"dspy {DSPY_VERSION}"] = run_driver(str(rlms_python), DSPY_DRIVER, url, MARKER, str(args.prompts))
    contenders[f"dspy {DSPY_VERSION}"]["server"] = stop_server(server)
    return contenders


def report(args: argparse.Namespace, title: str, contenders: dict[str, dict[str, Any]]) -> None:
    ours = contenders["rlmflow"].get("wall_s", float("nan"))
    print(f"{title}: {args.prompts} chunks, {args.latency * 1000:.0f} ms latency, "
          + (f"rpm {args.rpm}, tpm {args.tpm}" if args.rpm else "no rate limits (concurrency-bound)"))
    for name, outcome in contenders.items():
        server_seen = outcome["server"]
        if "error" in outcome:
            print(f"  {name:12s} failed: {outcome['error'][-300:]}")
            continue
        answered = int(outcome["answer"]) if str(outcome["answer"]).isdigit() else 0
        outcome["lost"] = args.prompts - answered
        outcome["times_slower_than_rlmflow"] = outcome["wall_s"] / ours
        print(
            f"  {name:12s} {outcome['wall_s']:6.1f} s (rlmflow is x{outcome['wall_s'] / ours:.2f} faster) | "
            f"lost {outcome['lost']} | provider refused {server_seen.get('rate_limited', 0)} (429) | "
            f"tokens accounted {outcome['accounted_tokens']:,} vs provider saw "
            f"{server_seen.get('admitted_tokens', 0):,}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--tpm", type=int, default=400_000)
    args = parser.parse_args()
    rlms_python = ensure_rlms()
    results: dict[str, Any] = {"config": vars(args), "scenarios": {}}
    for title, rpm, tpm in (("rate-bound", args.rpm, args.tpm), ("concurrency-bound", 0, 0)):
        scenario = argparse.Namespace(**{**vars(args), "rpm": rpm, "tpm": tpm})
        contenders = run_scenario(scenario, rlms_python)
        report(scenario, title, contenders)
        results["scenarios"][title] = contenders
    write_result("peers", results)


if __name__ == "__main__":
    main()
