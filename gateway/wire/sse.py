"""SSE framing: a byte-level relay filter for OpenAI streams, and event encoders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from gateway.pipeline.context import Usage

DONE_EVENT = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
_NULL_USAGE = (b'"usage":null', b'"usage": null')


def encode_event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return encode_event({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _event_data(event: bytes) -> bytes | None:
    """The joined `data:` field of one SSE event (without its blank-line terminator)."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:].rstrip(b"\r")
    parts: list[bytes] = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            v = line[5:]
            parts.append(v[1:] if v.startswith(b" ") else v)
    if not parts:
        return None
    return b"\n".join(parts)


def _last_boundary(data: bytes) -> int:
    """Index just past the last complete event in `data` (0 if none)."""
    a = data.rfind(b"\n\n")
    b = data.rfind(b"\r\n\r\n")
    return max(a + 2 if a >= 0 else 0, b + 4 if b >= 0 else 0)


class StreamRelay:
    """Cuts upstream bytes at event boundaries and passes them on, byte for byte.

    It parses only what it must: the `[DONE]` marker, in-band errors, and the usage chunk
    (which it drops when the client did not ask for usage). A partial event at the end of a
    read is held back until it completes, so the client only ever receives whole events and a
    gateway error event can follow cleanly. With `parse_all` every chunk is parsed and handed
    to `rewrite` (chunk-rewriting plugins).
    """

    __slots__ = ("_buf", "done", "events", "rewrite", "saw_error", "strip_usage", "usage")

    def __init__(
        self,
        strip_usage: bool,
        rewrite: Callable[[dict[str, Any]], dict[str, Any] | None] | None = None,
    ) -> None:
        self.strip_usage = strip_usage
        self.rewrite = rewrite
        self._buf = b""
        self.done = False
        self.saw_error = False
        self.usage: Usage | None = None
        self.events = 0

    def feed(self, data: bytes) -> bytes:
        """Take one upstream read; return the bytes to send to the client now."""
        if self.done:
            return b""
        if self._buf:
            data = self._buf + data
        cut = _last_boundary(data)
        if cut == 0:
            self._buf = data
            return b""
        self._buf = data[cut:]
        complete = data[:cut]
        if (
            self.rewrite is None
            and b"[DONE]" not in complete
            and b'"error"' not in complete
            and complete.count(b'"usage"') == sum(complete.count(n) for n in _NULL_USAGE)
        ):
            self.events += complete.count(b"data:")
            return complete
        return self._filter(complete)

    def _filter(self, complete: bytes) -> bytes:
        out: list[bytes] = []
        sep = b"\r\n\r\n" if b"\r\n\r\n" in complete else b"\n\n"
        for raw in complete.split(sep):
            if not raw.strip():
                continue
            payload = _event_data(raw)
            if payload is None:
                out.append(raw + sep)  # comments and other fields pass through
                continue
            if payload.startswith(b"[DONE]"):
                self.done = True
                out.append(raw + sep)
                break
            keep = True
            if self.rewrite is not None or b'"usage"' in payload or b'"error"' in payload:
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    if obj.get("error"):
                        self.saw_error = True
                    u = Usage.from_openai(obj.get("usage"))
                    if u is not None:
                        self.usage = u
                        if self.strip_usage and not obj.get("choices"):
                            keep = False
                    if keep and self.rewrite is not None and not self.saw_error:
                        new = self.rewrite(obj)
                        if new is None:
                            keep = False
                        else:
                            raw = b"data: " + orjson.dumps(new)
            if keep:
                self.events += 1
                out.append(raw + sep)
        return b"".join(out)

    @property
    def pending(self) -> bytes:
        return self._buf
