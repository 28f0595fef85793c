"""exact_cache plugin: answers repeated identical requests from the store, per team partition.

Order: after `access`. Its on_lookup runs before every on_request (so access admits a hit at
its known cost: `budgets.cache_hit_cost_fraction` of the stored usage's price, charged at once,
on the ledger as `hit-exact`); its on_request runs after access admitted the request.

- on_lookup (before admission): computes the key (gateway.cache.keys), reads the store and
  answers a hit with a ShortCircuit: the stored chat.completion / text_completion body, or, for
  a streaming request, a replay of it as OpenAI SSE chunks (role, content, finish, usage,
  [DONE]). It sets `ctx.usage` to the entry's usage, so access admits the hit at its known cost
  (rate limits counted, the cost charged at once, no worst-case reservation to settle later);
  the pipeline serves it only after every on_request hook let the request in.
- on_request (after admission): a request the lookup did not answer waits for an identical one
  in flight (coalescing, below), else is a miss and asks the relay to capture the upstream's
  bytes (`ctx.state[CAPTURE]`).
- on_response: stores complete successful answers (200, every choice finished with stop, length
  or tool_calls, usage present); a stream is assembled from its captured SSE bytes once it
  ended with [DONE]. The store write runs in the background, off the response path.
- Coalescing: while one request for a key is in flight (the leader), identical requests wait
  up to `cache.coalesce_wait_s` for its answer and are served it as a hit; if the leader fails
  (or the wait ends) they go to the upstream themselves. Streams too: a waiter gets the replay
  once the leader's stream completed (so its first byte comes when the leader's last did).
  Coalescing is per gateway process (replicas do not wait for each other).
- Every chat/completions response carries `x-tollway-cache: hit-exact | miss | bypass`
  (`bypass`: not cacheable, cache disabled, embeddings, or Cache-Control: no-cache, no-store).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from gateway.api.streaming import CAPTURE
from gateway.cache.keys import SHARED_PARTITION, cache_key, cacheability
from gateway.cache.replay import ReplayStream, assemble, is_complete, stream_events
from gateway.loopmetrics import LoopCounter, LoopHistogram
from gateway.pipeline import Plugin, RequestContext, ShortCircuit, Usage
from gateway.settings import Settings
from gateway.store.base import Store, StoreUnavailable

log = logging.getLogger("tollway.cache")

CACHEABLE_ENDPOINTS = frozenset({"chat", "completions"})
_LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

HEADER = "x-tollway-cache"
STATUS = "cache.status"
_KEY = "cache.key"
_LEADER = "cache.leader"
_WRITE = "cache.write"
_RULE = "cache.rule"
_USAGE_MEMO_MAX = 1024
_USAGE_MEMO_ENTRY_MAX = 16 * 1024
"""The usage memo holds a reference to the entries it remembers: at most 1024 of <= 16 KiB each."""


_RAW_FACTOR = 16
"""Captured upstream bytes are bounded at this many times `max_entry_bytes` (SSE framing and
per-chunk JSON make a stream several times larger than the answer it carries)."""


class _Capture(list[bytes]):
    """The upstream bytes of one miss (`ctx.state[CAPTURE]`); past `limit` it drops them all
    and stays empty (the answer is too large to cache)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.size = 0
        self.overflow = False

    def append(self, data: bytes) -> None:
        if self.overflow:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.overflow = True
            self.clear()
            return
        super().append(data)


class ExactCachePlugin(Plugin):
    name = "exact_cache"
    fail_open = True
    """A broken cache must never fail a request: it is served from the upstream instead."""

    def __init__(self, settings: Settings, store: Store, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.cache = settings.cache
        self.store = store
        self._inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self._open = settings.auth.mode == "none"
        self._usage_memo: dict[str, tuple[bytes, Usage | None]] = {}
        """Cache key -> (the entry's bytes object, its usage): see _decode."""
        self._writes: set[asyncio.Task[None]] = set()
        self.stored_listeners: list[Callable[[RequestContext, str, bytes, asyncio.Task[None]], None]] = []
        """Called (on the event loop, must not block) with every entry being stored and the task that
        writes it (a listener that makes the entry findable elsewhere must wait for it first)."""
        # Updated on the event loop only (gateway.loopmetrics), also by the semantic cache.
        self.hits = LoopCounter(
            "tollway_cache_hits", "Requests answered from the cache, by kind (exact, semantic)",
            ["kind"], registry,
        )
        self.misses = LoopCounter(
            "tollway_cache_misses",
            "Cacheable requests not found in the cache, by kind of lookup (exact, semantic)",
            ["kind"], registry,
        )
        self._miss_exact = self.misses.labels("exact")
        self.lookup = LoopHistogram(
            "tollway_cache_lookup_seconds", "Time to look a request up in the exact cache",
            (), registry, _LOOKUP_BUCKETS,
        )
        self._hit_exact = self.hits.labels("exact")

    # ---- request ------------------------------------------------------------------------------

    def _set_status(self, ctx: RequestContext, status: str) -> None:
        ctx.state[STATUS] = status
        if ctx.response_headers is None:
            ctx.response_headers = {}
        ctx.response_headers[HEADER] = status

    async def on_lookup(self, ctx: RequestContext) -> ShortCircuit | None:
        """Before admission: a stored answer is found here, so access charges its known cost."""
        body, model = ctx.body, ctx.public_model
        if body is None or model is None or ctx.endpoint not in CACHEABLE_ENDPOINTS:
            self._set_status(ctx, "bypass")
            return None
        mc = self.settings.models[model].cache
        enabled = self.cache.enabled if mc.enabled is None else mc.enabled
        rule = cacheability(
            body, allow_temperature=mc.allow_temperature, allow_n=mc.allow_n,
            allow_tools=mc.allow_tools, cache_control_header=ctx.headers.get("Cache-Control"),
        )
        if not enabled or (not rule.read and not rule.write):
            self._set_status(ctx, "bypass")
            return None
        team = ctx.principal.team if ctx.principal is not None else "default"
        partition = SHARED_PARTITION if self.cache.shared_partition else team
        # The default output cap is part of the question when the gateway sends it (access does,
        # for a request without one, unless auth is off).
        cap = None if self._open else self.settings.models[model].max_output_tokens
        key = cache_key(partition, model, ctx.endpoint, body, cap)
        ctx.state[_KEY] = key
        ctx.state[_RULE] = rule
        if rule.read:
            t0 = time.perf_counter()
            try:
                raw = await self.store.cache_get(key)  # counted in on_request, once admitted
            except StoreUnavailable:
                log.warning("cache lookup failed: store unavailable; going to the upstream")
                raw = None
            self.lookup.observe(time.perf_counter() - t0)
            if raw is not None:
                return self._decode(ctx, raw)
        return None

    async def on_request(self, ctx: RequestContext) -> ShortCircuit | None:
        """After admission, for what on_lookup did not answer: wait for an identical request in
        flight (coalescing), else a miss that captures the upstream's answer."""
        rule = ctx.state.get(_RULE)
        if rule is None:
            return None
        if ctx.answer is not None:
            await self._count(ctx, True)
            self._hit(ctx, "exact")
            return None
        key: str = ctx.state[_KEY]
        if rule.read:
            raw = await self._wait_for_leader(key)  # does not yield when none is in flight
            sc = self._answer(ctx, raw) if raw is not None else None
            if sc is not None:
                await self._count(ctx, True)  # a coalesced waiter served is a hit
                return sc
            self._miss_exact.inc()
        self._set_status(ctx, "miss")
        if rule.write:
            ctx.state[_WRITE] = True
            ctx.state[CAPTURE] = _Capture(self.cache.max_entry_bytes * _RAW_FACTOR)
            wait = self.cache.coalesce_wait_s
            if wait > 0 and key not in self._inflight:
                # Registered before anything below can yield: identical requests arriving
                # meanwhile find this one in flight and wait for it.
                fut: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
                self._inflight[key] = fut
                ctx.state[_LEADER] = fut
        if rule.read:
            await self._count(ctx, False)
        return None

    async def _count(self, ctx: RequestContext, hit: bool) -> None:
        """The exact lookup of an admitted request, in the store's per-team stats."""
        team = ctx.principal.team if ctx.principal is not None else "default"
        try:
            await self.store.cache_count(team, hit)
        except StoreUnavailable:
            pass

    async def _wait_for_leader(self, key: str) -> bytes | None:
        fut = self._inflight.get(key)
        if fut is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.cache.coalesce_wait_s)
        except TimeoutError:
            return None

    def _answer(self, ctx: RequestContext, raw: bytes, kind: str = "exact") -> ShortCircuit | None:
        """Serve a stored entry (a hit of `kind`: exact, or semantic for the semantic cache)."""
        sc = self._decode(ctx, raw)
        if sc is not None:
            self._hit(ctx, kind)
        return sc

    def _hit(self, ctx: RequestContext, kind: str) -> None:
        self._set_status(ctx, f"hit-{kind}")
        (self._hit_exact if kind == "exact" else self.hits.labels(kind)).inc()

    def _decode(self, ctx: RequestContext, raw: bytes) -> ShortCircuit | None:
        """The answer for a stored entry (None if it is not JSON); sets `ctx.usage` to its usage."""
        if not ctx.stream:
            # A store that keeps entries in memory returns the very same bytes object for a hot
            # entry: its usage is remembered instead of parsing the whole answer again.
            memo = self._usage_memo.get(ctx.state.get(_KEY, ""))
            if memo is not None and memo[0] is raw:
                u = memo[1]
                if u is not None:
                    u = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
                ctx.usage = u
                return ShortCircuit(body=raw)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            log.warning("cache entry %s is not JSON; ignored", ctx.state.get(_KEY))
            return None
        ctx.usage = Usage.from_openai(body.get("usage"))
        if ctx.stream:
            return ShortCircuit(stream=ReplayStream(stream_events(body, ctx.endpoint)))
        key = ctx.state.get(_KEY)
        if key is not None and len(raw) <= _USAGE_MEMO_ENTRY_MAX:
            if len(self._usage_memo) >= _USAGE_MEMO_MAX:
                self._usage_memo.clear()
            u = ctx.usage
            self._usage_memo[key] = (
                raw, None if u is None else Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
            )
        return ShortCircuit(body=raw)

    # ---- response -----------------------------------------------------------------------------

    def on_response(self, ctx: RequestContext) -> None:
        leader: asyncio.Future[bytes | None] | None = ctx.state.pop(_LEADER, None)
        value: bytes | None = None
        try:
            if ctx.state.get(_WRITE) and ctx.status == 200 and ctx.error is None:
                value = self._entry(ctx)
            if value is not None:
                key: str = ctx.state[_KEY]
                task = asyncio.get_running_loop().create_task(self._put(ctx, key, value, leader))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
                for listener in self.stored_listeners:
                    try:
                        listener(ctx, key, value, task)
                    except Exception:
                        log.exception("cache store listener failed")
                leader = None  # resolved now, and forgotten once the entry is in the store
        finally:
            ctx.state.pop(CAPTURE, None)
            if leader is not None:
                self._release(ctx.state[_KEY], leader, None)

    def _entry(self, ctx: RequestContext) -> bytes | None:
        """The bytes to store for this response, or None when it must not be cached."""
        captured: list[bytes] = ctx.state.get(CAPTURE) or []
        raw = b"".join(captured)
        if not raw:
            return None
        body: Any
        if ctx.stream:
            body = assemble(raw, ctx.endpoint)
            if body is None:
                return None
        else:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return None
        if not isinstance(body, dict) or not is_complete(body):
            return None
        value = orjson.dumps(body) if ctx.stream else raw
        if len(value) > self.cache.max_entry_bytes:
            return None
        return value

    def _release(
        self, key: str, leader: asyncio.Future[bytes | None], value: bytes | None
    ) -> None:
        if self._inflight.get(key) is leader:
            del self._inflight[key]
        if not leader.done():
            leader.set_result(value)

    async def _put(
        self, ctx: RequestContext, key: str, value: bytes, leader: asyncio.Future[bytes | None] | None
    ) -> None:
        """Write the entry; until it is written, identical requests get it from the leader's
        future (already resolved), so none of them misses in between."""
        if leader is not None and not leader.done():
            leader.set_result(value)
        model = ctx.public_model or ""
        ttl = self.settings.models[model].cache.ttl_s or self.cache.default_ttl_s
        partition = key.split(":", 1)[0]
        try:
            await self.store.cache_put(key, value, ttl, partition, model)
        except StoreUnavailable:
            log.warning("cache write failed: store unavailable")
        except Exception:
            log.exception("cache write failed")
        finally:
            if leader is not None:
                self._release(key, leader, value)

    async def on_shutdown(self) -> None:
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
