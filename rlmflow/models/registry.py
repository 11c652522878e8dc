"""Model strings, for host-side configuration (CLI flags, config files, ``RLM(root=...)``).

``local:<name>`` or ``local:/path/model.gguf`` (embedded llama.cpp), ``openai:<model>[@<base_url>]``
(any OpenAI-compatible server), ``anthropic:<model>[@<base_url>]``, ``bedrock:<model-id>[@<region>]``
(a foundation model or inference profile id such as ``us.anthropic.claude-sonnet-4-5-20250929-v1:0``).
Each provider's module is imported only when a model of it is built. Sandbox code never reaches
this module: it names models by the aliases its RLM was given.
"""

from __future__ import annotations

import re

from .._exceptions import ConfigurationError, UnknownModelError
from .base import LanguageModel
from .weights import KNOWN_WEIGHTS

__all__ = ["DEFAULT_MODEL", "ModelRegistry", "build_model", "parse_model_string"]

DEFAULT_MODEL = "local:qwen2.5-coder-0.5b"

_FORMS = (
    "local:<name> (embedded: " + ", ".join(KNOWN_WEIGHTS) + "), local:/path/to/model.gguf, "
    "openai:<model> (OPENAI_BASE_URL / OPENAI_API_KEY), openai:<model>@<base_url>, "
    "anthropic:<model> (ANTHROPIC_API_KEY), bedrock:<model-id> (AWS credential chain, AWS_REGION), "
    "bedrock:<model-id>@<region>"
)
_REGION = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-\d")
_PROVIDERS = ("local", "openai", "anthropic", "bedrock", "strands")


def parse_model_string(spec: str) -> tuple[str, str, str | None]:
    """Split a model string into (provider, model, where); raise UnknownModelError if malformed.

    ``where`` is the base URL for ``openai`` and ``anthropic``, the region for ``bedrock``, else ``None``.
    """
    provider, sep, rest = spec.partition(":")
    if sep and not rest.strip() and provider in _PROVIDERS:
        raise UnknownModelError(
            f"model string {spec!r} names no model after {provider + ':'!r}; use one of: {_FORMS}"
        )
    if sep and not rest and provider:
        raise UnknownModelError(f"unknown provider {provider!r} in {spec!r}; use one of: {_FORMS}")
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
    if provider == "anthropic":
        model, at, base_url = rest.partition("@")
        if not model or (at and not base_url.startswith(("http://", "https://"))):
            raise UnknownModelError(f"malformed {spec!r}: expected anthropic:<model> or anthropic:<model>@https://host")
        return "anthropic", model, base_url or None
    if provider == "bedrock":
        model, at, region = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if not model or (at and not _REGION.fullmatch(region)):
            raise UnknownModelError(
                f"malformed {spec!r}: expected bedrock:<model-id> or bedrock:<model-id>@<region> (us-east-1)"
            )
        return "bedrock", model, region or None
    raise UnknownModelError(f"unknown provider {provider!r} in {spec!r}; use one of: {_FORMS}")


def build_model(provider: str, name: str, where: str | None, *, prompt_cache: bool = True) -> LanguageModel:
    """The model object of a parsed model string; its provider's module is imported here, not
    before. ``prompt_cache=False`` turns the provider's prompt caching off (Bedrock, Anthropic)."""
    cache = None if prompt_cache else False  # None: the model's own default rules
    if provider == "local":
        from .local import LocalModel

        return LocalModel(name)
    if provider == "anthropic":
        from .anthropic import AnthropicModel

        return AnthropicModel(name, base_url=where, prompt_cache=cache)
    if provider == "bedrock":
        from .bedrock import BedrockModel

        return BedrockModel(name, region=where, prompt_cache=cache)
    from .openai import OpenAIModel

    return OpenAIModel(name, base_url=where)


class ModelRegistry:
    """Turns model strings into model objects, sharing one instance per string.

    Sharing matters for local models: root and sub given the same ``local:`` string use one set
    of weights in memory. ``aclose`` closes what this registry created (never models passed in).
    ``prompt_cache=False``: the models it creates ask their provider for no prompt caching.
    """

    def __init__(self, *, prompt_cache: bool = True) -> None:
        self._created: dict[str, LanguageModel] = {}
        self.prompt_cache = prompt_cache

    def resolve(self, model: str | LanguageModel) -> LanguageModel:
        """The model a string names (built once per registry), or ``model`` itself.

        Raises :class:`UnknownModelError` for a malformed string and :class:`ConfigurationError`
        for anything that is neither a string nor a :class:`LanguageModel`.
        """
        if not isinstance(model, str):
            if not isinstance(model, LanguageModel):
                raise ConfigurationError(
                    f"a model is a model string or a LanguageModel, not {type(model).__name__}: {str(model)[:60]!r}"
                )
            return model
        existing = self._created.get(model)
        if existing is not None:
            return existing
        created = build_model(*parse_model_string(model), prompt_cache=self.prompt_cache)
        self._created[model] = created
        return created

    async def aclose(self) -> None:
        created, self._created = list(self._created.values()), {}
        for model in created:
            await model.aclose()
