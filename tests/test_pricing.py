"""Prices: the float fast path gives exactly what genai-prices gives, tiers and cache included."""

from __future__ import annotations

import pytest
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from hypothesis import given, settings
from hypothesis import strategies as st

from rlmflow import Price, Pricing, Usage

MODELS = [
    ("openai", "gpt-4o", "openai"),
    ("openai", "gpt-4.1-mini", "openai"),
    ("anthropic", "claude-sonnet-4-5", "anthropic"),  # tiered above 200k input tokens
    ("aws.bedrock", "us.anthropic.claude-3-7-sonnet-20250219-v1:0", "aws"),
    ("aws.bedrock", "anthropic.claude-sonnet-4-5-20250929-v1:0", "aws"),
]


def reference(provider_id: str, model: str, usage: Usage) -> float:
    return float(calc_price(
        PriceUsage(input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                   cache_read_tokens=usage.cache_read_tokens or None,
                   cache_write_tokens=usage.cache_write_tokens or None),
        model_ref=model, provider_id=provider_id,
    ).total_price)


@settings(max_examples=150, deadline=None)
@given(
    model=st.sampled_from(MODELS),
    calls=st.lists(
        st.tuples(st.integers(1, 2_000_000), st.integers(0, 64_000), st.integers(0, 1000)), min_size=1, max_size=4
    ),
)
def test_fast_path_matches_genai_prices(model: tuple[str, str, str], calls: list[tuple[int, int, int]]) -> None:
    provider, name, provider_id = model
    pricing = Pricing()  # fresh: the first call of each example decides the fast path
    for input_tokens, output_tokens, cache_read in calls:
        usage = Usage(input_tokens, output_tokens, 1, cache_read_tokens=min(cache_read, input_tokens))
        assert pricing.cost(provider, name, usage) == pytest.approx(reference(provider_id, name, usage), rel=1e-9)


def test_overrides_unknown_and_free() -> None:
    pricing = Pricing(overrides={"openai:my-vllm": Price(1.0, 2.0)})
    assert pricing.cost("openai", "my-vllm", Usage(1_000_000, 1_000_000, 1)) == 3.0
    assert pricing.cost("openai", "no-such-model-anywhere", Usage(10, 10, 1)) is None
    assert pricing.cost("llama.cpp", "qwen", Usage(10, 10, 1)) == 0.0
