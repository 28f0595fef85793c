"""The Store contract: both backends must pass every test here unchanged.

Times are passed in (`now`), so tests move the clock instead of sleeping. T0 is Monday
2030-01-07 00:00:00 UTC: the start of a day, an ISO week and a 60 s rate window.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.store.base import (
    Admission,
    BudgetSpec,
    KeyRecord,
    Period,
    RateInfo,
    Scope,
    ScopeKind,
    Settlement,
    SpendRecord,
    Store,
    StoreUnavailable,
    TeamRecord,
    period_bounds,
)
from gateway.store.embedded import EmbeddedStore
from gateway.store.redis_store import RedisStore
from gateway.testing.redis_server import RedisServer

T0 = datetime(2030, 1, 7, tzinfo=UTC).timestamp()
DAY = 86400.0
REPO = Path(__file__).resolve().parents[2]
OpenStore = Callable[[], Awaitable[Store]]


def team(id: str = "t1", **kw: object) -> TeamRecord:
    return TeamRecord(id=id, name=f"team {id}", **kw)  # type: ignore[arg-type]


def key(id: str = "k1", team_id: str = "t1", key_hash: str | None = None, **kw: object) -> KeyRecord:
    return KeyRecord(
        id=id, team_id=team_id, key_hash=key_hash or f"hash-{id}", prefix="sk-tw-" + id, **kw  # type: ignore[arg-type]
    )


def adm(
    now: float,
    key_hash: str = "hash-k1",
    *,
    model: str = "gpt-x",
    est: int = 10,
    reserve: int = 0,
    lease: str | None = None,
    ttl: float = 600.0,
    check_rate: bool = True,
    check_budget: bool = True,
    charge: bool = False,
) -> Admission:
    return Admission(
        key_hash=key_hash, now=now, model=model, est_tokens=est, reserve_nano=reserve,
        lease_id=lease or uuid.uuid4().hex, lease_ttl_s=ttl, check_rate=check_rate,
        check_budget=check_budget, charge=charge,
    )


def settlement(
    lease: str, now: float, actual: int, *, key_id: str = "k1", team_id: str = "t1",
    est_tokens: int = 10, actual_tokens: int = 10,
) -> Settlement:
    return Settlement(lease_id=lease, key_id=key_id, team_id=team_id, now=now, actual_nano=actual,
                      est_tokens=est_tokens, actual_tokens=actual_tokens)


async def seed(store: Store, t: TeamRecord | None = None, *keys: KeyRecord) -> None:
    await store.put_team(t or team())
    for k in keys or (key(),):
        await store.put_key(k)


async def statuses(store: Store, n: int, now: float, **kw: object) -> list[str]:
    return [(await store.admit(adm(now, **kw))).status for _ in range(n)]  # type: ignore[arg-type]


# ---- teams and keys ----------------------------------------------------------------------------


async def test_ping(store: Store) -> None:
    assert await store.ping() is True


async def test_teams_put_get_list_replace(store: Store) -> None:
    t = team("t2", budget=BudgetSpec(5_000_000_000, "monthly"), rpm=60, tpm=1000,
             allowed_models=["a", "b"], metadata={"owner": "x", "n": [1, 2]}, created_at=T0 + 0.25)
    await store.put_team(t)
    await store.put_team(team("t1"))
    assert await store.get_team("t2") == t
    assert await store.get_team("nope") is None
    assert [x.id for x in await store.list_teams()] == ["t1", "t2"]
    t.name = "renamed"
    t.budget = None
    await store.put_team(t)
    got = await store.get_team("t2")
    assert got is not None and got.name == "renamed" and got.budget is None
    got.name = "mutated by a caller"
    assert (await store.get_team("t2")) == t  # returned records are detached copies


async def test_keys_put_get_list_and_hash_lookup(store: Store) -> None:
    await store.put_team(team("t1"))
    await store.put_team(team("t2"))
    k1 = key("k1", budget=BudgetSpec(10, "daily"), rpm=5, tpm=50, allowed_models=["m"],
             expires_at=T0 + 100.5, metadata={"a": 1}, created_at=T0, name="first")
    k2 = key("k2", team_id="t2")
    k3 = key("k3")
    for k in (k3, k1, k2):
        await store.put_key(k)
    assert await store.get_key("k1") == k1
    assert await store.get_key("zz") is None
    assert await store.get_key_by_hash("hash-k2") == k2
    assert await store.get_key_by_hash("unknown") is None
    assert [k.id for k in await store.list_keys()] == ["k1", "k2", "k3"]
    assert [k.id for k in await store.list_keys("t1")] == ["k1", "k3"]
    assert await store.list_keys("t9") == []


async def test_hash_index_follows_rotation(store: Store) -> None:
    await seed(store)
    k = await store.get_key("k1")
    assert k is not None
    k.key_hash = "rotated"
    await store.put_key(k)
    assert await store.get_key_by_hash("hash-k1") is None
    assert (await store.get_key_by_hash("rotated")) == k
    assert (await store.admit(adm(T0, "hash-k1"))).status == "unknown_key"
    assert (await store.admit(adm(T0, "rotated"))).status == "ok"
    # a revocation keeps the same hash
    k.revoked_at = T0
    await store.put_key(k)
    assert (await store.admit(adm(T0, "rotated"))).status == "revoked"


# ---- admission: refusals and their precedence --------------------------------------------------


async def test_unknown_key_and_key_without_team(store: Store) -> None:
    res = await store.admit(adm(T0, "nobody"))
    assert res.status == "unknown_key" and res.key is None and res.team is None
    await store.put_key(key("orphan", team_id="missing"))
    res = await store.admit(adm(T0, "hash-orphan"))
    assert res.status == "unknown_key" and res.key is None


async def test_refusal_precedence_revoked_expired_model(store: Store) -> None:
    k = key(revoked_at=T0 - 5, expires_at=T0 - 1, allowed_models=["other"])
    await seed(store, team(allowed_models=["other"]), k)

    async def status() -> tuple[str, str | None]:
        r = await store.admit(adm(T0))
        return r.status, r.scope

    assert await status() == ("revoked", None)
    k.revoked_at = None
    await store.put_key(k)
    assert await status() == ("expired", None)
    k.expires_at = T0  # expires_at <= now: expired
    await store.put_key(k)
    assert await status() == ("expired", None)
    k.expires_at = T0 + 0.001
    await store.put_key(k)
    assert await status() == ("model_not_allowed", "key")
    k.allowed_models = ["gpt-x"]
    await store.put_key(k)
    assert await status() == ("model_not_allowed", "team")
    await store.put_team(team(allowed_models=["gpt-x", "y"]))
    res = await store.admit(adm(T0))
    assert res.status == "ok"
    assert res.key == k and res.team is not None and res.team.id == "t1"
    k.allowed_models = []
    await store.put_key(k)
    assert await status() == ("model_not_allowed", "key")


async def test_refused_admission_carries_key_and_team(store: Store) -> None:
    await seed(store, team(), key(revoked_at=T0))
    res = await store.admit(adm(T0))
    assert res.status == "revoked"
    assert res.key is not None and res.key.id == "k1"
    assert res.team is not None and res.team.id == "t1"


async def test_rate_limit_order_key_then_team_requests_then_tokens(store: Store) -> None:
    # key: requests before tokens
    await seed(store, team(), key(rpm=1, tpm=15))
    assert (await store.admit(adm(T0))).status == "ok"
    r = await store.admit(adm(T0))
    assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "key", "requests")
    # key tokens before team requests
    await seed(store, team(rpm=1), key("k2", tpm=15))
    assert (await store.admit(adm(T0 + 600, "hash-k2"))).status == "ok"
    r = await store.admit(adm(T0 + 600, "hash-k2"))
    assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "key", "tokens")
    # team requests before team tokens
    await seed(store, team(rpm=1, tpm=15), key("k3"))
    assert (await store.admit(adm(T0 + 1200, "hash-k3"))).status == "ok"
    r = await store.admit(adm(T0 + 1200, "hash-k3"))
    assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "team", "requests")
    await seed(store, team(tpm=15), key("k4"))
    assert (await store.admit(adm(T0 + 1800, "hash-k4"))).status == "ok"
    r = await store.admit(adm(T0 + 1800, "hash-k4"))
    assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "team", "tokens")


async def test_rate_limit_before_budget(store: Store) -> None:
    await seed(store, team(), key(rpm=1, budget=BudgetSpec(100, "daily")))
    assert (await store.admit(adm(T0, reserve=100))).status == "ok"
    r = await store.admit(adm(T0, reserve=100))
    assert (r.status, r.scope) == ("rate_limited", "key")


async def test_nothing_counted_when_refused(store: Store) -> None:
    await seed(store, team(rpm=2, budget=BudgetSpec(100, "daily")), key("k1", rpm=1), key("k2"),
               key("k3", budget=BudgetSpec(10, "daily")), key("k4", allowed_models=["other"]))
    assert (await store.admit(adm(T0, "hash-k1"))).status == "ok"
    # k1 refused by its own limit: the team's window must not move.
    for _ in range(3):
        assert (await store.admit(adm(T0, "hash-k1"))).status == "rate_limited"
    # k3 refused by its budget: neither its window nor the team's moves, no lease is held.
    for _ in range(3):
        r = await store.admit(adm(T0, "hash-k3", reserve=11))
        assert (r.status, r.scope) == ("over_budget", "key")
    k3 = await store.budget(Scope("key", "k3", budget=BudgetSpec(10, "daily")), T0)
    assert k3.reserved_nano == 0
    team_state = await store.budget(Scope("team", "t1", budget=BudgetSpec(100, "daily")), T0)
    assert team_state.reserved_nano == 0
    # model refusals count nothing either
    for _ in range(3):
        assert (await store.admit(adm(T0, "hash-k4"))).status == "model_not_allowed"
    assert (await store.admit(adm(T0, "hash-k2"))).status == "ok"
    r = await store.admit(adm(T0, "hash-k2"))
    assert (r.status, r.scope) == ("rate_limited", "team")


async def test_ok_admission_reports_tightest_rate_limits(store: Store) -> None:
    await seed(store, team(rpm=5, tpm=1000), key(rpm=10, tpm=100))
    r = await store.admit(adm(T0 + 10, est=30))
    assert r.status == "ok"
    assert r.requests == RateInfo(limit=5, remaining=4, reset_s=110.0)
    assert r.tokens == RateInfo(limit=100, remaining=70, reset_s=110.0)
    r = await store.admit(adm(T0 + 75, est=30))  # the first window is now the previous one
    assert r.requests == RateInfo(limit=5, remaining=3, reset_s=105.0)  # 5 - (1 * 0.75 + 1)
    assert r.tokens == RateInfo(limit=100, remaining=47, reset_s=105.0)  # 100 - (30 * 0.75 + 30)
    # refused: headers show the state without this request
    await seed(store, team(rpm=5, tpm=1000), key(rpm=10, tpm=100))
    r = await store.admit(adm(T0 + 75, est=80))
    assert (r.status, r.limit_kind) == ("rate_limited", "tokens")
    assert r.tokens == RateInfo(limit=100, remaining=47, reset_s=105.0)
    # no limits: no rate info
    await seed(store, team(), key("k2"))
    r = await store.admit(adm(T0, "hash-k2"))
    assert r.status == "ok" and r.requests is None and r.tokens is None


# ---- sliding windows ---------------------------------------------------------------------------


async def test_rpm_sliding_window(store: Store) -> None:
    await seed(store, team(), key(rpm=10))
    assert await statuses(store, 11, T0) == ["ok"] * 10 + ["rate_limited"]
    # next window, at its start the previous one still weighs fully
    assert await statuses(store, 1, T0 + 60) == ["rate_limited"]
    # half way through: 10 * 0.5 = 5 still count
    assert await statuses(store, 6, T0 + 90) == ["ok"] * 5 + ["rate_limited"]
    # two windows later everything has decayed except the 5 counted at T0+90
    assert await statuses(store, 1, T0 + 120) == ["ok"]  # 5 * 1 + 1
    assert await statuses(store, 10, T0 + 180) == ["ok"] * 9 + ["rate_limited"]  # 1 + 9 <= 10
    assert await statuses(store, 11, T0 + 300) == ["ok"] * 10 + ["rate_limited"]


async def test_tpm_sliding_window(store: Store) -> None:
    await seed(store, team(), key(tpm=1000))
    assert await statuses(store, 3, T0, est=400) == ["ok", "ok", "rate_limited"]
    assert await statuses(store, 1, T0 + 59, est=400) == ["rate_limited"]
    assert await statuses(store, 1, T0 + 59, est=200) == ["ok"]  # 1000 exactly fits
    # at T0+105 the previous window (1000) weighs 0.25 -> 250
    assert await statuses(store, 3, T0 + 105, est=375) == ["ok", "ok", "rate_limited"]


async def test_retry_after(store: Store) -> None:
    await seed(store, team(), key(rpm=10, tpm=1000))
    now = T0 + 10
    await statuses(store, 10, now)
    r = await store.admit(adm(now))
    assert r.status == "rate_limited" and r.retry_after_s is not None
    # 50 s to the window's end, then 10 * (1 - e/60) + 1 <= 10 at e = 6 s
    assert 56.0 <= r.retry_after_s <= 56.01
    assert (await store.admit(adm(now + r.retry_after_s - 0.5))).status == "rate_limited"
    assert (await store.admit(adm(now + r.retry_after_s))).status == "ok"
    # within-window wait: previous window full, current empty
    await seed(store, team(), key("k2", rpm=10))
    await statuses(store, 10, T0 + 300, key_hash="hash-k2")
    r = await store.admit(adm(T0 + 360, "hash-k2"))
    assert r.retry_after_s is not None and 6.0 <= r.retry_after_s <= 6.01
    assert (await store.admit(adm(T0 + 360 + r.retry_after_s, "hash-k2"))).status == "ok"
    # a request larger than the whole limit never fits: wait for a clear window
    r = await store.admit(adm(T0 + 1210, est=5000))
    assert (r.status, r.limit_kind) == ("rate_limited", "tokens")
    assert r.retry_after_s is not None and 110.0 <= r.retry_after_s <= 110.01


async def test_tpm_corrected_at_settle(store: Store) -> None:
    await seed(store, team(tpm=2000), key(tpm=1000))
    r = await store.admit(adm(T0, est=800, lease="L1"))
    assert r.status == "ok"
    assert (await store.admit(adm(T0, est=800))).status == "rate_limited"
    await store.settle(settlement("L1", T0 + 1, 0, est_tokens=800, actual_tokens=100))
    r = await store.admit(adm(T0 + 2, est=800, lease="L2"))
    assert r.status == "ok" and r.tokens == RateInfo(limit=1000, remaining=100, reset_s=118.0)
    # a correction never drives a window below zero
    await store.settle(settlement("L2", T0 + 3, 0, est_tokens=800, actual_tokens=0))
    await store.settle(settlement("unknown-lease", T0 + 3, 0, est_tokens=5000, actual_tokens=0))
    r = await store.admit(adm(T0 + 4, est=1000))
    assert r.status == "ok" and r.tokens is not None and r.tokens.remaining == 0


async def test_check_flags(store: Store) -> None:
    await seed(store, team(), key(rpm=1, budget=BudgetSpec(100, "daily")))
    assert await statuses(store, 3, T0, check_rate=False) == ["ok"] * 3  # not checked, not counted
    assert await statuses(store, 2, T0) == ["ok", "rate_limited"]
    r = await store.admit(adm(T0, reserve=500, check_rate=False, check_budget=False, lease="L"))
    assert r.status == "ok"
    s = await store.budget(Scope("key", "k1", budget=BudgetSpec(100, "daily")), T0)
    assert s.reserved_nano == 500  # the lease is held (and settles) even when not checked
    await store.settle(settlement("L", T0, 300))
    s = await store.budget(Scope("key", "k1", budget=BudgetSpec(100, "daily")), T0)
    assert (s.spent_nano, s.reserved_nano) == (300, 0)


# ---- budgets -----------------------------------------------------------------------------------

BOUNDARIES: list[tuple[Period, float]] = [
    ("daily", T0 + DAY),
    ("weekly", T0 + 7 * DAY),
    ("monthly", datetime(2030, 2, 1, tzinfo=UTC).timestamp()),
    ("total", T0 + 400 * DAY),
]


@pytest.mark.parametrize(("period", "boundary"), BOUNDARIES)
async def test_budget_period_and_reset(store: Store, period: Period, boundary: float) -> None:
    spec = BudgetSpec(100, period)
    await seed(store, team(), key(budget=spec))
    scope = Scope("key", "k1", budget=spec)
    now = boundary - 1
    assert (await store.admit(adm(now, reserve=60, lease="L1"))).status == "ok"
    r = await store.admit(adm(now, reserve=60))
    assert (r.status, r.scope) == ("over_budget", "key")
    assert r.budget_reset_at == (None if period == "total" else boundary)
    await store.settle(settlement("L1", now, 70))
    s = await store.budget(scope, now)
    start, end = period_bounds(period, now)
    assert (s.limit_nano, s.period, s.spent_nano, s.reserved_nano) == (100, period, 70, 0)
    assert (s.period_start, s.period_end) == (start, end)
    assert (await store.admit(adm(now, reserve=31))).status == "over_budget"
    assert (await store.admit(adm(now, reserve=30, lease="L2"))).status == "ok"  # 70 + 30 == 100
    await store.settle(settlement("L2", now, 30))
    assert (await store.admit(adm(now, reserve=1))).status == "over_budget"
    assert (await store.admit(adm(now, reserve=0))).status == "ok"  # 100 + 0 <= 100
    after = await store.budget(scope, boundary)
    if period == "total":
        assert after.spent_nano == 100 and after.period_end is None
        assert (await store.admit(adm(boundary, reserve=1))).status == "over_budget"
    else:
        assert after.spent_nano == 0 and after.period_start == boundary
        assert (await store.admit(adm(boundary, reserve=100))).status == "ok"


async def test_team_budget_and_key_before_team(store: Store) -> None:
    await seed(store, team(budget=BudgetSpec(100, "daily")), key("k1", budget=BudgetSpec(50, "weekly")),
               key("k2"))
    assert (await store.admit(adm(T0, "hash-k2", reserve=80, lease="L1"))).status == "ok"
    r = await store.admit(adm(T0, "hash-k1", reserve=40))
    assert (r.status, r.scope, r.budget_reset_at) == ("over_budget", "team", T0 + DAY)
    r = await store.admit(adm(T0, "hash-k1", reserve=60))  # both over: the key refuses first
    assert (r.status, r.scope, r.budget_reset_at) == ("over_budget", "key", T0 + 7 * DAY)
    await store.settle(settlement("L1", T0, 10, key_id="k2"))
    assert (await store.admit(adm(T0, "hash-k1", reserve=50))).status == "ok"
    t = await store.budget(Scope("team", "t1", budget=BudgetSpec(100, "daily")), T0)
    assert (t.spent_nano, t.reserved_nano) == (10, 50)


async def test_reserve_then_settle(store: Store) -> None:
    spec = BudgetSpec(1_000_000, "daily")
    await seed(store, team(budget=spec), key(budget=spec))
    assert (await store.admit(adm(T0, reserve=700, lease="L1"))).status == "ok"
    assert (await store.admit(adm(T0, reserve=200, lease="L2"))).status == "ok"
    for kind, id in (("key", "k1"), ("team", "t1")):
        s = await store.budget(Scope(kind, id, budget=spec), T0)  # type: ignore[arg-type]
        assert (s.spent_nano, s.reserved_nano) == (0, 900)
    await store.settle(settlement("L1", T0 + 1, 123))
    await store.settle(settlement("L2", T0 + 1, 0))
    for kind, id in (("key", "k1"), ("team", "t1")):
        s = await store.budget(Scope(kind, id, budget=spec), T0 + 1)  # type: ignore[arg-type]
        assert (s.spent_nano, s.reserved_nano) == (123, 0)


async def test_budget_without_spec_reports_all_time_spend(store: Store) -> None:
    await seed(store)
    assert (await store.admit(adm(T0, reserve=5, lease="L1"))).status == "ok"
    s = await store.budget(Scope("key", "k1"), T0)
    assert (s.limit_nano, s.period, s.spent_nano, s.reserved_nano) == (None, None, 0, 5)
    assert (s.period_start, s.period_end) == (None, None)
    await store.settle(settlement("L1", T0, 42))
    assert (await store.budget(Scope("key", "k1"), T0 + 40 * DAY)).spent_nano == 42
    assert (await store.budget(Scope("team", "t1"), T0)).spent_nano == 42
    assert (await store.budget(Scope("key", "nobody"), T0)).spent_nano == 0


async def test_settle_twice_counts_once(store: Store) -> None:
    spec = BudgetSpec(1000, "daily")
    await seed(store, team(), key(budget=spec))
    await store.admit(adm(T0, reserve=100, lease="L1"))
    for _ in range(3):
        await store.settle(settlement("L1", T0 + 1, 70))
    s = await store.budget(Scope("key", "k1", budget=spec), T0 + 2)
    assert (s.spent_nano, s.reserved_nano) == (70, 0)


async def test_lease_expiry_frees_budget(store: Store) -> None:
    spec = BudgetSpec(100, "daily")
    await seed(store, team(), key(budget=spec))
    scope = Scope("key", "k1", budget=spec)
    assert (await store.admit(adm(T0, reserve=100, ttl=30))).status == "ok"
    assert (await store.admit(adm(T0 + 29.9, reserve=1))).status == "over_budget"
    assert (await store.budget(scope, T0 + 29.9)).reserved_nano == 100
    assert (await store.budget(scope, T0 + 30)).reserved_nano == 0  # expiry <= now: gone
    assert (await store.admit(adm(T0 + 30, reserve=100, ttl=30))).status == "ok"


async def test_settle_after_lease_expiry_charges_once(store: Store) -> None:
    spec = BudgetSpec(100, "daily")
    await seed(store, team(), key(budget=spec))
    scope = Scope("key", "k1", budget=spec)
    assert (await store.admit(adm(T0, reserve=100, ttl=30, lease="L1"))).status == "ok"
    assert (await store.admit(adm(T0 + 31, reserve=50, lease="L2"))).status == "ok"  # L1 dropped
    await store.settle(settlement("L1", T0 + 32, 40))
    await store.settle(settlement("L1", T0 + 33, 40))
    s = await store.budget(scope, T0 + 34)
    assert (s.spent_nano, s.reserved_nano) == (40, 50)
    assert (await store.admit(adm(T0 + 34, reserve=11))).status == "over_budget"
    assert (await store.admit(adm(T0 + 34, reserve=10))).status == "ok"


async def test_spend_lands_in_the_lease_period(store: Store) -> None:
    spec = BudgetSpec(1000, "daily")
    await seed(store, team(budget=BudgetSpec(1000, "monthly")), key(budget=spec))
    midnight = T0 + DAY
    assert (await store.admit(adm(midnight - 10, reserve=100, lease="L1"))).status == "ok"
    await store.settle(settlement("L1", midnight + 10, 70))
    assert (await store.budget(Scope("key", "k1", budget=spec), midnight - 5)).spent_nano == 70
    after = await store.budget(Scope("key", "k1", budget=spec), midnight + 10)
    assert (after.spent_nano, after.reserved_nano) == (0, 0)
    month = await store.budget(Scope("team", "t1", budget=BudgetSpec(1000, "monthly")), midnight + 10)
    assert month.spent_nano == 70


async def test_concurrent_admits_never_overshoot(store: Store) -> None:
    spec = BudgetSpec(50 * 1000, "daily")
    await seed(store, team(), key(budget=spec))
    results = await asyncio.gather(*(store.admit(adm(T0, reserve=1000)) for _ in range(200)))
    assert sum(r.status == "ok" for r in results) == 50
    assert sum(r.status == "over_budget" for r in results) == 150
    assert (await store.budget(Scope("key", "k1", budget=spec), T0)).reserved_nano == 50 * 1000


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_concurrent_admits_from_two_replicas(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    spec = BudgetSpec(50 * 1000, "daily")
    await seed(a, team(budget=spec), key(rpm=1000))
    results = await asyncio.gather(
        *(s.admit(adm(T0, reserve=1000)) for _ in range(100) for s in (a, b))
    )
    assert sum(r.status == "ok" for r in results) == 50
    assert {r.scope for r in results if r.status != "ok"} == {"team"}
    r = await b.admit(adm(T0, reserve=0))
    assert r.requests is not None and r.requests.remaining == 1000 - 51


# ---- charge: a known cost (a cache hit) spent at admission, no lease ---------------------------

PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly", "total")


async def by_period(store: Store, kind: ScopeKind, id: str, now: float) -> dict[str, tuple[int, int]]:
    """(spent, reserved) of one scope in each budget period at `now`, and ("all") without a budget."""
    out: dict[str, tuple[int, int]] = {}
    for period in PERIODS:
        s = await store.budget(Scope(kind, id, budget=BudgetSpec(10**15, period)), now)
        out[period] = (s.spent_nano, s.reserved_nano)
    s = await store.budget(Scope(kind, id), now)
    out["all"] = (s.spent_nano, s.reserved_nano)
    return out


def every_period(spent: int, reserved: int = 0) -> dict[str, tuple[int, int]]:
    return {p: (spent, reserved) for p in (*PERIODS, "all")}


async def test_charge_spends_at_once_on_key_and_team_without_a_lease(store: Store) -> None:
    await seed(store, team(budget=BudgetSpec(10_000, "monthly")), key(budget=BudgetSpec(1000, "daily")))
    now = T0 + 3600
    r = await store.admit(adm(now, est=40, reserve=250, lease="C1", ttl=30, charge=True))
    assert r.status == "ok" and r.key is not None and r.team is not None
    # spent right away, in every period of both scopes; nothing reserved, nothing left to settle
    assert await by_period(store, "key", "k1", now) == every_period(250)
    assert await by_period(store, "team", "t1", now) == every_period(250)
    # no lease was held: its ttl passing frees nothing, a settle of its id (cost 0) undoes nothing
    await store.settle(settlement("C1", now + 1, 0, est_tokens=40, actual_tokens=40))
    assert await by_period(store, "key", "k1", now + 31) == every_period(250)
    assert await by_period(store, "team", "t1", now + 31) == every_period(250)
    # the charge is spend: the key's daily budget has 750 left
    r = await store.admit(adm(now + 40, reserve=751, charge=True))
    assert (r.status, r.scope) == ("over_budget", "key")
    assert (await store.admit(adm(now + 40, reserve=750, charge=True))).status == "ok"
    assert await by_period(store, "key", "k1", now + 40) == every_period(1000)
    assert (await store.admit(adm(now + 40, reserve=1, charge=True))).status == "over_budget"
    # spent in the periods of the admission: the next day starts at 0, the week and month keep it
    tomorrow = await by_period(store, "key", "k1", T0 + DAY)
    assert tomorrow == {**every_period(1000), "daily": (0, 0)}
    assert (await store.budget(Scope("team", "t1", budget=BudgetSpec(10_000, "monthly")), T0 + DAY)
            ).spent_nano == 1000
    assert (await store.admit(adm(T0 + DAY, reserve=1000, charge=True))).status == "ok"


async def test_charge_counts_live_reservations_against_the_budget(store: Store) -> None:
    spec = BudgetSpec(100, "daily")
    await seed(store, team(), key(budget=spec))
    scope = Scope("key", "k1", budget=spec)
    assert (await store.admit(adm(T0, reserve=60, lease="L1"))).status == "ok"
    r = await store.admit(adm(T0, reserve=41, charge=True))  # 0 spent + 60 reserved + 41 > 100
    assert (r.status, r.scope) == ("over_budget", "key")
    assert (await store.admit(adm(T0, reserve=40, charge=True))).status == "ok"
    s = await store.budget(scope, T0)
    assert (s.spent_nano, s.reserved_nano) == (40, 60)
    await store.settle(settlement("L1", T0 + 1, 50))
    s = await store.budget(scope, T0 + 1)
    assert (s.spent_nano, s.reserved_nano) == (90, 0)
    assert (await store.admit(adm(T0 + 1, reserve=11, charge=True))).status == "over_budget"
    assert (await store.admit(adm(T0 + 1, reserve=10, charge=True))).status == "ok"
    assert await by_period(store, "team", "t1", T0 + 1) == every_period(100)


async def test_charge_of_zero_spends_nothing_but_counts_requests_and_tokens(store: Store) -> None:
    spec = BudgetSpec(100, "daily")
    await seed(store, team(rpm=10, tpm=1000, budget=spec), key(rpm=3, tpm=100, budget=spec), key("k2"))
    now = T0 + 10
    r = await store.admit(adm(now, est=60, reserve=0, lease="Z1", charge=True))
    assert r.status == "ok"
    assert r.requests == RateInfo(limit=3, remaining=2, reset_s=110.0)
    assert r.tokens == RateInfo(limit=100, remaining=40, reset_s=110.0)  # est_tokens are counted
    r = await store.admit(adm(now, est=41, charge=True))
    assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "key", "tokens")
    r = await store.admit(adm(now, est=40, charge=True))
    assert r.status == "ok" and r.tokens is not None and r.tokens.remaining == 0
    assert r.requests is not None and r.requests.remaining == 1
    assert (await store.admit(adm(now, est=0, charge=True))).status == "ok"
    r = await store.admit(adm(now, est=0, charge=True))
    assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "key", "requests")
    # the team's windows counted the same 3 requests and 100 tokens
    r = await store.admit(adm(now, "hash-k2", est=0))
    assert r.status == "ok"
    assert r.requests == RateInfo(limit=10, remaining=6, reset_s=110.0)
    assert r.tokens == RateInfo(limit=1000, remaining=900, reset_s=110.0)
    # nothing spent, nothing reserved
    assert await by_period(store, "key", "k1", now) == every_period(0)
    assert (await store.budget(Scope("team", "t1", budget=spec), now)).spent_nano == 0


async def test_charge_over_the_remaining_budget_is_refused_and_counts_nothing(store: Store) -> None:
    key_spec, team_spec = BudgetSpec(100, "daily"), BudgetSpec(1000, "weekly")
    await seed(store, team(rpm=5, tpm=500, budget=team_spec),
               key("k1", rpm=3, tpm=100, budget=key_spec), key("k2"))
    now = T0 + 10
    assert (await store.admit(adm(now, est=30, reserve=60, charge=True))).status == "ok"
    for _ in range(3):
        r = await store.admit(adm(now, est=30, reserve=41, charge=True))
        assert (r.status, r.scope) == ("over_budget", "key")
        assert r.budget_reset_at == T0 + DAY
    r = await store.admit(adm(now, "hash-k2", est=30, reserve=941, charge=True))
    assert (r.status, r.scope, r.budget_reset_at) == ("over_budget", "team", T0 + 7 * DAY)
    # the refused charges spent nothing and hold nothing
    assert await by_period(store, "key", "k1", now) == every_period(60)
    assert await by_period(store, "key", "k2", now) == every_period(0)
    assert await by_period(store, "team", "t1", now) == every_period(60)
    # and counted nothing: the key's windows hold 1 request and 30 tokens, the team's 1 and 30
    # (with the 4 refusals counted the team's 5 requests a minute would refuse this)
    r = await store.admit(adm(now, est=70, reserve=40, charge=True))
    assert r.status == "ok"
    assert r.requests == RateInfo(limit=3, remaining=1, reset_s=110.0)
    assert r.tokens == RateInfo(limit=100, remaining=0, reset_s=110.0)
    assert (await store.admit(adm(now, "hash-k2", est=0, reserve=900, charge=True))).status == "ok"
    r = await store.admit(adm(now, "hash-k2", est=0))
    assert r.requests == RateInfo(limit=5, remaining=1, reset_s=110.0)
    assert await by_period(store, "key", "k1", now) == every_period(100)
    assert (await store.budget(Scope("team", "t1", budget=team_spec), now)).spent_nano == 1000


async def test_charge_refused_by_a_rate_limit_spends_nothing(store: Store) -> None:
    await seed(store, team(tpm=1000, budget=BudgetSpec(10_000, "daily")),
               key("k1", rpm=1, budget=BudgetSpec(1000, "daily")), key("k2"))
    assert (await store.admit(adm(T0, est=10, reserve=100, charge=True))).status == "ok"
    for _ in range(3):
        r = await store.admit(adm(T0, est=10, reserve=100, charge=True))
        assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "key", "requests")
        assert r.retry_after_s is not None and r.retry_after_s > 0
    r = await store.admit(adm(T0, "hash-k2", est=991, reserve=100, charge=True))  # 10 + 991 > 1000
    assert (r.status, r.scope, r.limit_kind) == ("rate_limited", "team", "tokens")
    assert await by_period(store, "key", "k1", T0) == every_period(100)
    assert await by_period(store, "key", "k2", T0) == every_period(0)
    assert await by_period(store, "team", "t1", T0) == every_period(100)
    assert (await store.admit(adm(T0, "hash-k2", est=990, reserve=5, charge=True))).status == "ok"
    assert await by_period(store, "team", "t1", T0) == every_period(105)


# ---- routing: named limiters (rate_hit / rate_adjust) ------------------------------------------


async def hits(store: Store, n: int, now: float, name: str = "provider:p", rpm: int = 0, tpm: int = 0,
               tokens: int = 0) -> list[float]:
    return [await store.rate_hit(name, rpm, tpm, tokens, now) for _ in range(n)]


async def test_rate_hit_rpm_sliding_window(store: Store) -> None:
    """The same sequence as test_rpm_sliding_window, on a named limiter."""
    async def ok(n: int, now: float) -> list[bool]:
        return [w == 0.0 for w in await hits(store, n, now, rpm=10)]

    assert await ok(11, T0) == [True] * 10 + [False]
    assert await ok(1, T0 + 60) == [False]
    assert await ok(6, T0 + 90) == [True] * 5 + [False]
    assert await ok(1, T0 + 120) == [True]
    assert await ok(10, T0 + 180) == [True] * 9 + [False]
    assert await ok(11, T0 + 300) == [True] * 10 + [False]


async def test_rate_hit_agrees_with_admit(store: Store) -> None:
    """Same limits, same hits, same times: admit's key window and a limiter decide and wait alike."""
    await seed(store, team(), key(rpm=7, tpm=900))
    times = [T0 + 3.25 + i * 4.5 for i in range(60)]
    for i, now in enumerate(times):
        est = 50 + (i * 37) % 200
        r = await store.admit(adm(now, est=est))
        wait = await store.rate_hit("deployment:d", 7, 900, est, now)
        assert (r.status == "ok") == (wait == 0.0), (i, r.status, wait)
        if r.status != "ok":
            # admit reports the first refusing kind, rate_hit the longest wait of all of them
            assert r.retry_after_s is not None and wait >= r.retry_after_s
            if r.limit_kind == "tokens":  # requests fitted: the same single wait
                assert wait == r.retry_after_s


async def test_rate_hit_tpm_and_nothing_counted_when_refused(store: Store) -> None:
    assert await hits(store, 1, T0, rpm=3, tpm=1000, tokens=600) == [0.0]
    assert (await hits(store, 1, T0, rpm=3, tpm=1000, tokens=600))[0] > 0  # tokens refuse
    assert await hits(store, 1, T0, rpm=3, tpm=1000, tokens=400) == [0.0]  # 1000 exactly fits
    assert await hits(store, 1, T0, rpm=3, tpm=1000, tokens=0) == [0.0]  # request 3 of 3
    # requests refuse now: the tokens of refused hits were not counted either
    assert all(w > 0 for w in await hits(store, 5, T0, rpm=3, tpm=1000, tokens=0))
    assert (await hits(store, 1, T0, tpm=1000, tokens=1))[0] > 0  # rpm 0: tokens alone refuse
    assert await hits(store, 1, T0, rpm=4, tokens=10**6) == [0.0]  # tpm 0: requests alone count
    # at T0 + 105 the previous window (1000 tokens, 4 requests) weighs 0.25
    assert await hits(store, 1, T0 + 105, rpm=3, tpm=1000, tokens=700) == [0.0]


async def test_rate_hit_wait_is_the_longest_of_the_refusing_kinds(store: Store) -> None:
    now = T0 + 10
    assert await hits(store, 10, now, rpm=10, tpm=1000, tokens=50) == [0.0] * 10
    # requests: 50 s to the window's end + 6 s; tokens (500 + 600 > 1000): 50 + 60 * 0.2 = 62 s
    (wait,) = await hits(store, 1, now, rpm=10, tpm=1000, tokens=600)
    assert 62.0 <= wait <= 62.01
    (wait_r,) = await hits(store, 1, now, rpm=10, tpm=1000, tokens=0)
    assert 56.0 <= wait_r <= 56.01
    assert (await hits(store, 1, now + 56.5, rpm=10, tpm=1000, tokens=600))[0] > 0
    assert await hits(store, 1, now + wait, rpm=10, tpm=1000, tokens=600) == [0.0]
    # more tokens than the limit itself never fit: the wait is to a clear window
    (w,) = await hits(store, 1, T0 + 1210, name="provider:q", tpm=1000, tokens=5000)
    assert 110.0 <= w <= 110.01


async def test_rate_hit_without_limits_counts_nothing(store: Store) -> None:
    assert await hits(store, 50, T0, tokens=10**9) == [0.0] * 50
    assert await hits(store, 5, T0, rpm=5, tpm=10, tokens=2) == [0.0] * 5  # nothing counted before


async def test_limiters_are_separate_from_each_other_and_from_keys(store: Store) -> None:
    await seed(store, team(), key(rpm=2))
    assert await hits(store, 3, T0, name="provider:a", rpm=2) == [0.0, 0.0, pytest.approx(90.001)]
    assert await hits(store, 2, T0, name="provider:b", rpm=2) == [0.0, 0.0]
    assert await hits(store, 2, T0, name="key:k1", rpm=2) == [0.0, 0.0]  # not the key's window
    assert await statuses(store, 3, T0) == ["ok", "ok", "rate_limited"]
    assert await hits(store, 1, T0, name="team:t1", rpm=1) == [0.0]


async def test_rate_adjust_corrects_tokens_in_the_hits_window(store: Store) -> None:
    name = "deployment:openai/gpt-4o"
    assert await hits(store, 1, T0, name=name, tpm=1000, tokens=800) == [0.0]
    assert (await hits(store, 1, T0 + 1, name=name, tpm=1000, tokens=800))[0] > 0
    await store.rate_adjust(name, -700, T0)  # used 100, not 800
    assert await hits(store, 1, T0 + 2, name=name, tpm=1000, tokens=800) == [0.0]  # 900
    await store.rate_adjust(name, 200, T0 + 2)  # used 1000, not 800: now 1100
    assert (await hits(store, 1, T0 + 3, name=name, tpm=1000, tokens=0))[0] > 0
    # a correction never drives the window below zero
    await store.rate_adjust(name, -50_000, T0 + 3)
    assert await hits(store, 1, T0 + 4, name=name, tpm=1000, tokens=1000) == [0.0]
    assert (await hits(store, 1, T0 + 4, name=name, tpm=1000, tokens=1))[0] > 0
    # a window already gone, a name never hit, a zero delta: nothing happens, nothing breaks
    await store.rate_adjust(name, -1000, T0 - 600)
    await store.rate_adjust("provider:never", -5, T0)
    await store.rate_adjust(name, 0, T0)
    # the previous window is corrected, not the current one (the tokens were counted there)
    await store.rate_adjust(name, -1000, T0 + 60)  # no window at T0 + 60 yet: nothing
    assert (await hits(store, 1, T0 + 60, name=name, tpm=1000, tokens=1))[0] > 0  # 1000 * 1.0 + 1
    await store.rate_adjust(name, -1000, T0 + 4)
    assert await hits(store, 1, T0 + 60, name=name, tpm=1000, tokens=1000) == [0.0]


async def test_rate_adjust_gives_back_a_request_never_sent(store: Store) -> None:
    """A hit counted on one limiter but never sent (the next limiter refused) is given back:
    a request delta of -1 and its tokens, in the window it was counted in, never below 0."""
    name = "provider:p"
    assert await hits(store, 2, T0, name=name, rpm=2, tpm=10_000, tokens=100) == [0.0, 0.0]
    assert (await hits(store, 1, T0 + 1, name=name, rpm=2, tpm=10_000, tokens=100))[0] > 0
    await store.rate_adjust(name, -100, T0, requests_delta=-1)
    assert await hits(store, 1, T0 + 2, name=name, rpm=2, tpm=10_000, tokens=100) == [0.0]
    assert (await hits(store, 1, T0 + 3, name=name, rpm=2, tpm=10_000, tokens=100))[0] > 0
    # tokens given back too: 2 requests of 100 counted, a TPM of 300 fits one more after it
    await store.rate_adjust(name, -100, T0, requests_delta=-1)
    assert await hits(store, 1, T0 + 4, name=name, rpm=3, tpm=300, tokens=200) == [0.0]
    # never below zero; a window already gone is left alone
    await store.rate_adjust(name, 0, T0, requests_delta=-50)
    assert await hits(store, 2, T0 + 5, name=name, rpm=2) == [0.0, 0.0]
    await store.rate_adjust(name, 0, T0 - 600, requests_delta=-1)


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_two_replicas_share_a_limiter(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    name = "provider:openai"
    waits = await asyncio.gather(
        *(s.rate_hit(name, 50, 10_000, 100, T0 + 5) for _ in range(60) for s in (a, b))
    )
    assert sum(w == 0.0 for w in waits) == 50
    assert all(w > 0 for w in waits if w != 0.0)
    await a.rate_adjust(name, -2000, T0 + 5)  # 5000 -> 3000 tokens, seen by b
    assert await b.rate_hit(name, 0, 10_000, 7000, T0 + 6) == 0.0
    assert await a.rate_hit(name, 0, 10_000, 1, T0 + 6) > 0


# ---- routing: breaker states shared by replicas ------------------------------------------------


async def test_breaker_publish_and_states(store: Store) -> None:
    now = time.time()
    assert await store.breaker_states([], now) == {}
    assert await store.breaker_states(["p/a", "p/b"], now) == {}
    await store.breaker_publish("p/a", now + 30.25)
    await store.breaker_publish("p/b", now + 10.5)
    assert await store.breaker_states(["p/a", "p/b", "p/c"], now) == {"p/a": now + 30.25,
                                                                      "p/b": now + 10.5}
    assert await store.breaker_states(["p/b"], now) == {"p/b": now + 10.5}
    assert await store.breaker_states(["p/a", "p/b"], now + 20) == {"p/a": now + 30.25}
    assert await store.breaker_states(["p/a", "p/b"], now + 30.25) == {}  # not after now: over
    # the later open-until wins; one already past publishes nothing
    await store.breaker_publish("p/a", now + 5)
    await store.breaker_publish("p/a", now + 40)
    await store.breaker_publish("p/c", now - 1)
    assert await store.breaker_states(["p/a", "p/c"], now) == {"p/a": now + 40}


@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_breaker_state_crosses_replicas_and_expires(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    now = time.time()
    await a.breaker_publish("openai/gpt-4o", now + 0.3)
    await a.breaker_publish("anthropic/claude", now + 60)
    assert await b.breaker_states(["openai/gpt-4o", "anthropic/claude", "x"], now) == {
        "openai/gpt-4o": now + 0.3, "anthropic/claude": now + 60}
    await b.breaker_publish("anthropic/claude", now + 90)  # b's probe failed later
    assert await a.breaker_states(["anthropic/claude"], now) == {"anthropic/claude": now + 90}
    await asyncio.sleep(1.5)  # the key outlives its open-until by 1 s, then Redis drops it
    assert await b.breaker_states(["openai/gpt-4o"], 0.0) == {}


# ---- ledger ------------------------------------------------------------------------------------


def spend(
    ts: float, team_id: str, key_id: str, model: str, cost: int, pt: int = 10, ct: int = 5
) -> SpendRecord:
    return SpendRecord(
        ts=ts, request_id=uuid.uuid4().hex, team_id=team_id, key_id=key_id, model=model,
        provider="p", prompt_tokens=pt, completion_tokens=ct, cached_tokens=0, cost_nano=cost,
        cache="miss", latency_ms=12.5, status=200,
    )


async def test_record_and_query_spend(store: Store) -> None:
    d1, d2, d3 = T0, T0 + DAY, T0 + 2 * DAY
    await store.record_spend([
        spend(d1 + 10, "t1", "k1", "a", 100),
        spend(d1 + 20, "t1", "k1", "a", 200, pt=1, ct=2),
        spend(d1 + 30, "t1", "k2", "b", 300),
        spend(d2 + 5, "t2", "k3", "a", 400),
        spend(d3 + 5, "t1", "k1", "a", 1000),  # outside the range below
        spend(d1 - 5, "t1", "k1", "a", 2000),  # the day before: outside
    ])
    rows = await store.query_spend(d1 + 3600, d2 + 3600, ["team", "model", "day"])  # whole days
    got = [(r.day, r.team_id, r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens,
            r.cost_nano) for r in rows]
    assert got == [
        ("2030-01-07", "t1", None, "a", 2, 11, 7, 300),
        ("2030-01-07", "t1", None, "b", 1, 10, 5, 300),
        ("2030-01-08", "t2", None, "a", 1, 10, 5, 400),
    ]
    rows = await store.query_spend(d1, d3, ["key"])  # end is exclusive: day 3 is not included
    assert [(r.key_id, r.team_id, r.day, r.requests, r.cost_nano) for r in rows] == [
        ("k1", None, None, 2, 300), ("k2", None, None, 1, 300), ("k3", None, None, 1, 400)
    ]
    rows = await store.query_spend(d1, d3, [], team_id="t1")
    assert [(r.requests, r.cost_nano, r.team_id) for r in rows] == [(3, 600, None)]
    rows = await store.query_spend(d1, d3 + 1, ["team"])
    assert [(r.team_id, r.cost_nano) for r in rows] == [("t1", 1600), ("t2", 400)]
    assert await store.query_spend(d3 + DAY, d3 + 2 * DAY, ["team"]) == []


async def test_submit_settles_and_records_in_batches(store: Store) -> None:
    """The request path's write-behind: submit() is fire-and-forget, drain() waits for it."""
    spec = BudgetSpec(10_000_000, "daily")
    await seed(store, team(budget=spec), key(budget=spec))
    for i in range(300):
        assert (await store.admit(adm(T0, reserve=1000, lease=f"S{i}"))).status == "ok"
    for i in range(300):
        store.submit(settlement(f"S{i}", T0 + 1, 7), spend(T0 + 1, "t1", "k1", "m", 7))
    store.submit(settlement("S0", T0 + 2, 7), spend(T0 + 2, "t1", "k1", "m", 0))  # settled twice
    store.submit(None, spend(T0 + 2, "t1", "k1", "m", 5))  # a record without a lease
    await store.drain()
    s = await store.budget(Scope("key", "k1", budget=spec), T0 + 3)
    assert (s.spent_nano, s.reserved_nano) == (300 * 7, 0)
    rows = await store.query_spend(T0, T0 + DAY, ["key"])
    assert [(r.key_id, r.requests, r.cost_nano) for r in rows] == [("k1", 302, 300 * 7 + 5)]


async def test_record_spend_nothing(store: Store) -> None:
    await store.record_spend([])
    assert await store.query_spend(T0, T0 + DAY, ["day"]) == []


# ---- small KV ----------------------------------------------------------------------------------


async def test_set_once(store: Store) -> None:
    assert await store.set_once("alert:a", None) is True
    assert await store.set_once("alert:a", None) is False
    assert await store.set_once("alert:b", 0.2) is True
    assert await store.set_once("alert:b", 0.2) is False
    await asyncio.sleep(0.3)
    assert await store.set_once("alert:b", 0.2) is True
    assert await store.set_once("alert:a", 5) is False


# ---- embedded: durability ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_embedded_close_and_reopen_keeps_everything(open_store: OpenStore) -> None:
    now = time.time()
    spec = BudgetSpec(10_000, "daily")
    s = await open_store()
    await seed(s, team(budget=BudgetSpec(99_999, "monthly")), key(budget=spec, rpm=100))
    assert (await s.admit(adm(now, reserve=1000, lease="L1"))).status == "ok"
    await s.settle(settlement("L1", now, 700))
    assert (await s.admit(adm(now, reserve=1000, lease="L2"))).status == "ok"  # never settled
    await s.record_spend([spend(now, "t1", "k1", "gpt-x", 700)])
    assert await s.set_once("flag", 3600) is True
    await s.close()

    s = await open_store()
    assert (await s.get_key("k1")) == key(budget=spec, rpm=100)
    assert (await s.get_key_by_hash("hash-k1")) is not None
    assert [t.id for t in await s.list_teams()] == ["t1"]
    b = await s.budget(Scope("key", "k1", budget=spec), now)
    assert (b.spent_nano, b.reserved_nano) == (700, 0)  # leases do not survive a restart
    month = await s.budget(Scope("team", "t1", budget=BudgetSpec(99_999, "monthly")), now)
    assert month.spent_nano == 700
    rows = await s.query_spend(now - 1, now + 1, ["key"])
    assert [(r.key_id, r.cost_nano) for r in rows] == [("k1", 700)]
    assert await s.set_once("flag", 3600) is False
    await s.close()


_KILLED_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from gateway.store.base import *
    from gateway.store.embedded import EmbeddedStore

    async def main():
        now = float(sys.argv[2])
        s = EmbeddedStore(sys.argv[1], flush_interval_s=0.05)
        await s.start()
        await s.put_team(TeamRecord(id="t1", name="team"))
        await s.put_key(KeyRecord(id="k1", team_id="t1", key_hash="hash-k1", prefix="sk-tw-k1",
                                  budget=BudgetSpec(10_000, "daily")))
        r = await s.admit(Admission("hash-k1", now, "gpt-x", 10, 1000, "L1", 600.0))
        assert r.status == "ok", r
        await s.settle(Settlement("L1", "k1", "t1", now, 700, 10, 12))
        await s.record_spend([SpendRecord(now, "req-1", "t1", "k1", "gpt-x", "p", 10, 2, 0, 700,
                                          "miss", 1.0, 200)])
        await s.admit(Admission("hash-k1", now, "gpt-x", 10, 1000, "L2", 600.0))
        await asyncio.sleep(0.3)
        print("flushed", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_embedded_survives_kill_9(open_store: OpenStore, tmp_path: Path) -> None:
    now = time.time()
    db = tmp_path / "data" / "tollway.db"
    script = tmp_path / "child.py"
    script.write_text(_KILLED_CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(db), repr(now), stdout=asyncio.subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=15)
        assert line.strip() == b"flushed"
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    s = await open_store()
    k = await s.get_key_by_hash("hash-k1")
    assert k is not None and k.id == "k1"
    b = await s.budget(Scope("key", "k1", budget=BudgetSpec(10_000, "daily")), now)
    assert (b.spent_nano, b.reserved_nano) == (700, 0)
    rows = await s.query_spend(now, now + 1, ["team", "model"])
    assert [(r.team_id, r.model, r.requests, r.cost_nano) for r in rows] == [("t1", "gpt-x", 1, 700)]


# ---- redis: losing and regaining the server ----------------------------------------------------


async def test_redis_unavailable_then_reconnects() -> None:
    async with RedisServer() as srv:
        store = RedisStore(srv.url, prefix="rc:", socket_timeout_s=0.5, connect_timeout_s=0.5)
        await store.start()
        try:
            await seed(store)
            assert (await store.admit(adm(T0))).status == "ok"
            await asyncio.to_thread(srv.stop)
            for op in (
                store.admit(adm(T0)),
                store.get_key("k1"),
                store.settle(settlement("x", T0, 1)),
                store.budget(Scope("key", "k1"), T0),
                store.record_spend([spend(T0, "t1", "k1", "a", 1)]),
                store.rate_hit("provider:p", 10, 0, 1, T0),
                store.rate_adjust("provider:p", -1, T0),
                store.breaker_publish("p/a", time.time() + 30),
                store.breaker_states(["p/a"], time.time()),
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable):
                    await op
                assert time.monotonic() - started < 2.0
            assert await store.ping() is False
            await asyncio.to_thread(srv.start)  # same port, empty (no persistence)
            assert await store.ping() is True
            await seed(store)
            assert (await store.admit(adm(T0))).status == "ok"  # scripts are loaded again
            assert (await store.get_key("k1")) is not None
            assert await store.rate_hit("provider:p", 10, 0, 1, T0) == 0.0  # scripts again
            await store.breaker_publish("p/a", time.time() + 30)
            assert list(await store.breaker_states(["p/a"], time.time())) == ["p/a"]
        finally:
            await store.close()


async def test_embedded_store_is_used_by_default(tmp_path: Path) -> None:
    from gateway.store import StoreSettings, create_store

    s = create_store(StoreSettings(path=str(tmp_path / "x" / "y.db")))
    assert isinstance(s, EmbeddedStore)
    await s.start()
    try:
        assert (tmp_path / "x" / "y.db").exists()
    finally:
        await s.close()
    r = create_store(StoreSettings(backend="redis", url="redis://127.0.0.1:1/0", prefix="p:"))
    assert isinstance(r, RedisStore)


async def test_embedded_store_is_one_process_only(tmp_path: Path) -> None:
    from gateway.store.embedded import EmbeddedStore
    from gateway.store.sqlite_journal import StoreLocked

    first = EmbeddedStore(tmp_path / "one.db")
    await first.start()
    try:
        second = EmbeddedStore(tmp_path / "one.db")
        with pytest.raises(StoreLocked, match="in use by another process"):
            await second.start()
    finally:
        await first.close()
    again = EmbeddedStore(tmp_path / "one.db")  # released on close
    await again.start()
    await again.close()


@pytest.mark.parametrize("max_records", [0, 250])
async def test_redis_ledger_stream_bound(redis_server: RedisServer, max_records: int) -> None:
    """Redis only: the per-request ledger stream keeps every record with
    `ledger_max_records: 0`, and is trimmed to about the bound otherwise (approximately:
    Redis trims whole stream nodes of 100 entries)."""
    import redis.asyncio as aioredis

    prefix = f"lb-{uuid.uuid4().hex[:8]}:"
    s = RedisStore(redis_server.url, prefix=prefix, ledger_max_records=max_records)
    await s.start()
    try:
        for i in range(1000):
            s.submit(None, spend(T0 + i, "t1", "k1", "m", 1))
        await s.drain()
    finally:
        await s.close()
    async with aioredis.from_url(redis_server.url) as r:
        n = await r.xlen(prefix + "ledger")
    if max_records == 0:
        assert n == 1000
    else:
        assert max_records <= n < max_records + 200
