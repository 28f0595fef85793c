"""Built-in deterministic `mock` provider: OpenAI-shaped answers with configurable pacing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
from collections.abc import AsyncGenerator
from typing import Any

import orjson

from gateway.errors import InvalidRequest
from gateway.providers.base import Provider, Reply, UpstreamRequest, UpstreamStream
from gateway.settings import MockSettings

_WORDS = (
    "the quick brown fox jumps over a lazy dog while tollway streams every token through "
    "gateway budgets caches routes and keys for many teams with care speed and honesty"
).split()


def _prompt_text(req: UpstreamRequest) -> str:
    body = req.body
    if req.endpoint == "chat":
        parts: list[str] = []
        for m in body.get("messages") or ():
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts.extend(
                    str(p.get("text", "")) for p in c if isinstance(p, dict) and "text" in p
                )
        return "\n".join(parts)
    prompt = body.get("prompt", body.get("input", ""))
    return prompt if isinstance(prompt, str) else orjson.dumps(prompt).decode()


def _count_tokens(text: str) -> int:
    return max(1, len(text.split()))


def reply_tokens(seed_text: str, n_tokens: int, choice: int = 0) -> list[str]:
    """The deterministic reply for a prompt: same prompt, same words."""
    digest = hashlib.sha256(f"{choice}:{seed_text}".encode()).digest()
    out = []
    for i in range(n_tokens):
        w = _WORDS[(digest[i % len(digest)] + i * 7) % len(_WORDS)]
        out.append(w if i == 0 else " " + w)
    return out


def _embedding(text: str, dims: int) -> list[float]:
    vals: list[float] = []
    counter = 0
    while len(vals) < dims:
        block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        vals.extend((b - 127.5) / 127.5 for b in block)
        counter += 1
    vec = vals[:dims]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def _tool_call(body: dict[str, Any], seed: str) -> dict[str, Any] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice in (None, "none", "auto"):
        return None
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
    if name is None:
        first = tools[0].get("function") if isinstance(tools[0], dict) else None
        name = first.get("name") if isinstance(first, dict) else "tool"
    call_id = "call_" + hashlib.sha256(seed.encode()).hexdigest()[:24]
    args = orjson.dumps({"query": seed[:40]}).decode()
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


class MockProvider(Provider):
    """Answers in-process; never touches the network. Used for demos, tests and benchmarks."""

    def __init__(self, name: str, settings: MockSettings) -> None:
        super().__init__(name)
        self.settings = settings

    def _n(self, body: dict[str, Any]) -> int:
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            raise InvalidRequest("n must be an integer between 1 and 128", param="n")
        return n

    def _max_tokens(self, body: dict[str, Any]) -> int:
        n = self.settings.reply_tokens
        for k in ("max_completion_tokens", "max_tokens"):
            v = body.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return min(n, v)
        return n

    async def _wait_first_token(self) -> None:
        if self.settings.ttft_ms:
            await asyncio.sleep(self.settings.ttft_ms / 1000)

    def _token_delay(self) -> float:
        tps = self.settings.tokens_per_s
        return 1.0 / tps if tps > 0 else 0.0

    async def complete(self, req: UpstreamRequest) -> Reply:
        body = req.body
        await self._wait_first_token()
        text = _prompt_text(req)
        created = int(time.time())
        rid = req.request_id[:24]
        if req.endpoint == "embeddings":
            obj = self._embeddings(body)
        else:
            n = self._n(body)
            k = self._max_tokens(body)
            delay = self._token_delay() * k
            if delay:
                await asyncio.sleep(delay)
            choices: list[dict[str, Any]] = []
            for i in range(n):
                words = reply_tokens(text, k, i)
                content = "".join(words)
                finish = "length" if k < self.settings.reply_tokens else "stop"
                if req.endpoint == "chat":
                    msg: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
                    call = _tool_call(body, text)
                    if call is not None:
                        msg["content"] = None
                        msg["tool_calls"] = [call]
                        finish = "tool_calls"
                    choice: dict[str, Any] = {
                        "index": i, "message": msg, "logprobs": None, "finish_reason": finish,
                    }
                    if body.get("logprobs") is True:
                        choice["logprobs"] = {
                            "content": [
                                {"token": w, "logprob": -0.01, "bytes": list(w.encode()),
                                 "top_logprobs": []}
                                for w in words
                            ],
                            "refusal": None,
                        }
                else:
                    choice = {"index": i, "text": content, "logprobs": None, "finish_reason": finish}
                choices.append(choice)
            prompt_tokens = _count_tokens(text)
            obj = {
                "id": ("chatcmpl-" if req.endpoint == "chat" else "cmpl-") + rid,
                "object": "chat.completion" if req.endpoint == "chat" else "text_completion",
                "created": created,
                "model": req.upstream_model,
                "system_fingerprint": "fp_tollway_mock",
                "choices": choices,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": k * n,
                    "total_tokens": prompt_tokens + k * n,
                },
            }
        return Reply(status=200, body=orjson.dumps(obj), parsed=obj)

    def _embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        inp = body.get("input")
        items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
        fmt = body.get("encoding_format", "float")
        dims = body.get("dimensions") or self.settings.embedding_dims
        if not isinstance(dims, int) or not 1 <= dims <= 8192:
            raise InvalidRequest("dimensions must be an integer between 1 and 8192", param="dimensions")
        data = []
        tokens = 0
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else orjson.dumps(item).decode()
            tokens += _count_tokens(text)
            vec = _embedding(text, dims)
            emb: Any = vec
            if fmt == "base64":
                emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def open_stream(self, req: UpstreamRequest) -> UpstreamStream:
        if req.endpoint == "embeddings":
            raise InvalidRequest("embeddings cannot be streamed", param="stream")
        self._n(req.body)
        return self._stream(req)

    async def _stream(self, req: UpstreamRequest) -> AsyncGenerator[bytes, None]:
        body = req.body
        chat = req.endpoint == "chat"
        text = _prompt_text(req)
        n = self._n(body)
        k = self._max_tokens(body)
        so = body.get("stream_options")
        usage_on = isinstance(so, dict) and so.get("include_usage") is True
        base: dict[str, Any] = {
            "id": ("chatcmpl-" if chat else "cmpl-") + req.request_id[:24],
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.upstream_model,
            "system_fingerprint": "fp_tollway_mock",
        }

        def event(choices: list[dict[str, Any]], usage: Any = None) -> bytes:
            obj = {**base, "choices": choices}
            if usage_on:
                obj["usage"] = usage
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        await self._wait_first_token()
        delay = self._token_delay()
        call = _tool_call(body, text) if chat else None
        if chat:
            yield event([
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}
                for i in range(n)
            ])
        finish = "length" if k < self.settings.reply_tokens else "stop"
        if call is not None:
            fn = call["function"]
            yield event([{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "id": call["id"], "type": "function",
                 "function": {"name": fn["name"], "arguments": ""}}]},
                "logprobs": None, "finish_reason": None}])
            args = fn["arguments"]
            for j in range(0, len(args), 8):
                if delay:
                    await asyncio.sleep(delay)
                yield event([{"index": 0, "delta": {"tool_calls": [
                    {"index": 0, "function": {"arguments": args[j:j + 8]}}]},
                    "logprobs": None, "finish_reason": None}])
            finish = "tool_calls"
        else:
            words = [reply_tokens(text, k, i) for i in range(n)]
            for t in range(k):
                if delay:
                    await asyncio.sleep(delay)
                for i in range(n):
                    if chat:
                        yield event([{"index": i, "delta": {"content": words[i][t]},
                                      "logprobs": None, "finish_reason": None}])
                    else:
                        yield event([{"index": i, "text": words[i][t], "logprobs": None,
                                      "finish_reason": None}])
        for i in range(n):
            if chat:
                yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
            else:
                yield event([{"index": i, "text": "", "logprobs": None, "finish_reason": finish}])
        if usage_on:
            p = _count_tokens(text)
            c = (len(call["function"]["arguments"]) // 4 + 1) if call else k * n
            yield event([], {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c})
        yield b"data: [DONE]\n\n"
