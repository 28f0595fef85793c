"""Shared fixtures: a fake upstream, a gateway in front of it, and clients of the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import openai
import pytest
from helpers import (
    COMPLETION_TOKENS,
    PROMPT_TOKENS,
    ROUTED_PROVIDERS,
    StartGateway,
    StartRouted,
    fixed_usage_reply,
    merge_providers,
    provider_config,
    routing,
)

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys, gateway_config, install_test_env, running_gateway
from gateway.testing.processes import GatewayProcess
from gateway.testing.redis_server import RedisServer


@pytest.fixture
def keys() -> TestKeys:
    return install_test_env()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as upstream:
        yield upstream


@pytest.fixture
async def start_gateway(fake: FakeUpstream) -> AsyncIterator[StartGateway]:
    """Start a gateway with `gateway_config(fake.base_url, **overrides)`; returns its URL."""
    async with AsyncExitStack() as stack:

        async def start(**overrides: Any) -> str:
            config = gateway_config(fake.base_url, **overrides)
            url: str = await stack.enter_async_context(running_gateway(config))
            return url

        yield start


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> str:
    """The URL (without /v1) of a gateway with the default test config."""
    return await start_gateway()


@pytest.fixture
async def client(gateway: str, keys: TestKeys) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK, team-a's key, no retries."""
    c = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=keys.team_a, max_retries=0, timeout=15.0)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw HTTP client (for what the SDK cannot send or hides)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


@pytest.fixture
def auth(keys: TestKeys) -> dict[str, str]:
    """Headers authenticating team-a on raw requests."""
    return {"Authorization": f"Bearer {keys.team_a}"}


@pytest.fixture
def processes() -> Iterator[Callable[..., GatewayProcess]]:
    """`processes(config, name=...)` -> a GatewayProcess (not started), stopped by PID at the end.
    Each process's log is printed at teardown (pytest shows it when the test failed)."""
    made: list[GatewayProcess] = []

    def make(config: dict[str, Any], **kw: Any) -> GatewayProcess:
        gw = GatewayProcess(config, **kw)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()
        print(f"--- {gw.name} (exit {gw.returncode}) ---\n{gw.logs()}")
        gw.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


@pytest.fixture(params=["embedded", "redis"])
async def store_config(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """The `store` section of a gateway config: the default embedded store, or a real Redis server
    started for the test."""
    if request.param == "embedded":
        yield {}
        return
    from gateway.testing.redis_server import RedisServer

    async with RedisServer() as srv:
        yield {"store": {"backend": "redis", "url": srv.url, "prefix": "test:"}}


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of its own that keeps its data across a stop and start (append-only file,
    fsync always), as a production Redis would: for tests that stop and start it."""
    with RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")) as srv:
        yield srv


@pytest.fixture
def upstream(fake: FakeUpstream) -> FakeUpstream:
    """The fake upstream, every non-streaming answer reporting exactly PROMPT_TOKENS +
    COMPLETION_TOKENS (so every request costs COST_NANO)."""
    fake.default = Behaviour(body=fixed_usage_reply(PROMPT_TOKENS, COMPLETION_TOKENS))
    return fake


# ---- the router's tests: one fake upstream per provider -------------------------------------------


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeUpstream]]:
    """One FakeUpstream per provider of ROUTED_PROVIDERS (pa..pd)."""
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeUpstream()) for _ in ROUTED_PROVIDERS]


@pytest.fixture
async def start_routed(fakes: list[FakeUpstream]) -> AsyncIterator[StartRouted]:
    """`await start_routed(models, routing_cfg=..., providers=...)`: a gateway whose providers pa..pd
    point at fakes[0..3] (plus the harness's defaults), `providers` merged over them (provider by
    provider, key by key); `routing_cfg` defaults to `routing()`. Returns its URL."""
    async with AsyncExitStack() as stack:

        async def start(
            models: dict[str, Any],
            *,
            routing_cfg: dict[str, Any] | None = None,
            providers: dict[str, Any] | None = None,
        ) -> str:
            defaults = {
                name: provider_config("openai_compatible", f.base_url)
                for name, f in zip(ROUTED_PROVIDERS, fakes, strict=True)
            }
            config = gateway_config(
                fakes[0].base_url,
                providers=merge_providers(defaults, providers),
                models=models,
                routing=routing_cfg if routing_cfg is not None else routing(),
            )
            url: str = await stack.enter_async_context(running_gateway(config))
            return url

        yield start
