"""LoopbackFake: the shared body of the fake upstreams (a scripted aiohttp app on 127.0.0.1)."""

from __future__ import annotations

import itertools
from collections import deque
from types import TracebackType
from typing import Generic, Self, TypeVar

from aiohttp import web

B = TypeVar("B")
R = TypeVar("R")


class LoopbackFake(Generic[B, R]):
    """Runs `self.app` on a free loopback port; behaviours `B` are queued per request (else
    `default`), requests `R` are recorded in order. Subclasses add routes and handlers."""

    def __init__(self, default: B, *, shutdown_timeout_s: float = 0.5) -> None:
        self.default: B = default
        """Used when the queue is empty."""
        self.requests: list[R] = []
        self._default = default
        self._queue: deque[B] = deque()
        self._ids = itertools.count(1)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self.app = web.Application(client_max_size=64 * 1024 * 1024)

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(
            self.app, handler_cancellation=True, shutdown_timeout=self._shutdown_timeout_s, access_log=None
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def enqueue(self, *behaviours: B, times: int = 1) -> None:
        """Use these behaviours, in order, for the next requests (each `times` times)."""
        for b in behaviours:
            self._queue.extend([b] * times)

    def reset(self) -> None:
        """Forget queued behaviours and recorded requests; restore the default behaviour."""
        self._queue.clear()
        self.requests.clear()
        self.default = self._default

    @property
    def last(self) -> R:
        if not self.requests:
            raise AssertionError(f"{type(self).__name__} has received no request")
        return self.requests[-1]

    def next_behaviour(self) -> B:
        return self._queue.popleft() if self._queue else self.default
