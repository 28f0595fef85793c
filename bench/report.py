"""Turn load-run measurements into the benchmark's markdown table and target summary."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bench.loadgen import RunResult

DIRECT = "direct"
CORE = "core"
ROUTING_OK = "routing-ok"
ROUTING_FAIL = "routing-fail"
ROUTING_TOLERANCE = 0.20
"""Issue 4: with one deployment failing, overhead and CPU per request within 20% of healthy."""


@dataclass(frozen=True)
class Scenario:
    """One workload, run straight at the upstream and then through each gateway variant."""

    name: str
    concurrency: int
    requests: int
    stream: bool
    variants: tuple[str, ...] | None = None
    """Gateway variants that run this scenario (None: all of them); `direct` always runs."""

    @property
    def warmup(self) -> int:
        return max(2 * self.concurrency, self.requests // 20)

    def runs(self, variant: str) -> bool:
        return variant == DIRECT or self.variants is None or variant in self.variants


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

    def per_req_ms(self, cpu_s: float | None) -> float | None:
        if cpu_s is None or self.result.requests <= 0:
            return None
        return cpu_s * 1000 / self.result.requests


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


def _calls(row: Row) -> str:
    return ", ".join(f"{k} {ok}+{failed}" for k, (ok, failed) in row.upstream_calls.items()) or "-"


def render_table(rows: Sequence[Row]) -> str:
    """The markdown table: one row per scenario x variant; overheads against `direct`, ratios
    against `core` (the gateway with keys, limits and budgets off) of the same scenario."""
    stats = {(r.scenario.name, r.variant): Stats.of(r.result) for r in rows}
    core_cpu = {r.scenario.name: r.per_req_ms(r.gateway_cpu_s) for r in rows if r.variant == CORE}
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for row in rows:
        name = row.scenario.name
        s = stats[(name, row.variant)]
        base = stats.get((name, DIRECT)) if row.variant != DIRECT else None
        core = stats.get((name, CORE)) if row.variant not in (DIRECT, CORE) else None
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


def routing_summary(
    rows: Sequence[Row],
    healthy: str = ROUTING_OK,
    failing: str = ROUTING_FAIL,
    tolerance: float = ROUTING_TOLERANCE,
) -> list[str]:
    """One line per scenario run by both routing variants: (b) one deployment failing against
    (a) both healthy. Judged: no client errors in (b), overhead p50 and gateway CPU per request
    of (b) at most `tolerance` above (a)'s. Overhead p99, mean attempts and, when `core` ran, its
    overhead p50 and CPU (one deployment on one upstream, as (b) is while its breaker is open)
    are shown, not judged."""
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
        ob50, oa50 = sb.p50 - sd.p50, sa.p50 - sd.p50
        ob99, oa99 = sb.p99 - sd.p99, sa.p99 - sd.p99
        cb, ca = r.per_req_ms(r.gateway_cpu_s), ok.per_req_ms(ok.gateway_cpu_s)
        d50 = _change(ob50, oa50)
        dcpu = _change(cb, ca) if cb is not None and ca is not None else math.inf
        missed = [
            what
            for what, bad in (
                ("client errors", r.result.error_count > 0),
                ("overhead p50", d50 > tolerance),
                ("gateway CPU/request", dcpu > tolerance),
            )
            if bad
        ]
        verdict = f"MISSED ({', '.join(missed)})" if missed else "met"
        fails = ", ".join(f"{k} {ok_}+{failed}" for k, (ok_, failed) in r.upstream_calls.items())
        core = by.get((name, CORE))
        core_text = ""
        if core is not None:
            cc = core.per_req_ms(core.gateway_cpu_s)
            core_text = (
                f"; {CORE} (one deployment): overhead p50 {Stats.of(core.result).p50 - sd.p50:.2f} ms, "
                f"gateway CPU {_f(cc, 3)} ms/req"
            )
        out.append(
            f"routing {name}: {failing} vs {healthy}: within {tolerance:.0%}: {verdict}: "
            f"client errors {r.result.error_count} vs {ok.result.error_count}; "
            f"overhead p50 {ob50:.2f} vs {oa50:.2f} ms ({d50:+.0%}); "
            f"gateway CPU {_f(cb, 3)} vs {_f(ca, 3)} ms/req ({dcpu:+.0%}); "
            f"overhead p99 {ob99:.2f} vs {oa99:.2f} ms (not judged); "
            f"mean attempts {_attempts(r.result)} vs {_attempts(ok.result)}; "
            f"upstream calls 200+503 in {failing}: {fails or '-'}{core_text}"
        )
    return out
