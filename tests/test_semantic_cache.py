"""Issue 5: the semantic cache — paraphrase hits, guard vetoes, exact earlier turns, per-team
partitions, streamed replay of a semantic hit, window limit, per-model opt-out, persistence."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import openai
import pytest
from helpers import StartGateway, metric_value, metrics_text

from gateway.plugins.semantic_cache import last_user_text, prefix_digest
from gateway.settings import ConfigError
from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys, gateway_config, running_gateway

PLUGINS = [{"name": "metrics"}, {"name": "access"}, {"name": "exact_cache"}, {"name": "semantic_cache"}]
SIM = "x-tollway-cache-similarity"


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=15.0)


async def ask(base_url: str, key: str, messages: list[Any], **kw: Any) -> tuple[dict[str, str], str]:
    """(response headers, content of choice 0) of one non-streamed SDK call at temperature 0."""
    kw.setdefault("temperature", 0)
    async with sdk(base_url, key) as c:
        raw = await c.chat.completions.with_raw_response.create(model="gpt-test", messages=messages, **kw)
        completion = raw.parse()
    return dict(raw.headers), completion.choices[0].message.content or ""


def chat_calls(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.endpoint == "chat")


async def semantic_state(http: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    async with http.get(base_url + "/ready") as r:
        body = await r.json()
    state: dict[str, Any] = body["plugins"]["semantic_cache"]
    return state


async def wait_ready(http: aiohttp.ClientSession, base_url: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while (state := await semantic_state(http, base_url))["embedder"] != "ready":
        assert state["embedder"] != "failed", state
        assert time.monotonic() < deadline, "the embedding model did not load"
        await asyncio.sleep(0.05)


async def wait_entries(http: aiohttp.ClientSession, base_url: str, n: int, limit_s: float = 10.0) -> None:
    """Indexing runs off the request path: wait until the index holds `n` entries."""
    deadline = time.monotonic() + limit_s
    while (await semantic_state(http, base_url))["entries"] < n:
        assert time.monotonic() < deadline, "the answer was not indexed"
        await asyncio.sleep(0.02)


@pytest.fixture
async def sem(start_gateway: StartGateway, http: aiohttp.ClientSession) -> str:
    url = await start_gateway(plugins=PLUGINS)
    await wait_ready(http, url)
    return url


# ---- unit ----------------------------------------------------------------------------------------


def test_partition_ignores_only_the_last_user_message() -> None:
    body = {"messages": [{"role": "system", "content": "be brief"}, *user("hi there")], "temperature": 0}
    d = prefix_digest("gpt-test", "chat", body)
    assert prefix_digest("gpt-test", "chat", {**body, "messages": [body["messages"][0], *user("yo")]}) == d
    for change in (
        {"temperature": 0.5},
        {"seed": 3},
        {"messages": user("hi there")},
        {"messages": [{"role": "system", "content": "be long"}, *user("hi there")]},
    ):
        assert prefix_digest("gpt-test", "chat", {**body, **change}) != d, change
    assert prefix_digest("gpt-other", "chat", body) != d
    assert last_user_text(body) == "hi there"
    assert last_user_text({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}) == "a"
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    assert last_user_text({"messages": [{"role": "user", "content": [image]}]}) is None
    assert last_user_text({"messages": [{"role": "assistant", "content": "x"}]}) is None


async def test_semantic_cache_must_come_after_exact_cache(fake: FakeUpstream) -> None:
    config = gateway_config(fake.base_url, plugins=[{"name": "access"}, {"name": "semantic_cache"}])
    with pytest.raises(ConfigError, match="after exact_cache"):
        async with running_gateway(config):
            pass


def test_semantic_settings_are_strict(fake: FakeUpstream) -> None:
    from gateway.settings import settings_from_dict

    with pytest.raises(ConfigError):
        settings_from_dict(gateway_config(fake.base_url, cache={"semantic": {"treshold": 0.9}}), "<t>")
    s = settings_from_dict(
        gateway_config(
            fake.base_url,
            cache={"semantic": {"threshold": 0.9}},
            models={"gpt-test": {"cache": {"semantic_threshold": 0.95, "semantic": True}}},
        ),
        "<t>",
    )
    assert s.cache.semantic.threshold == 0.9 and s.models["gpt-test"].cache.semantic_threshold == 0.95


# ---- hits and vetoes -----------------------------------------------------------------------------


async def test_paraphrase_is_a_semantic_hit(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    fake.enqueue(Behaviour(content="Paris."))
    h1, text1 = await ask(sem, keys.team_a, user("What is the capital of France?"))
    assert h1["x-tollway-cache"] == "miss" and SIM not in h1
    await wait_entries(http, sem, 1)
    h2, text2 = await ask(sem, keys.team_a, user("What's the capital city of France?"))
    assert h2["x-tollway-cache"] == "hit-semantic"
    assert 0.85 <= float(h2[SIM]) <= 1.0
    assert text1 == text2 == "Paris."
    assert chat_calls(fake) == 1
    # the identical question is still an exact hit
    h3, _ = await ask(sem, keys.team_a, user("What is the capital of France?"))
    assert h3["x-tollway-cache"] == "hit-exact" and SIM not in h3
    m = await metrics_text(http, sem)
    assert metric_value(m, "tollway_cache_hits_total", kind="semantic") == 1
    assert metric_value(m, "tollway_cache_hits_total", kind="exact") == 1
    assert metric_value(m, "tollway_cache_semantic_lookup_seconds_count") == 2
    assert metric_value(m, "tollway_cache_embedding_batch_size_count") >= 2
    assert metric_value(m, "tollway_cache_semantic_index_entries") == 1


async def test_reversed_conversion_is_not_a_hit(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    fake.enqueue(Behaviour(content="5 km is 3.11 miles."))
    fake.enqueue(Behaviour(content="5 miles is 8.05 km."))
    h1, _ = await ask(sem, keys.team_a, user("convert 5 km to miles"))
    await wait_entries(http, sem, 1)
    h2, text2 = await ask(sem, keys.team_a, user("convert 5 miles to km"))
    assert (h1["x-tollway-cache"], h2["x-tollway-cache"]) == ("miss", "miss")
    assert text2 == "5 miles is 8.05 km." and chat_calls(fake) == 2
    m = await metrics_text(http, sem)
    assert metric_value(m, "tollway_cache_semantic_vetoes_total") >= 1


async def test_earlier_turns_must_match_exactly(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    def convo(system: str, question: str) -> list[Any]:
        return [
            {"role": "system", "content": system},
            {"role": "user", "content": "I am planning a trip."},
            {"role": "assistant", "content": "Great, where to?"},
            *user(question),
        ]

    await ask(sem, keys.team_a, convo("You are a travel agent.", "What is the capital of France?"))
    await wait_entries(http, sem, 1)
    h, _ = await ask(sem, keys.team_a, convo("You are a pirate.", "What's the capital city of France?"))
    assert h["x-tollway-cache"] == "miss"
    assert chat_calls(fake) == 2
    # same earlier turns: the paraphrase hits
    h, _ = await ask(sem, keys.team_a, convo("You are a travel agent.", "What's the capital city of France?"))
    assert h["x-tollway-cache"] == "hit-semantic"
    # different sampling parameters are part of the partition too
    h, _ = await ask(
        sem, keys.team_a, convo("You are a travel agent.", "Tell me the capital of France."), max_tokens=50
    )
    assert h["x-tollway-cache"] == "miss"
    assert chat_calls(fake) == 3


async def test_no_cross_team_semantic_hits(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    fake.enqueue(Behaviour(content="team A's secret answer"))
    await ask(sem, keys.team_a, user("What is the capital of France?"))
    await wait_entries(http, sem, 1)
    fake.enqueue(Behaviour(content="team B's own answer"))
    h, text = await ask(sem, keys.team_b, user("What's the capital city of France?"))
    assert h["x-tollway-cache"] == "miss" and text == "team B's own answer"
    assert chat_calls(fake) == 2
    await wait_entries(http, sem, 2)
    h, text = await ask(sem, keys.team_b, user("Tell me the capital of France."))
    assert h["x-tollway-cache"] == "hit-semantic" and text == "team B's own answer"
    h, text = await ask(sem, keys.team_a, user("Tell me the capital of France."))
    assert h["x-tollway-cache"] == "hit-semantic" and text == "team A's secret answer"
    assert chat_calls(fake) == 2


async def test_streaming_request_is_replayed_from_a_semantic_hit(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    fake.enqueue(Behaviour(content="Reverse it with reversed() or slicing.", stream_chunks=4))
    async with sdk(sem, keys.team_a) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=user("How do I reverse a list in Python?"), temperature=0, stream=True
        )
        first = [ch async for ch in raw.parse()]
        assert raw.headers["x-tollway-cache"] == "miss"
        await wait_entries(http, sem, 1)
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=user("How can I reverse a Python list?"),
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in raw.parse()]
    assert raw.headers["x-tollway-cache"] == "hit-semantic" and float(raw.headers[SIM]) >= 0.85
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "".join(ch.choices[0].delta.content or "" for ch in first if ch.choices)
    assert text == "Reverse it with reversed() or slicing."
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert chat_calls(fake) == 1


async def test_concurrent_lookups_share_model_calls(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    fake.enqueue(Behaviour(content="Paris."))
    await ask(sem, keys.team_a, user("What is the capital of France?"))
    await wait_entries(http, sem, 1)
    before = metric_value(await metrics_text(http, sem), "tollway_cache_embedding_batch_size_count")
    questions = [
        "What's the capital city of France?",
        "Tell me the capital of France.",
        "Which city is the capital of France?",
        "France's capital is which city?",
    ] * 4
    results = await asyncio.gather(*(ask(sem, keys.team_a, user(q)) for q in questions))
    hits = [h["x-tollway-cache"] for h, _ in results]
    assert hits.count("hit-semantic") + hits.count("hit-exact") >= len(questions) // 2
    calls = metric_value(await metrics_text(http, sem), "tollway_cache_embedding_batch_size_count") - before
    assert calls < len(questions)


# ---- what stays exact-only -----------------------------------------------------------------------


async def test_prompt_longer_than_the_window_is_exact_only(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    long = "Summarise this: " + " ".join(f"word{i}" for i in range(600))
    h, _ = await ask(sem, keys.team_a, user(long))
    assert h["x-tollway-cache"] == "miss"
    await asyncio.sleep(0.2)
    assert (await semantic_state(http, sem))["entries"] == 0
    h, _ = await ask(sem, keys.team_a, user(long))
    assert h["x-tollway-cache"] == "hit-exact"


async def test_no_cache_skips_the_semantic_lookup_and_per_model_opt_out(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    url = await start_gateway(plugins=PLUGINS, models={"gpt-openai": {"cache": {"semantic": False}}})
    await wait_ready(http, url)
    await ask(url, keys.team_a, user("What is the capital of France?"))
    await wait_entries(http, url, 1)
    async with sdk(url, keys.team_a) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=user("What's the capital city of France?"),
            temperature=0,
            extra_headers={"Cache-Control": "no-cache"},
        )
    assert raw.headers["x-tollway-cache"] == "miss"
    assert chat_calls(fake) == 2
    # the opted-out model is never indexed
    async with sdk(url, keys.team_a) as c:
        await c.chat.completions.create(model="gpt-openai", messages=user("Hello there"), temperature=0)
    await asyncio.sleep(0.2)
    assert (await semantic_state(http, url))["entries"] == 2  # the no-cache answer was stored


async def test_sampled_requests_bypass_both_caches(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    h, _ = await ask(sem, keys.team_a, user("What is the capital of France?"), temperature=0.7)
    assert h["x-tollway-cache"] == "bypass"
    await asyncio.sleep(0.2)
    assert (await semantic_state(http, sem))["entries"] == 0


# ---- persistence ---------------------------------------------------------------------------------


async def test_index_is_saved_at_shutdown_and_loaded_at_start(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession, tmp_path: Any
) -> None:
    """The answers must outlive the restart too, so the store is Redis (the embedded store keeps
    cache entries in memory only: after its restart the reloaded vectors find no answer and are dropped)."""
    from gateway.testing.redis_server import RedisServer

    with RedisServer() as srv:
        config = gateway_config(
            fake.base_url,
            plugins=PLUGINS,
            cache={"semantic": {"index_dir": str(tmp_path / "index")}},
            store={"backend": "redis", "url": srv.url, "prefix": "sem-persist:"},
        )
        fake.enqueue(Behaviour(content="Paris."))
        async with running_gateway(config) as url:
            await wait_ready(http, url)
            await ask(url, keys.team_a, user("What is the capital of France?"))
            await wait_entries(http, url, 1)
        assert (tmp_path / "index" / "manifest.json").is_file()
        async with running_gateway(config) as url:
            await wait_ready(http, url)
            assert (await semantic_state(http, url))["entries"] == 1
            h, text = await ask(url, keys.team_a, user("What's the capital city of France?"))
        assert h["x-tollway-cache"] == "hit-semantic" and text == "Paris."
        assert chat_calls(fake) == 1


async def test_entries_indexed_by_one_replica_are_visible_to_the_others_on_redis(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    from gateway.testing.redis_server import RedisServer

    with RedisServer() as srv:
        store = {"backend": "redis", "url": srv.url, "prefix": "sem-replicas:"}
        cache = {"semantic": {"sync_interval_s": 0.05}}
        async with (
            running_gateway(gateway_config(fake.base_url, plugins=PLUGINS, store=store, cache=cache)) as one,
            running_gateway(gateway_config(fake.base_url, plugins=PLUGINS, store=store, cache=cache)) as two,
        ):
            await wait_ready(http, one)
            await wait_ready(http, two)
            fake.enqueue(Behaviour(content="from replica one"))
            h, _ = await ask(one, keys.team_a, user("What is the capital of France?"))
            assert h["x-tollway-cache"] == "miss"
            await wait_entries(http, two, 1)  # read from the feed, not re-embedded
            h, text = await ask(two, keys.team_a, user("What's the capital city of France?"))
            assert h["x-tollway-cache"] == "hit-semantic" and text == "from replica one"
            h, _ = await ask(two, keys.team_b, user("What's the capital city of France?"))
            assert h["x-tollway-cache"] == "miss"  # still per team
            assert chat_calls(fake) == 2
            await wait_entries(http, one, 2)
        # a replica started later (or restarted) rebuilds its index from the feed
        async with running_gateway(gateway_config(fake.base_url, plugins=PLUGINS, store=store)) as three:
            await wait_ready(http, three)
            assert (await semantic_state(http, three))["entries"] == 2
            h, text = await ask(three, keys.team_b, user("Tell me the capital of France."))
            assert h["x-tollway-cache"] == "hit-semantic"
            assert chat_calls(fake) == 2


async def test_index_stops_growing_at_max_entries(
    start_gateway: StartGateway, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    url = await start_gateway(plugins=PLUGINS, cache={"semantic": {"max_entries": 1}})
    await wait_ready(http, url)
    await ask(url, keys.team_a, user("What is the capital of France?"))
    await wait_entries(http, url, 1)
    await ask(url, keys.team_a, user("How do I reverse a list in Python?"))
    await asyncio.sleep(0.2)
    assert (await semantic_state(http, url))["entries"] == 1
    h, _ = await ask(url, keys.team_a, user("How can I reverse a Python list?"))
    assert h["x-tollway-cache"] == "miss"
    h, _ = await ask(url, keys.team_a, user("What's the capital city of France?"))
    assert h["x-tollway-cache"] == "hit-semantic"
