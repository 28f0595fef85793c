"""A deliberately fast fake OpenAI upstream for the benchmark.

Raw asyncio Protocols on uvloop, hand-rolled HTTP/1.1 (keep-alive, Content-Length and
chunked request bodies, sequential pipelining), and every response pre-built as bytes, so
this process costs a few microseconds per request and is never the bottleneck.

Routes:

* ``POST .../chat/completions``: a canned ``chat.completion`` (usage 9 + 12 = 21 tokens).
  If the body says ``"stream": true`` the reply is ``text/event-stream`` over chunked
  transfer encoding: 20 ``chat.completion.chunk`` events 5 ms apart (the first one with
  the headers), an extra usage chunk (``"choices": []``) when the body asks for
  ``include_usage``, then ``data: [DONE]`` and the zero-length terminator.
* ``GET .../models``: a one-model list.
* ``GET /_bench/stats``: what this process served so far, as JSON: ``{"ok": n, "failed": n,
  "streams": n}`` (chat completions answered 200, of those streamed, and answered 503).
* anything else: 404 with an OpenAI-style error body.

Failure injection: ``--fail-rate F`` answers that fraction of chat completions (streaming or
not) with ``503 Service Unavailable`` and an OpenAI-style ``server_error`` JSON body, before
any byte of a stream. Which requests fail: with ``--fail-seed N``, a seeded pseudo-random
draw per request (``random.Random(N)``: the same sequence on every run); without it, an
evenly spread deterministic pattern (request n fails when ``floor((n + 1) * F)`` exceeds
``floor(n * F)``: for 0.5, every second request). Requests are numbered in arrival order.

Run: ``python -m bench.fast_upstream [--host 127.0.0.1] [--port 0] [--fail-rate F]
[--fail-seed N]``. The first line on stdout is the bound port number; nothing else is ever
written to stdout (the final counts go to stderr). The server exits on SIGTERM/SIGINT, or by
itself when its parent process goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import re
import signal
import socket
import sys
import time
from typing import cast

import orjson
import uvloop

STREAM_EVENTS = 20
STREAM_INTERVAL_S = 0.005
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE_TRUE = re.compile(rb'"include_usage"\s*:\s*true')

_CREATED = int(time.time())
_ID = "chatcmpl-bench0000000000000000000000"
_MODEL = "upstream-model"
_FINGERPRINT = "fp_bench0001"
_USAGE = {
    "prompt_tokens": 9,
    "completion_tokens": 12,
    "total_tokens": 21,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
_TOKENS = [
    "Hello", ",", " benchmark", "!", " It", " is", " nice", " to", " meet", " you",
    " here", " on", " the", " loop", "back", " interface", ".", " Bye",
]  # fmt: skip


def _response(status: str, content_type: bytes, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )


def _completion_body() -> bytes:
    return orjson.dumps(
        {
            "id": _ID,
            "object": "chat.completion",
            "created": _CREATED,
            "model": _MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello, benchmark! It is nice to meet you here.",
                        "refusal": None,
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
            "service_tier": "default",
            "system_fingerprint": _FINGERPRINT,
        }
    )


def _chunk(delta: dict[str, object], finish: str | None) -> dict[str, object]:
    return {
        "id": _ID,
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": _MODEL,
        "service_tier": "default",
        "system_fingerprint": _FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _frame(payload: bytes) -> bytes:
    """One HTTP chunk (chunked transfer encoding) carrying ``payload``."""
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _stream_frames() -> list[bytes]:
    """The 20 event frames: role, 18 content tokens, finish."""
    first = _chunk({"role": "assistant", "content": "", "refusal": None}, None)
    events = [first]
    events += [_chunk({"content": tok}, None) for tok in _TOKENS[: STREAM_EVENTS - 2]]
    events.append(_chunk({}, "stop"))
    assert len(events) == STREAM_EVENTS
    return [_frame(_sse(e)) for e in events]


_USAGE_CHUNK = {
    "id": _ID,
    "object": "chat.completion.chunk",
    "created": _CREATED,
    "model": _MODEL,
    "service_tier": "default",
    "system_fingerprint": _FINGERPRINT,
    "choices": [],
    "usage": _USAGE,
}

RESP_COMPLETION = _response("200 OK", b"application/json", _completion_body())
RESP_MODELS = _response(
    "200 OK",
    b"application/json",
    orjson.dumps(
        {
            "object": "list",
            "data": [{"id": _MODEL, "object": "model", "created": _CREATED, "owned_by": "bench"}],
        }
    ),
)
RESP_NOT_FOUND = _response(
    "404 Not Found",
    b"application/json",
    b'{"error":{"message":"not found","type":"invalid_request_error","code":null}}',
)
RESP_BAD_REQUEST = _response(
    "400 Bad Request",
    b"application/json",
    b'{"error":{"message":"bad request","type":"invalid_request_error","code":null}}',
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)
STREAM_FRAMES = _stream_frames()
STREAM_TAIL = _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"
STREAM_TAIL_USAGE = _frame(_sse(_USAGE_CHUNK)) + STREAM_TAIL
RESP_UNAVAILABLE = _response(
    "503 Service Unavailable",
    b"application/json",
    b'{"error":{"message":"The server is overloaded or not ready yet (bench fail-rate).",'
    b'"type":"server_error","param":null,"code":"service_unavailable"}}',
)
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class Served:
    """What this process answered to chat completions, and which of them it should fail."""

    __slots__ = ("_n", "_rng", "fail_rate", "failed", "ok", "streams")

    def __init__(self, fail_rate: float = 0.0, seed: int | None = None) -> None:
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError("fail_rate must be in [0, 1]")
        self.fail_rate = fail_rate
        self._rng = random.Random(seed) if seed is not None else None
        self._n = 0
        self.ok = 0
        self.streams = 0
        self.failed = 0

    def should_fail(self) -> bool:
        """Decide for the next chat completion (and count it as failed if so)."""
        rate = self.fail_rate
        if rate <= 0.0:
            return False
        n = self._n
        self._n = n + 1
        if self._rng is not None:
            fail = self._rng.random() < rate
        else:
            fail = math.floor((n + 1) * rate) > math.floor(n * rate)
        if fail:
            self.failed += 1
        return fail

    def stats_response(self) -> bytes:
        body = orjson.dumps({"ok": self.ok, "failed": self.failed, "streams": self.streams})
        return _response("200 OK", b"application/json", body)


class _Incomplete(Exception):
    """More bytes are needed to finish parsing."""


def _parse_chunked(buf: bytearray) -> tuple[bytes, int]:
    """Parse a complete chunked body at the start of ``buf``: (body, bytes consumed)."""
    pos = 0
    out = bytearray()
    for _ in range(1_000_000):  # bounded; a body has far fewer chunks
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            raise _Incomplete
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip() or b"0", 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n\r\n", pos - 2)  # trailers (usually none) end with CRLF CRLF
            if end < 0:
                raise _Incomplete
            return bytes(out), end + 4
        if len(buf) < pos + size + 2:
            raise _Incomplete
        out += buf[pos : pos + size]
        pos += size + 2
        if len(out) > MAX_BODY_BYTES:
            raise ValueError("body too large")
    raise ValueError("too many chunks")


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests one after another, answer from canned bytes."""

    __slots__ = (
        "_body_len",
        "_buf",
        "_busy",
        "_chunked",
        "_close_after",
        "_closed",
        "_head",
        "_loop",
        "_served",
        "_stream_i",
        "_stream_start",
        "_stream_tail",
        "_timer",
        "_transport",
    )

    def __init__(self, served: Served | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._served = served if served is not None else Served()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: tuple[bytes, bytes] | None = None  # (method, path) of the pending request
        self._body_len = 0
        self._chunked = False
        self._close_after = False
        self._busy = False  # a streaming response is being written
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._stream_i = 0
        self._stream_start = 0.0
        self._stream_tail = STREAM_TAIL

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()

    def _fail(self, response: bytes) -> None:
        if self._transport is not None:
            self._transport.write(response)
            self._transport.close()
        self._buf.clear()

    def _process(self) -> None:
        """Handle every complete request in the buffer, one at a time."""
        buf = self._buf
        while buf and not self._busy and not self._closed:
            if self._head is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._fail(RESP_BAD_REQUEST)
                    return
                if not self._parse_head(bytes(buf[:end])):
                    self._fail(RESP_BAD_REQUEST)
                    return
                del buf[: end + 4]
            if self._chunked:
                try:
                    body, used = _parse_chunked(buf)
                except _Incomplete:
                    return
                except ValueError:
                    self._fail(RESP_BAD_REQUEST)
                    return
            else:
                if len(buf) < self._body_len:
                    return
                used = self._body_len
                body = bytes(buf[:used])
            del buf[:used]
            head = self._head
            assert head is not None
            self._head = None
            self._handle(head[0], head[1], body)

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            return False
        method, target, version = parts
        self._body_len = 0
        self._chunked = False
        self._close_after = version == b"HTTP/1.0"
        expect_continue = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                return False
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    self._body_len = int(value.strip())
                except ValueError:
                    return False
                if not 0 <= self._body_len <= MAX_BODY_BYTES:
                    return False
            elif name == b"transfer-encoding":
                self._chunked = b"chunked" in value.lower()
            elif name == b"connection":
                v = value.strip().lower()
                if v == b"close":
                    self._close_after = True
                elif v == b"keep-alive":
                    self._close_after = False
            elif name == b"expect":
                expect_continue = value.strip().lower() == b"100-continue"
        if expect_continue and self._transport is not None:
            self._transport.write(CONTINUE_100)
        self._head = (method, target.split(b"?", 1)[0])
        return True

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if method == b"POST" and path.endswith(b"/chat/completions"):
            served = self._served
            if served.should_fail():
                transport.write(RESP_UNAVAILABLE)
            elif _STREAM_TRUE.search(body):
                served.ok += 1
                served.streams += 1
                self._start_stream(bool(_INCLUDE_USAGE_TRUE.search(body)))
                return
            else:
                served.ok += 1
                transport.write(RESP_COMPLETION)
        elif method == b"GET" and path.endswith(b"/models"):
            transport.write(RESP_MODELS)
        elif method == b"GET" and path == b"/_bench/stats":
            transport.write(self._served.stats_response())
        else:
            transport.write(RESP_NOT_FOUND)
        if self._close_after:
            transport.close()

    def _start_stream(self, include_usage: bool) -> None:
        assert self._transport is not None
        self._busy = True
        self._stream_tail = STREAM_TAIL_USAGE if include_usage else STREAM_TAIL
        self._stream_i = 1
        self._stream_start = self._loop.time()
        self._transport.write(STREAM_HEAD + STREAM_FRAMES[0])
        self._timer = self._loop.call_at(self._stream_start + STREAM_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        """Write the next event; events are scheduled on a fixed grid so delays do not drift."""
        self._timer = None
        transport = self._transport
        if transport is None or self._closed:
            return
        i = self._stream_i
        if i < STREAM_EVENTS - 1:
            transport.write(STREAM_FRAMES[i])
            self._stream_i = i + 1
            when = self._stream_start + (i + 1) * STREAM_INTERVAL_S
            self._timer = self._loop.call_at(when, self._tick)
            return
        transport.write(STREAM_FRAMES[i] + self._stream_tail)
        self._busy = False
        if self._close_after:
            transport.close()
            return
        if self._buf:
            self._process()


def _watch_parent(loop: asyncio.AbstractEventLoop, parent: int, stop: asyncio.Event) -> None:
    if os.getppid() != parent:
        stop.set()
        return
    loop.call_later(1.0, _watch_parent, loop, parent, stop)


async def serve(host: str, port: int, served: Served | None = None) -> None:
    loop = asyncio.get_running_loop()
    counts = served if served is not None else Served()
    server = await loop.create_server(lambda: UpstreamProtocol(counts), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"{bound}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _watch_parent(loop, os.getppid(), stop)
    try:
        await stop.wait()
    finally:
        server.close()
        print(
            f"fast_upstream: served {counts.ok} ok ({counts.streams} streamed), {counts.failed} "
            f"failed with 503 (fail rate {counts.fail_rate:g})",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        help="fraction of chat completions answered with an OpenAI-style 503 (default 0)",
    )
    parser.add_argument(
        "--fail-seed",
        type=int,
        default=None,
        help="pick the failing requests with random.Random(SEED) (default: an evenly spread pattern)",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.fail_rate <= 1.0:
        parser.error("--fail-rate must be in [0, 1]")
    uvloop.run(serve(args.host, args.port, Served(args.fail_rate, args.fail_seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
