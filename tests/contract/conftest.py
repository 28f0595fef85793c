"""Fixtures of the Store contract suite: every test runs against each backend.

The Redis backend talks to a real `redis-server` started for the session on a free loopback
port; without the binary the Redis tests fail (they never skip). Each test gets its own key
prefix, so tests share the server without seeing each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gateway.store.base import Store
from gateway.store.embedded import EmbeddedStore
from gateway.store.redis_store import RedisStore
from gateway.testing.redis_server import RedisServer

OpenStore = Callable[[], Awaitable[Store]]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture(params=["embedded", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
async def open_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OpenStore]:
    """Open (and start) another store on the same data: the same SQLite file, or the same Redis
    server and prefix (a second connection pool, like a second gateway replica)."""
    opened: list[Store] = []
    url = request.getfixturevalue("redis_server").url if backend == "redis" else ""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"

    async def open_() -> Store:
        s: Store
        if backend == "embedded":
            s = EmbeddedStore(tmp_path / "data" / "tollway.db", flush_interval_s=0.05)
        else:
            s = RedisStore(url, prefix=prefix, socket_timeout_s=1.0, connect_timeout_s=0.5)
        await s.start()
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    return await open_store()
