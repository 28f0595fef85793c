"""The anthropic provider through the gateway, with the official openai SDK and a fake Anthropic API."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from helpers import AdminClient, sse_data_lines
from openai.types.chat import ChatCompletionFunctionToolParam

from gateway.testing.fake_anthropic import (
    DEFAULT_MODEL_REPLY,
    AnthropicBehaviour,
    FakeAnthropic,
    anthropic_error,
)
from gateway.testing.harness import TestKeys, gateway_config, install_test_env, running_gateway

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "anthropic"
ANTHROPIC_KEY = "sk-ant-test-upstream-0004"
UPSTREAM_MODEL = "claude-sonnet-4-5-20250929"
MODEL = "claude-test"
USER: list[Any] = [{"role": "user", "content": "Say hello"}]
WEATHER_TOOL: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAnthropic]:
    monkeypatch.setenv("TOLLWAY_TEST_ANTHROPIC_KEY", ANTHROPIC_KEY)
    async with FakeAnthropic(api_key=ANTHROPIC_KEY) as upstream:
        yield upstream


@pytest.fixture
async def gateway(fake: FakeAnthropic) -> AsyncIterator[str]:
    config = gateway_config(
        fake.url + "/v1",  # the OpenAI-format test providers are never called here
        providers={
            "anth": {
                "kind": "anthropic",
                "api_base": fake.url,
                "api_key": "${TOLLWAY_TEST_ANTHROPIC_KEY}",
                "timeouts": {"connect_s": 2.0, "read_s": 5.0, "total_s": 10.0},
            }
        },
        models={
            MODEL: {
                "price": {"input_per_mtok": 3, "output_per_mtok": 15},
                "deployments": [{"provider": "anth", "model": UPSTREAM_MODEL}],
                "retry": {"max_attempts": 1},  # the router's retries have their own tests
            }
        },
    )
    async with running_gateway(config) as url:
        yield url


@pytest.fixture
def keys() -> TestKeys:
    return install_test_env()


@pytest.fixture
async def client(gateway: str, keys: TestKeys) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=keys.team_a, max_retries=0, timeout=10.0)
    try:
        yield c
    finally:
        await c.close()


async def raw_stream(gateway: str, keys: TestKeys, body: dict[str, Any]) -> tuple[int, bytes, bool]:
    """(status, body, whether the transfer broke) of a raw streaming request."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.post(
            gateway + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {keys.team_a}"}
        ) as resp,
    ):
        out = b""
        try:
            async for piece in resp.content.iter_any():
                out += piece
        except aiohttp.ClientPayloadError:
            return resp.status, out, True
        return resp.status, out, False


# ---- success ---------------------------------------------------------------------------------


async def test_plain_chat(fake: FakeAnthropic, client: openai.AsyncOpenAI, keys: TestKeys) -> None:
    fake.enqueue(
        AnthropicBehaviour(usage={"input_tokens": 11, "cache_read_input_tokens": 100, "output_tokens": 8})
    )
    resp = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *USER],
        temperature=1.7,
        stop="END",
        user="u-1",
        seed=3,
    )
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == UPSTREAM_MODEL
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == DEFAULT_MODEL_REPLY
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (111, 8, 119)
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 100

    rec = fake.last
    assert rec.path == "/v1/messages" and rec.rejected is None
    assert rec.headers["x-api-key"] == ANTHROPIC_KEY
    assert rec.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in rec.headers
    assert keys.team_a not in json.dumps(dict(rec.headers))
    assert rec.body == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 4096,
        "system": "Be brief.",
        "messages": USER,
        "stop_sequences": ["END"],
        "temperature": 1.0,
        "metadata": {"user_id": "u-1"},
    }


async def test_streaming_text_with_usage(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(
        AnthropicBehaviour(
            content="Streaming from a fake Claude — ✓ 日本語",
            usage={"input_tokens": 9, "cache_creation_input_tokens": 20, "output_tokens": 6},
            write_size=13,  # events and UTF-8 characters split across reads
            crlf=True,
        )
    )
    stream = await client.chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Streaming from a fake Claude — ✓ 日本語"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (29, 6, 35)
    assert all(c.usage is None for c in chunks[:-1])
    assert fake.last.body["stream"] is True and "stream_options" not in fake.last.body


async def test_streaming_without_usage_has_no_empty_choices_chunk(
    fake: FakeAnthropic, gateway: str, keys: TestKeys
) -> None:
    status, raw, broken = await raw_stream(gateway, keys, {"model": MODEL, "messages": USER, "stream": True})
    assert status == 200 and not broken
    events = sse_data_lines(raw)
    assert events[-1] == b"[DONE]"
    for data in events[:-1]:
        assert orjson.loads(data)["choices"], data
    assert b"ping" not in raw and b"message_start" not in raw


async def test_sdk_accumulates_a_streamed_tool_call(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    uses = [
        {"name": "get_weather", "input": {"city": "Paris", "unit": "celsius"}},
        {"name": "get_weather", "input": {"city": "Tōkyō", "unit": "celsius"}},
    ]
    fake.enqueue(
        AnthropicBehaviour(
            content="Let me check both.",
            tool_uses=uses,
            usage={"input_tokens": 40, "cache_read_input_tokens": 2, "output_tokens": 30},
            write_size=17,
        )
    )
    async with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris and Tokyo?"}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        stream_options={"include_usage": True},
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check both."
    calls = choice.message.tool_calls or []
    assert [c.id for c in calls] == ["toolu_fake00010", "toolu_fake00011"]
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [u["input"] for u in uses]
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == (
        42,
        30,
        72,
    )
    sent = fake.last.body
    assert sent["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]
    assert sent["tool_choice"] == {"type": "auto"}


async def test_recorded_tool_stream_replays_through_the_gateway(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    fake.enqueue(AnthropicBehaviour(raw_stream=(FIXTURES / "stream_tools.sse").read_bytes(), write_size=41))
    async with client.chat.completions.stream(
        model=MODEL,
        messages=USER,
        tools=[WEATHER_TOOL],
        stream_options={"include_usage": True},
    ) as stream:
        final = await stream.get_final_completion()
    expected = json.loads((FIXTURES / "stream_tools.expected.json").read_text(encoding="utf-8"))
    assert final.id == expected[0]["id"]
    msg = final.choices[0].message
    assert msg.content == "I'll check the weather in both cities."
    assert [(c.id, c.function.name, c.function.arguments) for c in msg.tool_calls or []] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather", '{"city": "Paris", "unit": "celsius"}'),
        ("toolu_01Xr2mN8aQwLs5dK7eYtPz3b", "get_weather", '{"city": "Tōkyō", "unit": "celsius"}'),
    ]
    assert (
        final.usage is not None and final.usage.prompt_tokens == 2212 and final.usage.completion_tokens == 112
    )


async def test_tool_results_are_sent_back_merged(fake: FakeAnthropic, client: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "Weather in Paris and Tokyo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "toolu_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "toolu_b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_a", "content": "18C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "24C"},
    ]
    resp = await client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL])
    assert resp.choices[0].message.content == DEFAULT_MODEL_REPLY
    sent = fake.last.body["messages"]
    assert sent[1]["content"][1] == {
        "type": "tool_use",
        "id": "toolu_b",
        "name": "get_weather",
        "input": {"city": "Tokyo"},
    }
    assert sent[2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "18C"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "24C"},
        ],
    }


async def test_spend_is_charged_at_the_model_price(
    fake: FakeAnthropic, client: openai.AsyncOpenAI, gateway: str, keys: TestKeys
) -> None:
    fake.enqueue(
        AnthropicBehaviour(usage={"input_tokens": 1000, "cache_read_input_tokens": 0, "output_tokens": 2000})
    )
    await client.chat.completions.create(model=MODEL, messages=USER)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        deadline = time.monotonic() + 3
        while True:
            async with http.get(
                gateway + "/admin/spend?group_by=model", headers={"Authorization": f"Bearer {keys.admin}"}
            ) as r:
                rows = [row for row in (await r.json())["rows"] if row["model"] == MODEL]
            if rows or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert rows and rows[0]["prompt_tokens"] == 1000 and rows[0]["completion_tokens"] == 2000
    assert rows[0]["cost_usd"] == pytest.approx(1000 * 3e-6 + 2000 * 15e-6)


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "exc", "status", "headers"),
    [
        (AnthropicBehaviour(status=529), openai.InternalServerError, 503, {}),
        (
            AnthropicBehaviour(status=429, headers={"retry-after": "30"}),
            openai.RateLimitError,
            429,
            {"retry-after": "30"},
        ),
        (AnthropicBehaviour(status=402), openai.RateLimitError, 429, {"x-should-retry": "false"}),
        (AnthropicBehaviour(status=401), openai.InternalServerError, 502, {}),
        (AnthropicBehaviour(status=403), openai.InternalServerError, 502, {}),
        (
            AnthropicBehaviour(status=400, body=anthropic_error(400, "messages: roles must alternate")),
            openai.BadRequestError,
            400,
            {},
        ),
        (AnthropicBehaviour(status=404), openai.NotFoundError, 404, {}),
        (AnthropicBehaviour(status=413), openai.APIStatusError, 413, {}),
        (AnthropicBehaviour(status=500), openai.InternalServerError, 502, {}),
    ],
)
async def test_errors_map_to_sdk_exceptions(
    fake: FakeAnthropic,
    client: openai.AsyncOpenAI,
    behaviour: AnthropicBehaviour,
    exc: type[openai.APIStatusError],
    status: int,
    headers: dict[str, str],
) -> None:
    fake.enqueue(behaviour)
    with pytest.raises(exc) as ei:
        await client.chat.completions.create(model=MODEL, messages=USER)
    err = ei.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and set(err.body) >= {"message", "type", "param", "code"}
    assert "127.0.0.1" not in err.message
    for k, v in headers.items():
        assert err.response.headers.get(k) == v
    if status == 400:
        assert err.message.endswith("messages: roles must alternate")


async def test_gateway_key_rejected_upstream_is_not_a_client_401(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    fake.api_key = "a-different-key"
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(model=MODEL, messages=USER)
    assert ei.value.code == "upstream_auth_failed"


async def test_what_anthropic_cannot_do_is_a_clear_400(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        await client.chat.completions.create(model=MODEL, messages=USER, n=2)
    assert "n > 1 is not supported for Anthropic models" in ei.value.message
    with pytest.raises(openai.BadRequestError) as ei:
        await client.embeddings.create(model=MODEL, input="hello")
    assert "served by Anthropic, which has no embeddings endpoint" in ei.value.message
    bad_call: Any = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": "{nope"},
    }
    with pytest.raises(openai.BadRequestError) as ei:
        await client.chat.completions.create(
            model=MODEL,
            messages=[*USER, {"role": "assistant", "tool_calls": [bad_call]}],
        )
    assert ei.value.code == "invalid_tool_arguments"
    assert fake.requests == []


async def test_error_event_mid_stream_raises_and_no_done(
    fake: FakeAnthropic, client: openai.AsyncOpenAI, gateway: str, keys: TestKeys
) -> None:
    fake.enqueue(AnthropicBehaviour(content="one two three four", error_after=4))
    stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as ei:
        async for chunk in stream:
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    assert "overloaded" in ei.value.message.lower()
    assert "".join(got) == "one"

    fake.enqueue(AnthropicBehaviour(content="one two three four", error_after=4))
    status, raw, _ = await raw_stream(gateway, keys, {"model": MODEL, "messages": USER, "stream": True})
    assert status == 200
    events = sse_data_lines(raw)
    assert b"[DONE]" not in events
    err = orjson.loads(events[-1])["error"]
    assert err["type"] == "server_error" and err["code"] == "upstream_overloaded"
    assert sum(1 for e in events if e.startswith(b'{"error"')) == 1


async def test_error_event_before_any_output_is_an_http_error(
    fake: FakeAnthropic, client: openai.AsyncOpenAI
) -> None:
    fake.enqueue(AnthropicBehaviour(error_after=0))
    with pytest.raises(openai.InternalServerError) as ei:
        await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    assert ei.value.status_code == 503


@pytest.mark.parametrize(
    "behaviour",
    [AnthropicBehaviour(content="a b c d", cut_after=5), AnthropicBehaviour(omit_message_stop=True)],
    ids=["cut", "no_message_stop"],
)
async def test_broken_stream_raises_in_sdk(
    fake: FakeAnthropic, client: openai.AsyncOpenAI, behaviour: AnthropicBehaviour
) -> None:
    fake.enqueue(behaviour)
    stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass

# ---- billing of Anthropic prompt caching -----------------------------------------------------
# Cache reads at the cached-input price, cache writes (`cache_creation_input_tokens`, 1.25x input
# on Anthropic) at the cache-write price, the rest of the prompt at the input price; streamed or
# not. The OpenAI usage the client sees is unchanged (prompt tokens include both; no extra field).

BILLED_MODEL = "claude-billed"
BILLED_PRICE = {
    "input_per_mtok": 3, "output_per_mtok": 15, "cached_input_per_mtok": 0.3, "cache_write_per_mtok": 3.75
}
BILLED_USAGE = {
    "input_tokens": 9, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 100, "output_tokens": 6
}
BILLED_COST_USD = (9 * 3 + 20 * 3.75 + 100 * 0.3 + 6 * 15) / 1e6
"""Each part at its own price: 27 + 75 + 30 + 90 micro-USD."""
BILLED_AT_INPUT_PRICE_USD = ((9 + 20) * 3 + 100 * 0.3 + 6 * 15) / 1e6
"""What it cost when cache writes were billed as plain input."""


@pytest.fixture
async def billed_gateway(fake: FakeAnthropic) -> AsyncIterator[str]:
    config = gateway_config(
        fake.url + "/v1",
        providers={
            "anth": {"kind": "anthropic", "api_base": fake.url, "api_key": "${TOLLWAY_TEST_ANTHROPIC_KEY}"}
        },
        models={
            BILLED_MODEL: {
                "price": BILLED_PRICE, "deployments": [{"provider": "anth", "model": "claude-sonnet-4-5"}]
            }
        },
    )
    async with running_gateway(config) as url:
        yield url


@pytest.mark.parametrize("stream", [False, True])
async def test_cache_writes_are_billed_at_the_cache_write_price(
    fake: FakeAnthropic, billed_gateway: str, stream: bool
) -> None:
    keys: TestKeys = install_test_env()
    async with aiohttp.ClientSession() as http:
        admin = AdminClient(http, billed_gateway, keys.admin)
        await admin.create_team(id="ab", name="ab")
        k = await admin.create_key(team_id="ab", budget={"limit_usd": 1, "period": "daily"})
        fake.enqueue(AnthropicBehaviour(usage=BILLED_USAGE))
        async with openai.AsyncOpenAI(base_url=billed_gateway + "/v1", api_key=k["key"], max_retries=0) as c:
            msgs = [{"role": "user", "content": "cache me"}]
            if stream:
                s = await c.chat.completions.create(
                    model=BILLED_MODEL, messages=msgs, stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
                )
                usage = [ch.usage async for ch in s if ch.usage is not None][-1]
            else:
                r = await c.chat.completions.create(model=BILLED_MODEL, messages=msgs)  # type: ignore[arg-type]
                assert r.usage is not None
                usage = r.usage
        # what the client sees is OpenAI's usage: prompt tokens include reads and writes
        assert (usage.prompt_tokens, usage.completion_tokens) == (129, 6)
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 100
        assert "cache_creation_input_tokens" not in usage.model_dump_json()
        b, n = await admin.settled(k["id"], 1)
        assert n == 1
        assert b["spent_usd"] == pytest.approx(BILLED_COST_USD, abs=1e-12)
        assert b["spent_usd"] != pytest.approx(BILLED_AT_INPUT_PRICE_USD, abs=1e-12)
