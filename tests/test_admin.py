"""Issue 3: the admin API (keys, teams, budgets, spend, OpenAPI), GET /v1/budget and the CLI."""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from helpers import USER_MESSAGES, AdminClient, StartGateway, assert_error_shape, fake_usage, usd_cost

from gateway.testing.fake_upstream import Behaviour, FakeUpstream
from gateway.testing.harness import TestKeys

CHAT = "/v1/chat/completions"


@pytest.fixture
async def admin(gateway: str, http: aiohttp.ClientSession, keys: TestKeys) -> AdminClient:
    return AdminClient(http, gateway, keys.admin)


def sdk(base_url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=15.0)


async def chat_ok(base_url: str, key: str, model: str = "gpt-test", **kw: Any) -> tuple[int, int]:
    """One successful chat request; (prompt_tokens, completion_tokens) of its usage."""
    async with sdk(base_url, key) as c:
        r = await c.chat.completions.create(model=model, messages=USER_MESSAGES, **kw)
    assert r.usage is not None
    return r.usage.prompt_tokens, r.usage.completion_tokens


async def assert_rejected_401(base_url: str, key: str) -> None:
    async with sdk(base_url, key) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            await c.chat.completions.create(model="gpt-test", messages=USER_MESSAGES)
    assert ei.value.status_code == 401


def read_store_files(directory: Path, name: str) -> bytes:
    """The bytes of the SQLite database and its WAL/SHM files."""
    files = [p for p in directory.iterdir() if p.name.startswith(name)]
    assert files, list(directory.iterdir())
    return b"".join(p.read_bytes() for p in files)


def utc_day_start(ts: float) -> float:
    d = datetime.fromtimestamp(ts, UTC)
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()


# ---- who may use the admin API ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/keys", None),
        ("POST", "/admin/keys", {"team_id": "team-a"}),
        ("GET", "/admin/teams", None),
        ("POST", "/admin/teams", {"name": "x"}),
        ("GET", "/admin/teams/team-a/budget", None),
        ("GET", "/admin/spend", None),
    ],
)
async def test_admin_needs_the_admin_key(
    admin: AdminClient, keys: TestKeys, method: str, path: str, body: Any
) -> None:
    cases: dict[str, dict[str, str]] = {
        "missing": {},
        "wrong": {"Authorization": "Bearer sk-test-admin-wrong"},
        "client key": {"Authorization": f"Bearer {keys.team_a}"},
        "client key as api-key": {"api-key": keys.team_a},
        "not bearer": {"Authorization": f"Basic {keys.admin}"},
    }
    for label, headers in cases.items():
        status, _, text = await admin.call(method, path, body, headers=headers)
        assert status == 401, (label, status, text)
        assert_error_shape(text)
    # nothing was created by the refused calls
    assert len((await admin.ok("GET", "/admin/keys"))["data"]) == 2  # the two config keys
    assert {t["id"] for t in (await admin.ok("GET", "/admin/teams"))["data"]} == {"team-a", "team-b"}
    # and the right key is accepted
    status, data, _ = await admin.call(method, path, body)
    assert status in (200, 201), (status, data)


async def test_admin_disabled_without_configured_key(
    start_gateway: StartGateway, http: aiohttp.ClientSession, keys: TestKeys
) -> None:
    url = await start_gateway(admin=None)
    a = AdminClient(http, url, keys.admin)
    for method, path in (("GET", "/admin/keys"), ("GET", "/admin/teams"), ("GET", "/admin/spend")):
        status, _, text = await a.call(method, path)
        assert status == 403, (path, status, text)
        assert_error_shape(text)
    status, _, _ = await a.call("POST", "/admin/teams", {"name": "nope"}, headers={})
    assert status == 403
    # the gateway itself still serves clients
    await chat_ok(url, keys.team_a)


# ---- keys ---------------------------------------------------------------------------------------


async def test_key_create_list_get_update_revoke(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="eng", name="Engineering")
    before = time.time()
    created = await admin.create_key(
        team_id="eng",
        name="ci bot",
        rpm=50,
        tpm=5000,
        allowed_models=["gpt-test", "gpt-azure"],
        budget={"limit_usd": 3.5, "period": "weekly"},
        metadata={"owner": "ana", "n": 1},
    )
    secret = created["key"]
    assert isinstance(secret, str) and secret.startswith("sk-tw-")
    assert len(secret) >= 6 + 32, secret  # enough randomness to be unguessable
    assert created["prefix"] == secret[:10]
    assert created["id"].startswith("key_")
    assert created["team_id"] == "eng"
    assert created["name"] == "ci bot"
    assert created["rpm"] == 50 and created["tpm"] == 5000
    assert created["allowed_models"] == ["gpt-test", "gpt-azure"]
    assert created["budget"] == {"limit_usd": 3.5, "period": "weekly"}
    assert created["metadata"] == {"owner": "ana", "n": 1}
    assert created["status"] == "active" and created["revoked_at"] is None
    assert created["expires_at"] is None
    assert before - 1 <= created["created_at"] <= time.time() + 1
    kid = created["id"]

    # a second key: two creations never share a secret
    other = await admin.create_key(team_id="eng")
    assert other["key"] != secret and other["id"] != kid

    status, listing, text = await admin.call("GET", "/admin/keys")
    assert status == 200
    assert secret not in text and other["key"] not in text
    assert listing["object"] == "list"
    ids = [k["id"] for k in listing["data"]]
    assert kid in ids and other["id"] in ids
    assert all("key" not in k and "key_hash" not in k for k in listing["data"])
    assert hashlib.sha256(secret.encode()).hexdigest() not in text
    mine = next(k for k in listing["data"] if k["id"] == kid)
    assert {k: v for k, v in created.items() if k != "key"} == mine

    status, listing, _ = await admin.call("GET", "/admin/keys?team_id=team-b")
    assert status == 200
    assert kid not in [k["id"] for k in listing["data"]]
    assert all(k["team_id"] == "team-b" for k in listing["data"])

    status, got, text = await admin.call("GET", f"/admin/keys/{kid}")
    assert status == 200
    assert secret not in text and "key" not in got
    assert got == mine

    # the key works as a client key
    await chat_ok(gateway, secret)

    updated = await admin.ok(
        "PATCH", f"/admin/keys/{kid}", {"name": "renamed", "rpm": 7, "metadata": {"x": 2}}
    )
    assert updated["name"] == "renamed" and updated["rpm"] == 7 and updated["metadata"] == {"x": 2}
    assert updated["tpm"] == 5000 and updated["budget"] == {"limit_usd": 3.5, "period": "weekly"}
    assert "key" not in updated
    got = await admin.ok("GET", f"/admin/keys/{kid}")
    assert got["name"] == "renamed" and got["rpm"] == 7
    cleared = await admin.ok("PATCH", f"/admin/keys/{kid}", {"budget": None, "allowed_models": None})
    assert cleared["budget"] is None and cleared["allowed_models"] is None

    revoked = await admin.ok("POST", f"/admin/keys/{kid}/revoke")
    assert revoked["status"] == "revoked"
    assert revoked["revoked_at"] is not None and revoked["revoked_at"] >= before
    assert (await admin.ok("GET", f"/admin/keys/{kid}"))["status"] == "revoked"
    await assert_rejected_401(gateway, secret)
    # revoking again changes nothing
    again = await admin.ok("DELETE", f"/admin/keys/{kid}")
    assert again["revoked_at"] == revoked["revoked_at"]

    # DELETE revokes too
    deleted = await admin.ok("DELETE", f"/admin/keys/{other['id']}")
    assert deleted["status"] == "revoked"
    await assert_rejected_401(gateway, other["key"])
    # revoked keys stay listed (with their status)
    listing = await admin.ok("GET", "/admin/keys?team_id=eng")
    assert {k["id"]: k["status"] for k in listing["data"]} == {kid: "revoked", other["id"]: "revoked"}


async def test_unknown_key_ids_are_404(admin: AdminClient) -> None:
    for method, path in (
        ("GET", "/admin/keys/key_nope"),
        ("PATCH", "/admin/keys/key_nope"),
        ("DELETE", "/admin/keys/key_nope"),
        ("POST", "/admin/keys/key_nope/revoke"),
        ("POST", "/admin/keys/key_nope/rotate"),
        ("GET", "/admin/keys/key_nope/budget"),
        ("GET", "/admin/teams/nope"),
        ("PATCH", "/admin/teams/nope"),
        ("GET", "/admin/teams/nope/budget"),
    ):
        status, _, text = await admin.call(method, path, {} if method == "PATCH" else None)
        assert status == 404, (method, path, status, text)
        assert_error_shape(text)


async def test_secret_is_stored_only_as_a_hash(
    start_gateway: StartGateway, http: aiohttp.ClientSession, keys: TestKeys, tmp_path: Path
) -> None:
    db = tmp_path / "store.db"
    url = await start_gateway(store={"path": str(db)})
    a = AdminClient(http, url, keys.admin)
    await a.create_team(id="t1", name="t1")
    created = await a.create_key(team_id="t1", name="hashed")
    secret: str = created["key"]
    rotated = await a.ok("POST", f"/admin/keys/{created['id']}/rotate")
    new_secret: str = rotated["key"]
    await chat_ok(url, new_secret)
    blob = read_store_files(tmp_path, "store.db")
    assert hashlib.sha256(new_secret.encode()).hexdigest().encode() in blob  # the store is really here
    for s in (secret, new_secret):
        assert s.encode() not in blob
        assert s[10:].encode() not in blob  # not even the part after the displayed prefix
    # the config keys are not stored in clear either
    assert keys.team_a.encode() not in blob


async def test_rotate_key(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="rot", name="rot")
    created = await admin.create_key(
        team_id="rot", name="rotating", rpm=100, budget={"limit_usd": 1.0, "period": "daily"}
    )
    kid, old = created["id"], created["key"]
    p, c = await chat_ok(gateway, old, max_tokens=16)
    b, n = await admin.settled(kid, 1)
    assert n == 1 and b["spent_usd"] == pytest.approx(usd_cost(p, c), abs=1e-12)
    spent_before = b["spent_usd"]

    rotated = await admin.ok("POST", f"/admin/keys/{kid}/rotate")
    new = rotated["key"]
    assert new.startswith("sk-tw-") and new != old
    assert rotated["id"] == kid
    assert rotated["prefix"] == new[:10]
    assert rotated["budget"] == {"limit_usd": 1.0, "period": "daily"}
    assert rotated["rpm"] == 100 and rotated["name"] == "rotating" and rotated["team_id"] == "rot"
    assert rotated["status"] == "active"
    got = await admin.ok("GET", f"/admin/keys/{kid}")
    assert "key" not in got and got["prefix"] == new[:10]

    await assert_rejected_401(gateway, old)  # at once
    async with sdk(gateway, old) as c:
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
    p2, c2 = await chat_ok(gateway, new, max_tokens=16)
    b, n = await admin.settled(kid, 2)
    # same key: the spend carried over and both requests are on its ledger
    assert n == 2
    assert b["spent_usd"] == pytest.approx(spent_before + usd_cost(p2, c2), abs=1e-12)
    await assert_rejected_401(gateway, old)

    await admin.ok("POST", f"/admin/keys/{kid}/revoke")
    status, _, text = await admin.call("POST", f"/admin/keys/{kid}/rotate")
    assert status == 400, text  # a revoked key stays revoked
    await assert_rejected_401(gateway, new)


async def test_expiry_fields(admin: AdminClient) -> None:
    await admin.create_team(id="exp", name="exp")
    t0 = time.time()
    k = await admin.create_key(team_id="exp", expires_in_s=3600)
    assert t0 + 3600 - 5 <= k["expires_at"] <= time.time() + 3600 + 5
    assert k["status"] == "active"
    past = await admin.create_key(team_id="exp", expires_at=t0 - 10)
    assert past["status"] == "expired"
    assert (await admin.ok("GET", f"/admin/keys/{past['id']}"))["status"] == "expired"


# ---- teams --------------------------------------------------------------------------------------


async def test_team_create_list_get_update(admin: AdminClient) -> None:
    t = await admin.create_team(
        id="data-science",
        name="Data Science",
        budget={"limit_usd": 100, "period": "monthly"},
        rpm=600,
        tpm=100000,
        allowed_models=["gpt-test"],
        metadata={"cost_center": "42"},
    )
    assert t["id"] == "data-science" and t["name"] == "Data Science"
    assert t["budget"] == {"limit_usd": 100.0, "period": "monthly"}
    assert t["rpm"] == 600 and t["tpm"] == 100000
    assert t["allowed_models"] == ["gpt-test"]
    assert t["metadata"] == {"cost_center": "42"}

    status, _, text = await admin.call("POST", "/admin/teams", {"id": "data-science", "name": "again"})
    assert status == 409, text
    assert_error_shape(text)
    assert (await admin.ok("GET", "/admin/teams/data-science"))["name"] == "Data Science"  # unchanged

    auto = await admin.create_team(name="No id given")
    assert auto["id"] and auto["id"] != "data-science"

    listing = await admin.ok("GET", "/admin/teams")
    assert listing["object"] == "list"
    by_id = {x["id"]: x for x in listing["data"]}
    assert by_id["data-science"] == t
    assert by_id[auto["id"]] == auto
    # the teams of the config keys are there too
    assert {"team-a", "team-b"} <= set(by_id)

    assert await admin.ok("GET", "/admin/teams/data-science") == t

    upd = await admin.ok(
        "PATCH",
        "/admin/teams/data-science",
        {"name": "DS", "rpm": 5, "budget": {"limit_usd": 7, "period": "daily"}},
    )
    assert upd["name"] == "DS" and upd["rpm"] == 5
    assert upd["budget"] == {"limit_usd": 7.0, "period": "daily"}
    assert upd["tpm"] == 100000 and upd["allowed_models"] == ["gpt-test"]  # untouched
    got = await admin.ok("GET", "/admin/teams/data-science")
    assert got == upd
    upd = await admin.ok("PATCH", "/admin/teams/data-science", {"allowed_models": None, "budget": None})
    assert upd["allowed_models"] is None and upd["budget"] is None


async def test_key_for_unknown_team_is_404(admin: AdminClient) -> None:
    status, _, text = await admin.call("POST", "/admin/keys", {"team_id": "ghosts", "name": "k"})
    assert status == 404, text
    err = assert_error_shape(text)
    assert "ghosts" in err["message"]
    listing = await admin.ok("GET", "/admin/keys")
    assert all(k["team_id"] != "ghosts" for k in listing["data"])


async def test_allowed_models_must_exist(admin: AdminClient) -> None:
    await admin.create_team(id="m", name="m")
    k = await admin.create_key(team_id="m")
    for method, path, body in (
        ("POST", "/admin/keys", {"team_id": "m", "allowed_models": ["gpt-test", "gpt-99"]}),
        ("PATCH", f"/admin/keys/{k['id']}", {"allowed_models": ["gpt-99"]}),
        ("POST", "/admin/teams", {"name": "x", "allowed_models": ["gpt-99"]}),
        ("PATCH", "/admin/teams/m", {"allowed_models": ["nope", "gpt-test"]}),
    ):
        status, _, text = await admin.call(method, path, body)
        assert status == 400, (method, path, status, text)
        err = assert_error_shape(text)
        assert err["param"] == "allowed_models", err
        assert "gpt-99" in err["message"] or "nope" in err["message"], err
    assert (await admin.ok("GET", f"/admin/keys/{k['id']}"))["allowed_models"] is None


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/admin/keys", {"team_id": "team-a", "colour": "red"}, "colour"),
        ("/admin/keys", {"team_id": "team-a", "rpm": "fast"}, "rpm"),
        ("/admin/keys", {"team_id": "team-a", "rpm": 0}, "rpm"),
        ("/admin/keys", {"team_id": 7}, "team_id"),
        ("/admin/keys", {"name": "no team"}, "team_id"),
        ("/admin/keys", {"team_id": "team-a", "budget": {"limit_usd": -1}}, "budget.limit_usd"),
        (
            "/admin/keys",
            {"team_id": "team-a", "budget": {"limit_usd": 1, "period": "yearly"}},
            "budget.period",
        ),
        ("/admin/keys", {"team_id": "team-a", "budget": {"limit_usd": 1, "extra": 1}}, "budget.extra"),
        ("/admin/keys", {"team_id": "team-a", "allowed_models": "gpt-test"}, "allowed_models"),
        ("/admin/keys", {"team_id": "team-a", "expires_in_s": -5}, "expires_in_s"),
        ("/admin/teams", {"name": "t", "tpm": "many"}, "tpm"),
        ("/admin/teams", {"name": "t", "owner": "me"}, "owner"),
        ("/admin/teams", {}, "name"),
        ("/admin/teams", {"name": "t", "id": "has spaces"}, "id"),
    ],
)
async def test_bad_bodies_are_400_with_param(
    admin: AdminClient, path: str, body: dict[str, Any], param: str
) -> None:
    status, _, text = await admin.call("POST", path, body)
    assert status == 400, text
    err = assert_error_shape(text)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


async def test_bad_patch_bodies_and_invalid_json(admin: AdminClient, http: aiohttp.ClientSession) -> None:
    k = await admin.create_key(team_id="team-a")
    status, _, text = await admin.call("PATCH", f"/admin/keys/{k['id']}", {"team_id": "team-b"})
    assert status == 400, text  # moving a key between teams is not an update field
    assert assert_error_shape(text)["param"] == "team_id"
    status, _, text = await admin.call("PATCH", "/admin/teams/team-a", {"rpm": -3})
    assert status == 400
    assert assert_error_shape(text)["param"] == "rpm"
    async with http.post(
        admin.base + "/admin/teams",
        data=b"{not json",
        headers={**admin.headers, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert_error_shape(await resp.read())
    assert (await admin.ok("GET", f"/admin/keys/{k['id']}"))["team_id"] == "team-a"


# ---- budgets ------------------------------------------------------------------------------------


async def test_key_and_team_budget_values(fake: FakeUpstream, admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="bud", name="bud", budget={"limit_usd": 0.5, "period": "daily"})
    k = await admin.create_key(team_id="bud", name="b", budget={"limit_usd": 2.0, "period": "monthly"})
    kid = k["id"]
    b0 = await admin.budget("key", kid)
    assert b0["limit_usd"] == 2.0 and b0["spent_usd"] == 0 and b0["reserved_usd"] == 0
    assert b0["remaining_usd"] == 2.0

    costs = 0.0
    for mt in (20, 30):
        p, c = await chat_ok(gateway, k["key"], max_tokens=mt)
        assert (p, c) == fake_usage(USER_MESSAGES)
        costs += usd_cost(p, c)
    b, n = await admin.settled(kid, 2)
    now = time.time()
    assert n == 2
    assert b["period"] == "monthly"
    assert b["limit_usd"] == 2.0
    assert b["spent_usd"] == pytest.approx(costs, abs=1e-12)
    assert b["reserved_usd"] == 0
    assert b["remaining_usd"] == pytest.approx(2.0 - costs, abs=1e-12)
    d = datetime.now(UTC)
    month_start = datetime(d.year, d.month, 1, tzinfo=UTC)
    month_end = month_start + timedelta(days=calendar.monthrange(d.year, d.month)[1])
    assert b["period_start"] == month_start.timestamp()
    assert b["period_end"] == month_end.timestamp()
    assert b["resets_at"] == month_end.timestamp()
    elapsed = max(now - month_start.timestamp(), 60.0)
    expected_forecast = costs * (month_end - month_start).total_seconds() / elapsed
    assert b["forecast_usd"] == pytest.approx(expected_forecast, rel=0.02)
    assert b["forecast_usd"] >= b["spent_usd"]

    t = await admin.budget("team", "bud")
    day0 = utc_day_start(now)
    assert t["period"] == "daily" and t["limit_usd"] == 0.5
    assert t["spent_usd"] == pytest.approx(costs, abs=1e-12)
    assert t["reserved_usd"] == 0
    assert t["remaining_usd"] == pytest.approx(0.5 - costs, abs=1e-12)
    assert t["period_start"] == day0 and t["period_end"] == day0 + 86400 and t["resets_at"] == day0 + 86400
    assert t["forecast_usd"] == pytest.approx(costs * 86400 / max(now - day0, 60.0), rel=0.02)

    # while a request is in flight its worst case is reserved, and remaining accounts for it
    fake.enqueue(Behaviour(delay_s=0.6))
    task = asyncio.create_task(chat_ok(gateway, k["key"], max_tokens=1000))
    try:
        deadline = time.monotonic() + 2
        while True:
            b = await admin.budget("key", kid)
            if b["reserved_usd"] > 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        assert b["reserved_usd"] >= 1000 * 2e-6, b  # at least the worst-case output
        assert b["reserved_usd"] < 1000 * 2e-6 + 1e-4, b  # and not wildly more
        assert b["remaining_usd"] == pytest.approx(2.0 - b["spent_usd"] - b["reserved_usd"], abs=1e-12)
        tb = await admin.budget("team", "bud")
        assert tb["reserved_usd"] == pytest.approx(b["reserved_usd"], abs=1e-12)
    finally:
        p, c = await task
    b, _ = await admin.settled(kid, 3)
    assert b["reserved_usd"] == 0
    assert b["spent_usd"] == pytest.approx(costs + usd_cost(p, c), abs=1e-12)
    assert (await admin.budget("team", "bud"))["reserved_usd"] == 0


async def test_total_and_missing_budgets(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="tot", name="tot")
    k = await admin.create_key(team_id="tot", budget={"limit_usd": 1.0, "period": "total"})
    p, c = await chat_ok(gateway, k["key"], max_tokens=10)
    b, _ = await admin.settled(k["id"], 1)
    assert b["period"] == "total"
    assert b["spent_usd"] == pytest.approx(usd_cost(p, c), abs=1e-12)
    assert b["period_end"] is None and b["resets_at"] is None  # a total budget never resets
    assert b["remaining_usd"] == pytest.approx(1.0 - usd_cost(p, c), abs=1e-12)
    t = await admin.budget("team", "tot")  # the team has no budget
    assert t["limit_usd"] is None and t["remaining_usd"] is None and t["period"] is None
    assert t["reserved_usd"] == 0


async def test_own_budget_is_only_its_own(
    admin: AdminClient, gateway: str, http: aiohttp.ClientSession
) -> None:
    await admin.create_team(id="alpha", name="Alpha", budget={"limit_usd": 3, "period": "daily"})
    await admin.create_team(id="beta", name="Beta", budget={"limit_usd": 4, "period": "weekly"})
    ka = await admin.create_key(team_id="alpha", name="ka", budget={"limit_usd": 1, "period": "monthly"})
    kb = await admin.create_key(team_id="beta", name="kb", budget={"limit_usd": 2, "period": "daily"})
    p, c = await chat_ok(gateway, ka["key"], max_tokens=10)
    await admin.settled(ka["id"], 1)

    async def own(key: str | None) -> tuple[int, Any, str]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with http.get(gateway + "/v1/budget", headers=headers) as resp:
            text = await resp.text()
            return resp.status, (orjson.loads(text) if text else None), text

    status, data, text = await own(ka["key"])
    assert status == 200, text
    assert data["key"]["id"] == ka["id"] and data["key"]["name"] == "ka"
    assert data["key"]["limit_usd"] == 1.0 and data["key"]["period"] == "monthly"
    assert data["key"]["spent_usd"] == pytest.approx(usd_cost(p, c), abs=1e-12)
    assert data["key"]["reserved_usd"] == 0
    assert data["team"]["id"] == "alpha" and data["team"]["limit_usd"] == 3.0
    assert data["team"]["spent_usd"] == pytest.approx(usd_cost(p, c), abs=1e-12)
    assert kb["id"] not in text and "beta" not in text and ka["key"] not in text

    status, data, text = await own(kb["key"])
    assert status == 200, text
    assert data["key"]["id"] == kb["id"] and data["key"]["spent_usd"] == 0
    assert data["team"]["id"] == "beta" and data["team"]["limit_usd"] == 4.0
    assert ka["id"] not in text and "alpha" not in text

    for key in (None, "sk-tw-not-a-key", admin.headers["Authorization"].split()[1]):
        status, _, text = await own(key)
        assert status == 401, (key, status, text)
        assert_error_shape(text)
    await admin.ok("POST", f"/admin/keys/{kb['id']}/revoke")
    status, _, _ = await own(kb["key"])
    assert status == 401


# ---- spend --------------------------------------------------------------------------------------


async def test_spend_grouped_over_a_date_range(admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="sp1", name="sp1")
    await admin.create_team(id="sp2", name="sp2")
    k1 = await admin.create_key(team_id="sp1", name="k1")
    k2 = await admin.create_key(team_id="sp1", name="k2")
    k3 = await admin.create_key(team_id="sp2", name="k3")
    calls = [(k1, "gpt-test"), (k1, "gpt-test"), (k1, "gpt-azure"), (k2, "gpt-test"), (k3, "gpt-azure")]
    usage: list[tuple[str, str, str, int, int]] = []
    for k, model in calls:
        p, c = await chat_ok(gateway, k["key"], model=model, max_tokens=10)
        usage.append((k["team_id"], k["id"], model, p, c))
    for k, n in ((k1, 3), (k2, 1), (k3, 1)):
        _, count = await admin.settled(k["id"], n)
        assert count == n

    def expect(field: int) -> dict[str, tuple[int, int, int, float]]:
        acc: dict[str, tuple[int, int, int, float]] = {}
        for row in usage:
            name = str(row[field])
            r, pt, ct, cost = acc.get(name, (0, 0, 0, 0.0))
            acc[name] = (r + 1, pt + row[3], ct + row[4], cost + usd_cost(row[3], row[4]))
        return acc

    def rows_by(data: dict[str, Any], field: str) -> dict[str, tuple[int, int, int, float]]:
        return {
            r[field]: (r["requests"], r["prompt_tokens"], r["completion_tokens"], r["cost_usd"])
            for r in data["rows"]
        }

    def approx(d: dict[str, tuple[int, int, int, float]]) -> dict[str, Any]:
        return {k: (*v[:3], pytest.approx(v[3], abs=1e-12)) for k, v in d.items()}

    today = datetime.now(UTC).date()
    by_team = await admin.spend(group_by="team")
    assert by_team["group_by"] == ["team"]
    assert rows_by(by_team, "team_id") == approx(expect(0))
    assert all(r["key_id"] is None and r["model"] is None and r["day"] is None for r in by_team["rows"])
    total = sum(usd_cost(u[3], u[4]) for u in usage)
    assert by_team["total_usd"] == pytest.approx(total, abs=1e-12)

    assert rows_by(await admin.spend(group_by="key"), "key_id") == approx(expect(1))
    assert rows_by(await admin.spend(group_by="model"), "model") == approx(expect(2))
    by_day = await admin.spend(group_by="day", start=today.isoformat(), end=today.isoformat())
    assert by_day["start"] == today.isoformat() and by_day["end"] == today.isoformat()
    assert [(r["day"], r["requests"]) for r in by_day["rows"]] == [(today.isoformat(), 5)]

    fine = await admin.spend(group_by="team,key,model")
    got = {(r["team_id"], r["key_id"], r["model"]): r["requests"] for r in fine["rows"]}
    assert got == {
        ("sp1", k1["id"], "gpt-test"): 2,
        ("sp1", k1["id"], "gpt-azure"): 1,
        ("sp1", k2["id"], "gpt-test"): 1,
        ("sp2", k3["id"], "gpt-azure"): 1,
    }
    only = await admin.spend(group_by="key", team_id="sp2")
    assert [(r["key_id"], r["requests"]) for r in only["rows"]] == [(k3["id"], 1)]

    # the default range ends today and covers it
    default = await admin.spend()
    assert default["end"] == today.isoformat()
    assert sum(r["requests"] for r in default["rows"]) == 5
    # a range in the past or the future holds nothing
    past = (today - timedelta(days=3)).isoformat()
    assert (await admin.spend(start=past, end=(today - timedelta(days=1)).isoformat()))["rows"] == []
    future = (today + timedelta(days=1)).isoformat()
    empty = await admin.spend(start=future, end=future)
    assert empty["rows"] == [] and empty["total_usd"] == 0

    for query, param in (
        ("group_by=team,colour", "group_by"),
        ("start=yesterday", None),
        (f"start={future}&end={today.isoformat()}", None),
    ):
        status, _, text = await admin.call("GET", "/admin/spend?" + query)
        assert status == 400, (query, text)
        err = assert_error_shape(text)
        if param:
            assert err["param"] == param


# ---- OpenAPI ------------------------------------------------------------------------------------


async def test_openapi_document(gateway: str, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway + "/admin/openapi.json") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        doc = await resp.json()
    assert str(doc["openapi"]).startswith("3.")
    assert doc["info"]["title"] and doc["info"]["version"]
    expected = {
        "/admin/keys": {"get", "post"},
        "/admin/keys/{id}": {"get", "patch", "delete"},
        "/admin/keys/{id}/revoke": {"post"},
        "/admin/keys/{id}/rotate": {"post"},
        "/admin/keys/{id}/budget": {"get"},
        "/admin/teams": {"get", "post"},
        "/admin/teams/{id}": {"get", "patch"},
        "/admin/teams/{id}/budget": {"get"},
        "/admin/spend": {"get"},
    }
    for path, methods in expected.items():
        assert path in doc["paths"], path
        assert methods <= set(doc["paths"][path]), (path, set(doc["paths"][path]))
        for m in methods:
            op = doc["paths"][path][m]
            assert op.get("responses"), (path, m)
            if "{id}" in path:
                assert any(p["name"] == "id" and p["in"] == "path" for p in op.get("parameters", [])), (
                    path,
                    m,
                )
    schemas = doc["components"]["schemas"]
    # every $ref points at a schema that exists
    refs: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "$ref":
                    refs.append(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    assert refs
    for r in refs:
        assert r.startswith("#/components/schemas/"), r
        assert r.rsplit("/", 1)[1] in schemas, r
    assert {"team_id", "budget", "rpm", "tpm", "allowed_models"} <= set(schemas["KeyCreate"]["properties"])
    assert "team_id" in schemas["KeyCreate"].get("required", [])
    assert "key" in schemas["KeyCreated"]["properties"]
    assert "key" not in schemas["KeyOut"]["properties"]
    assert {"limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "forecast_usd"} <= set(
        schemas["BudgetOut"]["properties"]
    )
    post_keys = doc["paths"]["/admin/keys"]["post"]
    assert post_keys["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/KeyCreate")
    assert any(
        s.get("type") == "http" and s.get("scheme") == "bearer"
        for s in doc["components"]["securitySchemes"].values()
    )


# ---- the CLI ------------------------------------------------------------------------------------


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TOLLWAY_ADMIN_KEY", "TOLLWAY_URL")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def cli(gateway: str, keys: TestKeys) -> AsyncIterator[Any]:
    async def call(*args: str, admin_key: str = keys.admin) -> tuple[int, str, str]:
        return await run_cli(*args, "--url", gateway, "--admin-key", admin_key)

    yield call


async def test_cli_teams(cli: Any, admin: AdminClient) -> None:
    rc, out, err = await cli(
        "teams",
        "create",
        "--id",
        "cli-team",
        "--name",
        "CLI team",
        "--budget-usd",
        "5",
        "--period",
        "daily",
        "--rpm",
        "10",
        "--models",
        "gpt-test",
    )
    assert rc == 0, err
    created = orjson.loads(out)
    assert created["id"] == "cli-team" and created["name"] == "CLI team"
    t = await admin.ok("GET", "/admin/teams/cli-team")
    assert t["budget"] == {"limit_usd": 5.0, "period": "daily"}
    assert t["rpm"] == 10 and t["allowed_models"] == ["gpt-test"]

    rc, out, err = await cli("teams", "create", "--id", "cli-team", "--name", "dup")
    assert rc == 1
    assert "409" in err
    rc, out, err = await cli("teams", "list")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["id", "name"]
    row = next(line for line in lines if line.startswith("cli-team "))
    assert "CLI team" in row and "$5/daily" in row and " 10" in row
    assert any(line.startswith("team-a ") for line in lines)


async def test_cli_keys(cli: Any, admin: AdminClient, gateway: str) -> None:
    await admin.create_team(id="clik", name="clik")
    rc, out, err = await cli(
        "keys",
        "create",
        "--team",
        "clik",
        "--name",
        "cli-key",
        "--rpm",
        "7",
        "--budget-usd",
        "2.5",
        "--expires-in-days",
        "1",
    )
    assert rc == 0, err
    created = orjson.loads(out)
    secret = created["key"]
    assert secret.startswith("sk-tw-")
    assert secret in err  # shown once, on stderr too
    kid = created["id"]
    k = await admin.ok("GET", f"/admin/keys/{kid}")
    assert k["name"] == "cli-key" and k["team_id"] == "clik" and k["rpm"] == 7
    assert k["budget"] == {"limit_usd": 2.5, "period": "monthly"}
    assert k["expires_at"] == pytest.approx(time.time() + 86400, abs=30)
    await chat_ok(gateway, secret)

    rc, out, err = await cli("keys", "list")
    assert rc == 0, err
    assert secret not in out
    row = next(line for line in out.splitlines() if line.startswith(kid + " "))
    assert (
        "clik" in row
        and "cli-key" in row
        and secret[:10] in row
        and "active" in row
        and "$2.5/monthly" in row
    )
    rc, out, _ = await cli("keys", "list", "--team", "team-a")
    assert rc == 0 and kid not in out

    rc, out, err = await cli("keys", "revoke", kid)
    assert rc == 0, err
    assert kid in out and "revoked" in out
    assert (await admin.ok("GET", f"/admin/keys/{kid}"))["status"] == "revoked"
    await assert_rejected_401(gateway, secret)
    rc, out, _ = await cli("keys", "list", "--team", "clik")
    row = next(line for line in out.splitlines() if line.startswith(kid + " "))
    assert "revoked" in row

    # errors: a wrong admin key, an unknown team, an unknown key
    rc, out, err = await cli("keys", "list", admin_key="wrong-admin-key")
    assert rc == 1 and "401" in err and out == ""
    rc, _, err = await cli("keys", "create", "--team", "no-such-team")
    assert rc == 1 and "404" in err
    rc, _, err = await cli("keys", "revoke", "key_missing")
    assert rc == 1 and "404" in err
    assert len((await admin.ok("GET", "/admin/keys?team_id=clik"))["data"]) == 1


async def test_cli_unreachable_gateway() -> None:
    rc, out, err = await run_cli(
        "teams", "list", "--url", "http://127.0.0.1:9", "--admin-key", "x", "--timeout", "2"
    )
    assert rc == 1 and out == ""
    assert "cannot reach" in err
