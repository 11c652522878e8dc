"""One replica of a service, as a separate process, for the shared-lane tests and benchmark.

    python tests/redis_worker.py '<json spec>'

Builds a Dispatcher on the shared Redis lane of the spec, prints ``{"ready": pid}``, waits for a
line on stdin (so every replica starts together), sends its prompts with one ``call_many`` (or one
call per prompt against a shared budget), and prints one JSON line with what it got. Each prompt
is ``"<name>-<i>"``, so the parent can check every answer against the fake provider's.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict

from rlmflow import BudgetExceededError, Dispatcher, Limits, Message, ModelRequest, OpenAIModel, RLMError
from rlmflow.dispatch.budget import Budget, BudgetLedger
from rlmflow.dispatch.redis_budget import SharedBudget
from rlmflow.dispatch.shared import SharedConfig
from rlmflow.models._http import HTTPStatus


async def main(spec: dict) -> None:  # type: ignore[type-arg]
    config = SharedConfig(spec["url"], namespace=spec.get("namespace", "rlmflow"), lease=spec.get("lease", 30.0),
                          timeout=spec.get("timeout", 1.0)) if spec["url"] else None
    limits = Limits(**spec["limits"])
    dispatcher = Dispatcher(shared=config, limits={"openai": limits})  # no url: in memory (a baseline)
    model = OpenAIModel("fake", base_url=spec["base_url"])
    if dispatcher.shared is not None:
        await dispatcher.shared.connect()
    # warm the model's HTTP client up (imports, session, a kept-alive connection) off the lane: the
    # first request of a fresh process can otherwise reach the provider a few hundred ms after its
    # admission. The fake answers any other path 404 without counting it as a request. A warm-up
    # that fails some other way stops the replica (the test then fails on its missing "ready").
    try:
        await model._http.post(f"{model.endpoint}/warm-up", {}, {})
    except HTTPStatus as exc:
        if exc.status != 404:
            raise
    else:
        raise AssertionError("the fake provider answered a warm-up request")
    print(json.dumps({"ready": dispatcher.shared.replica_id if dispatcher.shared else "memory"}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    name, count, max_tokens = spec["name"], spec["prompts"], spec.get("max_tokens", 16)
    requests = [ModelRequest([Message("user", f"{name}-{i}")], max_tokens=max_tokens) for i in range(count)]
    started = time.perf_counter()
    cpu = time.process_time()
    out: dict[str, object] = {"name": name}
    waits: list[float] = []
    if "budget" in spec:  # one call at a time per task, against the tenant budget in Redis
        assert dispatcher.shared is not None
        tenant = SharedBudget(dispatcher.shared, spec["budget"]["name"], Budget(**spec["budget"]["caps"]))
        answers: list[str | None] = [None] * count
        refused = 0

        async def one(i: int) -> None:
            nonlocal refused
            try:
                (hold,) = await tenant.reserve_many([dispatcher.estimate(model, requests[i])])
            except BudgetExceededError:
                refused += 1
                return
            try:
                response = await dispatcher.call(model, requests[i], ledger=BudgetLedger())
            except RLMError:
                await hold.release()
                raise
            await hold.settle(response.usage)
            answers[i] = response.text

        failures = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
        out["errors"] = [f"{type(f).__name__}: {f}" for f in failures if f is not None]
        spent, reserved = await tenant.totals()
        out.update(answers=answers, refused=refused, spent=asdict(spent), reserved=asdict(reserved))
    elif "tasks" in spec:  # a few concurrent callers, each one call at a time (admission latency)
        answers_by_index: list[str | None] = [None] * count

        async def caller(first: int) -> None:
            for i in range(first, count, spec["tasks"]):
                response = await dispatcher.call(model, requests[i], ledger=BudgetLedger(),
                                                 record=lambda call: waits.append(call.queue_wait))
                answers_by_index[i] = response.text

        await asyncio.gather(*(caller(t) for t in range(spec["tasks"])))
        out.update(answers=answers_by_index, errors=[])
    else:
        results = await dispatcher.call_many(model, requests, ledger=BudgetLedger(),
                                             record=lambda call: waits.append(call.queue_wait))
        out["answers"] = [r.text if not isinstance(r, RLMError) else None for r in results]
        out["errors"] = [type(r).__name__ for r in results if isinstance(r, RLMError)]
    out.update(elapsed=time.perf_counter() - started, cpu=time.process_time() - cpu, queue_waits=waits)
    if dispatcher.shared is not None:
        stats = dispatcher.shared.statistics()
        out.update(mode=stats.mode, fallbacks=stats.fallbacks,
                   replicas=dispatcher.lane(model).replicas)  # type: ignore[union-attr]
    await dispatcher.aclose()
    await model.aclose()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
