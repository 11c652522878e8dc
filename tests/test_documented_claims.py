"""Claims the docs make that had no test: output_weight in TPM admission, .partial after a root
model error and after a sandbox that cannot run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from rlmflow import (
    RLM,
    Budget,
    BudgetExceededError,
    BudgetLedger,
    Dispatcher,
    FatalModelError,
    Limits,
    ModelRequest,
    SandboxCrashedError,
    ScriptedModel,
    SharedBudget,
    SharedConfig,
    SharedState,
    Spend,
    Usage,
)
from rlmflow.sandbox.base import Context, SandboxSession

from .helpers import turn_script
from .redis_server import RedisServer

pytestmark = pytest.mark.anyio


async def sent(limits: Limits, *, once: int, then: float = 0.0) -> int:
    """How many of two small calls (``max_tokens`` 10) a lane with ``limits`` has sent once ``once``
    were sent (waited for, 10 s at most) and ``then`` seconds more passed (each call is held by
    the provider, so its reservation is not corrected to its real usage meanwhile)."""

    async def held(request: ModelRequest) -> str:
        await anyio.sleep_forever()
        return "never"

    model = ScriptedModel(held, name="m", provider="fake")
    dispatcher = Dispatcher(limits={"fake": limits})
    requests = [ModelRequest.from_prompt("hi", max_tokens=10) for _ in range(2)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: dispatcher.call_many(model, requests, ledger=BudgetLedger()))
        with anyio.move_on_after(10):
            while len(model.requests) < once:  # noqa: ASYNC110 - the scripted model has no event
                await anyio.sleep(0.01)
        await anyio.sleep(then)
        tg.cancel_scope.cancel()
    return len(model.requests)


async def test_output_weight_counts_max_tokens_that_many_times_against_tpm() -> None:
    # each call holds its input estimate (5 tokens) + max_tokens x output_weight against a 60 s window
    assert await sent(Limits(tpm=40, output_weight=1.0), once=2) == 2  # 15 + 15 fit in 40
    # 35 + 35 do not: the second is still held back 0.5 s after the first was sent
    assert await sent(Limits(tpm=40, output_weight=3.0), once=1, then=0.5) == 1


async def test_a_root_model_error_ends_the_run_with_what_was_paid() -> None:
    def root(request: ModelRequest) -> str | BaseException:
        if any(m.role == "assistant" for m in request.messages):
            return FatalModelError("the model is gone", provider="scripted", model="root")
        return "```repl\nprint(llm_query('a'))\n```"

    async with RLM(root=ScriptedModel(root, name="root"), sub=ScriptedModel(["x"], name="sub")) as rlm:
        with pytest.raises(FatalModelError) as caught:
            await rlm.run("doc", "q?")
    partial = caught.value.partial
    assert partial is not None and partial.answer == "" and partial.turns == 1
    assert [c.role for c in partial.calls] == ["root", "sub", "root"] and partial.calls[-1].error == "FatalModelError"


class _NoSandbox:
    @asynccontextmanager
    async def session(self, context: Context, bridge: Any) -> AsyncIterator[SandboxSession]:
        raise SandboxCrashedError("the worker could not start")
        yield  # pragma: no cover


async def test_a_sandbox_that_cannot_run_ends_the_run_with_a_partial() -> None:
    async with RLM(root=turn_script(["print(1)"]), sandbox=_NoSandbox()) as rlm:  # type: ignore[arg-type]
        with pytest.raises(SandboxCrashedError) as caught:
            await rlm.run("doc", "q?")
    assert caught.value.partial is not None and caught.value.partial.turns == 0


async def test_a_shared_budget_refuses_while_redis_is_down_and_sends_nothing(redis_server: RedisServer) -> None:
    async with SharedState(SharedConfig(redis_server.url, timeout=0.5)) as state:
        tenant = SharedBudget(state, "acme", Budget(max_calls=10))
        held = await tenant.reserve(Spend(calls=1))
        await held.settle(Usage(1, 1, 1))
        redis_server.stop()
        with pytest.raises(BudgetExceededError) as caught:
            await tenant.reserve(Spend(calls=1))
    assert caught.value.limit == "shared" and "nothing was sent" in caught.value.message


async def test_tracebacks_the_root_reads_name_no_host_path() -> None:
    cells = ["import json\ntry:\n    json.loads('{bad')\nexcept ValueError as e:\n    raise KeyError('k') from e"]
    root = turn_script([*cells, "grep(5)", "FINAL('x')"])
    async with RLM(root=root, max_turns=3) as rlm:
        result = await rlm.run("doc", "q?")
    shown = "\n".join(turn.feedback for turn in result.transcript)
    assert 'File "json/decoder.py"' in shown and "KeyError" in shown  # the library frame, as the model knows it
    for host_path in ("/work/", "/root/", "/usr/lib/", "site-packages", "/rlmflow/"):
        assert host_path not in shown, host_path
