"""Closed-loop HTTP/1.1 load generator on raw asyncio Protocols (run it on uvloop).

Each concurrent worker is one keep-alive connection that sends a pre-built request, waits
for the complete response, then immediately sends the next one, until the run's fixed
request budget is spent. Everything is callback driven (no task or future per request)
to keep this process's own CPU cost per request small.

Responses are parsed properly (status line, headers, ``Content-Length`` or chunked
bodies, or read-until-close). For each request it records the total latency and, for
streams, the time to first chunk: the moment the first decoded body bytes containing
``data:`` arrive. A response counts as an error if the status is not 200, the connection
breaks, it times out, or the body is not what an OpenAI client expects (a JSON object
with ``choices``; for streams at least one ``data:`` event and a final
``data: [DONE]``). From gateway responses it also collects the ``x-tollway-overhead-ms``,
``x-tollway-attempts`` and ``x-tollway-deployment`` headers of the successful ones, and the
``x-tollway-cache`` header of every 200 response; with ``expect_cache`` a 200 response whose
``x-tollway-cache`` is not one of the expected values (e.g. a hit where every body is new)
counts as an error.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import time
from array import array
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

_perf_ns = time.perf_counter_ns
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """Serialise one HTTP/1.1 keep-alive request to bytes (sent as is, many times)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class RunResult:
    """What one load run measured (times in nanoseconds)."""

    requests: int
    concurrency: int
    elapsed_ns: int
    latencies_ns: array[int]
    ttfc_ns: array[int]
    overhead_hdr_ms: list[float]
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    attempts: collections.Counter[int] = field(default_factory=collections.Counter)
    """Successful responses by their ``x-tollway-attempts`` header (absent: not counted)."""
    deployments: collections.Counter[str] = field(default_factory=collections.Counter)
    """Successful responses by their ``x-tollway-deployment`` header (absent: not counted)."""
    cache: collections.Counter[str] = field(default_factory=collections.Counter)
    """200 responses by their ``x-tollway-cache`` header (absent: ``-``), errors of
    ``expect_cache`` included (so a mismatch shows which value came instead)."""

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def ok_count(self) -> int:
        return len(self.latencies_ns)

    @property
    def rps(self) -> float:
        return self.ok_count / (self.elapsed_ns / 1e9) if self.elapsed_ns else 0.0

    @property
    def attempts_mean(self) -> float | None:
        n = sum(self.attempts.values())
        return sum(k * v for k, v in self.attempts.items()) / n if n else None


# Parser states
_HEAD, _BODY_CL, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _BODY_EOF = range(7)


class _Conn(asyncio.Protocol):
    """One keep-alive connection issuing requests back to back for a ``LoadRun``."""

    def __init__(self, run: LoadRun) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.inflight = False
        self.t0 = 0
        self.ttfc = -1
        self.state = _HEAD
        self.buf = bytearray()
        self.body = bytearray()
        self.remaining = 0
        self.status = 0
        self.close_after = False
        self.overhead_hdr: float | None = None
        self.attempts_hdr = -1
        self.deployment_hdr: bytes | None = None
        self.cache_hdr = b"-"
        self.lost: asyncio.Future[None] = run.loop.create_future()

    # -- asyncio callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.inflight:
            if self.state == _BODY_EOF:
                self._complete()  # the body was delimited by the close
            else:
                self.inflight = False
                self.run.on_error(self, "connection lost mid-response")
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.inflight:
            if data.strip():
                self.run.errors["unsolicited bytes between responses"] += 1
                self.abort()
            return
        self.buf += data
        try:
            self._parse()
        except (ValueError, IndexError) as e:
            self.inflight = False
            self.run.on_error(self, f"protocol error: {e}")
            self.abort()

    # -- driving -----------------------------------------------------------------------

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.inflight = True
        self.state = _HEAD
        self.ttfc = -1
        self.status = 0
        self.close_after = False
        self.overhead_hdr = None
        self.attempts_hdr = -1
        self.deployment_hdr = None
        self.cache_hdr = b"-"
        self.body.clear()
        self.t0 = _perf_ns()
        self.transport.write(request)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- parsing -----------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self.buf
        for _ in range(100_000):  # bounded; each pass consumes input or returns
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise ValueError("response head too large")
                    return
                self._parse_head(bytes(buf[:end]))
                del buf[: end + 4]
                if self.state == _HEAD:  # 1xx interim response: read the next head
                    continue
                if self.state == _BODY_CL and self.remaining == 0:
                    self._complete()
                    return
            elif state == _BODY_CL:
                take = min(len(buf), self.remaining)
                if take == 0:
                    return
                self._body(buf[:take])
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self._complete()
                    return
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > 1024:
                        raise ValueError("chunk size line too long")
                    return
                size = int(bytes(buf[:eol]).split(b";", 1)[0].strip(), 16)
                del buf[: eol + 2]
                if size == 0:
                    self.state = _TRAILERS
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                take = min(len(buf), self.remaining)
                if take == 0:
                    return
                self._body(buf[:take])
                del buf[:take]
                self.remaining -= take
                if self.remaining == 0:
                    self.state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise ValueError("missing CRLF after chunk")
                del buf[:2]
                self.state = _CHUNK_SIZE
            elif state == _TRAILERS:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                del buf[: eol + 2]
                if eol == 0:  # empty line: end of the chunked message
                    self._complete()
                    return
            else:  # _BODY_EOF: everything until the connection closes
                if not buf:
                    return
                self._body(buf)
                buf.clear()
                return
        raise ValueError("parser made no progress")

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1."):
            raise ValueError(f"bad status line {status_line[:40]!r}")
        self.status = int(status_line[9:12])
        if 100 <= self.status < 200:
            self.state = _HEAD
            return
        length = -1
        chunked = False
        self.close_after = status_line.startswith(b"HTTP/1.0")
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                self.close_after = value.strip().lower() == b"close"
            elif name.startswith(b"x-tollway-"):
                self._tollway_header(name, value)
        if chunked:
            self.state = _CHUNK_SIZE
        elif length >= 0:
            if length > MAX_BODY_BYTES:
                raise ValueError("response body too large")
            self.state = _BODY_CL
            self.remaining = length
        else:
            self.state = _BODY_EOF
            self.close_after = True

    def _tollway_header(self, name: bytes, value: bytes) -> None:
        try:
            if name == b"x-tollway-overhead-ms":
                self.overhead_hdr = float(value)
            elif name == b"x-tollway-attempts":
                self.attempts_hdr = int(value)
            elif name == b"x-tollway-deployment":
                self.deployment_hdr = value.strip()
            elif name == b"x-tollway-cache":
                self.cache_hdr = value.strip()
        except ValueError:
            pass

    def _body(self, data: bytearray) -> None:
        self.body += data
        if self.ttfc < 0 and self.run.stream and b"data:" in self.body:
            self.ttfc = _perf_ns() - self.t0
        if len(self.body) > MAX_BODY_BYTES:
            raise ValueError("response body too large")

    def _complete(self) -> None:
        self.inflight = False
        latency = _perf_ns() - self.t0
        if self.buf:
            self.run.on_error(self, "extra bytes after response")
            self.abort()
            return
        self.run.on_response(self, latency)
        if self.close_after:
            self.abort()


class LoadRun:
    """A closed-loop run: ``total`` requests over ``concurrency`` keep-alive connections."""

    def __init__(
        self,
        host: str,
        port: int,
        request: bytes | Sequence[bytes],
        *,
        total: int,
        concurrency: int,
        stream: bool,
        timeout_s: float = 30.0,
        expect_cache: Collection[str] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.host = host
        self.port = port
        self.requests: Sequence[bytes] = (request,) if isinstance(request, bytes) else request
        """Sent in turn (request i is ``requests[i % len(requests)]``): one, or e.g. distinct
        bodies so that no two requests are the same (cache misses)."""
        self.total = total
        self.concurrency = max(1, min(concurrency, total))
        self.stream = stream
        self.timeout_ns = int(timeout_s * 1e9)
        self.issued = 0
        self.finished = 0
        self.latencies: array[int] = array("q")
        self.ttfcs: array[int] = array("q")
        self.overhead_hdr: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.attempts: collections.Counter[int] = collections.Counter()
        self.deployments: collections.Counter[bytes] = collections.Counter()
        self.cache: collections.Counter[bytes] = collections.Counter()
        self.expect_cache = (
            frozenset(v.encode("latin-1") for v in expect_cache) if expect_cache is not None else None
        )
        """``x-tollway-cache`` values a 200 response must carry (None: not checked)."""
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.conns: set[_Conn] = set()
        self.reconnects = 0

    # -- callbacks from connections ------------------------------------------------------

    def on_response(self, conn: _Conn, latency_ns: int) -> None:
        reason = self._check(conn)
        if reason is not None:
            self._finish_one()
            self.errors[reason] += 1
            if conn.close_after or conn.transport is None:
                return
            self._next(conn)
            return
        self.latencies.append(latency_ns)
        if self.stream:
            self.ttfcs.append(conn.ttfc)
        if conn.overhead_hdr is not None:
            self.overhead_hdr.append(conn.overhead_hdr)
        if conn.attempts_hdr >= 0:
            self.attempts[conn.attempts_hdr] += 1
        if conn.deployment_hdr is not None:
            self.deployments[conn.deployment_hdr] += 1
        self._finish_one()
        if not conn.close_after:
            self._next(conn)

    def on_error(self, conn: _Conn | None, reason: str) -> None:
        """An issued request ended without a usable response."""
        self.errors[reason] += 1
        self._finish_one()

    def _check(self, conn: _Conn) -> str | None:
        if conn.status != 200:
            return f"HTTP {conn.status}"
        self.cache[conn.cache_hdr] += 1
        if self.expect_cache is not None and conn.cache_hdr not in self.expect_cache:
            return f"x-tollway-cache {conn.cache_hdr.decode('latin-1')}"
        body = bytes(conn.body)
        if self.stream:
            if conn.ttfc < 0:
                return "stream without data: events"
            if not body.rstrip().endswith(b"data: [DONE]"):
                return "stream not ended by data: [DONE]"
            return None
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return "body is not JSON"
        if not isinstance(obj, dict) or not obj.get("choices"):
            return "JSON body without choices"
        return None

    def _finish_one(self) -> None:
        self.finished += 1
        if self.finished >= self.total and not self.done.done():
            self.done.set_result(None)

    def _next(self, conn: _Conn) -> None:
        if self.issued >= self.total or conn.transport is None:
            return
        reqs = self.requests
        conn.send(reqs[self.issued % len(reqs)])
        self.issued += 1

    # -- running -------------------------------------------------------------------------

    def _new_conn(self) -> _Conn:
        return _Conn(self)

    async def _worker(self) -> None:
        """Keep one connection busy; reconnect if it closes; give up after 3 failed connects."""
        failed_connects = 0
        while self.issued < self.total and not self.done.done() and failed_connects < 3:
            try:
                _, conn = await self.loop.create_connection(self._new_conn, self.host, self.port)
            except OSError as e:
                failed_connects += 1
                if self.issued < self.total:
                    self.issued += 1
                    self.on_error(None, f"connect failed: {e.strerror or e}")
                await asyncio.sleep(0.05 * failed_connects)
                continue
            failed_connects = 0
            self.conns.add(conn)
            self._next(conn)
            await asyncio.wait({conn.lost, self.done}, return_when=asyncio.FIRST_COMPLETED)
            self.conns.discard(conn)
            if self.done.done():
                break
            self.reconnects += 1

    async def _watchdog(self) -> None:
        """Abort requests that exceed the timeout (counted as errors)."""
        while not self.done.done():
            await asyncio.sleep(0.25)
            now = _perf_ns()
            for conn in list(self.conns):
                if conn.inflight and now - conn.t0 > self.timeout_ns:
                    conn.inflight = False
                    self.on_error(conn, "timeout")
                    conn.abort()

    async def run(self) -> RunResult:
        t0 = _perf_ns()
        workers = [asyncio.ensure_future(self._worker()) for _ in range(self.concurrency)]
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            waiters: set[asyncio.Future[Any]] = {
                self.done,
                asyncio.gather(*workers, return_exceptions=True),
            }
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not self.done.done():  # every worker gave up: the target is unreachable
                self.errors["not sent: target unreachable"] += self.total - self.finished
                self.finished = self.total
                self.done.set_result(None)
        finally:
            elapsed = _perf_ns() - t0
            watchdog.cancel()
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.close()
            await asyncio.gather(*workers, watchdog, return_exceptions=True)
        return RunResult(
            requests=self.total,
            concurrency=self.concurrency,
            elapsed_ns=elapsed,
            latencies_ns=self.latencies,
            ttfc_ns=self.ttfcs,
            overhead_hdr_ms=self.overhead_hdr,
            errors=self.errors,
            attempts=self.attempts,
            deployments=collections.Counter({k.decode("latin-1"): v for k, v in self.deployments.items()}),
            cache=collections.Counter({k.decode("latin-1"): v for k, v in self.cache.items()}),
        )


async def run_load(
    host: str,
    port: int,
    request: bytes | Sequence[bytes],
    *,
    total: int,
    concurrency: int,
    stream: bool,
    timeout_s: float = 30.0,
    expect_cache: Collection[str] | None = None,
) -> RunResult:
    """Run ``total`` requests at ``concurrency`` and return the measurements. ``request``: one
    request (sent every time) or several, sent in turn. ``expect_cache``: the
    ``x-tollway-cache`` values a 200 response must carry, else it counts as an error."""
    return await LoadRun(
        host,
        port,
        request,
        total=total,
        concurrency=concurrency,
        stream=stream,
        timeout_s=timeout_s,
        expect_cache=expect_cache,
    ).run()
