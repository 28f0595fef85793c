"""RedisStore: the Store on a Redis server, shared by many gateway processes and replicas.

Each atomic operation is one Lua script (see redis_lua.py) run by EVALSHA: `admit` and `settle`
are one round trip each. Records are JSON; money is integer nano-USD. Times come from the
caller (`Admission.now`, `Settlement.now`), never from the server clock, so every replica and
every test agrees on windows and periods. An unreachable server raises `StoreUnavailable`
quickly (short socket timeouts); the connection pool reconnects by itself when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from typing import Any

import orjson
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
    CacheKind,
    CacheStats,
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
    hit_wait,
    period_ids,
    rate_info,
    retry_after,
    window_index,
)

log = logging.getLogger("tollway.store.redis")

_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
_LEDGER_MAXLEN = 10_000_000
_AGG_TTL_S = 400 * DAY_S
_LEASE_KEYS_EXTRA_TTL_S = DAY_S
_SEP = "\x1f"
_BATCH = 1000
_FLUSH_EVERY_S = 0.05
_MAX_QUEUE = 200_000
_CLOSE_DRAIN_S = 5.0
_BREAKER_EXTRA_MS = 1000
"""A published breaker state outlives its open-until this long (clock skew between hosts)."""


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
        ledger_max_records: int = _LEDGER_MAXLEN,
    ) -> None:
        self._url = url
        self._ledger_max = ledger_max_records
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
        self._ledger_script: AsyncScript | None = None
        self._rate_hit: AsyncScript | None = None
        self._rate_adjust: AsyncScript | None = None
        self._breaker_publish: AsyncScript | None = None
        self._queue: list[tuple[Settlement | None, SpendRecord]] = []
        self._batch: tuple[str, list[tuple[Settlement | None, SpendRecord]]] | None = None
        """The batch being written; kept (same id) until Redis confirmed it, so a retry after a
        lost reply is recognised and not applied twice."""
        self._counts: dict[tuple[str, str], int] = {}
        """Cache-stats counts not written yet: (team, h | m | s) -> n. Written by the flusher
        (every 50 ms, one pipeline) and before this replica reads the stats."""
        self._wake = asyncio.Event()
        self._stopping = False
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()

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
        self._ledger_script = self._r.register_script(redis_lua.LEDGER)
        self._rate_hit = self._r.register_script(redis_lua.RATE_HIT)
        self._rate_adjust = self._r.register_script(redis_lua.RATE_ADJUST)
        self._breaker_publish = self._r.register_script(redis_lua.BREAKER_PUBLISH)
        self._wake = asyncio.Event()
        self._stopping = False
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        if not await self.ping():
            log.warning("redis at %s is not reachable yet; the store will keep trying", self._url)

    async def close(self) -> None:
        if self._flusher is not None:
            # No cancel: the flusher finishes the batch it is writing, then stops.
            self._stopping = True
            self._wake.set()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._r is not None:
            try:
                await asyncio.wait_for(self._drain_all(), _CLOSE_DRAIN_S)
            except (TimeoutError, StoreUnavailable):
                log.error("redis unreachable at shutdown: %d settlements/spend records lost",
                          len(self._queue))
        r, self._r = self._r, None
        if r is not None:
            await r.aclose()

    # ---- batched settle + ledger (the request path's write-behind) ------------------------------

    def submit(self, settlement: Settlement | None, record: SpendRecord) -> None:
        self._queue.append((settlement, record))
        n = len(self._queue)
        if n >= _BATCH:
            self._wake.set()
            if n > _MAX_QUEUE:
                del self._queue[: n - _MAX_QUEUE]
                log.error("redis unavailable: dropped %d oldest spend records", n - _MAX_QUEUE)

    async def drain(self) -> None:
        await self._drain_all()

    async def _drain_all(self) -> None:
        await self._flush_counts()
        while self._queue or self._batch is not None:
            await self._flush_batch()

    async def _flush_counts(self) -> None:
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
        try:
            async with self._redis().pipeline(transaction=False) as pipe:
                for (team, field), n in counts.items():
                    pipe.hincrby(self._p + "cn:" + team, field, n)
                with _unavailable:
                    await pipe.execute()
        except BaseException:
            for k, n in counts.items():  # written again next time (a lost reply may count twice)
                self._counts[k] = self._counts.get(k, 0) + n
            raise

    def _count(self, team: str, field: str) -> None:
        k = (team, field)
        self._counts[k] = self._counts.get(k, 0) + 1

    async def _flush_loop(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(_FLUSH_EVERY_S):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._flush_counts()
                while (self._queue or self._batch is not None) and not self._stopping:
                    await self._flush_batch()
            except StoreUnavailable as e:
                log.warning("redis unavailable; %d settlements/spend records queued: %s",
                            len(self._queue), e)
                await asyncio.sleep(0.5)
            except Exception:
                log.exception("flushing settlements to redis failed; will retry")
                await asyncio.sleep(0.5)

    async def _flush_batch(self) -> None:
        async with self._flush_lock:
            if self._batch is None:
                items = self._queue[:_BATCH]
                if not items:
                    return
                del self._queue[: len(items)]
                self._batch = (secrets.token_hex(12), items)
            batch_id, items = self._batch
            async with self._redis().pipeline(transaction=False) as pipe:
                for s, _ in items:
                    if s is not None:
                        assert self._settle is not None
                        await self._settle(args=self._settle_args(s), client=pipe)
                await self._ledger_call([r for _, r in items], pipe, batch_id)
                with _unavailable:
                    await pipe.execute()
            self._batch = None

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
            int(a.lease_ttl_s) + _LEASE_KEYS_EXTRA_TTL_S, 1 if a.charge else 0,
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

    def _settle_args(self, s: Settlement) -> list[EncodableT]:
        pids = period_ids(s.now)
        return [
            self._p, s.lease_id, s.key_id, s.team_id, repr(s.now), s.actual_nano,
            s.actual_tokens - s.est_tokens, pids["daily"], pids["weekly"], pids["monthly"],
            SETTLED_TTL_S,
        ]

    async def settle(self, s: Settlement) -> None:
        assert self._settle is not None
        with _unavailable:
            await self._settle(args=self._settle_args(s))

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

    # ---- routing: limiters and breakers shared by every replica --------------------------------

    async def rate_hit(self, name: str, rpm: int, tpm: int, tokens: int, now: float) -> float:
        if rpm <= 0 and tpm <= 0:
            return 0.0
        assert self._rate_hit is not None
        tokens = max(0, tokens)
        args: list[EncodableT] = [self._p, name, repr(now), max(0, rpm), max(0, tpm), tokens]
        with _unavailable:
            res: list[int] = await self._rate_hit(args=args)
        if res[0] == 1:
            return 0.0
        refused = [(res[i + 1], res[i + 2], need, limit)
                   for i, need, limit in ((1, 1, rpm), (4, tokens, tpm)) if res[i] == 1]
        return hit_wait(refused, now)

    async def rate_adjust(
        self, name: str, tokens_delta: int, now: float, requests_delta: int = 0
    ) -> None:
        if not tokens_delta and not requests_delta:
            return
        assert self._rate_adjust is not None
        with _unavailable:
            await self._rate_adjust(
                args=[self._p, name, window_index(now), tokens_delta, requests_delta]
            )

    async def breaker_publish(self, name: str, opened_until_unix: float) -> None:
        remaining = opened_until_unix - time.time()
        if remaining <= 0:
            return
        assert self._breaker_publish is not None
        px = math.ceil(remaining * 1000) + _BREAKER_EXTRA_MS
        with _unavailable:
            await self._breaker_publish(args=[self._p, name, repr(opened_until_unix), px])

    async def breaker_states(self, names: list[str], now_unix: float) -> dict[str, float]:
        if not names:
            return {}
        with _unavailable:
            raws: list[bytes | str | None] = await self._redis().mget(
                [self._p + "br:" + n for n in names]
            )
        out: dict[str, float] = {}
        for name, raw in zip(names, raws, strict=True):
            if raw is not None:
                until = float(raw)
                if until > now_unix:
                    out[name] = until
        return out

    # ---- ledger --------------------------------------------------------------------------------

    async def record_spend(self, records: list[SpendRecord]) -> None:
        if not records:
            return
        with _unavailable:
            await self._ledger_call(records, None, secrets.token_hex(12))

    async def _ledger_call(self, records: list[SpendRecord], client: Any, batch_id: str) -> Any:
        assert self._ledger_script is not None
        args: list[EncodableT] = [self._p, self._ledger_max, _AGG_TTL_S, batch_id]
        for r in records:
            args.append(
                orjson.dumps(
                    {
                        "ts": r.ts, "id": r.request_id, "team": r.team_id, "key": r.key_id,
                        "model": r.model, "provider": r.provider, "p": r.prompt_tokens,
                        "c": r.completion_tokens, "cached": r.cached_tokens, "cost": r.cost_nano,
                        "cache": r.cache, "lat": r.latency_ms, "status": r.status,
                        "day": day_str(r.ts),
                    }
                )
            )
        return await self._ledger_script(args=args, client=client)

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


    # ---- response cache ------------------------------------------------------------------------
    # Entries: `c:<key>` (SET PX). Index: the set `ci:<team>\x1f<model>` of keys, and the set
    # `cix` of those index names. Counters: the hash `cn:<team>` (h, m: exact hits and misses; s:
    # semantic hits), written behind in one pipeline every 50 ms (and before this replica reads
    # them), so a lookup costs one round trip; a crash loses at most the last 50 ms of counts.
    # Entries expire by themselves; index members of expired entries are pruned by stats and purge.

    async def cache_get(
        self, key: str, team: str | None = None, kind: CacheKind = "exact"
    ) -> bytes | None:
        with _unavailable:
            raw: Any = await self._redis().get(self._p + "c:" + key)
        if team is not None:  # counted write-behind (see _counts)
            if kind == "exact":
                self._count(team, "h" if raw is not None else "m")
            elif raw is not None:
                self._count(team, "s")
        return None if raw is None else bytes(raw)

    async def cache_count(self, team: str, hit: bool) -> None:
        self._count(team, "h" if hit else "m")

    async def cache_put(self, key: str, value: bytes, ttl_s: float, team: str, model: str) -> None:
        index = self._p + "ci:" + team + _SEP + model
        with _unavailable:
            async with self._redis().pipeline(transaction=False) as pipe:
                pipe.set(self._p + "c:" + key, value, px=max(1, round(ttl_s * 1000)))
                pipe.sadd(index, key)
                pipe.sadd(self._p + "cix", team + _SEP + model)
                await pipe.execute()

    async def _cache_indexes(self, team: str | None, model: str | None) -> list[tuple[str, str]]:
        """The (team, model) indexes matching the filters."""
        names: Any = await self._redis().smembers(self._p + "cix")
        out = []
        for n in names:
            t, _, mdl = n.decode().partition(_SEP)
            if (team is None or t == team) and (model is None or mdl == model):
                out.append((t, mdl))
        return out

    async def cache_purge(self, team: str | None = None, model: str | None = None) -> int:
        r = self._redis()
        n = 0
        with _unavailable:
            for t, mdl in await self._cache_indexes(team, model):
                index = self._p + "ci:" + t + _SEP + mdl
                keys: Any = await r.smembers(index)
                if keys:
                    n += int(await r.unlink(*[self._p + "c:" + k.decode() for k in keys]))
                async with r.pipeline(transaction=False) as pipe:
                    pipe.unlink(index)
                    pipe.srem(self._p + "cix", t + _SEP + mdl)
                    await pipe.execute()
        return n

    # The feed is the stream `cf` (field `e`), capped approximately at `max_len` entries.

    async def cache_feed_add(self, entry: bytes, max_len: int) -> None:
        with _unavailable:
            await self._redis().xadd(self._p + "cf", {"e": entry}, maxlen=max_len, approximate=True)

    async def cache_feed_read(self, cursor: str | None, count: int) -> tuple[list[bytes], str | None]:
        start = "-" if cursor is None else "(" + cursor
        with _unavailable:
            rows: Any = await self._redis().xrange(self._p + "cf", min=start, max="+", count=count)
        out: list[bytes] = []
        for rid, fields in rows:
            cursor = rid.decode() if isinstance(rid, bytes) else str(rid)
            value = fields.get(b"e", fields.get("e"))
            if value is not None:
                out.append(bytes(value))
        return out, cursor

    async def cache_stats(self, team: str | None = None) -> dict[str, CacheStats]:
        await self._flush_counts()  # this replica's counts not written yet
        r = self._redis()
        out: dict[str, CacheStats] = {}
        with _unavailable:
            for t, mdl in await self._cache_indexes(team, None):
                index = self._p + "ci:" + t + _SEP + mdl
                members: Any = await r.smembers(index)
                keys = sorted(members)
                if not keys:
                    continue
                async with r.pipeline(transaction=False) as pipe:
                    for k in keys:
                        pipe.strlen(self._p + "c:" + k.decode())
                    sizes: list[int] = await pipe.execute()
                st = out.setdefault(t, CacheStats())
                gone = [k for k, size in zip(keys, sizes, strict=True) if not size]
                st.entries += len(keys) - len(gone)
                st.bytes += sum(sizes)
                if gone:
                    await r.srem(index, *gone)
            if team is not None:
                teams = [team]
            else:
                teams = [
                    k.decode()[len(self._p) + 3:]
                    async for k in r.scan_iter(match=self._p + "cn:*", count=1000)
                ]
            for t in teams:
                counts: Any = await r.hgetall(self._p + "cn:" + t)
                if counts:
                    st = out.setdefault(t, CacheStats())
                    c = CacheStats.from_counts(
                        int(counts.get(b"h", 0)), int(counts.get(b"m", 0)), int(counts.get(b"s", 0))
                    )
                    st.hits, st.misses, st.semantic_hits = c.hits, c.misses, c.semantic_hits
        return out
