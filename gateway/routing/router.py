"""Router: the one place that calls providers — picks deployments, retries, breaks circuits, falls back.

For each request: resolve the public model, then try its deployments (skipping open breakers, full
deployments and exhausted quotas), retrying retryable failures (429, 5xx, timeouts, connection
errors — never 4xx) with full-jitter backoff or the upstream's retry-after, within an attempt
budget and an overall deadline; when every deployment failed or is unavailable, go down the
model's ordered fallbacks whose rules match the failure. A stream counts as answered at its
first chunk: until then it can be retried or fall back; after it, nothing is retried, but how it
ended (`[DONE]`, an in-band error, a cut) is still the attempt's outcome. A deployment that
answered 429 with a retry-after cools down that long (capped): the picker skips it meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from bisect import bisect_right
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.errors import (
    BadGateway,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.pipeline.context import CAP_INJECTED, STREAM_END, Endpoint, RequestContext, Usage
from gateway.providers.base import Provider, Reply, UpstreamRequest, UpstreamStream
from gateway.providers.http import first_byte_timeout
from gateway.routing.breaker import BreakerBoard, CircuitBreaker
from gateway.settings import FallbackSettings, ModelSettings, RetrySettings, Settings, Timeouts
from gateway.store.base import Store, StoreUnavailable
from gateway.wire.tokens import estimate_prompt_tokens, max_output_tokens

log = logging.getLogger("tollway.router")

_STATE_CODE = {"closed": 0, "half_open": 1, "open": 2}
_SYNC_EVERY_S = 1.0
_DEPLOYMENT_FAILURES = frozenset(
    {"rate_limit", "server_error", "timeout", "unavailable", "stream_broken", "stream_error"}
)
LATENCY_EXPLORE = 0.05
"""lowest_latency: the share of requests sent to another healthy deployment than the fastest, so a
deployment that was slow once is measured again (and wins back its traffic once it is fast)."""
LATENCY_STALE_S = 60.0
"""A latency average whose last sample is older than this is replaced by the next sample, not
blended with it: an old measurement says little about now."""


class _DeadlineExceeded(UpstreamTimeout):
    """The request's overall routing deadline ended an attempt in progress."""


@dataclass(slots=True, eq=False)
class Deployment:
    name: str
    provider: Provider
    provider_name: str
    upstream_model: str
    weight: float
    rpm: int
    tpm: int
    max_concurrency: int
    timeouts: Timeouts | None
    provider_rpm: int
    provider_tpm: int
    max_queue_s: float
    breaker: CircuitBreaker
    first_byte_s: float = 120.0
    """Streams: the longest wait for the first content (the deployment's or provider's timeouts)."""
    cap_field: str = "max_tokens"
    """The chat field the gateway's own output cap is sent in (the provider's `cap_field`)."""
    in_flight: int = 0
    ewma_ttft: float | None = None
    ewma_at: float = 0.0
    """Monotonic time of the latest latency sample."""
    cooldown_until: float = 0.0
    """Monotonic time until which a 429's retry-after keeps the picker away."""


@dataclass(slots=True, frozen=True)
class ModelRoute:
    public_name: str
    deployments: tuple[Deployment, ...]
    endpoints: frozenset[str]
    owned_by: str
    created: int
    strategy: str
    fallbacks: tuple[FallbackSettings, ...]
    retry: RetrySettings


@dataclass(slots=True)
class _Attempts:
    """Bookkeeping of one request's attempts across deployments and fallbacks."""

    max: int
    deadline: float
    count: int = 0
    last_error: GatewayError | None = None
    tried: list[str] = field(default_factory=list)
    queued_s: float = 0.0
    """Time spent waiting for provider quotas so far (bounded by the providers' max_queue_s)."""


@dataclass(slots=True)
class RoutedRequest(UpstreamRequest):
    """An UpstreamRequest with what the router knows of the client (adapters read it with
    getattr, so a plain UpstreamRequest still works)."""

    client_wants_usage: bool = False
    """The client asked for usage (`stream_options.include_usage`); the body always asks the
    upstream for it, for the gateway's own accounting."""


def failure_kind(e: GatewayError) -> str | None:
    """The fallback category of a failure, or None when retrying cannot help (client errors)."""
    if isinstance(e, UpstreamTimeout):
        return "timeout"
    if isinstance(e, UpstreamUnavailable):
        return "unavailable"
    if e.status == 429:
        return "rate_limit"
    if e.status >= 500:
        return "server_error"
    if e.status in (400, 413):
        text = f"{e.code or ''} {e.message}".lower()
        if "context_length" in text or "context length" in text or "maximum context" in text:
            return "context_length"
    return None


def _stream_error(dep: Deployment, first: bytes) -> GatewayError:
    """An upstream stream whose first event is an in-band error, as an error before any byte."""
    line = first.split(b"\n", 1)[0][5:].strip()
    try:
        err = orjson.loads(line).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        err = {}
    message = str(err.get("message") or "error") if isinstance(err, dict) else str(err)
    return BadGateway(
        f"The upstream provider {dep.provider_name} failed the stream before its first token: "
        f"{message}",
        code="upstream_stream_error",
    )


def _first_data_line(data: bytes) -> int:
    """Where the first line starting with `data:` begins in `data` (-1: none yet)."""
    if data.startswith(b"data:"):
        return 0
    found = [i + 1 for i in (data.find(b"\ndata:"), data.find(b"\rdata:")) if i >= 0]
    return min(found) if found else -1


def retry_after_s(e: GatewayError) -> float | None:
    h = e.headers
    try:
        if "retry-after-ms" in h:
            return float(h["retry-after-ms"]) / 1000
        if "retry-after" in h:
            return float(h["retry-after"])
    except ValueError:
        return None
    return None


class _RoutedStream:
    """The chosen upstream stream, its first chunk already read; reports the outcome on close.

    The outcome is how the stream ended, as the client relay judged it (its `StreamRelay` parses
    the bytes once, and it leaves its verdict in `ctx.state[STREAM_END]`): `[DONE]` is a
    success; an in-band error event is `stream_error`; a failure raised while reading, or an end
    of the body without `[DONE]`, is `stream_broken`. Closed before any of these (the client went
    away) says nothing against the deployment."""

    __slots__ = ("_closed", "_ctx", "_dep", "_failed", "_first", "_router", "_stream")

    def __init__(
        self, router: Router, ctx: RequestContext, dep: Deployment, stream: UpstreamStream, first: bytes
    ) -> None:
        self._router = router
        self._ctx = ctx
        self._dep = dep
        self._stream = stream
        self._first: bytes | None = first
        self._failed = False
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        first = self._first
        if first is not None:
            self._first = None
            return first
        try:
            return await self._stream.__anext__()
        except GatewayError:
            self._failed = True
            raise

    @property
    def outcome(self) -> str | None:
        """The attempt's outcome as of now (None: success, or nothing to hold against it)."""
        if self._failed:
            return "stream_broken"
        end = self._ctx.state.get(STREAM_END)
        if end == "error":
            return "stream_error"
        if end == "cut":
            return "stream_broken"
        return None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._dep.in_flight -= 1
        self._router._outcome(self._dep, self.outcome)
        u = self._ctx.usage  # the relay sets it before closing the upstream
        if u is not None:
            cw: int = getattr(self._stream, "cache_write_tokens", 0)  # Anthropic's cache writes
            if cw:
                self._ctx.usage = dataclasses.replace(u, cache_write_tokens=cw)
        if "route.tpm" in self._ctx.state:
            u = self._ctx.usage  # the relay sets it before closing the upstream
            self._router._correct_tpm(self._ctx, u.total_tokens if u else None)
        await self._stream.aclose()


class Router:
    """Routes every upstream call. Only this class retries; adapters never do."""

    def __init__(
        self,
        settings: Settings,
        providers: dict[str, Provider],
        store: Store | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        created = int(time.time())
        self.settings = settings
        self.providers = providers
        self.store = store
        routing = settings.routing
        self._alpha = routing.ewma_alpha
        names = [f"{d.provider}/{d.model}" for m in settings.models.values() for d in m.deployments]
        self.breakers = BreakerBoard(routing.breaker, names)
        self.deployments: dict[str, Deployment] = {}
        self.routes: dict[str, ModelRoute] = {}
        for name, m in settings.models.items():
            self.routes[name] = self._build_route(name, m, created)
        reg = registry or CollectorRegistry()
        self.attempts = Counter(
            "tollway_upstream_attempts", "Upstream attempts by deployment and outcome",
            ["deployment", "outcome"], registry=reg,
        )
        self.fallbacks = Counter(
            "tollway_fallbacks", "Requests answered by a fallback model", ["model", "fallback"],
            registry=reg,
        )
        self.breaker_state = Gauge(
            "tollway_breaker_state", "Circuit breaker state (0 closed, 1 half-open, 2 open)",
            ["deployment"], registry=reg,
        )
        for d in self.deployments:
            self.breaker_state.labels(d).set(0)
        self._sync_task: asyncio.Task[None] | None = None
        self._attempt_children: dict[tuple[str, str], Any] = {}

    def _build_route(self, name: str, m: ModelSettings, created: int) -> ModelRoute:
        deps: list[Deployment] = []
        for d in m.deployments:
            dname = f"{d.provider}/{d.model}"
            p = self.settings.providers[d.provider]
            dep = self.deployments.get(dname)
            if dep is None:
                dep = Deployment(
                    name=dname, provider=self.providers[d.provider], provider_name=d.provider,
                    upstream_model=d.model, weight=d.weight, rpm=d.rpm, tpm=d.tpm,
                    max_concurrency=d.max_concurrency, timeouts=d.timeouts,
                    provider_rpm=p.rpm, provider_tpm=p.tpm, max_queue_s=p.max_queue_s,
                    breaker=self.breakers.get(dname),
                    first_byte_s=(d.timeouts or p.timeouts).first_byte, cap_field=p.cap_field,
                )
                self.deployments[dname] = dep
            deps.append(dep)
        return ModelRoute(
            public_name=name, deployments=tuple(deps), endpoints=frozenset(m.endpoints),
            owned_by=m.owned_by, created=created, strategy=m.strategy,
            fallbacks=tuple(m.fallbacks), retry=m.retry or self.settings.routing.retry,
        )

    # ---- lifecycle: breaker states shared through the store --------------------------------------

    async def start(self) -> None:
        if self.store is not None:
            self._sync_task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def close(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            await asyncio.gather(self._sync_task, return_exceptions=True)
            self._sync_task = None

    async def _sync_loop(self) -> None:
        assert self.store is not None
        names = list(self.deployments)
        while True:
            await asyncio.sleep(_SYNC_EVERY_S)
            try:
                remote = await self.store.breaker_states(names, time.time())
            except StoreUnavailable:
                continue
            except Exception:
                log.exception("reading shared breaker states failed")
                continue
            for name in self.breakers.adopt(remote, time.monotonic(), time.time()):
                log.warning("circuit breaker of %s opened by another replica", name)
                self.breaker_state.labels(name).set(2)

    def _publish_open(self, dep: Deployment) -> None:
        if self.store is None:
            return
        until_unix = self.breakers.open_until_unix(dep.name, time.monotonic(), time.time())
        if until_unix is None:
            return
        task = asyncio.get_running_loop().create_task(self.store.breaker_publish(dep.name, until_unix))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def health(self) -> dict[str, Any]:
        return self.breakers.snapshot()

    # ---- resolving ----------------------------------------------------------------------------

    def resolve(self, model: str, endpoint: Endpoint) -> ModelRoute:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
            )
        if endpoint not in route.endpoints:
            raise InvalidRequest(
                f"The model `{model}` does not support the {endpoint} endpoint.",
                param="model",
                code="model_not_supported",
            )
        return route

    # ---- choosing a deployment ----------------------------------------------------------------

    @staticmethod
    def _usable(d: Deployment, exclude: set[str], now: float) -> bool:
        """Not excluded, below its concurrency cap, breaker not open (cooling or not)."""
        return (
            d.name not in exclude
            and (d.max_concurrency == 0 or d.in_flight < d.max_concurrency)
            and d.breaker.state_at(now) != "open"
        )

    def _pick(self, route: ModelRoute, exclude: set[str], now: float) -> Deployment | None:
        while True:
            cands = [
                d for d in route.deployments if d.cooldown_until <= now and self._usable(d, exclude, now)
            ]
            if not cands:
                return None
            dep = self._choose(route.strategy, cands)
            before = dep.breaker.state
            if dep.breaker.allow(now):
                if dep.breaker.state != before:  # open -> half-open: this call is the probe
                    self.breaker_state.labels(dep.name).set(_STATE_CODE.get(dep.breaker.state, 0))
                return dep
            exclude.add(dep.name)  # half-open and its one probe is already out

    @staticmethod
    def _choose(strategy: str, cands: list[Deployment]) -> Deployment:
        if len(cands) == 1:
            return cands[0]
        if strategy == "least_inflight":
            low = min(d.in_flight for d in cands)
            return random.choice([d for d in cands if d.in_flight == low])
        if strategy == "lowest_latency":
            unexplored = [d for d in cands if d.ewma_ttft is None]
            if unexplored:
                return random.choice(unexplored)
            best = min(cands, key=lambda d: d.ewma_ttft or 0.0)
            if random.random() < LATENCY_EXPLORE:
                # Measure another one again: a deployment slow once is not slow forever.
                return random.choice([d for d in cands if d is not best])
            return best
        cum = list(accumulate(d.weight for d in cands))
        return cands[min(bisect_right(cum, random.random() * cum[-1]), len(cands) - 1)]

    async def _quota_wait(self, ctx: RequestContext, dep: Deployment) -> float:
        """Seconds until this deployment's (and its provider's) quota has room; 0: counted now.

        The provider-wide limiter is asked first, so a refusal from it counts nothing anywhere.
        When the deployment's own limiter then refuses, the provider's count is given back
        (`rate_adjust` with a request delta of -1): nothing was sent."""
        store = self.store
        if store is None or not (dep.rpm or dep.tpm or dep.provider_rpm or dep.provider_tpm):
            return 0.0
        tokens = ctx.state.get("est_tokens")  # the access plugin's estimate, when it ran
        if tokens is None:
            assert ctx.body is not None
            tokens = ctx.state["est_tokens"] = estimate_prompt_tokens(ctx.body) + (
                max_output_tokens(ctx.body) or 0
            )
        now = time.time()
        counted: list[tuple[str, bool]] = []  # (limiter, counts tokens)
        try:
            for name, rpm, tpm in (
                ("provider:" + dep.provider_name, dep.provider_rpm, dep.provider_tpm),
                ("deployment:" + dep.name, dep.rpm, dep.tpm),
            ):
                if not (rpm or tpm):
                    continue
                wait = await store.rate_hit(name, rpm, tpm, tokens, now)
                if wait > 0:
                    for n, has_tpm in counted:
                        await store.rate_adjust(n, -tokens if has_tpm else 0, now, requests_delta=-1)
                    return wait
                counted.append((name, bool(tpm)))
        except StoreUnavailable:
            return 0.0  # quotas fail open: the provider's own limits still apply
        with_tpm = [n for n, has_tpm in counted if has_tpm]
        if with_tpm:
            ctx.state["route.tpm"] = (with_tpm, now, tokens)
        return 0.0

    def _correct_tpm(self, ctx: RequestContext, actual: int | None) -> None:
        """Replace the estimate counted against token quotas by the real usage, once known."""
        hit = ctx.state.pop("route.tpm", None)
        if hit is None or actual is None or self.store is None:
            return
        limiters, at, estimate = hit
        for name in limiters:
            task = asyncio.get_running_loop().create_task(
                self.store.rate_adjust(name, actual - estimate, at)
            )
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # ---- calling ------------------------------------------------------------------------------

    def _request(self, ctx: RequestContext, dep: Deployment, stream: bool) -> UpstreamRequest:
        assert ctx.body is not None
        ctx.provider = dep.provider_name
        ctx.deployment = dep.name
        body = ctx.body
        body["model"] = dep.upstream_model
        if ctx.endpoint == "chat" and CAP_INJECTED in ctx.state:
            # The gateway's own cap, in the field this deployment's provider takes (a fallback
            # or another deployment may take the other one).
            other = "max_tokens" if dep.cap_field == "max_completion_tokens" else "max_completion_tokens"
            if other in body:
                body[dep.cap_field] = body.pop(other)
        return RoutedRequest(
            endpoint=ctx.endpoint, body=body, upstream_model=dep.upstream_model, stream=stream,
            request_id=ctx.request_id, timeouts=dep.timeouts, client_wants_usage=ctx.client_wants_usage,
        )

    def _attempt_counter(self, deployment: str, outcome: str) -> Any:
        key = (deployment, outcome)
        c = self._attempt_children.get(key)
        if c is None:  # labels() costs a lock and a lookup: once per (deployment, outcome)
            c = self._attempt_children[key] = self.attempts.labels(deployment, outcome)
        return c

    def _outcome(self, dep: Deployment, kind: str | None) -> None:
        before = dep.breaker.state
        # A client error means the deployment answered: it counts as healthy.
        opened = dep.breaker.record(kind not in _DEPLOYMENT_FAILURES, time.monotonic())
        self._attempt_counter(dep.name, kind or "success").inc()
        after = dep.breaker.state
        if after != before:
            self.breaker_state.labels(dep.name).set(_STATE_CODE.get(after, 0))
            if after == "closed":
                log.info("circuit breaker of %s closed", dep.name)
        if opened:
            log.warning("circuit breaker of %s opened", dep.name)
            self._publish_open(dep)

    def _ttft(self, dep: Deployment, seconds: float) -> None:
        a = self._alpha
        now = time.monotonic()
        if dep.ewma_ttft is None or now - dep.ewma_at > LATENCY_STALE_S:
            dep.ewma_ttft = seconds
        else:
            dep.ewma_ttft = a * seconds + (1 - a) * dep.ewma_ttft
        dep.ewma_at = now

    async def complete(self, ctx: RequestContext, route: ModelRoute) -> Reply:
        result = await self._route(ctx, route, stream=False)
        assert isinstance(result, Reply)
        return result

    async def open_stream(self, ctx: RequestContext, route: ModelRoute) -> UpstreamStream:
        result = await self._route(ctx, route, stream=True)
        assert not isinstance(result, Reply)
        return result

    async def _attempt(
        self, ctx: RequestContext, dep: Deployment, stream: bool, deadline: float
    ) -> Reply | _RoutedStream:
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + deadline - time.monotonic()):
                return await self._call(ctx, dep, stream)
        except TimeoutError:
            raise _DeadlineExceeded(
                f"The upstream provider {dep.provider_name} did not answer within the request's "
                "deadline.",
                code="deadline_exceeded",
            ) from None

    async def _call(self, ctx: RequestContext, dep: Deployment, stream: bool) -> Reply | _RoutedStream:
        req = self._request(ctx, dep, stream)
        dep.in_flight += 1
        t0 = time.monotonic()
        if not stream:
            try:
                reply = await dep.provider.complete(req)
            except asyncio.CancelledError:
                dep.breaker.release_probe()  # the client left: nothing learnt about the deployment
                raise
            finally:
                dep.in_flight -= 1
            self._ttft(dep, time.monotonic() - t0)
            self._outcome(dep, None)
            if "route.tpm" in ctx.state:
                u = Usage.from_openai(reply.parsed.get("usage"))
                self._correct_tpm(ctx, u.total_tokens if u else None)
            return reply
        try:
            try:
                async with asyncio.timeout(dep.first_byte_s):
                    upstream = await dep.provider.open_stream(req)
                    first = await self._first_data(dep, upstream)
            except TimeoutError:
                raise first_byte_timeout(dep.provider_name, dep.first_byte_s) from None
        except asyncio.CancelledError:
            dep.in_flight -= 1
            dep.breaker.release_probe()
            raise
        except BaseException:
            dep.in_flight -= 1
            raise
        self._ttft(dep, time.monotonic() - t0)
        return _RoutedStream(self, ctx, dep, upstream, first)

    @staticmethod
    async def _first_data(dep: Deployment, upstream: UpstreamStream) -> bytes:
        """A stream's bytes up to its first `data:` event (comments before it do not count);
        the stream is closed if that fails, or if the first event is an in-band error."""
        first = b""
        try:
            while True:
                try:
                    first += await upstream.__anext__()
                except StopAsyncIteration:
                    raise UpstreamUnavailable(
                        f"The upstream provider {dep.provider_name} closed the stream before sending "
                        "anything."
                    ) from None
                at = _first_data_line(first)
                if at >= 0:
                    break
        except BaseException:
            await upstream.aclose()
            raise
        event = first[at:]
        if event.startswith(b'data: {"error"') or event.startswith(b'data:{"error"'):
            # Failed before producing anything: still time to retry or fall back.
            await upstream.aclose()
            raise _stream_error(dep, event)
        return first

    async def _route(self, ctx: RequestContext, route: ModelRoute, stream: bool) -> Reply | _RoutedStream:
        retry = route.retry
        att = _Attempts(max=retry.max_attempts, deadline=time.monotonic() + retry.deadline_s)
        allowed: set[str] | None = ctx.state.get("allowed_models")
        chain: list[ModelRoute] = [route]
        seen = {route.public_name}
        kind: str | None = None
        i = 0
        while i < len(chain):
            current = chain[i]
            i += 1
            if current is not route:
                if att.count >= att.max or time.monotonic() >= att.deadline:
                    break
                log.info("request %s falls back from %s to %s", ctx.request_id, route.public_name,
                         current.public_name)
            try:
                result = await self._try_model(ctx, current, stream, att)
            except GatewayError as e:
                kind = failure_kind(e)
                if kind is None:
                    self._headers(ctx, current, route, att)
                    raise  # a client error: no retry, no fallback
                att.last_error = e
                for fb in current.fallbacks:
                    if kind in fb.on and fb.model not in seen and (allowed is None or fb.model in allowed):
                        seen.add(fb.model)
                        chain.append(self.routes[fb.model])
                continue
            if current is not route:  # counted once the fallback answered
                self.fallbacks.labels(route.public_name, current.public_name).inc()
            self._headers(ctx, current, route, att)
            return result
        assert att.last_error is not None
        self._headers(ctx, None, route, att)
        raise att.last_error

    def _headers(self, ctx: RequestContext, served: ModelRoute | None, asked: ModelRoute,
                 att: _Attempts) -> None:
        h = ctx.response_headers
        if h is None:
            h = ctx.response_headers = {}
        if ctx.provider:
            h["x-tollway-provider"] = ctx.provider
            h["x-tollway-deployment"] = ctx.deployment or ""
        h["x-tollway-attempts"] = str(att.count)
        if served is not None and served is not asked:
            h["x-tollway-fallback"] = served.public_name
            ctx.state["route.model"] = served.public_name

    async def _try_model(
        self, ctx: RequestContext, route: ModelRoute, stream: bool, att: _Attempts
    ) -> Reply | _RoutedStream:
        """Attempts on one model's deployments until success, a client error, or exhaustion."""
        retry = route.retry
        exclude: set[str] = set()
        failures_here = 0
        last: GatewayError | None = None
        while att.count < att.max:
            now = time.monotonic()
            if now >= att.deadline:
                break
            dep = self._pick(route, exclude, now)
            if dep is None:
                cooling = [
                    d for d in route.deployments if d.cooldown_until > now and self._usable(d, exclude, now)
                ]
                if cooling:
                    # Rate-limited with a retry-after: a matching fallback, else wait it out (it is
                    # capped by max_retry_after_s), as a retry of the 429 itself would have.
                    wait = min(d.cooldown_until for d in cooling) - now
                    if now + wait >= att.deadline or any("rate_limit" in fb.on for fb in route.fallbacks):
                        if last is None:
                            last = RateLimited(
                                f"Every deployment of `{route.public_name}` is rate-limited; try again "
                                f"in {wait:.1f}s.",
                                headers={"retry-after": str(max(1, round(wait)))},
                            )
                        break
                    await asyncio.sleep(wait)
                    continue
                # Every deployment failed or is unavailable. With fallbacks, they get the turn;
                # without, back off and give the deployments another round.
                if (
                    failures_here
                    and last is not None
                    and last.retryable
                    and exclude
                    and not any(failure_kind(last) in fb.on for fb in route.fallbacks)
                ):
                    # Every deployment failed once: back off, then give them another round.
                    exclude.clear()
                    delay = self._backoff(retry, failures_here, last)
                    if delay is None or now + delay >= att.deadline:
                        break
                    await asyncio.sleep(delay)
                    continue
                break
            wait = await self._quota_wait(ctx, dep)
            if wait > 0:
                exclude.add(dep.name)
                dep.breaker.release_probe()  # it was not used: the next caller may probe
                if (
                    att.queued_s + wait <= dep.max_queue_s  # "queue briefly": in all, per request
                    and now + wait < att.deadline
                    and not self._others(route, exclude, now)
                ):
                    await asyncio.sleep(wait)
                    att.queued_s += time.monotonic() - now
                    exclude.discard(dep.name)
                elif last is None:
                    last = RateLimited(
                        f"The provider quota of {dep.provider_name} is exhausted; try again in "
                        f"{wait:.1f}s.",
                        code="provider_quota_exceeded",
                        headers={"retry-after": str(max(1, round(wait)))},
                    )
                continue
            att.count += 1
            att.tried.append(dep.name)
            try:
                return await self._attempt(ctx, dep, stream, att.deadline)
            except _DeadlineExceeded as e:
                # The request's time is up: says nothing about the deployment. The client gets
                # the last real upstream answer if there was one.
                dep.breaker.release_probe()
                self._attempt_counter(dep.name, "deadline").inc()
                raise (last or att.last_error or e) from None
            except GatewayError as e:
                kind = failure_kind(e)
                self._outcome(dep, kind if kind in _DEPLOYMENT_FAILURES else "client_error")
                if kind is None or kind == "context_length":
                    raise
                last = e
                failures_here += 1
                ra = retry_after_s(e)
                if kind == "rate_limit" and ra is not None and ra > 0:
                    # Keep every request away from it for that long, not only this one.
                    until = time.monotonic() + min(ra, retry.max_retry_after_s)
                    dep.cooldown_until = max(dep.cooldown_until, until)
                if not e.retryable or (ra is not None and ra > retry.max_retry_after_s):
                    # It said not to retry (exhausted account) or asked for a long pause: use the
                    # other deployments, or the fallbacks.
                    exclude.add(dep.name)
                    continue
                if self._others(route, exclude | {dep.name}, time.monotonic()):
                    exclude.add(dep.name)  # fail over at once to a deployment that has not failed
                    continue
                if any(kind in fb.on for fb in route.fallbacks):
                    break  # every deployment failed once: a matching fallback gets its turn first
                if att.count >= att.max:
                    break  # no attempt left: do not sleep for nothing
                delay = self._backoff(retry, failures_here, e)
                if delay is None or time.monotonic() + delay >= att.deadline:
                    break
                await asyncio.sleep(delay)
        if last is None:
            last = self._unavailable(route)
        raise last

    def _others(self, route: ModelRoute, exclude: set[str], now: float) -> bool:
        """Is another deployment ready now (not excluded, full, open nor cooling down)?"""
        return any(d.cooldown_until <= now and self._usable(d, exclude, now) for d in route.deployments)

    @staticmethod
    def _backoff(retry: RetrySettings, n: int, e: GatewayError) -> float | None:
        ra = retry_after_s(e)
        if ra is not None:
            return ra if ra <= retry.max_retry_after_s else None
        return random.uniform(0, min(retry.backoff_max_s, retry.backoff_base_s * 2 ** (n - 1)))

    def _unavailable(self, route: ModelRoute) -> GatewayError:
        now = time.monotonic()
        waits = [d.breaker.opened_until - now for d in route.deployments if d.breaker.state_at(now) == "open"]
        wait = max(1, round(min(waits))) if waits else 1
        return UpstreamUnavailable(
            f"Every deployment of `{route.public_name}` is unavailable (circuit open or at "
            "capacity); try again shortly.",
            code="no_healthy_deployment",
            status=503,  # nothing was sent upstream: "try again shortly", retried by the SDKs
            headers={"retry-after": str(wait)},
        )
