"""Vetted helpers for model code in the sandbox: ``grep`` and ``chunks``.

Small root models (0.5B-1.5B) often write the search-and-slice code of an RLM turn wrongly (an
off-by-one slice, a regex that fails on a special character, a print that dumps megabytes);
they call a documented helper correctly far more often. Both helpers read ``context`` from the
namespace at call time, and both return plain lists (of str) whose ``repr`` is a short summary,
so a bare ``grep("key")`` as the last line of a cell shows something useful and never floods.

Standard library only: the worker (stdlib + msgpack) imports this file by path, like its other
siblings, and :func:`install` adds the helpers to the namespace. It never imports ``rlmflow``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["Chunks", "Hits", "install"]

_PREVIEW = 160
# words too common to stand for a phrase when grep falls back to one word of it
_COMMON = frozenset((
    "that", "this", "with", "from", "what", "where", "when", "which", "have", "were", "there", "their",
    "they", "them", "than", "then", "about", "into", "according", "does", "said", "says", "will", "would",
    "could", "should", "been", "being", "your", "some", "other", "only", "over", "such",
))


class Hits(list):  # type: ignore[type-arg]
    """Snippets around matches (a list of str); ``positions`` holds (document, offset) per hit."""

    def __init__(
        self, snippets: list[str], positions: list[tuple[Any, int]], total: int, pattern: str, word: str | None = None
    ) -> None:
        super().__init__(snippets)
        self.positions = positions
        self.total = total
        self.pattern = pattern
        self.word = word  # set when the whole pattern matched nothing and these are one word's matches

    def __repr__(self) -> str:
        if not self:
            return f"grep({self.pattern!r}): no match (try one distinctive word)"
        shown = f" (first {len(self)} shown)" if self.total > len(self) else ""
        if self.word is not None:
            head = f"grep({self.pattern!r}): no match for the whole phrase; {self.total} match(es) for {self.word!r}"
        else:
            head = f"grep({self.pattern!r}): {self.total} match(es)"
        lines = [head + shown]
        for index, snippet in enumerate(self):
            lines.append(f"[{index}] {snippet}")
        return "\n".join(lines)

    __str__ = __repr__


class Chunks(list):  # type: ignore[type-arg]
    """Consecutive pieces of the context (a list of str) that together hold all of it."""

    def __repr__(self) -> str:
        sizes = [len(c) for c in self]
        head = f"{len(self)} chunk(s), {min(sizes, default=0):,}-{max(sizes, default=0):,} characters each"
        previews = [f"[{i}] begins: {c[:80]!r}" for i, c in enumerate(self[:5])]
        more = [f"... and {len(self) - 5} more"] if len(self) > 5 else []
        return "\n".join([head, *previews, *more])

    __str__ = __repr__


def _documents(context: Any) -> Iterator[tuple[Any, str]]:
    if isinstance(context, str):
        yield None, context
    elif isinstance(context, Mapping):
        yield from ((name, str(text)) for name, text in context.items())
    elif isinstance(context, (list, tuple)):
        yield from enumerate(str(text) for text in context)
    else:
        yield None, str(context)


def _compile(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    flags = re.IGNORECASE if ignore_case else 0
    try:
        return re.compile(pattern, flags)
    except re.error:  # "what is $5?" or "f(x" : search for the words as written
        return re.compile(re.escape(pattern), flags)


def install(namespace: dict[str, Any]) -> Callable[..., str]:
    """Add ``grep`` and ``chunks`` to a sandbox namespace (they read ``namespace['context']``) and
    ``Final``/``final`` as aliases of ``FINAL``; return the function that tells what a cell
    established. It is the worker's, not the namespace's: cell code cannot redefine what the
    worker reports after each cell."""
    reserved = set(namespace) | {"grep", "chunks"}  # taken before any cell ran: never reported as established
    namespace["grep"] = _grep_for(namespace)
    namespace["chunks"] = _chunks_for(namespace)
    if "FINAL" in namespace:  # small models write Final(...) or final(...) as often as FINAL(...)
        namespace.setdefault("Final", namespace["FINAL"])
        namespace.setdefault("final", namespace["FINAL"])
    return _established_for(namespace, reserved)


# -- grep ---------------------------------------------------------------------------------------------
def _grep_for(namespace: Mapping[str, Any]) -> Callable[..., Hits]:
    def grep(pattern: str, window: int = 300, max_hits: int = 20, ignore_case: bool = True) -> Hits:
        """Find ``pattern`` (a regex, or plain words) in ``context``.

        Returns up to ``max_hits`` snippets: each match with ``window`` characters on each side,
        prefixed by its position ("@12,345: ..."). Use ``grep(...).positions`` for the offsets.
        """
        if not isinstance(pattern, str) or not pattern:
            raise TypeError("grep(pattern): give the text or regex to search for, as a non-empty str")
        window = max(0, int(window))
        context = namespace.get("context", "")
        hits = _search(context, _compile(pattern, ignore_case), pattern, window, max_hits)
        if hits.total or " " not in pattern.strip():
            return hits
        return _best_word(context, pattern, window, max_hits, ignore_case) or hits

    return grep


def _best_word(context: Any, pattern: str, window: int, max_hits: int, ignore_case: bool) -> Hits | None:
    """The matches of the phrase's most specific word that occurs (fewest matches), if any.

    Small models search for a whole phrase of the question, which the text rarely repeats
    verbatim: grep falls back to this.
    """
    best: Hits | None = None
    for word in sorted(set(re.findall(r"[A-Za-z][A-Za-z'-]{3,}", pattern)), key=len, reverse=True):
        if word.lower() in _COMMON:
            continue
        found = _search(context, _compile(re.escape(word), ignore_case), pattern, window, max_hits, word=word)
        if found.total and (best is None or found.total < best.total):
            best = found
    return best


def _search(
    context: Any, compiled: re.Pattern[str], pattern: str, window: int, max_hits: int, word: str | None = None
) -> Hits:
    snippets: list[str] = []
    positions: list[tuple[Any, int]] = []
    total = 0
    for name, text in _documents(context):
        for match in compiled.finditer(text):
            total += 1
            if len(snippets) < max_hits:
                start, end = max(0, match.start() - window), min(len(text), match.end() + window)
                where = f"@{match.start():,}" if name is None else f"{name!r} @{match.start():,}"
                snippets.append(f"{where}: {text[start:end]}")
                positions.append((name, match.start()))
    return Hits(snippets, positions, total, pattern, word)


# -- chunks -------------------------------------------------------------------------------------------
def _chunks_for(namespace: Mapping[str, Any]) -> Callable[..., Chunks]:
    def chunks(n: int = 10) -> Chunks:
        """Split ``context`` into pieces, cutting at line ends where possible.

        ``chunks(10)``: ten pieces of about equal size; ``chunks(20000)`` (1000 or more): pieces of
        about 20,000 characters each. Several documents are joined, each headed by its name.
        """
        n = int(n)
        if n < 1:
            raise ValueError("chunks(n): n must be at least 1")
        text = _joined(namespace.get("context", ""))
        cuts = _cuts_by_size(text, n) if n >= 1000 else _cuts_by_count(text, n)
        pieces = [text[a:b] for a, b in zip([0, *cuts[:-1]], cuts, strict=True) if b > a]
        return Chunks(pieces)

    return chunks


def _joined(context: Any) -> str:
    """The context as one text: a lone unnamed document as it is, several each headed by its name."""
    parts = list(_documents(context))
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    return "\n\n".join(f"=== document {name!r} ===\n{body}" for name, body in parts)


def _cuts_by_size(text: str, size: int) -> list[int]:
    """Ends of pieces of about ``size`` characters, each cut at the last line end before it."""
    cuts, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            newline = text.rfind("\n", start + size // 2, end)
            end = newline + 1 if newline != -1 else end
        cuts.append(end)
        start = end
    return cuts


def _cuts_by_count(text: str, n: int) -> list[int]:
    """Ends of ``n`` pieces of about equal size, each target moved to the next line end nearby."""
    step = len(text) / n
    cuts: list[int] = []
    for index in range(1, n):
        target = int(index * step)
        newline = text.find("\n", target, target + max(1, int(step) // 2))
        cut = newline + 1 if newline != -1 else target
        if (not cuts or cut > cuts[-1]) and cut < len(text):
            cuts.append(cut)
    cuts.append(len(text))
    return cuts


# -- what a cell established --------------------------------------------------------------------------
def _established_for(namespace: dict[str, Any], reserved: set[str]) -> Callable[..., str]:
    seen: dict[str, tuple[int, int]] = {}  # the marks after the previous call

    def established(limit: int = 6, width: int = 100) -> str:
        """The variables the last cell created or changed, one short line each ("" if none).

        The worker calls it after each cell so the root model sees what its code established,
        not only what it printed. Changes are told by identity and size, so an in-place append counts.
        """
        current = _marks(namespace, reserved)
        changed = [name for name, mark in current.items() if seen.get(name) != mark]
        seen.clear()
        seen.update(current)
        lines = [_describe(name, namespace[name], width) for name in changed[:limit]]
        if len(changed) > limit:
            lines.append(f"... and {len(changed) - limit} more: {', '.join(changed[limit:])}")
        return "\n".join(lines)

    return established


def _marks(namespace: dict[str, Any], reserved: set[str]) -> dict[str, tuple[int, int]]:
    """(identity, size) of each variable a cell may have set: not private names, helpers, callables or modules."""
    current: dict[str, tuple[int, int]] = {}
    for name, value in list(namespace.items()):
        if name.startswith("_") or name in reserved or callable(value) or type(value).__name__ == "module":
            continue
        try:
            size = len(value)
        except TypeError:
            size = -1
        current[name] = (id(value), size)
    return current


def _describe(name: str, value: Any, width: int) -> str:
    """One line: the name, its repr cut to ``width``, its type and extent."""
    try:
        text = repr(value)
    except Exception:  # a user object whose repr fails: name its type only
        text = f"<{type(value).__name__}>"
    text = text if len(text) <= width else text[: width - 3] + "..."
    extent = f", {len(value):,} items" if isinstance(value, (list, tuple, dict, set)) else (
        f", {len(value):,} characters" if isinstance(value, str) else "")
    return f"{name} = {text} ({type(value).__name__}{extent})"
