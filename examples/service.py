"""A small ASGI service that answers questions over documents and streams each run's events.

    pip install 'rlmflow-async[service]' uvicorn
    uvicorn --factory examples.service:main   # embedded model; RLMFLOW_ROOT / RLMFLOW_SUB change it

    curl -N localhost:8000/runs -H 'content-type: application/json' \\
         -d '{"document": "...", "query": "...", "tenant": "acme"}'

``POST /runs`` answers with server-sent events, one per run event (``event: turn_started``,
``event: call_done``, ... and finally ``event: answer`` or ``event: run_failed``). Every tenant
has one budget ledger shared by all its runs, so a tenant's cap holds across concurrent
requests; every RLM in the process shares the default Dispatcher, so all requests share the
provider's rate limits. A client that disconnects cancels its run.

``GET /tenants/{tenant}/spend`` reads a tenant's ledger: what it spent (``calls``, ``input_tokens``,
``output_tokens``, ``cost_usd``) and, under ``reserved``, what its runs in flight hold (each call's
worst case until it settles; all zero once no run of the tenant is running). A run cancelled by a
disconnect is charged every request the provider had accepted (an unanswered one at its worst
case: the provider finishes and bills it), so ``spent`` never shows less than the provider bills.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rlmflow import RLM, Budget, BudgetExceededError, BudgetLedger, ConfigurationError, ContextError

TENANT_BUDGET = Budget(max_cost_usd=5.0, max_calls=5_000)
RUN_BUDGET = Budget(max_calls=500, deadline=300.0)


def create_app(rlm: RLM, *, tenant_budget: Budget = TENANT_BUDGET, run_budget: Budget = RUN_BUDGET) -> Starlette:
    """The service around ``rlm``; each tenant gets a ledger capped by ``tenant_budget``."""
    ledgers: dict[str, BudgetLedger] = {}

    async def start_run(request: Request) -> Response:
        try:
            body: dict[str, Any] = await request.json()
            document, query = body["document"], body["query"]
            tenant = body.get("tenant", "default")
            if not isinstance(tenant, str) or not tenant.isidentifier():
                raise TypeError("the tenant is a name")
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "send JSON with 'document', 'query' and a 'tenant' name"}, status_code=400)
        ledger = ledgers.setdefault(tenant, BudgetLedger(tenant_budget))
        try:  # stream() checks everything a run would refuse before it starts: errors come before the 200
            stream = rlm.stream(document, query, budget=run_budget, ledger=ledger, metadata={"tenant": tenant})
        except ContextError as exc:  # the document is unusable
            return JSONResponse({"error": exc.message}, status_code=422)
        except ConfigurationError as exc:  # an empty query; a model without a price or its key
            return JSONResponse({"error": exc.message}, status_code=400)
        except BudgetExceededError as exc:  # the tenant has nothing left to spend
            return JSONResponse({"error": exc.message, "limit": exc.limit}, status_code=402)

        async def events() -> AsyncIterator[str]:
            async with stream:  # leaving early (client gone) cancels the run
                async for event in stream:
                    yield f"event: {event.kind}\ndata: {json.dumps(event.to_dict(), default=str)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def tenant_spend(request: Request) -> Response:
        ledger = ledgers.get(request.path_params["tenant"])
        if ledger is None:
            return JSONResponse({"error": "unknown tenant"}, status_code=404)
        spent, reserved = ledger.spent, ledger.reserved
        return JSONResponse({"calls": spent.calls, "input_tokens": spent.input_tokens,
                             "output_tokens": spent.output_tokens, "cost_usd": spent.cost_usd,
                             "reserved": {"calls": reserved.calls, "input_tokens": reserved.input_tokens,
                                          "output_tokens": reserved.output_tokens, "cost_usd": reserved.cost_usd}})

    return Starlette(routes=[
        Route("/runs", start_run, methods=["POST"]),
        Route("/tenants/{tenant}/spend", tenant_spend, methods=["GET"]),
    ])


def main() -> Starlette:
    """The app uvicorn starts (``--factory``), on the models named by the environment."""
    root = os.environ.get("RLMFLOW_ROOT", "local:qwen2.5-coder-0.5b")
    return create_app(RLM(root=root, sub=os.environ.get("RLMFLOW_SUB") or None))
