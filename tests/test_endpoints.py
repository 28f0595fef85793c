"""Embeddings, models, health/readiness and metrics."""

from __future__ import annotations

import asyncio
import re
from contextlib import AsyncExitStack

import aiohttp
import openai
import pytest
from helpers import USER_MESSAGES, StartGateway, assert_error_shape, decode_b64_floats

from gateway.testing.fake_upstream import DEFAULT_REPLY, Behaviour, FakeUpstream, embedding_for, reply_for
from gateway.testing.harness import TestKeys, gateway_config, running_gateway

PUBLIC_MODELS = set(gateway_config("http://127.0.0.1:1/v1")["models"])


async def test_embeddings_float(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.embeddings.create(model="embed-test", input="hello world", encoding_format="float")
    assert r.object == "list"
    assert len(r.data) == 1
    assert r.data[0].embedding == embedding_for("hello world", "upstream-embed-1")
    assert r.usage.prompt_tokens > 0
    body = fake.last.body
    assert fake.last.path == "/v1/embeddings"
    assert body["model"] == "upstream-embed-1"
    assert body["encoding_format"] == "float"
    assert body["input"] == "hello world"


async def test_embeddings_sdk_default_base64(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    # the SDK asks for base64 and decodes it: the floats must survive the round trip
    inputs = ["first", "second", "third"]
    r = await client.embeddings.create(model="embed-test", input=inputs)
    assert fake.last.body["encoding_format"] == "base64"
    assert [d.index for d in r.data] == [0, 1, 2]
    assert [d.embedding for d in r.data] == [embedding_for(t, "upstream-embed-1") for t in inputs]


async def test_embeddings_explicit_base64_raw(
    fake: FakeUpstream, gateway: str, http: aiohttp.ClientSession, auth: dict[str, str]
) -> None:
    payload = {"model": "embed-test", "input": ["a", "b"], "encoding_format": "base64"}
    async with http.post(gateway + "/v1/embeddings", json=payload, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    assert [type(d["embedding"]) for d in data["data"]] == [str, str]
    for d, text in zip(data["data"], ["a", "b"], strict=True):
        assert decode_b64_floats(d["embedding"]) == embedding_for(text, "upstream-embed-1")


async def test_embeddings_dimensions_pass_through(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.embeddings.create(model="embed-test", input="x", dimensions=4, encoding_format="float")
    assert fake.last.body["dimensions"] == 4
    assert r.data[0].embedding == embedding_for("x", "upstream-embed-1", 4)


async def test_embeddings_azure(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    r = await client.embeddings.create(model="embed-azure", input="x")
    assert r.data[0].embedding == embedding_for("x", "embed-deployment-1")
    assert fake.last.path == "/openai/deployments/embed-deployment-1/embeddings"


async def test_models_list(fake: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    ids = [m.id for m in page.data]
    assert set(ids) == PUBLIC_MODELS
    assert len(ids) == len(set(ids))
    assert all(m.object == "model" and isinstance(m.created, int) for m in page.data)
    # the public names, not the upstream's list
    assert not {"fake-model-1", "upstream-chat-1"} & set(ids)


async def test_models_retrieve(client: openai.AsyncOpenAI) -> None:
    m = await client.models.retrieve("gpt-test")
    assert m.id == "gpt-test" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as ei:
        await client.models.retrieve("no-such-model")
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("upstream-chat-1")  # upstream names are not public


async def test_models_need_a_key(gateway: str, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway + "/v1/models") as resp:
        assert resp.status == 401
        assert_error_shape(await resp.read())


async def test_health_and_ready(gateway: str, http: aiohttp.ClientSession) -> None:
    for path in ("/health", "/ready"):
        async with http.get(gateway + path) as resp:
            assert resp.status == 200, path


async def test_metrics(gateway: str, client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    await client.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=USER_MESSAGES)
    async with http.get(gateway + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type.startswith("text/plain")
        text = await resp.text()
    samples = [
        line
        for line in text.splitlines()
        if line.startswith("tollway_requests_total{") and 'model="gpt-test"' in line
    ]
    assert samples, text
    total = sum(float(line.rsplit(" ", 1)[1]) for line in samples)
    assert total == 2.0
    ok = [s for s in samples if re.search(r'status="200"', s)]
    assert ok, samples
    # client-chosen model names must not become label values (unbounded cardinality)
    assert 'model="nope"' not in text


async def test_gateway_encodes_base64_when_upstream_cannot(
    fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    url = await start_gateway(providers={"up": {"supports_base64_embeddings": False}})
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:
        r = await c.embeddings.create(model="embed-test", input=["p", "q"])
    assert fake.last.body["encoding_format"] == "float"
    assert [d.embedding for d in r.data] == [
        embedding_for("p", "upstream-embed-1"),
        embedding_for("q", "upstream-embed-1"),
    ]
    payload = {"model": "embed-test", "input": "p", "encoding_format": "base64"}
    headers = {"Authorization": f"Bearer {keys.team_a}"}
    async with http.post(url + "/v1/embeddings", json=payload, headers=headers) as resp:
        data = await resp.json()
    emb = data["data"][0]["embedding"]
    assert isinstance(emb, str)
    assert decode_b64_floats(emb) == embedding_for("p", "upstream-embed-1")
    assert data["usage"]["prompt_tokens"] > 0


async def test_shutdown_lets_in_flight_requests_finish(fake: FakeUpstream, keys: TestKeys) -> None:
    fake.enqueue(Behaviour(delay_s=0.4), Behaviour(stream_chunks=5, chunk_delay_s=0.08))
    stack = AsyncExitStack()
    url = await stack.enter_async_context(
        running_gateway(gateway_config(fake.base_url), shutdown_timeout_s=5.0)
    )
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a, max_retries=0) as c:

        async def streamed() -> str:
            s = await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])

        plain = asyncio.create_task(c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES))
        stream = asyncio.create_task(streamed())
        try:
            await fake.wait_for_requests(2)
            await asyncio.sleep(0.05)
        finally:
            await stack.aclose()  # stop the gateway while both are in flight
        r = await plain
        assert r.choices[0].message.content == DEFAULT_REPLY
        assert await stream == reply_for(0, Behaviour(stream_chunks=5))
