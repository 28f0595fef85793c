"""CircuitBreaker and BreakerBoard: every transition, on a clock moved by hand."""

from __future__ import annotations

import json

import pytest

from gateway.routing.breaker import BreakerBoard, BreakerState, CircuitBreaker
from gateway.settings import BreakerSettings


def cb(
    *,
    window_s: float = 10.0,
    min_requests: int = 4,
    failure_ratio: float = 0.5,
    consecutive_failures: int = 3,
    open_s: float = 5.0,
    buckets: int = 10,
    probe_timeout_s: float = 60.0,
) -> CircuitBreaker:
    s = BreakerSettings(window_s=window_s, min_requests=min_requests, failure_ratio=failure_ratio,
                        consecutive_failures=consecutive_failures, open_s=open_s)
    return CircuitBreaker(s, buckets=buckets, probe_timeout_s=probe_timeout_s)


def st(b: CircuitBreaker) -> BreakerState:
    """The state, read through a call (so that mypy does not narrow it across transitions)."""
    return b.state


def trip(b: CircuitBreaker, now: float) -> None:
    """Open `b` at `now` by consecutive failures."""
    for _ in range(b.settings.consecutive_failures):
        assert b.allow(now)
        b.record(False, now)
    assert st(b) == "open"


# ---- closed -------------------------------------------------------------------------------------


def test_starts_closed_and_allows_everyone() -> None:
    b = cb()
    assert (st(b), b.failures, b.opened_until) == ("closed", 0, 0.0)
    assert all(b.allow(100.0) for _ in range(50))
    assert b.state_at(100.0) == "closed"


def test_consecutive_failures_open() -> None:
    b = cb(consecutive_failures=3, min_requests=100)
    assert b.record(False, 1.0) is False
    assert b.record(False, 1.1) is False
    assert b.failures == 2 and st(b) == "closed"
    assert b.record(False, 1.2) is True  # the third in a row opens, and says so
    assert st(b) == "open" and b.opened_until == pytest.approx(1.2 + 5.0)
    assert b.failures == 3


def test_a_success_resets_the_consecutive_count() -> None:
    b = cb(consecutive_failures=3, min_requests=100)
    for t in range(10):
        b.record(False, t)
        b.record(False, t + 0.1)
        b.record(True, t + 0.2)
        assert st(b) == "closed" and b.failures == 0


def test_failure_ratio_opens_only_with_min_requests() -> None:
    b = cb(consecutive_failures=100, min_requests=6, failure_ratio=0.5)
    for ok in (False, True, False, True, False):  # 3 of 5 failed, but fewer than 6 outcomes
        assert b.record(ok, 1.0) is False
    assert st(b) == "closed" and b.window(1.0) == (5, 3)
    assert b.record(False, 1.0) is True  # 4 of 6 >= 0.5
    assert st(b) == "open"


def test_failure_ratio_exact_threshold() -> None:
    # 3 of 10 is exactly 0.3 (no float slop: 0.3 * 10 would be 3.0000000000000004)
    b = cb(consecutive_failures=100, min_requests=10, failure_ratio=0.3)
    for _ in range(7):
        b.record(True, 1.0)
    b.record(False, 1.0)
    b.record(False, 1.0)
    assert st(b) == "closed"
    assert b.record(False, 1.0) is True


def test_ratio_below_threshold_stays_closed_and_successes_never_open() -> None:
    b = cb(consecutive_failures=100, min_requests=4, failure_ratio=0.5)
    for i in range(200):  # one failure in three: 0.33 < 0.5
        assert b.record(i % 3 != 2, 1.0 + i * 0.01) is False
    assert st(b) == "closed"
    b2 = cb(consecutive_failures=1, min_requests=1, failure_ratio=0.01)
    for i in range(100):
        b2.record(True, float(i))
    assert st(b2) == "closed"


def test_consecutive_rule_independent_of_the_window() -> None:
    # failures spread wider than the window still open by the consecutive rule
    b = cb(window_s=10.0, consecutive_failures=3, min_requests=2, failure_ratio=1.0)
    b.record(False, 0.0)
    b.record(False, 50.0)  # the first fell out of the window: ratio rule sees 1 of 1 (< min 2)
    assert st(b) == "closed" and b.window(50.0) == (1, 1)
    assert b.record(False, 100.0) is True


def test_window_expiry_forgets_old_outcomes() -> None:
    b = cb(window_s=10.0, buckets=10, consecutive_failures=100, min_requests=4, failure_ratio=0.5)
    for t in (0.0, 0.5, 1.0):  # buckets of 1 s: [0, 1) holds two, [1, 2) one
        b.record(False, t)
    assert b.window(1.0) == (3, 3)
    assert b.window(9.9) == (3, 3)
    assert b.window(10.0) == (1, 1)  # the [0, 1) bucket is gone
    assert b.window(10.9) == (1, 1)
    assert b.window(11.0) == (0, 0)
    b.record(False, 12.0)  # 1 of 1 in the window: not enough outcomes
    assert st(b) == "closed"
    for t in (12.1, 12.2):
        b.record(True, t)
    assert b.record(False, 12.3) is True  # 2 of 4


def test_window_survives_long_gaps_and_many_rotations() -> None:
    b = cb(window_s=10.0, buckets=5, consecutive_failures=10**6, min_requests=10**6)
    t = 0.0
    for i in range(10_000):
        t += 0.37
        b.record(i % 2 == 0, t)
        total, failures = b.window(t)
        assert 0 < total <= 10 / 0.37 + 1 and 0 <= failures <= total
    assert b.window(t + 1e6) == (0, 0)  # a jump far ahead clears everything
    b.record(False, t + 1e6)
    assert b.window(t + 1e6) == (1, 1)


def test_clock_going_backwards_counts_into_the_newest_bucket() -> None:
    b = cb(consecutive_failures=100, min_requests=100)
    b.record(False, 5.0)
    b.record(False, 4.0)
    assert b.window(5.0) == (2, 2)


# ---- open ---------------------------------------------------------------------------------------


def test_open_rejects_until_open_s_passed() -> None:
    b = cb(open_s=5.0)
    trip(b, 10.0)
    assert b.allow(10.0) is False
    assert b.allow(14.999) is False
    assert st(b) == "open" and b.state_at(14.999) == "open"
    assert b.state_at(15.0) == "half_open"  # what the next caller would find
    assert st(b) == "open"  # ...but reading changes nothing


def test_outcomes_while_open_are_ignored() -> None:
    b = cb(open_s=5.0)
    trip(b, 10.0)
    until = b.opened_until
    assert b.record(True, 11.0) is False  # a call that started before the opening
    assert b.record(False, 11.0) is False
    assert (st(b), b.opened_until) == ("open", until)


# ---- half open: exactly one probe ---------------------------------------------------------------


def test_exactly_one_probe_then_success_closes() -> None:
    b = cb(open_s=5.0)
    trip(b, 10.0)
    assert b.allow(15.0) is True  # the probe
    assert st(b) == "half_open"
    assert [b.allow(15.0 + i * 0.1) for i in range(20)] == [False] * 20
    assert b.record(True, 16.0) is False
    assert (st(b), b.failures) == ("closed", 0)
    assert b.window(16.0) == (0, 0)  # a fresh window
    assert all(b.allow(16.0) for _ in range(5))


def test_probe_failure_reopens_for_another_open_s() -> None:
    b = cb(open_s=5.0)
    trip(b, 10.0)
    assert b.allow(15.0) is True
    assert b.record(False, 16.0) is True  # re-opened: publish again
    assert st(b) == "open" and b.opened_until == pytest.approx(21.0)
    assert b.allow(20.9) is False
    assert b.allow(21.0) is True
    assert b.allow(21.0) is False


def test_fresh_window_after_closing_needs_new_failures() -> None:
    b = cb(consecutive_failures=3, min_requests=4, failure_ratio=0.5, open_s=5.0)
    trip(b, 0.0)
    assert b.allow(5.0)
    b.record(True, 5.0)
    b.record(False, 5.1)
    b.record(False, 5.2)
    assert st(b) == "closed"  # 2 in a row, 2 of 2 (< min_requests): the old failures are gone
    assert b.record(False, 5.3) is True


def test_released_probe_lets_the_next_caller_probe() -> None:
    b = cb(open_s=5.0)
    trip(b, 0.0)
    assert b.allow(5.0) is True
    assert b.allow(5.0) is False
    b.release_probe()
    assert st(b) == "half_open"
    assert b.allow(5.1) is True
    assert b.allow(5.1) is False


def test_release_probe_is_a_noop_when_closed_or_open() -> None:
    b = cb(open_s=5.0)
    b.release_probe()
    assert st(b) == "closed" and b.allow(0.0)
    trip(b, 0.0)
    b.release_probe()
    assert st(b) == "open" and b.allow(1.0) is False


def test_lost_probe_is_replaced_after_the_probe_timeout() -> None:
    b = cb(open_s=5.0, probe_timeout_s=30.0)
    trip(b, 0.0)
    assert b.allow(5.0) is True
    assert b.allow(34.9) is False
    assert b.allow(35.0) is True  # the first probe never reported: presumed lost
    assert b.allow(35.0) is False
    b.record(True, 36.0)
    assert st(b) == "closed"


def test_outcome_of_a_call_let_through_while_closed_decides_half_open() -> None:
    # documented: the first outcome reported in half open decides, whoever reports it
    b = cb(open_s=5.0)
    trip(b, 0.0)
    assert b.allow(5.0) is True
    b.record(False, 5.5)
    assert st(b) == "open"


# ---- force_open (a state adopted from another replica) ------------------------------------------


def test_force_open_from_closed() -> None:
    b = cb(open_s=5.0)
    b.record(False, 0.0)
    assert b.force_open(100.0) is True
    assert (st(b), b.opened_until) == ("open", 100.0)
    assert b.allow(99.0) is False
    assert b.allow(100.0) is True and st(b) == "half_open"
    b.record(True, 100.5)
    assert st(b) == "closed"


def test_force_open_only_extends() -> None:
    b = cb(open_s=5.0)
    trip(b, 0.0)  # open until 5
    assert b.force_open(3.0) is False
    assert b.opened_until == 5.0
    assert b.force_open(8.0) is True
    assert b.opened_until == 8.0
    assert b.allow(6.0) is False


def test_force_open_during_half_open_cancels_the_probe() -> None:
    b = cb(open_s=5.0)
    trip(b, 0.0)
    assert b.allow(5.0) is True
    assert b.force_open(20.0) is True
    assert st(b) == "open"
    assert b.record(True, 6.0) is False  # the old probe's outcome no longer decides
    assert st(b) == "open" and b.allow(19.0) is False
    assert b.allow(20.0) is True


# ---- the board ----------------------------------------------------------------------------------


def test_board_one_breaker_per_name_and_snapshot() -> None:
    s = BreakerSettings(window_s=10, min_requests=100, failure_ratio=0.5, consecutive_failures=2,
                        open_s=5)
    board = BreakerBoard(s, ["b/x", "a/y"])
    assert board.names == ["b/x", "a/y"] and len(board) == 2 and "a/y" in board
    assert board.get("a/y") is board["a/y"]
    c = board.get("c/z")  # created on first use
    assert "c/z" in board and st(c) == "closed"
    a = board.get("a/y")
    a.record(False, 1.0)
    a.record(False, 1.0)
    board.get("b/x").record(False, 1.0)
    snap = board.snapshot(2.0)
    assert list(snap) == ["a/y", "b/x", "c/z"]
    assert snap["a/y"] == {"state": "open", "failures": 2, "opened_until": 6.0, "retry_in_s": 4.0,
                           "window_requests": 0, "window_failures": 0}
    assert snap["b/x"] == {"state": "closed", "failures": 1, "opened_until": None,
                           "retry_in_s": None, "window_requests": 1, "window_failures": 1}
    assert board.snapshot(6.0)["a/y"]["state"] == "half_open"
    json.dumps(board.snapshot())  # JSON-ready for /ready, with the real clock by default


def test_board_adopt_converts_unix_to_monotonic() -> None:
    s = BreakerSettings(open_s=5)
    board = BreakerBoard(s, ["p/a", "p/b", "p/c"])
    now, wall = 1000.0, 1_900_000_000.0
    remote = {"p/a": wall + 7.0, "p/b": wall - 1.0, "p/c": wall + 0.2, "unknown": wall + 9.0}
    changed = board.adopt(remote, now, wall)
    assert changed == ["p/a"]  # p/b is over, p/c all but over, "unknown" not a deployment here
    a = board.get("p/a")
    assert st(a) == "open" and a.opened_until == pytest.approx(1007.0)
    assert board.get("p/b").state == board.get("p/c").state == "closed"
    # its own published state comes back (give or take clock jitter): nothing changes
    assert board.open_until_unix("p/a", now, wall) == pytest.approx(wall + 7.0)
    assert board.adopt({"p/a": wall + 7.3}, now + 0.1, wall + 0.1) == []
    assert board.adopt({"p/a": wall + 9.0}, now, wall) == ["p/a"]
    assert a.opened_until == pytest.approx(1009.0)
    assert board.open_until_unix("p/c", now, wall) is None
    assert board.open_until_unix("nope", now, wall) is None


def test_bad_bucket_count() -> None:
    with pytest.raises(ValueError):
        cb(buckets=0)
