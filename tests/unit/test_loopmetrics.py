"""gateway.loopmetrics: the lock-free metrics expose exactly what prometheus_client's own
Counter / Gauge / Histogram expose for the same updates (but the `_created` samples)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from gateway.loopmetrics import LoopCounter, LoopGauge, LoopHistogram

_CREATED = re.compile(r"^(# (HELP|TYPE) )?\w+_created[ {]")

BUCKETS = (0.005, 0.1, 0.25, 1, 2.5, 10)


def exposition(registry: CollectorRegistry) -> str:
    """The text exposition without the `_created` samples (and their HELP/TYPE lines)."""
    lines = generate_latest(registry).decode().splitlines()
    return "\n".join(line for line in lines if not _CREATED.match(line))


def pair() -> tuple[CollectorRegistry, CollectorRegistry]:
    """(a registry for prometheus_client's metrics, one for the loop metrics)."""
    return CollectorRegistry(), CollectorRegistry()


def test_the_created_filter_only_drops_created_samples() -> None:
    lib, _ = pair()
    Counter("jobs", "Jobs", ["kind"], registry=lib).labels("a").inc()
    full = generate_latest(lib).decode()
    assert "jobs_created" in full
    assert exposition(lib).splitlines() == [
        "# HELP jobs_total Jobs", "# TYPE jobs_total counter", 'jobs_total{kind="a"} 1.0',
    ]


def test_unlabelled_metrics_are_exposed_at_zero_before_any_update() -> None:
    lib, loop = pair()
    Counter("tw_events", "Events seen", registry=lib)
    Gauge("tw_in_flight", "Requests being served", registry=lib)
    Histogram("tw_lookup_seconds", "Lookup time", buckets=BUCKETS, registry=lib)
    LoopCounter("tw_events", "Events seen", (), loop)
    LoopGauge("tw_in_flight", "Requests being served", (), loop)
    LoopHistogram("tw_lookup_seconds", "Lookup time", (), loop, BUCKETS)
    text = exposition(loop)
    assert text == exposition(lib)
    for sample in ("tw_events_total 0.0", "tw_in_flight 0.0", 'tw_lookup_seconds_bucket{le="+Inf"} 0.0',
                   "tw_lookup_seconds_count 0.0", "tw_lookup_seconds_sum 0.0"):
        assert sample in text.splitlines()


def test_labelled_metrics_without_children_expose_only_their_headers() -> None:
    lib, loop = pair()
    Counter("tw_req", "Requests", ["endpoint", "status"], registry=lib)
    Histogram("tw_dur_seconds", "Duration", ["endpoint"], buckets=BUCKETS, registry=lib)
    LoopCounter("tw_req", "Requests", ["endpoint", "status"], loop)
    LoopHistogram("tw_dur_seconds", "Duration", ["endpoint"], loop, BUCKETS)
    assert exposition(loop) == exposition(lib)
    assert all(line.startswith("#") for line in exposition(loop).splitlines())


def test_counter_exposition_equals_prometheus_client() -> None:
    lib, loop = pair()
    c = Counter("tw_requests", "Requests by endpoint, model and HTTP status",
                ["endpoint", "model", "status"], registry=lib)
    lc = LoopCounter("tw_requests", "Requests by endpoint, model and HTTP status",
                     ["endpoint", "model", "status"], loop)
    tokens = Counter("tw_tokens", "Tokens", ["model", "kind"], registry=lib)
    ltokens = LoopCounter("tw_tokens", "Tokens", ["model", "kind"], loop)
    plain = Counter("tw_plain", "No labels", registry=lib)
    lplain = LoopCounter("tw_plain", "No labels", (), loop)
    updates: list[tuple[tuple[Any, ...], float]] = [
        (("chat", "gpt-test", "200"), 1), (("chat", "gpt-test", "429"), 1),
        (("embeddings", "embed-test", "200"), 3), (("chat", "gpt-test", "200"), 2.5),
        (("chat", "gpt-test", 200), 1),  # a non-str label value is the same child as its str()
        (("chat", 'quote"and\\back\nslash', "500"), 1), (("chat", "gpt-test", "429"), 0),
    ]
    for labels, amount in updates:
        c.labels(*labels).inc(amount)
        lc.labels(*labels).inc(amount)
    for model, kind, n in (("m", "prompt", 1000), ("m", "completion", 250), ("m", "prompt", 7)):
        tokens.labels(model, kind).inc(n)
        ltokens.labels(model, kind).value += n  # the metrics plugin's hot path
    plain.inc()
    plain.inc(0.25)
    lplain.inc()
    lplain.inc(0.25)
    text = exposition(loop)
    assert text == exposition(lib)
    assert 'tw_requests_total{endpoint="chat",model="gpt-test",status="200"} 4.5' in text
    assert 'tw_tokens_total{kind="prompt",model="m"} 1007.0' in text
    assert "tw_plain_total 1.25" in text.splitlines()


def test_gauge_exposition_equals_prometheus_client() -> None:
    lib, loop = pair()
    g = Gauge("tw_in_flight", "In flight", registry=lib)
    lg = LoopGauge("tw_in_flight", "In flight", (), loop)
    gl = Gauge("tw_queue", "Queue depth", ["pool"], registry=lib)
    lgl = LoopGauge("tw_queue", "Queue depth", ["pool"], loop)
    children: list[Any] = [g, lg.labels()]
    for child in children:
        child.inc()
        child.inc(3)
        child.dec(1.5)
    children = [gl.labels("a"), gl.labels("b"), lgl.labels("a"), lgl.labels("b")]
    for child in children:
        child.set(10)
        child.dec(12.25)  # below zero is fine for a gauge
    gl.labels("c").set(1e21)
    lgl.labels("c").set(1e21)
    text = exposition(loop)
    assert text == exposition(lib)
    assert "tw_in_flight 2.5" in text.splitlines()
    assert 'tw_queue{pool="a"} -2.25' in text


@pytest.mark.parametrize(
    "buckets", [BUCKETS, (*BUCKETS, float("inf")), (1, 2, 3)], ids=["plain", "explicit-inf", "ints"]
)
def test_histogram_exposition_equals_prometheus_client(buckets: tuple[float, ...]) -> None:
    lib, loop = pair()
    h = Histogram("tw_duration_seconds", "Duration", ["endpoint", "model"], buckets=buckets, registry=lib)
    lh = LoopHistogram("tw_duration_seconds", "Duration", ["endpoint", "model"], loop, buckets)
    hu = Histogram("tw_lookup_seconds", "Lookup", buckets=buckets, registry=lib)
    lhu = LoopHistogram("tw_lookup_seconds", "Lookup", (), loop, buckets)
    bounds = [float(b) for b in buckets if b != float("inf")]
    values = [
        *bounds,  # exactly on every bound: counted in that bound's bucket (le: less or equal)
        *(b * 1.0000001 for b in bounds),  # just above every bound: the next bucket
        0.0, -1.0, bounds[0] / 2,  # below the first bound
        bounds[-1] * 2, 1e9,  # above the last bound: only +Inf
        0.3, 0.7, 1.5, 2.75,
    ]
    for i, v in enumerate(values):
        labels = ("chat", "gpt-test") if i % 3 else ("completions", "instruct-test")
        h.labels(*labels).observe(v)
        lh.labels(*labels).observe(v)
        hu.observe(v)
        lhu.observe(v)
    text = exposition(loop)
    assert text == exposition(lib)
    # the counts by hand, for the unlabelled one: cumulative, every value in +Inf
    for b in bounds:
        le = sum(1 for v in values if v <= b)
        assert f'tw_lookup_seconds_bucket{{le="{b}"}} {float(le)}' in text.splitlines()
    assert f'tw_lookup_seconds_bucket{{le="+Inf"}} {float(len(values))}' in text.splitlines()
    assert f"tw_lookup_seconds_count {float(len(values))}" in text.splitlines()


def test_histogram_value_on_a_bound_is_in_that_bucket() -> None:
    lib, loop = pair()
    Histogram("tw_h", "h", buckets=(1, 2), registry=lib).observe(2)
    LoopHistogram("tw_h", "h", (), loop, (1, 2)).observe(2)
    text = exposition(loop)
    assert text == exposition(lib)
    lines = text.splitlines()
    assert 'tw_h_bucket{le="1.0"} 0.0' in lines and 'tw_h_bucket{le="2.0"} 1.0' in lines
    assert 'tw_h_bucket{le="+Inf"} 1.0' in lines and "tw_h_sum 2.0" in lines


def test_several_families_in_one_registry_keep_registration_order() -> None:
    lib, loop = pair()
    c, lc = Counter("tw_b", "b", ["k"], registry=lib), LoopCounter("tw_b", "b", ["k"], loop)
    g, lg = Gauge("tw_a", "a", registry=lib), LoopGauge("tw_a", "a", (), loop)
    h = Histogram("tw_c", "c", ["k"], buckets=(1,), registry=lib)
    lh = LoopHistogram("tw_c", "c", ["k"], loop, (1,))
    for name in ("y", "x", "y"):
        c.labels(name).inc()
        lc.labels(name).inc()
        h.labels(name).observe(0.5)
        lh.labels(name).observe(0.5)
    g.set(4)
    lg.labels().set(4)
    text = exposition(loop)
    assert text == exposition(lib)
    assert text.index("# HELP tw_b_total") < text.index("# HELP tw_a") < text.index("# HELP tw_c")
    assert text.index('tw_b_total{k="y"}') < text.index('tw_b_total{k="x"}')


# ---- misuse is refused like prometheus_client refuses it --------------------------------------------

LabelledFactory = Callable[[CollectorRegistry], Any]


@pytest.mark.parametrize(
    "make",
    [
        lambda r: LoopCounter("tw_x", "x", ["a", "b"], r),
        lambda r: LoopGauge("tw_x", "x", ["a", "b"], r),
        lambda r: LoopHistogram("tw_x", "x", ["a", "b"], r, (1, 2)),
    ],
    ids=["counter", "gauge", "histogram"],
)
def test_wrong_label_counts_raise_value_error(make: LabelledFactory) -> None:
    m = make(CollectorRegistry())
    for values in ((), ("only-one",), ("a", "b", "c")):
        with pytest.raises(ValueError):
            m.labels(*values)
    m.labels("a", "b")  # the right count works, and a bad call created no child
    assert list(m._children) == [("a", "b")]


def test_wrong_label_counts_raise_in_prometheus_client_too() -> None:
    """The reference behaviour the loop metrics follow."""
    c = Counter("tw_x", "x", ["a", "b"], registry=CollectorRegistry())
    for values in (("only-one",), ("a", "b", "c")):
        with pytest.raises(ValueError):
            c.labels(*values)


def test_unlabelled_shortcuts_on_a_labelled_metric_raise_value_error() -> None:
    r = CollectorRegistry()
    with pytest.raises(ValueError):
        LoopCounter("tw_c", "c", ["k"], r).inc()
    with pytest.raises(ValueError):
        LoopHistogram("tw_h", "h", ["k"], r, (1,)).observe(1.0)
    with pytest.raises(ValueError):
        Counter("tw_c2", "c", ["k"], registry=r).inc()


def test_counters_only_go_up() -> None:
    lc = LoopCounter("tw_c", "c", (), CollectorRegistry())
    with pytest.raises(ValueError):
        lc.inc(-1)
    with pytest.raises(ValueError):
        Counter("tw_c", "c", registry=CollectorRegistry()).inc(-1)
    lc.inc(0)
    assert lc.labels().value == 0


@pytest.mark.parametrize(
    "buckets", [(2, 1), (1, 1, 2), (), (float("inf"),)], ids=["decreasing", "duplicate", "none", "only-inf"]
)
def test_histogram_buckets_must_increase(buckets: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        LoopHistogram("tw_h", "h", (), CollectorRegistry(), buckets)


def test_names_are_checked_by_the_registry() -> None:
    r = CollectorRegistry()
    LoopCounter("tw_dup", "d", ["k"], r)
    with pytest.raises(ValueError):
        LoopCounter("tw_dup", "d", ["k"], r)
    with pytest.raises(ValueError):
        Counter("tw_dup", "d", ["k"], registry=r)  # clashes with the library's own metrics too
    LoopGauge("tw_free", "f", (), None)  # without a registry: not registered
    LoopGauge("tw_free", "f", (), r)
