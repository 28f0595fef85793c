"""Small assertion helpers shared by the tests (imported as `helpers`)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

StartGateway = Callable[..., Awaitable[str]]
"""`await start_gateway(**config_overrides)` -> the gateway URL."""

USER_MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]


def assert_error_shape(body: bytes | str, status: int | None = None) -> dict[str, Any]:
    """The body is an OpenAI error object with all four keys; return the inner object."""
    data = orjson.loads(body)
    assert isinstance(data, dict) and isinstance(data.get("error"), dict), data
    err: dict[str, Any] = data["error"]
    assert set(err) >= {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    text = body if isinstance(body, str) else body.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    return err


def decode_b64_floats(s: str) -> list[float]:
    raw = base64.b64decode(s)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def sse_data_lines(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for line in raw.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            out.append(line[5:].strip())
    return out
