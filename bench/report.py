"""Turn load-run measurements into the benchmark's single markdown table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.loadgen import RunResult


@dataclass(frozen=True)
class Scenario:
    """One workload, run once straight at the upstream and once through the gateway."""

    name: str
    concurrency: int
    requests: int
    stream: bool

    @property
    def warmup(self) -> int:
        return max(2 * self.concurrency, self.requests // 20)


@dataclass
class Row:
    """One table row: a scenario against one target, with the process probes around it."""

    scenario: Scenario
    target: str  # "direct" or "tollway"
    result: RunResult
    upstream_cpu_s: float
    loadgen_cpu_s: float
    gateway_cpu_s: float | None = None
    gateway_rss_mb: float | None = None


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


def _per_req_ms(cpu_s: float | None, requests: int) -> str:
    if cpu_s is None or requests <= 0:
        return "-"
    return f"{cpu_s * 1000 / requests:.3f}"


COLUMNS = [
    "scenario",
    "target",
    "reqs",
    "errors",
    "req/s",
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
    "upstream CPU ms/req",
    "loadgen CPU ms/req",
    "gateway RSS MB",
]


def render_table(rows: Sequence[Row]) -> str:
    """The markdown table: one row per scenario x target, overheads on the tollway rows."""
    direct: dict[str, Stats] = {}
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for row in rows:
        s = Stats.of(row.result)
        base = direct.get(row.scenario.name)
        if row.target == "direct":
            direct[row.scenario.name] = s
        stream = row.scenario.stream
        over = row.target != "direct" and base is not None
        cells = [
            row.scenario.name,
            row.target,
            str(row.result.requests),
            str(row.result.error_count),
            _f(s.rps, 0),
            _f(s.p50),
            _f(s.p90),
            _f(s.p99),
            _f(s.ttfc_p50) if stream else "-",
            _f(s.ttfc_p99) if stream else "-",
            _f(s.p50 - base.p50) if over and base else "-",
            _f(s.p99 - base.p99) if over and base else "-",
            _f(s.ttfc_p50 - base.ttfc_p50) if over and base and stream else "-",
            _f(s.hdr_p50, 3),
            _per_req_ms(row.gateway_cpu_s, row.result.requests),
            _per_req_ms(row.upstream_cpu_s, row.result.requests),
            _per_req_ms(row.loadgen_cpu_s, row.result.requests),
            _f(row.gateway_rss_mb, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
