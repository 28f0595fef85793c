"""Issue 5: the semantic cache — paraphrase hits, guard vetoes, exact earlier turns, per-team
partitions, streamed replay of a semantic hit, window limit (checked off the event loop), per-model
opt-out, persistence, admin purge of the vectors (also across replicas) and per-team statistics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import openai
import orjson
import pytest
from aiohttp import web
from helpers import AdminClient, StartGateway, ThreadSpy, metric_value, metrics_text
from prometheus_client import CollectorRegistry

from gateway.api.keys import PIPELINE
from gateway.cache.feed import (
    FeedAdd,
    FeedError,
    FeedPurge,
    decode_feed_entry,
    encode_feed_entry,
    encode_purge_entry,
)
from gateway.plugins.exact_cache import ExactCachePlugin
from gateway.plugins.semantic_cache import SemanticCachePlugin, _Add, last_user_text, prefix_digest
from gateway.settings import ConfigError, settings_from_dict
from gateway.store.embedded import EmbeddedStore
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


async def test_the_loaded_model_is_frozen_out_of_full_collections(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    """The model (and the saved index) load after the gateway froze its start-up objects; once loaded
    they are frozen too, so a full collection does not walk them (~430k objects for torch and
    transformers: ~200 ms with the GIL held, on the event loop's thread)."""
    import gc

    url = await start_gateway(plugins=PLUGINS)
    before = gc.get_freeze_count()
    assert (await semantic_state(http, url))["embedder"] != "ready"  # still loading
    await wait_ready(http, url)
    assert gc.get_freeze_count() - before > 1000  # a model load leaves ~2k objects even when cached


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
    # the label is the rule's name, never the guard's detail (it quotes the prompts)
    assert metric_value(m, "tollway_cache_semantic_vetoes_total", reason="unit") >= 1
    assert "miles" not in "".join(line for line in m.splitlines() if "vetoes" in line)
    assert metric_value(m, "tollway_cache_misses_total", kind="semantic") == 2
    assert metric_value(m, "tollway_cache_misses_total", kind="exact") == 2


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


# ---- the window check runs off the event loop ----------------------------------------------------


@asynccontextmanager
async def running_app(config: dict[str, Any]) -> AsyncIterator[tuple[str, web.Application]]:
    """Like `running_gateway`, also yielding the app (to reach the plugin's embedder)."""
    from gateway.app import create_app

    app = create_app(settings_from_dict(config, "<test config>"))
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app
    finally:
        await runner.cleanup()


async def test_window_check_of_a_long_prompt_runs_off_the_event_loop(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    async with running_app(gateway_config(fake.base_url, plugins=PLUGINS)) as (url, app):
        await wait_ready(http, url)
        plugin = next(p for p in app[PIPELINE].plugins if isinstance(p, SemanticCachePlugin))
        spy = ThreadSpy(plugin.embedder._tokenizer)
        plugin.embedder._tokenizer = spy
        # ~4.7k characters: only tokenizing can tell (1733 word pieces: over the 256 window)
        long = "Summarise this: " + " ".join(f"word{i}" for i in range(600))
        h, _ = await ask(url, keys.team_a, user(long))
        assert h["x-tollway-cache"] == "miss"
        # Cache-Control: no-cache skips the lookup, the answer is stored: indexing checks the window too
        h, _ = await ask(url, keys.team_a, user(long + " again"), extra_headers={"Cache-Control": "no-cache"})
        assert h["x-tollway-cache"] == "miss"
        # 915 characters, 193 word pieces: fits, so it is indexed
        fits = "Please summarise these notes from our planning meeting: " + " ".join(
            f"point {i} is about the budget" for i in range(30)
        )
        h, _ = await ask(url, keys.team_a, user(fits))
        assert h["x-tollway-cache"] == "miss"
        await wait_entries(http, url, 1)
        await asyncio.sleep(0.2)
        assert (await semantic_state(http, url))["entries"] == 1
        h, _ = await ask(url, keys.team_a, user(long))
        assert h["x-tollway-cache"] == "hit-exact"
        assert len(spy.threads) >= 3
        assert all(t.name.startswith("tollway-embed") for t in spy.threads), spy.threads
        assert threading.main_thread() not in spy.threads  # the event loop's thread never tokenizes


# ---- admin: purge and statistics -----------------------------------------------------------------

FRANCE = "What is the capital of France?"
FRANCE_2 = "Tell me what the capital of France is."
FRANCE_3 = "Tell me the capital of France."
REVERSE = "How do I reverse a list in Python?"
REVERSE_2 = "How can I reverse a Python list?"


async def ask_model(base_url: str, key: str, model: str, text: str) -> str:
    async with sdk(base_url, key) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model=model, messages=user(text), temperature=0
        )
    return raw.headers["x-tollway-cache"]


async def team_stats(admin: AdminClient, team: str | None = None) -> dict[str, Any]:
    teams: dict[str, Any] = (
        await admin.ok("GET", "/admin/cache/stats" + (f"?team_id={team}" if team else ""))
    )["teams"]
    return teams


async def wait_team_vectors(admin: AdminClient, team: str, n: int, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while (got := (await team_stats(admin, team)).get(team, {}).get("semantic_entries", 0)) != n:
        assert time.monotonic() < deadline, f"{team}: {got} semantic entries, expected {n}"
        await asyncio.sleep(0.02)


async def test_purge_by_team_drops_its_vectors_at_once_and_stats_count_them(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    admin = AdminClient(http, sem, keys.admin)
    fake.enqueue(Behaviour(content="team A: Paris."))
    await ask(sem, keys.team_a, user(FRANCE))
    fake.enqueue(Behaviour(content="team B: Paris."))
    await ask(sem, keys.team_b, user(FRANCE))
    await wait_entries(http, sem, 2)
    h, _ = await ask(sem, keys.team_a, user(FRANCE_2))
    assert h["x-tollway-cache"] == "hit-semantic"
    teams = await team_stats(admin)
    a, b = teams["team-a"], teams["team-b"]
    assert a["bytes"] > 0
    # team A: one miss (FRANCE), one semantic hit (FRANCE_2 missed exactly, then hit semantically)
    assert {k: v for k, v in a.items() if k != "bytes"} == {
        "entries": 1, "hits": 1, "misses": 1, "exact_hits": 0, "semantic_hits": 1, "semantic_entries": 1,
    }
    assert (b["entries"], b["hits"], b["misses"], b["semantic_entries"]) == (1, 0, 1, 1)

    out = await admin.ok("DELETE", "/admin/cache?team_id=team-a")
    assert out == {"deleted": 1, "semantic_deleted": 1, "team_id": "team-a", "model": None}
    # at once: not when each vector is next hit and found without its answer
    assert (await semantic_state(http, sem))["entries"] == 1
    teams = await team_stats(admin)
    assert (teams["team-a"]["entries"], teams["team-a"]["semantic_entries"]) == (0, 0)
    assert (teams["team-b"]["entries"], teams["team-b"]["semantic_entries"]) == (1, 1)
    assert metric_value(await metrics_text(http, sem), "tollway_cache_semantic_index_entries") == 1

    fake.enqueue(Behaviour(content="team A: Paris, again."))
    h, text = await ask(sem, keys.team_a, user(FRANCE_3))
    assert h["x-tollway-cache"] == "miss" and text == "team A: Paris, again."
    h, text = await ask(sem, keys.team_b, user(FRANCE_3))
    assert h["x-tollway-cache"] == "hit-semantic" and text == "team B: Paris."
    teams = await team_stats(admin)
    assert (teams["team-a"]["hits"], teams["team-a"]["misses"]) == (1, 2)
    assert (teams["team-b"]["semantic_hits"], teams["team-b"]["misses"]) == (1, 1)


async def test_purge_by_model_by_team_and_model_and_everything(
    sem: str, fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    admin = AdminClient(http, sem, keys.admin)
    await ask_model(sem, keys.team_a, "gpt-test", FRANCE)
    await ask_model(sem, keys.team_a, "gpt-openai", FRANCE)
    await ask_model(sem, keys.team_b, "gpt-test", FRANCE)
    await wait_entries(http, sem, 3)
    teams = await team_stats(admin)
    assert (teams["team-a"]["semantic_entries"], teams["team-b"]["semantic_entries"]) == (2, 1)

    out = await admin.ok("DELETE", "/admin/cache?model=gpt-openai")
    assert (out["deleted"], out["semantic_deleted"]) == (1, 1)
    assert await ask_model(sem, keys.team_a, "gpt-openai", FRANCE_2) == "miss"
    assert await ask_model(sem, keys.team_a, "gpt-test", FRANCE_2) == "hit-semantic"  # other model: kept
    await wait_entries(http, sem, 3)  # the gpt-openai miss was indexed again

    out = await admin.ok("DELETE", "/admin/cache?team_id=team-b&model=gpt-test")
    assert (out["deleted"], out["semantic_deleted"]) == (1, 1)
    teams = await team_stats(admin)
    assert (teams["team-a"]["semantic_entries"], teams["team-b"]["semantic_entries"]) == (2, 0)
    only_a = await team_stats(admin, "team-a")
    assert set(only_a) == {"team-a"} and only_a["team-a"]["semantic_entries"] == 2

    out = await admin.ok("DELETE", "/admin/cache")
    assert (out["deleted"], out["semantic_deleted"]) == (2, 2)
    assert (await semantic_state(http, sem))["entries"] == 0
    assert all(t["semantic_entries"] == 0 for t in (await team_stats(admin)).values())


async def test_purge_reaches_the_other_replicas_and_later_ones_on_redis(
    fake: FakeUpstream, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    from gateway.testing.redis_server import RedisServer

    with RedisServer() as srv:
        store = {"backend": "redis", "url": srv.url, "prefix": "sem-purge:"}
        config = gateway_config(
            fake.base_url, plugins=PLUGINS, store=store, cache={"semantic": {"sync_interval_s": 0.05}}
        )
        async with running_gateway(config) as one, running_gateway(config) as two:
            await wait_ready(http, one)
            await wait_ready(http, two)
            admin_one, admin_two = AdminClient(http, one, keys.admin), AdminClient(http, two, keys.admin)
            fake.enqueue(Behaviour(content="A: Paris."))
            await ask(one, keys.team_a, user(FRANCE))
            fake.enqueue(Behaviour(content="A: reverse it."))
            await ask(two, keys.team_a, user(REVERSE))  # indexed by two itself
            fake.enqueue(Behaviour(content="B: Paris."))
            await ask(one, keys.team_b, user(FRANCE))
            await wait_entries(http, one, 3)
            await wait_entries(http, two, 3)
            h, _ = await ask(two, keys.team_a, user(FRANCE_2))
            assert h["x-tollway-cache"] == "hit-semantic"

            out = await admin_one.ok("DELETE", "/admin/cache?team_id=team-a")
            assert (out["deleted"], out["semantic_deleted"]) == (2, 2)
            # two drops them when it next reads the feed, its own entry too; team B's stay
            await wait_team_vectors(admin_two, "team-a", 0)
            assert (await team_stats(admin_two, "team-b"))["team-b"]["semantic_entries"] == 1
            assert (await team_stats(admin_two, "team-a"))["team-a"]["semantic_hits"] == 1  # store-wide

            # entries written after the purge stay, on every replica
            fake.enqueue(Behaviour(content="A: Paris, after the purge."))
            h, _ = await ask(two, keys.team_a, user(FRANCE_3))
            assert h["x-tollway-cache"] == "miss"
            fake.enqueue(Behaviour(content="A: reversed() or slicing."))
            h, _ = await ask(two, keys.team_a, user(REVERSE))
            assert h["x-tollway-cache"] == "miss"
            await wait_team_vectors(admin_one, "team-a", 2)
            h, text = await ask(one, keys.team_a, user(REVERSE_2))
            assert h["x-tollway-cache"] == "hit-semantic" and text == "A: reversed() or slicing."
        # a replica started later replays the feed: the purge drops what came before it, not after
        async with running_gateway(config) as three:
            await wait_ready(http, three)
            admin_three = AdminClient(http, three, keys.admin)
            teams = await team_stats(admin_three)
            assert (teams["team-a"]["semantic_entries"], teams["team-b"]["semantic_entries"]) == (2, 1)
            h, text = await ask(three, keys.team_a, user(FRANCE_2))
            assert h["x-tollway-cache"] == "hit-semantic" and text == "A: Paris, after the purge."


# ---- purge tombstones and the feed's records (unit) ----------------------------------------------


def unit_vector(seed: int) -> Any:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def bare_plugin(fake: FakeUpstream, tmp_path: Path) -> SemanticCachePlugin:
    """A plugin that is never started: its worker-thread functions are called from the test."""
    settings = settings_from_dict(gateway_config(fake.base_url, plugins=PLUGINS), "<t>")
    store = EmbeddedStore(tmp_path / "tollway.db")
    registry = CollectorRegistry()
    return SemanticCachePlugin(settings, store, registry, ExactCachePlugin(settings, store, registry))


def test_a_purge_drops_what_was_indexed_before_it_in_any_order(
    fake: FakeUpstream, keys: TestKeys, tmp_path: Path
) -> None:
    now = time.time()

    def add(team: str, model: str, key: str, at: float) -> _Add:
        return _Add(f"{team}:digest", model, unit_vector(len(key) + ord(key[-1])), key, "q", 600.0, at)

    before = [add("team-a", "gpt-test", "a1", now - 10), add("team-b", "gpt-test", "b1", now - 10),
              add("team-a", "gpt-openai", "ao", now - 10)]
    late = add("team-a", "gpt-test", "a2", now - 6)  # indexed before the purge, arrives after it
    after = add("team-a", "gpt-test", "a3", now - 1)
    orders = [
        [*before, "purge", late, after],
        [after, late, "purge", *before],
        [late, "purge", after, *before],
    ]
    for order in orders:
        plugin = bare_plugin(fake, tmp_path)
        tomb = plugin._tombstone("team-a", "gpt-test", now - 5)
        plugin._apply([tomb if op == "purge" else op for op in order])  # type: ignore[misc]
        assert set(plugin.index.entry_ids("team-a:digest", "gpt-test")) == {"a3"}, order
        assert set(plugin.index.entry_ids("team-a:digest", "gpt-openai")) == {"ao"}
        assert set(plugin.index.entry_ids("team-b:digest", "gpt-test")) == {"b1"}
        assert plugin._size == 3
    # an entry saved by an older version (no "at") predates every purge; a purge of everything
    plugin.index.add("team-b:old", "gpt-test", unit_vector(7), "old", {"text": "q", "key": "old"})
    assert plugin._apply([plugin._tombstone(None, None, now)]) == (0, 4)
    assert plugin.index.size() == 0


def test_feed_records_round_trip_and_old_records_still_decode() -> None:
    v = unit_vector(1)
    rec = decode_feed_entry(encode_feed_entry("r1", "team-a:d", "gpt-test", "q", "k", v, 1000.0, 900.0), 384)
    assert isinstance(rec, FeedAdd)
    assert (rec.replica, rec.partition, rec.model, rec.text, rec.key, rec.expires, rec.at) == (
        "r1", "team-a:d", "gpt-test", "q", "k", 1000.0, 900.0,
    )
    assert np.array_equal(rec.vec, v)
    # a record written before purges existed: no kind, no "a" (so it predates every purge)
    header = {"r": "r0", "p": "t:d", "m": "m", "t": "q", "k": "k", "x": 1000.0}
    old = orjson.dumps(header) + b"\n" + v.tobytes()
    rec = decode_feed_entry(old, 384)
    assert isinstance(rec, FeedAdd) and rec.at == 0.0
    purge = encode_purge_entry("r1", "team-a", None, 950.0)
    assert decode_feed_entry(purge, 384) == FeedPurge("r1", "team-a", None, 950.0)
    assert purge.partition(b"\n")[2] == b""  # no vector: replicas that predate purges drop it as malformed
    assert decode_feed_entry(orjson.dumps({"kind": "resize", "r": "r2"}) + b"\n", 384) is None
    for bad in (
        b"no newline",
        b"[1]\n",
        b"{not json\n",
        orjson.dumps({"kind": "purge", "r": "r1"}) + b"\n",
        orjson.dumps({"kind": "purge", "r": "r1", "team": 3, "ts": 1.0}) + b"\n",
        old[:-4],
    ):
        with pytest.raises(FeedError):
            decode_feed_entry(bad, 384)
