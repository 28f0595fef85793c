"""Cached answers in both shapes: assemble a complete response from a relayed SSE stream, and
replay a stored response as an OpenAI SSE stream (role, content, finish, usage, [DONE])."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from gateway.wire.sse import DONE_EVENT, encode_event

CACHEABLE_FINISH = frozenset({"stop", "length", "tool_calls", "function_call"})


def _events(raw: bytes) -> list[dict[str, Any]] | None:
    """The JSON chunks of a complete SSE stream; None unless it ended with [DONE] and no error."""
    out: list[dict[str, Any]] = []
    done = False
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if not data:
            continue
        if data.strip() == b"[DONE]":
            done = True
            break
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("error"):
            return None
        out.append(obj)
    return out if done else None


def assemble(raw: bytes, endpoint: str) -> dict[str, Any] | None:
    """The non-streamed response equivalent to a complete chat/completions stream, or None."""
    chunks = _events(raw)
    if not chunks:
        return None
    first = chunks[0]
    choices: dict[int, dict[str, Any]] = {}
    usage: Any = None
    fingerprint: Any = None
    for c in chunks:
        if c.get("usage"):
            usage = c["usage"]
        if c.get("system_fingerprint"):
            fingerprint = c["system_fingerprint"]
        for ch in c.get("choices") or []:
            idx = int(ch.get("index", 0))
            if endpoint == "chat":
                cur = choices.setdefault(
                    idx,
                    {"index": idx, "message": {"role": "assistant", "content": None},
                     "logprobs": None, "finish_reason": None},
                )
                _merge_delta(cur, ch.get("delta") or {})
            else:
                cur = choices.setdefault(
                    idx, {"index": idx, "text": "", "logprobs": None, "finish_reason": None}
                )
                cur["text"] += ch.get("text") or ""
            lp = ch.get("logprobs")
            if isinstance(lp, dict):
                prev = cur["logprobs"] or {}
                for field, items in lp.items():
                    if isinstance(items, list):
                        prev[field] = (prev.get(field) or []) + items
                cur["logprobs"] = prev
            if ch.get("finish_reason"):
                cur["finish_reason"] = ch["finish_reason"]
    if not choices or usage is None:
        return None
    body: dict[str, Any] = {
        "id": first.get("id"),
        "object": "chat.completion" if endpoint == "chat" else "text_completion",
        "created": first.get("created"),
        "model": first.get("model"),
        "choices": [choices[i] for i in sorted(choices)],
        "usage": usage,
    }
    if fingerprint is not None:
        body["system_fingerprint"] = fingerprint
    return body


def _merge_delta(choice: dict[str, Any], delta: dict[str, Any]) -> None:
    msg = choice["message"]
    if delta.get("role"):
        msg["role"] = delta["role"]
    if delta.get("content") is not None:
        msg["content"] = (msg["content"] or "") + delta["content"]
    if delta.get("refusal") is not None:
        msg["refusal"] = (msg.get("refusal") or "") + delta["refusal"]
    for tc in delta.get("tool_calls") or []:
        calls = msg.setdefault("tool_calls", [])
        i = int(tc.get("index", len(calls)))
        while len(calls) <= i:
            calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
        cur = calls[i]
        if tc.get("id"):
            cur["id"] = tc["id"]
        if tc.get("type"):
            cur["type"] = tc["type"]
        fn = tc.get("function") or {}
        if fn.get("name"):
            cur["function"]["name"] += fn["name"]
        if fn.get("arguments"):
            cur["function"]["arguments"] += fn["arguments"]


def is_complete(body: dict[str, Any]) -> bool:
    """A response worth caching: choices that all finished normally, and usage."""
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(body.get("usage"), dict):
        return False
    return all(isinstance(c, dict) and c.get("finish_reason") in CACHEABLE_FINISH for c in choices)


def stream_events(body: dict[str, Any], endpoint: str) -> list[bytes]:
    """The SSE events replaying `body` in the shape an upstream streams it."""
    chat = endpoint == "chat"
    base: dict[str, Any] = {
        "id": body.get("id"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": body.get("created"),
        "model": body.get("model"),
    }
    if body.get("system_fingerprint") is not None:
        base["system_fingerprint"] = body["system_fingerprint"]

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        return encode_event({**base, "choices": choices})

    events: list[bytes] = []
    for ch in body.get("choices") or []:
        idx = ch.get("index", 0)
        if chat:
            msg = ch.get("message") or {}
            events.append(chunk([{"index": idx, "delta": {"role": msg.get("role", "assistant"),
                                                          "content": ""},
                                  "logprobs": None, "finish_reason": None}]))
            delta: dict[str, Any] = {}
            if msg.get("content"):
                delta["content"] = msg["content"]
            if msg.get("refusal"):
                delta["refusal"] = msg["refusal"]
            if msg.get("tool_calls"):
                delta["tool_calls"] = [{**tc, "index": i} for i, tc in enumerate(msg["tool_calls"])]
            if delta or ch.get("logprobs"):
                events.append(chunk([{"index": idx, "delta": delta, "logprobs": ch.get("logprobs"),
                                      "finish_reason": None}]))
            events.append(chunk([{"index": idx, "delta": {}, "logprobs": None,
                                  "finish_reason": ch.get("finish_reason")}]))
        else:
            events.append(chunk([{"index": idx, "text": ch.get("text") or "",
                                  "logprobs": ch.get("logprobs"), "finish_reason": None}]))
            events.append(chunk([{"index": idx, "text": "", "logprobs": None,
                                  "finish_reason": ch.get("finish_reason")}]))
    events.append(encode_event({**base, "choices": [], "usage": body.get("usage")}))
    events.append(DONE_EVENT)
    return events


class ReplayStream:
    """An UpstreamStream over prepared SSE events (a cache hit answering a streaming request)."""

    def __init__(self, events: list[bytes]) -> None:
        self._data = b"".join(events)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self._data:
            raise StopAsyncIteration
        data, self._data = self._data, b""
        return data

    async def aclose(self) -> None:
        self._data = b""
