"""Anthropic prompt caching is billed at its own prices: cache reads at the cached-input price,
cache writes (`cache_creation_input_tokens`, 1.25x input on Anthropic) at the cache-write price,
the rest of the prompt at the input price; streamed or not. The OpenAI usage the client sees is
unchanged (prompt tokens include both; no extra field)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from helpers import AdminClient

from gateway.testing.fake_anthropic import AnthropicBehaviour, FakeAnthropic
from gateway.testing.harness import TestKeys, gateway_config, install_test_env, running_gateway

ANTHROPIC_KEY = "sk-ant-billing-test-0123456789"
MODEL = "claude-billed"
PRICE = {
    "input_per_mtok": 3, "output_per_mtok": 15, "cached_input_per_mtok": 0.3, "cache_write_per_mtok": 3.75
}
USAGE = {
    "input_tokens": 9, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 100, "output_tokens": 6
}
COST_USD = (9 * 3 + 20 * 3.75 + 100 * 0.3 + 6 * 15) / 1e6
"""Each part at its own price: 27 + 75 + 30 + 90 micro-USD."""
AT_INPUT_PRICE_USD = ((9 + 20) * 3 + 100 * 0.3 + 6 * 15) / 1e6
"""What it cost when cache writes were billed as plain input."""


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAnthropic]:
    monkeypatch.setenv("TOLLWAY_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as upstream:
        yield upstream


@pytest.fixture
async def gateway(fake: FakeAnthropic) -> AsyncIterator[str]:
    config = gateway_config(
        fake.url + "/v1",
        providers={
            "anth": {"kind": "anthropic", "api_base": fake.url, "api_key": "${TOLLWAY_TEST_ANTHROPIC_KEY}"}
        },
        models={MODEL: {"price": PRICE, "deployments": [{"provider": "anth", "model": "claude-sonnet-4-5"}]}},
    )
    async with running_gateway(config) as url:
        yield url


@pytest.mark.parametrize("stream", [False, True])
async def test_cache_writes_are_billed_at_the_cache_write_price(
    fake: FakeAnthropic, gateway: str, stream: bool
) -> None:
    keys: TestKeys = install_test_env()
    async with aiohttp.ClientSession() as http:
        admin = AdminClient(http, gateway, keys.admin)
        await admin.create_team(id="ab", name="ab")
        k = await admin.create_key(team_id="ab", budget={"limit_usd": 1, "period": "daily"})
        fake.enqueue(AnthropicBehaviour(usage=USAGE))
        async with openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=k["key"], max_retries=0) as c:
            msgs = [{"role": "user", "content": "cache me"}]
            if stream:
                s = await c.chat.completions.create(
                    model=MODEL, messages=msgs, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
                )
                usage = [ch.usage async for ch in s if ch.usage is not None][-1]
            else:
                r = await c.chat.completions.create(model=MODEL, messages=msgs)  # type: ignore[arg-type]
                assert r.usage is not None
                usage = r.usage
        # what the client sees is OpenAI's usage: prompt tokens include reads and writes
        assert (usage.prompt_tokens, usage.completion_tokens) == (129, 6)
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 100
        assert "cache_creation_input_tokens" not in usage.model_dump_json()
        b, n = await admin.settled(k["id"], 1)
        assert n == 1
        assert b["spent_usd"] == pytest.approx(COST_USD, abs=1e-12)
        assert b["spent_usd"] != pytest.approx(AT_INPUT_PRICE_USD, abs=1e-12)
