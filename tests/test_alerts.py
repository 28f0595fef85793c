"""Issue 3: soft budget alerts — a warning, a metric and one webhook POST per threshold and period."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from helpers import USER_MESSAGES, AdminClient, StartGateway, fake_usage, metric_value, metrics_text, usd_cost

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys

CHECK_S = 0.1
QUIET_S = 4 * CHECK_S + 0.1
"""Long enough for several alert checks (and a ledger/settle round) to have run."""


class Receiver:
    """A webhook endpoint on loopback that records every JSON body posted to it."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.url = ""
        self.fail_next = 0
        """Answer this many of the next posts with a 503 (and do not record them)."""
        self.failed = 0
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.fail_next > 0:
            self.fail_next -= 1
            self.failed += 1
            return web.Response(status=503)
        self.posts.append(body)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, timeout_s: float = 3.0) -> list[dict[str, Any]]:
        """Wait until `count` posts arrived (or time runs out); return what arrived."""
        deadline = time.monotonic() + timeout_s
        while True:
            if len(self.posts) >= count or time.monotonic() > deadline:
                return list(self.posts)
            await asyncio.sleep(0.02)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


async def alerting_gateway(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    keys: TestKeys,
    receiver: Receiver,
    thresholds: list[float],
) -> tuple[str, AdminClient]:
    url = await start_gateway(
        budgets={
            "alerts": {"thresholds": thresholds, "webhook_url": receiver.url, "check_interval_s": CHECK_S}
        }
    )
    return url, AdminClient(http, url, keys.admin)


async def chat(url: str, key: str, max_tokens: int = 10) -> None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=15.0) as c:
        await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, max_tokens=max_tokens)


async def settled_spend(admin: AdminClient, kind: str, ident: str, usd: float) -> None:
    """Wait (bounded) until the scope's spend reaches `usd` and nothing is reserved."""
    deadline = time.monotonic() + 3.0
    while True:
        b = await admin.budget(kind, ident)
        if b["reserved_usd"] == 0 and b["spent_usd"] >= usd - 1e-12:
            return
        assert time.monotonic() < deadline, b
        await asyncio.sleep(0.02)


def alerts_metric(text: str, scope: str, threshold: str) -> float:
    return metric_value(text, "tollway_budget_alerts_total", scope=scope, threshold=threshold)


COST = usd_cost(*fake_usage(USER_MESSAGES))
"""What one request costs (the fake's usage for USER_MESSAGES at the test prices)."""


async def test_crossing_a_threshold_posts_once(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    keys: TestKeys,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, admin = await alerting_gateway(start_gateway, http, keys, receiver, [0.5])
    limit = 5 * COST  # 20 %, 40 %, 60 %, 80 % after 1..4 requests
    await admin.create_team(id="al", name="al")
    k = await admin.create_key(team_id="al", name="watched", budget={"limit_usd": limit, "period": "daily"})
    caplog.set_level(logging.WARNING, logger="tollway.access")

    for _ in range(2):
        await chat(url, k["key"])
    await settled_spend(admin, "key", k["id"], 2 * COST)
    await asyncio.sleep(QUIET_S)
    assert receiver.posts == []  # 40 %: below the threshold
    assert alerts_metric(await metrics_text(http, url), "key", "0.5") == 0

    await chat(url, k["key"])  # 60 %
    posts = await receiver.wait_for(1)
    assert len(posts) == 1, posts
    p = posts[0]
    assert p["scope"] == "key"
    assert p["id"] == k["id"]
    assert p["threshold"] == 0.5
    assert p["spent_usd"] == pytest.approx(3 * COST, abs=1e-12)
    assert p["limit_usd"] == pytest.approx(limit, abs=1e-12)
    assert alerts_metric(await metrics_text(http, url), "key", "0.5") == 1
    assert any("budget alert" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)

    await chat(url, k["key"])  # 80 %: same threshold, same period
    await settled_spend(admin, "key", k["id"], 4 * COST)
    await asyncio.sleep(QUIET_S)
    assert len(receiver.posts) == 1, receiver.posts
    assert alerts_metric(await metrics_text(http, url), "key", "0.5") == 1


async def test_team_budget_alert_counts_every_key(
    start_gateway: StartGateway, http: aiohttp.ClientSession, keys: TestKeys, receiver: Receiver
) -> None:
    url, admin = await alerting_gateway(start_gateway, http, keys, receiver, [0.5, 0.75])
    limit = 5 * COST
    await admin.create_team(id="alt", name="Alert Team", budget={"limit_usd": limit, "period": "weekly"})
    k1 = await admin.create_key(team_id="alt", name="k1")
    k2 = await admin.create_key(team_id="alt", name="k2")
    await chat(url, k1["key"])
    await chat(url, k2["key"])  # 40 % of the team budget, 20 % from each key
    await settled_spend(admin, "team", "alt", 2 * COST)
    await asyncio.sleep(QUIET_S)
    assert receiver.posts == []
    await chat(url, k1["key"])  # 60 %
    posts = await receiver.wait_for(1)
    assert [(p["scope"], p["id"], p["threshold"]) for p in posts] == [("team", "alt", 0.5)]
    assert posts[0]["spent_usd"] == pytest.approx(3 * COST, abs=1e-12)
    assert posts[0]["limit_usd"] == pytest.approx(limit, abs=1e-12)
    await chat(url, k2["key"])  # 80 %: the next threshold, once
    posts = await receiver.wait_for(2)
    assert [(p["scope"], p["id"], p["threshold"]) for p in posts] == [
        ("team", "alt", 0.5),
        ("team", "alt", 0.75),
    ]
    await asyncio.sleep(QUIET_S)
    assert len(receiver.posts) == 2
    text = await metrics_text(http, url)
    assert alerts_metric(text, "team", "0.5") == 1
    assert alerts_metric(text, "team", "0.75") == 1
    assert alerts_metric(text, "key", "0.5") == 0  # the keys have no budget of their own


async def test_alert_for_a_request_that_settles_after_a_check(
    fake: FakeUpstream,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    keys: TestKeys,
    receiver: Receiver,
) -> None:
    """A request slower than the check interval: its spend lands after the check that followed
    its admission, and must still raise the alert (with no further traffic)."""
    url, admin = await alerting_gateway(start_gateway, http, keys, receiver, [0.5])
    limit = 1.5 * COST  # one request: 67 %
    await admin.create_team(id="slow", name="slow")
    k = await admin.create_key(team_id="slow", budget={"limit_usd": limit, "period": "monthly"})
    fake.enqueue(Behaviour(delay_s=3 * CHECK_S))
    await chat(url, k["key"], max_tokens=5)
    await settled_spend(admin, "key", k["id"], COST)
    posts = await receiver.wait_for(1, timeout_s=QUIET_S + 0.5)
    assert [(p["scope"], p["id"], p["threshold"]) for p in posts] == [("key", k["id"], 0.5)]
    assert alerts_metric(await metrics_text(http, url), "key", "0.5") == 1


async def test_a_failing_webhook_is_tried_again(
    start_gateway: StartGateway, http: aiohttp.ClientSession, keys: TestKeys, receiver: Receiver
) -> None:
    """The alert is raised once per period, so a webhook answering 503 is not left at that: the
    POST is sent again (after a short backoff) and arrives."""
    url, admin = await alerting_gateway(start_gateway, http, keys, receiver, [0.5])
    await admin.create_team(id="alw", name="alw")
    k = await admin.create_key(team_id="alw", budget={"limit_usd": 5 * COST, "period": "daily"})
    receiver.fail_next = 1
    for _ in range(3):  # 60 %
        await chat(url, k["key"])
    posts = await receiver.wait_for(1, timeout_s=6.0)
    assert receiver.failed == 1
    assert len(posts) == 1, posts
    assert posts[0]["id"] == k["id"]
