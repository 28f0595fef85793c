"""The built-in mock provider, as configured by config/tollway.yaml (no upstream at all)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from helpers import USER_MESSAGES, decode_b64_floats

from gateway.settings import load_settings
from gateway.testing.harness import running_gateway

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "tollway.yaml"
DEMO_KEY = "sk-tw-demo-key"


@pytest.fixture
async def demo(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[openai.AsyncOpenAI]:
    monkeypatch.delenv("TOLLWAY_DEMO_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # the example's embedded store lives in ./data
    settings = load_settings(EXAMPLE)
    async with running_gateway(settings) as url:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=DEMO_KEY, max_retries=0, timeout=15) as c:
            yield c


async def test_mock_chat_is_deterministic(demo: openai.AsyncOpenAI) -> None:
    a = await demo.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES)
    b = await demo.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES)
    text = a.choices[0].message.content
    assert text and text == b.choices[0].message.content
    assert a.choices[0].finish_reason == "stop"
    assert a.object == "chat.completion"
    assert a.usage is not None and a.usage.completion_tokens == 24
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens
    other = await demo.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Something else entirely"}]
    )
    assert other.choices[0].message.content


async def test_mock_chat_stream_matches_non_stream(demo: openai.AsyncOpenAI) -> None:
    whole = await demo.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES)
    stream = await demo.chat.completions.create(
        model="gpt-4o-mini",
        messages=USER_MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 24
    assert all(c.choices for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


async def test_mock_stream_without_usage_has_no_empty_chunk(demo: openai.AsyncOpenAI) -> None:
    stream = await demo.chat.completions.create(model="gpt-4o-mini", messages=USER_MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert chunks and all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_mock_completions(demo: openai.AsyncOpenAI) -> None:
    a = await demo.completions.create(model="gpt-4o-mini", prompt="Once upon a time")
    b = await demo.completions.create(model="gpt-4o-mini", prompt="Once upon a time")
    assert a.object == "text_completion"
    assert a.choices[0].text and a.choices[0].text == b.choices[0].text
    stream = await demo.completions.create(model="gpt-4o-mini", prompt="Once upon a time", stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == a.choices[0].text


async def test_mock_embeddings(demo: openai.AsyncOpenAI) -> None:
    a = await demo.embeddings.create(model="text-embedding-3-small", input=["x", "y"])
    b = await demo.embeddings.create(
        model="text-embedding-3-small", input=["x", "y"], encoding_format="float"
    )
    assert [d.index for d in a.data] == [0, 1]
    assert len(a.data[0].embedding) == 16
    # base64 (the SDK default) and float agree, up to float32 precision
    for da, db in zip(a.data, b.data, strict=True):
        assert da.embedding == pytest.approx(db.embedding, rel=1e-6, abs=1e-6)
    assert a.data[0].embedding != a.data[1].embedding
    c = await demo.embeddings.create(model="text-embedding-3-small", input="x")
    assert c.data[0].embedding == a.data[0].embedding


async def test_mock_embeddings_explicit_base64(demo: openai.AsyncOpenAI) -> None:
    raw = await demo.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input="x", encoding_format="base64"
    )
    body = raw.http_response.json()
    emb = body["data"][0]["embedding"]
    assert isinstance(emb, str)
    assert len(decode_b64_floats(emb)) == 16


async def test_mock_models_and_endpoint_restriction(demo: openai.AsyncOpenAI) -> None:
    ids = {m.id async for m in demo.models.list()}
    assert ids == {"gpt-4o-mini", "text-embedding-3-small"}
    # text-embedding-3-small is configured for embeddings only
    with pytest.raises(openai.APIStatusError) as ei:
        await demo.chat.completions.create(model="text-embedding-3-small", messages=USER_MESSAGES)
    assert 400 <= ei.value.status_code < 500
