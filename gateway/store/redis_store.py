"""RedisStore: the Store on a Redis server, shared by many gateway processes and replicas.

Each atomic operation is one Lua script (see redis_lua.py) run by EVALSHA: `admit` and `settle`
are one round trip each. Records are JSON; money is integer nano-USD. Times come from the
caller (`Admission.now`, `Settlement.now`), never from the server clock, so every replica and
every test agrees on windows and periods. An unreachable server raises `StoreUnavailable`
quickly (short socket timeouts); the connection pool reconnects by itself when it is back.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from gateway.store import codec, redis_lua
from gateway.store.base import (
    Admission,
    AdmitResult,
    BudgetState,
    GroupBy,
    KeyRecord,
    Scope,
    ScopeKind,
    Settlement,
    SpendRecord,
    SpendRow,
    StoreUnavailable,
    TeamRecord,
    period_bounds,
)
from gateway.store.rules import (
    DAY_S,
    SETTLED_TTL_S,
    TOTAL_PID,
    RawSpend,
    Slot,
    day_range,
    day_str,
    group_spend,
    period_ids,
    rate_info,
    retry_after,
)

log = logging.getLogger("tollway.store.redis")

_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_LEDGER_MAXLEN = 1_000_000
_AGG_TTL_S = 400 * DAY_S
_LEASE_KEYS_EXTRA_TTL_S = DAY_S
_SEP = "\x1f"


class _Unavailable:
    """`with _Unavailable():` turns a lost connection or a timeout into StoreUnavailable."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: Any) -> None:
        if ev is not None and isinstance(ev, _DOWN):
            raise StoreUnavailable(f"redis unavailable: {ev}") from ev


_unavailable = _Unavailable()


class RedisStore:
    def __init__(
        self,
        url: str,
        prefix: str = "tw:",
        socket_timeout_s: float = 1.0,
        connect_timeout_s: float = 0.5,
        max_connections: int = 64,
    ) -> None:
        self._url = url
        self._p = prefix
        self._socket_timeout = socket_timeout_s
        self._connect_timeout = connect_timeout_s
        self._max_connections = max_connections
        self._r: aioredis.Redis | None = None
        self._admit: AsyncScript | None = None
        self._settle: AsyncScript | None = None
        self._budget: AsyncScript | None = None
        self._put_key: AsyncScript | None = None
        self._key_by_hash: AsyncScript | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._r is not None:
            return
        # One immediate retry on a broken connection: after a server restart the pool's idle
        # connections are dead and the first command on each would fail. Timeouts are not
        # retried: the script may have run, and admit is not idempotent.
        # A bounded pool: a burst of requests queues for a connection (briefly) instead of
        # opening thousands of sockets.
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=self._max_connections,
            timeout=self._connect_timeout + self._socket_timeout,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._connect_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self._r = aioredis.Redis.from_pool(pool)
        self._admit = self._r.register_script(redis_lua.ADMIT)
        self._settle = self._r.register_script(redis_lua.SETTLE)
        self._budget = self._r.register_script(redis_lua.BUDGET)
        self._put_key = self._r.register_script(redis_lua.PUT_KEY)
        self._key_by_hash = self._r.register_script(redis_lua.KEY_BY_HASH)
        if not await self.ping():
            log.warning("redis at %s is not reachable yet; the store will keep trying", self._url)

    async def close(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            await r.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self._redis().ping())
        except _DOWN:
            return False

    def _redis(self) -> aioredis.Redis:
        if self._r is None:
            raise RuntimeError("RedisStore is not started")
        return self._r

    # ---- teams and keys ------------------------------------------------------------------------

    async def put_team(self, team: TeamRecord) -> None:
        with _unavailable:
            await self._redis().hset(self._p + "teams", team.id, codec.dump_team(team))

    async def get_team(self, team_id: str) -> TeamRecord | None:
        with _unavailable:
            raw = await self._redis().hget(self._p + "teams", team_id)
        return None if raw is None else codec.load_team(raw)

    async def list_teams(self) -> list[TeamRecord]:
        with _unavailable:
            raws = await self._redis().hvals(self._p + "teams")
        return sorted((codec.load_team(r) for r in raws), key=lambda t: t.id)

    async def put_key(self, key: KeyRecord) -> None:
        assert self._put_key is not None
        with _unavailable:
            await self._put_key(args=[self._p, key.id, key.key_hash, codec.dump_key(key)])

    async def get_key(self, key_id: str) -> KeyRecord | None:
        with _unavailable:
            raw = await self._redis().hget(self._p + "keys", key_id)
        return None if raw is None else codec.load_key(raw)

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        assert self._key_by_hash is not None
        with _unavailable:
            raw = await self._key_by_hash(args=[self._p, key_hash])
        return None if raw is None else codec.load_key(raw)

    async def list_keys(self, team_id: str | None = None) -> list[KeyRecord]:
        with _unavailable:
            raws = await self._redis().hvals(self._p + "keys")
        keys = (codec.load_key(r) for r in raws)
        return sorted((k for k in keys if team_id is None or k.team_id == team_id), key=lambda k: k.id)

    # ---- the hot path --------------------------------------------------------------------------

    async def admit(self, a: Admission) -> AdmitResult:
        assert self._admit is not None
        pids = period_ids(a.now)
        args: list[EncodableT] = [
            self._p, a.key_hash, repr(a.now), a.model, a.est_tokens, a.reserve_nano, a.lease_id,
            repr(a.now + a.lease_ttl_s), 1 if a.check_rate else 0, 1 if a.check_budget else 0,
            pids["daily"], pids["weekly"], pids["monthly"],
            int(a.lease_ttl_s) + _LEASE_KEYS_EXTRA_TTL_S,
        ]
        with _unavailable:
            res: list[Any] = await self._admit(args=args)
        code = res[0]
        if code == 1:
            return AdmitResult("unknown_key")
        key = codec.load_key(res[1])
        team = codec.load_team(res[2])
        if code == 2:
            return AdmitResult("revoked", key, team)
        if code == 3:
            return AdmitResult("expired", key, team)
        if code == 4:
            return AdmitResult("model_not_allowed", key, team, scope="key" if res[3] == b"key" else "team")
        flat: list[int] = res[5]
        req: list[Slot] = []
        tok: list[Slot] = []
        if flat:
            req = [(flat[i], flat[i + 1], flat[i + 2]) for i in (0, 6) if flat[i] >= 0]
            tok = [(flat[i], flat[i + 1], flat[i + 2]) for i in (3, 9) if flat[i] >= 0]
        requests, tokens = rate_info(req, a.now), rate_info(tok, a.now)
        if code == 0:
            return AdmitResult("ok", key, team, requests=requests, tokens=tokens)
        scope: ScopeKind = "key" if res[3] == b"key" else "team"
        if code == 5:
            i = 3 * res[6]
            need = 1 if res[6] % 2 == 0 else a.est_tokens
            return AdmitResult(
                "rate_limited", key, team, scope=scope,
                limit_kind="requests" if res[4] == b"requests" else "tokens",
                retry_after_s=retry_after(flat[i + 1], flat[i + 2], a.now, need, flat[i]),
                requests=requests, tokens=tokens,
            )
        budget = key.budget if scope == "key" else team.budget
        assert budget is not None
        return AdmitResult(
            "over_budget", key, team, scope=scope,
            budget_reset_at=period_bounds(budget.period, a.now)[1],
            requests=requests, tokens=tokens,
        )

    async def settle(self, s: Settlement) -> None:
        assert self._settle is not None
        pids = period_ids(s.now)
        args: list[EncodableT] = [
            self._p, s.lease_id, s.key_id, s.team_id, repr(s.now), s.actual_nano,
            s.actual_tokens - s.est_tokens, pids["daily"], pids["weekly"], pids["monthly"],
            SETTLED_TTL_S,
        ]
        with _unavailable:
            await self._settle(args=args)

    async def budget(self, scope: Scope, now: float) -> BudgetState:
        assert self._budget is not None
        b = scope.budget
        pid = TOTAL_PID if b is None else period_ids(now)[b.period]
        with _unavailable:
            spent, reserved = await self._budget(args=[self._p, scope.name, repr(now), pid])
        if b is None:
            return BudgetState(None, None, int(spent), int(reserved), None, None)
        start, end = period_bounds(b.period, now)
        return BudgetState(b.limit_nano, b.period, int(spent), int(reserved), start, end)

    # ---- ledger --------------------------------------------------------------------------------

    async def record_spend(self, records: list[SpendRecord]) -> None:
        if not records:
            return
        p = self._p
        aggs: set[str] = set()
        with _unavailable:
            async with self._redis().pipeline(transaction=True) as pipe:
                for r in records:
                    pipe.xadd(
                        p + "ledger",
                        {
                            "ts": repr(r.ts), "request_id": r.request_id, "team_id": r.team_id,
                            "key_id": r.key_id, "model": r.model, "provider": r.provider,
                            "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                            "cached_tokens": r.cached_tokens, "cost_nano": r.cost_nano,
                            "cache": r.cache, "latency_ms": repr(r.latency_ms), "status": r.status,
                        },
                        maxlen=_LEDGER_MAXLEN,
                        approximate=True,
                    )
                    agg = p + "agg:" + day_str(r.ts)
                    aggs.add(agg)
                    base = _SEP.join((r.team_id, r.key_id, r.model, ""))
                    pipe.hincrby(agg, base + "n", 1)
                    pipe.hincrby(agg, base + "p", r.prompt_tokens)
                    pipe.hincrby(agg, base + "c", r.completion_tokens)
                    pipe.hincrby(agg, base + "$", r.cost_nano)
                for agg in aggs:
                    pipe.expire(agg, _AGG_TTL_S)
                await pipe.execute()

    async def query_spend(
        self, start: float, end: float, group_by: list[GroupBy], team_id: str | None = None
    ) -> list[SpendRow]:
        """Spend of the whole UTC days overlapping [start, end), grouped."""
        lo, hi = day_range(start, end)
        days = [day_str(lo + i * DAY_S) for i in range(round((hi - lo) / DAY_S))]
        if not days:
            return []
        with _unavailable:
            async with self._redis().pipeline(transaction=False) as pipe:
                for d in days:
                    pipe.hgetall(self._p + "agg:" + d)
                results: list[dict[bytes, bytes]] = await pipe.execute()
        raw: list[RawSpend] = []
        for day, h in zip(days, results, strict=True):
            groups: dict[tuple[str, str, str], dict[str, int]] = {}
            for field, value in h.items():
                team, key, model, metric = field.decode().split(_SEP)
                if team_id is not None and team != team_id:
                    continue
                groups.setdefault((team, key, model), {})[metric] = int(value)
            for (team, key, model), m in groups.items():
                raw.append((team, key, model, day, m.get("n", 0), m.get("p", 0), m.get("c", 0),
                            m.get("$", 0)))
        return group_spend(raw, group_by)

    # ---- small KV ------------------------------------------------------------------------------

    async def set_once(self, key: str, ttl_s: float | None) -> bool:
        px = None if ttl_s is None else max(1, round(ttl_s * 1000))
        with _unavailable:
            return bool(await self._redis().set(self._p + "once:" + key, b"1", nx=True, px=px))

