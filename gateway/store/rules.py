"""Rules both backends share: sliding-window arithmetic, rate headers, period ids, spend grouping.

The embedded backend decides in Python and the Redis backend decides in Lua; both evaluate the
same expressions in the same order on IEEE doubles, so they agree to the last bit. Anything
derived after the decision (retry-after, x-ratelimit-* values, budget reset times) is computed
here once, from the raw window counters each backend returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from gateway.store.base import GroupBy, Period, RateInfo, SpendRow, period_id

WINDOW_S = 60
"""The sliding window is two fixed windows of this length, the previous one weighted."""
SETTLED_TTL_S = 2 * 86400
"""How long settle remembers a lease id (so settling twice counts once)."""
DAY_S = 86400
TOTAL_PID = "t0"

Slot = tuple[int, int, int]
"""One rate limit as evaluated: (limit, previous window count, current window count)."""


def window_index(now: float) -> int:
    return math.floor(now / WINDOW_S)


def window_frac(now: float, w: int) -> float:
    """The weight of the previous window at `now` (1 at the start of window `w`, 0 at its end)."""
    return 1 - (now - w * WINDOW_S) / WINDOW_S


def retry_after(prev: int, cur: int, now: float, need: int, limit: int) -> float:
    """Seconds until `need` more fits under `limit` (rounded up to the millisecond).

    A request larger than the limit itself never fits; it gets the time to a completely clear
    window, which is the most honest finite answer."""
    w = window_index(now)
    elapsed = now - w * WINDOW_S
    to_end = WINDOW_S - elapsed
    if need > limit:
        wait = to_end + WINDOW_S
    elif cur + need <= limit:
        # Wait in this window for the previous window's weight to decay enough.
        wait = 0.0 if prev <= 0 else max(0.0, WINDOW_S * (1 - (limit - need - cur) / prev) - elapsed)
    else:
        # Wait into the next window, where this window becomes the decaying one.
        wait = to_end + max(0.0, WINDOW_S * (1 - (limit - need) / cur))
    return math.ceil((wait + 1e-6) * 1000) / 1000


def hit_wait(refused: Iterable[tuple[int, int, int, int]], now: float) -> float:
    """The wait of a refused limiter hit: the longest `retry_after` over its refusing kinds, given
    as (previous window count, current window count, need, limit); 0.0 when none refused."""
    return max((retry_after(prev, cur, now, need, limit) for prev, cur, need, limit in refused),
               default=0.0)


def _reset_s(prev: int, cur: int, now: float) -> float:
    """Seconds until the window is back to its initial, empty state."""
    elapsed = now - window_index(now) * WINDOW_S
    if cur > 0:
        return 2 * WINDOW_S - elapsed
    if prev > 0:
        return WINDOW_S - elapsed
    return 0.0


def rate_info(slots: Iterable[Slot], now: float) -> RateInfo | None:
    """The tightest of several limits of one kind: least remaining, then the smallest limit.

    The same arithmetic as `window_frac` and `_reset_s`, inlined (it runs twice per request)."""
    elapsed = now - math.floor(now / WINDOW_S) * WINDOW_S
    frac = 1 - elapsed / WINDOW_S
    best: RateInfo | None = None
    for limit, prev, cur in slots:
        remaining = math.floor(limit - (prev * frac + cur))
        if remaining < 0:
            remaining = 0
        if best is None or remaining < best.remaining or (remaining == best.remaining and limit < best.limit):
            reset = 2 * WINDOW_S - elapsed if cur > 0 else (WINDOW_S - elapsed if prev > 0 else 0.0)
            best = RateInfo(limit, remaining, reset)
    return best


_pid_cache: dict[int, dict[Period, str]] = {}


def period_ids(now: float) -> dict[Period, str]:
    """The ids of the daily, weekly, monthly and total periods containing `now` (cached per day)."""
    day = math.floor(now / DAY_S)
    cached = _pid_cache.get(day)
    if cached is not None:
        return cached
    if len(_pid_cache) > 64:
        _pid_cache.clear()
    ids: dict[Period, str] = {p: period_id(p, now) for p in ("daily", "weekly", "monthly")}
    ids["total"] = TOTAL_PID
    _pid_cache[day] = ids
    return ids


_day_cache: dict[int, str] = {}


def day_str(ts: float) -> str:
    """The UTC day of `ts` as YYYY-MM-DD (memoised per day: one call per ledger record)."""
    day = math.floor(ts / DAY_S)
    s = _day_cache.get(day)
    if s is None:
        if len(_day_cache) > 4096:
            _day_cache.clear()
        s = _day_cache[day] = datetime.fromtimestamp(day * DAY_S, UTC).strftime("%Y-%m-%d")
    return s


def day_range(start: float, end: float) -> tuple[float, float]:
    """The whole UTC days a spend query covers: every day that overlaps [start, end)."""
    lo = math.floor(start / DAY_S) * DAY_S
    hi = math.ceil(end / DAY_S) * DAY_S
    return float(lo), float(max(hi, lo))


RawSpend = tuple[str, str, str, str, int, int, int, int]
"""(team_id, key_id, model, day, requests, prompt_tokens, completion_tokens, cost_nano)."""


def group_spend(raw: Iterable[RawSpend], group_by: Sequence[GroupBy]) -> list[SpendRow]:
    """Fold fine-grained spend into rows keyed by the group-by fields, sorted by day, team, key, model."""
    g_team, g_key, g_model, g_day = (f in group_by for f in ("team", "key", "model", "day"))
    acc: dict[tuple[str | None, ...], list[int]] = {}
    for team, key, model, day, n, pt, ct, cost in raw:
        k = (day if g_day else None, team if g_team else None, key if g_key else None,
             model if g_model else None)
        a = acc.get(k)
        if a is None:
            acc[k] = [n, pt, ct, cost]
        else:
            a[0] += n
            a[1] += pt
            a[2] += ct
            a[3] += cost
    rows = [
        SpendRow(team_id=t, key_id=k, model=m, day=d, requests=a[0], prompt_tokens=a[1],
                 completion_tokens=a[2], cost_nano=a[3])
        for (d, t, k, m), a in acc.items()
    ]
    rows.sort(key=lambda r: (r.day or "", r.team_id or "", r.key_id or "", r.model or ""))
    return rows
