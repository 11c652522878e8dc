"""Batches of RLM runs on a local Ray instance (scripts/setup/test-ray.sh), sharing one Redis lane.

The root is scripted (each run's one cell fans three sub-calls out and answers with them); the
sub-calls go to the fake provider in this test's event loop, through Dispatchers whose lanes live
in a real redis-server, so the provider's admission log shows whether the actors together kept the
limits.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

# Ray would announce this machine's outward address even to a local instance; on loopback only,
# every process of the test instance talks over 127.0.0.1 (read when ray is first imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

pytest.importorskip("ray")
pytest.importorskip("redis")
if shutil.which("redis-server") is None:  # pragma: no cover - the setup script installs it
    pytest.skip("redis-server is not installed (scripts/setup/test-redis.sh)", allow_module_level=True)

import ray

from rlmflow import RLM, ConfigurationError, Dispatcher, Limits, OpenAIModel
from rlmflow.cli import main
from rlmflow.dispatch.shared import SharedConfig
from rlmflow.ray import BatchItem, BatchPolicy, RayBatch

from .fakes import FakeOpenAIServer
from .fakes.fake_openai import answer_for
from .helpers import turn_script
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio

CELL = 'parts = llm_query_many([f"{context}-{i}" for i in range(3)])\nFINAL("|".join(parts))'
LIMITS = {"rpm": 30, "max_concurrency": 4, "window": 1.0}


def make_rlm(base_url: str, redis_url: str, lease: float = 10.0) -> RLM:
    """Runs in the actor: a scripted root, the fake provider as sub-model, lanes in Redis. Redis
    may take 5 s to answer before an actor falls back to its share (1 s could pass under load, and the
    fallback's window can draw refusals); a lease of 10 s outlasts any stall of a loaded actor."""
    dispatcher = Dispatcher(shared=SharedConfig(redis_url, lease=lease, timeout=5.0),
                            limits={"openai": Limits(**LIMITS)})  # type: ignore[arg-type]
    return RLM(root=turn_script([CELL]), sub=OpenAIModel("fake", base_url=base_url), dispatcher=dispatcher,
               max_turns=2)


def expected(document: str) -> str:
    return "|".join(answer_for(f"{document}-{i}") for i in range(3))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=80 * 1024 * 1024,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}},
             logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
async def provider() -> AsyncIterator[FakeOpenAIServer]:
    async with FakeOpenAIServer(latency=0.05, rpm=30, window=1.0) as server:
        yield server


async def test_twenty_runs_all_answered_within_the_limits(
    local_ray: None, redis_server: RedisServer, provider: FakeOpenAIServer
) -> None:
    items = [BatchItem(f"r{k}", "join the parts", context=f"doc{k}") for k in range(20)]
    factory = functools.partial(make_rlm, provider.base_url, redis_server.url)
    kinds: list[str] = []
    async with RayBatch(factory, policy=BatchPolicy(actors=2, runs_per_actor=4)) as batch:
        async for event in batch.stream(items):
            kinds.append(event.kind)
            if event.kind == "done":
                assert event.result is not None
                assert event.result.answer == expected(f"doc{event.id[1:]}")
    assert kinds.count("done") == 20 and kinds.count("submitted") == 20
    assert "failed" not in kinds and "retrying" not in kinds
    assert provider.counters.admitted == 60
    assert provider.summary()["rate_limited"] == 0
    assert provider.max_in_window() <= LIMITS["rpm"]


async def test_a_killed_worker_run_is_retried_and_answered(
    local_ray: None, redis_server: RedisServer
) -> None:
    async with FakeOpenAIServer(latency=0.6) as provider:
        items = [BatchItem(f"k{k}", "join the parts", context=f"doc{k}") for k in range(6)]
        # the killed actor's slots are free again when its leases end: 2 s, not 10 s, for the retries
        factory = functools.partial(make_rlm, provider.base_url, redis_server.url, lease=2.0)
        events = []
        async with RayBatch(factory, policy=BatchPolicy(actors=2, runs_per_actor=2, max_attempts=3)) as batch:
            victim = (await batch.pids())[0]

            async def kill_mid_run() -> None:
                with anyio.fail_after(60):
                    while provider.counters.admitted < 3:  # noqa: ASYNC110 - the provider is in this loop
                        await anyio.sleep(0.01)
                os.kill(victim, signal.SIGKILL)  # its runs' sub-calls are at the provider now

            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_mid_run)
                async for event in batch.stream(items):
                    events.append(event)
        outcomes = {e.id: e for e in events if e.kind in ("done", "failed")}
    assert sorted(outcomes) == sorted(item.id for item in items)  # none lost
    for item_id, event in outcomes.items():
        assert event.kind == "done" and event.result is not None, [(e.kind, e.id, e.attempt, e.detail) for e in events]
        assert event.result.answer == expected(f"doc{item_id[1:]}")
    retried = [e for e in events if e.kind == "retrying"]
    assert retried, [(e.kind, e.id, e.attempt, e.detail[:80]) for e in events]
    assert max(e.attempt for e in outcomes.values()) >= 2


def test_cli_batch_on_ray(local_ray: None, redis_server: RedisServer, tmp_path: Path) -> None:
    """``rlmflow batch --ray``: the fake provider (its own process) plays root and sub-model."""
    reply = tmp_path / "root.txt"
    reply.write_text("```repl\nFINAL(llm_query(context))\n```", encoding="utf-8")
    provider = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent.parent / "benchmarks" / "fake_provider.py"), "--latency", "0.01",
         "--root-marker", "QUESTION-", "--root-reply", str(reply)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert provider.stdout is not None
        base_url = json.loads(provider.stdout.readline())["base_url"]
        queries = tmp_path / "queries.jsonl"
        queries.write_text("".join(json.dumps({"id": f"q{k}", "query": f"QUESTION-{k}", "context": f"doc{k}"}) + "\n"
                                   for k in range(5)), encoding="utf-8")
        out = tmp_path / "out.jsonl"
        code = main(["batch", "--input", str(queries), "--output", str(out), "--ray", "local",
                     "--root", f"openai:fake@{base_url}", "--shared", redis_server.url, "--actors", "2",
                     "--max-turns", "2"])
    finally:
        provider.communicate("", timeout=30)
    rows = {row["id"]: row for row in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert code == 0 and sorted(rows) == [f"q{k}" for k in range(5)]
    for k in range(5):
        assert rows[f"q{k}"]["answer"] == answer_for(f"doc{k}") and rows[f"q{k}"]["attempts"] == 1


async def test_run_events_stream_back_before_each_outcome(
    local_ray: None, redis_server: RedisServer, provider: FakeOpenAIServer
) -> None:
    items = [BatchItem(f"e{k}", "join the parts", context=f"doc{k}") for k in range(3)]
    factory = functools.partial(make_rlm, provider.base_url, redis_server.url)
    seen: dict[str, list[str]] = {item.id: [] for item in items}
    policy = BatchPolicy(actors=1, runs_per_actor=3, run_events=True)
    async with RayBatch(factory, policy=policy) as batch:
        async for event in batch.stream(items):
            if event.kind == "run_event":
                assert event.run_event is not None
                seen[event.id].append(event.run_event.kind)
            elif event.kind in ("done", "failed"):
                seen[event.id].append(event.kind)
    for kinds in seen.values():
        assert kinds[0] == "run_started" and kinds[-2:] == ["answer", "done"]
        assert kinds.count("call_done") >= 3, kinds


async def test_duplicate_ids_are_refused_by_name_before_ray_is_touched(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python API refuses what ``rlmflow batch`` refuses: two items with one id would both be
    run and paid for, and one outcome would hide the other. Nothing reaches Ray (no actor, no run)."""
    import rlmflow.ray

    def no_ray() -> None:
        raise AssertionError("Ray was touched before the ids were checked")

    monkeypatch.setattr(rlmflow.ray, "_ray", no_ray)

    def factory() -> RLM:
        raise AssertionError("no RLM may be built")

    ids = ["a", "b", "a", "c", "c", "c"] + [f"d{k}" for k in range(8) for _ in range(2)]
    items = [BatchItem(item_id, "q", context="doc") for item_id in ids]
    batch = RayBatch(factory)
    with pytest.raises(ConfigurationError) as streamed:
        async for _ in batch.stream(iter(items)):  # any iterable, read once
            pass
    message = streamed.value.message
    assert "10 ids are given to more than one item" in message
    assert "'a' (2 items), 'c' (3 items), 'd0' (2 items), 'd1' (2 items), 'd2' (2 items) and 5 more" in message
    assert "'b'" not in message and "'d3'" not in message  # bounded: the first five are named
    with pytest.raises(ConfigurationError, match="'a' \\(2 items\\)"):
        await batch.run(items)
    assert batch._actors == []
    twice = [BatchItem("x" * 500, "q", context="doc")] * 2
    with pytest.raises(ConfigurationError) as long_id:  # a long id is cut in the message
        await batch.run(twice)
    assert f"'{'x' * 60}' (2 items)" in long_id.value.message and "x" * 61 not in long_id.value.message
