"""Model strings: ``local:qwen2.5-coder-0.5b``, ``local:/path/model.gguf``, ``openai:<model>@<base_url>``."""

from __future__ import annotations

from .._exceptions import UnknownModelError
from .base import LanguageModel
from .weights import KNOWN_WEIGHTS

__all__ = ["DEFAULT_MODEL", "ModelRegistry", "parse_model_string"]

DEFAULT_MODEL = "local:qwen2.5-coder-0.5b"

_FORMS = (
    "local:<name> (embedded: " + ", ".join(KNOWN_WEIGHTS) + "), local:/path/to/model.gguf, "
    "openai:<model> (OPENAI_BASE_URL / OPENAI_API_KEY), openai:<model>@<base_url>"
)


def parse_model_string(spec: str) -> tuple[str, str, str | None]:
    """Split a model string into (provider, model, base_url); raise UnknownModelError if malformed."""
    provider, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UnknownModelError(f"model string {spec!r} has no provider prefix; use one of: {_FORMS}")
    if provider == "local":
        if rest not in KNOWN_WEIGHTS and not rest.endswith(".gguf"):
            raise UnknownModelError(
                f"unknown local model {rest!r}: embedded models are {', '.join(KNOWN_WEIGHTS)}, "
                "or give a path ending in .gguf"
            )
        return "local", rest, None
    if provider == "openai":
        model, at, base_url = rest.partition("@")
        if not model or (at and not base_url.startswith(("http://", "https://"))):
            raise UnknownModelError(f"malformed {spec!r}: expected openai:<model> or openai:<model>@http(s)://host/v1")
        return "openai", model, base_url or None
    raise UnknownModelError(f"unknown provider {provider!r} in {spec!r}; use one of: {_FORMS}")


class ModelRegistry:
    """Turns model strings into model objects, sharing one instance per string.

    Sharing matters for local models: root and sub given the same ``local:`` string use one set
    of weights in memory. ``aclose`` closes what this registry created (never models passed in).
    """

    def __init__(self) -> None:
        self._created: dict[str, LanguageModel] = {}

    def resolve(self, model: str | LanguageModel) -> LanguageModel:
        if not isinstance(model, str):
            return model
        existing = self._created.get(model)
        if existing is not None:
            return existing
        provider, name, base_url = parse_model_string(model)
        created: LanguageModel
        if provider == "local":
            from .local import LocalModel

            created = LocalModel(name)
        else:
            from .openai import OpenAIModel

            created = OpenAIModel(name, base_url=base_url)
        self._created[model] = created
        return created

    async def aclose(self) -> None:
        created, self._created = list(self._created.values()), {}
        for model in created:
            await model.aclose()
