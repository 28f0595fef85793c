"""The Store protocol and its records: teams, keys, rate limits, budget leases, the spend ledger.

Money is integer nano-USD (1e-9 USD) everywhere inside the store, so sums never drift.
Times are float UNIX seconds (UTC). No backend type appears outside `gateway/store/`.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

Period = Literal["daily", "weekly", "monthly", "total"]
ScopeKind = Literal["key", "team"]
NANO = 1_000_000_000


def usd_to_nano(usd: float) -> int:
    return round(usd * NANO)


def nano_to_usd(nano: int) -> float:
    return nano / NANO


def period_bounds(period: Period, now: float) -> tuple[float, float | None]:
    """Start and end (UTC) of the budget period containing `now`; `total` never resets."""
    if period == "total":
        return 0.0, None
    d = datetime.fromtimestamp(now, UTC)
    day = d.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        start, end = day, day + timedelta(days=1)
    elif period == "weekly":  # ISO weeks: Monday 00:00 UTC
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        days = calendar.monthrange(start.year, start.month)[1]
        end = start + timedelta(days=days)
    return start.timestamp(), end.timestamp()


def period_id(period: Period, now: float) -> str:
    """A stable name of the period containing `now` (part of the spend counter's key)."""
    start, _ = period_bounds(period, now)
    return f"{period[0]}{int(start)}"


@dataclass(slots=True)
class BudgetSpec:
    limit_nano: int
    period: Period

    def to_json(self) -> dict[str, Any]:
        return {"limit_nano": self.limit_nano, "period": self.period}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> BudgetSpec | None:
        return None if d is None else cls(limit_nano=int(d["limit_nano"]), period=d["period"])


@dataclass(slots=True)
class TeamRecord:
    id: str
    name: str
    budget: BudgetSpec | None = None
    rpm: int | None = None
    tpm: int | None = None
    allowed_models: list[str] | None = None
    """None: every model; a list: only these public model names."""
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass(slots=True)
class KeyRecord:
    id: str
    team_id: str
    key_hash: str
    """hex SHA-256 of the full key; the key itself is never stored."""
    prefix: str
    """The first characters of the key, for people to recognise it (`sk-tw-AbCd`)."""
    name: str = ""
    budget: BudgetSpec | None = None
    rpm: int | None = None
    tpm: int | None = None
    allowed_models: list[str] | None = None
    expires_at: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    revoked_at: float | None = None


@dataclass(slots=True)
class Scope:
    """One thing limits and budgets apply to: a key or a team."""

    kind: ScopeKind
    id: str
    rpm: int | None = None
    tpm: int | None = None
    budget: BudgetSpec | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.id}"


@dataclass(slots=True)
class Admission:
    """One request asking to be let in: rate-limit hits and a budget reservation, all or nothing."""

    key_hash: str
    now: float
    model: str
    est_tokens: int
    """Counted against TPM now; corrected at settle with the real usage."""
    reserve_nano: int
    """Worst-case cost reserved against every budget in scope."""
    lease_id: str
    lease_ttl_s: float
    check_rate: bool = True
    check_budget: bool = True
    charge: bool = False
    """The cost is known before the call (a cache hit): `reserve_nano` is spent at once and
    `est_tokens` are the real tokens; no lease is held and nothing is settled afterwards."""


@dataclass(slots=True)
class RateInfo:
    """The tightest limit of one kind (requests or tokens), for x-ratelimit-* headers."""

    limit: int
    remaining: int
    reset_s: float


AdmitStatus = Literal[
    "ok", "unknown_key", "revoked", "expired", "model_not_allowed", "rate_limited", "over_budget"
]


@dataclass(slots=True)
class AdmitResult:
    status: AdmitStatus
    key: KeyRecord | None = None
    team: TeamRecord | None = None
    scope: ScopeKind | None = None
    """Which scope refused (rate_limited, over_budget, model_not_allowed)."""
    limit_kind: Literal["requests", "tokens"] | None = None
    retry_after_s: float | None = None
    budget_reset_at: float | None = None
    """over_budget: when the refusing budget's period ends (None for `total`)."""
    requests: RateInfo | None = None
    tokens: RateInfo | None = None


@dataclass(slots=True)
class Settlement:
    """The real outcome of an admitted request; settling twice has no further effect."""

    lease_id: str
    key_id: str
    team_id: str
    now: float
    actual_nano: int
    est_tokens: int
    actual_tokens: int


@dataclass(slots=True)
class BudgetState:
    limit_nano: int | None
    period: Period | None
    spent_nano: int
    reserved_nano: int
    period_start: float | None
    period_end: float | None


@dataclass(slots=True)
class SpendRecord:
    ts: float
    request_id: str
    team_id: str
    key_id: str
    model: str
    provider: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_nano: int
    cache: str
    """hit-exact, hit-semantic, miss, bypass."""
    latency_ms: float
    status: int


@dataclass(slots=True)
class SpendRow:
    """One group of /admin/spend: the group-by fields set, the rest None."""

    team_id: str | None
    key_id: str | None
    model: str | None
    day: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_nano: int


GroupBy = Literal["team", "key", "model", "day"]
CacheKind = Literal["exact", "semantic"]


@dataclass(slots=True)
class CacheStats:
    entries: int = 0
    bytes: int = 0
    hits: int = 0
    """Lookups answered from the cache: exact hits plus semantic hits."""
    misses: int = 0
    """Lookups answered by neither: exact misses not followed by a semantic hit."""
    semantic_hits: int = 0

    @property
    def exact_hits(self) -> int:
        return self.hits - self.semantic_hits

    @classmethod
    def from_counts(cls, exact_hits: int, exact_misses: int, semantic_hits: int) -> CacheStats:
        """From the raw counters: a semantic hit always follows an exact miss of the same request and
        team, so it turns that miss into a hit."""
        return cls(
            hits=exact_hits + semantic_hits,
            misses=max(exact_misses - semantic_hits, 0),
            semantic_hits=semantic_hits,
        )

    def to_json(self) -> dict[str, int]:
        return {
            "entries": self.entries, "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
            "exact_hits": self.exact_hits, "semantic_hits": self.semantic_hits,
        }


class StoreUnavailable(Exception):
    """The backend cannot be reached; callers apply the configured failure policy."""


class Store(Protocol):
    """Everything the gateway keeps. Both backends pass tests/contract/ unchanged."""

    async def start(self) -> None: ...

    async def close(self) -> None:
        """Flush everything buffered (spend, ledger) and release resources."""

    async def ping(self) -> bool: ...

    # ---- teams and keys ------------------------------------------------------------------------
    async def put_team(self, team: TeamRecord) -> None:
        """Create or replace (by id)."""

    async def get_team(self, team_id: str) -> TeamRecord | None: ...

    async def list_teams(self) -> list[TeamRecord]: ...

    async def put_key(self, key: KeyRecord) -> None:
        """Create or replace (by id); the hash index follows (rotation changes key_hash)."""

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def get_key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    async def list_keys(self, team_id: str | None = None) -> list[KeyRecord]: ...

    # ---- the hot path ------------------------------------------------------------------------
    async def admit(self, a: Admission) -> AdmitResult:
        """Atomically: find the key by hash, its team; refuse unknown/revoked/expired keys and
        models outside either allow-list; then check RPM/TPM of key and team (sliding window of
        60 s) and the key's and team's budgets (spent in the current period + reserved +
        a.reserve_nano <= limit, after dropping expired leases); if everything passes, count the
        hits and record the lease against both budgets. Nothing is counted when anything refuses.
        One round trip on Redis."""

    async def settle(self, s: Settlement) -> None:
        """Release the lease (if still held) from both scopes, add actual_nano to the spend of
        the period the lease was taken in (even if the lease had expired), correct the TPM
        window by actual_tokens - est_tokens. Idempotent by lease_id."""

    def submit(self, settlement: Settlement | None, record: SpendRecord) -> None:
        """Fire and forget, for the request path: settle (if given) and append `record` to the
        ledger soon. The store batches (on Redis one pipelined round trip per batch), keeps
        retrying while the backend is unreachable (bounded), and `close()` flushes everything."""

    async def drain(self) -> None:
        """Wait until everything submitted so far has been written (or failed to be)."""

    async def budget(self, scope: Scope, now: float) -> BudgetState: ...

    # ---- ledger ------------------------------------------------------------------------------
    async def record_spend(self, records: list[SpendRecord]) -> None:
        """Durable once `close()` returned (embedded may buffer up to ~1 s)."""

    async def query_spend(
        self, start: float, end: float, group_by: list[GroupBy], team_id: str | None = None
    ) -> list[SpendRow]: ...

    # ---- routing: limiters and breakers shared by every replica --------------------------------
    async def rate_hit(self, name: str, rpm: int, tpm: int, tokens: int, now: float) -> float:
        """Atomically check and count 1 request and `tokens` tokens against the limiter `name`
        (any string, e.g. `provider:openai` or `deployment:openai/gpt-4o`): RPM `rpm` and TPM
        `tpm` (0: no limit of that kind, and nothing of that kind counted), in the same 60 s
        sliding window and with the same arithmetic as `admit`. Returns 0.0 when counted; else
        the seconds to wait until both would fit (the longest of the refusing kinds), and
        nothing is counted. `tokens` above `tpm` never fits: the wait is to a clear window.
        Limiter windows are separate from key/team windows. One round trip on Redis."""

    async def rate_adjust(
        self, name: str, tokens_delta: int, now: float, requests_delta: int = 0
    ) -> None:
        """Correct the counts of the limiter `name`, like `settle` does for `admit`: its tokens
        once the real usage is known, or (`requests_delta` -1 and the tokens counted) a hit that
        was never sent after all. `now` is the time given to the `rate_hit` being corrected, so
        the deltas land in the window it was counted in (nothing happens once that window is
        gone); a count never goes below 0."""

    async def breaker_publish(self, name: str, opened_until_unix: float) -> None:
        """Tell every replica that the breaker `name` is open until `opened_until_unix` (UNIX
        seconds). A later time already published is kept (the longest wins); a time already past
        (by this host's clock) publishes nothing. The state disappears by itself when it ends."""

    async def breaker_states(self, names: list[str], now_unix: float) -> dict[str, float]:
        """The breakers among `names` published open until after `now_unix`: name -> open-until
        (UNIX seconds). One round trip on Redis."""

    # ---- small KV (alert flags) ---------------------------------------------------------------
    async def set_once(self, key: str, ttl_s: float | None) -> bool:
        """Set `key` if absent; True if this call set it."""

    # ---- response cache ------------------------------------------------------------------------
    async def cache_get(
        self, key: str, team: str | None = None, kind: CacheKind = "exact"
    ) -> bytes | None:
        """The live entry `key`, or None. With `team`, counts for that team: kind "exact" (the first
        lookup of a request) a hit or a miss; kind "semantic" (the entry a semantic lookup found, for a
        request whose exact lookup missed) a semantic hit when the entry is live, which turns that
        exact miss into a hit in `cache_stats`, and nothing when it is gone (the miss stays a miss)."""

    async def cache_count(self, team: str, hit: bool) -> None:
        """Count one exact lookup of an admitted request for `team` in `cache_stats`: a hit or a
        miss (what `cache_get(key, team)` counts, for a lookup made with `cache_get(key)` before
        the request was admitted)."""

    async def cache_put(self, key: str, value: bytes, ttl_s: float, team: str, model: str) -> None:
        """Store (or replace) `key` for `ttl_s` seconds, indexed under `team` (the partition) and
        `model` for purge and stats. Embedded: bounded in size, oldest entries evicted first."""

    async def cache_purge(self, team: str | None = None, model: str | None = None) -> int:
        """Delete the entries of `team` and/or `model` (both None: all); returns how many."""

    async def cache_stats(self, team: str | None = None) -> dict[str, CacheStats]:
        """Per team (or only `team`): live entries, their bytes, hits (of which semantic) and misses
        counted (see `cache_get` and `CacheStats.from_counts`)."""

    async def cache_feed_add(self, entry: bytes, max_len: int) -> None:
        """Append `entry` to the feed the replicas read (the semantic cache's index entries), keeping
        about the last `max_len`. Embedded: nothing (one process, whose cache dies with it)."""

    async def cache_feed_read(self, cursor: str | None, count: int) -> tuple[list[bytes], str | None]:
        """Up to `count` feed entries after `cursor` (None: from the oldest kept), and the cursor to
        pass next time. Embedded: always empty."""
