"""What identifies a model call across processes: its model and everything that shapes its answer."""

from __future__ import annotations

import functools
import hashlib
import json

from ..models.base import LanguageModel, ModelRequest

__all__ = ["request_key", "text_digest"]


def request_key(model: LanguageModel, request: ModelRequest) -> str:
    """A digest of the model (provider, name, endpoint) and of the request (messages, generation
    limit, sampling settings, any reply schema or choices): two calls with the same key would be
    asked the same thing."""
    endpoint = getattr(model, "endpoint", None)
    shape: list[object] = [
        model.provider, model.name, endpoint if isinstance(endpoint, str) else None,
        request.max_tokens, request.temperature, request.top_p, list(request.stop), request.reasoning_effort,
        [[message.role, _content(message.content)] for message in request.messages],
    ]
    if request.json_schema is not None:  # added only when set: keys of earlier journals stay valid
        shape.append(dict(request.json_schema))
    if request.choices:  # likewise
        shape.append(["choices", list(request.choices)])
    return text_digest(json.dumps(shape, ensure_ascii=False, separators=(",", ":")))


_LONG = 8192  # characters from which a message is keyed by its digest, computed once per text


def _content(text: str) -> str:
    """A message as its key holds it: a long one by its digest, remembered for the few texts seen
    last, so that a batch whose every request repeats one long prefix hashes that prefix once,
    not once per request (sandbox code sets the batch's size)."""
    return text if len(text) < _LONG else "sha256:" + _long_digest(text)


@functools.lru_cache(maxsize=8)  # str caches its hash: a repeated prefix costs one lookup
def _long_digest(text: str) -> str:
    return text_digest(text)


def text_digest(text: str) -> str:
    """SHA-256 of ``text`` (lone surrogates from sandbox text included)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
