"""The journal in Redis: a run one replica started, another resumes, each prompt paid once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import anyio
import pytest
import redis
import redis.asyncio as aioredis

from rlmflow import RLM, ConfigurationError
from rlmflow.durable.redis_journal import RedisJournal

from .fakes import FakeOpenAIServer
from .helpers import killed_once, refused_port, turn_script
from .redis_server import RedisServer
from .test_durable import CELLS, PROMPTS, sub_model

pytestmark = pytest.mark.anyio


async def test_a_run_a_replica_started_is_resumed_by_another_paying_each_prompt_once(
    redis_server: RedisServer,
) -> None:
    hanging = anyio.Event()
    first = RedisJournal(redis_server.url)
    first_sub = sub_model(hang_from=12, started=hanging)
    async with RLM(root=turn_script(CELLS), sub=first_sub, journal=first) as rlm, anyio.create_task_group() as tg:
        tg.start_soon(rlm.run, "the document", "how long are the answers?")
        await hanging.wait()
        tg.cancel_scope.cancel()
    await anyio.to_thread.run_sync(first.close)  # what it wrote is in Redis
    answered_before = [r.messages[-1].content for r in first_sub.requests][:11]

    second = RedisJournal(redis_server.url)  # another replica: nothing shared but Redis
    root, sub = turn_script(CELLS), sub_model()
    async with RLM(root=root, sub=sub, journal=second) as rlm:
        resumed = await rlm.resume("the document")
    await anyio.to_thread.run_sync(second.close)
    sent_again = [r.messages[-1].content for r in sub.requests]
    assert not set(answered_before) & set(sent_again)
    assert len(sent_again) == PROMPTS - len(answered_before)
    assert resumed.replayed_calls == 1 + len(answered_before) and len(root.requests) == 1
    record = second.read_run(resumed.run_id)
    assert record is not None and record.status == "done" and record.answer == resumed.answer
    assert second.latest_unfinished() is None


async def test_a_runs_keys_expire_after_the_ttl(redis_server: RedisServer) -> None:
    journal = RedisJournal(redis_server.url, ttl=600)
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        done = await rlm.run("the document", "how long are the answers?")
    await anyio.to_thread.run_sync(journal.close)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert 0 < await client.pttl(f"rlmflow:journal:calls:{done.run_id}") <= 600_000
        assert await client.llen(f"rlmflow:journal:calls:{done.run_id}") == PROMPTS + 2
    finally:
        await client.aclose()


async def test_redis_down_stops_the_recording_not_the_run() -> None:
    with refused_port() as port:
        journal = RedisJournal(f"redis://127.0.0.1:{port}/0")
        sub = sub_model()
        async with RLM(root=turn_script(CELLS), sub=sub, journal=journal) as rlm:
            result = await rlm.run("the document", "how long are the answers?")
        await anyio.to_thread.run_sync(journal.close)
    assert result.answer.startswith("total ") and len(sub.requests) == PROMPTS
    assert isinstance(journal.failure, redis.exceptions.ConnectionError)


def test_a_bad_url_or_ttl_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        RedisJournal("http://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError):
        RedisJournal("redis://127.0.0.1:1/0", ttl=0)


async def test_a_cli_run_killed_on_one_host_is_resumed_by_a_second_process(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("a document about nothing in particular\n" * 20)
    prompts, held_after = 40, 16
    cell = (f"answers = llm_query_many(['item %d' % i for i in range({prompts})])\n"
            "FINAL('total ' + str(sum(len(a) for a in answers)))")
    asked: list[str] = []
    resuming = False
    server: FakeOpenAIServer

    def reply(last: str) -> str:
        asked.append(last)
        if len(asked) == held_after and not resuming:  # the first process never finishes on its own
            server.latency = 3600.0
        return "ANSWER " + last

    policy = tmp_path / "policy.toml"
    policy.write_text("[lanes.openai]\nmax_concurrency = 4\n")
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    calls = redis.Redis.from_url(redis_server.url, decode_responses=True)
    async with FakeOpenAIServer(latency=0.05, root_marker="Question: how long?", root_reply=f"```repl\n{cell}\n```",
                                reply=reply) as server:
        command = [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(document), "--query", "how long?",
                   "--root", f"openai:root@{server.base_url}", "--sub", f"openai:sub@{server.base_url}",
                   "--journal", redis_server.url, "--policy", str(policy)]

        def journaled() -> int:
            return sum(calls.llen(key) for key in calls.scan_iter("rlmflow:journal:calls:*")) - 1  # the root's

        first_err = await killed_once(command, env, tmp_path / "first.log", lambda: journaled() >= 10)
        assert f"journal {redis_server.url}" in first_err
        paid = {text for key in calls.scan_iter("rlmflow:journal:calls:*") for text in
                (answer_of(row) for row in calls.lrange(key, 0, -1)) if text.startswith("ANSWER ")}
        asked.clear()
        resuming, server.latency = True, 0.05
        resumed = await anyio.run_process([*command, "--resume"], env=env, check=False)
    calls.close()
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert resumed.stdout.decode().strip() == "total " + str(sum(len(f"ANSWER item {i}") for i in range(prompts)))
    paid_prompts = {text.removeprefix("ANSWER ") for text in paid}
    assert 10 <= len(paid_prompts) <= held_after + 4
    assert not paid_prompts & set(asked)
    assert sorted(asked) == sorted({f"item {i}" for i in range(prompts)} - paid_prompts)


def answer_of(row: str) -> str:
    """The answer text of a journaled call (its fifth field)."""
    return str(json.loads(row)[4])


async def test_a_malformed_record_in_redis_is_a_clear_error(redis_server: RedisServer) -> None:
    journal = RedisJournal(redis_server.url)
    async with RLM(root=turn_script(CELLS), sub=sub_model(), journal=journal) as rlm:
        done = await rlm.run("the document", "how long are the answers?")
    await anyio.to_thread.run_sync(journal.close)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        bad = json.dumps(["k", "sub", "0", "m", {}, None, 1, 1, 0])  # a depth of text, an answer of a table
        await client.rpush(f"rlmflow:journal:calls:{done.run_id}", bad)
    finally:
        await client.aclose()
    reader = RedisJournal(redis_server.url)
    try:
        with pytest.raises(ConfigurationError, match="malformed"):
            reader.read_run(done.run_id)
    finally:
        reader.close()
