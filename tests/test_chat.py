"""Chat and completions through the gateway, with the official SDK as the client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
from helpers import USER_MESSAGES, StartGateway

from gateway.testing.fake_upstream import DEFAULT_REPLY, Behaviour, FakeUpstream, reply_for
from gateway.testing.harness import TestKeys

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


async def test_chat_plain(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == DEFAULT_REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    upstream = fake.last
    assert upstream.path == "/v1/chat/completions"
    assert r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(fake.requests) == 1


async def test_public_model_name_is_mapped(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert fake.last.body["model"] == "upstream-chat-1"
    await client.chat.completions.create(model="gpt-openai", messages=USER_MESSAGES)
    assert fake.last.body["model"] == "gpt-4o-mini-2024-07-18"


async def test_chat_stream_with_usage(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-test",
        messages=USER_MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert len(chunks) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == DEFAULT_REPLY
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.completion_tokens > 0
    # only the last chunk has empty choices and usage
    assert all(c.choices for c in chunks[:-1])
    assert all(c.usage is None for c in chunks[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert len({c.id for c in chunks}) == 1
    assert fake.last.body["stream"] is True


async def test_chat_stream_without_include_usage(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert chunks, "no chunks"
    # plenty of client code does chunk.choices[0] on every chunk
    assert all(len(c.choices) > 0 for c in chunks), [c.model_dump() for c in chunks]
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    # the gateway still asked the upstream for usage (for its own accounting)
    assert fake.last.body.get("stream_options", {}).get("include_usage") is True


async def test_chat_stream_tool_calls(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(tool_call_count=2, tool_arguments={"city": "Paris", "note": 'a "b" é'}))
    stream = await client.chat.completions.create(
        model="gpt-test",
        messages=USER_MESSAGES,
        stream=True,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice="required",
    )
    calls: dict[int, dict[str, str]] = {}
    order: list[int] = []
    finish = None
    async for chunk in stream:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            if tc.index not in calls:
                order.append(tc.index)
                calls[tc.index] = {"id": "", "name": "", "arguments": ""}
            acc = calls[tc.index]
            if tc.id:
                assert acc["id"] in ("", tc.id), "tool call id changed mid-stream"
                acc["id"] = tc.id
            if tc.function is not None and tc.function.name:
                acc["name"] += tc.function.name
            if tc.function is not None and tc.function.arguments:
                acc["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert order == [0, 1]
    assert finish == "tool_calls"
    assert [calls[i]["name"] for i in order] == ["get_weather", "get_time"]
    ids = [calls[i]["id"] for i in order]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    for i in order:
        assert json.loads(calls[i]["arguments"]) == {"city": "Paris", "note": 'a "b" é'}
    assert fake.last.body["tools"] == [WEATHER_TOOL, TIME_TOOL]
    assert fake.last.body["tool_choice"] == "required"


async def test_chat_tool_calls_non_streaming(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="gpt-test",
        messages=USER_MESSAGES,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].type == "function"
    assert calls[0].function.name == "get_weather"
    args = json.loads(calls[0].function.arguments)
    assert set(args) == {"city", "days"}


async def test_n_and_logprobs_pass_through(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(
        model="gpt-test", messages=USER_MESSAGES, n=2, logprobs=True, top_logprobs=3
    )
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert c.message.content == reply_for(c.index)
        assert c.logprobs is not None and c.logprobs.content
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
        assert all(t.bytes == list(t.token.encode()) for t in c.logprobs.content)
    body = fake.last.body
    assert body["n"] == 2 and body["logprobs"] is True and body["top_logprobs"] == 3


async def test_fields_reach_upstream_untouched(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"a": {"type": "string"}},
                "required": ["a"],
                "additionalProperties": False,
            },
        },
    }
    messages: Any = [
        {"role": "developer", "content": "Be terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image? ünïcödé ✓"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    await client.chat.completions.create(
        model="gpt-test",
        messages=messages,
        response_format=response_format,
        temperature=0.25,
        seed=7,
        max_completion_tokens=33,
        stop=["END"],
        user="user-123",
        extra_body={"some_new_field": 1, "nested_new": {"x": [1, 2, {"y": None}]}},
    )
    body = fake.last.body
    assert body["response_format"] == response_format
    assert body["messages"] == messages
    assert body["some_new_field"] == 1
    assert body["nested_new"] == {"x": [1, 2, {"y": None}]}
    assert body["temperature"] == 0.25
    assert body["seed"] == 7
    assert body["max_completion_tokens"] == 33
    assert body["stop"] == ["END"]
    assert body["user"] == "user-123"


async def test_completions_plain(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.completions.create(
        model="instruct-test", prompt="Once upon a time", max_tokens=20, echo=False
    )
    assert r.object == "text_completion"
    assert r.choices[0].text == DEFAULT_REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens > 0
    rec = fake.last
    assert rec.path == "/v1/completions"
    assert rec.body["model"] == "upstream-instruct-1"
    assert rec.body["prompt"] == "Once upon a time"
    assert rec.body["max_tokens"] == 20


async def test_completions_stream(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(
        model="instruct-test",
        prompt="Once upon a time",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == DEFAULT_REPLY
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.choices for c in chunks[:-1])
    assert fake.last.path == "/v1/completions"


async def test_completions_stream_without_usage(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(model="instruct-test", prompt="Once upon a time", stream=True)
    chunks = [c async for c in stream]
    assert chunks and all(len(c.choices) > 0 for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == DEFAULT_REPLY


async def test_azure_chat_and_stream(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.chat.completions.create(model="gpt-azure", messages=USER_MESSAGES)
    assert r.choices[0].message.content == DEFAULT_REPLY
    assert fake.last.deployment == "chat-deployment-1"
    stream = await client.chat.completions.create(model="gpt-azure", messages=USER_MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == DEFAULT_REPLY
    assert fake.last.path == "/openai/deployments/chat-deployment-1/chat/completions"


async def test_no_stream_options_added_to_non_streaming(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert "stream_options" not in fake.last.body
    assert fake.last.body.get("stream") in (None, False)


async def test_completions_stream_asks_upstream_for_usage(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    stream = await client.completions.create(model="instruct-test", prompt="x", stream=True)
    async for _ in stream:
        pass
    assert fake.last.body["stream_options"]["include_usage"] is True


async def test_concurrent_requests_do_not_cross(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    fake.default = Behaviour(echo=True, chunk_delay_s=0.01)

    async def plain(i: int) -> str:
        r = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"plain {i}"}]
        )
        return r.choices[0].message.content or ""

    async def streamed(i: int) -> str:
        s = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": f"stream {i}"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

    results = await asyncio.gather(*(plain(i) for i in range(20)), *(streamed(i) for i in range(20)))
    expected = [f"echo: plain {i}" for i in range(20)] + [f"echo: stream {i}" for i in range(20)]
    assert list(results) == expected
    assert len(fake.requests) == 40


async def test_upstream_connections_are_reused(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    # sequential calls should not pay a new upstream TCP connection each time
    for _ in range(3):
        await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    peers = {r.peer for r in fake.requests}
    assert len(peers) == 1, peers


async def test_upstream_connections_are_reused_after_streams(
    fake: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    for _ in range(3):
        stream = await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
        async for _chunk in stream:
            pass
    peers = {r.peer for r in fake.requests}
    assert len(peers) == 1, peers


async def test_model_name_with_slash(fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys) -> None:
    url = await start_gateway(
        models={
            "org/chat-model": {
                "price": {"free": True},
                "deployments": [{"provider": "up", "model": "upstream-2"}],
            }
        }
    )
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
        r = await c.chat.completions.create(model="org/chat-model", messages=USER_MESSAGES)
        assert r.choices[0].message.content == DEFAULT_REPLY
        assert fake.last.body["model"] == "upstream-2"
        m = await c.models.retrieve("org/chat-model")
        assert m.id == "org/chat-model"
        ids = [m.id async for m in c.models.list()]
        assert "org/chat-model" in ids


async def test_weighted_deployments_all_used(
    fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys
) -> None:
    url = await start_gateway(
        models={
            "gpt-multi": {
                "price": {"free": True},
                "deployments": [
                    {"provider": "up", "model": "upstream-a", "weight": 1},
                    {"provider": "oai", "model": "upstream-b", "weight": 1},
                ]
            }
        }
    )
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
        for _ in range(40):
            await c.chat.completions.create(model="gpt-multi", messages=USER_MESSAGES)
    used = {(r.body["model"], r.headers["Authorization"]) for r in fake.requests}
    assert used == {
        ("upstream-a", f"Bearer {keys.upstream}"),
        ("upstream-b", f"Bearer {keys.openai}"),
    }
