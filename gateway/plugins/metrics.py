"""metrics plugin: Prometheus counters and histograms on the gateway's own registry."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from gateway.pipeline import Plugin, RequestContext
from gateway.pipeline.plugin import Handler

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class MetricsPlugin(Plugin):
    """Counts every request however it ended; `/metrics` serves the registry."""

    name = "metrics"
    fail_open = True

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = self.registry
        self.requests = Counter(
            "tollway_requests", "Requests by endpoint, model and HTTP status",
            ["endpoint", "model", "status"], registry=r,
        )
        self.duration = Histogram(
            "tollway_request_duration_seconds", "Whole request latency seen by the gateway",
            ["endpoint", "model"], buckets=_LATENCY, registry=r,
        )
        self.upstream = Histogram(
            "tollway_upstream_duration_seconds", "Time spent waiting on the upstream",
            ["provider", "deployment"], buckets=_LATENCY, registry=r,
        )
        self.overhead = Histogram(
            "tollway_gateway_overhead_seconds",
            "Time spent in the gateway itself, excluding the upstream",
            ["endpoint"], buckets=_OVERHEAD, registry=r,
        )
        self.ttfb = Histogram(
            "tollway_time_to_first_chunk_seconds", "Streams: request start to first byte sent",
            ["model"], buckets=_LATENCY, registry=r,
        )
        self.tokens = Counter(
            "tollway_tokens", "Tokens by model and kind (prompt, completion, cached)",
            ["model", "kind"], registry=r,
        )
        self.in_flight = Gauge(
            "tollway_requests_in_flight", "Requests being served now", registry=r
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = metric.labels(*labels)
            if len(self._children) < 100_000:
                self._children[key] = c
        return c

    async def on_headers(self, ctx: RequestContext) -> None:
        self.in_flight.inc()
        ctx.state["metrics.counted"] = True

    async def on_response(self, ctx: RequestContext) -> None:
        if ctx.state.pop("metrics.counted", False):
            self.in_flight.dec()
        model = ctx.public_model or "unknown"
        ep = ctx.endpoint
        self._child(self.requests, ep, model, str(ctx.status)).inc()
        self._child(self.duration, ep, model).observe(ctx.elapsed())
        if ctx.deployment is not None and ctx.upstream_s:
            self._child(self.upstream, ctx.provider or "", ctx.deployment).observe(ctx.upstream_s)
        if ctx.overhead_s is not None:
            self._child(self.overhead, ep).observe(ctx.overhead_s)
        if ctx.ttfb_s is not None:
            self._child(self.ttfb, model).observe(ctx.ttfb_s)
        u = ctx.usage
        if u is not None:
            if u.prompt_tokens:
                self._child(self.tokens, model, "prompt").inc(u.prompt_tokens)
            if u.completion_tokens:
                self._child(self.tokens, model, "completion").inc(u.completion_tokens)
            if u.cached_tokens:
                self._child(self.tokens, model, "cached").inc(u.cached_tokens)

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("GET", "/metrics", self._serve)]
