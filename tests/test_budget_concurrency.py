"""Budgets hold under concurrency: 300 requests at once against a budget that covers about 50.

Through two real gateway processes sharing one real Redis (requests split between them), and
through one embedded gateway process; for a key's budget and for a team's budget shared by three
keys. The upstream answers every request with the same usage, equal to the gateway's worst-case
reservation (prompt estimate + max_tokens), and holds each answer a little so that admitted
requests overlap. Afterwards, once every reservation is released:

* every answer is a 200 or a 429 `budget_exceeded` (never a 5xx, never another error);
* spent <= budget + the cost of one request (in fact <= budget: the reservation is exact);
* spent == (number of 200s) x (cost of one request), and the ledger has one record per 200
  with the same total (/admin/spend);
* no request that fitted was refused: the budget left is less than one request's reservation;
* nothing is still reserved (key and team), and the upstream saw exactly the admitted requests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from helpers import fixed_usage_reply, nano

from gateway.plugins.access import estimate_prompt_tokens
from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys, gateway_config
from gateway.testing.processes import AdminClient, GatewayProcess
from gateway.testing.redis_server import RedisServer

REQUESTS = 300
BUDGET_IN_REQUESTS = 50.5
"""The budget covers 50 requests and half of the 51st."""
MAX_TOKENS = 100
BODY: dict[str, Any] = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "x" * 129}],
    "max_tokens": MAX_TOKENS,
}
PROMPT_TOKENS = estimate_prompt_tokens(BODY)
"""What the gateway reserves for the prompt; the fake upstream reports exactly this much."""
NANO_PER_INPUT_TOKEN = 1_000  # the test models' price: $1 per million input tokens
NANO_PER_OUTPUT_TOKEN = 2_000  # $2 per million output tokens
COST_NANO = PROMPT_TOKENS * NANO_PER_INPUT_TOKEN + MAX_TOKENS * NANO_PER_OUTPUT_TOKEN
"""The real cost of every request, equal to its worst-case reservation."""
UPSTREAM_DELAY_S = 0.4
"""Longer than it takes to send all the requests: no reservation is settled (and so no budget
is freed or charged) before every request has been admitted or refused."""
PACE_S = 0.001
"""`interleaved` bursts send one request to each gateway every PACE_S (300 requests in 0.15 s)."""


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (a missing binary fails the tests)."""
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def steady_upstream(fake: FakeUpstream) -> FakeUpstream:
    fake.default = Behaviour(
        body=fixed_usage_reply(PROMPT_TOKENS, MAX_TOKENS), delay_s=UPSTREAM_DELAY_S
    )
    return fake


# ---- the burst and its checks --------------------------------------------------------------------


@dataclass
class Burst:
    statuses: Counter[int]
    ok_by_gateway: Counter[int]
    bad: list[tuple[int, Any]]
    """Answers that are neither 200 nor a well-formed 429 budget_exceeded."""
    refusals: Counter[str]
    """The messages of the 429s."""
    elapsed_s: float

    @property
    def ok(self) -> int:
        return self.statuses[200]


async def burst(
    session: aiohttp.ClientSession, urls: list[str], keys: list[str], *, interleaved: bool = False
) -> Burst:
    """REQUESTS chat requests; request i goes to urls[i % len] with keys[i % len].

    Without `interleaved` all are released at once. With it, round r (one request to each
    gateway) is sent at r x PACE_S: all are still in flight together (the upstream holds every
    answer UPSTREAM_DELAY_S), but the gateways' admissions are sure to alternate, instead of
    one process taking the whole budget before the scheduler gives the other one a CPU."""
    statuses: Counter[int] = Counter()
    ok_by_gateway: Counter[int] = Counter()
    bad: list[tuple[int, Any]] = []
    go = asyncio.Event()
    refusals: Counter[str] = Counter()
    first_ok: list[float] = []
    last_refusal: list[float] = []

    async def one(i: int) -> None:
        gw = i % len(urls)
        await go.wait()
        if interleaved:
            await asyncio.sleep((i // len(urls)) * PACE_S)
        async with session.post(
            urls[gw] + "/v1/chat/completions",
            json=BODY,
            headers={"Authorization": f"Bearer {keys[i % len(keys)]}"},
        ) as r:
            body: Any = await r.json(content_type=None)
            statuses[r.status] += 1
            if r.status == 200:
                first_ok.append(time.monotonic())
                ok_by_gateway[gw] += 1
                if body.get("usage", {}).get("prompt_tokens") != PROMPT_TOKENS:
                    bad.append((r.status, body))
                return
            last_refusal.append(time.monotonic())
            err = body.get("error", {}) if isinstance(body, dict) else {}
            refusals[str(err.get("message"))] += 1
            if (
                r.status != 429
                or err.get("code") != "budget_exceeded"
                or err.get("type") != "insufficient_quota"
                or r.headers.get("x-should-retry") != "false"
            ):
                bad.append((r.status, body))

    tasks = [asyncio.create_task(one(i)) for i in range(REQUESTS)]
    await asyncio.sleep(0)
    t0 = time.monotonic()
    go.set()
    await asyncio.gather(*tasks)
    if first_ok and last_refusal:
        print(
            f"first 200 answered after {(min(first_ok) - t0) * 1000:.0f} ms, "
            f"last refusal after {(max(last_refusal) - t0) * 1000:.0f} ms"
        )
    return Burst(statuses, ok_by_gateway, bad, refusals, time.monotonic() - t0)


async def check_budget_held(
    admin: AdminClient,
    fake: FakeUpstream,
    result: Burst,
    *,
    kind: str,
    scope_id: str,
    team_id: str,
    key_ids: list[str],
    label: str,
    refused_by: str,
) -> None:
    print(
        f"{label}: {result.ok} of {REQUESTS} succeeded in {result.elapsed_s:.2f} s "
        f"(per gateway: {dict(result.ok_by_gateway)}; statuses {dict(result.statuses)})"
    )
    assert not result.bad, f"{len(result.bad)} unexpected answers, e.g. {result.bad[:3]}"
    assert set(result.statuses) <= {200, 429}, result.statuses
    # The message says which budget refused, and when it resets.
    for msg in result.refusals:
        assert f"Budget exceeded for {refused_by}" in msg and "reset" in msg, result.refusals

    b = await admin.wait_settled(kind, scope_id)
    for kid in key_ids:
        await admin.wait_settled("keys", kid)
    limit, spent = nano(b["limit_usd"]), nano(b["spent_usd"])
    print(f"{label}: limit {limit} nano, spent {spent} nano, one request {COST_NANO} nano, {b}")
    assert b["reserved_usd"] == 0
    assert spent <= limit + COST_NANO, f"overspent: {spent} > {limit} + {COST_NANO}"
    assert spent == result.ok * COST_NANO, (
        f"spend {spent} nano does not match {result.ok} successful requests x {COST_NANO} nano"
    )
    left = limit - spent
    assert left < COST_NANO, (
        f"false rejections: {left} nano left after settling, enough for another request "
        f"({COST_NANO} nano), yet {result.statuses[429]} requests were refused"
    )
    assert result.ok >= 1
    # Every admitted request, and only those, reached the upstream.
    assert len(fake.requests) == result.ok

    # The ledger: one record per request (the refusals at no cost), adding up to the spend.
    def totals(answer: dict[str, Any]) -> tuple[int, int, int, int]:
        rows = [r for r in answer["rows"] if r["key_id"] in key_ids]
        return (
            sum(r["requests"] for r in rows),
            nano(sum(r["cost_usd"] for r in rows)),
            sum(r["prompt_tokens"] for r in rows),
            sum(r["completion_tokens"] for r in rows),
        )

    want = (REQUESTS, result.ok * COST_NANO, result.ok * PROMPT_TOKENS, result.ok * MAX_TOKENS)
    ledger = await admin.wait_spend(lambda a: totals(a) == want, group_by="key", team_id=team_id)
    assert totals(ledger) == want, ("(requests, cost, prompt, completion)", totals(ledger), ledger)


def budget_usd() -> float:
    return BUDGET_IN_REQUESTS * COST_NANO / 1_000_000_000


def redis_config(fake: FakeUpstream, srv: RedisServer) -> dict[str, Any]:
    prefix = f"tw-{uuid.uuid4().hex[:8]}:"
    return gateway_config(fake.base_url, store={"backend": "redis", "url": srv.url, "prefix": prefix})


async def start_all(gws: list[GatewayProcess]) -> list[str]:
    await asyncio.gather(*(gw.astart() for gw in gws))
    return [gw.url for gw in gws]


async def warm_up(session: aiohttp.ClientSession, urls: list[str], key: str, per_gateway: int = 150) -> None:
    """Concurrent requests on a free model with another key, so that every gateway has its store
    connections and the client its connections open before the burst: the gateways then contend
    for the budget at the same time instead of one of them still connecting."""

    async def one(url: str) -> None:
        body = {"model": "mock-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        async with session.post(
            url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            assert r.status == 200, await r.text()

    await asyncio.gather(*(one(url) for url in urls for _ in range(per_gateway)))


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["at-once", "interleaved"])
async def test_key_budget_two_gateways_sharing_redis(
    mode: str,
    steady_upstream: FakeUpstream,
    redis_server: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    config = redis_config(steady_upstream, redis_server)
    urls = await start_all([processes(config, name="gw-a"), processes(config, name="gw-b")])
    admin = AdminClient(session, urls[0], keys.admin)
    team = await admin.create_team(name="burst team")
    key = await admin.create_key(
        team_id=team["id"], name="burst key", budget={"limit_usd": budget_usd(), "period": "total"}
    )
    await warm_up(session, urls, keys.team_a)
    result = await burst(session, urls, [key["key"]], interleaved=mode == "interleaved")
    if mode == "interleaved":
        assert all(result.ok_by_gateway[i] > 0 for i in range(2)), (
            f"both gateways must admit some requests: {dict(result.ok_by_gateway)}"
        )
    # Checked through the other gateway: it reads the same budget and ledger out of Redis.
    await check_budget_held(
        AdminClient(session, urls[1], keys.admin), steady_upstream, result,
        kind="keys", scope_id=key["id"], team_id=team["id"], key_ids=[key["id"]],
        label=f"key budget, 2 gateways on redis, {mode}", refused_by="key 'burst key'",
    )
    assert nano((await admin.budget("keys", key["id"]))["spent_usd"]) == result.ok * COST_NANO


async def test_key_budget_one_embedded_gateway(
    steady_upstream: FakeUpstream,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    config = gateway_config(steady_upstream.base_url)  # embedded store in a fresh directory
    [url] = await start_all([processes(config, name="gw-embedded")])
    admin = AdminClient(session, url, keys.admin)
    team = await admin.create_team(name="burst team")
    key = await admin.create_key(
        team_id=team["id"], name="burst key", budget={"limit_usd": budget_usd(), "period": "monthly"}
    )
    await warm_up(session, [url], keys.team_a)
    result = await burst(session, [url], [key["key"]])
    await check_budget_held(
        admin, steady_upstream, result,
        kind="keys", scope_id=key["id"], team_id=team["id"], key_ids=[key["id"]],
        label="key budget, 1 embedded gateway", refused_by="key 'burst key'",
    )


@pytest.mark.parametrize(
    ("backend", "mode"), [("redis", "at-once"), ("redis", "interleaved"), ("embedded", "at-once")]
)
async def test_team_budget_shared_by_three_keys(
    backend: str,
    mode: str,
    steady_upstream: FakeUpstream,
    redis_server: RedisServer,
    processes: Callable[..., GatewayProcess],
    session: aiohttp.ClientSession,
    keys: TestKeys,
) -> None:
    """The team's budget binds its keys together (two keys have no budget of their own, the
    third a much larger one). Redis: two gateways; embedded: one."""
    if backend == "redis":
        config = redis_config(steady_upstream, redis_server)
        gws = [processes(config, name="gw-a"), processes(config, name="gw-b")]
    else:
        gws = [processes(gateway_config(steady_upstream.base_url), name="gw-embedded")]
    urls = await start_all(gws)
    admin = AdminClient(session, urls[0], keys.admin)
    team = await admin.create_team(
        name="shared budget", budget={"limit_usd": budget_usd(), "period": "daily"}
    )
    made = [
        await admin.create_key(team_id=team["id"], name="k0"),
        await admin.create_key(team_id=team["id"], name="k1"),
        await admin.create_key(
            team_id=team["id"], name="k2", budget={"limit_usd": 1000 * budget_usd(), "period": "total"}
        ),
    ]
    await warm_up(session, urls, keys.team_a)
    # 300 is a multiple of 6: every (gateway, key) pair gets the same share of the requests.
    result = await burst(session, urls, [k["key"] for k in made], interleaved=mode == "interleaved")
    if mode == "interleaved":
        assert all(result.ok_by_gateway[i] > 0 for i in range(2)), dict(result.ok_by_gateway)
    key_ids = [k["id"] for k in made]
    await check_budget_held(
        admin, steady_upstream, result,
        kind="teams", scope_id=team["id"], team_id=team["id"], key_ids=key_ids,
        label=f"team budget, 3 keys, {backend}, {mode}", refused_by="team 'shared budget'",
    )
    # The team's spend is the sum of its keys' spend; no key holds a reservation.
    per_key = [await admin.budget("keys", kid) for kid in key_ids]
    assert sum(nano(b["spent_usd"]) for b in per_key) == result.ok * COST_NANO, per_key
    assert all(b["reserved_usd"] == 0 for b in per_key), per_key
