"""The fake upstream itself, driven directly by the official SDK (no gateway involved).

These keep the fake honest: the gateway tests are only as good as the upstream they talk to.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from helpers import USER_MESSAGES, decode_b64_floats

from gateway.testing.fake_upstream import (
    DEFAULT_REPLY,
    Behaviour,
    FakeUpstream,
    embedding_for,
    reply_for,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
]


@pytest.fixture
async def direct(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-direct", max_retries=0)
    try:
        yield c
    finally:
        await c.close()


async def test_chat_shape_and_recording(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    before = time.monotonic()
    r = await direct.chat.completions.create(
        model="some-model", messages=USER_MESSAGES, extra_headers={"x-custom": "1"}
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "some-model"
    assert r.choices[0].message.content == DEFAULT_REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
    rec = fake.last
    assert rec.method == "POST" and rec.path == "/v1/chat/completions"
    assert rec.endpoint == "chat"
    assert rec.body == {"model": "some-model", "messages": USER_MESSAGES}
    assert rec.headers["Authorization"] == "Bearer sk-direct"
    assert rec.headers["x-custom"] == "1"
    assert before <= rec.arrived_at <= time.monotonic()
    assert rec.status == 200 and rec.finished and not rec.client_gone


async def test_n_and_logprobs(direct: openai.AsyncOpenAI) -> None:
    r = await direct.chat.completions.create(
        model="m", messages=USER_MESSAGES, n=3, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert c.message.content == reply_for(c.index)
        assert c.logprobs is not None and c.logprobs.content is not None
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


async def test_stream_with_usage(direct: openai.AsyncOpenAI) -> None:
    stream = await direct.chat.completions.create(
        model="m", messages=USER_MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == DEFAULT_REPLY
    assert len({c.id for c in chunks}) == 1


async def test_stream_tool_calls(direct: openai.AsyncOpenAI) -> None:
    stream = await direct.chat.completions.create(
        model="m",
        messages=USER_MESSAGES,
        stream=True,
        tools=TOOLS,
        tool_choice="required",
        extra_body={"parallel_tool_calls": True},
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            if tc.id:
                assert not acc["id"], "id sent twice"
                acc["id"] = tc.id
            if tc.function and tc.function.name:
                acc["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                acc["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    args = json.loads(calls[0]["arguments"])
    assert set(args) == {"city", "days"}


async def test_named_tool_and_parallel_calls(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(tool_call_count=2, tool_arguments={"x": 1}))
    r = await direct.chat.completions.create(
        model="m",
        messages=USER_MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    calls = r.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 2
    assert {c.function.name for c in calls} == {"get_time"}
    assert len({c.id for c in calls}) == 2
    assert json.loads(calls[0].function.arguments) == {"x": 1}
    assert r.choices[0].finish_reason == "tool_calls"


async def test_embeddings(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    r = await direct.embeddings.create(model="e", input=["one", "two"])
    assert fake.last.body["encoding_format"] == "base64"  # the SDK's default
    assert [d.embedding for d in r.data] == [embedding_for("one", "e"), embedding_for("two", "e")]
    r = await direct.embeddings.create(model="e", input="one", encoding_format="float")
    assert r.data[0].embedding == embedding_for("one", "e")
    async with aiohttp.ClientSession() as s:
        payload = {"model": "e", "input": "one", "encoding_format": "base64", "dimensions": 5}
        async with s.post(fake.base_url + "/embeddings", json=payload) as resp:
            data = await resp.json()
    assert decode_b64_floats(data["data"][0]["embedding"]) == embedding_for("one", "e", 5)


async def test_scripted_error(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(status=429, headers={"retry-after": "7"}))
    with pytest.raises(openai.RateLimitError) as ei:
        await direct.chat.completions.create(model="m", messages=USER_MESSAGES)
    assert ei.value.response.headers["retry-after"] == "7"
    assert ei.value.code == "rate_limit_exceeded"
    # the queue is used up: next one succeeds
    r = await direct.chat.completions.create(model="m", messages=USER_MESSAGES)
    assert r.choices[0].message.content == DEFAULT_REPLY


async def test_cut_stream(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(cut_after=2))
    stream = await direct.chat.completions.create(model="m", messages=USER_MESSAGES, stream=True)
    got = []
    with pytest.raises(openai.APIConnectionError):
        async for c in stream:
            got.append(c)
    assert len(got) == 2
    assert fake.last.cut and not fake.last.done_sent


async def test_error_event(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(error_after=2))
    stream = await direct.chat.completions.create(model="m", messages=USER_MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for _ in stream:
            pass


async def test_disconnect_is_recorded(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(stream_chunks=50, chunk_delay_s=0.05))
    stream = await direct.chat.completions.create(model="m", messages=USER_MESSAGES, stream=True)
    async for _ in stream:
        break
    await stream.close()
    closed_at = time.monotonic()
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.client_gone and rec.client_gone_at is not None
    assert rec.client_gone_at - closed_at < 0.1
    assert rec.events_sent < 10


async def test_delay_cancelled(fake: FakeUpstream) -> None:
    fake.enqueue(Behaviour(delay_s=5))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(
                fake.base_url + "/chat/completions",
                json={"model": "m", "messages": USER_MESSAGES},
                timeout=aiohttp.ClientTimeout(total=0.3),
            ):
                pass
    gave_up = time.monotonic()
    rec = fake.last
    await rec.wait_finished(2.0)
    assert rec.cancelled and rec.cancelled_at is not None
    assert rec.cancelled_at - gave_up < 0.1


async def test_azure_route(fake: FakeUpstream) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=fake.url, api_key="az-key", api_version="2024-10-21", max_retries=0
    ) as az:
        r = await az.chat.completions.create(model="dep-1", messages=USER_MESSAGES)
    assert r.choices[0].message.content == DEFAULT_REPLY
    rec = fake.last
    assert rec.path == "/openai/deployments/dep-1/chat/completions"
    assert rec.deployment == "dep-1" and rec.api_version == "2024-10-21"
    assert rec.headers["api-key"] == "az-key"


async def test_completions_and_models(direct: openai.AsyncOpenAI) -> None:
    r = await direct.completions.create(model="i", prompt=["a", "b"], logprobs=1)
    assert r.object == "text_completion" and len(r.choices) == 2
    stream = await direct.completions.create(model="i", prompt="a", stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == DEFAULT_REPLY
    models = await direct.models.list()
    assert [m.id for m in models.data] == ["fake-model-1", "fake-embed-1"]
    with pytest.raises(openai.NotFoundError):
        await direct.models.retrieve("nope")


async def test_echo_no_done_and_peer(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(echo=True))
    r = await direct.chat.completions.create(model="m", messages=[{"role": "user", "content": "ping 7"}])
    assert r.choices[0].message.content == "echo: ping 7"
    fake.enqueue(Behaviour(send_done=False))
    stream = await direct.chat.completions.create(model="m", messages=USER_MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == DEFAULT_REPLY and not fake.last.done_sent
    assert fake.requests[0].peer is not None and fake.requests[0].peer[0] == "127.0.0.1"
    # the SDK keeps one connection alive for sequential requests
    assert fake.requests[0].peer == fake.requests[1].peer


async def test_cut_before_answer(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    fake.enqueue(Behaviour(cut_after=0))
    with pytest.raises(openai.APIConnectionError):
        await direct.chat.completions.create(model="m", messages=USER_MESSAGES)
    assert fake.last.cut and not fake.last.cancelled


async def test_split_writes_and_crlf(fake: FakeUpstream, direct: openai.AsyncOpenAI) -> None:
    text = "größe ✓ 🎉 日本"
    for b in (Behaviour(content=text, write_size=3), Behaviour(content=text, crlf=True)):
        fake.enqueue(b)
        stream = await direct.chat.completions.create(model="m", messages=USER_MESSAGES, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream]) == text
