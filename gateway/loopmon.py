"""Event-loop lag monitor: how late the gateway's event loop runs a timer.

Every `interval_s` a task sleeps and measures how much later than asked it woke up. The lag is what
any request waiting on the loop (a socket read, a streamed chunk) is delayed by at that moment, so it
is the direct measure of "the event loop never blocks": a synchronous tokenizer, a FAISS search or a
JSON dump of a large body on the loop all show up here. Exported as the histogram
`tollway_event_loop_lag_seconds` and the gauge `tollway_event_loop_lag_max_seconds` (the largest lag
of the last complete `window_s` window), and in `/health`.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge, Histogram

_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class LoopLagMonitor:
    def __init__(self, registry: CollectorRegistry, interval_s: float = 0.02, window_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.histogram = Histogram(
            "tollway_event_loop_lag_seconds",
            "How late the event loop ran a timer (sampled every server.loop_lag_interval_s)",
            buckets=_BUCKETS,
            registry=registry,
        )
        self.max_gauge = Gauge(
            "tollway_event_loop_lag_max_seconds",
            "Largest event-loop lag seen in the last complete window (10 s)",
            registry=registry,
        )
        self.last_window_max = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        interval = self.interval_s
        clock = time.perf_counter
        observe = self.histogram.observe
        window_end = clock() + self.window_s
        current = 0.0
        while True:
            t0 = clock()
            await asyncio.sleep(interval)
            now = clock()
            lag = max(now - t0 - interval, 0.0)
            observe(lag)
            if lag > current:
                current = lag
            if now >= window_end:
                self.last_window_max = current
                self.max_gauge.set(current)
                current = 0.0
                window_end = now + self.window_s
