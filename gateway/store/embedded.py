"""EmbeddedStore: the whole store in this process's memory, made durable in a local SQLite file.

For a single gateway process. Teams, keys and set_once flags are written through to SQLite
before the call returns. Spend counters and the ledger are buffered in memory and flushed by a
background task every `flush_interval_s` and on `close()`: a kill -9 loses at most the last
interval of spend, a graceful close loses nothing. Leases and rate windows live in memory only
(a crash releases every lease, which is what a lease is for).

`admit` and `settle` are plain Python with no await inside: the event loop makes them atomic.
All SQLite work runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from gateway.store import codec
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
    TeamRecord,
    period_bounds,
)
from gateway.store.rules import (
    DAY_S,
    SETTLED_TTL_S,
    TOTAL_PID,
    Slot,
    day_range,
    group_spend,
    hit_wait,
    period_ids,
    rate_info,
    retry_after,
    window_index,
)
from gateway.store.sqlite_journal import SqliteJournal

log = logging.getLogger("tollway.store.embedded")
T = TypeVar("T")

_PERIOD_SPAN_S = {"d": DAY_S, "w": 7 * DAY_S, "m": 31 * DAY_S}
_KEEP_OLD_PERIODS_S = 2 * DAY_S
"""Spend of a period that ended this long ago is no longer kept in memory (it stays on disk)."""
_HOUSEKEEPING_S = 60.0


@dataclass(slots=True)
class _Lease:
    amount: int
    expiry: float
    window: int
    """The rate window the lease's tokens were counted in (TPM correction at settle)."""
    pids: tuple[str, str, str]
    """Daily, weekly and monthly period ids at admission: the spend lands there."""


@dataclass(slots=True)
class _ScopeState:
    requests: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)
    leases: dict[str, _Lease] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)
    reserved: int = 0

    def drop_expired(self, now: float) -> None:
        heap, leases = self.heap, self.leases
        while heap and heap[0][0] <= now:
            expiry, lid = heapq.heappop(heap)
            lease = leases.get(lid)
            if lease is not None and lease.expiry == expiry:
                del leases[lid]
                self.reserved -= lease.amount

    def compact(self) -> None:
        """Forget heap entries of leases already settled."""
        if len(self.heap) > 2 * len(self.leases) + 64:
            self.heap = [(v.expiry, k) for k, v in self.leases.items()]
            heapq.heapify(self.heap)


@dataclass(slots=True)
class _Limiter:
    """The windows of one named limiter (rate_hit): requests and tokens per 60 s window."""

    requests: dict[int, int] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)


_CacheEntry = tuple[bytes, float, str, str]
"""(value, expiry, team, model): a plain tuple of atomic values, which the garbage collector stops
tracking after one pass, so a full collection does not walk every cached answer."""
_VALUE: Final = 0
_EXPIRY: Final = 1
_TEAM: Final = 2
_MODEL: Final = 3


def _count(win: dict[int, int], w: int, value: int) -> None:
    if w not in win:
        for old in [k for k in win if k < w - 1]:
            del win[old]
    win[w] = value


class EmbeddedStore:
    """The default Store: no other server needed. Records returned by `admit` are shared with the
    store's memory and must be treated as read-only; `get_*`/`list_*` return detached copies."""

    def __init__(
        self, path: str | Path, flush_interval_s: float = 1.0, cache_max_bytes: int = 256 * 1024 * 1024
    ) -> None:
        self._path = Path(path)
        self._interval = flush_interval_s
        self._executor: ThreadPoolExecutor | None = None
        self._journal = SqliteJournal(self._path)
        self._started = False
        self._stop = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._teams: dict[str, TeamRecord] = {}
        self._keys: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, str] = {}
        self._scopes: dict[str, _ScopeState] = {}
        self._spent: dict[tuple[str, str], int] = {}
        self._pending_spend: dict[tuple[str, str], int] = {}
        self._ledger: list[SpendRecord] = []
        self._settled: dict[str, float] = {}
        self._kv: dict[str, float | None] = {}
        self._max_now = 0.0
        self._limiters: dict[str, _Limiter] = {}
        self._breakers: dict[str, float] = {}
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._cache_bytes = 0
        self._cache_max_bytes = cache_max_bytes
        self._cache_counts: dict[str, list[int]] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-sqlite")
        now = time.time()
        # Spend of current periods, and of those that ended lately (late settles land there).
        teams, keys, spend, kv = await self._run(self._journal.open, now - _KEEP_OLD_PERIODS_S, now)
        for t in teams:
            self._teams[t.id] = t
        for k in keys:
            self._keys[k.id] = k
            self._by_hash[k.key_hash] = k.id
        self._spent = spend
        self._kv = kv
        self._stop = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._flush_loop())
        self._started = True

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stop.set()
        if self._loop_task is not None:
            await self._loop_task
        try:
            await self._flush()
        finally:
            await self._run(self._journal.close)
            assert self._executor is not None
            self._executor.shutdown(wait=True)
            self._executor = None

    async def ping(self) -> bool:
        return self._started

    # ---- teams and keys ------------------------------------------------------------------------

    async def put_team(self, team: TeamRecord) -> None:
        doc = codec.dump_team(team)
        rec = codec.load_team(doc)
        await self._run(self._journal.put_team, rec.id, doc.decode())
        self._teams[rec.id] = rec

    async def get_team(self, team_id: str) -> TeamRecord | None:
        t = self._teams.get(team_id)
        return None if t is None else codec.copy_team(t)

    async def list_teams(self) -> list[TeamRecord]:
        return [codec.copy_team(self._teams[i]) for i in sorted(self._teams)]

    async def put_key(self, key: KeyRecord) -> None:
        doc = codec.dump_key(key)
        rec = codec.load_key(doc)
        await self._run(self._journal.put_key, rec, doc.decode())
        old = self._keys.get(rec.id)
        if old is not None and old.key_hash != rec.key_hash and self._by_hash.get(old.key_hash) == rec.id:
            del self._by_hash[old.key_hash]
        self._keys[rec.id] = rec
        self._by_hash[rec.key_hash] = rec.id

    async def get_key(self, key_id: str) -> KeyRecord | None:
        k = self._keys.get(key_id)
        return None if k is None else codec.copy_key(k)

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None:
        kid = self._by_hash.get(key_hash)
        return None if kid is None else codec.copy_key(self._keys[kid])

    async def list_keys(self, team_id: str | None = None) -> list[KeyRecord]:
        return [
            codec.copy_key(self._keys[i])
            for i in sorted(self._keys)
            if team_id is None or self._keys[i].team_id == team_id
        ]

    # ---- the hot path --------------------------------------------------------------------------

    async def admit(self, a: Admission) -> AdmitResult:
        return self.admit_now(a)

    def admit_now(self, a: Admission) -> AdmitResult:
        """`admit` without the coroutine: synchronous, so atomic under the event loop."""
        kid = self._by_hash.get(a.key_hash)
        if kid is None:
            return AdmitResult("unknown_key")
        key = self._keys[kid]
        team = self._teams.get(key.team_id)
        if team is None:
            return AdmitResult("unknown_key")
        now = a.now
        if now > self._max_now:
            self._max_now = now
        if key.revoked_at is not None:
            return AdmitResult("revoked", key, team)
        if key.expires_at is not None and key.expires_at <= now:
            return AdmitResult("expired", key, team)
        if key.allowed_models is not None and a.model not in key.allowed_models:
            return AdmitResult("model_not_allowed", key, team, scope="key")
        if team.allowed_models is not None and a.model not in team.allowed_models:
            return AdmitResult("model_not_allowed", key, team, scope="team")
        kname, tname = "key:" + kid, "team:" + team.id
        ks, ts = self._scope(kname), self._scope(tname)
        w = window_index(now)
        # Rate limits: gather every limited window first, then refuse on the first that is full.
        counted: list[tuple[dict[int, int], int]] = []
        req_slots: list[Slot] = []
        tok_slots: list[Slot] = []
        if a.check_rate:
            frac = 1 - (now - w * 60) / 60
            est = a.est_tokens
            wp = w - 1
            refusal: tuple[ScopeKind, str, int, int, int, int] | None = None
            scope_kind: ScopeKind
            for scope_kind, rpm, tpm, st in (("key", key.rpm, key.tpm, ks), ("team", team.rpm, team.tpm, ts)):
                if rpm is not None:
                    win = st.requests
                    prev, cur = win.get(wp, 0), win.get(w, 0)
                    req_slots.append((rpm, prev, cur))
                    counted.append((win, cur + 1))
                    if refusal is None and prev * frac + cur + 1 > rpm:
                        refusal = (scope_kind, "requests", prev, cur, 1, rpm)
                if tpm is not None:
                    win = st.tokens
                    prev, cur = win.get(wp, 0), win.get(w, 0)
                    tok_slots.append((tpm, prev, cur))
                    counted.append((win, cur + est))
                    if refusal is None and prev * frac + cur + est > tpm:
                        refusal = (scope_kind, "tokens", prev, cur, est, tpm)
            if refusal is not None:
                sk, kind, prev, cur, need, limit = refusal
                return AdmitResult(
                    "rate_limited", key, team, scope=sk,
                    limit_kind="requests" if kind == "requests" else "tokens",
                    retry_after_s=retry_after(prev, cur, now, need, limit),
                    requests=rate_info(req_slots, now), tokens=rate_info(tok_slots, now),
                )
        # Budgets: spent in the current period + live reservations + this one <= limit.
        if ks.heap and ks.heap[0][0] <= now:
            ks.drop_expired(now)
        if ts.heap and ts.heap[0][0] <= now:
            ts.drop_expired(now)
        pids = period_ids(now)
        if a.check_budget:
            for scope_kind, budget, st, name in (
                ("key", key.budget, ks, kname), ("team", team.budget, ts, tname)
            ):
                if budget is None:
                    continue
                spent = self._spent.get((name, pids[budget.period]), 0)
                if spent + st.reserved + a.reserve_nano > budget.limit_nano:
                    return AdmitResult(
                        "over_budget", key, team, scope=scope_kind,
                        budget_reset_at=period_bounds(budget.period, now)[1],
                        requests=rate_info(req_slots, now), tokens=rate_info(tok_slots, now),
                    )
        # Admitted: count the hits and hold the lease against both scopes (or, for a known
        # cost, spend it now).
        for win, value in counted:
            if w not in win:
                _count(win, w, value)
            else:
                win[w] = value
        if a.charge:
            if a.reserve_nano:
                for name in (kname, tname):
                    for pid in (pids["daily"], pids["weekly"], pids["monthly"], TOTAL_PID):
                        self._add_spend(name, pid, a.reserve_nano)
        else:
            lease = _Lease(a.reserve_nano, now + a.lease_ttl_s, w,
                           (pids["daily"], pids["weekly"], pids["monthly"]))
            for st in (ks, ts):
                if a.lease_id not in st.leases:
                    st.leases[a.lease_id] = lease
                    heapq.heappush(st.heap, (lease.expiry, a.lease_id))
                    st.reserved += lease.amount
        if not counted:
            return AdmitResult("ok", key, team)
        est = a.est_tokens
        return AdmitResult(
            "ok", key, team,
            requests=rate_info([(lim, p, c + 1) for lim, p, c in req_slots], now) if req_slots else None,
            tokens=rate_info([(lim, p, c + est) for lim, p, c in tok_slots], now) if tok_slots else None,
        )

    async def settle(self, s: Settlement) -> None:
        self.settle_now(s)

    def submit(self, settlement: Settlement | None, record: SpendRecord) -> None:
        # In memory both are immediate; the journal flush makes them durable within a second.
        if settlement is not None:
            self.settle_now(settlement)
        self._ledger.append(record)

    async def drain(self) -> None:
        return None

    def settle_now(self, s: Settlement) -> None:
        if s.lease_id in self._settled:
            return
        self._settled[s.lease_id] = s.now + SETTLED_TTL_S
        if s.now > self._max_now:
            self._max_now = s.now
        delta = s.actual_tokens - s.est_tokens
        for name in ("key:" + s.key_id, "team:" + s.team_id):
            st = self._scopes.get(name)
            lease = st.leases.pop(s.lease_id, None) if st is not None else None
            if st is not None and lease is not None:
                st.reserved -= lease.amount
                st.compact()
                pids, w = lease.pids, lease.window
            else:
                p = period_ids(s.now)
                pids, w = (p["daily"], p["weekly"], p["monthly"]), window_index(s.now)
            if s.actual_nano:
                for pid in (*pids, TOTAL_PID):
                    self._add_spend(name, pid, s.actual_nano)
            if delta and st is not None and w in st.tokens:
                st.tokens[w] = max(0, st.tokens[w] + delta)

    async def budget(self, scope: Scope, now: float) -> BudgetState:
        st = self._scopes.get(scope.name)
        if st is not None:
            st.drop_expired(now)
        reserved = st.reserved if st is not None else 0
        b = scope.budget
        if b is None:
            return BudgetState(None, None, self._spent.get((scope.name, TOTAL_PID), 0), reserved,
                               None, None)
        start, end = period_bounds(b.period, now)
        spent = self._spent.get((scope.name, period_ids(now)[b.period]), 0)
        return BudgetState(b.limit_nano, b.period, spent, reserved, start, end)

    def _scope(self, name: str) -> _ScopeState:
        st = self._scopes.get(name)
        if st is None:
            st = self._scopes[name] = _ScopeState()
        return st

    def _add_spend(self, scope: str, pid: str, nano: int) -> None:
        k = (scope, pid)
        self._spent[k] = self._spent.get(k, 0) + nano
        self._pending_spend[k] = self._pending_spend.get(k, 0) + nano

    # ---- routing: limiters and breakers (one process: in memory only) --------------------------

    async def rate_hit(self, name: str, rpm: int, tpm: int, tokens: int, now: float) -> float:
        return self.rate_hit_now(name, rpm, tpm, tokens, now)

    def rate_hit_now(self, name: str, rpm: int, tpm: int, tokens: int, now: float) -> float:
        """`rate_hit` without the coroutine: synchronous, so atomic under the event loop."""
        if rpm <= 0 and tpm <= 0:
            return 0.0
        tokens = max(0, tokens)
        lim = self._limiters.get(name)
        if lim is None:
            lim = self._limiters[name] = _Limiter()
        w = window_index(now)
        frac = 1 - (now - w * 60) / 60
        counted: list[tuple[dict[int, int], int, int]] = []
        refused: list[tuple[int, int, int, int]] = []
        for limit, win, need in ((rpm, lim.requests, 1), (tpm, lim.tokens, tokens)):
            if limit <= 0:
                continue
            prev, cur = win.get(w - 1, 0), win.get(w, 0)
            counted.append((win, cur, need))
            if prev * frac + cur + need > limit:
                refused.append((prev, cur, need, limit))
        if refused:
            return hit_wait(refused, now)
        for win, cur, need in counted:
            _count(win, w, cur + need)
        return 0.0

    async def rate_adjust(
        self, name: str, tokens_delta: int, now: float, requests_delta: int = 0
    ) -> None:
        lim = self._limiters.get(name)
        if lim is None:
            return
        w = window_index(now)
        for delta, win in ((tokens_delta, lim.tokens), (requests_delta, lim.requests)):
            if delta and w in win:
                win[w] = max(0, win[w] + delta)

    async def breaker_publish(self, name: str, opened_until_unix: float) -> None:
        if opened_until_unix <= time.time():
            return
        if opened_until_unix > self._breakers.get(name, 0.0):
            self._breakers[name] = opened_until_unix

    async def breaker_states(self, names: list[str], now_unix: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for name in names:
            until = self._breakers.get(name)
            if until is not None and until > now_unix:
                out[name] = until
        return out

    # ---- ledger --------------------------------------------------------------------------------

    async def record_spend(self, records: list[SpendRecord]) -> None:
        self._ledger.extend(records)

    async def query_spend(
        self, start: float, end: float, group_by: list[GroupBy], team_id: str | None = None
    ) -> list[SpendRow]:
        """Spend of the whole UTC days overlapping [start, end), grouped."""
        await self._flush()
        lo, hi = day_range(start, end)
        raw = await self._run(self._journal.query_spend, lo, hi, team_id)
        return group_spend(raw, group_by)

    # ---- small KV ------------------------------------------------------------------------------

    async def set_once(self, key: str, ttl_s: float | None) -> bool:
        now = time.time()
        if key in self._kv:
            exp = self._kv[key]
            if exp is None or exp > now:
                return False
        exp = None if ttl_s is None else now + ttl_s
        self._kv[key] = exp
        try:
            await self._run(self._journal.put_flag, key, exp)
        except BaseException:
            self._kv.pop(key, None)
            raise
        return True

    # ---- response cache (memory only: a restart empties it) -----------------------------------

    def _cache_drop(self, key: str) -> None:
        e = self._cache.pop(key, None)
        if e is not None:
            self._cache_bytes -= len(e[_VALUE])

    async def cache_get(
        self, key: str, team: str | None = None, kind: CacheKind = "exact"
    ) -> bytes | None:
        e = self._cache.get(key)
        if e is not None and e[_EXPIRY] <= time.time():
            self._cache_drop(key)
            e = None
        if e is not None:
            self._cache.move_to_end(key)  # least recently used goes first
        if team is not None:
            counts = self._cache_counts.setdefault(team, [0, 0, 0])  # exact hits, misses, semantic hits
            if kind == "exact":
                counts[0 if e is not None else 1] += 1
            elif e is not None:
                counts[2] += 1
        return None if e is None else e[_VALUE]

    async def cache_count(self, team: str, hit: bool) -> None:
        counts = self._cache_counts.get(team)
        if counts is None:
            counts = self._cache_counts[team] = [0, 0, 0]  # exact hits, misses, semantic hits
        counts[0 if hit else 1] += 1

    async def cache_put(self, key: str, value: bytes, ttl_s: float, team: str, model: str) -> None:
        self._cache_drop(key)
        if len(value) > self._cache_max_bytes:
            return
        self._cache[key] = (value, time.time() + ttl_s, team, model)
        self._cache_bytes += len(value)
        while self._cache_bytes > self._cache_max_bytes:
            self._cache_drop(next(iter(self._cache)))

    async def cache_purge(self, team: str | None = None, model: str | None = None) -> int:
        doomed = [
            k for k, e in self._cache.items()
            if (team is None or e[_TEAM] == team) and (model is None or e[_MODEL] == model)
        ]
        for k in doomed:
            self._cache_drop(k)
        return len(doomed)

    async def cache_feed_add(self, entry: bytes, max_len: int) -> None:
        return None  # one process: its own index already has the entry

    async def cache_feed_read(self, cursor: str | None, count: int) -> tuple[list[bytes], str | None]:
        return [], cursor

    async def cache_stats(self, team: str | None = None) -> dict[str, CacheStats]:
        now = time.time()
        out: dict[str, CacheStats] = {}
        for t, (hits, misses, semantic_hits) in self._cache_counts.items():
            if team is None or t == team:
                out[t] = CacheStats.from_counts(hits, misses, semantic_hits)
        for k in [k for k, e in self._cache.items() if e[_EXPIRY] <= now]:
            self._cache_drop(k)
        for e in self._cache.values():
            if team is None or e[_TEAM] == team:
                st = out.setdefault(e[_TEAM], CacheStats())
                st.entries += 1
                st.bytes += len(e[_VALUE])
        return out

    # ---- background flush ----------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        last_housekeeping = time.monotonic()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=self._interval)
            except TimeoutError:
                pass
            if self._stop.is_set():
                return
            try:
                await self._flush()
            except Exception:
                log.exception("flushing spend to %s failed; will retry", self._path)
            if time.monotonic() - last_housekeeping > _HOUSEKEEPING_S:
                last_housekeeping = time.monotonic()
                self._housekeeping()

    async def _flush(self) -> None:
        async with self._flush_lock:
            spend, self._pending_spend = self._pending_spend, {}
            ledger, self._ledger = self._ledger, []
            if not spend and not ledger:
                return
            try:
                await self._run(self._journal.flush, spend, ledger)
            except Exception:
                for k, v in spend.items():
                    self._pending_spend[k] = self._pending_spend.get(k, 0) + v
                self._ledger[:0] = ledger
                raise

    def _housekeeping(self) -> None:
        """Drop in-memory state nobody can ask for any more (it stays on disk)."""
        now = self._max_now
        for lid in [lid for lid, exp in self._settled.items() if exp < now]:
            del self._settled[lid]
        cutoff = now - _KEEP_OLD_PERIODS_S
        stale = []
        for k in self._spent:
            pid = k[1]
            span = _PERIOD_SPAN_S.get(pid[0])
            if span is not None and int(pid[1:]) + span < cutoff and k not in self._pending_spend:
                stale.append(k)
        for k in stale:
            del self._spent[k]
        for st in self._scopes.values():
            st.drop_expired(now)
            st.compact()
        wall = time.time()
        for name in [n for n, until in self._breakers.items() if until <= wall]:
            del self._breakers[name]
        for ck in [ck for ck, e in self._cache.items() if e[_EXPIRY] <= wall]:
            self._cache_drop(ck)

    # ---- SQLite (runs on the store's own thread) -----------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("EmbeddedStore is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
