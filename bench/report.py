"""Turn load-run measurements into the benchmark's markdown tables and target summaries.

The main table (`render_table`) and its summary lines (`target_summary`, `routing_summary`,
`cache_summary`), and the semantic section's gateway table (`render_semantic`,
`semantic_summary`), which reads the gateway's own Prometheus histograms (`Hist`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from bench.loadgen import RunResult

DIRECT = "direct"
DIRECT_FAKE = "direct-fake"
"""The test fake upstream (aiohttp) measured straight: the baseline of `cache-fake`."""
BASELINES = (DIRECT, DIRECT_FAKE)
CORE = "core"
ROUTING_OK = "routing-ok"
ROUTING_FAIL = "routing-fail"
ROUTING_TOLERANCE = 0.20
"""Issue 4: with one deployment failing, overhead and CPU per request within 20% of healthy."""
CACHE_TARGET = 3.0
"""Issue 5: exact-cache hits at >= 3x the requests/s of a miss through the fake upstream."""
LOOP_LAG_TARGET_S = 0.005
"""Issue 5: the event loop's own latency stays under 5 ms while embeddings run."""
LOOKUP_HIST = "tollway_cache_semantic_lookup_seconds"
LOOP_LAG_HIST = "tollway_event_loop_lag_seconds"
BATCH_HIST = "tollway_cache_embedding_batch_size"


@dataclass(frozen=True)
class Scenario:
    """One workload, run straight at the upstream and then through each gateway variant."""

    name: str
    concurrency: int
    requests: int
    stream: bool
    variants: tuple[str, ...] | None = None
    """Gateway variants that run this scenario (None: all of them)."""
    cache: Literal["miss", "hit", "semantic"] | None = None
    """None: the one fixed uncacheable body (no temperature: `x-tollway-cache: bypass`).
    "miss": every request (warmup included) a new body, temperature 0: each must come back
    `x-tollway-cache: miss`. "hit": one cacheable body, cached by the warmup: `hit-exact`.
    "semantic": new prompts of one shape, temperature 0: `miss` or `hit-semantic` (each an
    exact miss that makes a semantic lookup)."""
    direct: bool = True
    """Also run it straight at the upstream (`direct`, or `direct-fake` for `cache-fake`)."""
    rounds: int = 1
    """Run it this many times, the targets interleaved in each round; the table shows the
    pooled rounds, the routing summary judges the median of the per-round figures."""

    @property
    def warmup(self) -> int:
        return max(2 * self.concurrency, self.requests // 20)

    @property
    def expect_cache(self) -> tuple[str, ...] | None:
        """The `x-tollway-cache` values each gateway response must carry (None: not checked)."""
        return {"miss": ("miss",), "hit": ("hit-exact",), "semantic": ("miss", "hit-semantic")}.get(
            self.cache or ""
        )

    def runs(self, variant: str) -> bool:
        """Whether gateway `variant` runs it (the baselines are decided by the driver)."""
        return self.variants is None or variant in self.variants


@dataclass
class Row:
    """One table row: a scenario against one variant, with the process probes around it."""

    scenario: Scenario
    variant: str  # "direct", "core", "embedded", "redis"
    result: RunResult
    upstream_cpu_s: float
    loadgen_cpu_s: float
    gateway_cpu_s: float | None = None
    gateway_rss_mb: float | None = None
    store_cpu_s: float | None = None
    """CPU of an out-of-process store (the redis-server) during the measured phase."""
    upstream_calls: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Chat completions each fake upstream answered during the measured phase: (200s, 503s)."""
    baseline: str = DIRECT
    """The row the overhead columns subtract (`direct`, or `direct-fake` for `cache-fake`)."""
    hists: dict[str, Hist] = field(default_factory=dict)
    """The gateway's histograms over the measured phase (after minus before), when scraped."""
    rounds: list[Row] = field(default_factory=list)
    """The per-round rows this one pools (a scenario with `rounds` > 1), else empty."""

    def per_req_ms(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.result.requests <= 0:
            return None
        return cpu_s * 1000 / self.result.requests


def _sum(values: Sequence[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


def pool_rounds(rounds: Sequence[Row]) -> Row:
    """One row for several rounds of a scenario on one target: latencies, errors and counts
    pooled, CPU summed, RSS the largest; the rounds kept in `Row.rounds`."""
    first = rounds[0]
    results = [r.result for r in rounds]
    result = RunResult(
        requests=sum(r.requests for r in results),
        concurrency=first.result.concurrency,
        elapsed_ns=sum(r.elapsed_ns for r in results),
        latencies_ns=first.result.latencies_ns[:0],
        ttfc_ns=first.result.ttfc_ns[:0],
        overhead_hdr_ms=[v for r in results for v in r.overhead_hdr_ms],
    )
    for r in results:
        result.latencies_ns.extend(r.latencies_ns)
        result.ttfc_ns.extend(r.ttfc_ns)
        result.errors.update(r.errors)
        result.attempts.update(r.attempts)
        result.deployments.update(r.deployments)
        result.cache.update(r.cache)
    calls: dict[str, tuple[int, int]] = {}
    for row in rounds:
        for k, (ok, failed) in row.upstream_calls.items():
            a, b = calls.get(k, (0, 0))
            calls[k] = (a + ok, b + failed)
    rss = [r.gateway_rss_mb for r in rounds if r.gateway_rss_mb is not None]
    return Row(
        scenario=first.scenario,
        variant=first.variant,
        result=result,
        upstream_cpu_s=sum(r.upstream_cpu_s for r in rounds),
        loadgen_cpu_s=sum(r.loadgen_cpu_s for r in rounds),
        gateway_cpu_s=_sum([r.gateway_cpu_s for r in rounds]),
        gateway_rss_mb=max(rss) if rss else None,
        store_cpu_s=_sum([r.store_cpu_s for r in rounds]),
        upstream_calls=calls,
        baseline=first.baseline,
        rounds=list(rounds),
    )


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class Stats:
    rps: float
    p50: float
    p90: float
    p99: float
    ttfc_p50: float
    ttfc_p99: float
    hdr_p50: float

    @classmethod
    def of(cls, r: RunResult) -> Stats:
        lat = sorted(v / 1e6 for v in r.latencies_ns)
        ttfc = sorted(v / 1e6 for v in r.ttfc_ns)
        hdr = sorted(r.overhead_hdr_ms)
        return cls(
            rps=r.rps,
            p50=percentile(lat, 50),
            p90=percentile(lat, 90),
            p99=percentile(lat, 99),
            ttfc_p50=percentile(ttfc, 50),
            ttfc_p99=percentile(ttfc, 99),
            hdr_p50=percentile(hdr, 50),
        )


def _f(v: float | None, digits: int = 2) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.{digits}f}"


def _ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or math.isnan(v) or math.isnan(base) or base <= 0:
        return "-"
    return f"{v / base:.2f}x"


COLUMNS = [
    "scenario",
    "variant",
    "reqs",
    "errors",
    "req/s",
    "req/s vs core",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "TTFC p50 ms",
    "TTFC p99 ms",
    "overhead p50 ms",
    "overhead p99 ms",
    "overhead TTFC p50 ms",
    "x-tollway-overhead-ms p50",
    "gateway CPU ms/req",
    "gateway CPU vs core",
    "redis CPU ms/req",
    "upstream CPU ms/req",
    "loadgen CPU ms/req",
    "gateway RSS MB",
    "attempts mean (max)",
    "served by deployment",
    "x-tollway-cache",
    "upstream calls 200+503",
]


def _attempts(r: RunResult) -> str:
    mean = r.attempts_mean
    return f"{mean:.3f} ({max(r.attempts)})" if mean is not None else "-"


def _shares(r: RunResult) -> str:
    """Successful responses by `x-tollway-deployment` (shown by provider: the part before /)."""
    n = sum(r.deployments.values())
    if not n:
        return "-"
    return " ".join(
        f"{name.split('/', 1)[0]} {count / n:.1%}" for name, count in sorted(r.deployments.items())
    )


def _cache_shares(r: RunResult) -> str:
    """200 responses by `x-tollway-cache` (`-`: no header, e.g. straight at an upstream)."""
    n = sum(r.cache.values())
    if not n or set(r.cache) == {"-"}:
        return "-"
    return " ".join(f"{name} {count / n:.1%}" for name, count in sorted(r.cache.items()))


def _calls(row: Row) -> str:
    return ", ".join(f"{k} {ok}+{failed}" for k, (ok, failed) in row.upstream_calls.items()) or "-"


def render_table(rows: Sequence[Row]) -> str:
    """The markdown table: one row per scenario x variant; overheads against the row's
    baseline (`direct`, or `direct-fake`), ratios against `core` (the gateway with keys, limits
    and budgets off) of the same scenario."""
    stats = {(r.scenario.name, r.variant): Stats.of(r.result) for r in rows}
    core_cpu = {r.scenario.name: r.per_req_ms(r.gateway_cpu_s) for r in rows if r.variant == CORE}
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for row in rows:
        name = row.scenario.name
        s = stats[(name, row.variant)]
        base = stats.get((name, row.baseline)) if row.variant not in BASELINES else None
        core = stats.get((name, CORE)) if row.variant not in (*BASELINES, CORE) else None
        stream = row.scenario.stream
        cpu = row.per_req_ms(row.gateway_cpu_s)
        cells = [
            name,
            row.variant,
            str(row.result.requests),
            str(row.result.error_count),
            _f(s.rps, 0),
            _ratio(s.rps, core.rps) if core else "-",
            _f(s.p50),
            _f(s.p90),
            _f(s.p99),
            _f(s.ttfc_p50) if stream else "-",
            _f(s.ttfc_p99) if stream else "-",
            _f(s.p50 - base.p50) if base else "-",
            _f(s.p99 - base.p99) if base else "-",
            _f(s.ttfc_p50 - base.ttfc_p50) if base and stream else "-",
            _f(s.hdr_p50, 3),
            _f(cpu, 3),
            _ratio(cpu, core_cpu.get(name)) if core else "-",
            _f(row.per_req_ms(row.store_cpu_s), 3),
            _f(row.per_req_ms(row.upstream_cpu_s), 3),
            _f(row.per_req_ms(row.loadgen_cpu_s), 3),
            _f(row.gateway_rss_mb, 1),
            _attempts(row.result),
            _shares(row.result),
            _cache_shares(row.result),
            _calls(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_summary(rows: Sequence[Row], targets: Mapping[str, float]) -> list[str]:
    """One line per variant with a CPU target: its gateway CPU per request in each
    non-streaming scenario against the target, next to core's (streams are not judged)."""
    core_cpu = {r.scenario.name: r.per_req_ms(r.gateway_cpu_s) for r in rows if r.variant == CORE}
    out: list[str] = []
    for variant, limit in targets.items():
        parts: list[str] = []
        missed = False
        for r in rows:
            cpu = r.per_req_ms(r.gateway_cpu_s)
            if r.variant != variant or r.scenario.stream or cpu is None:
                continue
            core = core_cpu.get(r.scenario.name)
            extra = f", core {core:.3f}, +{cpu - core:.3f}" if core is not None else ""
            store = r.per_req_ms(r.store_cpu_s)
            extra += f", +redis {store:.3f} = {cpu + store:.3f}" if store is not None else ""
            parts.append(f"{r.scenario.name} {cpu:.3f}{extra}")
            missed = missed or cpu > limit
        if parts:
            verdict = "MISSED" if missed else "met"
            out.append(
                f"target {variant} <= {limit:g} ms gateway CPU/request: {verdict} "
                f"(ms/req: {'; '.join(parts)})"
            )
    return out


def _change(v: float, base: float) -> float:
    return (v - base) / base if base > 0 else math.inf


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return math.nan if not n else (v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2)


def _overheads(row: Row, direct: Row, what: str) -> tuple[float, list[float]]:
    """(judged value, per-round values) of the overhead `what` ("p50" or "ttfc_p50") of `row`
    over `direct`: with rounds, each round against the direct run of the same round and the
    median of those; without, the pooled figures."""
    pairs = (
        list(zip(row.rounds, direct.rounds, strict=True))
        if row.rounds and len(row.rounds) == len(direct.rounds)
        else [(row, direct)]
    )
    per = [getattr(Stats.of(a.result), what) - getattr(Stats.of(b.result), what) for a, b in pairs]
    return _median(per), per


def routing_summary(
    rows: Sequence[Row],
    healthy: str = ROUTING_OK,
    failing: str = ROUTING_FAIL,
    tolerance: float = ROUTING_TOLERANCE,
) -> list[str]:
    """One line per scenario run by both routing variants: (b) one deployment failing against
    (a) both healthy. Judged: no client errors in (b); overhead p50 (for streams also the
    time-to-first-chunk overhead p50) and gateway CPU per request of (b) at most `tolerance`
    above (a)'s. A scenario run in rounds (targets interleaved) is judged on the median of the
    per-round overheads, each against the direct run of its round. Overhead p99, mean attempts
    and, when `core` ran, its overhead p50 and CPU (one deployment on one upstream) are shown,
    not judged."""
    by = {(r.scenario.name, r.variant): r for r in rows}
    out: list[str] = []
    for r in rows:
        if r.variant != failing:
            continue
        name = r.scenario.name
        ok, direct = by.get((name, healthy)), by.get((name, DIRECT))
        if ok is None or direct is None:
            continue
        sb, sa, sd = Stats.of(r.result), Stats.of(ok.result), Stats.of(direct.result)
        ob50, ob_rounds = _overheads(r, direct, "p50")
        oa50, oa_rounds = _overheads(ok, direct, "p50")
        ob99, oa99 = sb.p99 - sd.p99, sa.p99 - sd.p99
        cb, ca = r.per_req_ms(r.gateway_cpu_s), ok.per_req_ms(ok.gateway_cpu_s)
        d50 = _change(ob50, oa50)
        dcpu = _change(cb, ca) if cb is not None and ca is not None else math.inf
        judged = [
            ("client errors", r.result.error_count > 0),
            ("overhead p50", d50 > tolerance),
            ("gateway CPU/request", dcpu > tolerance),
        ]
        ttfc_text = ""
        if r.scenario.stream:
            tb, tb_rounds = _overheads(r, direct, "ttfc_p50")
            ta, ta_rounds = _overheads(ok, direct, "ttfc_p50")
            dt = _change(tb, ta)
            judged.append(("TTFC overhead p50", dt > tolerance))
            ttfc_text = (
                f"TTFC overhead p50 {tb:.2f} vs {ta:.2f} ms ({dt:+.0%})"
                + (f" [rounds {_list(tb_rounds)} vs {_list(ta_rounds)}]" if len(tb_rounds) > 1 else "")
                + "; "
            )
        missed = [what for what, bad in judged if bad]
        verdict = f"MISSED ({', '.join(missed)})" if missed else "met"
        fails = ", ".join(f"{k} {ok_}+{failed}" for k, (ok_, failed) in r.upstream_calls.items())
        core = by.get((name, CORE))
        core_text = ""
        if core is not None:
            cc = core.per_req_ms(core.gateway_cpu_s)
            core_text = (
                f"; {CORE} (one deployment): overhead p50 {_overheads(core, direct, 'p50')[0]:.2f} ms, "
                f"gateway CPU {_f(cc, 3)} ms/req"
            )
        rounds_text = (
            f" [median of {len(ob_rounds)} rounds: {_list(ob_rounds)} vs {_list(oa_rounds)}]"
            if len(ob_rounds) > 1
            else ""
        )
        out.append(
            f"routing {name}: {failing} vs {healthy}: within {tolerance:.0%}: {verdict}: "
            f"client errors {r.result.error_count} vs {ok.result.error_count}; "
            f"overhead p50 {ob50:.2f} vs {oa50:.2f} ms ({d50:+.0%}){rounds_text}; "
            f"{ttfc_text}"
            f"gateway CPU {_f(cb, 3)} vs {_f(ca, 3)} ms/req ({dcpu:+.0%}); "
            f"overhead p99 {ob99:.2f} vs {oa99:.2f} ms (not judged); "
            f"mean attempts {_attempts(r.result)} vs {_attempts(ok.result)}; "
            f"upstream calls 200+503 in {failing}: {fails or '-'}{core_text}"
        )
    return out


def _list(values: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def cache_summary(rows: Sequence[Row], target: float = CACHE_TARGET) -> list[str]:
    """One line per variant that ran both a "miss" and a "hit" scenario (issue 5): hit req/s /
    miss req/s against `target`, and gateway CPU per request of hits against misses. PASS needs
    the ratio and no errors (a wrong `x-tollway-cache` is an error) in either run."""
    out: list[str] = []
    variants = dict.fromkeys(r.variant for r in rows if r.scenario.cache in ("miss", "hit"))
    for variant in variants:
        miss = next((r for r in rows if r.variant == variant and r.scenario.cache == "miss"), None)
        hit = next((r for r in rows if r.variant == variant and r.scenario.cache == "hit"), None)
        if miss is None or hit is None or variant in BASELINES:
            continue
        mr, hr = miss.result.rps, hit.result.rps
        ratio = hr / mr if mr > 0 else math.nan
        mc, hc = miss.per_req_ms(miss.gateway_cpu_s), hit.per_req_ms(hit.gateway_cpu_s)
        errors = miss.result.error_count + hit.result.error_count
        verdict = "PASS" if ratio >= target and errors == 0 else "MISS"
        why = f" ({errors} errors)" if errors else ""
        out.append(
            f"cache {variant}: hits {ratio:.2f}x the req/s of misses (target >= {target:g}x): "
            f"{verdict}{why}: {hr:.0f} vs {mr:.0f} req/s ({hit.scenario.name} / {miss.scenario.name}); "
            f"gateway CPU/request hit {_f(hc, 3)} vs miss {_f(mc, 3)} ms = "
            f"{_ratio(hc, mc)} (misses cost {_ratio(mc, hc)} a hit's CPU); "
            f"p50 {Stats.of(hit.result).p50:.2f} vs {Stats.of(miss.result).p50:.2f} ms"
        )
    return out


# ---- the gateway's Prometheus histograms (semantic section) ------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ([^ ]+)")


@dataclass
class Hist:
    """One Prometheus histogram without labels: cumulative bucket counts by upper bound."""

    buckets: list[tuple[float, float]]
    """(le, cumulative count), ascending, +Inf last."""
    count: float
    sum: float

    def __sub__(self, before: Hist) -> Hist:
        old = dict(before.buckets)
        return Hist(
            [(le, c - old.get(le, 0.0)) for le, c in self.buckets],
            self.count - before.count,
            self.sum - before.sum,
        )

    def cum(self, le: float) -> float:
        """Observations <= `le` (`le` must be a bucket bound)."""
        return next((c for b, c in self.buckets if b == le), math.nan)

    def quantile(self, q: float) -> float:
        """Estimated like Prometheus' histogram_quantile: linear within the bucket holding the
        rank; +Inf when the rank falls in the +Inf bucket (NaN with no observations)."""
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        lower, prev = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank and c > prev:
                if math.isinf(le):
                    return math.inf
                return lower + (le - lower) * (rank - prev) / (c - prev)
            lower, prev = le, c
        return math.inf

    def max_bound(self) -> float:
        """The upper bound of the bucket that holds the largest observation (NaN if none)."""
        if self.count <= 0:
            return math.nan
        return next((le for le, c in self.buckets if c >= self.count), math.inf)

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count > 0 else math.nan


def parse_histograms(text: str, names: Sequence[str]) -> dict[str, Hist]:
    """The unlabelled histograms `names` from a Prometheus text exposition."""
    parts: dict[str, dict[str, object]] = {n: {"buckets": []} for n in names}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        metric, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        for name in names:
            if metric == f"{name}_bucket":
                le = re.search(r'le="([^"]+)"', labels)
                if le is not None:
                    buckets = parts[name]["buckets"]
                    assert isinstance(buckets, list)
                    buckets.append((float(le.group(1)), value))
            elif metric == f"{name}_count":
                parts[name]["count"] = value
            elif metric == f"{name}_sum":
                parts[name]["sum"] = value
    out: dict[str, Hist] = {}
    for name, p in parts.items():
        buckets = p["buckets"]
        count, total = p.get("count"), p.get("sum")
        if buckets and isinstance(buckets, list) and isinstance(count, float) and isinstance(total, float):
            out[name] = Hist(sorted(buckets), count, total)
    return out


def _ms(v: float, h: Hist | None = None) -> str:
    """Seconds as ms; an estimate that falls in the +Inf bucket shows as "> <last bound of h>"."""
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        top = h.buckets[-2][0] if h is not None and len(h.buckets) >= 2 else math.nan
        return f"> {top * 1000:g}" if not math.isnan(top) else "> max bucket"
    return f"{v * 1000:.1f}"


def _max_text(h: Hist) -> str:
    """Where the largest observation lies: "<= <its bucket's bound> ms" or "> <top bound> ms"."""
    bound = _ms(h.max_bound(), h)
    return f"{bound} ms" if bound.startswith(">") else f"<= {bound} ms"


def _lag_over(h: Hist, limit: float = LOOP_LAG_TARGET_S) -> float:
    return (h.count - h.cum(limit)) / h.count if h.count > 0 else math.nan


SEMANTIC_COLUMNS = [
    "scenario",
    "reqs",
    "errors",
    "req/s",
    "p50 ms",
    "p99 ms",
    "x-tollway-cache",
    "lookups",
    "lookup p50 ms (est.)",
    "lookup p99 ms (est.)",
    "lookup mean ms",
    "mean embed batch",
    "loop lag samples",
    "loop lag p99 ms (est.)",
    "loop lag > 5 ms",
    "loop lag max <= ms",
    "gateway CPU ms/req",
    "gateway RSS MB",
]


def _idle_cells(idle: Hist, seconds: float) -> list[str]:
    cells = ["-"] * len(SEMANTIC_COLUMNS)
    cells[0] = f"idle gateway, {seconds:g} s (baseline)"
    i = SEMANTIC_COLUMNS.index("loop lag samples")
    cells[i : i + 4] = [
        f"{idle.count:.0f}",
        _ms(idle.quantile(0.99), idle),
        f"{_lag_over(idle):.1%}" if idle.count else "-",
        _ms(idle.max_bound(), idle),
    ]
    return cells


def render_semantic(rows: Sequence[Row], idle: Hist | None = None, idle_s: float = 0.0) -> str:
    """The semantic gateway's table: client-side figures and, from its /metrics (diff over the
    measured phase), semantic lookup latency, embedding batch size and event-loop lag; first,
    when given, the loop lag of the idle gateway (`idle`, over `idle_s`): the machine's floor."""
    lines = [
        "| " + " | ".join(SEMANTIC_COLUMNS) + " |",
        "|---|" + "|".join("---:" for _ in SEMANTIC_COLUMNS[1:]) + "|",
    ]
    if idle is not None:
        lines.append("| " + " | ".join(_idle_cells(idle, idle_s)) + " |")
    for row in rows:
        s = Stats.of(row.result)
        look, lag, batch = (row.hists.get(n) for n in (LOOKUP_HIST, LOOP_LAG_HIST, BATCH_HIST))
        cells = [
            row.scenario.name,
            str(row.result.requests),
            str(row.result.error_count),
            _f(s.rps, 0),
            _f(s.p50),
            _f(s.p99),
            _cache_shares(row.result),
            f"{look.count:.0f}" if look else "-",
            _ms(look.quantile(0.5), look) if look else "-",
            _ms(look.quantile(0.99), look) if look else "-",
            _ms(look.mean) if look else "-",
            _f(batch.mean, 1) if batch else "-",
            f"{lag.count:.0f}" if lag else "-",
            _ms(lag.quantile(0.99), lag) if lag else "-",
            f"{_lag_over(lag):.1%}" if lag and lag.count else "-",
            _ms(lag.max_bound(), lag) if lag else "-",
            _f(row.per_req_ms(row.gateway_cpu_s), 3),
            _f(row.gateway_rss_mb, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def semantic_summary(
    rows: Sequence[Row], idle: Hist | None = None, limit_s: float = LOOP_LAG_TARGET_S
) -> list[str]:
    """Issue 5's loop-lag target per semantic scenario: PASS when no lag sample of the measured
    phase fell above the `limit_s` bucket; else the share that did and the max's bucket. With
    `idle`, the same figures of the idle gateway (not judged: what the machine alone causes)."""
    out: list[str] = []
    if idle is not None and idle.count > 0:
        over = idle.count - idle.cum(limit_s)
        out.append(
            f"semantic idle gateway (not judged, the floor): {over:.0f} of {idle.count:.0f} loop-lag "
            f"samples over {limit_s * 1000:g} ms ({over / idle.count:.1%}), max {_max_text(idle)}"
        )
    for row in rows:
        lag, look = row.hists.get(LOOP_LAG_HIST), row.hists.get(LOOKUP_HIST)
        if lag is None or lag.count <= 0:
            out.append(f"semantic {row.scenario.name}: event-loop lag < {limit_s * 1000:g} ms: no samples")
            continue
        over = lag.count - lag.cum(limit_s)
        verdict = "PASS"
        if over > 0:
            verdict = f"MISS ({over:.0f} of {lag.count:.0f} samples over, {over / lag.count:.1%})"
        lookups = (
            f"; semantic lookup p50 ~{_ms(look.quantile(0.5), look)} / "
            f"p99 ~{_ms(look.quantile(0.99), look)} ms "
            f"over {look.count:.0f} lookups"
            if look is not None and look.count > 0
            else ""
        )
        out.append(
            f"semantic {row.scenario.name}: event-loop lag < {limit_s * 1000:g} ms while embeddings run: "
            f"{verdict}; max lag {_max_text(lag)} (bucket bound), {lag.count:.0f} samples"
            f"{lookups}; {row.result.rps:.0f} req/s, client p50 {Stats.of(row.result).p50:.1f} / "
            f"p99 {Stats.of(row.result).p99:.1f} ms"
        )
    return out
