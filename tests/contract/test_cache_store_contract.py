"""The Store contract for the response cache (cache_get/put/purge/stats), on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.store.base import CacheStats, Store

OpenStore = Callable[[], Awaitable[Store]]


async def test_put_get_and_replace(store: Store) -> None:
    assert await store.cache_get("t1:chat:k") is None
    await store.cache_put("t1:chat:k", b'{"a":1}', 60, "t1", "m1")
    assert await store.cache_get("t1:chat:k") == b'{"a":1}'
    await store.cache_put("t1:chat:k", b'{"a":2}', 60, "t1", "m1")
    assert await store.cache_get("t1:chat:k") == b'{"a":2}'
    stats = await store.cache_stats("t1")
    assert stats["t1"].entries == 1 and stats["t1"].bytes == len(b'{"a":2}')


async def test_entries_expire(store: Store) -> None:
    await store.cache_put("t1:chat:short", b"x" * 10, 0.2, "t1", "m1")
    await store.cache_put("t1:chat:long", b"y" * 10, 60, "t1", "m1")
    assert await store.cache_get("t1:chat:short") == b"x" * 10
    await asyncio.sleep(0.35)
    assert await store.cache_get("t1:chat:short") is None
    assert await store.cache_get("t1:chat:long") == b"y" * 10
    stats = await store.cache_stats()
    assert stats["t1"].entries == 1 and stats["t1"].bytes == 10


async def test_hits_and_misses_are_counted_per_team(store: Store) -> None:
    await store.cache_put("t1:chat:k", b"v", 60, "t1", "m1")
    assert await store.cache_get("t1:chat:k", "t1") == b"v"
    assert await store.cache_get("t1:chat:k", "t1") == b"v"
    assert await store.cache_get("t1:chat:nope", "t1") is None
    assert await store.cache_get("t2:chat:nope", "t2") is None
    assert await store.cache_get("t1:chat:k") == b"v"  # no team: not counted
    stats = await store.cache_stats()
    assert stats["t1"] == CacheStats(entries=1, bytes=1, hits=2, misses=1)
    assert stats["t2"] == CacheStats(entries=0, bytes=0, hits=0, misses=1)
    only = await store.cache_stats("t2")
    assert set(only) == {"t2"}


async def test_purge_by_team_model_or_all(store: Store) -> None:
    for team in ("t1", "t2"):
        for model in ("m1", "m2"):
            await store.cache_put(f"{team}:chat:{model}", b"v", 60, team, model)
    assert await store.cache_purge("t1", "m1") == 1
    assert await store.cache_get("t1:chat:m1") is None
    assert await store.cache_get("t1:chat:m2") == b"v"
    assert await store.cache_purge(None, "m2") == 2
    assert await store.cache_get("t2:chat:m2") is None
    assert await store.cache_get("t2:chat:m1") == b"v"
    assert await store.cache_purge("nobody", None) == 0
    assert await store.cache_purge() == 1
    stats = await store.cache_stats()
    assert all(s.entries == 0 for s in stats.values())


async def test_entries_are_visible_to_a_second_store_on_redis(
    open_store: OpenStore, backend: str
) -> None:
    a = await open_store()
    await a.cache_put("t1:chat:k", b"shared", 60, "t1", "m1")
    if backend == "redis":  # embedded is one process: a second instance is another cache
        b = await open_store()
        assert await b.cache_get("t1:chat:k") == b"shared"


async def test_feed_of_semantic_entries(store: Store) -> None:
    """Redis: an ordered, capped feed read with a cursor. Embedded (one process): always empty."""
    from gateway.store.redis_store import RedisStore

    for i in range(5):
        await store.cache_feed_add(b"e%d" % i, 1000)
    entries, cursor = await store.cache_feed_read(None, 3)
    if not isinstance(store, RedisStore):
        assert entries == []
        return
    assert entries == [b"e0", b"e1", b"e2"] and cursor is not None
    rest, cursor2 = await store.cache_feed_read(cursor, 100)
    assert rest == [b"e3", b"e4"]
    assert await store.cache_feed_read(cursor2, 100) == ([], cursor2)


async def test_semantic_hits_are_counted_apart_and_turn_the_miss_into_a_hit(store: Store) -> None:
    """A semantic lookup reads the entry it found with kind "semantic", after the request's exact
    lookup missed: a live entry is a semantic hit (and that request is no longer a miss); a gone one
    counts nothing (the request stays one miss)."""
    await store.cache_put("t1:chat:a", b"v", 60, "t1", "m1")
    # request 1: exact miss, then the semantic cache finds a live entry
    assert await store.cache_get("t1:chat:new-1", "t1") is None
    assert await store.cache_get("t1:chat:a", "t1", "semantic") == b"v"
    # request 2: exact hit
    assert await store.cache_get("t1:chat:a", "t1") == b"v"
    # request 3: exact miss, and the semantic candidate's answer is gone
    assert await store.cache_get("t1:chat:new-2", "t1") is None
    assert await store.cache_get("t1:chat:gone", "t1", "semantic") is None
    # no team: nothing counted, whatever the kind
    assert await store.cache_get("t1:chat:a", None, "semantic") == b"v"
    stats = await store.cache_stats()
    assert stats["t1"] == CacheStats(entries=1, bytes=1, hits=2, misses=1, semantic_hits=1)
    assert stats["t1"].exact_hits == 1
    assert stats["t1"].to_json() == {
        "entries": 1, "bytes": 1, "hits": 2, "misses": 1, "exact_hits": 1, "semantic_hits": 1,
    }
    # another team's counters are apart
    assert await store.cache_get("t1:chat:a", "t2", "semantic") == b"v"
    assert (await store.cache_stats("t2"))["t2"] == CacheStats(hits=1, semantic_hits=1)


async def test_cache_count_counts_like_a_counted_get(store: Store) -> None:
    """`cache_count` records an exact lookup made earlier with an uncounted `cache_get` (the
    gateway looks up before admission and counts once the request was admitted)."""
    await store.cache_put("t1:chat:k", b"v", 60, "t1", "m1")
    assert await store.cache_get("t1:chat:k") == b"v"
    await store.cache_count("t1", True)
    await store.cache_count("t1", True)
    await store.cache_count("t1", False)
    await store.cache_count("t2", False)
    # a semantic hit still turns one of those misses into a hit
    assert await store.cache_get("t1:chat:k", "t1", "semantic") == b"v"
    stats = await store.cache_stats()
    assert stats["t1"] == CacheStats(entries=1, bytes=1, hits=3, misses=0, semantic_hits=1)
    assert stats["t2"] == CacheStats(entries=0, bytes=0, hits=0, misses=1)


async def test_counts_reach_the_other_replicas_on_redis(open_store: OpenStore, backend: str) -> None:
    """Redis writes the counts behind (every 50 ms): another replica sees them soon, and a store
    that closes writes the ones it still holds."""
    if backend != "redis":
        return  # embedded is one process
    a = await open_store()
    b = await open_store()
    await a.cache_put("t1:chat:k", b"v", 60, "t1", "m1")
    assert await a.cache_get("t1:chat:k", "t1") == b"v"
    await a.cache_count("t1", False)
    want = CacheStats(entries=1, bytes=1, hits=1, misses=1)
    for _ in range(100):  # bounded: up to 5 s
        if (await b.cache_stats("t1")).get("t1") == want:
            break
        await asyncio.sleep(0.05)
    assert (await b.cache_stats("t1"))["t1"] == want
    c = await open_store()
    await c.cache_count("t1", True)
    await c.close()
    assert (await b.cache_stats("t1"))["t1"] == CacheStats(entries=1, bytes=1, hits=2, misses=1)
