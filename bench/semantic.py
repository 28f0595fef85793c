"""Semantic-cache lookup bench, in process: ``python -m bench.semantic [--quick] [--requests N]``.

A lookup is what the gateway does on a semantic-cache read: embed the last user message (micro-batched, in
the embedder's thread) and search the (team, model) FAISS index in that same thread. The index is filled
with ``--entries`` random normalised vectors (default 100000) plus the embeddings of ``--seeds`` real
prompts (default 500), so that lookups find real neighbours. A 1 ms ticker task measures the event loop's
own lag during each run. Prints one markdown table on stdout (progress on stderr).

Rows: the idle loop (the lag floor), lookups at concurrency 1 and 32 (``--requests`` each, default 1000),
the same at 32 with the search not batched, FAISS search alone (200 queries), and the embedder's
throughput (``--embed-texts`` texts, default 1024, as one request and as concurrent singles). "process
CPU ms/op": CPU of this whole process (all threads) per lookup / search / text. FAISS runs with one
OpenMP thread (``--faiss-threads``, default 1; 0 keeps FAISS's default of one per core, which is what the
gateway runs with: it never sets it).
``--quick``: 100 requests, 20000 entries, 100 seeds, 128 embed texts (unless given).

``python -m bench`` runs this as a child process (its semantic section) and also asks it to save the
index it built for the gateway: ``--save-index DIR --team T --body JSON`` builds the index in the
partition the semantic cache plugin would use for requests of that body's shape from team ``T``
(``f"{T}:{prefix_digest(model, 'chat', body)}"``, model = the body's ``model``), with the metadata
the plugin writes (``{"text", "key"}``; the keys are not in any store), and saves it to ``DIR``
(``SemanticIndex.save``) after the table, for ``cache.semantic.index_dir``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from bench.prompts import SUBJECTS, TEMPLATES
from gateway.cache.embedder import Embedder
from gateway.cache.index import SemanticIndex

PARTITION = "team-bench"
MODEL = "gpt-bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prompts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = SUBJECTS[int(rng.integers(len(SUBJECTS)))]
        t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        out.append(f"{t.format(s=s)} (variant {i})" if rng.random() < 0.5 else t.format(s=s))
    return out


class LagMeter:
    """Max and p99 of a 1 ms ticker's lateness while running."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self.lags.append(time.perf_counter() - t0 - 0.001)

    def __enter__(self) -> LagMeter:
        self._task = asyncio.create_task(self._tick())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def run_lookups(
    lookup: Callable[[str], Awaitable[object]], texts: list[str], concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    it = iter(texts)

    async def worker() -> None:
        for text in it:
            t0 = time.perf_counter()
            await lookup(text)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - t0


def full_gc_pause(entries: int) -> None:
    """A full collection holds the GIL, so the event loop waits for it: time one with the model and
    the index tracked, then frozen (as the gateway freezes them once the semantic cache is ready)."""
    gc.collect()
    t0 = time.perf_counter()
    gc.collect()
    tracked_ms = (time.perf_counter() - t0) * 1000
    n_tracked = len(gc.get_objects())
    gc.freeze()
    t0 = time.perf_counter()
    gc.collect()
    frozen_ms = (time.perf_counter() - t0) * 1000
    gc.unfreeze()
    print(
        f"\nFull garbage collection with the model and the {entries}-entry index loaded: "
        f"{tracked_ms:.1f} ms while their {n_tracked} objects are tracked, {frozen_ms:.1f} ms once "
        "frozen (the gateway freezes them when the semantic cache is ready; index entries are tuples "
        "the collector stops tracking)."
    )


async def main_async(
    entries: int,
    requests: int,
    torch_threads: int | None,
    *,
    seeds: int = 500,
    embed_texts: int = 1024,
    partition: str = PARTITION,
    model: str = MODEL,
    save_dir: str | None = None,
    faiss_threads: int = 1,
) -> None:
    """Build the index, run the lookups, print the table; with `save_dir`, then save the index
    (entries with the semantic cache plugin's metadata) there."""
    with_meta = save_dir is not None
    batches: list[int] = []
    t0 = time.perf_counter()
    embedder = Embedder(on_batch=lambda n, _s: batches.append(n), num_threads=torch_threads)
    await embedder.start()
    load_s = time.perf_counter() - t0
    rss_model_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import faiss

    omp_default = faiss.omp_get_max_threads()
    if faiss_threads:
        faiss.omp_set_num_threads(faiss_threads)  # 1: leave the other core to the event loop

    index = SemanticIndex()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    filler = rng.standard_normal((entries, index.dim)).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    ids = [f"filler-{i}" for i in range(entries)]
    metas: list[Any] | None = None
    if with_meta:
        metas = [{"text": f"filler {i}", "key": f"bench-{i}"} for i in ids]
    index.add_batch(partition, model, filler, ids, metas)
    del filler
    seeded = prompts(seeds, seed=1)
    vecs = await embedder.embed(seeded)
    ids = [f"real-{i}" for i in range(len(seeded))]
    metas = None
    if with_meta:
        metas = [{"text": t, "key": f"bench-{i}"} for i, t in zip(ids, seeded, strict=True)]
    index.add_batch(partition, model, vecs, ids, metas)
    fill_s = time.perf_counter() - t0
    rss_index_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def search_rows(m: np.ndarray) -> list[list[tuple[str, float]]]:
        return [hits for hits, _metas in index.search_batch(partition, model, m, 1)]

    async def lookup(text: str) -> object:
        # what the cache does: embedding and search in the worker, both batched with concurrent lookups
        return await embedder.embed_then(text, (partition, model, 1), search_rows)

    async def lookup_unbatched_search(text: str) -> object:
        vec = await embedder.embed([text])
        return await embedder.run_in_worker(index.search, partition, model, vec, 1)

    await run_lookups(lookup, prompts(64, seed=2), 8)  # warm-up

    # the event loop's lag with nothing running: the floor of the lag columns below
    c0 = cpu_s()
    with LagMeter() as idle:
        await asyncio.sleep(2.0)
        await idle.stop()
    rows: list[tuple[str, ...]] = [
        (
            "idle event loop (baseline)",
            "-",
            "-",
            "-",
            "-",
            "0",
            f"{(cpu_s() - c0) * 1000 / 2:.1f} per s",
            f"{max(idle.lags) * 1000:.2f} / {pct(idle.lags, 99) * 1000:.2f}",
        )
    ]
    for concurrency, fn, label in (
        (1, lookup, "semantic lookup, concurrency 1"),
        (32, lookup, "semantic lookup, concurrency 32"),
        (32, lookup_unbatched_search, "  same, search not batched (c 32)"),
    ):
        texts = prompts(requests, seed=10 + concurrency)
        batches.clear()
        calls0 = embedder.model_calls
        c0 = cpu_s()
        with LagMeter() as lag:
            latencies, wall = await run_lookups(fn, texts, concurrency)
            await lag.stop()
        cpu = (cpu_s() - c0) * 1000 / len(texts)
        calls = embedder.model_calls - calls0
        rows.append(
            (
                label,
                f"{pct(latencies, 50) * 1000:.1f}",
                f"{pct(latencies, 99) * 1000:.1f}",
                f"{len(texts) / wall:.0f}",
                f"{statistics.mean(batches):.1f}" if batches else "-",
                f"{calls}",
                f"{cpu:.1f}",
                f"{max(lag.lags) * 1000:.2f} / {pct(lag.lags, 99) * 1000:.2f}",
            )
        )

    # search alone (no embedding), one query at a time, in the worker thread
    q = await embedder.embed(prompts(200, seed=99))
    c0 = cpu_s()
    with LagMeter() as lag:
        t_search: list[float] = []
        for row in q:
            t0 = time.perf_counter()
            await embedder.run_in_worker(index.search, partition, model, row, 1)
            t_search.append(time.perf_counter() - t0)
        await lag.stop()
    rows.append(
        (
            f"FAISS search only ({index.size()} entries)",
            f"{pct(t_search, 50) * 1000:.1f}",
            f"{pct(t_search, 99) * 1000:.1f}",
            f"{len(q) / sum(t_search):.0f}",
            "-",
            "0",
            f"{(cpu_s() - c0) * 1000 / len(q):.1f}",
            f"{max(lag.lags) * 1000:.2f} / {pct(lag.lags, 99) * 1000:.2f}",
        )
    )

    # embedder throughput: one big request (chunks of max_batch), and many concurrent single texts
    for label, n, conc in (
        (f"embed, one request of {embed_texts} texts", embed_texts, 0),
        (f"embed, {embed_texts} singles x 64 conc", embed_texts, 64),
    ):
        texts = prompts(n, seed=123)
        batches.clear()
        c0 = cpu_s()
        with LagMeter() as lag:
            t0 = time.perf_counter()
            if conc == 0:
                await embedder.embed(texts)
                lat = [time.perf_counter() - t0]
            else:
                lat, _ = await run_lookups(lambda t: embedder.embed([t]), texts, conc)
            wall = time.perf_counter() - t0
            await lag.stop()
        rows.append(
            (
                label,
                f"{pct(lat, 50) * 1000:.1f}",
                f"{pct(lat, 99) * 1000:.1f}",
                f"{n / wall:.0f} texts/s",
                f"{statistics.mean(batches):.1f}",
                f"{len(batches)}",
                f"{(cpu_s() - c0) * 1000 / n:.1f}",
                f"{max(lag.lags) * 1000:.2f} / {pct(lag.lags, 99) * 1000:.2f}",
            )
        )

    print(
        f"\nSemantic cache bench: {index.size()} entries in one (team, model) index "
        f"(IndexIDMap2/IndexFlatIP, dim {index.dim}); all-MiniLM-L6-v2 on CPU, torch threads "
        f"{embedder.num_threads}, faiss threads {faiss_threads or f'{omp_default} (its default)'}, "
        f"{os.cpu_count()} cores; micro-batch window "
        f"{embedder.window_s * 1000:.0f} ms, max batch {embedder.max_batch}.\nModel load {load_s:.1f} s "
        f"(incl. imports), RSS with model {rss_model_mb:.0f} MB, with index {rss_index_mb:.0f} MB "
        f"(fill {fill_s:.1f} s).\n"
    )
    print(
        "| run | p50 ms | p99 ms | throughput /s | mean batch | model calls | process CPU ms/op "
        "| loop lag max / p99 ms |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    full_gc_pause(index.size())
    sys.stdout.flush()
    await embedder.close()
    if save_dir is not None:
        t0 = time.perf_counter()
        index.save(save_dir)
        log(
            f"bench.semantic: saved {index.size()} entries in partition {partition!r}, model {model!r} "
            f"to {save_dir} in {time.perf_counter() - t0:.1f} s"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and entries (a smoke run)")
    ap.add_argument("--entries", type=int, default=None, help="random entries (default 100000; quick 20000)")
    ap.add_argument("--requests", type=int, default=None, help="lookups per run (default 1000; quick 100)")
    ap.add_argument("--seeds", type=int, default=None, help="real prompts indexed (default 500; quick 100)")
    ap.add_argument(
        "--embed-texts", type=int, default=None, help="texts of the embedder rows (default 1024; quick 128)"
    )
    ap.add_argument("--torch-threads", type=int, default=None, help="default: cores - 1")
    ap.add_argument(
        "--faiss-threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads (default 1; 0: leave FAISS's default, one per core, as the gateway does)",
    )
    ap.add_argument("--save-index", metavar="DIR", help="save the index there after the run (see above)")
    ap.add_argument("--team", default="bench", help="with --save-index: the team id of the partition")
    ap.add_argument("--body", help="with --save-index: a request body (JSON) of the gateway's request shape")
    args = ap.parse_args(argv)
    quick = args.quick

    def pick(value: int | None, full: int, small: int) -> int:
        return value if value is not None else (small if quick else full)

    partition, model = PARTITION, MODEL
    if args.save_index is not None:
        if args.body is None:
            ap.error("--save-index needs --body")
        from gateway.plugins.semantic_cache import prefix_digest

        body = json.loads(args.body)
        model = str(body["model"])
        partition = f"{args.team}:{prefix_digest(model, 'chat', body)}"
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(
        main_async(
            pick(args.entries, 100_000, 20_000),
            pick(args.requests, 1000, 100),
            args.torch_threads,
            seeds=pick(args.seeds, 500, 100),
            embed_texts=pick(args.embed_texts, 1024, 128),
            partition=partition,
            model=model,
            save_dir=args.save_index,
            faiss_threads=args.faiss_threads,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
