"""A fake Anthropic Messages API upstream for tests (yours and plugin authors').

It listens on 127.0.0.1 (random port), answers ``POST /v1/messages`` with realistic, deterministic
messages or SSE streams, checks requests the way the real API does (``x-api-key``,
``anthropic-version``, required ``max_tokens``, unknown fields, roles, tool-result pairing), records
every request it receives, and can be scripted to fail, stream tool calls, send an ``error``
event mid-stream, cut or stall a stream::

    async with FakeAnthropic(api_key="sk-ant-test") as fake:
        fake.enqueue(AnthropicBehaviour(status=529))
        ...  # point the gateway's anthropic provider at fake.url
        assert fake.last.headers["x-api-key"] == "sk-ant-test"
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.testing.loopback import LoopbackFake

__all__ = [
    "DEFAULT_MODEL_REPLY",
    "AnthropicBehaviour",
    "AnthropicRequest",
    "FakeAnthropic",
    "anthropic_error",
]

DEFAULT_MODEL_REPLY: Final = "Hello from the fake Anthropic upstream."
HANG_LIMIT_S: Final = 600.0
KNOWN_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",
        "stream",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
    }
)
"""Top-level request fields the real API accepts; anything else is a 400."""

_ERROR_TYPES: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request (fake Anthropic)."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "model: not found"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}


def anthropic_error(status: int, message: str | None = None, etype: str | None = None) -> dict[str, Any]:
    """The Anthropic error body for `status` (type and message defaulted by status)."""
    default_type, default_message = _ERROR_TYPES.get(status, ("api_error", f"HTTP {status}"))
    return {
        "type": "error",
        "error": {"type": etype or default_type, "message": message or default_message},
        "request_id": "req_fakeanthropic000",
    }


@dataclass(frozen=True)
class AnthropicBehaviour:
    """What the fake does for one request; the default is a normal 200 with a text reply.

    * ``status``/``body``/``headers``: a status other than 200 returns ``body`` (default:
      ``anthropic_error(status)``) as JSON; with 200 a ``body`` replaces the generated message
      of a non-streaming request. ``headers`` are added to any response.
    * ``raw_body`` (+ ``content_type``): send these bytes as they are (with ``stream`` too).
    * ``raw_stream``: for a streaming request, send these SSE bytes as they are (e.g. a recorded
      fixture), honouring ``write_size``/``chunk_delay_s``.
    * ``delay_s``: wait before answering.
    * ``content``: the text block (default ``DEFAULT_MODEL_REPLY``; ``""`` for none).
    * ``tool_uses``: ``[{"name", "input"}]`` tool_use blocks after the text. Without them, a
      request whose ``tool_choice`` forces a tool (``any``/``tool``) gets one call to it.
    * ``stop_reason``: default ``tool_use`` when there are tool calls, else ``end_turn``.
    * ``usage``: overrides of the usage counts (``input_tokens``, ``cache_read_input_tokens``…).
    * ``stream_chunks``: text deltas per text block (default one per word).
    * ``chunk_delay_s``: sleep before every SSE event after the first.
    * ``cut_after`` / ``hang_after``: after this many events abort the TCP connection / go silent.
    * ``error_after``: after this many events send ``event: error`` (``error``, default
      overloaded) and end the body cleanly.
    * ``omit_message_stop``: end the body cleanly without ``message_stop``.
    * ``write_size``: write each event in pieces of this many bytes; ``crlf``: CRLF line endings.
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None
    content_type: str = "application/json"
    raw_stream: bytes | None = None
    delay_s: float = 0.0
    content: str | None = None
    tool_uses: list[dict[str, Any]] | None = None
    stop_reason: str | None = None
    usage: dict[str, int] | None = None
    stream_chunks: int | None = None
    chunk_delay_s: float = 0.0
    cut_after: int | None = None
    hang_after: int | None = None
    error_after: int | None = None
    error: dict[str, Any] | None = None
    omit_message_stop: bool = False
    write_size: int | None = None
    crlf: bool = False


@dataclass
class AnthropicRequest:
    """One request as the fake saw it."""

    method: str
    path: str
    headers: CIMultiDict[str]
    arrived_at: float
    raw_body: bytes = b""
    body: Any = None
    behaviour: AnthropicBehaviour | None = None
    status: int | None = None
    rejected: str | None = None
    """Why the fake's request checks refused it (a 400/401 like the real API's), if they did."""
    events_sent: int = 0
    cut: bool = False
    cancelled: bool = False
    finished_at: float | None = None


class _Stop(Exception):
    """Internal: the scripted stream ended early."""


def _words(text: str) -> list[str]:
    out: list[str] = []
    for i, w in enumerate(text.split(" ")):
        out.append(w if i == 0 else " " + w)
    return [w for w in out if w] or [text]


def _pieces(text: str, k: int | None) -> list[str]:
    if k is None or k <= 0:
        return _words(text)
    size, extra = divmod(len(text), k)
    out, pos = [], 0
    for i in range(k):
        n = size + (1 if i < extra else 0)
        out.append(text[pos : pos + n])
        pos += n
    return [p for p in out if p] or [text]


def _count_tokens(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_tokens(v) for k, v in value.items() if k not in ("type", "role", "id"))
    return 0


def _args_for(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("input_schema")
    props = schema.get("properties") if isinstance(schema, dict) else None
    out: dict[str, Any] = {}
    for name, spec in (props or {}).items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        out[name] = 42 if kind == "integer" else True if kind == "boolean" else f"{name} value"
    return out


def check_request(body: Any, headers: CIMultiDict[str], api_key: str | None) -> tuple[int, str] | None:
    """The real API's checks that catch translation bugs: (status, message) if the request fails."""
    key = headers.get("x-api-key")
    if key is None or (api_key is not None and key != api_key):
        return 401, "invalid x-api-key"
    version = headers.get("anthropic-version")
    if not version:
        return 400, "anthropic-version: header is required"
    if not isinstance(body, dict):
        return 400, "Request body must be a JSON object"
    for k in body:
        if k not in KNOWN_FIELDS:
            return 400, f"{k}: Extra inputs are not permitted"
    if version >= "2026-10-21":
        for k in ("temperature", "top_p", "top_k"):
            if k in body:
                return 400, f"{k}: Extra inputs are not permitted"
    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] < 1:
        return 400, "max_tokens: Field required"
    t = body.get("temperature")
    if isinstance(t, int | float) and not 0 <= t <= 1:
        return 400, "temperature: Input should be less than or equal to 1"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return 400, "messages: Field required"
    pending: set[str] = set()
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            return 400, f"messages.{i}.role: Input should be 'user' or 'assistant'"
        blocks = m["content"] if isinstance(m.get("content"), list) else []
        if pending:
            answered = {
                b.get("tool_use_id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"
            }
            if m["role"] != "user" or not pending <= answered:
                return 400, (
                    f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                    f"after: {', '.join(sorted(pending - answered))}"
                )
        for b in blocks:
            if isinstance(b, dict) and b.get("type") == "text" and not b.get("text"):
                return 400, f"messages.{i}: text content blocks must be non-empty"
        pending = (
            {str(b.get("id")) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"}
            if m["role"] == "assistant"
            else set()
        )
    return None


class FakeAnthropic(LoopbackFake[AnthropicBehaviour, AnthropicRequest]):
    """An Anthropic Messages API look-alike on 127.0.0.1; see the module docstring. `url` is the
    provider's `api_base` (the fake serves `/v1/messages`)."""

    def __init__(self, *, api_key: str | None = None, shutdown_timeout_s: float = 0.5) -> None:
        super().__init__(AnthropicBehaviour(), shutdown_timeout_s=shutdown_timeout_s)
        self.api_key = api_key
        """When set, requests must carry exactly this x-api-key (else 401, as the real API)."""
        self.strict = True
        """Apply `check_request` to every request."""
        self.app.router.add_post("/v1/messages", self._handle)

    # ---------------------------------------------------------------- handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = AnthropicRequest(
            method=request.method,
            path=request.path,
            headers=CIMultiDict(request.headers),
            arrived_at=time.monotonic(),
        )
        b = self.next_behaviour()
        rec.behaviour = b
        self.requests.append(rec)
        try:
            rec.raw_body = await request.read()
            try:
                rec.body = orjson.loads(rec.raw_body)
            except orjson.JSONDecodeError:
                rec.body = None
            if b.delay_s > 0:
                await asyncio.sleep(b.delay_s)
            return await self._respond(request, rec, b)
        except asyncio.CancelledError:
            if not rec.cut:
                rec.cancelled = True
            raise
        finally:
            rec.finished_at = time.monotonic()

    def _json(self, rec: AnthropicRequest, status: int, body: Any, headers: dict[str, str]) -> web.Response:
        rec.status = status
        return web.Response(
            status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
        )

    async def _respond(
        self, request: web.Request, rec: AnthropicRequest, b: AnthropicBehaviour
    ) -> web.StreamResponse:
        n = next(self._ids)
        headers = {"request-id": f"req_fakeanthropic{n}", **b.headers}
        if self.strict:
            problem = check_request(rec.body, rec.headers, self.api_key)
            if problem is not None:
                status, message = problem
                rec.rejected = message
                return self._json(rec, status, anthropic_error(status, message), headers)
        if b.raw_body is not None:
            rec.status = b.status
            return web.Response(
                status=b.status, body=b.raw_body, headers=headers, content_type=b.content_type
            )
        if b.status != 200:
            return self._json(
                rec, b.status, b.body if b.body is not None else anthropic_error(b.status), headers
            )
        if not isinstance(rec.body, dict):
            return self._json(rec, 400, anthropic_error(400), headers)
        req: dict[str, Any] = rec.body
        if req.get("stream") is True:
            return await self._stream(request, rec, b, self.message(req, b, n), headers)
        return self._json(rec, 200, b.body if b.body is not None else self.message(req, b, n), headers)

    # ---------------------------------------------------------------- messages

    def message(self, req: dict[str, Any], b: AnthropicBehaviour, n: int = 0) -> dict[str, Any]:
        """The complete message the fake answers `req` with under `b`."""
        content: list[dict[str, Any]] = []
        text = DEFAULT_MODEL_REPLY if b.content is None else b.content
        uses = b.tool_uses if b.tool_uses is not None else self._forced_tool(req)
        if b.content is None and uses:
            text = ""
        if text:
            content.append({"type": "text", "text": text})
        for k, use in enumerate(uses):
            content.append(
                {
                    "type": "tool_use",
                    "id": f"toolu_fake{n:04d}{k}",
                    "name": use["name"],
                    "input": use.get("input") or {},
                }
            )
        usage = {
            "input_tokens": max(1, _count_tokens(req.get("messages")) + _count_tokens(req.get("system"))),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": max(
                1, _count_tokens(text) + sum(len(orjson.dumps(u.get("input") or {})) // 4 for u in uses)
            ),
            "service_tier": "standard",
        }
        usage.update(b.usage or {})
        return {
            "id": f"msg_fake{n:04d}",
            "type": "message",
            "role": "assistant",
            "model": str(req.get("model") or "claude-fake"),
            "content": content,
            "stop_reason": b.stop_reason or ("tool_use" if uses else "end_turn"),
            "stop_sequence": None,
            "usage": usage,
        }

    @staticmethod
    def _forced_tool(req: dict[str, Any]) -> list[dict[str, Any]]:
        tools = [t for t in req.get("tools") or [] if isinstance(t, dict)]
        choice = req.get("tool_choice")
        if not tools or not isinstance(choice, dict):
            return []
        if choice.get("type") == "any":
            chosen = tools[0]
        elif choice.get("type") == "tool":
            named = [t for t in tools if t.get("name") == choice.get("name")]
            if not named:
                return []
            chosen = named[0]
        else:
            return []
        return [{"name": chosen["name"], "input": _args_for(chosen)}]

    # ---------------------------------------------------------------- streaming

    @staticmethod
    def events(msg: dict[str, Any], b: AnthropicBehaviour) -> Iterator[tuple[str, dict[str, Any]]]:
        """The (event name, data) sequence that streams `msg`, as the real API sends it."""
        usage = msg["usage"]
        start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None}
        start["usage"] = {**usage, "output_tokens": 1}
        yield "message_start", {"type": "message_start", "message": start}
        yield "ping", {"type": "ping"}
        for i, block in enumerate(msg["content"]):
            if block["type"] == "text":
                yield (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                for piece in _pieces(block["text"], b.stream_chunks):
                    yield (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
            elif block["type"] == "tool_use":
                yield (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": i,
                        "content_block": {**block, "input": {}},
                    },
                )
                args = orjson.dumps(block["input"]).decode()
                for frag in ["", *(args[j : j + 7] for j in range(0, len(args), 7))]:
                    yield (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": i,
                            "delta": {"type": "input_json_delta", "partial_json": frag},
                        },
                    )
            yield "content_block_stop", {"type": "content_block_stop", "index": i}
        yield (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
                "usage": {k: v for k, v in usage.items() if k != "service_tier"},
            },
        )
        if not b.omit_message_stop:
            yield "message_stop", {"type": "message_stop"}

    async def _stream(
        self,
        request: web.Request,
        rec: AnthropicRequest,
        b: AnthropicBehaviour,
        msg: dict[str, Any],
        headers: dict[str, str],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        rec.status = 200
        await resp.prepare(request)
        if b.raw_stream is not None:
            encoded: Iterator[bytes] = iter([b.raw_stream])
            if b.write_size:
                encoded = iter(
                    [b.raw_stream[j : j + b.write_size] for j in range(0, len(b.raw_stream), b.write_size)]
                )
        else:
            encoded = (
                f"event: {name}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"
                for name, data in self.events(msg, b)
            )
        try:
            for ev in encoded:
                await self._scripted(request, rec, b, resp)
                if rec.events_sent and b.chunk_delay_s > 0:
                    await asyncio.sleep(b.chunk_delay_s)
                await self._write(resp, ev, b if b.raw_stream is None else AnthropicBehaviour())
                rec.events_sent += 1
            await self._scripted(request, rec, b, resp)
            await resp.write_eof()
        except _Stop:
            pass
        except ConnectionResetError:
            rec.cancelled = True
        return resp

    async def _scripted(
        self, request: web.Request, rec: AnthropicRequest, b: AnthropicBehaviour, resp: web.StreamResponse
    ) -> None:
        sent = rec.events_sent
        if b.cut_after is not None and sent >= b.cut_after:
            rec.cut = True
            if request.transport is not None:
                request.transport.abort()
            await asyncio.sleep(HANG_LIMIT_S)
            raise _Stop
        if b.hang_after is not None and sent >= b.hang_after:
            await asyncio.sleep(HANG_LIMIT_S)
            raise _Stop
        if b.error_after is not None and sent >= b.error_after:
            err = b.error or anthropic_error(529)
            await self._write(resp, b"event: error\ndata: " + orjson.dumps(err) + b"\n\n", b)
            await resp.write_eof()
            raise _Stop

    @staticmethod
    async def _write(resp: web.StreamResponse, event: bytes, b: AnthropicBehaviour) -> None:
        if b.crlf:
            event = event.replace(b"\n", b"\r\n")
        if not b.write_size or b.write_size <= 0:
            await resp.write(event)
            return
        for j in range(0, len(event), b.write_size):
            await resp.write(event[j : j + b.write_size])
            await asyncio.sleep(0.001)
