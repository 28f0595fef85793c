"""Run the gateway in-process on a random loopback port, and build typical test configs.

    keys = install_test_env()
    async with FakeUpstream() as fake:
        async with running_gateway(gateway_config(fake.base_url)) as url:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.team_a)

Secrets in a config must be `${ENV}` references, so `gateway_config` refers to the
`TOLLWAY_TEST_*` variables below and `install_test_env()` (called by `gateway_config`) sets any
of them that are not already set.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from gateway.settings import Settings, settings_from_dict

__all__ = [
    "TEST_ENV",
    "TestKeys",
    "deep_merge",
    "gateway_config",
    "install_test_env",
    "running_gateway",
]

TEST_ENV: Final[Mapping[str, str]] = {
    "TOLLWAY_TEST_KEY_A": "sk-test-team-a-0001",
    "TOLLWAY_TEST_KEY_B": "sk-test-team-b-0002",
    "TOLLWAY_TEST_UPSTREAM_KEY": "sk-upstream-compat-secret-0001",
    "TOLLWAY_TEST_OPENAI_KEY": "sk-upstream-openai-secret-0002",
    "TOLLWAY_TEST_AZURE_KEY": "azure-upstream-secret-0003",
    "TOLLWAY_TEST_ADMIN_KEY": "sk-test-admin-0000",
}
"""The environment variables the test config refers to, with the values set by default."""


@dataclass(frozen=True)
class TestKeys:
    """The secret values in force (from the environment) for the test config."""

    __test__ = False  # not a pytest test class

    team_a: str
    """Client key of team `team-a`."""
    team_b: str
    """Client key of team `team-b`."""
    upstream: str
    """Provider key of `up` (openai_compatible)."""
    openai: str
    """Provider key of `oai` (openai)."""
    azure: str
    """Provider key of `azure`."""
    admin: str
    """The admin API key."""


def install_test_env() -> TestKeys:
    """Set the `TOLLWAY_TEST_*` variables that are not set yet; return the values in force."""
    for name, value in TEST_ENV.items():
        os.environ.setdefault(name, value)
    env = os.environ
    return TestKeys(
        team_a=env["TOLLWAY_TEST_KEY_A"],
        team_b=env["TOLLWAY_TEST_KEY_B"],
        upstream=env["TOLLWAY_TEST_UPSTREAM_KEY"],
        openai=env["TOLLWAY_TEST_OPENAI_KEY"],
        azure=env["TOLLWAY_TEST_AZURE_KEY"],
        admin=env["TOLLWAY_TEST_ADMIN_KEY"],
    )


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `overrides` merged in: mappings recursively, other values replaced;
    an override of `None` deletes the key."""
    out = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


TEST_PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}


def gateway_config(upstream_base_url: str, **overrides: Any) -> dict[str, Any]:
    """A typical config dict with every provider kind pointed at one upstream.

    `upstream_base_url` is an OpenAI base URL ending in `/v1` (e.g. `FakeUpstream.base_url`);
    the azure provider gets the same URL without `/v1`. Providers and public model names:

    * `up` (openai_compatible, Bearer `TOLLWAY_TEST_UPSTREAM_KEY`): `gpt-test` -> `upstream-chat-1`,
      `instruct-test` -> `upstream-instruct-1` (completions only),
      `embed-test` -> `upstream-embed-1` (embeddings only)
    * `azure` (api-key `TOLLWAY_TEST_AZURE_KEY`, api-version 2024-10-21): `gpt-azure` ->
      deployment `chat-deployment-1`, `embed-azure` -> deployment `embed-deployment-1`
    * `oai` (openai with api_base override, Bearer `TOLLWAY_TEST_OPENAI_KEY`): `gpt-openai` ->
      `gpt-4o-mini-2024-07-18`
    * `mock` (built-in): `mock-chat` -> `mock-small`

    Client keys: `TOLLWAY_TEST_KEY_A` (team-a) and `TOLLWAY_TEST_KEY_B` (team-b); admin key
    `TOLLWAY_TEST_ADMIN_KEY`. Prices: $1 / $2 per million input / output tokens (`gpt-openai`
    uses genai-prices). The store is embedded, in a fresh temporary directory per config.
    `routing.retry.max_attempts` is 1 (override it to test retries).
    `overrides` are deep-merged into the top-level sections (see `deep_merge`), e.g.
    `gateway_config(url, providers={"up": {"timeouts": {"read_s": 0.3}}})`.
    """
    install_test_env()
    base = upstream_base_url.rstrip("/")
    azure_base = base[: -len("/v1")] if base.endswith("/v1") else base
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {
            "mode": "keys",
            "keys": [
                {"key": "${TOLLWAY_TEST_KEY_A}", "team": "team-a", "name": "key a"},
                {"key": "${TOLLWAY_TEST_KEY_B}", "team": "team-b", "name": "key b"},
            ],
        },
        "providers": {
            "up": {
                "kind": "openai_compatible",
                "api_base": base,
                "api_key": "${TOLLWAY_TEST_UPSTREAM_KEY}",
                "timeouts": {"connect_s": 2.0, "read_s": 10.0, "total_s": 30.0},
            },
            "azure": {
                "kind": "azure",
                "api_base": azure_base,
                "api_version": "2024-10-21",
                "api_key": "${TOLLWAY_TEST_AZURE_KEY}",
                "timeouts": {"connect_s": 2.0, "read_s": 10.0, "total_s": 30.0},
            },
            "oai": {
                "kind": "openai",
                "api_base": base,
                "api_key": "${TOLLWAY_TEST_OPENAI_KEY}",
                "timeouts": {"connect_s": 2.0, "read_s": 10.0, "total_s": 30.0},
            },
            "mock": {"kind": "mock"},
        },
        "models": {
            "gpt-test": {
                "price": TEST_PRICE,
                "deployments": [{"provider": "up", "model": "upstream-chat-1"}],
            },
            "instruct-test": {
                "price": TEST_PRICE,
                "endpoints": ["completions"],
                "deployments": [{"provider": "up", "model": "upstream-instruct-1"}],
            },
            "embed-test": {
                "price": TEST_PRICE,
                "endpoints": ["embeddings"],
                "deployments": [{"provider": "up", "model": "upstream-embed-1"}],
            },
            "gpt-azure": {
                "price": TEST_PRICE,
                "deployments": [{"provider": "azure", "model": "chat-deployment-1"}],
            },
            "embed-azure": {
                "price": TEST_PRICE,
                "endpoints": ["embeddings"],
                "deployments": [{"provider": "azure", "model": "embed-deployment-1"}],
            },
            "gpt-openai": {"deployments": [{"provider": "oai", "model": "gpt-4o-mini-2024-07-18"}]},
            "mock-chat": {
                "price": {"free": True},
                "deployments": [{"provider": "mock", "model": "mock-small"}],
            },
        },
        "admin": {"key": "${TOLLWAY_TEST_ADMIN_KEY}"},
        # One attempt per request, so tests of a single upstream call see exactly that call;
        # routing tests override `routing.retry` (production default: 3 attempts).
        "routing": {"retry": {"max_attempts": 1}},
        "store": {
            "backend": "embedded",
            "path": os.path.join(tempfile.mkdtemp(prefix="tollway-test-"), "t.db"),
        },
        "logging": {"level": "WARNING"},
    }
    return deep_merge(config, overrides)


@asynccontextmanager
async def running_gateway(
    settings: Settings | Mapping[str, Any], *, shutdown_timeout_s: float = 1.0
) -> AsyncIterator[str]:
    """Run the gateway app on 127.0.0.1 (random port) and yield `http://127.0.0.1:PORT`.

    The config's server host/port are ignored. A dict is validated with `settings_from_dict`
    (so `ConfigError` is raised for a bad one).
    """
    from gateway.app import create_app  # late: the app imports the whole gateway

    if not isinstance(settings, Settings):
        settings = settings_from_dict(dict(settings), "<test config>")
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout_s,
        access_log=None,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
