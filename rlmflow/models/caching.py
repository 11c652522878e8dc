"""Prompt caching: where a request may ask a provider to cache its prefix, within the provider's rules.

A caller marks the messages whose end is worth caching (``Message(..., cache_point=True)``: the
system prompt, the end of each turn of a root's history, the shared prefix of a batch of
sub-calls). A model that caches (Bedrock Converse's ``cachePoint`` blocks, Anthropic's
``cache_control``) turns the marks into cache points with :func:`cache_points`, which keeps a mark
only where the prefix up to it is long enough to be cached at all (a shorter one is ignored by
the provider and would spend one of the few points a request may carry) and keeps the newest
marks when there are more than the provider allows. The system prompt's mark, when it qualifies,
is kept first: it is the one prefix every turn shares.

Defaults come from the providers' documentation (2026-12): Claude models cache from 1,024 tokens
(Haiku 3 and 3.5 from 2,048; Opus 4.5, Opus 4.6 and Haiku 4.5 from 4,096), Amazon Nova from
1,000, with at most 4 cache points a request; a cache entry lives 5 minutes from its last use.
Other models get no cache points (Bedrock refuses ``cachePoint`` for a model without caching).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .base import Message

__all__ = ["PromptCache", "cache_points", "default_prompt_cache", "resolve_prompt_cache"]


@dataclass(frozen=True, slots=True)
class PromptCache:
    """How a model asks for prompt caching.

    ``enabled``: cache points are sent at all. ``min_tokens``: the shortest prefix worth a cache
    point (the provider's minimum for the model; shorter prefixes are not cached).
    ``max_points``: the most cache points one request may carry.
    """

    enabled: bool = True
    min_tokens: int = 1024
    max_points: int = 4

    def __post_init__(self) -> None:
        if self.min_tokens < 1 or self.max_points < 1:
            raise ValueError("PromptCache.min_tokens and max_points must be at least 1")


#: Off: no cache points are sent.
NO_CACHE = PromptCache(enabled=False)

# (pattern on the model id, minimum tokens), first match wins; Claude ids as Anthropic and
# Bedrock write them (claude-haiku-4-5, anthropic.claude-3-5-haiku-..., us.anthropic.claude-opus-4-5-...)
_CLAUDE_MINIMUMS: tuple[tuple[re.Pattern[str], int], ...] = (
    (re.compile(r"claude-(opus-4-[56]|haiku-4-5)|claude-4-5-haiku"), 4096),
    (re.compile(r"claude-(3-haiku|3-5-haiku|haiku-3)"), 2048),
)
_CLAUDE = re.compile(r"claude")
_NOVA = re.compile(r"amazon\.nova-(micro|lite|pro|premier)")


def default_prompt_cache(provider: str, model_id: str) -> PromptCache:
    """The documented caching rules of ``model_id`` on ``provider``; off where it has none."""
    model = model_id.lower()
    if provider in ("anthropic", "aws.bedrock") and _CLAUDE.search(model):
        minimum = next((tokens for pattern, tokens in _CLAUDE_MINIMUMS if pattern.search(model)), 1024)
        return PromptCache(min_tokens=minimum, max_points=4)
    if provider == "aws.bedrock" and _NOVA.search(model):
        return PromptCache(min_tokens=1000, max_points=4)
    return NO_CACHE


def resolve_prompt_cache(setting: PromptCache | bool | None, provider: str, model_id: str) -> PromptCache:
    """A model constructor's ``prompt_cache`` argument as rules: ``None`` or ``True`` the model's
    defaults (``True`` turns them on with Claude's even for a model not known to cache),
    ``False`` off, a :class:`PromptCache` as given."""
    if isinstance(setting, PromptCache):
        return setting
    if setting is False:
        return NO_CACHE
    rules = default_prompt_cache(provider, model_id)
    return PromptCache() if setting is True and not rules.enabled else rules


def cache_points(
    messages: Sequence[Message], rules: PromptCache, count_tokens: Callable[[str], int]
) -> frozenset[int]:
    """The indexes of ``messages`` after which a cache point goes.

    A marked message qualifies when the messages up to and including it hold at least
    ``rules.min_tokens`` tokens (as ``count_tokens`` counts them). Of those, the system prompt's
    last mark is kept, then the newest others up to ``rules.max_points``.
    """
    if not rules.enabled or not any(m.cache_point for m in messages):
        return frozenset()
    qualified: list[int] = []
    tokens = 0
    # the system prompt goes first on the wire whatever its place in the list: count it first
    order = [i for i, m in enumerate(messages) if m.role == "system"]
    order += [i for i, m in enumerate(messages) if m.role != "system"]
    for index in order:
        message = messages[index]
        tokens += count_tokens(message.content)
        if message.cache_point and tokens >= rules.min_tokens:
            qualified.append(index)
    system = [i for i in qualified if messages[i].role == "system"][-1:]
    rest = [i for i in qualified if messages[i].role != "system"]
    room = rules.max_points - len(system)
    return frozenset(system + (rest[-room:] if room > 0 else []))
