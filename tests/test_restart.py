"""Keys, teams and spend survive the gateway process: a kill -9 and a graceful stop (SIGTERM)
of the embedded store's gateway, and a restart of a Redis-backed gateway.

Each test runs the real `python -m gateway serve` (GatewayProcess), creates a team and a key
with the admin API, sends requests whose cost is known exactly (the fake upstream reports fixed
usage), stops the process, starts it again on the same config (same store), and checks that the
key still authenticates and that its budget's spend and the ledger account for every request.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
from helpers import (
    COMPLETION_TOKENS,
    COST_NANO,
    PROMPT_TOKENS,
    chat_body,
    fixed_usage_reply,
    nano,
    redis_gateway_config,
    timed_chat,
)

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys, gateway_config
from gateway.testing.processes import AdminClient, GatewayProcess
from gateway.testing.redis_server import RedisServer

BODY = chat_body("remember me")
GRACEFUL_ROUNDS = 3
"""Graceful stops are repeated: each must lose nothing and duplicate nothing."""
FLUSH_WAIT_S = 2.0
"""Comfortably longer than what a kill -9 may lose: the last second of spend (the embedded store
flushes every 1 s, its default), plus whatever buffering happens before the store."""


# ---- helpers (the `upstream` fixture is in conftest.py) -------------------------------------------


async def chat(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, Any]:
    """(status, parsed body) of BODY."""
    status, body, _ = await timed_chat(session, url, key, BODY)
    return status, body


async def send(session: aiohttp.ClientSession, url: str, key: str, n: int) -> None:
    """n concurrent requests; all must succeed."""
    results = await asyncio.gather(*(chat(session, url, key) for _ in range(n)))
    assert [s for s, _ in results] == [200] * n, results


async def setup_key(admin: AdminClient) -> tuple[dict[str, Any], dict[str, Any]]:
    team = await admin.create_team(
        name="durable team", budget={"limit_usd": 10.0, "period": "monthly"}, metadata={"cc": "42"}
    )
    key = await admin.create_key(
        team_id=team["id"], name="durable key", budget={"limit_usd": 5.0, "period": "daily"}, rpm=10_000
    )
    return team, key


async def check_survived(
    session: aiohttp.ClientSession,
    url: str,
    admin_key: str,
    team: dict[str, Any],
    key: dict[str, Any],
    n: int,
) -> None:
    """After the restart: the team and key are there as created, the key authenticates, and
    spend and ledger count exactly n requests. Then makes one more (billable) request, which
    must succeed and be charged: the caller's count goes up by one."""
    admin = AdminClient(session, url, admin_key)
    t = await admin.get_team(team["id"])
    assert (t["name"], t["budget"], t["metadata"]) == ("durable team", team["budget"], {"cc": "42"})
    k = await admin.get_key(key["id"])
    assert (k["name"], k["budget"], k["rpm"], k["status"]) == ("durable key", key["budget"], 10_000, "active")

    # The key authenticates (its own budget view, not billable)...
    async with session.get(url + "/v1/budget", headers={"Authorization": f"Bearer {key['key']}"}) as r:
        own = await r.json(content_type=None)
        assert r.status == 200, own
    assert own["key"]["id"] == key["id"]
    assert nano(own["key"]["spent_usd"]) == n * COST_NANO, own

    # ...and its budget and its team's account for every request made before the stop.
    for kind, scope_id in (("keys", key["id"]), ("teams", team["id"])):
        b = await admin.budget(kind, scope_id)
        assert nano(b["spent_usd"]) == n * COST_NANO, (kind, b, n * COST_NANO)
        assert b["reserved_usd"] == 0, (kind, b)
    ledger = await admin.spend(group_by="key", team_id=team["id"])
    assert [(r["key_id"], r["requests"]) for r in ledger["rows"]] == [(key["id"], n)], ledger
    assert nano(ledger["total_usd"]) == n * COST_NANO, ledger

    # A billable request still works and is charged on top.
    status, body = await chat(session, url, key["key"])
    assert status == 200, body
    b = await admin.wait_settled("keys", key["id"])
    assert nano(b["spent_usd"]) == (n + 1) * COST_NANO, b


# ---- embedded ------------------------------------------------------------------------------------


async def test_embedded_kill9_keeps_keys_and_spend(
    upstream: FakeUpstream,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    n = 12
    gw = processes(gateway_config(upstream.base_url), name="gw-embedded")
    await gw.astart()
    admin = AdminClient(session, gw.url, keys.admin)
    team, key = await setup_key(admin)
    await send(session, gw.url, key["key"], n)
    await asyncio.sleep(FLUSH_WAIT_S)  # only the last second of spend may be lost to a crash

    assert await gw.akill() == -signal.SIGKILL
    await gw.astart()  # same config, same SQLite file
    await check_survived(session, gw.url, keys.admin, team, key, n)


async def test_embedded_graceful_stop_loses_nothing(
    upstream: FakeUpstream,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    n = 40
    gw = processes(gateway_config(upstream.base_url), name="gw-embedded")
    await gw.astart()
    admin = AdminClient(session, gw.url, keys.admin)
    team, key = await setup_key(admin)
    total = 0
    for _ in range(GRACEFUL_ROUNDS):
        await send(session, gw.url, key["key"], n)
        total += n
        # At once: settlements and ledger records may still be buffered.
        assert await gw.aterminate(timeout_s=10) == 0, "no clean exit within 10 s of SIGTERM"
        await gw.astart()
        await check_survived(session, gw.url, keys.admin, team, key, total)
        total += 1


async def test_embedded_sigterm_during_requests_bills_every_answer(
    fake: FakeUpstream,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    """SIGTERM while requests are at the upstream: the gateway lets them finish, and every
    request that was answered is in the spend and the ledger after the restart."""
    n = 20
    fake.default = Behaviour(body=fixed_usage_reply(PROMPT_TOKENS, COMPLETION_TOKENS), delay_s=0.5)
    gw = processes(gateway_config(fake.base_url), name="gw-embedded")
    await gw.astart()
    admin = AdminClient(session, gw.url, keys.admin)
    team, key = await setup_key(admin)

    pending = [asyncio.create_task(chat(session, gw.url, key["key"])) for _ in range(n)]
    await fake.wait_for_requests(n)
    term = asyncio.create_task(gw.aterminate())
    results = await asyncio.gather(*pending)
    assert await term == 0
    statuses = [s for s, _ in results]
    assert statuses == [200] * n, results  # in-flight requests are drained, not dropped

    await gw.astart()
    await check_survived(session, gw.url, keys.admin, team, key, n)


# ---- redis ---------------------------------------------------------------------------------------


async def test_redis_gateway_restart_keeps_keys_and_spend(
    upstream: FakeUpstream,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    """Keys, teams and spend live in Redis: a restarted gateway finds them. Each graceful stop
    (right after the requests, writes possibly still queued) must lose nothing and write
    nothing twice, so the ledger and the spend still agree exactly after every restart."""
    n = 25
    async with RedisServer() as srv:
        gw = processes(redis_gateway_config(upstream, srv), name="gw-redis")
        await gw.astart()
        admin = AdminClient(session, gw.url, keys.admin)
        team, key = await setup_key(admin)
        total = 0
        for _ in range(GRACEFUL_ROUNDS):
            await send(session, gw.url, key["key"], n)
            total += n
            assert await gw.aterminate(timeout_s=10) == 0, "no clean exit within 10 s of SIGTERM"
            await gw.astart()
            await check_survived(session, gw.url, keys.admin, team, key, total)
            total += 1
        await gw.astop()
