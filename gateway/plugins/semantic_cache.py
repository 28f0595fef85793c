"""semantic_cache plugin: answers a paraphrase of an earlier question from the cache, per team.

Opt-in (list `semantic_cache` in `plugins`, after `exact_cache`). It only acts on requests the exact
cache looked up and missed (`ctx.state["cache.status"] == "miss"`), so it follows the exact cache's
cacheability rules (temperature, n, tools, Cache-Control) and its per-team partitions.

- Partition: team id (or "shared") + SHA-256 of the canonical request without the last user message's
  content (system prompt, earlier turns, model, tools, sampling parameters...), so everything but the
  last user message must match exactly; the FAISS index is separate per (partition, public model).
- on_request: the last user message (plain text only) is embedded off the event loop; the embedding and
  the index search of concurrent lookups share one worker call (`Embedder.embed_then`). Candidates at or
  above the model's threshold must pass `guards.compatible(new, cached)` (numbers, units, quotes,
  negation, direction, entities, languages); the first that does is served exactly like an exact hit
  (stored body, or a replayed SSE stream) with `x-tollway-cache: hit-semantic` and
  `x-tollway-cache-similarity`. A message longer than the embedding model's window is exact-only: its
  length decides on the loop when it can, else it is tokenized in the worker, in the lookup's own batch.
- Writes: the exact cache tells this plugin about each entry it stores (`stored_listeners`); the prompt's
  vector, its last user text and the entry's key are added to the index in the embedder's worker thread,
  off the request path. The answer itself lives once, in the store, under the exact key (so purge and TTL
  of the exact cache apply; an index entry whose body is gone is dropped on its next hit).
- Admin purge (`DELETE /admin/cache`, through `purge_index`): the vectors of the team's partitions (those
  named "<team>:...") and/or the model are dropped at once, in the worker thread. A purge is a tombstone
  (team, model, time): it removes the matching entries indexed at or before its time, and, until the longest
  TTL has passed, refuses matching entries stamped at or before it that arrive later (an in-flight write, a
  feed entry read after the purge), so an entry written before a purge is never resurrected and one written
  after it stays, whatever order they reach a replica in. `index_entries` counts the vectors per team.
- The embedding model loads in the worker thread in the background at startup; until it is loaded the
  gateway serves exact-only (`/ready` shows `semantic_cache.embedder`).
- `cache.semantic.index_dir`: the index is saved there at shutdown and loaded at startup.
- Replicas on Redis: every entry indexed is also appended (with its vector, so nobody re-embeds it) to a
  feed in the store (`Store.cache_feed_add`, a capped Redis stream); each replica reads the feed at start
  (which also rebuilds its index after a restart) and then every `cache.semantic.sync_interval_s`, and adds
  the other replicas' entries to its own index. A purge is appended to the feed too (a record of kind
  "purge"), so every replica, and one catching up at start, applies its tombstone. Entries are stamped with
  the writing replica's clock: replicas' clocks are assumed to agree to well under a second (NTP). The
  embedded store has no feed (one process).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import sys
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.cache.embedder import Embedder, TextTooLong
from gateway.cache.feed import FeedError, FeedPurge, decode_feed_entry, encode_feed_entry, encode_purge_entry
from gateway.cache.guards import compatible
from gateway.cache.index import SemanticIndex, set_search_threads
from gateway.cache.keys import SHARED_PARTITION, cache_control, canonical_request
from gateway.pipeline import Plugin, RequestContext, ShortCircuit
from gateway.plugins.exact_cache import STATUS, ExactCachePlugin
from gateway.settings import Settings
from gateway.store.base import Store, StoreUnavailable

log = logging.getLogger("tollway.cache.semantic")

SIMILARITY_HEADER = "x-tollway-cache-similarity"
_SEM = "cache.semantic"
"""ctx.state: (team, partition, model, last user text) of a request the semantic cache may index."""
_VEC = "cache.semantic.vector"
_LOOKUP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SWITCH_INTERVAL_S = 0.001
_EXPIRE_EVERY_S = 10.0
"""A full index is swept for expired entries at most this often (a sweep scans every entry)."""
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_FEED_BATCH = 1000


def partition_team(partition: str) -> str:
    """The team (or "shared") a semantic partition ("<team>:<prefix digest>") belongs to."""
    return partition.rpartition(":")[0]


class _Add(NamedTuple):
    partition: str
    model: str
    vec: npt.NDArray[np.float32] | None
    """None until embedded (a request whose lookup was skipped)."""
    key: str
    text: str
    ttl: float
    at: float


@dataclass(frozen=True, slots=True)
class _Tombstone:
    """A purge: entries of `team` (None: every team) and `model` (None: every model) indexed at or before
    `ts` are gone; until `until`, matching entries stamped at or before `ts` are refused when they arrive."""

    team: str | None
    model: str | None
    ts: float
    until: float

    def matches(self, partition: str, model: str) -> bool:
        return (self.team is None or partition_team(partition) == self.team) and (
            self.model is None or model == self.model
        )

    def covers(self, at: float) -> bool:
        return at <= self.ts

    def covers_entry(self, meta: Mapping[str, Any]) -> bool:
        """An index entry's meta; one without "at" (saved by an older version) predates every purge."""
        return self.covers(float(meta.get("at", 0.0)))


def last_user_text(body: dict[str, Any]) -> str | None:
    """The text of the last message when it is a user message of plain text, else None."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    if isinstance(content, str):
        return content if content.strip() else None
    if isinstance(content, list) and content:
        parts: list[str] = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                return None  # images, audio, files: exact only
            parts.append(part["text"])
        text = "\n".join(parts)
        return text if text.strip() else None
    return None


def prefix_digest(public_model: str, endpoint: str, body: dict[str, Any]) -> str:
    """SHA-256 of the canonical request with the last message's content left out."""
    messages = body["messages"]
    last = {k: v for k, v in messages[-1].items() if k != "content"}
    doc = {**body, "messages": [*messages[:-1], last]}
    return hashlib.sha256(canonical_request(public_model, endpoint, doc)).hexdigest()


def _vet(text: str, cached: list[str]) -> list[tuple[bool, str | None]]:
    """Guard verdicts of serving each cached prompt's answer for `text` (runs in the guards thread)."""
    return [compatible(text, c) for c in cached]


class SemanticCachePlugin(Plugin):
    name = "semantic_cache"
    fail_open = True
    """A broken semantic cache must never fail a request: it goes to the upstream instead."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: CollectorRegistry,
        exact: ExactCachePlugin,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self.conf = settings.cache.semantic
        self.store = store
        self.exact = exact
        self.batch_size = Histogram(
            "tollway_cache_embedding_batch_size",
            "Texts per embedding model call",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.lookup = Histogram(
            "tollway_cache_semantic_lookup_seconds",
            "Time to look a request up in the semantic cache (embedding included)",
            buckets=_LOOKUP_BUCKETS,
            registry=registry,
        )
        self.vetoes = Counter(
            "tollway_cache_semantic_vetoes",
            "Semantic candidates above the threshold refused by a guard",
            ["reason"],
            registry=registry,
        )
        self.index_size = Gauge(
            "tollway_cache_semantic_index_entries", "Entries in the semantic index", registry=registry
        )
        self.embedder = embedder or Embedder(on_batch=self._on_batch)
        self.index = SemanticIndex()
        self._size = 0
        """Entries in the index, as of the last change made in the worker thread: the index's own
        size() takes its lock, which a search in the worker may hold for milliseconds."""
        self.index_size.set_function(lambda: self._size)
        self._load: asyncio.Task[None] | None = None
        self._load_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync_task: asyncio.Task[None] | None = None
        self._feed = settings.store.backend == "redis"
        self._cursor: str | None = None
        self.replica = uuid.uuid4().hex
        self._tombstones: list[_Tombstone] = []
        """Worker thread only: purges whose matching entries may still arrive."""
        self._guards = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollway-guards")
        self._last_sweep = 0.0
        self._last_full_log = 0.0
        self._max_ttl = max(
            [settings.cache.default_ttl_s, *(m.cache.ttl_s or 0.0 for m in settings.models.values())]
        )
        self._miss = exact.misses.labels("semantic")
        exact.stored_listeners.append(self._on_stored)

    def _on_batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def on_startup(self, app: web.Application) -> None:
        # The embed worker runs Python between its native calls (tokenizer glue, batching, guards'
        # inputs); with the default 5 ms GIL switch interval the event loop can wait that long for the
        # GIL behind it. 1 ms bounds that wait (a few hundred more switches a second under load).
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self._load = asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        """Load the saved index and the model, both in the worker thread (the loop keeps serving)."""
        try:  # every FAISS call runs in the worker thread; OpenMP's thread count is per calling thread
            await self.embedder.run_in_worker(set_search_threads, self.conf.search_threads)
        except Exception:
            log.exception("could not set the FAISS thread count")
        if self.conf.index_dir:
            try:
                await self.embedder.run_in_worker(self._load_index, self.conf.index_dir)
            except Exception:
                log.exception(
                    "could not load the semantic index from %s; starting empty", self.conf.index_dir
                )
        if self._feed:
            try:
                await self._catch_up()
            except Exception:
                log.exception("could not read the semantic cache feed; retrying in the background")
            self._sync_task = asyncio.get_running_loop().create_task(self._sync())
        try:
            await self.embedder.start()
        except Exception as e:
            self._load_error = f"{type(e).__name__}: {e}"
            log.exception("semantic cache unavailable; serving exact-only")
            return
        # The model (torch, transformers: ~430k objects) and the saved index were loaded after the
        # gateway froze its start-up objects: freeze them too, or every full collection walks them
        # all while holding the GIL (~200 ms on the event loop's thread). Freezing is O(1); the
        # load leaves next to no cyclic garbage (a full collection right after it finds ~90 objects).
        gc.freeze()

    @property
    def ready(self) -> bool:
        return self.embedder.loaded and self._load is not None and self._load.done()

    def health(self) -> dict[str, Any] | None:
        state = "ready" if self.ready else ("failed" if self._load_error else "loading")
        out: dict[str, Any] = {"ok": True, "embedder": state, "entries": self._size}
        if self._load_error:
            out["error"] = self._load_error
        return out

    def _load_index(self, directory: str) -> None:
        """Worker thread: replace the index by the saved one, before any later worker job sees it."""
        self.index = SemanticIndex.load(directory)
        self._size = self.index.size()

    async def _catch_up(self) -> int:
        """Apply the feed's records written since the last call by other replicas (their entries and
        purges, in order); returns how many entries were added."""
        n = 0
        while True:
            raws, self._cursor = await self.store.cache_feed_read(self._cursor, _FEED_BATCH)
            if not raws:
                return n
            now = time.time()
            ops: list[_Add | _Tombstone] = []
            for raw in raws:
                try:
                    rec = decode_feed_entry(raw, self.index.dim)
                except FeedError as e:
                    log.warning("malformed semantic cache feed entry ignored: %s", e)
                    continue
                if rec is None or rec.replica == self.replica:
                    continue  # a kind we do not know; or ours: indexed, or purged, here already
                if isinstance(rec, FeedPurge):
                    ops.append(self._tombstone(rec.team, rec.model, rec.ts))
                elif rec.expires > now:
                    ops.append(
                        _Add(rec.partition, rec.model, rec.vec, rec.key, rec.text, rec.expires - now, rec.at)
                    )
            if ops:
                added, _ = await self.embedder.run_in_worker(self._apply, ops)
                n += added
            if len(raws) < _FEED_BATCH:
                return n

    def _purged(self, op: _Add) -> bool:
        """Worker thread: a purge issued after this entry was indexed covers it."""
        return any(t.matches(op.partition, op.model) and t.covers(op.at) for t in self._tombstones)

    def _tombstone(self, team: str | None, model: str | None, ts: float) -> _Tombstone:
        return _Tombstone(team, model, ts, ts + self._max_ttl)

    def _apply(self, ops: list[_Add | _Tombstone]) -> tuple[int, int]:
        """Worker thread: in order, add entries (unless a purge covers them or the index is full; expired
        entries are dropped to make room) and apply purges. Returns (entries added, entries purged)."""
        added = purged = 0
        now = time.time()
        self._tombstones = [t for t in self._tombstones if t.until > now]
        full = False
        try:
            for op in ops:
                if isinstance(op, _Tombstone):
                    self._tombstones.append(op)
                    purged += self.index.purge_where(op.matches, op.covers_entry)
                    full = False
                    continue
                if full or op.vec is None or self._purged(op):
                    continue
                if self.index.size() >= self.conf.max_entries:
                    if now - self._last_sweep >= _EXPIRE_EVERY_S:
                        self._last_sweep = now
                        self.index.expire()
                    if self.index.size() >= self.conf.max_entries:
                        if now - self._last_full_log >= 60:
                            self._last_full_log = now
                            log.warning("semantic index full (%d entries); not adding", self.conf.max_entries)
                        full = True
                        continue
                meta = {"text": op.text, "key": op.key, "at": op.at}
                self.index.add(op.partition, op.model, op.vec, op.key, meta, ttl_s=op.ttl)
                added += 1
            return added, purged
        finally:
            self._size = self.index.size()

    def _remove(self, partition: str, model: str, entry_id: str) -> None:
        """Worker thread."""
        self.index.remove(partition, model, entry_id)
        self._size = self.index.size()

    # ---- admin (gateway.api.admin_routes.SemanticCacheAdmin) ------------------------------------------

    async def purge_index(self, team: str | None, model: str | None) -> int:
        """Drop the vectors of `team`'s partitions (a team id, or "shared"; None: every team) and/or of
        `model` (None: every model) now, in the worker thread, and, on Redis, tell the other replicas
        through the feed. Returns how many this replica dropped."""
        tomb = self._tombstone(team, model, time.time())
        _, purged = await self.embedder.run_in_worker(self._apply, [tomb])
        if self._feed:
            await self.store.cache_feed_add(
                encode_purge_entry(self.replica, team, model, tomb.ts), self.conf.max_entries
            )
        return purged

    async def index_entries(self, team: str | None = None) -> dict[str, int]:
        """Live vectors in this replica's index per team (or only `team`), counted in the worker thread."""
        return await self.embedder.run_in_worker(self._count_by_team, team)

    def _count_by_team(self, team: str | None) -> dict[str, int]:
        """Worker thread."""
        self.index.expire()
        self._size = self.index.size()
        out: dict[str, int] = {}
        for (partition, _model), n in self.index.counts().items():
            t = partition_team(partition)
            if n and (team is None or t == team):
                out[t] = out.get(t, 0) + n
        return out

    async def _sync(self) -> None:
        while True:
            await asyncio.sleep(self.conf.sync_interval_s)
            try:
                await self._catch_up()
            except StoreUnavailable:
                log.warning("semantic cache feed unreachable; retrying")
            except Exception:
                log.exception("semantic cache feed sync failed")

    async def on_shutdown(self) -> None:
        for task in (self._load, self._sync_task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.conf.index_dir and self._load_error is None:
            try:
                await self.embedder.run_in_worker(self.index.save, self.conf.index_dir)
            except Exception:
                log.exception("could not save the semantic index to %s", self.conf.index_dir)
        await self.embedder.close()
        self._guards.shutdown(wait=False, cancel_futures=True)

    # ---- request ------------------------------------------------------------------------------------

    def _eligible(self, ctx: RequestContext) -> tuple[str, str, str, str] | None:
        body, model = ctx.body, ctx.public_model
        if ctx.state.get(STATUS) != "miss" or ctx.endpoint != "chat" or body is None or model is None:
            return None
        if self.settings.models[model].cache.semantic is False or not self.ready:
            return None
        text = last_user_text(body)
        if text is None or self.embedder.quick_fit(text) is False:
            return None  # longer than the model's window: exact matching only (also see TextTooLong)
        team = ctx.principal.team if ctx.principal is not None else "default"
        shard = SHARED_PARTITION if self.settings.cache.shared_partition else team
        partition = f"{shard}:{prefix_digest(model, ctx.endpoint, body)}"
        return team, partition, model, text

    async def on_request(self, ctx: RequestContext) -> ShortCircuit | None:
        info = self._eligible(ctx)
        if info is None:
            return None
        ctx.state[_SEM] = info
        no_cache, _ = cache_control(ctx.headers.get("Cache-Control"))
        if no_cache:
            return None
        team, partition, model, text = info
        k = self.conf.candidates
        index = self.index

        def search(m: npt.NDArray[np.float32]) -> Any:
            return index.search_batch(partition, model, m, k)

        t0 = time.perf_counter()
        try:
            vec, (hits, metas) = await self.embedder.embed_then(
                text, (id(index), partition, model, k), search, must_fit=True
            )
        except TextTooLong:  # the worker tokenized it: longer than the window, exact matching only
            del ctx.state[_SEM]
            return None
        ctx.state[_VEC] = vec
        mc = self.settings.models[model].cache
        threshold = mc.semantic_threshold if mc.semantic_threshold is not None else self.conf.threshold
        try:
            cands = [(e, sim, meta) for (e, sim), meta in zip(hits, metas, strict=True) if sim >= threshold]
            if not cands:
                self._miss.inc()
                return None
            # The guards are pure Python (~0.1-0.5 ms per new text): off the event loop, so that a batch
            # of lookups finishing together does not stall it.
            verdicts = await asyncio.get_running_loop().run_in_executor(
                self._guards, _vet, text, [str(meta.get("text", "")) for _, _, meta in cands]
            )
            for (entry_id, sim, meta), (ok, reason) in zip(cands, verdicts, strict=True):
                if not ok:
                    # The rule's name only: the reason's detail quotes the prompts (no prompt text in
                    # metrics) and would make the label set unbounded.
                    self.vetoes.labels((reason or "other").partition(":")[0]).inc()
                    continue
                try:
                    raw = await self.store.cache_get(str(meta.get("key", entry_id)), team, "semantic")
                except StoreUnavailable:
                    log.warning("semantic cache lookup failed: store unavailable")
                    return None
                if raw is None:  # the answer expired or was purged: forget its vector
                    await self.embedder.run_in_worker(self._remove, partition, model, entry_id)
                    continue
                sc = self.exact._answer(ctx, raw, "semantic")
                if sc is not None:
                    if ctx.response_headers is None:
                        ctx.response_headers = {}
                    ctx.response_headers[SIMILARITY_HEADER] = f"{min(sim, 1.0):.4f}"
                    return sc
            self._miss.inc()
            return None
        finally:
            self.lookup.observe(time.perf_counter() - t0)

    # ---- writes -------------------------------------------------------------------------------------

    def _on_stored(self, ctx: RequestContext, key: str, value: bytes, written: asyncio.Task[None]) -> None:
        """The exact cache is storing `value` under `key` for this miss (`written` writes it): index its
        prompt once the answer is in the store, so no lookup finds a vector whose answer is not there yet
        (it would drop the vector as stale)."""
        info = ctx.state.get(_SEM)
        if info is None or ctx.state.get(STATUS) != "miss":
            return
        vec: npt.NDArray[np.float32] | None = ctx.state.get(_VEC)
        _, partition, model, text = info
        ttl = self.settings.models[model].cache.ttl_s or self.settings.cache.default_ttl_s
        entry = _Add(partition, model, vec, key, text, ttl, time.time())
        task = asyncio.get_running_loop().create_task(self._index(entry, written))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _index(self, entry: _Add, written: asyncio.Task[None] | None = None) -> None:
        """`entry.vec` is None when the lookup was skipped (Cache-Control: no-cache): embed it here."""
        try:
            if written is not None:
                await asyncio.shield(written)
            if entry.vec is None:
                try:
                    entry = entry._replace(vec=await self.embedder.embed_one(entry.text, must_fit=True))
                except TextTooLong:
                    return
            added, _ = await self.embedder.run_in_worker(self._apply, [entry])
            if added and self._feed:
                p, m, vec, key, text, ttl, at = entry
                assert vec is not None
                feed_entry = encode_feed_entry(self.replica, p, m, text, key, vec, at + ttl, at)
                try:
                    await self.store.cache_feed_add(feed_entry, self.conf.max_entries)
                except StoreUnavailable:
                    log.warning("semantic cache feed unreachable: other replicas will not see this entry")
        except Exception:
            log.exception("could not add an entry to the semantic index")
