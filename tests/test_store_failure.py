"""The store failure policy, against a real redis-server stopped and started under a running
gateway process.

* Default (`budgets.on_store_failure: closed`): while Redis is down, billable requests get a
  quick 503 `store_unavailable` with a clear message and `/ready` says the store is not ok
  (503); when Redis is back on the same port the gateway serves again by itself.
* `on_store_failure: open`: a key the gateway saw just before the outage keeps working,
  unmetered (its spend is charged once the store is back); a key it has not seen (unknown, or
  only in Redis) cannot be checked and is refused.

Redis runs with an append-only file here (`--appendonly yes --appendfsync always`) so that it
comes back with the keys it had, as a production Redis would.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from helpers import (
    COST_NANO,
    MAX_ANSWER_S,
    RECOVERY_TIMEOUT_S,
    assert_store_unavailable,
    budgeted_key,
    chat_body,
    nano,
    start_redis_gateway,
    timed_chat,
    wait_for_200,
    wait_spent,
)

from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import TestKeys
from gateway.testing.processes import AdminClient, GatewayProcess
from gateway.testing.redis_server import RedisServer

BODY = chat_body("are you there?")


# ---- helpers (the `upstream` and `durable_redis` fixtures are in conftest.py) ---------------------


async def chat(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, Any, float]:
    """(status, body, seconds it took) of BODY."""
    return await timed_chat(session, url, key, BODY)


async def ready(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url + "/ready") as r:
        return r.status, await r.json(content_type=None)


# ---- fail closed (the default) -------------------------------------------------------------------


async def test_redis_down_fails_closed_and_recovers_without_restart(
    upstream: FakeUpstream,
    durable_redis: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    gw = await start_redis_gateway(processes, upstream, durable_redis)
    admin = AdminClient(session, gw.url, keys.admin)
    used = await budgeted_key(admin, "used before the outage")
    unused = await budgeted_key(admin, "not used before the outage")
    status, body, _ = await chat(session, gw.url, used["key"])
    assert status == 200, body
    assert (await ready(session, gw.url))[0] == 200

    await asyncio.to_thread(durable_redis.stop)
    for key in (used["key"], unused["key"], used["key"]):
        assert_store_unavailable(*await chat(session, gw.url, key), says_unreachable=True)
    status, body = await ready(session, gw.url)
    assert status == 503, body
    assert body["plugins"]["store"]["ok"] is False, body
    n_upstream = len(upstream.requests)
    assert n_upstream == 1  # nothing was forwarded unchecked

    await asyncio.to_thread(durable_redis.start)  # same port, same data directory
    status, body, _ = await wait_for_200(session, gw.url, used["key"], BODY)
    assert status == 200, f"no recovery within {RECOVERY_TIMEOUT_S} s: {status} {body}"
    status, body, _ = await chat(session, gw.url, unused["key"])
    assert status == 200, body
    status, body = await ready(session, gw.url)
    assert status == 200 and body["plugins"]["store"]["ok"] is True, body
    assert gw.running and gw.starts == 1  # the same process all along

    # Only the requests that were served are charged.
    b = await admin.wait_settled("keys", used["id"])
    assert nano(b["spent_usd"]) == 2 * COST_NANO, b
    b = await admin.wait_settled("keys", unused["id"])
    assert nano(b["spent_usd"]) == COST_NANO, b


async def test_admin_api_answers_503_while_redis_is_down(
    upstream: FakeUpstream,
    durable_redis: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    """Reads that need the store (a key's own budget, the admin API) fail as the store being
    unavailable — a 503 with the OpenAI error shape — not as an internal error."""
    gw = await start_redis_gateway(processes, upstream, durable_redis)
    admin = AdminClient(session, gw.url, keys.admin)
    key = await budgeted_key(admin, "k")
    status, body, _ = await chat(session, gw.url, key["key"])
    assert status == 200, body

    await asyncio.to_thread(durable_redis.stop)
    answers: dict[str, tuple[int, Any]] = {}
    for path, headers in (
        ("/v1/budget", {"Authorization": f"Bearer {key['key']}"}),
        (f"/admin/keys/{key['id']}", admin.headers),
        (f"/admin/keys/{key['id']}/budget", admin.headers),
        ("/admin/spend", admin.headers),
    ):
        t0 = time.monotonic()
        async with session.get(gw.url + path, headers=headers) as r:
            answers[path] = (r.status, await r.json(content_type=None))
        assert time.monotonic() - t0 < MAX_ANSWER_S, path
    bad = {p: a for p, a in answers.items() if a[0] != 503}
    assert not bad, f"expected 503 while the store is down, got: {bad}"
    assert all(a[1]["error"]["code"] == "store_unavailable" for a in answers.values()), answers


# ---- fail open -----------------------------------------------------------------------------------


async def test_redis_down_fails_open_for_keys_seen_recently(
    upstream: FakeUpstream,
    durable_redis: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    gw = await start_redis_gateway(processes, upstream, durable_redis, budgets={"on_store_failure": "open"})
    admin = AdminClient(session, gw.url, keys.admin)
    used = await budgeted_key(admin, "used before the outage")
    unused = await budgeted_key(admin, "not used before the outage")
    status, body, _ = await chat(session, gw.url, used["key"])
    assert status == 200, body

    await asyncio.to_thread(durable_redis.stop)
    outage_ok = 3
    for _ in range(outage_ok):
        status, body, took = await chat(session, gw.url, used["key"])
        assert status == 200, body  # admitted unmetered
        assert took < MAX_ANSWER_S
    # A key this gateway has not seen cannot be checked: refused, never let through.
    for k in ("sk-tw-" + uuid.uuid4().hex, unused["key"]):
        status, body, took = await chat(session, gw.url, k)
        assert status in (401, 503), (status, body)
        assert took < MAX_ANSWER_S
    status, body, _ = await chat(session, gw.url, unused["key"])
    assert status == 503, (status, body)  # it exists: "unauthorized" would be a lie
    assert body["error"]["code"] == "store_unavailable", body
    status, body = await ready(session, gw.url)
    assert body["plugins"]["store"]["ok"] is False, body

    await asyncio.to_thread(durable_redis.start)
    status, body, _ = await wait_for_200(session, gw.url, unused["key"], BODY)
    assert status == 200, f"no recovery within {RECOVERY_TIMEOUT_S} s: {status} {body}"
    # The requests served unmetered during the outage are charged once the store is back
    # (their settlements wait in the write-behind queue): spend is not lost to an outage...
    b = await wait_spent(admin, "keys", used["id"], (1 + outage_ok) * COST_NANO)
    assert nano(b["spent_usd"]) == (1 + outage_ok) * COST_NANO, b
    # ...but they are in the ledger once the store is back (one record per request served).
    def served(answer: dict[str, Any]) -> int:
        return sum(r["requests"] for r in answer["rows"] if r["key_id"] == used["id"])

    ledger = await admin.wait_spend(
        lambda a: served(a) >= 1 + outage_ok, group_by="key", team_id=used["team_id"]
    )
    assert served(ledger) == 1 + outage_ok, ledger
