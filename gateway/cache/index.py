"""The semantic cache's vector index: one FAISS index per (partition, model).

A partition is a team (or the shared partition when the config says so); a vector added in one partition is
never returned by a search in another, because each (partition, model) pair has its own FAISS index.

Each index is an ``IndexIDMap2`` over an ``IndexFlatIP``: exact inner-product search, which on L2-normalised
vectors is cosine similarity. Exact search is fine up to ~100k entries per index (a 100k x 384 scan is a few
ms). The IDMap2 wrapper lets entries be removed (purge, expiry, replacement) by their int64 id; this module
maps the caller's string entry ids (cache keys) to those int64 ids.

Thread safety
-------------
FAISS indexes are not safe for a write concurrent with anything else, so every public method takes the
instance's lock. All of them are blocking CPU work (a search scans the whole index, an add may reallocate
it), so call them off the event loop, ideally in the embedder's worker thread (``Embedder.run_in_worker``),
where they are serialised with the model calls and the event loop stays free.

Persistence
-----------
``save(dir)`` writes one FAISS file plus one JSON sidecar (ids, metadata, expiry) per index and a manifest,
each atomically (temp file + rename); ``load(dir)`` rebuilds the whole structure at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import orjson

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

Key = tuple[str, str]  # (partition, model)


#: faiss-cpu 1.15 computes inner products either with one SIMD scan per query or with BLAS (sgemm), chosen by
#: the process-global ``distance_compute_blas_threshold`` (default 128000: never BLAS for us). Measured on a
#: 100k x 384 index, 1 thread: 1 query SIMD 6 ms / BLAS 12 ms; 8 queries SIMD 48 ms / BLAS 14 ms; 32 queries
#: SIMD 190 ms / BLAS 30 ms. So search_batch() sets it per call (under the instance lock): BLAS from 2
#: queries on. This assumes no other FAISS user in the process changes it concurrently.
_BLAS_ALWAYS = 1
_BLAS_NEVER = 2**31 - 1


def set_search_threads(n: int) -> None:
    """OpenMP threads FAISS uses for calls made from the calling thread (call it in the thread that
    searches)."""
    _faiss().omp_set_num_threads(n)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("the semantic cache needs faiss: pip install 'tollway[semantic]'") from exc
    return faiss


_Entry = tuple[str, bytes, float | None]
"""(entry id, meta as JSON, expiry). A plain tuple of atomic values on purpose: the garbage collector
stops tracking such tuples after their first collection, so a full collection does not walk every
entry of a large index (with one object per entry, 100k entries made a full collection take ~19 ms
on the event loop's thread)."""
_ID: Final = 0
_META: Final = 1
_EXPIRES: Final = 2


def _entry(entry_id: str, meta: Mapping[str, Any] | None, expires_at: float | None) -> _Entry:
    return (entry_id, orjson.dumps(meta or {}), expires_at)


def _meta(entry: _Entry) -> dict[str, Any]:
    meta: dict[str, Any] = orjson.loads(entry[_META])
    return meta


class _PartitionIndex:
    """One FAISS index and its id maps. Not locked: SemanticIndex holds the lock."""

    def __init__(self, dim: int, index: Any = None) -> None:
        faiss = _faiss()
        self.index: Any = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.entries: dict[int, _Entry] = {}
        self.ids: dict[str, int] = {}
        self.next_id = 1

    def add(self, vector: npt.NDArray[np.float32], entry: _Entry) -> None:
        old = self.ids.get(entry[_ID])
        if old is not None:
            self.remove_ids([old])
        iid = self.next_id
        self.next_id += 1
        self.index.add_with_ids(vector, np.array([iid], dtype=np.int64))
        self.entries[iid] = entry
        self.ids[entry[_ID]] = iid

    def remove_ids(self, iids: list[int]) -> int:
        if not iids:
            return 0
        removed = int(self.index.remove_ids(np.array(iids, dtype=np.int64)))
        for iid in iids:
            entry = self.entries.pop(iid, None)
            if entry is not None:
                self.ids.pop(entry[_ID], None)
        return removed


class SemanticIndex:
    """Vectors of cached prompts, searchable by cosine similarity, separate per (partition, model)."""

    def __init__(self, dim: int = 384, clock: Any = time.time) -> None:
        self.dim = dim
        self._clock = clock
        self._lock = threading.RLock()
        self._indexes: dict[Key, _PartitionIndex] = {}

    # -- writes ------------------------------------------------------------------------------------------

    def add(
        self,
        partition: str,
        model: str,
        vector: npt.ArrayLike,
        entry_id: str,
        meta: Mapping[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
    ) -> None:
        """Add (or replace) `entry_id` with its normalised vector. `meta` must be JSON-serialisable."""
        vec = self._as_matrix(vector)
        if vec.shape[0] != 1:
            raise ValueError("add() takes one vector")
        expires_at = self._clock() + ttl_s if ttl_s is not None else None
        entry = _entry(entry_id, meta, expires_at)
        with self._lock:
            part = self._indexes.get((partition, model))
            if part is None:
                part = self._indexes[(partition, model)] = _PartitionIndex(self.dim)
            part.add(vec, entry)

    def add_batch(
        self,
        partition: str,
        model: str,
        vectors: npt.ArrayLike,
        entry_ids: list[str],
        metas: list[Mapping[str, Any]] | None = None,
        *,
        ttl_s: float | None = None,
    ) -> None:
        """Add many entries in one FAISS call (rebuilds, bulk loads). Ids already present are replaced."""
        vecs = self._as_matrix(vectors)
        if vecs.shape[0] != len(entry_ids) or (metas is not None and len(metas) != len(entry_ids)):
            raise ValueError("add_batch(): vectors, entry_ids and metas differ in length")
        if len(set(entry_ids)) != len(entry_ids):
            raise ValueError("add_batch(): duplicate entry ids")
        expires_at = self._clock() + ttl_s if ttl_s is not None else None
        with self._lock:
            part = self._indexes.get((partition, model))
            if part is None:
                part = self._indexes[(partition, model)] = _PartitionIndex(self.dim)
            part.remove_ids([part.ids[e] for e in entry_ids if e in part.ids])
            first = part.next_id
            part.next_id += len(entry_ids)
            iids = np.arange(first, part.next_id, dtype=np.int64)
            part.index.add_with_ids(vecs, iids)
            for i, entry_id in enumerate(entry_ids):
                meta = dict(metas[i]) if metas is not None else {}
                part.entries[first + i] = _entry(entry_id, meta, expires_at)
                part.ids[entry_id] = first + i

    def remove(self, partition: str, model: str, entry_id: str) -> bool:
        with self._lock:
            part = self._indexes.get((partition, model))
            if part is None or entry_id not in part.ids:
                return False
            part.remove_ids([part.ids[entry_id]])
            return True

    def purge(self, partition: str | None = None, model: str | None = None) -> int:
        """Drop indexes matching `partition` and/or `model` (None matches all); returns entries dropped."""
        return self.purge_where(
            lambda p, m: (partition is None or p == partition) and (model is None or m == model)
        )

    def purge_where(
        self,
        indexes: Callable[[str, str], bool],
        entries: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> int:
        """Remove the entries of every index whose (partition, model) passes `indexes` and, when given,
        whose meta passes `entries`; returns how many were removed. An index left empty is dropped whole
        (no FAISS call); otherwise the doomed ids go in one ``remove_ids`` call per index."""
        n = 0
        with self._lock:
            for key in [k for k in self._indexes if indexes(*k)]:
                part = self._indexes[key]
                if entries is None:
                    doomed = list(part.entries)
                else:
                    doomed = [i for i, e in part.entries.items() if entries(_meta(e))]
                if not doomed:
                    continue
                if len(doomed) == len(part.entries):
                    n += len(self._indexes.pop(key).entries)
                else:
                    n += part.remove_ids(doomed)
        return n

    def expire(self, now: float | None = None) -> int:
        """Remove entries whose TTL has passed. Returns how many were removed."""
        now = self._clock() if now is None else now
        n = 0
        with self._lock:
            for part in self._indexes.values():
                dead = [
                    i for i, e in part.entries.items() if e[_EXPIRES] is not None and e[_EXPIRES] <= now
                ]
                n += part.remove_ids(dead)
        return n

    # -- reads -------------------------------------------------------------------------------------------

    def search(
        self, partition: str, model: str, vector: npt.ArrayLike, k: int = 1
    ) -> list[tuple[str, float]]:
        """Up to `k` (entry_id, cosine similarity) in this partition and model, best first, unexpired."""
        return self.search_meta(partition, model, vector, k)[0]

    def search_meta(
        self, partition: str, model: str, vector: npt.ArrayLike, k: int = 1
    ) -> tuple[list[tuple[str, float]], list[dict[str, Any]]]:
        """Like search(), plus each hit's meta dict (same order)."""
        return self.search_batch(partition, model, self._as_matrix(vector)[:1], k)[0]

    def search_batch(
        self, partition: str, model: str, vectors: npt.ArrayLike, k: int = 1
    ) -> list[tuple[list[tuple[str, float]], list[dict[str, Any]]]]:
        """search_meta() for several query vectors of the same partition and model in one FAISS call."""
        queries = self._as_matrix(vectors)
        now = self._clock()
        with self._lock:
            part = self._indexes.get((partition, model))
            if part is None or part.index.ntotal == 0:
                return [([], []) for _ in range(queries.shape[0])]
            kk = min(k, int(part.index.ntotal))
            faiss = _faiss()
            faiss.cvar.distance_compute_blas_threshold = (
                _BLAS_ALWAYS if queries.shape[0] >= 2 else _BLAS_NEVER
            )
            sims, iids = part.index.search(queries, kk)
            out: list[tuple[list[tuple[str, float]], list[dict[str, Any]]]] = []
            for row_sims, row_ids in zip(sims, iids, strict=True):
                hits: list[tuple[str, float]] = []
                metas: list[dict[str, Any]] = []
                for sim, iid in zip(row_sims, row_ids, strict=True):
                    entry = part.entries.get(int(iid)) if iid >= 0 else None
                    if entry is None:
                        continue
                    expires_at = entry[_EXPIRES]
                    if expires_at is not None and expires_at <= now:
                        continue
                    hits.append((entry[_ID], float(sim)))
                    metas.append(_meta(entry))
                out.append((hits, metas))
            return out

    def size(self, partition: str | None = None, model: str | None = None) -> int:
        """Entries in the matching indexes (None matches all)."""
        with self._lock:
            return sum(
                int(p.index.ntotal)
                for (pa, mo), p in self._indexes.items()
                if (partition is None or pa == partition) and (model is None or mo == model)
            )

    def counts(self) -> dict[Key, int]:
        """Entries per (partition, model), expired ones included until expire() removes them."""
        with self._lock:
            return {k: int(p.index.ntotal) for k, p in self._indexes.items()}

    def keys(self) -> list[Key]:
        with self._lock:
            return sorted(self._indexes)

    def entry_ids(self, partition: str, model: str) -> Iterator[str]:
        with self._lock:
            part = self._indexes.get((partition, model))
            ids = list(part.ids) if part is not None else []
        return iter(ids)

    def bytes_used(self) -> int:
        """Approximate memory held by the vectors (4 bytes x dim per entry)."""
        return self.size() * self.dim * 4

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Write every index to `directory` (created if needed), atomically per file."""
        faiss = _faiss()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with self._lock:
            manifest: dict[str, Any] = {"version": FORMAT_VERSION, "dim": self.dim, "indexes": []}
            for (partition, model), part in self._indexes.items():
                stem = _stem(partition, model)
                tmp = d / f".{stem}.faiss.tmp"
                faiss.write_index(part.index, str(tmp))
                os.replace(tmp, d / f"{stem}.faiss")
                side = {
                    "next_id": part.next_id,
                    "entries": [
                        [iid, e[_ID], _meta(e), e[_EXPIRES]] for iid, e in part.entries.items()
                    ],
                }
                _write_json(d / f"{stem}.json", side)
                manifest["indexes"].append({"partition": partition, "model": model, "stem": stem})
            keep = {f"{i['stem']}.{ext}" for i in manifest["indexes"] for ext in ("faiss", "json")}
            _write_json(d / MANIFEST, manifest)
        for f in d.iterdir():  # files of indexes that were purged since the last save
            if f.name != MANIFEST and f.suffix in (".faiss", ".json") and f.name not in keep:
                f.unlink(missing_ok=True)

    @classmethod
    def load(cls, directory: str | Path, clock: Any = time.time) -> SemanticIndex:
        """Rebuild a SemanticIndex saved by save(); an absent directory gives an empty index."""
        faiss = _faiss()
        d = Path(directory)
        mpath = d / MANIFEST
        if not mpath.is_file():
            return cls(clock=clock)
        manifest = json.loads(mpath.read_text())
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported semantic index format {manifest.get('version')!r} in {d}")
        self = cls(dim=int(manifest["dim"]), clock=clock)
        for item in manifest["indexes"]:
            stem = item["stem"]
            index = faiss.read_index(str(d / f"{stem}.faiss"))
            side = json.loads((d / f"{stem}.json").read_text())
            part = _PartitionIndex(self.dim, index)
            part.next_id = int(side["next_id"])
            for iid, entry_id, meta, expires_at in side["entries"]:
                part.entries[int(iid)] = _entry(entry_id, meta, expires_at)
                part.ids[entry_id] = int(iid)
            if len(part.entries) != int(index.ntotal):
                raise ValueError(f"semantic index {stem} in {d}: sidecar and FAISS file disagree")
            self._indexes[(item["partition"], item["model"])] = part
        self.expire()
        return self

    # -- helpers -------------------------------------------------------------------------------------------

    def _as_matrix(self, vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
        arr = np.ascontiguousarray(np.asarray(vector, dtype=np.float32))
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"expected vectors of dimension {self.dim}, got shape {arr.shape}")
        return arr


def _stem(partition: str, model: str) -> str:
    return hashlib.sha256(f"{partition}\x00{model}".encode()).hexdigest()[:32]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)
