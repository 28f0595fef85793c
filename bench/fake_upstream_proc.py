"""The project's test fake upstream (``gateway.testing.fake_upstream.FakeUpstream``, aiohttp) in
its own process, for the benchmark's ``cache-fake`` variant.

Run: ``python -m bench.fake_upstream_proc [--port 0]``. The first line on stdout is the bound
port (the fake picks a free loopback port itself; ``--port`` other than 0 is refused); nothing
else is written to stdout. It answers with the fake's default behaviour (a normal 200,
deterministic reply, usage counted from the request) on the plain asyncio event loop, as the
tests run it. Two bench additions:

* The fake records every request it receives (``fake.requests``); here that list keeps only
  the last ``--keep`` (default 1000) so it does not grow without bound over a run.
* ``GET /_bench/stats``: the chat completions answered so far, in the same shape as
  ``bench.fast_upstream``: ``{"ok": n, "failed": n, "streams": n}`` (200s, non-200s, streams).

It exits on SIGTERM/SIGINT, or by itself when its parent process goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from aiohttp import web

from gateway.testing.fake_upstream import Endpoint, FakeUpstream, RecordedRequest


class _Recent(list[RecordedRequest]):
    """A list that drops its oldest half once it holds more than `keep` items."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.keep = keep

    def append(self, item: RecordedRequest) -> None:
        super().append(item)
        if len(self) > self.keep:
            del self[: len(self) - self.keep // 2]


class BenchFake(FakeUpstream):
    """FakeUpstream with a bounded request record and a stats route."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        self.requests = _Recent(keep)
        self.ok = self.failed = self.streams = 0
        self.app.router.add_get("/_bench/stats", self._stats)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": self.ok, "failed": self.failed, "streams": self.streams})

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        resp = await super()._handle(request, endpoint)
        if endpoint in ("chat", "completions"):
            if resp.status == 200:
                self.ok += 1
                self.streams += not isinstance(resp, web.Response)
            else:
                self.failed += 1
        return resp


def _watch_parent(loop: asyncio.AbstractEventLoop, parent: int, stop: asyncio.Event) -> None:
    if os.getppid() != parent:
        stop.set()
        return
    loop.call_later(1.0, _watch_parent, loop, parent, stop)


async def serve(keep: int) -> None:
    loop = asyncio.get_running_loop()
    fake = BenchFake(keep)
    await fake.start()
    sys.stdout.write(f"{fake.port}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _watch_parent(loop, os.getppid(), stop)
    try:
        await stop.wait()
    finally:
        await fake.stop()
        print(
            f"fake_upstream_proc: served {fake.ok} ok ({fake.streams} streamed), {fake.failed} "
            f"failed; {len(fake.requests)} requests still recorded",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="only 0 (a free port) is supported")
    parser.add_argument("--keep", type=int, default=1000, help="recorded requests kept (default 1000)")
    args = parser.parse_args(argv)
    if args.port != 0:
        parser.error("the fake upstream always binds a free loopback port: use --port 0")
    if args.keep < 2:
        parser.error("--keep must be >= 2")
    asyncio.run(serve(args.keep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
