"""The event-loop lag monitor sees a loop that was blocked, and only then."""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp

from gateway.pipeline import Plugin, RequestContext, ShortCircuit
from gateway.testing.fake_upstream import FakeUpstream
from gateway.testing.harness import gateway_config, install_test_env, running_gateway


class BlockingPlugin(Plugin):
    """Blocks the event loop for 80 ms on requests that carry `x-test-block: 1`."""

    name = "blocking"

    async def on_request(self, ctx: RequestContext) -> ShortCircuit | None:
        if ctx.headers.get("x-test-block") == "1":
            time.sleep(0.08)  # noqa: ASYNC251 - blocking the loop is the point
        return None


def lag_counts(metrics: str) -> tuple[float, float]:
    """(samples, samples slower than 50 ms) of tollway_event_loop_lag_seconds."""
    total = float(re.search(r"^tollway_event_loop_lag_seconds_count (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    le = float(
        re.search(r'^tollway_event_loop_lag_seconds_bucket\{le="0\.05"\} (\S+)$', metrics, re.M).group(1)  # type: ignore[union-attr]
    )
    return total, total - le


async def test_loop_lag_metric_sees_a_blocked_loop() -> None:
    keys = install_test_env()
    async with FakeUpstream() as fake:
        config = gateway_config(
            fake.base_url,
            plugins=[{"name": "metrics"}, {"name": "access"}, {"path": "tests.test_loopmon:BlockingPlugin"}],
            server={"loop_lag_interval_s": 0.005},
        )
        async with running_gateway(config) as url, aiohttp.ClientSession() as http:
            body = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
            auth = {"Authorization": f"Bearer {keys.team_a}"}
            await asyncio.sleep(0.2)
            async with http.get(url + "/metrics") as r:
                n0, slow0 = lag_counts(await r.text())
            assert n0 > 5  # it samples
            for _ in range(3):  # not blocking: no slow sample
                async with http.post(url + "/v1/chat/completions", json=body, headers=auth) as r:
                    assert r.status == 200
            await asyncio.sleep(0.05)
            async with http.get(url + "/metrics") as r:
                n1, slow1 = lag_counts(await r.text())
            assert n1 > n0 and slow1 == slow0 == 0
            async with http.post(
                url + "/v1/chat/completions", json=body, headers={**auth, "x-test-block": "1"}
            ) as r:
                assert r.status == 200
            await asyncio.sleep(0.05)
            async with http.get(url + "/metrics") as r:
                _, slow2 = lag_counts(await r.text())
            assert slow2 == 1
            async with http.get(url + "/ready") as r:
                assert "lag_max_ms_last_window" in (await r.json())["event_loop"]
