"""Shared builders for tests: scripted roots that play a fixed sequence of code cells."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rlmflow import ModelRequest, ScriptedModel


def repl(code: str) -> str:
    return f"Let me run this.\n```repl\n{code}\n```"


def turn_script(cells: Sequence[str], *, name: str = "root") -> ScriptedModel:
    """A root that answers turn k of a run with cells[k]; child runs (depth > 0) get FINAL(context)."""

    def reply(request: ModelRequest) -> str:
        turn = sum(1 for m in request.messages if m.role == "assistant")
        return repl(cells[min(turn, len(cells) - 1)])

    return ScriptedModel(reply, name=name)


def echo_sub(transform: Callable[[str], str] = lambda p: p[:10], *, name: str = "sub") -> ScriptedModel:
    return ScriptedModel(lambda r: transform(r.messages[-1].content), name=name)
