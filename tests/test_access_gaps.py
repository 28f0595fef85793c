"""Issue 3, gaps in access control that the other suites do not reach, against real processes and
a real redis-server:

* revocation (and rotation) through one replica's admin API applies at once on another replica;
* an expired key whose expiry is extended works again at once (embedded and Redis);
* a Redis timeout (the server stalled by `DEBUG SLEEP`) does not leave a reservation held for
  the lease TTL;
* when Redis is down, rate limits fail open while budgets fail closed (the default policies),
  `rate_limit_on_store_failure: closed` refuses too, and what was served is billed afterwards;
* the spend ledger's records carry the request id the client got, provider, model, tokens, cost,
  cache status, latency and status (read from the embedded store's SQLite file and from the
  Redis stream);
* a key with no budget anywhere is never refused for budget.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import redis.asyncio as aioredis
from helpers import (
    COST_NANO,
    MAX_ANSWER_S,
    RECOVERY_TIMEOUT_S,
    StartGateway,
    assert_store_unavailable,
    budgeted_key,
    chat_body,
    error_code,
    nano,
    new_prefix,
    redis_gateway_config,
    sse_data_lines,
    start_redis_gateway,
    timed_chat,
    unique,
    wait_for_200,
    wait_spent,
)

from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import TestKeys
from gateway.testing.processes import AdminClient, GatewayProcess
from gateway.testing.redis_server import RedisServer

BODY = chat_body("mind the gaps")
SETTLE_TIMEOUT_S = 5.0
"""After Redis is back: how long a released reservation may take to show as released."""
REDIS_STALL_S = 2
"""`DEBUG SLEEP` this long: longer than the gateway's Redis socket timeout (1 s by default)."""


# ---- fixtures (`upstream` and `durable_redis` are in conftest.py) --------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of its own."""
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def stallable_redis() -> Iterator[RedisServer]:
    """A redis-server that accepts `DEBUG SLEEP` from loopback clients (Redis 7 refuses DEBUG
    unless `enable-debug-command` allows it)."""
    with RedisServer(extra_args=("--enable-debug-command", "local")) as srv:
        yield srv


# ---- helpers -------------------------------------------------------------------------------------


async def chat(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any] | None = None
) -> tuple[int, Any, float]:
    """(status, parsed body, seconds it took) of one chat request: `body`, by default BODY with
    a prompt of its own (so that no answer comes from the exact cache)."""
    return await timed_chat(session, url, key, unique(BODY) if body is None else body)


async def get(session: aiohttp.ClientSession, url: str, path: str, key: str) -> tuple[int, Any]:
    async with session.get(url + path, headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json(content_type=None)


async def wait_reserved_zero(
    admin: AdminClient, kind: str, scope_id: str, timeout_s: float
) -> dict[str, Any]:
    """Poll a budget until nothing is reserved or the time is up; return the last answer (the
    caller asserts). Store errors while Redis is still coming back are retried."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while True:
        try:
            last = await admin.budget(kind, scope_id)
            if last["reserved_usd"] == 0:
                return last
        except AssertionError as e:  # AdminError: e.g. a 503 while the pool reconnects
            last = {"error": str(e)}
        if time.monotonic() > deadline:
            return last
        await asyncio.sleep(0.1)


# ---- 1. revocation and rotation on every replica --------------------------------------------------


async def two_replicas(
    fake: FakeUpstream, srv: RedisServer, processes: Callable[..., GatewayProcess]
) -> tuple[GatewayProcess, GatewayProcess]:
    config = redis_gateway_config(fake, srv, new_prefix())
    a, b = processes(config, name="gw-a"), processes(config, name="gw-b")
    await asyncio.gather(a.astart(), b.astart())
    return a, b


async def test_revocation_on_one_replica_applies_at_once_on_another(
    upstream: FakeUpstream,
    redis_server: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    gw_a, gw_b = await two_replicas(upstream, redis_server, processes)
    admin_a = AdminClient(session, gw_a.url, keys.admin)
    key = await budgeted_key(admin_a, "to revoke", team_name="revocation")
    # Both replicas have seen (and may have cached) the key, on billable and other requests.
    for gw in (gw_a, gw_b):
        status, body, _ = await chat(session, gw.url, key["key"])
        assert status == 200, (gw.name, body)
        status, body = await get(session, gw.url, "/v1/models", key["key"])
        assert status == 200, (gw.name, body)
    assert len(upstream.requests) == 2

    revoked = await admin_a.call("POST", f"/admin/keys/{key['id']}/revoke")
    assert revoked["status"] == "revoked", revoked

    # The very next requests on the other replica: refused, as revoked.
    status, body, _ = await chat(session, gw_b.url, key["key"])
    assert (status, error_code(body)) == (401, "revoked_api_key"), (status, body)
    status, body = await get(session, gw_b.url, "/v1/models", key["key"])
    assert (status, error_code(body)) == (401, "revoked_api_key"), (status, body)
    stream_body = {**unique(BODY), "stream": True}
    status, body, _ = await chat(session, gw_b.url, key["key"], stream_body)
    assert (status, error_code(body)) == (401, "revoked_api_key"), (status, body)
    # And on the replica that revoked it.
    status, body, _ = await chat(session, gw_a.url, key["key"])
    assert (status, error_code(body)) == (401, "revoked_api_key"), (status, body)
    assert len(upstream.requests) == 2  # nothing after the revocation reached the upstream


async def test_rotation_on_one_replica_stops_the_old_secret_on_another(
    upstream: FakeUpstream,
    redis_server: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    gw_a, gw_b = await two_replicas(upstream, redis_server, processes)
    admin_a = AdminClient(session, gw_a.url, keys.admin)
    team = await admin_a.create_team(name="rotation")
    key = await admin_a.create_key(team_id=team["id"], name="to rotate")
    for gw in (gw_a, gw_b):
        status, body, _ = await chat(session, gw.url, key["key"])
        assert status == 200, (gw.name, body)
    rotated = await admin_a.call("POST", f"/admin/keys/{key['id']}/rotate")
    assert rotated["key"] != key["key"] and rotated["id"] == key["id"]

    status, body, _ = await chat(session, gw_b.url, key["key"])
    assert status == 401, (status, body)
    status, body = await get(session, gw_b.url, "/v1/models", key["key"])
    assert status == 401, (status, body)
    status, body, _ = await chat(session, gw_b.url, rotated["key"])
    assert status == 200, body
    assert len(upstream.requests) == 3


# ---- 2. an extended expiry takes effect at once ---------------------------------------------------


async def test_extended_expiry_takes_effect_at_once(
    store_config: dict[str, Any],
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    url = await start_gateway(**store_config)
    admin = AdminClient(http, url, keys.admin)
    team = await admin.create_team(name="expiry")
    key = await admin.create_key(team_id=team["id"], name="short-lived", expires_at=time.time() + 2.5)
    assert key["status"] == "active", key

    status, body, _ = await chat(http, url, key["key"])
    assert status == 200, body
    assert time.time() < key["expires_at"], "the first request came too late to test anything"

    await asyncio.sleep(max(key["expires_at"] - time.time(), 0) + 0.1)
    status, body, _ = await chat(http, url, key["key"])
    assert (status, error_code(body)) == (401, "expired_api_key"), (status, body)
    assert (await admin.get_key(key["id"]))["status"] == "expired"

    new_expiry = time.time() + 3600
    patched = await admin.call("PATCH", f"/admin/keys/{key['id']}", json={"expires_at": new_expiry})
    assert patched["status"] == "active" and patched["expires_at"] == pytest.approx(new_expiry), patched

    # The very next billable request (no other request in between) is served.
    status, body, _ = await chat(http, url, key["key"])
    assert status == 200, f"still refused after expires_at was moved an hour ahead: {status} {body}"
    assert len(upstream.requests) == 2


# ---- 3. a Redis timeout does not leak a reservation -----------------------------------------------


def stall_redis(port: int, seconds: int) -> None:
    """`DEBUG SLEEP seconds` on a connection of its own: the server answers nobody meanwhile."""
    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=seconds + 10)
    try:
        r.execute_command("DEBUG", "SLEEP", str(seconds))  # type: ignore[no-untyped-call]
    finally:
        r.close()


def redis_is_stalled(port: int) -> bool:
    """No PONG within 0.2 s on a fresh connection (a raw socket: redis-py retries timeouts)."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
        s.settimeout(0.2)
        s.sendall(b"PING\r\n")
        try:
            return not s.recv(64).startswith(b"+PONG")
        except TimeoutError:
            return True


async def test_redis_timeout_does_not_leak_a_reservation(
    upstream: FakeUpstream,
    stallable_redis: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    # The exact cache is off: its lookup would spend the first socket timeout of the stall, and
    # the admission is what this test is about.
    gw = await start_redis_gateway(processes, upstream, stallable_redis, cache={"enabled": False})
    admin = AdminClient(session, gw.url, keys.admin)
    key = await budgeted_key(admin, "stalled key", team_name="stalled team")
    status, body, _ = await chat(session, gw.url, key["key"])  # connections open, key seen
    assert status == 200, body
    before = await admin.wait_settled("keys", key["id"])
    assert nano(before["spent_usd"]) == COST_NANO, before

    port = stallable_redis.port
    assert port is not None
    stall = asyncio.create_task(asyncio.to_thread(stall_redis, port, REDIS_STALL_S))
    try:
        deadline = time.monotonic() + 1.5
        while not await asyncio.to_thread(redis_is_stalled, port):
            assert time.monotonic() < deadline, "DEBUG SLEEP did not stall the server"
            assert not stall.done(), stall
            await asyncio.sleep(0.02)
        stalled_at = time.monotonic()
        status, body, took = await chat(session, gw.url, key["key"])
        answered_at = time.monotonic()
    finally:
        await stall
    assert_store_unavailable(status, body, took)
    assert answered_at - stalled_at < REDIS_STALL_S + 0.5, "answered only after the stall ended"
    assert len(upstream.requests) == 1  # nothing was forwarded unchecked

    # Redis is back. Whatever the stalled admission did on the server once it woke up, no
    # reservation may stay held (for the lease TTL, 900 s) on the key or on its team.
    for kind, scope_id in (("keys", key["id"]), ("teams", key["team_id"])):
        b = await wait_reserved_zero(admin, kind, scope_id, SETTLE_TIMEOUT_S)
        assert b.get("reserved_usd") == 0, (
            f"{kind}/{scope_id}: a reservation is still held {SETTLE_TIMEOUT_S} s after Redis "
            f"recovered from a {REDIS_STALL_S} s stall (the request was refused with 503): {b}"
        )
        assert nano(b["spent_usd"]) == COST_NANO, (kind, b)  # the refused request costs nothing

    # And the key keeps working, charged exactly for what it is served.
    status, body, _ = await wait_for_200(session, gw.url, key["key"], BODY, fresh=True)
    assert status == 200, body
    after = await admin.wait_settled("keys", key["id"])
    assert nano(after["spent_usd"]) == 2 * COST_NANO, after


# ---- 4. Redis down: rate limits fail open, budgets fail closed -----------------------------------


async def test_redis_down_rate_limits_fail_open_budgets_fail_closed(
    upstream: FakeUpstream,
    durable_redis: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    prefix = new_prefix()
    # Default policies (budgets closed, rate limits open), and rate limits closed too.
    gw_open = processes(redis_gateway_config(upstream, durable_redis, prefix), name="gw-default")
    gw_closed = processes(
        redis_gateway_config(
            upstream, durable_redis, prefix, budgets={"rate_limit_on_store_failure": "closed"}
        ),
        name="gw-rl-closed",
    )
    await asyncio.gather(gw_open.astart(), gw_closed.astart())
    admin = AdminClient(session, gw_open.url, keys.admin)
    team_a = await admin.create_team(name="limits only", rpm=1000, tpm=1_000_000)
    key_a = await admin.create_key(team_id=team_a["id"], name="A: limits, no budget", rpm=1000)
    key_b = await budgeted_key(admin, "B: budget", team_name="budgeted")
    for gw in (gw_open, gw_closed):  # both replicas have seen both keys
        for k in (key_a, key_b):
            status, body, _ = await chat(session, gw.url, k["key"])
            assert status == 200, (gw.name, k["name"], body)
    assert len(upstream.requests) == 4

    await asyncio.to_thread(durable_redis.stop)
    outage_ok = 3
    for _ in range(outage_ok):
        status, body, took = await chat(session, gw_open.url, key_a["key"])
        assert status == 200, (
            f"key A (no budget anywhere, only rate limits) must be admitted while Redis is down "
            f"(rate_limit_on_store_failure: open): {status} {body}"
        )
        assert took < MAX_ANSWER_S, took
    assert_store_unavailable(*await chat(session, gw_open.url, key_b["key"]))
    # rate_limit_on_store_failure: closed -> key A is refused too (and B, as always).
    assert_store_unavailable(*await chat(session, gw_closed.url, key_a["key"]))
    assert_store_unavailable(*await chat(session, gw_closed.url, key_b["key"]))
    assert len(upstream.requests) == 4 + outage_ok

    await asyncio.to_thread(durable_redis.start)  # same port, same data
    status, body, _ = await wait_for_200(session, gw_open.url, key_b["key"], BODY, fresh=True)
    assert status == 200, f"no recovery within {RECOVERY_TIMEOUT_S} s: {status} {body}"

    # What key A was served during the outage is billed once Redis is back: the ledger (the Redis
    # stream) has one 200 record per request served (2 before the outage, `outage_ok` during it)
    # at full cost, anything else it holds for key A (the refusals) costs nothing; and the key's
    # and team's spend (all-time: they have no budget) include the outage.
    want = 2 + outage_ok
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while True:
        records = await redis_ledger(durable_redis.url, prefix, key_a["id"])
        ok = [r for r in records if r["status"] == 200]
        if len(ok) >= want or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert len(ok) == want, records
    assert all(r["cost_nano"] == COST_NANO for r in ok), ok
    others = [r for r in records if r["status"] != 200]
    assert all(r["cost_nano"] == 0 and r["status"] == 503 for r in others), others
    for kind, scope_id in (("keys", key_a["id"]), ("teams", team_a["id"])):
        b = await wait_spent(admin, kind, scope_id, want * COST_NANO)
        assert nano(b["spent_usd"]) == want * COST_NANO, (kind, b, want * COST_NANO)

    def served(answer: dict[str, Any]) -> int:
        rows = [r for r in answer["rows"] if r["key_id"] == key_a["id"]]
        return nano(sum(r["cost_usd"] for r in rows))

    ledger = await admin.wait_spend(lambda a: served(a) == want * COST_NANO, group_by="key",
                                    team_id=team_a["id"])
    assert served(ledger) == want * COST_NANO, ledger


# ---- 5. the ledger's records ---------------------------------------------------------------------


CACHE_STATUSES = ("hit-exact", "hit-semantic", "miss", "bypass")
LEDGER_FIELDS = (
    "request_id", "team_id", "key_id", "model", "provider", "prompt_tokens", "completion_tokens",
    "cost_nano", "cache", "latency_ms", "status", "ts",
)


async def sqlite_ledger(path: Path, key_id: str) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                "SELECT request_id, team_id, key_id, model, provider, prompt_tokens,"
                " completion_tokens, cost_nano, cache, latency_ms, status, ts"
                " FROM ledger WHERE key_id = ?",
                (key_id,),
            ).fetchall()
        finally:
            conn.close()
        return [dict(zip(LEDGER_FIELDS, row, strict=True)) for row in rows]

    return await asyncio.to_thread(read)


async def redis_ledger(url: str, prefix: str, key_id: str) -> list[dict[str, Any]]:
    r = aioredis.Redis.from_url(url)
    try:
        entries: Any = await r.xrange(prefix + "ledger")
    finally:
        await r.aclose()
    out = []
    for _, fields in entries:
        d = orjson.loads(fields[b"r"])
        if d["key"] != key_id:
            continue
        out.append(
            {
                "request_id": d["id"], "team_id": d["team"], "key_id": d["key"], "model": d["model"],
                "provider": d["provider"], "prompt_tokens": d["p"], "completion_tokens": d["c"],
                "cost_nano": d["cost"], "cache": d["cache"], "latency_ms": d["lat"],
                "status": d["status"], "ts": d["ts"],
            }
        )
    return out


async def test_ledger_records_carry_every_field(
    store_config: dict[str, Any],
    fake: FakeUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    keys: TestKeys,
    tmp_path: Path,
) -> None:
    db = tmp_path / "ledger.db"
    if store_config:
        url = await start_gateway(**store_config)
    else:
        url = await start_gateway(store={"backend": "embedded", "path": str(db)})
    admin = AdminClient(http, url, keys.admin)
    team = await admin.create_team(name="ledger team")
    key = await admin.create_key(team_id=team["id"], name="ledger key", rpm=2)
    auth = {"Authorization": f"Bearer {key['key']}"}
    t0 = time.time()

    # Distinct prompts: no answer may come from the exact cache.
    async with http.post(
        url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "first, whole"}],
              "max_tokens": 20, "temperature": 0},
        headers=auth,
    ) as r:
        assert r.status == 200, await r.text()
        plain = await r.json()
        plain_id = r.headers["x-request-id"]
        cache_seen = {plain_id: r.headers.get("x-tollway-cache")}
    async with http.post(
        url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "second, streamed"}],
              "max_tokens": 20, "stream": True, "stream_options": {"include_usage": True}},
        headers=auth,
    ) as r:
        assert r.status == 200, await r.text()
        raw = await r.read()
        stream_id = r.headers["x-request-id"]
        cache_seen[stream_id] = r.headers.get("x-tollway-cache")
    chunks = [orjson.loads(d) for d in sse_data_lines(raw) if d != b"[DONE]"]
    stream_usage = next(c["usage"] for c in chunks if c.get("usage"))
    async with http.post(
        url + "/v1/chat/completions",
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "third, refused"}],
              "max_tokens": 20},
        headers=auth,
    ) as r:
        refused_body = await r.json(content_type=None)
        assert r.status == 429, refused_body  # rpm=2
        assert error_code(refused_body) == "rate_limit_exceeded", refused_body
        refused_id = r.headers["x-request-id"]
        cache_seen[refused_id] = r.headers.get("x-tollway-cache")
    assert len({plain_id, stream_id, refused_id}) == 3
    # The cacheable request (temperature 0) missed; the others were not cacheable.
    assert cache_seen[plain_id] == "miss", cache_seen
    assert all(v in CACHE_STATUSES for v in cache_seen.values()), cache_seen
    assert len(fake.requests) == 2

    # Wait (bounded) for the three records (the ledger is written behind the requests).
    deadline = time.monotonic() + 5.0
    while True:
        await admin.spend(group_by="key")  # the embedded store flushes its ledger for this
        if store_config:
            records = await redis_ledger(store_config["store"]["url"], store_config["store"]["prefix"],
                                         key["id"])
        else:
            records = await sqlite_ledger(db, key["id"])
        if len(records) >= 3 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    t1 = time.time()
    by_id = {r["request_id"]: r for r in records}
    assert len(records) == 3 and set(by_id) == {plain_id, stream_id, refused_id}, records

    served = {
        plain_id: (plain["usage"]["prompt_tokens"], plain["usage"]["completion_tokens"]),
        stream_id: (stream_usage["prompt_tokens"], stream_usage["completion_tokens"]),
    }
    for rid, (prompt, completion) in served.items():
        rec = by_id[rid]
        assert (rec["team_id"], rec["key_id"], rec["model"], rec["provider"]) == (
            team["id"], key["id"], "gpt-test", "up"
        ), rec
        assert (rec["prompt_tokens"], rec["completion_tokens"]) == (prompt, completion), rec
        assert prompt > 0 and completion > 0, rec
        assert rec["cost_nano"] == prompt * 1_000 + completion * 2_000 > 0, rec
        assert rec["cache"] == cache_seen[rid], (rec, cache_seen)  # what the client was told
        assert rec["status"] == 200, rec
        assert 0 < rec["latency_ms"] < 15_000, rec
        assert t0 - 1 <= rec["ts"] <= t1 + 1, (rec, t0, t1)

    rec = by_id[refused_id]
    assert (rec["team_id"], rec["key_id"], rec["model"]) == (team["id"], key["id"], "gpt-test"), rec
    assert rec["provider"] in ("", None), f"a refused request reached no provider: {rec}"
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["cost_nano"]) == (0, 0, 0), rec
    assert rec["cache"] == cache_seen[refused_id], (rec, cache_seen)
    assert rec["status"] == 429, rec
    assert 0 < rec["latency_ms"] < 15_000, rec
    assert t0 - 1 <= rec["ts"] <= t1 + 1, (rec, t0, t1)


# ---- 6. no budget anywhere: never refused for budget ---------------------------------------------


async def test_key_without_any_budget_is_never_refused_for_budget(
    store_config: dict[str, Any],
    upstream: FakeUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    url = await start_gateway(**store_config)
    admin = AdminClient(http, url, keys.admin)
    team = await admin.create_team(name="no budget team")
    key = await admin.create_key(team_id=team["id"], name="no budget key")
    # A sibling with a tiny budget in the same team must not bind the key.
    await admin.create_key(team_id=team["id"], name="tiny", budget={"limit_usd": 0.000001})
    # Each request reserves 100 000 output tokens ($0.20): 20 at once hold $4 of reservations.
    big = {**BODY, "max_tokens": 100_000}
    n = 20
    results = await asyncio.gather(*(chat(http, url, key["key"], unique(big)) for _ in range(n)))
    bad = [(s, b) for s, b, _ in results if s != 200]
    assert not bad, f"{len(bad)} of {n} refused, e.g. {bad[:3]}"
    b = await admin.wait_settled("keys", key["id"])
    assert b["limit_usd"] is None and b["remaining_usd"] is None, b
    assert nano(b["spent_usd"]) == n * COST_NANO, b
    t = await admin.wait_settled("teams", team["id"])
    assert t["limit_usd"] is None and nano(t["spent_usd"]) == n * COST_NANO, t
