"""The fake providers' cheap paths keep their semantics (no timing is asserted here).

The OpenAI fake encodes its answers from a template, serves its one route without aiohttp's
router and checks whether an admission is still in the sliding window in O(1); the benchmarks'
``fake_provider.py`` picks its event loop. Each is checked against what it replaced: ``json.dumps``
of the answer, the router's 404/405, a scan of the window.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .fakes import FakeAnthropicServer, FakeOpenAIServer
from .fakes.fake_openai import answer_for

FAKE_PROVIDER = Path(__file__).parent.parent / "benchmarks" / "fake_provider.py"


class _Clocked(FakeAnthropicServer):
    """The Anthropic fake (admit/settle are its public steps) on a clock the test moves."""

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.clock = 0.0

    def _now(self) -> float:
        return self.clock


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    async with session.post(url, json=body) as response:
        return response.status, response.headers["Content-Type"], await response.read()


@pytest.mark.anyio
@pytest.mark.parametrize("usage", [True, False])
async def test_answers_are_byte_for_byte_json_dumps_of_the_answer(usage: bool) -> None:
    body = {"model": "m\u00e9", "messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": "h\u00e9llo \u2603 \"q\""}],
            "max_tokens": 5}
    async with FakeOpenAIServer(usage=usage, output_tokens=8) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        first = await _post(session, url, body)
        second = await _post(session, url, {"messages": [{"role": "user", "content": "x" * 40}]})
    prompt_tokens = (len("be brief" + "h\u00e9llo \u2603 \"q\"") + 3) // 4
    expected: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m\u00e9",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer_for("h\u00e9llo \u2603 \"q\"")},
                     "finish_reason": "stop"}],
    }
    if usage:  # output is capped at max_tokens (5 < 8)
        expected["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5}
    assert first == (200, "application/json; charset=utf-8", json.dumps(expected).encode())
    # no model given: "fake"; no max_tokens: 16, so the whole output_tokens
    second_body = json.loads(second[2])
    assert second_body["id"] == "chatcmpl-2" and second_body["model"] == "fake"
    assert second_body.get("usage") == ({"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18}
                                        if usage else None)


@pytest.mark.anyio
async def test_other_paths_and_methods_are_refused_as_the_router_did() -> None:
    async with FakeOpenAIServer() as server, aiohttp.ClientSession() as session:
        root = server.base_url.removesuffix("/v1")
        async with session.post(root + "/v1/completions", json={}) as response:
            assert (response.status, await response.text()) == (404, "404: Not Found")
        async with session.get(server.base_url + "/chat/completions") as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"
        assert server.summary()["requests"] == 0  # neither reached the endpoint


@pytest.mark.anyio
async def test_quota_headers_and_refusals_keep_their_shape() -> None:
    async with FakeOpenAIServer(rpm=2, window=60.0, rate_headers=True) as server, aiohttp.ClientSession() as session:
        url = server.base_url + "/chat/completions"
        body = {"messages": [{"role": "user", "content": "hi"}]}
        for remaining in (1, 0):
            async with session.post(url, json=body) as response:
                assert response.status == 200
                assert response.headers["x-ratelimit-remaining-requests"] == str(remaining)
                assert response.headers["Content-Type"] == "application/json; charset=utf-8"
        async with session.post(url, json=body) as response:
            assert response.status == 429
            assert int(response.headers["retry-after-ms"]) > 59_000
            assert (await response.json())["error"]["code"] == "rate_limit_exceeded"
    assert server.summary()["rate_limited"] == 1


def test_settling_an_admission_that_left_the_window_leaves_the_window_alone() -> None:
    server = _Clocked(tpm=100, window=60.0)
    held = server.admit("x" * 40, "x" * 40, max_tokens=40)  # 10 prompt tokens + 40 held
    assert held.admitted is not None
    server.clock = 61.0
    later = server.admit("y" * 40, "y" * 40, max_tokens=40)  # the first one expires: 50 held
    assert later.admitted is not None
    server.settle(held, 0)  # 40 tokens returned, but not to a window that no longer counts them
    assert held.admitted.tokens == 10
    assert server.admit("z" * 40, "z" * 40, max_tokens=50).error == "throttle"  # 50 + 60 > 100


def test_settling_an_admission_still_in_the_window_returns_its_unused_tokens() -> None:
    server = _Clocked(tpm=100, window=60.0)
    held = server.admit("x" * 40, "x" * 40, max_tokens=40)
    server.clock = 59.0
    server.settle(held, 0)  # 50 held -> 10 used
    assert server.admit("z" * 40, "z" * 40, max_tokens=80).error is None  # 10 + 90 fits in 100


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.sampled_from([0.0, 0.0, 0.25, 1.0, 2.5, 4.0]), min_size=1, max_size=60),
       window=st.sampled_from([0.5, 1.0, 3.0]))
def test_the_window_check_agrees_with_a_scan_of_the_window(steps: list[float], window: float) -> None:
    """Ties in time included: the O(1) check is what ``any(x is item for x in window)`` said."""
    server = _Clocked(window=window)
    seen = []
    for step in steps:
        server.clock += step
        admission = server.admit("p", "p", max_tokens=1)
        assert admission.admitted is not None
        seen.append(admission.admitted)
        for item in seen:
            assert server._in_window(item) == any(x is item for x in server._recent)


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_fake_provider_process_names_its_event_loop(loop: str) -> None:
    try:
        import uvloop  # noqa: F401
        auto = "uvloop"
    except ImportError:
        auto = "asyncio"
    done = subprocess.run([sys.executable, str(FAKE_PROVIDER), "--loop", loop], input="", capture_output=True,
                          text=True, timeout=60, check=True)
    started, summary = (json.loads(line) for line in done.stdout.splitlines())
    assert started["base_url"].startswith("http://127.0.0.1:")
    assert started["loop"] == ("asyncio" if loop == "asyncio" else auto)
    assert summary["requests"] == 0
