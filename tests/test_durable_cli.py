"""A real CLI process killed mid-fan-out (SIGKILL) and resumed with --resume: each prompt paid once."""

from __future__ import annotations

import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from .fakes import FakeOpenAIServer
from .helpers import killed_once

pytestmark = pytest.mark.anyio

PROMPTS = 60
CELL = (
    f"answers = llm_query_many(['item %d' % i for i in range({PROMPTS})])\n"
    "FINAL('total ' + str(sum(len(a) for a in answers)))"
)
HELD_AFTER = 24  # answers the fake gives before it holds every later request (a run of 60 cannot finish)
EXPECTED = "total " + str(sum(len(f"ANSWER item {i}") for i in range(PROMPTS)))


def journaled_sub_prompts(journal: Path) -> int:
    if not journal.exists():
        return 0
    try:
        with closing(sqlite3.connect(journal, timeout=5)) as connection:
            return int(connection.execute("SELECT count(*) FROM calls WHERE role = 'sub'").fetchone()[0])
    except sqlite3.OperationalError:  # the tables are not there yet
        return 0


def command(server: FakeOpenAIServer, document: Path, journal: Path, *extra: str) -> list[str]:
    # at most 8 calls in flight: the fake holds every request after HELD_AFTER answers, so the first
    # run pays at most HELD_AFTER + 8 of its PROMPTS and cannot finish before it is killed
    policy = journal.with_name("policy.toml")
    policy.write_text("[lanes.openai]\nmax_concurrency = 8\n")
    return [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(document), "--query", "how long?",
            "--root", f"openai:root@{server.base_url}", "--sub", f"openai:sub@{server.base_url}",
            "--journal", str(journal), "--policy", str(policy), *extra]


@pytest.mark.parametrize("torn", [False, True], ids=["whole", "torn"])
async def test_a_killed_run_resumed_pays_each_prompt_once_and_answers_exactly(tmp_path: Path, torn: bool) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("a document about nothing in particular\n" * 20)
    journal = tmp_path / "journal.sqlite"
    asked: list[str] = []
    server: FakeOpenAIServer
    resuming = False

    def reply(last: str) -> str:
        asked.append(last)
        if len(asked) == HELD_AFTER and not resuming:  # the first run never ends on its own: it is killed mid-fan-out
            server.latency = 3600.0
        return "ANSWER " + last

    env = {**os.environ, "OPENAI_API_KEY": "test"}
    async with FakeOpenAIServer(latency=0.15, root_marker="Question: how long?", root_reply=f"```repl\n{CELL}\n```",
                                reply=reply) as server:
        first_err = await killed_once(command(server, document, journal), env, tmp_path / "first.log",
                                      lambda: journaled_sub_prompts(journal) >= 20)
        assert "journal" in first_err and "--resume" in first_err  # the run's id and where it is
        if torn:  # the process died mid-write: the last transaction of the WAL is cut short
            wal = journal.with_name(journal.name + "-wal")
            assert wal.stat().st_size > 4096
            with wal.open("r+b") as file:
                file.truncate(wal.stat().st_size - 700)
        with closing(sqlite3.connect(journal)) as connection:  # what the killed run had recorded
            paid = {row[0].removeprefix("ANSWER ") for row in connection.execute(
                "SELECT text FROM calls WHERE role = 'sub'")}
        asked.clear()
        resuming, server.latency = True, 0.15
        resumed = await anyio.run_process(command(server, document, journal, "--resume"), env=env, check=False)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert resumed.stdout.decode().strip() == EXPECTED
    assert (1 if torn else 20) <= len(paid) <= HELD_AFTER + 8, len(paid)  # a torn journal lost its last records
    assert not paid & set(asked)  # nothing the killed run had recorded was paid for again
    assert sorted(asked) == sorted({f"item {i}" for i in range(PROMPTS)} - paid)  # each other prompt, once


async def test_an_identical_second_run_with_the_cache_sends_nothing(tmp_path: Path) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("a document about nothing in particular\n" * 20)
    cache = tmp_path / "cache.sqlite"
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    async with FakeOpenAIServer(root_marker="Question: how long?", root_reply=f"```repl\n{CELL}\n```",
                                reply=lambda last: "ANSWER " + last) as server:
        def command() -> list[str]:
            return [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(document), "--query", "how long?",
                    "--root", f"openai:root@{server.base_url}", "--sub", f"openai:sub@{server.base_url}",
                    "--cache", str(cache)]

        first = await anyio.run_process(command(), env=env, check=False)
        assert first.returncode == 0, first.stderr.decode()
        assert server.counters.requests == 1 + PROMPTS
        second = await anyio.run_process(command(), env=env, check=False)
        assert second.returncode == 0, second.stderr.decode()
        assert server.counters.requests == 1 + PROMPTS  # the root's turn and every sub-call from the cache
    assert first.stdout == second.stdout and second.stdout.decode().strip() == EXPECTED


async def test_the_policy_files_cache_serves_the_command_and_the_flag_wins(tmp_path: Path) -> None:
    document = tmp_path / "doc.txt"
    document.write_text("a document about nothing in particular\n" * 20)
    policy = tmp_path / "policy.toml"
    policy.write_text('[cache]\npath = "from-policy.sqlite"\n')  # next to the policy, wherever it runs
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    async with FakeOpenAIServer(root_marker="Question: how long?", root_reply=f"```repl\n{CELL}\n```",
                                reply=lambda last: "ANSWER " + last) as server:
        async def run(*extra: str) -> int:
            done = await anyio.run_process(
                [sys.executable, "-m", "rlmflow.cli", "run", "--context", str(document), "--query", "how long?",
                 "--root", f"openai:root@{server.base_url}", "--sub", f"openai:sub@{server.base_url}",
                 "--policy", str(policy), *extra], env=env, check=False, cwd=document.parent.parent)
            assert done.returncode == 0, done.stderr.decode()
            return server.counters.requests

        assert await run() == 1 + PROMPTS
        assert await run() == 1 + PROMPTS  # the policy's cache answered everything
        assert await run("--cache", str(tmp_path / "from-flag.sqlite")) == 2 * (1 + PROMPTS)  # another cache
    assert (tmp_path / "from-policy.sqlite").exists() and (tmp_path / "from-flag.sqlite").exists()
