"""Circuit breakers: one per deployment, pure state machines on an injected monotonic clock.

    closed ──(N failures in a row, or failure ratio over the window)──▶ open
    open ──(open_s passed; the next allow() is the probe)──▶ half_open
    half_open ──(an outcome: success)──▶ closed (fresh window)
    half_open ──(an outcome: failure)──▶ open (for another open_s)

Every method takes `now` (monotonic seconds) instead of reading a clock, and nothing here awaits,
so the event loop makes each call atomic and tests move time by hand. The outcome window is a
ring of `buckets` fixed-width buckets covering `window_s`: O(1) work per outcome (amortised: a
jump in time clears at most `buckets` buckets), constant memory whatever the traffic.

Sharing across replicas is the router's job: it publishes `opened_until` when a breaker opens
(`Store.breaker_publish`) and hands states seen on other replicas to `force_open` (or to
`BreakerBoard.adopt`, which converts the store's UNIX times to this process's monotonic clock).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from typing import Literal, TypedDict

from gateway.settings import BreakerSettings

BreakerState = Literal["closed", "open", "half_open"]

DEFAULT_BUCKETS = 10
DEFAULT_PROBE_TIMEOUT_S = 60.0
"""A probe not reported (nor released) within this long is presumed lost: another caller probes."""
_ADOPT_TOLERANCE_S = 0.5
"""Clock conversions (monotonic ↔ UNIX) jitter; an open-until this close to ours is ours."""


class BreakerSnapshot(TypedDict):
    """One breaker as shown in metrics and in /ready (JSON-ready)."""

    state: BreakerState
    """`open` whose time has passed already shows as `half_open` (the next caller probes)."""
    failures: int
    """Consecutive failures so far."""
    opened_until: float | None
    """Monotonic seconds of this process while open, else None."""
    retry_in_s: float | None
    """Seconds until an open breaker lets a probe through, else None."""
    window_requests: int
    window_failures: int


class CircuitBreaker:
    """The breaker of one deployment. Not thread-safe; meant for one event loop."""

    __slots__ = (
        "_consecutive",
        "_failures",
        "_head",
        "_n",
        "_probe_out",
        "_probe_since",
        "_ring_fail",
        "_ring_total",
        "_total",
        "_width",
        "opened_until",
        "probe_timeout_s",
        "settings",
        "state",
    )

    def __init__(
        self,
        settings: BreakerSettings,
        *,
        buckets: int = DEFAULT_BUCKETS,
        probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    ) -> None:
        if buckets < 1:
            raise ValueError("buckets must be at least 1")
        self.settings = settings
        self.probe_timeout_s = probe_timeout_s
        self.state: BreakerState = "closed"
        """As of the last call: an `open` breaker becomes `half_open` in the first `allow()` after
        `opened_until` (see `state_at` for the state a caller would find)."""
        self.opened_until = 0.0
        """Monotonic time an open breaker starts letting a probe through (0.0 when never opened)."""
        self._n = buckets
        self._width = settings.window_s / buckets
        self._ring_total = [0] * buckets
        self._ring_fail = [0] * buckets
        self._head: int | None = None
        self._total = 0
        self._failures = 0
        self._consecutive = 0
        self._probe_out = False
        self._probe_since = 0.0

    # ---- reading -------------------------------------------------------------------------------

    @property
    def failures(self) -> int:
        """Consecutive failures (reset by a success and when the breaker closes)."""
        return self._consecutive

    def state_at(self, now: float) -> BreakerState:
        """The state a caller would find at `now` (without changing anything)."""
        if self.state == "open" and now >= self.opened_until:
            return "half_open"
        return self.state

    def window(self, now: float) -> tuple[int, int]:
        """(outcomes, failures) recorded within the last `window_s` (to bucket precision)."""
        self._advance(now)
        return self._total, self._failures

    def snapshot(self, now: float) -> BreakerSnapshot:
        total, failures = self.window(now)
        is_open = self.state == "open"
        return BreakerSnapshot(
            state=self.state_at(now),
            failures=self._consecutive,
            opened_until=self.opened_until if is_open else None,
            retry_in_s=max(0.0, self.opened_until - now) if is_open else None,
            window_requests=total,
            window_failures=failures,
        )

    # ---- the request path ----------------------------------------------------------------------

    def allow(self, now: float) -> bool:
        """May a request go to this deployment now? Closed: yes. Open: no until `opened_until`;
        then the breaker turns half open and this caller is the probe (True). Half open: no while
        the probe is out (True again once it was released or is presumed lost)."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            if now < self.opened_until:
                return False
            self.state = "half_open"
        elif self._probe_out and now - self._probe_since < self.probe_timeout_s:
            return False
        self._probe_out = True
        self._probe_since = now
        return True

    def release_probe(self) -> None:
        """An allowed call was not made, or ended without saying anything about the deployment's
        health (the client went away): if it was the half-open probe, the next caller probes.
        A no-op in any other state."""
        if self.state == "half_open":
            self._probe_out = False

    def record(self, success: bool, now: float) -> bool:
        """Report the outcome of a call `allow()` let through; True if this outcome opened the
        breaker (the moment to publish `opened_until` to other replicas).

        Closed: the outcome enters the window; a failure opens the breaker after
        `consecutive_failures` in a row, or when the window holds at least `min_requests`
        outcomes of which a `failure_ratio` failed. Half open: the first outcome decides (success
        closes with a fresh window, failure re-opens for `open_s`). Open: ignored (calls that
        started before the breaker opened say nothing new)."""
        state = self.state
        if state == "open":
            return False
        if state == "half_open":
            self._probe_out = False
            if success:
                self._close()
                return False
            self._open(now + self.settings.open_s)
            return True
        slot = self._advance(now)
        self._ring_total[slot] += 1
        self._total += 1
        if success:
            self._consecutive = 0
            return False
        self._ring_fail[slot] += 1
        self._failures += 1
        self._consecutive += 1
        s = self.settings
        if self._consecutive >= s.consecutive_failures or (
            self._total >= s.min_requests and self._failures / self._total >= s.failure_ratio
        ):
            self._open(now + s.open_s)
            return True
        return False

    def force_open(self, until: float) -> bool:
        """Adopt an open state seen elsewhere (another replica): open until `until` (monotonic),
        or later if already open longer. A probe in flight no longer decides anything. True if
        this changed the state or extended it."""
        if self.state == "open" and until <= self.opened_until:
            return False
        self._open(until)
        return True

    # ---- internals -----------------------------------------------------------------------------

    def _open(self, until: float) -> None:
        self.state = "open"
        self.opened_until = until
        self._probe_out = False
        self._clear_window()

    def _close(self) -> None:
        self.state = "closed"
        self._consecutive = 0
        self._clear_window()

    def _clear_window(self) -> None:
        n = self._n
        self._ring_total = [0] * n
        self._ring_fail = [0] * n
        self._head = None
        self._total = 0
        self._failures = 0

    def _advance(self, now: float) -> int:
        """Move the ring to the bucket of `now`, dropping buckets that fell out of the window;
        returns the slot outcomes at `now` go to. A clock that goes backwards (it should not)
        counts into the newest bucket."""
        n = self._n
        idx = math.floor(now / self._width)
        head = self._head
        if head is not None and idx <= head:
            return head % n
        if head is None or idx - head >= n:
            start = idx - n + 1
        else:
            start = head + 1
        for i in range(start, idx + 1):
            slot = i % n
            self._total -= self._ring_total[slot]
            self._failures -= self._ring_fail[slot]
            self._ring_total[slot] = 0
            self._ring_fail[slot] = 0
        self._head = idx
        return idx % n


class BreakerBoard:
    """One breaker per deployment name, created on first use, all with the same settings."""

    def __init__(
        self,
        settings: BreakerSettings,
        names: Iterable[str] = (),
        *,
        buckets: int = DEFAULT_BUCKETS,
        probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    ) -> None:
        self.settings = settings
        self._buckets = buckets
        self._probe_timeout_s = probe_timeout_s
        self._breakers: dict[str, CircuitBreaker] = {}
        for name in names:
            self.get(name)

    def get(self, name: str) -> CircuitBreaker:
        b = self._breakers.get(name)
        if b is None:
            b = self._breakers[name] = CircuitBreaker(
                self.settings, buckets=self._buckets, probe_timeout_s=self._probe_timeout_s
            )
        return b

    __getitem__ = get

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __len__(self) -> int:
        return len(self._breakers)

    @property
    def names(self) -> list[str]:
        return list(self._breakers)

    def snapshot(self, now: float | None = None) -> dict[str, BreakerSnapshot]:
        """`{deployment: {"state", "failures", "opened_until", ...}}` for metrics and /ready."""
        t = time.monotonic() if now is None else now
        return {name: b.snapshot(t) for name, b in sorted(self._breakers.items())}

    def open_until_unix(self, name: str, now: float, now_unix: float) -> float | None:
        """An open breaker's `opened_until` as UNIX time (for `Store.breaker_publish`), else None."""
        b = self._breakers.get(name)
        if b is None or b.state != "open":
            return None
        return now_unix + (b.opened_until - now)

    def adopt(self, remote: Mapping[str, float], now: float, now_unix: float) -> list[str]:
        """Force open every known breaker that `Store.breaker_states` reports open (UNIX times)
        for longer than it is open here; returns the names that changed. Differences within
        `_ADOPT_TOLERANCE_S` are ignored, so a replica does not re-adopt its own state (nor, by
        clock jitter, cancel its own probe with a state that is just ending)."""
        changed: list[str] = []
        for name, until_unix in remote.items():
            b = self._breakers.get(name)
            if b is None:
                continue
            until = now + (until_unix - now_unix)
            if until <= now + _ADOPT_TOLERANCE_S or (
                b.state == "open" and until <= b.opened_until + _ADOPT_TOLERANCE_S
            ):
                continue
            if b.force_open(until):
                changed.append(name)
        return changed
