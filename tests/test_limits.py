"""Issue 3: enforcement through the gateway — RPM/TPM limits, budgets (reserve -> settle), key
revocation and expiry, allowed models, the max_tokens cap, and the spend ledger."""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from helpers import (
    USER_MESSAGES,
    AdminClient,
    StartGateway,
    assert_error_shape,
    fake_usage,
    metric_value,
    metrics_text,
    sse_data_lines,
    usd_cost,
)

from gateway.plugins.access import estimate_prompt_tokens
from gateway.testing.fake_upstream import Behaviour, FakeUpstream, reply_for
from gateway.testing.harness import TestKeys

CHAT = "/v1/chat/completions"
RESET_RE = re.compile(r"^(\d+ms|\d+s|\d+m\d+s)$")
EST_PROMPT = estimate_prompt_tokens({"messages": USER_MESSAGES})
"""The gateway's (deliberately generous) input estimate for USER_MESSAGES."""


@pytest.fixture
async def admin(gateway: str, http: aiohttp.ClientSession, keys: TestKeys) -> AdminClient:
    return AdminClient(http, gateway, keys.admin)


def sdk(base_url: str, key: str, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=max_retries, timeout=15.0)


async def raw_chat(base_url: str, key: str, **kw: Any) -> Any:
    """A chat request through the SDK's raw-response API: (headers, parsed completion)."""
    async with sdk(base_url, key) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="gpt-test", messages=USER_MESSAGES, **kw
        )
        return raw.headers, raw.parse()


async def reserved_during_a_slow_chat(
    fake: FakeUpstream, admin: AdminClient, url: str, key: dict[str, Any]
) -> dict[str, Any]:
    """Send one chat request that the upstream holds for 0.5 s; return the key's budget as soon as
    it shows a reservation (bounded: 2 s), then wait for the request to finish."""
    fake.enqueue(Behaviour(delay_s=0.5))
    task = asyncio.create_task(raw_chat(url, key["key"]))
    try:
        deadline = time.monotonic() + 2
        while True:
            b = await admin.budget("key", key["id"])
            if b["reserved_usd"] > 0 or time.monotonic() > deadline:
                return b
            await asyncio.sleep(0.02)
    finally:
        await task


async def chat_error(base_url: str, key: str, model: str = "gpt-test", **kw: Any) -> openai.APIStatusError:
    async with sdk(base_url, key) as c:
        with pytest.raises(openai.APIStatusError) as ei:
            await c.chat.completions.create(model=model, messages=USER_MESSAGES, **kw)
    return ei.value


def error_of(e: openai.APIStatusError) -> dict[str, Any]:
    err: dict[str, Any] = e.response.json()["error"]
    return err


def next_utc_midnight() -> datetime:
    d = datetime.now(UTC)
    return datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(days=1)


def next_utc_monday() -> datetime:
    d = datetime.now(UTC)
    day = datetime(d.year, d.month, d.day, tzinfo=UTC)
    return day + timedelta(days=7 - day.weekday())


async def requests_by_status(http: aiohttp.ClientSession, base: str, status: str) -> float:
    return metric_value(
        await metrics_text(http, base), "tollway_requests_total", endpoint="chat", status=status
    )


# ---- RPM / TPM ----------------------------------------------------------------------------------


async def test_key_rpm_limit(
    fake: FakeUpstream, admin: AdminClient, gateway: str, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    await admin.create_team(id="rpm", name="rpm")
    k = await admin.create_key(team_id="rpm", name="three a minute", rpm=3)
    first_minute = time.time() // 60
    for remaining in (2, 1, 0):
        headers, r = await raw_chat(gateway, k["key"], max_tokens=10)
        assert r.choices[0].message.content
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert RESET_RE.match(headers["x-ratelimit-reset-requests"]), headers["x-ratelimit-reset-requests"]
        assert "x-ratelimit-limit-tokens" not in headers  # no TPM limit on this key or team
    assert len(fake.requests) == 3

    e = await chat_error(gateway, k["key"], max_tokens=10)
    assert isinstance(e, openai.RateLimitError)
    assert e.status_code == 429
    h = e.response.headers
    retry_s = int(h["retry-after"])
    retry_ms = int(h["retry-after-ms"])
    assert 1 <= retry_s <= 120
    assert 0 < retry_ms <= 120_000
    assert retry_s == math.ceil(retry_ms / 1000)
    if time.time() // 60 == first_minute:
        # sliding window: 3 hits in this minute; one more fits once the window has moved a third
        # past them, i.e. 20 s into the next minute at the earliest and 80 s at the latest
        assert 20_000 <= retry_ms <= 80_001, retry_ms
    assert h["x-ratelimit-limit-requests"] == "3"
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert RESET_RE.match(h["x-ratelimit-reset-requests"])
    assert h.get("x-should-retry") != "false"  # a rate limit is worth retrying later
    err = error_of(e)
    assert err["code"] == "rate_limit_exceeded"
    assert err["type"] == "requests"
    assert "three a minute" in err["message"]
    assert len(fake.requests) == 3  # the refused request never reached the upstream

    # refused requests are not counted: still refused, and other keys are not affected
    e = await chat_error(gateway, k["key"], max_tokens=10)
    assert e.status_code == 429
    headers, _ = await raw_chat(gateway, keys.team_a, max_tokens=10)
    assert "x-ratelimit-limit-requests" not in headers  # the config key has no limits
    text = await metrics_text(http, gateway)
    assert metric_value(text, "tollway_access_rejections_total", reason="rate_limited", scope="key") == 2
    _, n = await admin.settled(k["id"], 5)
    assert n == 5  # the ledger: 3 admitted requests and the 2 refused ones (cost 0)


async def test_rate_headers_on_streams(admin: AdminClient, gateway: str, http: aiohttp.ClientSession) -> None:
    await admin.create_team(id="rs", name="rs")
    k = await admin.create_key(team_id="rs", rpm=10, tpm=100000)
    body = {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True, "max_tokens": 40}
    async with http.post(gateway + CHAT, json=body, headers={"Authorization": f"Bearer {k['key']}"}) as resp:
        assert resp.status == 200
        await resp.read()
        h = resp.headers
    assert h["x-ratelimit-limit-requests"] == "10"
    assert h["x-ratelimit-remaining-requests"] == "9"
    assert h["x-ratelimit-limit-tokens"] == "100000"
    assert h["x-ratelimit-remaining-tokens"] == str(100000 - EST_PROMPT - 40)
    assert RESET_RE.match(h["x-ratelimit-reset-tokens"])


async def test_key_tpm_limit(fake: FakeUpstream, admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="tpm", name="tpm")
    k = await admin.create_key(team_id="tpm", name="tpm key", tpm=100)
    # admitted on its estimate: input estimate + max_tokens
    headers, r = await raw_chat(gateway, k["key"], max_tokens=50)
    assert headers["x-ratelimit-limit-tokens"] == "100"
    assert headers["x-ratelimit-remaining-tokens"] == str(100 - EST_PROMPT - 50)
    assert RESET_RE.match(headers["x-ratelimit-reset-tokens"])
    assert "x-ratelimit-limit-requests" not in headers
    used = r.usage.prompt_tokens + r.usage.completion_tokens

    # a request that can never fit: no point retrying it
    e = await chat_error(gateway, k["key"], max_tokens=200)
    assert isinstance(e, openai.RateLimitError)
    err = error_of(e)
    assert err["type"] == "tokens" and err["code"] == "request_too_large"
    assert "tokens" in err["message"]
    assert e.response.headers["x-should-retry"] == "false"
    assert "retry-after" not in e.response.headers
    assert e.response.headers["x-ratelimit-limit-tokens"] == "100"

    # after settling, the window holds the real usage, not the estimate: exactly what is left fits
    b, _ = await admin.settled(k["id"], 2)
    assert b["reserved_usd"] == 0
    headers, r = await raw_chat(gateway, k["key"], max_tokens=100 - used - EST_PROMPT)
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    used += r.usage.prompt_tokens + r.usage.completion_tokens
    await admin.settled(k["id"], 3)
    # one token more than what is left is refused
    e = await chat_error(gateway, k["key"], max_tokens=100 - used - EST_PROMPT + 1)
    assert e.status_code == 429
    assert error_of(e)["type"] == "tokens"
    headers, _ = await raw_chat(gateway, k["key"], max_tokens=100 - used - EST_PROMPT)
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert len(fake.requests) == 3


async def test_team_limits_bind_every_key(
    fake: FakeUpstream, admin: AdminClient, gateway: str, keys: TestKeys
) -> None:
    await admin.create_team(id="shared", name="Shared Team", rpm=2)
    k1 = await admin.create_key(team_id="shared", name="k1")
    k2 = await admin.create_key(team_id="shared", name="k2")
    h1, _ = await raw_chat(gateway, k1["key"], max_tokens=5)
    assert h1["x-ratelimit-limit-requests"] == "2" and h1["x-ratelimit-remaining-requests"] == "1"
    h2, _ = await raw_chat(gateway, k2["key"], max_tokens=5)
    assert h2["x-ratelimit-remaining-requests"] == "0"
    for k in (k1, k2):
        e = await chat_error(gateway, k["key"], max_tokens=5)
        assert e.status_code == 429
        assert "Shared Team" in error_of(e)["message"]
        assert "team" in error_of(e)["message"]
    assert len(fake.requests) == 2
    await raw_chat(gateway, keys.team_a, max_tokens=5)  # another team is not affected


async def test_team_tpm_binds_every_key(fake: FakeUpstream, admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="ttpm", name="Token Team", tpm=100)
    k1 = await admin.create_key(team_id="ttpm", name="k1")
    k2 = await admin.create_key(team_id="ttpm", name="k2")
    h, _ = await raw_chat(gateway, k1["key"], max_tokens=80)
    assert h["x-ratelimit-limit-tokens"] == "100"
    # k1's request holds at least its real usage (>= 11 tokens) in the team's window
    e = await chat_error(gateway, k2["key"], max_tokens=80)
    assert isinstance(e, openai.RateLimitError)
    err = error_of(e)
    assert err["type"] == "tokens" and "Token Team" in err["message"]
    assert e.response.headers["x-ratelimit-limit-tokens"] == "100"
    assert len(fake.requests) == 1


async def test_key_limit_tighter_than_team(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="loose", name="loose", rpm=100)
    k1 = await admin.create_key(team_id="loose", name="tight key", rpm=1)
    k2 = await admin.create_key(team_id="loose", name="free key")
    h, _ = await raw_chat(gateway, k1["key"], max_tokens=5)
    assert h["x-ratelimit-limit-requests"] == "1"  # the tightest limit in force
    assert h["x-ratelimit-remaining-requests"] == "0"
    e = await chat_error(gateway, k1["key"], max_tokens=5)
    assert e.status_code == 429 and "tight key" in error_of(e)["message"]
    h, _ = await raw_chat(gateway, k2["key"], max_tokens=5)
    assert h["x-ratelimit-limit-requests"] == "100"
    assert h["x-ratelimit-remaining-requests"] == "98"  # k1's admitted request counts for the team


async def test_limit_update_applies_at_once(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="upd", name="upd")
    k = await admin.create_key(team_id="upd")
    await raw_chat(gateway, k["key"], max_tokens=5)
    await admin.ok("PATCH", f"/admin/keys/{k['id']}", {"rpm": 1})
    headers, _ = await raw_chat(gateway, k["key"], max_tokens=5)
    assert headers["x-ratelimit-limit-requests"] == "1"
    e = await chat_error(gateway, k["key"], max_tokens=5)
    assert e.status_code == 429
    await admin.ok("PATCH", f"/admin/keys/{k['id']}", {"rpm": None})
    await raw_chat(gateway, k["key"], max_tokens=5)


# ---- budgets ------------------------------------------------------------------------------------

# With max_tokens=10 a request reserves (EST_PROMPT + 2 * 10) micro-USD worst case and costs
# (2 + 2 * 9) micro-USD for real (the fake's usage): a limit of at least one reservation but less
# than one real cost plus one reservation admits exactly one request.
ONE_REQUEST_USD = 45e-6


async def test_key_budget_exceeded(
    fake: FakeUpstream, admin: AdminClient, gateway: str, http: aiohttp.ClientSession
) -> None:
    prompt, completion = fake_usage(USER_MESSAGES)
    reserve = usd_cost(EST_PROMPT, 10)
    assert reserve <= ONE_REQUEST_USD < usd_cost(prompt, completion) + reserve
    await admin.create_team(id="bx", name="bx")
    k = await admin.create_key(
        team_id="bx", name="small key", budget={"limit_usd": ONE_REQUEST_USD, "period": "daily"}
    )
    await raw_chat(gateway, k["key"], max_tokens=10)
    assert len(fake.requests) == 1

    # the SDK's default retries are on: it must not retry into an exhausted budget
    async with sdk(gateway, k["key"], max_retries=2) as c:
        with pytest.raises(openai.RateLimitError) as ei:
            await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, max_tokens=10)
    e = ei.value
    assert e.status_code == 429
    assert e.response.headers["x-should-retry"] == "false"
    err = assert_error_shape(e.response.content, 429)
    assert err["type"] == "insufficient_quota"
    assert err["code"] == "budget_exceeded"
    assert "key" in err["message"] and "small key" in err["message"]
    assert next_utc_midnight().strftime("%Y-%m-%dT%H:%M:%SZ") in err["message"], err["message"]
    assert await requests_by_status(http, gateway, "429") == 1  # one request reached the gateway
    assert await requests_by_status(http, gateway, "200") == 1
    assert len(fake.requests) == 1
    b, n = await admin.settled(k["id"], 2)
    assert n == 2  # the admitted request and the refused one (cost 0)
    assert b["spent_usd"] == pytest.approx(usd_cost(prompt, completion), abs=1e-12)
    assert b["spent_usd"] <= ONE_REQUEST_USD


async def test_team_budget_exceeded_binds_all_keys(
    fake: FakeUpstream, admin: AdminClient, gateway: str, keys: TestKeys, http: aiohttp.ClientSession
) -> None:
    await admin.create_team(
        id="tb", name="Budget Team", budget={"limit_usd": ONE_REQUEST_USD, "period": "weekly"}
    )
    k1 = await admin.create_key(team_id="tb", name="first")
    k2 = await admin.create_key(team_id="tb", name="second", budget={"limit_usd": 10, "period": "daily"})
    await raw_chat(gateway, k1["key"], max_tokens=10)
    for k in (k2, k1):
        async with http.post(
            gateway + CHAT,
            json={"model": "gpt-test", "messages": USER_MESSAGES, "max_tokens": 10},
            headers={"Authorization": f"Bearer {k['key']}"},
        ) as resp:
            body = await resp.read()
            assert resp.status == 429, body
            assert resp.headers["x-should-retry"] == "false"
            assert resp.content_type == "application/json"
        err = assert_error_shape(body)
        assert err["type"] == "insufficient_quota" and err["code"] == "budget_exceeded"
        assert "team" in err["message"] and "Budget Team" in err["message"], err["message"]
        assert next_utc_monday().strftime("%Y-%m-%dT%H:%M:%SZ") in err["message"], err["message"]
    assert len(fake.requests) == 1
    await raw_chat(gateway, keys.team_a, max_tokens=10)  # other teams are not affected
    tb = await admin.budget("team", "tb")
    assert tb["spent_usd"] <= ONE_REQUEST_USD


async def test_total_budget_message_says_it_does_not_reset(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="tt", name="tt")
    k = await admin.create_key(team_id="tt", name="zero", budget={"limit_usd": 0, "period": "total"})
    e = await chat_error(gateway, k["key"], max_tokens=10)
    assert e.status_code == 429
    err = error_of(e)
    assert err["code"] == "budget_exceeded"
    assert "zero" in err["message"] and "not reset" in err["message"]


async def test_budget_raise_applies_at_once(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="raise", name="raise")
    k = await admin.create_key(team_id="raise", budget={"limit_usd": 0, "period": "daily"})
    e = await chat_error(gateway, k["key"], max_tokens=10)
    assert e.status_code == 429
    await admin.ok("PATCH", f"/admin/keys/{k['id']}", {"budget": {"limit_usd": 1, "period": "daily"}})
    await raw_chat(gateway, k["key"], max_tokens=10)


# ---- keys: revoked, expired, models --------------------------------------------------------------


async def test_revoked_key_is_refused_on_the_next_request(
    fake: FakeUpstream, admin: AdminClient, gateway: str, http: aiohttp.ClientSession
) -> None:
    await admin.create_team(id="rv", name="rv")
    k = await admin.create_key(team_id="rv", name="to revoke")
    await raw_chat(gateway, k["key"], max_tokens=5)  # the gateway has now seen (and cached) the key
    await admin.ok("POST", f"/admin/keys/{k['id']}/revoke")
    e = await chat_error(gateway, k["key"], max_tokens=5)
    assert isinstance(e, openai.AuthenticationError)
    assert e.status_code == 401
    assert error_of(e)["code"] == "revoked_api_key"
    auth = {"Authorization": f"Bearer {k['key']}"}
    for method, path, body in (
        ("POST", CHAT, {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True}),
        ("POST", "/v1/embeddings", {"model": "embed-test", "input": "x"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/budget", None),
    ):
        async with http.request(method, gateway + path, json=body, headers=auth) as resp:
            assert resp.status == 401, (path, resp.status)
            assert_error_shape(await resp.read())
    assert len(fake.requests) == 1


async def test_expired_key_is_refused(fake: FakeUpstream, admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="ex", name="ex")
    k = await admin.create_key(team_id="ex", expires_in_s=0.8)
    await raw_chat(gateway, k["key"], max_tokens=5)
    await asyncio.sleep(max(k["expires_at"] - time.time(), 0) + 0.05)
    e = await chat_error(gateway, k["key"], max_tokens=5)
    assert isinstance(e, openai.AuthenticationError)
    assert error_of(e)["code"] == "expired_api_key"
    async with sdk(gateway, k["key"]) as c:
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
    assert len(fake.requests) == 1


async def test_models_outside_key_allow_list_are_403(
    fake: FakeUpstream, admin: AdminClient, gateway: str
) -> None:
    await admin.create_team(id="am", name="am")
    k = await admin.create_key(team_id="am", name="only test", allowed_models=["gpt-test"])
    await raw_chat(gateway, k["key"], max_tokens=5)
    e = await chat_error(gateway, k["key"], model="gpt-azure", max_tokens=5)
    assert isinstance(e, openai.PermissionDeniedError)
    err = error_of(e)
    assert err["param"] == "model" and err["code"] == "model_not_allowed"
    assert "gpt-azure" in err["message"]
    assert len(fake.requests) == 1
    # an update applies to the next request
    await admin.ok("PATCH", f"/admin/keys/{k['id']}", {"allowed_models": ["gpt-azure"]})
    e = await chat_error(gateway, k["key"], model="gpt-test", max_tokens=5)
    assert e.status_code == 403
    async with sdk(gateway, k["key"]) as c:
        await c.chat.completions.create(model="gpt-azure", messages=USER_MESSAGES, max_tokens=5)
    assert len(fake.requests) == 2


async def test_models_outside_team_allow_list_are_403(
    fake: FakeUpstream, admin: AdminClient, gateway: str
) -> None:
    await admin.create_team(id="tm", name="Azure Only", allowed_models=["gpt-azure", "embed-test"])
    k = await admin.create_key(team_id="tm", name="wide key", allowed_models=["gpt-test", "gpt-azure"])
    e = await chat_error(gateway, k["key"], model="gpt-test", max_tokens=5)
    assert isinstance(e, openai.PermissionDeniedError)
    assert "Azure Only" in error_of(e)["message"]
    async with sdk(gateway, k["key"]) as c:
        await c.chat.completions.create(model="gpt-azure", messages=USER_MESSAGES, max_tokens=5)
        with pytest.raises(openai.PermissionDeniedError):  # allowed by the team, not by the key
            await c.embeddings.create(model="embed-test", input="hi")
    assert len(fake.requests) == 1


# ---- max_tokens -----------------------------------------------------------------------------------


async def test_max_tokens_cap_sent_upstream_and_reserved(
    fake: FakeUpstream, start_gateway: StartGateway, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_gateway(models={"gpt-test": {"max_output_tokens": 321}})
    a = AdminClient(http, url, keys.admin)
    await a.create_team(id="mt", name="mt")
    k = await a.create_key(team_id="mt", budget={"limit_usd": 1, "period": "daily"})

    b = await reserved_during_a_slow_chat(fake, a, url, k)
    assert b["reserved_usd"] == pytest.approx(usd_cost(EST_PROMPT, 321), abs=1e-12)
    assert fake.last.body["max_tokens"] == 321

    await raw_chat(url, k["key"], max_tokens=17)
    assert fake.last.body["max_tokens"] == 17
    await raw_chat(url, k["key"], max_completion_tokens=19)
    assert fake.last.body["max_completion_tokens"] == 19
    assert "max_tokens" not in fake.last.body  # never both
    async with sdk(url, k["key"]) as c:
        stream = await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
        _ = [ch async for ch in stream]
    assert fake.last.body["max_tokens"] == 321
    # the config keys get the cap too
    await raw_chat(url, keys.team_a)
    assert fake.last.body["max_tokens"] == 321
    # embeddings have no output to cap
    async with sdk(url, k["key"]) as c:
        await c.embeddings.create(model="embed-test", input="x")
    assert fake.last.endpoint == "embeddings"
    assert "max_tokens" not in fake.last.body


async def test_default_cap_is_4096(fake: FakeUpstream, gateway: str, keys: TestKeys) -> None:
    await raw_chat(gateway, keys.team_a)
    assert fake.last.body["max_tokens"] == 4096


# ---- settle: the reservation always comes back, spend is what was used -----------------------------


async def budget_key(admin: AdminClient, team: str) -> dict[str, Any]:
    await admin.create_team(id=team, name=team)
    return await admin.create_key(team_id=team, name=team, budget={"limit_usd": 5, "period": "monthly"})


async def ledger_cost(admin: AdminClient, key_id: str) -> float:
    rows = (await admin.spend(group_by="key"))["rows"]
    return float(sum(r["cost_usd"] for r in rows if r["key_id"] == key_id))


async def test_settle_after_success(admin: AdminClient, gateway: str) -> None:
    k = await budget_key(admin, "s-ok")
    _, r = await raw_chat(gateway, k["key"])  # no max_tokens: 4096 reserved
    b, n = await admin.settled(k["id"], 1)
    assert n == 1 and b["reserved_usd"] == 0
    assert b["spent_usd"] == pytest.approx(
        usd_cost(r.usage.prompt_tokens, r.usage.completion_tokens), abs=1e-12
    )
    assert await ledger_cost(admin, k["id"]) == pytest.approx(b["spent_usd"], abs=1e-12)
    assert (await admin.budget("team", "s-ok"))["reserved_usd"] == 0


async def test_settle_after_upstream_error_charges_nothing(
    fake: FakeUpstream, admin: AdminClient, gateway: str
) -> None:
    k = await budget_key(admin, "s-500")
    fake.enqueue(Behaviour(status=500))
    e = await chat_error(gateway, k["key"])
    assert e.status_code >= 500
    b, n = await admin.settled(k["id"], 1)
    assert n == 1  # the failed request is on the ledger
    assert b["reserved_usd"] == 0
    assert b["spent_usd"] == 0  # the upstream answered 500 with no usage: nothing was used
    assert await ledger_cost(admin, k["id"]) == 0


async def test_settle_when_upstream_never_answers_charges_nothing(
    fake: FakeUpstream, admin: AdminClient, gateway: str
) -> None:
    k = await budget_key(admin, "s-drop")
    fake.enqueue(Behaviour(cut_after=0))  # the connection drops before any answer
    e = await chat_error(gateway, k["key"])
    assert e.status_code >= 500
    b, n = await admin.settled(k["id"], 1)
    assert n == 1 and b["reserved_usd"] == 0
    assert b["spent_usd"] == 0
    assert await ledger_cost(admin, k["id"]) == 0


async def test_settle_after_client_disconnects_mid_stream(
    fake: FakeUpstream, admin: AdminClient, gateway: str, http: aiohttp.ClientSession
) -> None:
    k = await budget_key(admin, "s-gone")
    fake.enqueue(Behaviour(stream_chunks=40, chunk_delay_s=0.03))
    body = {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True}
    resp = await http.post(gateway + CHAT, json=body, headers={"Authorization": f"Bearer {k['key']}"})
    assert resp.status == 200
    for _ in range(4):
        assert (await resp.content.readline()).startswith(b"data: ")
        await resp.content.readline()
    held = await admin.budget("key", k["id"])
    assert held["reserved_usd"] > 0  # the lease is held while the stream runs
    resp.close()
    await fake.last.wait_finished(3.0)
    assert fake.last.client_gone
    b, n = await admin.settled(k["id"], 1)
    assert n == 1 and b["reserved_usd"] == 0
    full = usd_cost(*fake_usage(USER_MESSAGES, reply_for(0, Behaviour(stream_chunks=40))))
    assert 0 < b["spent_usd"] < full  # something was produced, not all of it
    assert await ledger_cost(admin, k["id"]) == pytest.approx(b["spent_usd"], abs=1e-12)


async def test_settle_after_stream_cut(fake: FakeUpstream, admin: AdminClient, gateway: str) -> None:
    k = await budget_key(admin, "s-cut")
    fake.enqueue(Behaviour(stream_chunks=30, cut_after=6))
    async with sdk(gateway, k["key"]) as c:
        stream = await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
        got = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                got += 1
    assert 0 < got <= 6
    b, n = await admin.settled(k["id"], 1)
    assert n == 1 and b["reserved_usd"] == 0
    full = usd_cost(*fake_usage(USER_MESSAGES, reply_for(0, Behaviour(stream_chunks=30))))
    assert 0 < b["spent_usd"] < full
    assert await ledger_cost(admin, k["id"]) == pytest.approx(b["spent_usd"], abs=1e-12)


@pytest.mark.parametrize("client_wants_usage", [False, True])
async def test_stream_charged_from_usage_chunk(
    fake: FakeUpstream,
    admin: AdminClient,
    gateway: str,
    http: aiohttp.ClientSession,
    client_wants_usage: bool,
) -> None:
    k = await budget_key(admin, f"s-usage-{client_wants_usage}")
    body: dict[str, Any] = {"model": "gpt-test", "messages": USER_MESSAGES, "stream": True, "max_tokens": 100}
    if client_wants_usage:
        body["stream_options"] = {"include_usage": True}
    async with http.post(gateway + CHAT, json=body, headers={"Authorization": f"Bearer {k['key']}"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    assert fake.last.body["stream_options"]["include_usage"] is True  # asked upstream either way
    chunks = [orjson.loads(d) for d in sse_data_lines(raw) if d != b"[DONE]"]
    with_usage = [c for c in chunks if c.get("usage")]
    if client_wants_usage:
        assert len(with_usage) == 1
    else:
        assert with_usage == [] and all("usage" not in c or c["usage"] is None for c in chunks)
    prompt, completion = fake_usage(USER_MESSAGES)
    b, n = await admin.settled(k["id"], 1)
    assert n == 1 and b["reserved_usd"] == 0
    assert b["spent_usd"] == pytest.approx(usd_cost(prompt, completion), abs=1e-12)
    rows = (await admin.spend(group_by="key"))["rows"]
    row = next(r for r in rows if r["key_id"] == k["id"])
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)


async def test_ledger_has_one_record_per_request(
    fake: FakeUpstream, admin: AdminClient, gateway: str
) -> None:
    k = await budget_key(admin, "ledger")
    expected_cost = 0.0
    for _ in range(3):
        _, r = await raw_chat(gateway, k["key"], max_tokens=10)
        expected_cost += usd_cost(r.usage.prompt_tokens, r.usage.completion_tokens)
    async with sdk(gateway, k["key"]) as c:
        stream = await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES, stream=True)
        _ = [ch async for ch in stream]
        await c.embeddings.create(model="embed-test", input="two words")
    expected_cost += usd_cost(*fake_usage(USER_MESSAGES)) + usd_cost(2, 0)
    fake.enqueue(Behaviour(status=500))
    await chat_error(gateway, k["key"])
    await admin.settled(k["id"], 6)
    await asyncio.sleep(0.6)  # one more ledger flush: nothing else may turn up
    b, n = await admin.settled(k["id"], 6)
    assert n == 6
    rows = (await admin.spend(group_by="key,model"))["rows"]
    mine = {r["model"]: r["requests"] for r in rows if r["key_id"] == k["id"]}
    assert mine == {"gpt-test": 5, "embed-test": 1}
    assert b["spent_usd"] == pytest.approx(expected_cost, abs=1e-12)  # the failed request costs nothing
    assert await ledger_cost(admin, k["id"]) == pytest.approx(expected_cost, abs=1e-12)


async def test_reservation_covers_the_dearest_fallback(
    fake: FakeUpstream, start_gateway: StartGateway, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    """A fallback is billed at its own price, so a model with fallbacks reserves the worst case
    over every model it may end up on (here one 10x dearer, reached through a fallback of a
    fallback)."""
    url = await start_gateway(
        models={
            "gpt-test": {"max_output_tokens": 100, "fallbacks": [{"model": "gpt-mid"}]},
            "gpt-mid": {
                "price": {"input_per_mtok": 2.0, "output_per_mtok": 4.0},
                "deployments": [{"provider": "up", "model": "upstream-chat-1"}],
                "fallbacks": [{"model": "gpt-dear"}],
            },
            "gpt-dear": {
                "price": {"input_per_mtok": 10.0, "output_per_mtok": 20.0},
                "deployments": [{"provider": "up", "model": "upstream-chat-1"}],
            },
        }
    )
    a = AdminClient(http, url, keys.admin)
    await a.create_team(id="fb", name="fb")
    k = await a.create_key(team_id="fb", budget={"limit_usd": 1, "period": "daily"})
    b = await reserved_during_a_slow_chat(fake, a, url, k)
    assert b["reserved_usd"] == pytest.approx(10 * usd_cost(EST_PROMPT, 100), abs=1e-12)
    # billed at the price of the model that answered (gpt-test itself here)
    for _ in range(100):
        b = await a.budget("key", k["id"])
        if not b["reserved_usd"]:
            break
        await asyncio.sleep(0.05)
    assert b["reserved_usd"] == 0
    assert 0 < b["spent_usd"] < usd_cost(EST_PROMPT, 100)


async def test_gateway_cap_goes_in_the_field_the_provider_takes(
    fake: FakeUpstream, start_gateway: StartGateway, keys: TestKeys
) -> None:
    """The gateway's own output cap (the client sent none) is sent as `max_completion_tokens` to
    OpenAI and Azure (their reasoning models reject `max_tokens`) and as `max_tokens` to other
    OpenAI-compatible servers, per deployment (a fallback switches it); `output_cap_field`
    overrides the default; a cap the client sent is passed as the client wrote it."""
    url = await start_gateway(
        models={
            "gpt-openai": {"max_output_tokens": 77, "price": {"free": True}},
            "gpt-test": {"max_output_tokens": 55, "fallbacks": [{"model": "gpt-openai"}]},
            "gpt-azure": {"max_output_tokens": 66},
            "gpt-up2": {
                "max_output_tokens": 44, "price": {"free": True},
                "deployments": [{"provider": "up2", "model": "upstream-chat-1"}],
            },
        },
        providers={"up2": {
            "kind": "openai_compatible", "api_base": fake.base_url,
            "api_key": "${TOLLWAY_TEST_UPSTREAM_KEY}", "output_cap_field": "max_completion_tokens",
        }},
        routing={"retry": {"max_attempts": 2}},
    )

    async def sent(model: str, **kw: Any) -> dict[str, Any]:
        async with sdk(url, keys.team_a) as c:
            await c.chat.completions.create(model=model, messages=USER_MESSAGES, **kw)
        body: dict[str, Any] = fake.last.body
        return {k: body[k] for k in ("max_tokens", "max_completion_tokens") if k in body}

    assert await sent("gpt-openai") == {"max_completion_tokens": 77}
    assert await sent("gpt-azure") == {"max_completion_tokens": 66}
    assert await sent("gpt-test") == {"max_tokens": 55}
    assert await sent("gpt-up2") == {"max_completion_tokens": 44}
    assert await sent("gpt-openai", max_tokens=12) == {"max_tokens": 12}  # the client's own
    assert await sent("gpt-test", max_completion_tokens=13) == {"max_completion_tokens": 13}
    # gpt-test's deployment fails; its fallback (an openai deployment) gets the cap in its field
    fake.enqueue(Behaviour(status=503))  # the first attempt; the fallback's gets the default
    assert await sent("gpt-test") == {"max_completion_tokens": 55}
    assert fake.last.body["model"] == "gpt-4o-mini-2024-07-18"
