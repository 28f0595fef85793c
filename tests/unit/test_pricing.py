"""Prices: genai-prices lookup, config overrides, tiers, and refusing unpriced models at startup."""

from __future__ import annotations

import pytest

from gateway.pricing import FREE, ModelPrice, Rate, build_price_table, lookup_genai_prices
from gateway.settings import ConfigError, settings_from_dict
from gateway.testing.harness import deep_merge, gateway_config


def test_genai_prices_knows_openai_models() -> None:
    p = lookup_genai_prices("gpt-4o-mini", "openai")
    assert p is not None and p.source.startswith("genai-prices")
    assert p.input.base == pytest.approx(0.15) and p.output.base == pytest.approx(0.6)
    assert p.cached_input.base == pytest.approx(0.075)
    assert lookup_genai_prices("no-such-model-xyz", "openai_compatible") is None


def test_cost_in_nano_usd_with_cached_tokens_and_tiers() -> None:
    p = ModelPrice(Rate(1.0, ((1000, 2.0),)), Rate(4.0), Rate(0.5), source="t")
    # 100 prompt tokens of which 40 cached, 10 completion: 60*1 + 40*0.5 + 10*4 micro-USD
    assert p.cost_nano(100, 10, 40) == (60 + 20 + 40) * 1000
    # above the tier start the input price doubles
    assert p.cost_nano(1000, 0) == 1000 * 2 * 1000
    assert FREE.cost_nano(10**6, 10**6) == 0


def test_models_resolve_from_genai_prices_or_config() -> None:
    cfg = gateway_config("http://127.0.0.1:9/v1")
    table = build_price_table(settings_from_dict(cfg))
    assert table["gpt-openai"].source.startswith("genai-prices:openai/")  # upstream name looked up
    assert table["gpt-test"].source == "config" and table["gpt-test"].output.base == 2.0
    assert table["mock-chat"] is FREE


def test_a_model_without_a_price_stops_startup() -> None:
    cfg = deep_merge(
        gateway_config("http://127.0.0.1:9/v1"),
        {"models": {"mystery": {"deployments": [{"provider": "up", "model": "mystery-7b"}]}}},
    )
    with pytest.raises(ConfigError, match=r"models\.mystery"):
        build_price_table(settings_from_dict(cfg))


def test_price_needs_input_or_free() -> None:
    half_priced = {"price": {"output_per_mtok": 1}, "deployments": [{"provider": "up", "model": "m"}]}
    cfg = deep_merge(gateway_config("http://127.0.0.1:9/v1"), {"models": {"half": half_priced}})
    with pytest.raises(ConfigError, match="input_per_mtok"):
        settings_from_dict(cfg)


def test_cache_writes_have_their_own_price() -> None:
    p = lookup_genai_prices("claude-sonnet-4-5", "anthropic")
    assert p is not None and p.cache_write is not None
    assert p.cache_write.at(1000) == 3.75  # 1.25x the 3.0 input price
    # 10 plain + 20 written + 100 read prompt tokens, 6 out: each part at its own price
    assert p.cost_nano(130, 6, cached_tokens=100, cache_write_tokens=20) == round(
        (10 * 3.0 + 20 * 3.75 + 100 * 0.3 + 6 * 15.0) * 1000
    )
    # without a cache-write price (OpenAI: no such charge) a write costs the input price
    plain = ModelPrice(Rate(3.0), Rate(15.0), Rate(0.3), source="t")
    assert plain.cost_nano(30, 0, cache_write_tokens=20) == plain.cost_nano(30, 0) == 90_000


def test_reservation_is_the_worst_case_over_input_and_cache_write() -> None:
    p = ModelPrice(Rate(3.0), Rate(15.0), Rate(0.3), source="t", cache_write=Rate(3.75))
    assert p.reserve_nano(1000, 100) == round((1000 * 3.75 + 100 * 15.0) * 1000)
    cheaper_write = ModelPrice(Rate(3.0), Rate(15.0), Rate(0.3), source="t", cache_write=Rate(1.0))
    assert cheaper_write.reserve_nano(1000, 100) == cheaper_write.cost_nano(1000, 100)
