"""Exact-cache throughput, standalone: requests/s of cache hits vs misses through the loopback fake upstream.

    python -m bench.exact_cache [--requests 2000] [--concurrency 16]

The main bench covers this better: ``python -m bench --variants cache`` (variants ``cache`` and
``cache-fake``: the fake upstream in its own process, the load from the bench's raw-socket load
generator, every response's ``x-tollway-cache`` checked, hits warmed first, billing checked).
This older script is kept for a quick look without the rest of the bench: the gateway
(embedded store) runs as its own process (`tollway serve`); the loopback fake upstream and the
load (an aiohttp client) share this one, so absolute numbers are lower than `python -m bench`;
the ratio is the point (issue 5 asks hits >= 3x misses).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import aiohttp
import orjson

from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import gateway_config, install_test_env
from gateway.testing.processes import GatewayProcess


async def _load(url: str, key: str, n: int, conc: int, unique: str | None) -> tuple[float, dict[str, int]]:
    seen: dict[str, int] = {}
    counter = iter(range(n))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    async def worker(http: aiohttp.ClientSession) -> None:
        for i in counter:
            text = f"{unique} question {i}" if unique else "the same question"
            body = orjson.dumps(
                {
                    "model": "gpt-test",
                    "temperature": 0,
                    "max_tokens": 16,
                    "messages": [{"role": "user", "content": text}],
                }
            )
            async with http.post(url + "/v1/chat/completions", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
                h = r.headers.get("x-tollway-cache", "")
                seen[h] = seen.get(h, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(conc)))
        return n / (time.perf_counter() - t0), seen


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main(n: int, conc: int) -> None:
    keys = install_test_env()
    async with FakeUpstream() as fake:
        config = gateway_config(
            fake.base_url, logging={"level": "ERROR"}, routing={"breaker": {"min_requests": 1_000_000}}
        )
        gw = GatewayProcess(config, name="bench-cache")
        try:
            gw.start()
            url = gw.url
            pid = gw.pid
            assert pid is not None
            await _load(url, keys.team_a, 200, conc, unique="warm-up")
            c0 = _cpu_s(pid)
            miss_rps, miss_seen = await _load(url, keys.team_a, n, conc, unique="miss")
            c1 = _cpu_s(pid)
            hit_rps, hit_seen = await _load(url, keys.team_a, n, conc, unique=None)
            c2 = _cpu_s(pid)
        finally:
            gw.stop()
            gw.cleanup()
    miss_cpu, hit_cpu = (c1 - c0) / n * 1e6, (c2 - c1) / n * 1e6
    print("| case | requests | concurrency | req/s | gateway CPU µs/req | x-tollway-cache |")
    print("|---|---|---|---|---|---|")
    print(f"| miss (fake upstream) | {n} | {conc} | {miss_rps:,.0f} | {miss_cpu:,.0f} | {miss_seen} |")
    print(f"| hit-exact | {n} | {conc} | {hit_rps:,.0f} | {hit_cpu:,.0f} | {hit_seen} |")
    print(f"\nhits / misses: {hit_rps / miss_rps:.2f}x req/s, {miss_cpu / hit_cpu:.2f}x less gateway CPU")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    a = p.parse_args()
    asyncio.run(main(a.requests, a.concurrency))
