"""Cost of a call in USD, from the offline ``genai-prices`` tables with user overrides.

A price is ``None`` when it is unknown: an unknown price is reported as unknown, never as zero.
Local models cost nothing. A model may also declare its own ``price`` (the Dispatcher reads it
when neither an override nor the tables know the model); test doubles do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..models.base import Usage

__all__ = ["Price", "Pricing"]

# rlmflow provider names -> genai-prices provider ids
_PROVIDER_IDS = {"openai": "openai", "anthropic": "anthropic", "aws.bedrock": "aws"}
_FREE_PROVIDERS = {"llama.cpp"}


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million input and output tokens, and per million input tokens read from and written
    to a prompt cache (``None``: at the input price, for a model that has no cache prices)."""

    input_per_mtok: float
    output_per_mtok: float
    cache_read_per_mtok: float | None = None
    cache_write_per_mtok: float | None = None

    def cost(self, usage: Usage) -> float:
        read = self.input_per_mtok if self.cache_read_per_mtok is None else self.cache_read_per_mtok
        write = self.input_per_mtok if self.cache_write_per_mtok is None else self.cache_write_per_mtok
        plain = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
        return (plain * self.input_per_mtok + usage.cache_read_tokens * read + usage.cache_write_tokens * write
                + usage.output_tokens * self.output_per_mtok) / 1e6

    @classmethod
    def anthropic_style(cls, input_per_mtok: float, output_per_mtok: float) -> Price:
        """A price with the cache rates of Claude on Anthropic and Bedrock: a read costs 0.1x the
        input price, a write (5-minute cache) 1.25x."""
        return cls(input_per_mtok, output_per_mtok, input_per_mtok * 0.1, input_per_mtok * 1.25)


class Pricing:
    """Looks up prices: ``overrides`` first, then genai-prices.

    An override is keyed by ``"provider:model"`` (the same model name priced apart per provider:
    ``"openai:llama-3-70b"``) or by the model name alone (any provider):
    ``Pricing(overrides={"my-vllm-model": Price(0.1, 0.2)})`` prices a self-hosted model.
    """

    def __init__(self, overrides: Mapping[str, Price] | None = None) -> None:
        self._overrides = dict(overrides or {})
        self._unknown: set[tuple[str, str]] = set()
        # genai-prices costs ~0.1 ms a lookup (Decimal arithmetic over a unit registry); a model
        # whose price is a plain per-token rate is priced in floats once that rate has been
        # checked against genai-prices' own answer (False: tiered or otherwise not linear)
        self._linear: dict[tuple[str, str], tuple[Price, float] | bool] = {}  # (rate, valid below)

    def cost(self, provider: str, model: str, usage: Usage) -> float | None:
        """The cost of ``usage`` on ``model``, or ``None`` if no price is known."""
        override = self._overrides.get(f"{provider}:{model}") or self._overrides.get(model)
        if override is not None:
            return override.cost(usage)
        if provider in _FREE_PROVIDERS:
            return 0.0
        key = (provider, model)
        if key in self._unknown:
            return None
        plain = not usage.cache_read_tokens and not usage.cache_write_tokens
        linear = self._linear.get(key)
        if plain and isinstance(linear, tuple) and usage.input_tokens < linear[1]:
            return linear[0].cost(usage)
        try:
            from genai_prices import Usage as PriceUsage
            from genai_prices import calc_price
        except ImportError:  # pragma: no cover - genai-prices is optional
            self._unknown.add((provider, model))
            return None
        try:
            calculation = calc_price(
                PriceUsage(
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cache_read_tokens=usage.cache_read_tokens or None,
                    cache_write_tokens=usage.cache_write_tokens or None,
                ),
                model_ref=model,
                provider_id=_PROVIDER_IDS.get(provider, provider),
            )
        except LookupError:
            self._unknown.add(key)
            return None
        total = float(calculation.total_price)
        if plain and key not in self._linear:
            rate = _linear_rate(calculation.model_price, usage, total)
            if rate is not None:
                self._linear[key] = rate
        return total


def _linear_rate(model_price: Any, usage: Usage, total: float) -> tuple[Price, float] | bool | None:
    """The float rate of ``model_price`` for plain token usage and the input size it holds below
    (a tier's start: crossing it reprices every token), False if it has none, None if ``usage``
    cannot tell (it is above the first tier)."""
    rates = vars(model_price)
    bases: list[float] = []
    below = math.inf
    for name in ("input_mtok", "output_mtok"):
        rate = rates.get(name)
        if isinstance(rate, Decimal):
            bases.append(float(rate))
        elif rate is not None and type(rate).__name__ == "TieredPrices":
            bases.append(float(rate.base))
            below = min([below, *(tier.start for tier in rate.tiers)])
        else:
            return False
    if usage.input_tokens >= below:
        return None
    price = Price(bases[0], bases[1])
    # any other fee that applies to a plain call (per request, say) shows up as a difference here
    return (price, below) if abs(price.cost(usage) - total) <= 1e-9 + 1e-9 * total else False
