"""A scripted root model played by a fake provider, and a document for it to work on.

A fake's ``reply`` knob answers from the last message alone; :class:`CellScript` answers the
k-th request it sees with the k-th cell in a ```repl block, so a Bedrock or Anthropic fake can
play the root of a whole run (its sub-model must then be another model, or the script would
answer the sub-calls too). Used by the prompt-cache tests and ``benchmarks/cost.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CellScript", "harbour_document", "realistic_cells"]


class CellScript:
    """``reply`` for a fake: request k gets ``cells[k]`` (the last one again past the end)."""

    def __init__(self, cells: Sequence[str]) -> None:
        self.cells = list(cells)
        self.calls = 0

    def __call__(self, last: str) -> str:
        cell = self.cells[min(self.calls, len(self.cells) - 1)]
        self.calls += 1
        return f"Let me look.\n```repl\n{cell}\n```"


def harbour_document(records: int = 3000) -> str:
    """A long ledger of ship arrivals, one line a record (about 90 characters each)."""
    cargo = ("tea", "copper", "wool", "salt", "timber", "coffee", "tin", "grain")
    return "".join(
        f"Record {i}: the ship Vessel-{i % 97} docked at berth {i % 13} carrying {cargo[i % 8]} "
        f"({(i * 37) % 900 + 100} tonnes).\n"
        for i in range(records)
    )


def realistic_cells(turns: int = 12) -> list[str]:
    """``turns`` cells as a root writes them: look, grep, slice and count, each printing a few
    KB of different output, then ``FINAL`` in the last one."""
    looks = [
        "print(len(context)); print(context[:1500])",
        "hits = grep('copper', window=80)\nprint(len(hits)); print(hits[:12])",
        "print(context[20000:22500])",
        "hits = grep('berth 7', window=60)\nprint(hits[:20])",
        "import collections\nc = collections.Counter(l.split('carrying ')[1].split(' ')[0] "
        "for l in context.splitlines() if 'carrying' in l)\nprint(c.most_common())\nprint(context[40000:42000])",
        "print([l for l in context.splitlines() if 'Vessel-42 ' in l][:25])",
        "print(context[90000:92500])",
        "hits = grep('coffee', window=100)\nprint(len(hits)); print(hits[5:17])",
        "tonnes = [int(l.split('(')[1].split(' ')[0]) for l in context.splitlines() if '(' in l]\n"
        "print(sum(tonnes), max(tonnes)); print(context[150000:152000])",
        "print([l for l in context.splitlines() if 'berth 12' in l][:24])",
        "print(context[200000:202500])",
    ]
    cells = [looks[i % len(looks)] + (f"\nprint('pass {i}')" if i >= len(looks) else "") for i in range(turns - 1)]
    return [*cells, "FINAL('copper came in on many ships')"]
