"""Semantic-cache lookup bench: ``python -m bench.semantic [--entries N] [--requests N]``.

A lookup is what the gateway does on a semantic-cache read: embed the last user message (micro-batched, in
the embedder's thread) and search the (team, model) FAISS index in that same thread. The index is filled
with ``--entries`` random normalised vectors plus the embeddings of a few hundred real prompts, so that
lookups find real neighbours. A 1 ms ticker task measures the event loop's own lag during each run.
Prints one markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import time
from collections.abc import Awaitable, Callable

import numpy as np

from gateway.cache.embedder import Embedder
from gateway.cache.index import SemanticIndex

PARTITION = "team-bench"
MODEL = "gpt-bench"

SUBJECTS = [
    "a list in Python",
    "a string in JavaScript",
    "a binary tree",
    "the French revolution",
    "photosynthesis",
    "a mortgage",
    "the TCP handshake",
    "a sourdough starter",
    "black holes",
    "the Roman empire",
    "a Kubernetes pod",
    "compound interest",
    "the immune system",
    "a SQL join",
    "climate change",
]
TEMPLATES = [
    "Explain {s} to a ten year old.",
    "What is {s}?",
    "Give me three facts about {s}.",
    "How does {s} work?",
    "Write a short summary of {s}.",
    "What are common mistakes with {s}?",
    "Compare {s} with something similar.",
    "Why does {s} matter?",
]


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


async def main_async(entries: int, requests: int, torch_threads: int | None) -> None:
    batches: list[int] = []
    t0 = time.perf_counter()
    embedder = Embedder(on_batch=lambda n, _s: batches.append(n), num_threads=torch_threads)
    await embedder.start()
    load_s = time.perf_counter() - t0
    rss_model_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    import faiss

    faiss.omp_set_num_threads(1)  # leave the other core to the event loop

    index = SemanticIndex()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    filler = rng.standard_normal((entries, index.dim)).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    index.add_batch(PARTITION, MODEL, filler, [f"filler-{i}" for i in range(entries)])
    del filler
    seeded = prompts(500, seed=1)
    vecs = await embedder.embed(seeded)
    index.add_batch(PARTITION, MODEL, vecs, [f"real-{i}" for i in range(len(seeded))])
    fill_s = time.perf_counter() - t0
    rss_index_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def search_rows(m: np.ndarray) -> list[list[tuple[str, float]]]:
        return [hits for hits, _metas in index.search_batch(PARTITION, MODEL, m, 1)]

    async def lookup(text: str) -> object:
        # what the cache does: embedding and search in the worker, both batched with concurrent lookups
        return await embedder.embed_then(text, (PARTITION, MODEL, 1), search_rows)

    async def lookup_unbatched_search(text: str) -> object:
        vec = await embedder.embed([text])
        return await embedder.run_in_worker(index.search, PARTITION, MODEL, vec, 1)

    await run_lookups(lookup, prompts(64, seed=2), 8)  # warm-up

    # the event loop's lag with nothing running: the floor of the lag columns below
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
        with LagMeter() as lag:
            latencies, wall = await run_lookups(fn, texts, concurrency)
            await lag.stop()
        calls = embedder.model_calls - calls0
        rows.append(
            (
                label,
                f"{pct(latencies, 50) * 1000:.1f}",
                f"{pct(latencies, 99) * 1000:.1f}",
                f"{len(texts) / wall:.0f}",
                f"{statistics.mean(batches):.1f}" if batches else "-",
                f"{calls}",
                f"{max(lag.lags) * 1000:.2f} / {pct(lag.lags, 99) * 1000:.2f}",
            )
        )

    # search alone (no embedding), one query at a time, in the worker thread
    q = await embedder.embed(prompts(200, seed=99))
    with LagMeter() as lag:
        t_search: list[float] = []
        for row in q:
            t0 = time.perf_counter()
            await embedder.run_in_worker(index.search, PARTITION, MODEL, row, 1)
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
            f"{max(lag.lags) * 1000:.2f} / {pct(lag.lags, 99) * 1000:.2f}",
        )
    )

    # embedder throughput: one big request (chunks of max_batch), and many concurrent single texts
    for label, n, conc in (
        ("embed, one request of 1024 texts", 1024, 0),
        ("embed, 1024 singles x 64 conc", 1024, 64),
    ):
        texts = prompts(n, seed=123)
        batches.clear()
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
                f"{max(lag.lags) * 1000:.2f} / {pct(lag.lags, 99) * 1000:.2f}",
            )
        )

    print(
        f"\nSemantic cache bench: {index.size()} entries in one (team, model) index "
        f"(IndexIDMap2/IndexFlatIP, dim {index.dim}); all-MiniLM-L6-v2 on CPU, torch threads "
        f"{embedder.num_threads}, faiss threads 1, {os.cpu_count()} cores; micro-batch window "
        f"{embedder.window_s * 1000:.0f} ms, max batch {embedder.max_batch}.\nModel load {load_s:.1f} s "
        f"(incl. imports), RSS with model {rss_model_mb:.0f} MB, with index {rss_index_mb:.0f} MB "
        f"(fill {fill_s:.1f} s).\n"
    )
    print("| run | p50 ms | p99 ms | throughput /s | mean batch | model calls | loop lag max / p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    await embedder.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--torch-threads", type=int, default=None, help="default: cores - 1")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main_async(args.entries, args.requests, args.torch_threads))


if __name__ == "__main__":
    main()
