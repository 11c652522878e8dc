"""A provider's prompt cache as Bedrock and Anthropic document it, for the fakes.

A request is read as a sequence of blocks (system blocks first, then each message's) with cache
points between them. At each cache point the prefix up to it is a cache key (the model, every
block's role and text, byte for byte); a point whose prefix is shorter than ``min_tokens`` is
ignored (the provider caches nothing there, without an error). The longest prefix found in the
cache, not expired, is read (and its entry lives ``ttl`` seconds from now again); the tokens from
there to the last valid point are written, and every valid point's prefix is stored. Tokens after
the last point are plain input. A request is looked up when it arrives, and what it writes can
be read once its reply has begun (``ready_in`` seconds later: the fake's latency), so requests
sent together with the first one that writes a prefix miss it, as they do at the providers.
More than ``max_points`` points is the provider's validation error (the fake answers it).
Unlike the providers, nothing is looked up between cache points (no "lookback" over earlier
block boundaries): a client gets a hit only where it placed a point, which is what rlmflow does
(a point at the end of every turn, the newest kept).

Time is the event loop's clock plus :meth:`PromptCache.advance`, so a test expires entries
without waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from rlmflow.models.base import estimate_tokens

__all__ = ["CacheUse", "Prompt", "PromptCache"]


@dataclass
class CacheUse:
    """What one request read from and wrote to the cache (tokens), and the points it carried."""

    read: int = 0
    write: int = 0
    points: int = 0


@dataclass
class Prompt:
    """A request's blocks in wire order, and after which of them a cache point stands."""

    texts: list[str] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # the running hash after each block
    points: list[int] = field(default_factory=list)  # indexes of blocks followed by a point
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256)

    def add(self, role: str, text: str) -> None:
        self._hash.update(f"\x00{role}\x00{len(text)}\x00".encode() + text.encode())
        self.texts.append(text)
        self.keys.append(self._hash.copy().digest())

    def point(self) -> None:
        """A cache point after the last block (one before any block is ignored, as it caches nothing)."""
        if self.texts:
            self.points.append(len(self.texts) - 1)

    @property
    def text(self) -> str:
        return "".join(self.texts)


class PromptCache:
    """The cache of one fake server (entries of every model, apart by model)."""

    def __init__(self, *, min_tokens: int = 1024, max_points: int = 4, ttl: float = 300.0) -> None:
        self.min_tokens = min_tokens
        self.max_points = max_points
        self.ttl = ttl
        self.entries: dict[bytes, tuple[float, float]] = {}  # key -> (readable from, expires)
        self.reads = self.writes = 0  # tokens, over every request
        self._offset = 0.0

    def advance(self, seconds: float) -> None:
        """Move the cache's clock forward (entries expire as if that much time had passed)."""
        self._offset += seconds

    def _now(self) -> float:
        return asyncio.get_running_loop().time() + self._offset

    def too_many(self, prompt: Prompt) -> bool:
        return len(prompt.points) > self.max_points

    def use(self, model: str, prompt: Prompt, *, ready_in: float = 0.0) -> CacheUse:
        """Read and write the cache for ``prompt``, arriving now, as the provider would; the tokens
        of each. What it writes is readable ``ready_in`` seconds from now."""
        now = self._now()
        valid: list[tuple[bytes, int]] = []
        for index in prompt.points:
            tokens = estimate_tokens("".join(prompt.texts[: index + 1]))
            if tokens >= self.min_tokens:
                valid.append((hashlib.sha256(model.encode() + prompt.keys[index]).digest(), tokens))
        if not valid:
            return CacheUse(points=len(prompt.points))
        read = 0
        for key, tokens in valid:
            ready, expires = self.entries.get(key, (0.0, 0.0))
            if ready <= now < expires:
                read = max(read, tokens)
        write = max(0, valid[-1][1] - read)
        for key, _tokens in valid:
            ready, expires = self.entries.get(key, (0.0, 0.0))
            if ready <= now < expires:  # read: its life renewed by this use
                self.entries[key] = (ready, now + self.ttl)
            else:  # written (again, if it expired, or if the write before has not landed yet)
                self.entries[key] = (now + ready_in, now + ready_in + self.ttl)
        self.reads += read
        self.writes += write
        return CacheUse(read, write, len(prompt.points))
