"""Relaying an OpenAI SSE stream to the client: bytes through, failures visible, disconnects fast."""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from aiohttp import web

from gateway.errors import BadGateway, GatewayError
from gateway.pipeline import Pipeline, RequestContext
from gateway.pipeline.context import STREAM_END
from gateway.providers.base import UpstreamStream
from gateway.wire.sse import KEEPALIVE, StreamRelay, error_event

log = logging.getLogger("tollway.stream")

_CLIENT_GONE = (ConnectionResetError, ConnectionError)

CAPTURE = "response.capture"
"""A plugin that puts a list under `ctx.state[CAPTURE]` gets the upstream's response bytes
appended to it (a stream's raw SSE bytes, usage chunk included; a non-streamed body), e.g. the
exact cache, which stores complete answers. Raw pass-through stays on."""


class _Downstream:
    """The client side of one stream: commits headers lazily and sends keep-alives when idle."""

    __slots__ = (
        "_handle",
        "_idle_s",
        "_last",
        "_loop",
        "_prep",
        "_task",
        "ctx",
        "request",
        "resp",
        "t_first_upstream",
        "t_upstream",
    )

    def __init__(
        self,
        request: web.Request,
        ctx: RequestContext,
        t_upstream: float | None,
        idle_s: float,
    ) -> None:
        self.request = request
        self.ctx = ctx
        self.t_upstream = t_upstream
        self.t_first_upstream: float | None = None
        self.resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "x-request-id": ctx.request_id,
                **(ctx.response_headers or {}),
            },
        )
        self._prep: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._idle_s = idle_s
        self._last = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._handle = self._loop.call_later(idle_s, self._tick)

    @property
    def started(self) -> bool:
        return self._prep is not None

    async def _prepare(self) -> None:
        if self._prep is not None:
            await self._prep
            return
        self._prep = self._loop.create_future()
        ctx = self.ctx
        now = time.perf_counter()
        # Gateway time before the upstream call plus time since its first byte arrived.
        if self.t_upstream is None:
            overhead = now - ctx.t_start
        else:
            first = self.t_first_upstream if self.t_first_upstream is not None else now
            overhead = (self.t_upstream - ctx.t_start) + (now - first)
        ctx.overhead_s = overhead
        self.resp.headers["x-tollway-overhead-ms"] = f"{overhead * 1000:.3f}"
        try:
            await self.resp.prepare(self.request)
        finally:
            self._prep.set_result(None)
        ctx.ttfb_s = time.perf_counter() - ctx.t_start

    async def write(self, data: bytes) -> None:
        if self._prep is None or not self._prep.done():
            await self._prepare()
        self._last = time.monotonic()
        await self.resp.write(data)

    def _tick(self) -> None:
        idle = time.monotonic() - self._last
        if idle >= self._idle_s and (self._task is None or self._task.done()):
            self._task = self._loop.create_task(self._keepalive())
            idle = 0.0
        self._handle = self._loop.call_later(self._idle_s - idle, self._tick)

    async def _keepalive(self) -> None:
        try:
            await self.write(KEEPALIVE)
        except (*_CLIENT_GONE, RuntimeError):
            pass  # the handler notices the disconnect itself (it is cancelled)

    def stop(self) -> None:
        self._handle.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()


async def relay_stream(
    request: web.Request,
    ctx: RequestContext,
    upstream: UpstreamStream,
    pipeline: Pipeline,
    *,
    t_upstream: float | None,
    keepalive_s: float,
) -> web.StreamResponse:
    """Send `upstream` to the client and end it truthfully.

    Before the first byte goes out, an upstream failure is raised as a normal HTTP error. After
    it, a failure becomes an in-band `data: {"error": …}` event and the stream ends without
    `[DONE]`, so no SDK mistakes a broken answer for a complete one.
    """
    relay = StreamRelay(
        strip_usage=not ctx.client_wants_usage,
        rewrite=partial(pipeline.run_chunk, ctx) if pipeline.rewrites_chunks else None,
    )
    down = _Downstream(request, ctx, t_upstream, keepalive_s)
    failure: GatewayError | None = None
    capture: list[bytes] | None = ctx.state.get(CAPTURE)
    ended = False
    try:
        try:
            async for data in upstream:
                if down.t_first_upstream is None:
                    down.t_first_upstream = time.perf_counter()
                if capture is not None:
                    capture.append(data)
                out = relay.feed(data)
                if out:
                    await down.write(out)
                if relay.done:
                    break
            else:
                ended = True  # the upstream body ended (with or without [DONE])
        except GatewayError as e:
            if not down.started:
                raise
            failure = e
        except _CLIENT_GONE:
            ctx.status = 499
            return down.resp
        finally:
            if t_upstream is not None:
                ctx.upstream_s = time.perf_counter() - t_upstream
            down.stop()
            ctx.usage = relay.usage
            ctx.state["stream.events"] = relay.events
            # How the upstream's stream ended, for the router's verdict on the deployment.
            if relay.done:
                ctx.state[STREAM_END] = "done"
            elif relay.saw_error:
                ctx.state[STREAM_END] = "error"
            elif ended:
                ctx.state[STREAM_END] = "cut"
            await upstream.aclose()
        if failure is None and not relay.done:
            failure = (
                BadGateway(
                    "The upstream reported an error mid-stream.",
                    code="upstream_stream_error",
                )
                if relay.saw_error
                else BadGateway(
                    f"The upstream ({ctx.provider or 'provider'}) ended the stream before it was "
                    "complete (no [DONE]).",
                    code="upstream_stream_incomplete",
                )
            )
            if not down.started:
                raise failure
        if failure is not None:
            ctx.status = failure.status
            ctx.error = failure
            log.warning("stream %s failed after the first byte: %s", ctx.request_id, failure)
            if not relay.saw_error:
                await down.write(
                    error_event(failure.message, failure.type, failure.code, failure.param)
                )
        else:
            ctx.status = 200
        await down.resp.write_eof()
    except _CLIENT_GONE:
        ctx.status = 499
    return down.resp
