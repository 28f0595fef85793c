"""access plugin: virtual keys, RPM/TPM limits and USD budgets in one store round trip.

Auth, rate limiting and budget reservation are one plugin on purpose: the store checks all
three atomically in a single call (one Redis round trip), so a request is either admitted and
counted everywhere, or refused and counted nowhere. After the request, `on_response` settles
the reservation with the real cost and appends the spend record; both run off the response
path and are flushed on shutdown.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter

from gateway.errors import (
    AuthenticationFailed,
    GatewayError,
    PermissionDenied,
    RateLimited,
    ServiceUnavailable,
)
from gateway.pipeline import Plugin, Principal, RequestContext, ShortCircuit
from gateway.pipeline.context import CAP_INJECTED
from gateway.pricing import ModelPrice
from gateway.settings import Settings
from gateway.store.base import (
    Admission,
    AdmitResult,
    KeyRecord,
    RateInfo,
    Scope,
    Settlement,
    SpendRecord,
    Store,
    StoreUnavailable,
    TeamRecord,
    nano_to_usd,
    period_bounds,
    period_id,
)
from gateway.wire.tokens import estimate_prompt_tokens, max_output_tokens

log = logging.getLogger("tollway.access")

BILLABLE = frozenset({"chat", "completions", "embeddings"})
_SETTLE_GRACE_S = 1.0
_KEY_CACHE_MAX = 100_000


class BudgetExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def client_key(headers: CIMultiDictProxy[str]) -> str | None:
    """The key from `Authorization: Bearer …`, or `api-key` / `x-api-key` (Azure, Anthropic SDKs)."""
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("api-key") or headers.get("x-api-key")


def _fmt_reset(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: `1s`, `6m0s`, `12ms`."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    s = math.ceil(seconds)
    m, s = divmod(s, 60)
    return f"{m}m{s}s" if m else f"{s}s"


def _rate_headers(requests: RateInfo | None, tokens: RateInfo | None) -> dict[str, str]:
    h: dict[str, str] = {}
    if requests is not None:
        h["x-ratelimit-limit-requests"] = str(requests.limit)
        h["x-ratelimit-remaining-requests"] = str(max(requests.remaining, 0))
        h["x-ratelimit-reset-requests"] = _fmt_reset(requests.reset_s)
    if tokens is not None:
        h["x-ratelimit-limit-tokens"] = str(tokens.limit)
        h["x-ratelimit-remaining-tokens"] = str(max(tokens.remaining, 0))
        h["x-ratelimit-reset-tokens"] = _fmt_reset(tokens.reset_s)
    return h


def _drop_answer(ctx: RequestContext) -> None:
    """A request refused (or gone) at admission: an answer found before it is not served, and its
    usage is not counted anywhere."""
    if ctx.answer is not None:
        ctx.answer = None
        ctx.usage = None


_WEBHOOK_ATTEMPTS = 3
_WEBHOOK_BACKOFF_S = 1.0


@dataclass(slots=True)
class _Lease:
    id: str
    key: KeyRecord
    team: TeamRecord | None
    est_prompt: int
    est_tokens: int
    price: ModelPrice
    charged: int | None = None
    """Set when admission charged a known cost (nano-USD) at once: there is nothing to settle."""


class AccessPlugin(Plugin):
    name = "access"

    def __init__(
        self,
        settings: Settings,
        store: Store,
        prices: dict[str, ModelPrice],
        registry: CollectorRegistry,
    ) -> None:
        self.open = settings.auth.mode == "none"
        self.store = store
        self.prices = prices
        self.models = settings.models
        self.budgets = settings.budgets
        self._fallback_prices: dict[str, tuple[ModelPrice, ...]] = {}
        """Model -> the prices of every model it may fall back to (transitively): a request is
        reserved at the dearest of them, since a fallback is billed at its own price."""
        for name, m in settings.models.items():
            seen, todo = {name}, [f.model for f in m.fallbacks]
            while todo:
                fb = todo.pop()
                if fb in seen or fb not in settings.models:
                    continue
                seen.add(fb)
                todo.extend(f.model for f in settings.models[fb].fallbacks)
            if len(seen) > 1:
                self._fallback_prices[name] = tuple(prices[n] for n in sorted(seen) if n in prices)
        self.settings = settings
        self._keys: dict[str, tuple[KeyRecord, Principal]] = {}
        """Key hash -> the key record last seen and the Principal built from it."""
        self._teams: dict[str, TeamRecord] = {}
        self._active: dict[tuple[str, str], float] = {}
        """(key id, team id) -> monotonic time of its last settled request, for alert checks."""
        self._admit_now: Callable[[Admission], AdmitResult] | None = getattr(store, "admit_now", None)
        """A store that decides in memory (embedded) admits synchronously: no coroutine per request."""
        self._lease_prefix = secrets.token_hex(8) + "-"  # unique per process; a counter after it
        self._lease_seq = 0
        self._loops: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self.rejections = Counter(
            "tollway_access_rejections", "Requests refused by access control",
            ["reason", "scope"], registry=registry,
        )
        self.alerts = Counter(
            "tollway_budget_alerts", "Soft budget alerts raised", ["scope", "threshold"],
            registry=registry,
        )
        self.store_errors = Counter(
            "tollway_store_errors", "Store calls that failed (backend unreachable)", ["op"],
            registry=registry,
        )

    # ---- lifecycle ---------------------------------------------------------------------------

    async def on_startup(self, app: Any) -> None:
        await self._seed_config_keys()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._alert_loop())]

    async def on_shutdown(self) -> None:
        for t in self._loops:
            t.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        # Submitted settlements and spend are flushed by store.close(), after every plugin.
        if self._http is not None:
            await self._http.close()

    async def _seed_config_keys(self) -> None:
        now = time.time()
        for k in self.settings.auth.keys:
            raw = k.key.get_secret_value()
            h = hash_key(raw)
            if await self.store.get_team(k.team) is None:
                await self.store.put_team(TeamRecord(id=k.team, name=k.team, created_at=now))
            if await self.store.get_key_by_hash(h) is None:
                await self.store.put_key(
                    KeyRecord(
                        id="key_cfg_" + h[:12], team_id=k.team, key_hash=h, prefix=raw[:10],
                        name=k.name or "config key", created_at=now,
                        metadata={"source": "config"},
                    )
                )

    # ---- request hooks -----------------------------------------------------------------------

    async def on_headers(self, ctx: RequestContext) -> None:
        if self.open:
            ctx.principal = Principal(team="default", key_id="anonymous")
            return
        raw = client_key(ctx.headers)
        if not raw:
            self.rejections.labels("missing_key", "key").inc()
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                code="missing_api_key",
            )
        h = hash_key(raw)
        ctx.state["access.hash"] = h
        cached = self._keys.get(h)
        # Billable requests are re-checked atomically by admit(); others look the key up now.
        if cached is None or ctx.endpoint not in BILLABLE:
            key = await self.lookup(h)
            self.check_key(key, h)
            assert key is not None
            cached = self._keys.get(h)
            principal = cached[1] if cached is not None and cached[0] is key else Principal(
                team=key.team_id, key_id=key.id, key_name=key.name
            )
        else:
            key, principal = cached
            self.check_key(key, h)
        ctx.state["access.key"] = key
        ctx.principal = principal

    async def lookup(self, h: str) -> KeyRecord | None:
        try:
            key = await self.store.get_key_by_hash(h)
        except StoreUnavailable:
            self.store_errors.labels("get_key").inc()
            cached = self._keys.get(h)
            if cached is not None and self.budgets.on_store_failure == "open":
                return cached[0]
            raise ServiceUnavailable(
                "The gateway's key store is unreachable; try again shortly.",
                code="store_unavailable",
            ) from None
        if key is not None:
            self._remember(h, key)
        return key

    def _remember(self, h: str, key: KeyRecord) -> None:
        if len(self._keys) >= _KEY_CACHE_MAX:
            self._keys.clear()
        self._keys[h] = (key, Principal(team=key.team_id, key_id=key.id, key_name=key.name))

    def check_key(self, key: KeyRecord | None, h: str) -> None:
        if key is None:
            self._keys.pop(h, None)
            self.rejections.labels("invalid_key", "key").inc()
            raise AuthenticationFailed("Incorrect API key provided.")
        if key.revoked_at is not None:
            self._keys.pop(h, None)
            self.rejections.labels("revoked", "key").inc()
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        if key.expires_at is not None and key.expires_at <= time.time():
            self._keys.pop(h, None)  # read again next time: an admin may extend it
            self.rejections.labels("expired", "key").inc()
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")

    def _max_output(self, ctx: RequestContext) -> int:
        body = ctx.body
        assert body is not None
        if ctx.endpoint == "embeddings":
            return 0
        given = max_output_tokens(body)
        if given is not None:
            return given
        cap = self.models[ctx.public_model or ""].max_output_tokens
        body["max_tokens"] = cap
        ctx.state[CAP_INJECTED] = True  # the router sends it in the deployment's field
        return cap

    async def on_request(self, ctx: RequestContext) -> ShortCircuit | None:
        if self.open or ctx.endpoint not in BILLABLE:
            return None
        body = ctx.body
        model = ctx.public_model
        assert body is not None and model is not None
        h: str = ctx.state["access.hash"]
        price = self.prices[model]
        self._lease_seq += 1
        lease_id = f"{self._lease_prefix}{self._lease_seq:x}"
        known = ctx.usage if ctx.answer is not None else None
        if known is not None:
            # An answer found before admission (an exact-cache hit): its cost is known, so it is
            # charged at once (no worst-case reservation, nothing to settle) and its real tokens
            # count against TPM.
            est_prompt = known.prompt_tokens
            est_tokens = known.prompt_tokens + known.completion_tokens
            cost = round(
                price.cost_nano(known.prompt_tokens, known.completion_tokens, known.cached_tokens)
                * self.budgets.cache_hit_cost_fraction
            )
        else:
            n = body.get("n")
            choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
            est_prompt = estimate_prompt_tokens(body)
            est_out = self._max_output(ctx) * choices
            est_tokens = est_prompt + est_out
            chain = self._fallback_prices.get(model)
            if chain is None:
                cost = price.reserve_nano(est_prompt, est_out)
            else:
                cost = max(p.reserve_nano(est_prompt, est_out) for p in chain)
        ctx.state["est_tokens"] = est_tokens  # the router's quotas reuse it
        admission = Admission(
            key_hash=h,
            now=time.time(),
            model=model,
            est_tokens=est_tokens,
            reserve_nano=cost,
            lease_id=lease_id,
            lease_ttl_s=self.budgets.lease_ttl_s,
            charge=known is not None,
        )
        try:
            res = self._admit_now(admission) if self._admit_now else await self.store.admit(admission)
        except StoreUnavailable:
            self.store_errors.labels("admit").inc()
            if known is None:
                # A timeout does not say the admission was not applied (the script may still
                # run): settling this lease in on_response (idempotent; the real cost if served
                # unmetered, else 0) releases a reservation that did land, instead of holding
                # it for the lease TTL, and bills what was served once the store is back.
                ctx.state["access.lease"] = _Lease(
                    lease_id, ctx.state["access.key"], None, est_prompt, est_tokens, price
                )
            try:
                self._admit_degraded(ctx, h)
            except GatewayError:
                _drop_answer(ctx)
                raise
            return None
        except asyncio.CancelledError:
            # The client left while the store was deciding: the admission may have been applied.
            # Settling the lease (idempotent, cost 0) in on_response releases it either way.
            ctx.state["access.lease"] = _Lease(
                lease_id, ctx.state["access.key"], None, est_prompt, est_tokens, price,
                cost if known is not None else None,
            )
            _drop_answer(ctx)
            raise
        try:
            self._apply(ctx, h, res, est_tokens)
        except GatewayError:
            _drop_answer(ctx)
            raise
        key, team = res.key, res.team
        assert key is not None
        if key.allowed_models or (team is not None and team.allowed_models):
            allowed = [m for m in (key.allowed_models, team.allowed_models if team else None) if m]
            # fallbacks must stay within what the key and its team may use
            ctx.state["allowed_models"] = set(allowed[0]).intersection(*allowed[1:])
        ctx.state["access.lease"] = _Lease(lease_id, key, team, est_prompt, est_tokens, price,
                                          cost if known is not None else None)
        return None

    def _admit_degraded(self, ctx: RequestContext, h: str) -> None:
        """Store down: budgets fail closed (default), rate limits open; configurable.

        A key (and team) without a budget has no budget to check: with rate limits failing open
        it is admitted even when budgets fail closed. A key this process has not seen, or whose
        team it has not seen, cannot be checked at all and is refused."""
        cached = self._keys.get(h)
        key = cached[0] if cached is not None else None
        team = self._teams.get(key.team_id) if key is not None else None
        what = ""
        if key is None or team is None:
            what = "Your key"
        elif self.budgets.rate_limit_on_store_failure == "closed":
            what = "Rate limits"
        elif self.budgets.on_store_failure == "closed" and (
            key.budget is not None or team.budget is not None
        ):
            what = "Budgets"
        if what:
            raise ServiceUnavailable(
                f"{what} cannot be checked because the gateway's store is unreachable; "
                "the request was not sent. Try again shortly.",
                code="store_unavailable",
            )
        assert key is not None
        log.warning("store unreachable: admitting key %s without limit or budget checks", key.id)
        ctx.state["access.unmetered"] = key

    def _apply(self, ctx: RequestContext, h: str, res: AdmitResult, est_tokens: int) -> None:
        status = res.status
        key = res.key
        if key is not None:
            cached = self._keys.get(h)
            if cached is None or cached[0] is not key:  # the embedded store returns the same record
                self._remember(h, key)
                cached = self._keys[h]
            ctx.principal = cached[1]
        if res.team is not None:
            self._teams[res.team.id] = res.team
        headers = _rate_headers(res.requests, res.tokens)
        if headers:
            if ctx.response_headers is None:
                ctx.response_headers = headers
            else:  # e.g. x-tollway-cache, set by a lookup before admission
                ctx.response_headers.update(headers)
        if status == "ok":
            return
        scope = res.scope or "key"
        self.rejections.labels(status, scope).inc()
        if res.key is not None and status in ("model_not_allowed", "rate_limited", "over_budget"):
            ctx.state["access.refused"] = res.key  # a ledger record (cost 0) says it was refused
        if status in ("unknown_key", "revoked", "expired"):
            self.check_key(None if status == "unknown_key" else res.key, h)
            raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
        if status == "model_not_allowed":
            who = self._who(res, scope)
            raise PermissionDenied(
                f"{who} is not allowed to use the model `{ctx.public_model}`.",
                param="model",
                code="model_not_allowed",
            )
        if status == "rate_limited":
            wait = max(res.retry_after_s or 1.0, 0.001)
            kind = res.limit_kind or "requests"
            if kind == "tokens" and res.tokens is not None and est_tokens > res.tokens.limit:
                err = RateLimited(
                    f"Request too large for {self._who(res, scope)}: it may use up to {est_tokens} "
                    f"tokens (prompt estimate + max_tokens) but the limit is {res.tokens.limit} "
                    "tokens per minute. Lower max_tokens or the prompt.",
                    code="request_too_large",
                    headers={**headers, "x-should-retry": "false"},
                )
                err.type = "tokens"
                raise err
            err = RateLimited(
                f"Rate limit reached for {self._who(res, scope)}: too many {kind} per minute. "
                f"Try again in {wait:.3f}s.",
                headers={
                    **headers,
                    "retry-after": str(math.ceil(wait)),
                    "retry-after-ms": str(math.ceil(wait * 1000)),
                },
            )
            err.type = kind
            raise err
        # over_budget
        reset = res.budget_reset_at
        when = (
            "does not reset (a total budget)"
            if reset is None
            else "resets at " + datetime.fromtimestamp(reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        )
        raise BudgetExceeded(
            f"Budget exceeded for {self._who(res, scope)}; it {when}.",
            headers={**headers, "x-should-retry": "false"},
        )

    @staticmethod
    def _who(res: AdmitResult, scope: str) -> str:
        if scope == "team":
            t = res.team
            return f"team '{t.name if t else '?'}'"
        k = res.key
        return f"key '{k.name or k.id}'" if k else "this key"

    # ---- after the request -------------------------------------------------------------------

    def on_response(self, ctx: RequestContext) -> None:
        lease: _Lease | None = ctx.state.pop("access.lease", None)
        other: KeyRecord | None = ctx.state.pop("access.unmetered", None) or ctx.state.pop(
            "access.refused", None
        )
        key = lease.key if lease else other
        if key is None:
            return
        usage = ctx.usage
        cache = ctx.state.get("cache.status", "miss")
        served = ctx.state.get("route.model")  # a fallback model is billed at its own price
        if served:
            price = self.prices[served]
        else:
            price = lease.price if lease else self.prices[ctx.public_model or ""]
        events = int(ctx.state.get("stream.events", 0))
        if usage is not None:
            prompt, completion, cached = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        elif events > 0 or (ctx.status == 499 and ctx.deployment is not None):
            # The upstream worked on it but no usage came back (client gone, stream cut): bill
            # the estimated prompt and one token per content event relayed.
            prompt = lease.est_prompt if lease else 0
            completion = max(events - 2, 0)
            cached = 0
        else:
            prompt = completion = cached = 0  # refused or failed before the upstream answered
        if lease is not None and lease.charged is not None:
            cost = lease.charged  # spent at admission (a cache hit's known cost)
        else:
            cost = price.cost_nano(
                prompt, completion, cached, usage.cache_write_tokens if usage is not None else 0
            )
            if cache.startswith("hit"):
                cost = round(cost * self.budgets.cache_hit_cost_fraction)
        now = time.time()
        record = SpendRecord(  # positional (it runs on every request): the fields in order
            now, ctx.request_id, key.team_id, key.id, ctx.public_model or "", ctx.provider or "",
            prompt, completion, cached, cost, cache, round(ctx.elapsed() * 1000, 3), ctx.status,
        )
        settlement = None
        if lease is not None and lease.charged is None:
            settlement = Settlement(
                lease_id=lease.id, key_id=key.id, team_id=key.team_id, now=now,
                actual_nano=cost, est_tokens=lease.est_tokens, actual_tokens=prompt + completion,
            )
        # Write-behind: the store batches settlements and ledger records (and retries them).
        self.store.submit(settlement, record)
        self._active[(key.id, key.team_id)] = time.monotonic()

    # ---- soft budget alerts ------------------------------------------------------------------

    async def _alert_loop(self) -> None:
        alerts = self.budgets.alerts
        while True:
            await asyncio.sleep(alerts.check_interval_s)
            started = time.monotonic()
            for scope, last in list(self._active.items()):
                try:
                    await self._check_alerts(*scope)
                except StoreUnavailable:
                    continue
                except Exception:
                    log.exception("budget alert check failed")
                # Spend is written behind (batched): look once more after the last request's
                # settlement surely landed, then forget the scope until it is used again.
                if started - last > _SETTLE_GRACE_S and self._active.get(scope) == last:
                    del self._active[scope]

    async def _check_alerts(self, key_id: str, team_id: str) -> None:
        key = await self.store.get_key(key_id)
        team = self._teams.get(team_id) or await self.store.get_team(team_id)
        scopes: list[tuple[Scope, str]] = []
        if key is not None and key.budget is not None:
            scopes.append((Scope("key", key.id, budget=key.budget), f"key '{key.name or key.id}'"))
        if team is not None and team.budget is not None:
            scopes.append((Scope("team", team.id, budget=team.budget), f"team '{team.name}'"))
        now = time.time()
        for scope, label in scopes:
            assert scope.budget is not None
            state = await self.store.budget(scope, now)
            if not state.limit_nano:
                continue
            frac = state.spent_nano / state.limit_nano
            _, end = period_bounds(scope.budget.period, now)
            for t in self.budgets.alerts.thresholds:
                if frac < t:
                    break
                flag = f"alert:{scope.name}:{period_id(scope.budget.period, now)}:{t}"
                ttl = (end - now + 86400) if end is not None else None
                if await self.store.set_once(flag, ttl):
                    await self._alert(scope, label, t, state.spent_nano, state.limit_nano, end)

    async def _alert(
        self, scope: Scope, label: str, threshold: float, spent: int, limit: int, end: float | None
    ) -> None:
        msg = (
            f"budget alert: {label} has spent ${nano_to_usd(spent):.4f} of ${nano_to_usd(limit):.4f} "
            f"({spent / limit:.0%}, threshold {threshold:.0%})"
        )
        log.warning(msg)
        self.alerts.labels(scope.kind, str(threshold)).inc()
        url = self.budgets.alerts.webhook_url
        if not url:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        payload = {
            "type": "budget_alert",
            "scope": scope.kind,
            "id": scope.id,
            "name": label,
            "threshold": threshold,
            "spent_usd": nano_to_usd(spent),
            "limit_usd": nano_to_usd(limit),
            "period": scope.budget.period if scope.budget else None,
            "period_end": end,
            "message": msg,
        }
        # The alert is raised once per period (the flag is already set): a webhook that fails
        # is tried again a few times before the alert is given up (logged as an error).
        for attempt in range(_WEBHOOK_ATTEMPTS):
            if attempt:
                await asyncio.sleep(_WEBHOOK_BACKOFF_S * 2 ** (attempt - 1))
            try:
                async with self._http.post(url, json=payload) as r:
                    if r.status < 300:
                        return
                    problem = f"answered HTTP {r.status}"
                    if r.status < 500 and r.status not in (408, 429):
                        break  # a client error: sending it again will not help
            except (aiohttp.ClientError, TimeoutError) as e:
                problem = f"failed: {e}"
            log.warning("budget alert webhook %s (attempt %d)", problem, attempt + 1)
        log.error("budget alert webhook gave up: %s", msg)
