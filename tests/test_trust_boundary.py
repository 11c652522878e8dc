"""The host trusts nothing sandbox code sends: hostile requests through the real worker and bridge.

Sandbox code here does what a prompt-injected model would: it names models by provider string,
URL or path, asks for absurd ``max_tokens``, sends oversized or malformed batches, and reaches
past the friendly API to the worker's raw channel. Each is refused inside the cell with a
message the model can act on, and the run goes on with its variables intact.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from rlmflow import RLM, BridgeLimits, ConfigurationError, ModelRequest, ScriptedModel

from .helpers import turn_script

pytestmark = pytest.mark.anyio

# Reaches the worker object behind the friendly API, as hostile code can: through closures.
RAW = (
    "def _dig(f, depth=0):\n"
    "    for c in getattr(f, '__closure__', None) or ():\n"
    "        v = c.cell_contents\n"
    "        if hasattr(v, 'call_host'):\n"
    "            return v\n"
    "        if callable(v) and depth < 4 and (found := _dig(v, depth + 1)) is not None:\n"
    "            return found\n"
    "w = _dig(llm_query_many)\n"
)


@pytest.fixture
def listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP listener on 127.0.0.1 that records every connection's first bytes."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(1)
                try:
                    received.append(conn.recv(65536))
                except OSError:
                    received.append(b"")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], received
    stop.set()
    thread.join()
    server.close()


def outputs(result_transcript: list[object]) -> str:
    return "\n".join(turn.feedback for turn in result_transcript)  # type: ignore[attr-defined]


async def test_model_strings_urls_and_paths_are_refused(
    listener: tuple[int, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, received = listener
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host-secret-never-leaves")
    hostile = [
        f"openai:x@http://127.0.0.1:{port}/v1",
        f"http://127.0.0.1:{port}/v1",
        "local:/etc/passwd.gguf",
        "local:qwen2.5-coder-0.5b",
        "sub",  # the model's name is not an alias
    ]
    cells = [
        f"errors = []\nfor m in {hostile!r}:\n"
        "    try:\n        llm_query('hi', model=m)\n    except Exception as e:\n"
        "        errors.append((type(e).__name__, str(e)))\nprint(errors)",
        "print(llm_query('ping', model='fast'), llm_query('ping'), len(errors))",
        "FINAL('ok')",
    ]
    sub = ScriptedModel(lambda r: "from-sub", name="sub")
    fast = ScriptedModel(lambda r: "from-fast", name="fast-model")
    async with RLM(root=turn_script(cells), sub=sub, sub_models={"fast": fast}) as rlm:
        result = await rlm.run("a document", "q?")
    feedback = outputs(result.transcript)
    assert feedback.count("SandboxRequestError") == len(hostile)
    assert "can only use these models: default, fast" in feedback
    assert "from-fast from-sub 5" in feedback  # aliases work and the variables survived
    assert received == []  # nothing was sent anywhere, with or without the host's key
    assert len(sub.requests) == 1 and len(fast.requests) == 1


async def test_max_tokens_clamped_and_typed() -> None:
    cells = [
        "print(llm_query('a', max_tokens=10**12))",
        "try:\n    llm_query('b', max_tokens='9'*5000)\nexcept Exception as e:\n    print(type(e).__name__)",
        "print(llm_query('c', max_tokens=-5))\nFINAL('done')",
    ]
    sub = ScriptedModel(lambda r: str(r.max_tokens), name="sub")
    limits = BridgeLimits(max_output_tokens=300)
    async with RLM(root=turn_script(cells), sub=sub, bridge_limits=limits) as rlm:
        result = await rlm.run("doc", "q?")
    assert [r.max_tokens for r in sub.requests] == [300, 1]
    assert "SandboxRequestError" in result.transcript[1].feedback


async def test_oversized_batches_and_prompts_refused_before_any_call() -> None:
    cells = [
        "try:\n    llm_query_many(['x'] * 6)\nexcept Exception as e:\n    print('batch', type(e).__name__, e)",
        "try:\n    llm_query('y' * 101)\nexcept Exception as e:\n    print('prompt', type(e).__name__)",
        "try:\n    llm_query_many(['z' * 60, 'z' * 60])\nexcept Exception as e:\n    print('total', type(e).__name__)",
        "kept = llm_query_many(['ok1', 'ok2'])\nFINAL(','.join(kept))",
    ]
    sub = ScriptedModel(lambda r: r.messages[-1].content.upper(), name="sub")
    limits = BridgeLimits(max_batch_items=5, max_prompt_chars=100, max_batch_chars=100)
    async with RLM(root=turn_script(cells), sub=sub, bridge_limits=limits) as rlm:
        result = await rlm.run("doc", "q?")
    feedback = outputs(result.transcript)
    assert "batch SandboxRequestError" in feedback and "split it into smaller batches" in feedback
    assert "prompt SandboxRequestError" in feedback and "total SandboxRequestError" in feedback
    assert result.answer == "OK1,OK2"
    assert len(sub.requests) == 2  # nothing of the refused batches was sent


async def test_sub_call_cap_without_budget() -> None:
    cells = [
        "a = llm_query_many([f'p{i}' for i in range(8)])\n"
        "try:\n    llm_query_many([f'q{i}' for i in range(3)])\nexcept Exception as e:\n    print(type(e).__name__, e)",
        "FINAL(str(len(a)))",
    ]
    sub = ScriptedModel(lambda r: "x", name="sub")
    async with RLM(root=turn_script(cells), sub=sub, bridge_limits=BridgeLimits(max_sub_calls=10)) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == "8"
    assert "SandboxRequestError" in result.transcript[0].feedback
    assert len(sub.requests) == 8


async def test_raw_channel_garbage_is_refused() -> None:
    """Past the friendly wrappers: wrong types, unknown functions, hostile child contexts."""
    attacks = {
        "unknown_fn": "w.call_host('os_system', cmd='id')",
        "prompts_not_list": "w.call_host('llm_query_many', prompts='abc')",
        "prompt_not_str": "w.call_host('llm_query_many', prompts=[1, 2])",
        "model_not_str": "w.call_host('llm_query_many', prompts=['a'], model={'provider': 'openai'})",
        "tokens_float": "w.call_host('llm_query_many', prompts=['a'], max_tokens=1.5)",
        "child_not_map": "w.call_host('rlm_query_many', items=['a'])",
        "child_bad_context": "w.call_host('rlm_query_many', items=[{'prompt': 'a', 'context': {'k': 1}}])",
    }
    code = RAW + "out = {}\n"
    for name, call in attacks.items():
        code += f"try:\n    {call}\n    out[{name!r}] = 'accepted'\n"
        code += f"except Exception as e:\n    out[{name!r}] = type(e).__name__\n"
    code += "print(out)\nFINAL('survived')"
    sub = ScriptedModel(lambda r: "x", name="sub")
    async with RLM(root=turn_script([code]), sub=sub) as rlm:
        result = await rlm.run("doc", "q?")
    assert result.answer == "survived"
    feedback = result.transcript[0].feedback
    for name in attacks:
        assert f"'{name}': 'SandboxRequestError'" in feedback, feedback
    assert sub.requests == []


async def test_control_characters_never_reach_root_or_answer() -> None:
    seen: list[str] = []

    def root_reply(request: ModelRequest) -> str:
        seen.append(request.messages[-1].content)
        turn = sum(1 for m in request.messages if m.role == "assistant")
        code = [
            r"print('\x1b[2J\x1b]0;pwned\x07visible\r\x08')",
            r"FINAL('\x1b[31mred\x1b[0m answer\x00')",
        ][min(turn, 1)]
        return f"```repl\n{code}\n```"

    async with RLM(root=ScriptedModel(root_reply, name="root")) as rlm:
        result = await rlm.run("doc", "q?")
    assert "\x1b" not in result.answer and "\x00" not in result.answer
    assert "red answer" in result.answer
    feedback = seen[-1]
    assert "visible" in feedback
    assert not any(ch in feedback for ch in "\x1b\x07\x08\r\x00")


def test_aliases_validated_at_configuration() -> None:
    sub = ScriptedModel(lambda r: "x", name="sub")
    with pytest.raises(ConfigurationError, match="alias"):
        RLM(root=sub, sub_models={"default": sub})
    with pytest.raises(ConfigurationError, match="alias"):
        RLM(root=sub, sub_models={"http://x": sub})
    with pytest.raises(ValueError):
        BridgeLimits(max_batch_items=0)
