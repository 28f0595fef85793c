"""A breaker opened on one replica is adopted by the others through Redis (issue 4)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import gateway_config, install_test_env
from gateway.testing.processes import GatewayProcess
from gateway.testing.redis_server import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


async def chat(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, str]:
    async with session.post(
        url + "/v1/chat/completions",
        json={"model": "duo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        headers={"Authorization": f"Bearer {key}"},
    ) as r:
        await r.read()
        return r.status, r.headers.get("x-tollway-deployment", "")


async def breaker_state(session: aiohttp.ClientSession, url: str, name: str) -> str:
    async with session.get(url + "/ready") as r:
        body: dict[str, Any] = await r.json()
    return str(body["breakers"][name]["state"])


async def test_breaker_opened_on_one_replica_is_adopted_by_the_other(
    redis_server: RedisServer, processes: Callable[..., GatewayProcess], session: aiohttp.ClientSession
) -> None:
    keys = install_test_env()
    async with FakeUpstream() as sick, FakeUpstream() as healthy:
        sick.default = Behaviour(status=500)
        config = gateway_config(
            healthy.base_url,
            providers={
                "sick": {"kind": "openai_compatible", "api_base": sick.base_url,
                         "api_key": "${TOLLWAY_TEST_UPSTREAM_KEY}"},
            },
            models={
                "duo": {
                    "price": {"free": True},
                    # the sick deployment is picked first almost always (ties would be a coin toss)
                    "strategy": "weighted",
                    "deployments": [
                        {"provider": "sick", "model": "s", "weight": 1000},
                        {"provider": "up", "model": "h", "weight": 1},
                    ],
                }
            },
            routing={
                "retry": {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
                "breaker": {"consecutive_failures": 2, "min_requests": 1000, "open_s": 30},
            },
            store={"backend": "redis", "url": redis_server.url, "prefix": "share:"},
        )
        a = processes(config, name="replica-a")
        b = processes(config, name="replica-b")
        await asyncio.gather(a.astart(), b.astart())
        name = "sick/s"

        # Replica A alone meets the sick deployment until its breaker opens; clients see 200s.
        # Bounded: the sick deployment is picked first with p~0.999, two picks open the breaker.
        for _ in range(20):
            status, _ = await chat(session, a.url, keys.team_a)
            assert status == 200
            if await breaker_state(session, a.url, name) == "open":
                break
        assert await breaker_state(session, a.url, name) == "open"
        seen_by_a = len(sick.requests)
        assert seen_by_a >= 2

        # Replica B has never called it, yet adopts the open state through Redis within ~1 s.
        deadline = time.monotonic() + 5
        while await breaker_state(session, b.url, name) != "open":
            assert time.monotonic() < deadline, "replica B never adopted the open breaker"
            await asyncio.sleep(0.2)
        for _ in range(10):
            status, dep = await chat(session, b.url, keys.team_a)
            assert (status, dep) == (200, "up/h")
        assert len(sick.requests) == seen_by_a  # B sent it nothing
