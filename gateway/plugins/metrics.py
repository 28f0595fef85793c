"""metrics plugin: Prometheus counters and histograms on the gateway's own registry."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.exposition import generate_latest

from gateway.loopmetrics import CounterChild, HistogramChild, LoopCounter, LoopGauge, LoopHistogram
from gateway.pipeline import Plugin, RequestContext
from gateway.pipeline.plugin import Handler

_Bundle = tuple[HistogramChild, HistogramChild, CounterChild, CounterChild, CounterChild, CounterChild]
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class MetricsPlugin(Plugin):
    """Counts every request however it ended; `/metrics` serves the registry.

    Its metrics are updated on the event loop only (gateway.loopmetrics: no lock per update)."""

    name = "metrics"
    fail_open = True

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = self.registry
        self.requests = LoopCounter(
            "tollway_requests", "Requests by endpoint, model and HTTP status",
            ["endpoint", "model", "status"], r,
        )
        self.duration = LoopHistogram(
            "tollway_request_duration_seconds",
            "Whole request latency seen by the gateway, by endpoint, model and HTTP status",
            ["endpoint", "model", "status"], r, _LATENCY,
        )
        self.upstream = LoopHistogram(
            "tollway_upstream_duration_seconds", "Time spent waiting on the upstream",
            ["provider", "deployment"], r, _LATENCY,
        )
        self.overhead = LoopHistogram(
            "tollway_gateway_overhead_seconds",
            "Time spent in the gateway itself, excluding the upstream",
            ["endpoint"], r, _OVERHEAD,
        )
        self.ttfb = LoopHistogram(
            "tollway_time_to_first_chunk_seconds", "Streams: request start to first byte sent",
            ["model"], r, _LATENCY,
        )
        self.tokens = LoopCounter(
            "tollway_tokens", "Tokens by model and kind (prompt, completion, cached)",
            ["model", "kind"], r,
        )
        self.in_flight = LoopGauge("tollway_requests_in_flight", "Requests being served now", (), r)
        self._in_flight = self.in_flight.labels()
        self._bundles: dict[tuple[str, str, int], _Bundle] = {}

    def on_headers(self, ctx: RequestContext) -> None:
        self._in_flight.value += 1
        ctx.state["metrics.counted"] = True

    def on_response(self, ctx: RequestContext) -> None:
        if ctx.state.pop("metrics.counted", False):
            self._in_flight.value -= 1
        model = ctx.public_model or "unknown"
        ep = ctx.endpoint
        status = ctx.status
        b = self._bundles.get((ep, model, status))
        if b is None:
            b = self._bundle(ep, model, status)
        b[5].value += 1
        b[0].observe(ctx.elapsed())
        if ctx.deployment is not None and ctx.upstream_s:
            self.upstream.labels(ctx.provider or "", ctx.deployment).observe(ctx.upstream_s)
        if ctx.overhead_s is not None:
            b[1].observe(ctx.overhead_s)
        if ctx.ttfb_s is not None:
            self.ttfb.labels(model).observe(ctx.ttfb_s)
        u = ctx.usage
        if u is not None:
            if u.prompt_tokens:
                b[2].value += u.prompt_tokens
            if u.completion_tokens:
                b[3].value += u.completion_tokens
            if u.cached_tokens:
                b[4].value += u.cached_tokens

    def _bundle(self, ep: str, model: str, status: int) -> _Bundle:
        """The children one (endpoint, model, status) updates on every request, looked up once."""
        b = (
            self.duration.labels(ep, model, str(status)), self.overhead.labels(ep),
            self.tokens.labels(model, "prompt"), self.tokens.labels(model, "completion"),
            self.tokens.labels(model, "cached"), self.requests.labels(ep, model, str(status)),
        )
        if len(self._bundles) < 10_000:
            self._bundles[(ep, model, status)] = b
        return b

    async def _serve(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("GET", "/metrics", self._serve)]
