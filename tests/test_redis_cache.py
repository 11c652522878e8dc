"""The sub-call cache in Redis: one cache for replicas, a TTL and a cap there, and never a failed run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from rlmflow import RLM, ConfigurationError, ScriptedModel
from rlmflow.durable.cache import CachedAnswer
from rlmflow.durable.redis_cache import RedisCallCache

from .helpers import refused_port, turn_script
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio

PROMPTS = 8
CELLS = [
    f"answers = llm_query_many(['item %d' % i for i in range({PROMPTS})])\nprint(len(answers))",
    "FINAL('total ' + str(sum(len(a) for a in answers)))",
]
ANSWER = CachedAnswer("an answer", "sub", "stop", 12, 3)


def sub_model() -> ScriptedModel:
    return ScriptedModel(lambda r: "ANSWER " + r.messages[-1].content, name="sub")


async def test_a_run_on_another_replica_is_answered_from_the_shared_cache(redis_server: RedisServer) -> None:
    first, second = RedisCallCache(redis_server.url), RedisCallCache(redis_server.url)  # two replicas
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=first) as rlm:
        done = await rlm.run("the document", "how long?")
    root, sub = turn_script(CELLS), sub_model()
    async with RLM(root=root, sub=sub, cache=second) as rlm:
        again = await rlm.run("the document", "how long?")
    await first.aclose()
    await second.aclose()
    assert again.answer == done.answer and root.requests == [] and sub.requests == []
    assert again.usage["sub"].cached_calls == PROMPTS and again.cost_usd == 0.0


async def test_a_redis_url_given_as_the_cache_is_a_redis_cache(redis_server: RedisServer) -> None:
    async with RLM(root=turn_script(CELLS), sub=sub_model(), cache=redis_server.url) as rlm:
        assert isinstance(rlm.cache, RedisCallCache)
        await rlm.run("the document", "how long?")
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await client.zcard("rlmflow:cache-lru") == PROMPTS + 2  # the sub-calls and both root turns
    finally:
        await client.aclose()


async def test_entries_expire_with_the_ttl_and_the_cap_evicts_the_least_recently_used(
    redis_server: RedisServer,
) -> None:
    cache = RedisCallCache(redis_server.url, ttl=30, max_entries=3)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for index in range(3):
            await cache.store(f"k{index}", ANSWER)
        assert 0 < await client.pttl("rlmflow:cache:k0") <= 30_000  # Redis expires it, not a reader's clock
        assert await cache.lookup(["k0"]) == [ANSWER]  # k0 is now the most recently used
        await cache.store("k3", ANSWER)
        await cache.store("k4", ANSWER)
        assert [hit is not None for hit in await cache.lookup(["k0", "k1", "k2", "k3", "k4"])] == [
            True, False, False, True, True
        ]
        assert await client.zcard("rlmflow:cache-lru") == 3
        assert await client.exists("rlmflow:cache:k1", "rlmflow:cache:k2") == 0
    finally:
        await client.aclose()
        await cache.aclose()


async def test_a_value_of_another_shape_is_a_miss(redis_server: RedisServer) -> None:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    cache = RedisCallCache(redis_server.url)
    try:
        await client.set("rlmflow:cache:bad", json.dumps({"text": 1}))
        await client.set("rlmflow:cache:worse", "not json")
        assert await cache.lookup(["bad", "worse"]) == [None, None]
    finally:
        await client.aclose()
        await cache.aclose()


async def test_redis_down_is_a_miss_and_the_run_goes_on() -> None:
    with refused_port() as port:
        cache = RedisCallCache(f"redis://127.0.0.1:{port}/0")
        sub = sub_model()
        with anyio.fail_after(20):
            async with RLM(root=turn_script(CELLS), sub=sub, cache=cache) as rlm:
                result = await rlm.run("the document", "how long?")
        await cache.aclose()
    assert result.answer.startswith("total ") and len(sub.requests) == PROMPTS


@pytest.mark.parametrize("bad", [{"ttl": 0}, {"max_entries": 0}, {"max_entries": True}])
def test_bad_settings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        RedisCallCache("redis://127.0.0.1:6379/0", **bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        RedisCallCache("http://127.0.0.1:6379/0")


async def test_a_cli_run_on_a_redis_cache_twice_sends_nothing_the_second_time(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from .fakes import FakeOpenAIServer

    document = tmp_path / "doc.txt"
    document.write_text("a document\n" * 10)
    cell = f"answers = llm_query_many(['item %d' % i for i in range({PROMPTS})])\nFINAL(str(len(answers)))"
    async with FakeOpenAIServer(root_marker="Question: how many?", root_reply=f"```repl\n{cell}\n```") as server:
        command = [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(document), "--query", "how many?",
                   "--root", f"openai:root@{server.base_url}", "--sub", f"openai:sub@{server.base_url}",
                   "--cache", redis_server.url]
        env = {"OPENAI_API_KEY": "test", "PATH": "/usr/bin:/bin"}
        for _ in range(2):
            done = await anyio.run_process(command, env=env, check=False)
            assert done.returncode == 0, done.stderr.decode()
            assert done.stdout.decode().strip() == str(PROMPTS)
        assert server.counters.requests == 1 + PROMPTS


def test_one_cache_serves_runs_on_two_event_loops_and_keeps_odd_text(redis_server: RedisServer) -> None:
    """As run_sync does: each call its own loop. A client bound to a dead loop would fail the run."""
    cache = RedisCallCache(redis_server.url)
    odd = CachedAnswer("half an emoji \ud83d", "sub", "stop", 1, 1)

    async def one(store: bool) -> list[CachedAnswer | None]:
        try:
            if store:
                await cache.store("odd", odd)
            return await cache.lookup(["odd"])
        finally:
            await cache.aclose()  # as an RLM closed at the end of each run_sync

    assert anyio.run(one, True) == [odd]
    assert anyio.run(one, False) == [odd]  # a new loop: a new client, the same entry


def test_a_url_is_told_from_a_path_whatever_its_case_and_a_mistyped_one_is_refused_without_its_password() -> None:
    from rlmflow.dispatch.policy import CacheSettings
    from rlmflow.dispatch.shared import SharedConfig
    from rlmflow.durable.choice import cache_from_settings, open_cache

    assert isinstance(open_cache("REDIS://127.0.0.1:6379/0"), RedisCallCache)
    with pytest.raises(ConfigurationError) as refused:
        open_cache("redis:/:s3cret@cache.internal:6379/0")
    assert "s3cret" not in str(refused.value)
    tenant = cache_from_settings(CacheSettings(url="redis://127.0.0.1:6379/0"),
                                 SharedConfig("redis://127.0.0.1:6379/0", namespace="tenant-a", timeout=0.2))
    assert isinstance(tenant, RedisCallCache)
    assert (tenant.config.namespace, tenant.config.timeout) == ("tenant-a", 0.2)  # the [shared] table's
