"""Anthropic Messages SSE → OpenAI chat.completion.chunk SSE: a byte-level parser and a state machine.

States: ``before_message`` (nothing but pings and unknown events seen) → ``in_message`` (after
``message_start``) → ``done`` (after ``message_stop``; ``[DONE]`` sent) or ``failed`` (an ``error``
event or a protocol violation; an OpenAI in-band error event sent, never ``[DONE]``).

Per wire-format §8.6: the role chunk comes first; text deltas become content deltas; each
``tool_use`` block becomes a tool call whose index counts tool blocks from 0 (not the content
block index); ``input_json_delta`` fragments become argument deltas (empty ones skipped);
usage is taken from ``message_start`` and ``message_delta`` by replacement (the counts are
cumulative, never added); ``message_stop`` gives the finish chunk, the usage chunk
(``choices: []``, when asked) and ``data: [DONE]``. Thinking, citations and server-tool blocks,
``ping`` and unknown events produce nothing. As on OpenAI, chunks carry ``"usage": null`` only
for a client that asked for usage (``include_usage``); the usage chunk may be wanted without that
(``usage_chunk``: the gateway's own accounting; its relay drops that chunk for the client).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from gateway.errors import BadGateway, GatewayError
from gateway.providers.anthropic import translate
from gateway.wire.sse import DONE_EVENT, encode_event

_EOL: Final = re.compile(rb"\r\n|\r|\n")

State = Literal["before_message", "in_message", "done", "failed"]


class SSEDecoder:
    """WHATWG-style SSE parsing on bytes: lines end with CRLF, LF or CR (a CRLF may be split across
    reads), `data:` lines join with LF, comments and unknown fields are ignored. UTF-8 is decoded
    per complete event only, so characters split across reads survive."""

    __slots__ = ("_buf", "_data", "_event", "_skip_lf")

    def __init__(self) -> None:
        self._buf = b""
        self._skip_lf = False
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        """Bytes of one read → the (event name, data) pairs completed by it."""
        if self._skip_lf and data:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self._buf + data if self._buf else data
        out: list[tuple[str, bytes]] = []
        pos = 0
        for m in _EOL.finditer(buf):
            self._line(buf[pos : m.start()], out)
            pos = m.end()
            if pos == len(buf) and m.group() == b"\r":
                self._skip_lf = True
        self._buf = buf[pos:]
        return out

    def end(self) -> list[tuple[str, bytes]]:
        """At EOF: a last event that lacks its blank line is still delivered."""
        out: list[tuple[str, bytes]] = []
        if self._buf:
            self._line(self._buf, out)
            self._buf = b""
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[tuple[str, bytes]]) -> None:
        if not line:
            if self._data:
                out.append((self._event.decode("utf-8", "replace") or "message", b"\n".join(self._data)))
            self._event = b""
            self._data = []
            return
        if line[:1] == b":":
            return
        field, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value


@dataclass(slots=True)
class _Block:
    kind: Literal["text", "tool", "other"]
    tool_index: int = -1
    sent_arguments: bool = False


class StreamTranslator:
    """One Anthropic stream → OpenAI SSE bytes. Feed it upstream reads; call `end()` at EOF."""

    def __init__(
        self,
        *,
        provider: str,
        model: str,
        created: int,
        include_usage: bool,
        usage_chunk: bool | None = None,
    ) -> None:
        self.provider = provider
        self.model = model
        self.created = created
        self.include_usage = include_usage
        """The client asked for usage: every chunk carries `"usage": null`, as on OpenAI."""
        self.usage_chunk = include_usage if usage_chunk is None else usage_chunk or include_usage
        """Send the final usage chunk (`choices: []`) before `[DONE]`."""
        self.id = "chatcmpl-anthropic"
        self.state: State = "before_message"
        self.error: GatewayError | None = None
        """Set when the stream failed (an `error` event or a protocol violation)."""
        self.chunks = 0
        """OpenAI chunks produced so far (errors and [DONE] not counted)."""
        self.started = False
        """The answer has begun: a content block (text, tool use, thinking…) started, or the
        message ended. `message_start` and `ping` do not count (time to first byte)."""
        self.usage: dict[str, Any] = {}
        """The latest Anthropic usage counts (each field replaced, never added)."""
        self.stop_reason: Any = None
        self._blocks: dict[int, _Block] = {}
        self._tools = 0
        self._decoder = SSEDecoder()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed")

    # ---- input --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """One upstream read → the OpenAI SSE bytes to send now (possibly none)."""
        if self.finished:
            return b""
        return self._events(self._decoder.feed(data))

    def end(self) -> bytes:
        """The upstream body ended. Raises a GatewayError if the message was not complete."""
        out = b"" if self.finished else self._events(self._decoder.end())
        if self.state in ("before_message", "in_message"):
            # Output already produced is returned by the caller's previous feeds; the gateway turns
            # this into an in-band error event (or an HTTP error before the first byte).
            raise BadGateway(
                f"The upstream provider {self.provider} ended the stream before the message was complete.",
                code="upstream_stream_incomplete",
            )
        return out

    def _events(self, events: list[tuple[str, bytes]]) -> bytes:
        out: list[bytes] = []
        for name, data in events:
            if self.finished:
                break
            try:
                obj: Any = orjson.loads(data)
            except orjson.JSONDecodeError:
                out.append(
                    self._fail(translate.invalid_reply(self.provider, f"invalid JSON in a {name} event"))
                )
                break
            kind = obj.get("type") if isinstance(obj, dict) else None
            if not isinstance(kind, str):
                kind = name
            self._on_event(kind, obj if isinstance(obj, dict) else {}, out)
        return b"".join(out)

    # ---- the state machine --------------------------------------------------------------------

    def _on_event(self, kind: str, ev: dict[str, Any], out: list[bytes]) -> None:
        if kind == "ping":
            return
        if kind == "error":
            out.append(self._fail(translate.stream_error(self.provider, ev)))
            return
        if self.state == "before_message":
            if kind == "message_start":
                self._message_start(ev, out)
            elif kind.startswith(("content_block_", "message_")):
                out.append(self._fail(translate.invalid_reply(self.provider, f"{kind} before message_start")))
            return  # unknown events are ignored (Anthropic may add new ones)
        if kind == "content_block_start":
            self._block_start(ev, out)
        elif kind == "content_block_delta":
            self._block_delta(ev, out)
        elif kind == "content_block_stop":
            self._block_stop(ev, out)
        elif kind == "message_delta":
            delta = ev.get("delta")
            if isinstance(delta, dict) and "stop_reason" in delta:
                self.stop_reason = delta["stop_reason"]
            self._take_usage(ev.get("usage"))
        elif kind == "message_stop":
            self._message_stop(out)

    def _message_start(self, ev: dict[str, Any], out: list[bytes]) -> None:
        msg = ev.get("message")
        msg = msg if isinstance(msg, dict) else {}
        self.id = translate.completion_id(msg.get("id"))
        m = msg.get("model")
        if isinstance(m, str) and m:
            self.model = m
        self._take_usage(msg.get("usage"))
        self.state = "in_message"
        out.append(self._chunk({"role": "assistant", "content": "", "refusal": None}))

    def _block_start(self, ev: dict[str, Any], out: list[bytes]) -> None:
        index = ev.get("index")
        block = ev.get("content_block")
        if not isinstance(index, int) or not isinstance(block, dict):
            return
        kind = block.get("type")
        self.started = True
        if kind == "text":
            self._blocks[index] = _Block("text")
            text = block.get("text")
            if isinstance(text, str) and text:
                out.append(self._chunk({"content": text}))
        elif kind == "tool_use":
            b = _Block("tool", tool_index=self._tools)
            self._tools += 1
            self._blocks[index] = b
            start_input = block.get("input")
            args = ""
            if isinstance(start_input, dict) and start_input:
                args = orjson.dumps(start_input).decode()
                b.sent_arguments = True
            call = {
                "index": b.tool_index,
                "id": str(block.get("id") or f"toolu_{b.tool_index}"),
                "type": "function",
                "function": {"name": str(block.get("name") or ""), "arguments": args},
            }
            out.append(self._chunk({"tool_calls": [call]}))
        else:
            self._blocks[index] = _Block("other")  # thinking, redacted_thinking, server tools…

    def _block_delta(self, ev: dict[str, Any], out: list[bytes]) -> None:
        index = ev.get("index")
        delta = ev.get("delta")
        b = self._blocks.get(index) if isinstance(index, int) else None
        if b is None or not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta" and b.kind == "text":
            text = delta.get("text")
            if isinstance(text, str) and text:
                out.append(self._chunk({"content": text}))
        elif kind == "input_json_delta" and b.kind == "tool":
            frag = delta.get("partial_json")
            if isinstance(frag, str) and frag:
                b.sent_arguments = True
                call = {"index": b.tool_index, "function": {"arguments": frag}}
                out.append(self._chunk({"tool_calls": [call]}))
        # thinking_delta, signature_delta, citations_delta: nothing to send

    def _block_stop(self, ev: dict[str, Any], out: list[bytes]) -> None:
        index = ev.get("index")
        b = self._blocks.get(index) if isinstance(index, int) else None
        if b is not None and b.kind == "tool" and not b.sent_arguments:
            # A call without arguments: send "{}" as OpenAI does (and as the JSON reply has).
            b.sent_arguments = True
            out.append(
                self._chunk({"tool_calls": [{"index": b.tool_index, "function": {"arguments": "{}"}}]})
            )

    def _message_stop(self, out: list[bytes]) -> None:
        self.started = True
        out.append(self._chunk({}, translate.finish_reason(self.stop_reason)))
        if self.usage_chunk:
            out.append(
                encode_event(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self.model,
                        "choices": [],
                        "usage": translate.openai_usage(self.usage),
                    }
                )
            )
        out.append(DONE_EVENT)
        self.state = "done"

    # ---- helpers ------------------------------------------------------------------------------

    def _take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            for k, v in usage.items():
                if v is not None:
                    self.usage[k] = v

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        self.chunks += 1
        c: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            c["usage"] = None
        return encode_event(c)

    def _fail(self, err: GatewayError) -> bytes:
        self.error = err
        self.state = "failed"
        return encode_event(
            {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
        )
