"""The embedded store's cached answers stay out of the garbage collector's way."""

from __future__ import annotations

import gc
from pathlib import Path

from gateway.store.embedded import EmbeddedStore


async def test_cached_answers_leave_the_garbage_collector_alone(tmp_path: Path) -> None:
    """Entries are tuples of atomic values, which the collector stops tracking after one pass: a full
    collection does not walk every cached answer (one tracked object per entry made it walk them all,
    with the GIL held, on the event loop's thread)."""
    store = EmbeddedStore(tmp_path / "tollway.db")
    await store.start()
    try:
        await store.cache_put("t1:chat:first", b"v", 60, "t1", "m1")
        n = 20_000
        gc.collect()
        before = len(gc.get_objects())
        for i in range(n):
            await store.cache_put(f"t1:chat:{i}", b"answer %d" % i, 60, "t1", "m1")
        gc.collect()
        assert len(gc.get_objects()) - before < 500
        assert await store.cache_get("t1:chat:7") == b"answer 7"
        assert (await store.cache_stats("t1"))["t1"].entries == n + 1
    finally:
        await store.close()
