"""A fake OpenAI-compatible upstream for tests (yours and plugin authors').

It listens on 127.0.0.1 (random port), answers the OpenAI routes with realistic, deterministic
bodies, records every request it receives, and can be scripted to fail, stall, stream slowly,
cut a stream or hang::

    async with FakeUpstream() as fake:
        fake.enqueue(Behaviour(status=429, headers={"retry-after": "7"}))
        ...  # point a client or the gateway at fake.base_url
        assert fake.requests[-1].body["model"] == "gpt-x"

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /v1/models/{id}`` and the Azure data-plane forms
``POST /openai/deployments/{deployment}/{chat/completions|completions|embeddings}``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict, MultiDict

from gateway.testing.loopback import LoopbackFake

__all__ = [
    "DEFAULT_REPLY",
    "Behaviour",
    "FakeUpstream",
    "RecordedRequest",
    "embedding_for",
    "reply_for",
    "tokenize",
]

DEFAULT_REPLY: Final = "Hello from the fake upstream. This reply is deterministic."
"""The text of choice 0 of every chat/completion reply unless a Behaviour says otherwise."""

CREATED: Final = 1_732_000_000
FINGERPRINT: Final = "fp_fake0001"
DEFAULT_EMBEDDING_DIMS: Final = 8
HANG_LIMIT_S: Final = 600.0
"""A 'hanging' handler gives up on its own after this long (it is normally cancelled first)."""

_WORDS: Final = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_TOKEN_RE: Final = re.compile(r"\s*\S+|\s+")

Endpoint = Literal["chat", "completions", "embeddings", "models"]


@dataclass(frozen=True)
class Behaviour:
    """What the fake does for one request. All fields are optional; the default is a normal 200.

    * ``status``/``body``/``headers``: a status other than 200 returns ``body`` (default: an
      OpenAI error object for that status) as JSON. With status 200 a ``body`` replaces the
      generated response of a non-streaming request. ``headers`` are added to any response.
    * ``raw_body`` (+ ``content_type``): send these bytes as they are (e.g. invalid JSON).
    * ``delay_s``: wait this long before sending anything (the handler can be cancelled there).
    * ``content``: the reply text of choice 0 (other choices get ``[i] `` in front).
    * ``stream_chunks``: number of content chunks in a stream. Without ``content`` the reply is
      then exactly that many words, one per chunk.
    * ``chunk_delay_s``: sleep before every SSE event after the first.
    * ``cut_after``: after this many SSE events, abort the TCP connection (broken chunked body).
      ``cut_after=0`` also works for non-streaming requests: the connection drops unanswered.
    * ``hang_after``: after this many SSE events, go silent until cancelled.
    * ``error_after``: after this many SSE events send ``data: {"error": ...}`` and end the body
      cleanly without ``[DONE]`` (what OpenAI-style servers do on a mid-stream failure).
    * ``write_size``: write each SSE event in pieces of this many bytes (a short pause between
      pieces), so the reader sees events — and UTF-8 characters — split across reads.
    * ``crlf``: frame SSE events with CRLF line endings instead of LF.
    * ``send_done``: False ends a complete stream cleanly but without ``data: [DONE]``.
    * ``echo``: reply ``echo: <text of the last message / the prompt>`` (see ``reply_for``).
    * ``tool_arguments``: the arguments object of generated tool calls.
    * ``tool_call_count``: how many tool calls a forced tool call produces (parallel calls).
    """

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None
    content_type: str = "application/json"
    delay_s: float = 0.0
    content: str | None = None
    stream_chunks: int | None = None
    chunk_delay_s: float = 0.0
    cut_after: int | None = None
    hang_after: int | None = None
    error_after: int | None = None
    tool_arguments: dict[str, Any] | None = None
    tool_call_count: int = 1
    write_size: int | None = None
    crlf: bool = False
    send_done: bool = True
    echo: bool = False


@dataclass
class RecordedRequest:
    """One request as the fake saw it, and what became of its handler."""

    method: str
    path: str
    query: MultiDict[str]
    headers: CIMultiDict[str]
    endpoint: Endpoint
    deployment: str | None
    """Azure route only: the deployment name from the path."""
    arrived_at: float
    """time.monotonic() when the handler started."""
    raw_body: bytes = b""
    body: Any = None
    """The parsed JSON body (None if there was none or it did not parse)."""
    behaviour: Behaviour | None = None
    status: int | None = None
    peer: tuple[str, int] | None = None
    """The client's (host, port): two requests with the same peer shared a connection."""
    events_sent: int = 0
    """SSE events written so far (streams only; [DONE] not counted)."""
    done_sent: bool = False
    cut: bool = False
    cancelled: bool = False
    cancelled_at: float | None = None
    disconnected: bool = False
    """A write failed because the peer had gone away."""
    disconnected_at: float | None = None
    finished_at: float | None = None
    _finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def api_version(self) -> str | None:
        return self.query.get("api-version")

    @property
    def client_gone(self) -> bool:
        """The handler was cancelled or saw the client (the gateway) disconnect."""
        return self.cancelled or self.disconnected

    @property
    def client_gone_at(self) -> float | None:
        times = [t for t in (self.cancelled_at, self.disconnected_at) if t is not None]
        return min(times) if times else None

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    async def wait_finished(self, timeout_s: float = 5.0) -> None:
        """Wait until the handler has ended one way or another."""
        await asyncio.wait_for(self._finished.wait(), timeout_s)


def tokenize(text: str) -> list[str]:
    """Split text into word-ish tokens with their leading spaces; ''.join(tokens) == text."""
    return _TOKEN_RE.findall(text)


def _count_tokens(value: Any) -> int:
    """A rough deterministic token count of any JSON value's strings."""
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, int) and not isinstance(value, bool):
        return 1
    if isinstance(value, list):
        return sum(_count_tokens(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_tokens(v) for k, v in value.items() if k not in ("role", "type"))
    return 0


def _last_text(body: dict[str, Any] | None) -> str:
    """The text the fake echoes: the last message's text, or the (first) prompt."""
    if not body:
        return ""
    msgs = body.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict):
        content = msgs[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p)
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else ""


def reply_for(index: int = 0, behaviour: Behaviour | None = None, body: dict[str, Any] | None = None) -> str:
    """The reply text the fake generates for choice `index` under `behaviour` for request
    `body` (the body matters only with ``Behaviour(echo=True)``)."""
    b = behaviour or Behaviour()
    if b.echo:
        base = f"echo: {_last_text(body)}"
    elif b.content is not None:
        base = b.content
    elif b.stream_chunks is not None:
        base = " ".join(_WORDS[i % len(_WORDS)] for i in range(b.stream_chunks))
    else:
        base = DEFAULT_REPLY
    return base if index == 0 else f"[{index}] {base}"


def _split_pieces(text: str, k: int | None) -> list[str]:
    """Split text into pieces: one per token, or exactly k pieces when k is given."""
    tokens = tokenize(text)
    if k is None or k <= 0:
        return tokens or [""]
    if len(tokens) >= k:
        size, extra = divmod(len(tokens), k)
        out: list[str] = []
        pos = 0
        for i in range(k):
            n = size + (1 if i < extra else 0)
            out.append("".join(tokens[pos : pos + n]))
            pos += n
        return out
    if len(text) >= k:
        size, extra = divmod(len(text), k)
        out = []
        pos = 0
        for i in range(k):
            n = size + (1 if i < extra else 0)
            out.append(text[pos : pos + n])
            pos += n
        return out
    return [text] + [""] * (k - 1)


def embedding_for(text: str, model: str, dims: int = DEFAULT_EMBEDDING_DIMS) -> list[float]:
    """The deterministic vector the fake returns for one input (exact in float32)."""
    out: list[float] = []
    counter = 0
    while len(out) < dims:
        digest = hashlib.sha256(f"{model}\x00{counter}\x00{text}".encode()).digest()
        out.extend((b - 128) / 128.0 for b in digest)
        counter += 1
    return out[:dims]


def _error_body(status: int) -> dict[str, Any]:
    kinds: dict[int, tuple[str, str | None, str]] = {
        400: ("invalid_request_error", None, "Invalid request (fake upstream)."),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        403: ("invalid_request_error", None, "Forbidden (fake upstream)."),
        404: ("invalid_request_error", "model_not_found", "The model does not exist."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached (fake upstream)."),
    }
    etype, code, message = kinds.get(
        status,
        ("server_error", None, f"The fake upstream failed with status {status}."),
    )
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _CutStream(Exception):
    """Internal: the scripted stream cut happened."""


class FakeUpstream(LoopbackFake[Behaviour, RecordedRequest]):
    """An OpenAI look-alike on 127.0.0.1; see the module docstring. `url` is the Azure resource URL."""

    def __init__(self, *, models: list[str] | None = None, shutdown_timeout_s: float = 0.5) -> None:
        super().__init__(Behaviour(), shutdown_timeout_s=shutdown_timeout_s)
        self.models: list[str] = models if models is not None else ["fake-model-1", "fake-embed-1"]
        """Ids listed by GET /v1/models."""
        self._new_request = asyncio.Condition()
        app = self.app
        for prefix in ("/v1", "/openai/deployments/{deployment}"):
            app.router.add_post(f"{prefix}/chat/completions", self._chat)
            app.router.add_post(f"{prefix}/completions", self._completions)
            app.router.add_post(f"{prefix}/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model:.+}", self._model)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` (an OpenAI base URL)."""
        return f"{self.url}/v1"

    # ---------------------------------------------------------------- scripting

    async def wait_for_requests(self, count: int, timeout_s: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least `count` requests have arrived; return them all."""
        async with self._new_request:
            await asyncio.wait_for(self._new_request.wait_for(lambda: len(self.requests) >= count), timeout_s)
        return list(self.requests)


    # ---------------------------------------------------------------- handlers

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "embeddings")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "models")

    async def _model(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "models")

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        rec = RecordedRequest(
            method=request.method,
            path=request.path,
            query=MultiDict(request.query),
            headers=CIMultiDict(request.headers),
            endpoint=endpoint,
            deployment=request.match_info.get("deployment"),
            arrived_at=time.monotonic(),
        )
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if isinstance(peer, tuple) and len(peer) >= 2:
            rec.peer = (str(peer[0]), int(peer[1]))
        behaviour = self.next_behaviour()
        rec.behaviour = behaviour
        self.requests.append(rec)
        async with self._new_request:
            self._new_request.notify_all()
        try:
            if request.can_read_body:
                rec.raw_body = await request.read()
                try:
                    rec.body = orjson.loads(rec.raw_body)
                except orjson.JSONDecodeError:
                    rec.body = None
            if behaviour.delay_s > 0:
                await asyncio.sleep(behaviour.delay_s)
            if behaviour.cut_after == 0 and not (isinstance(rec.body, dict) and rec.body.get("stream")):
                rec.cut = True
                if request.transport is not None:
                    request.transport.abort()
                await asyncio.sleep(HANG_LIMIT_S)  # cancelled once aiohttp sees the abort
            return await self._respond(request, rec, behaviour)
        except asyncio.CancelledError:
            if not rec.cut:  # after a scripted cut the cancellation is our own doing
                rec.cancelled = True
                rec.cancelled_at = time.monotonic()
            raise
        finally:
            rec.finished_at = time.monotonic()
            rec._finished.set()

    async def _respond(self, request: web.Request, rec: RecordedRequest, b: Behaviour) -> web.StreamResponse:
        headers = {
            "x-request-id": f"req_fakeupstream{next(self._ids)}",
            "openai-processing-ms": "3",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-reset-requests": "6ms",
        }
        headers.update(b.headers)
        if b.raw_body is not None:
            rec.status = b.status
            return web.Response(
                status=b.status, body=b.raw_body, headers=headers, content_type=b.content_type
            )
        if b.status != 200:
            rec.status = b.status
            body = b.body if b.body is not None else _error_body(b.status)
            return self._json(body, b.status, headers)
        if rec.endpoint == "models":
            wanted = request.match_info.get("model")
            if wanted is not None and wanted not in self.models:
                return self._json(_error_body(404), 404, headers, rec)
            return self._json(self._models_body(wanted), 200, headers, rec)

        if not isinstance(rec.body, dict):
            return self._json(_error_body(400), 400, headers, rec)
        req: dict[str, Any] = rec.body
        # Azure ignores the body's model: the deployment decides.
        model = rec.deployment or str(req.get("model") or "fake-model")
        if rec.endpoint == "embeddings":
            return self._json(b.body or self._embeddings_body(req, model), 200, headers, rec)
        if req.get("stream"):
            return await self._stream(request, rec, b, req, model, headers)
        if b.body is not None:
            return self._json(b.body, 200, headers, rec)
        if rec.endpoint == "chat":
            return self._json(self._chat_body(req, model, b), 200, headers, rec)
        return self._json(self._completion_body(req, model, b), 200, headers, rec)

    @staticmethod
    def _json(
        body: Any, status: int, headers: dict[str, str], rec: RecordedRequest | None = None
    ) -> web.Response:
        if rec is not None:
            rec.status = status
        return web.Response(
            status=status, body=orjson.dumps(body), headers=headers, content_type="application/json"
        )

    # ---------------------------------------------------------------- bodies

    def _models_body(self, wanted: str | None) -> dict[str, Any]:
        def obj(mid: str) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": CREATED, "owned_by": "fake-upstream"}

        if wanted is not None:
            return obj(wanted)
        return {"object": "list", "data": [obj(m) for m in self.models]}

    @staticmethod
    def _n(req: dict[str, Any]) -> int:
        n = req.get("n")
        return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1

    def _usage(self, req: dict[str, Any], completion_texts: list[str]) -> dict[str, Any]:
        prompt_tokens = _count_tokens(req.get("messages", req.get("prompt", req.get("input", ""))))
        completion_tokens = sum(len(tokenize(t)) for t in completion_texts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    @staticmethod
    def _forced_tools(req: dict[str, Any]) -> list[dict[str, Any]]:
        """The tools the request forces a call to (empty when the model may answer in text)."""
        tools = [
            t["function"]
            for t in req.get("tools") or []
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        choice = req.get("tool_choice")
        if not tools:
            return []
        if choice == "required":
            return tools
        if isinstance(choice, dict):
            fn = choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            return [t for t in tools if t.get("name") == name][:1]
        return []

    def _tool_calls(self, req: dict[str, Any], b: Behaviour, call_id_prefix: str) -> list[dict[str, Any]]:
        forced = self._forced_tools(req)
        if not forced:
            return []
        calls = []
        for i in range(max(1, b.tool_call_count)):
            fn = forced[i % len(forced)]
            args = b.tool_arguments if b.tool_arguments is not None else _args_for(fn)
            calls.append(
                {
                    "id": f"call_{call_id_prefix}_{i}",
                    "type": "function",
                    "function": {
                        "name": str(fn.get("name", "")),
                        "arguments": orjson.dumps(args).decode(),
                    },
                }
            )
        return calls

    @staticmethod
    def _chat_logprobs(text: str, top: int) -> dict[str, Any]:
        content = []
        for i, tok in enumerate(tokenize(text)):
            lp = -0.01 * (i + 1)
            content.append(
                {
                    "token": tok,
                    "logprob": lp,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {
                            "token": tok if j == 0 else f"{tok}~{j}",
                            "logprob": lp - j,
                            "bytes": list((tok if j == 0 else f"{tok}~{j}").encode()),
                        }
                        for j in range(top)
                    ],
                }
            )
        return {"content": content, "refusal": None}

    def _chat_body(self, req: dict[str, Any], model: str, b: Behaviour) -> dict[str, Any]:
        cid = f"chatcmpl-fake{next(self._ids)}"
        n = self._n(req)
        want_logprobs = req.get("logprobs") is True
        top = req.get("top_logprobs") if isinstance(req.get("top_logprobs"), int) else 0
        choices = []
        texts: list[str] = []
        for i in range(n):
            calls = self._tool_calls(req, b, f"{cid}_{i}")
            if calls:
                message: dict[str, Any] = {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "annotations": [],
                    "tool_calls": calls,
                }
                finish = "tool_calls"
                texts.extend(c["function"]["arguments"] for c in calls)
                logprobs = None
            else:
                text = reply_for(i, b, req)
                texts.append(text)
                message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
                finish = "stop"
                logprobs = self._chat_logprobs(text, int(top or 0)) if want_logprobs else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {
            "id": cid,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "service_tier": "default",
            "choices": choices,
            "usage": self._usage(req, texts),
        }

    @staticmethod
    def _prompts(req: dict[str, Any]) -> int:
        prompt = req.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            return len(prompt)
        return 1

    def _completion_body(self, req: dict[str, Any], model: str, b: Behaviour) -> dict[str, Any]:
        n = self._n(req) * self._prompts(req)
        texts = [reply_for(i, b, req) for i in range(n)]
        lp = req.get("logprobs")
        choices = []
        for i, text in enumerate(texts):
            logprobs: dict[str, Any] | None = None
            if isinstance(lp, int) and not isinstance(lp, bool):
                toks = tokenize(text)
                offsets = list(itertools.accumulate([0] + [len(t) for t in toks[:-1]]))
                logprobs = {
                    "tokens": toks,
                    "token_logprobs": [-0.01 * (k + 1) for k in range(len(toks))],
                    "top_logprobs": [{t: -0.01 * (k + 1)} for k, t in enumerate(toks)],
                    "text_offset": offsets,
                }
            choices.append({"text": text, "index": i, "logprobs": logprobs, "finish_reason": "stop"})
        return {
            "id": f"cmpl-fake{next(self._ids)}",
            "object": "text_completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": self._usage(req, texts),
        }

    def _embeddings_body(self, req: dict[str, Any], model: str) -> dict[str, Any]:
        raw = req.get("input", "")
        items: list[Any]
        if isinstance(raw, str):
            items = [raw]
        elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
            items = [raw]  # one token array
        elif isinstance(raw, list):
            items = list(raw)
        else:
            items = [raw]
        dims = req.get("dimensions")
        dims = dims if isinstance(dims, int) and dims > 0 else DEFAULT_EMBEDDING_DIMS
        b64 = req.get("encoding_format") == "base64"
        data = []
        for i, item in enumerate(items):
            text = item if isinstance(item, str) else orjson.dumps(item).decode()
            vec = embedding_for(text, model, dims)
            emb: list[float] | str = (
                base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if b64 else vec
            )
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = _count_tokens(items)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ---------------------------------------------------------------- streaming

    def _chat_events(
        self, req: dict[str, Any], model: str, b: Behaviour, include_usage: bool
    ) -> Iterator[dict[str, Any]]:
        cid = f"chatcmpl-fake{next(self._ids)}"
        n = self._n(req)
        want_logprobs = req.get("logprobs") is True

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": choices,
            }
            if include_usage:
                c["usage"] = None
            return c

        def choice(
            i: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None
        ) -> dict[str, Any]:
            return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

        per_choice: list[list[dict[str, Any]]] = []
        texts: list[str] = []
        for i in range(n):
            events: list[dict[str, Any]] = []
            calls = self._tool_calls(req, b, f"{cid}_{i}")
            if calls:
                events.append(choice(i, {"role": "assistant", "content": None, "refusal": None}))
                for k, call in enumerate(calls):
                    args = call["function"]["arguments"]
                    texts.append(args)
                    events.append(
                        choice(
                            i,
                            {
                                "tool_calls": [
                                    {
                                        "index": k,
                                        "id": call["id"],
                                        "type": "function",
                                        "function": {
                                            "name": call["function"]["name"],
                                            "arguments": "",
                                        },
                                    }
                                ]
                            },
                        )
                    )
                    for frag in _fragments(args, b.stream_chunks):
                        events.append(
                            choice(i, {"tool_calls": [{"index": k, "function": {"arguments": frag}}]})
                        )
                events.append(choice(i, {}, "tool_calls"))
            else:
                text = reply_for(i, b, req)
                texts.append(text)
                events.append(choice(i, {"role": "assistant", "content": "", "refusal": None}))
                for piece in _split_pieces(text, b.stream_chunks):
                    lp = self._chat_logprobs(piece, 0) if want_logprobs else None
                    events.append(choice(i, {"content": piece}, logprobs=lp))
                events.append(choice(i, {}, "stop"))
            per_choice.append(events)
        for group in itertools.zip_longest(*per_choice):
            for ev in group:
                if ev is not None:
                    yield chunk([ev])
        if include_usage:
            last = chunk([])
            last["usage"] = self._usage(req, texts)
            yield last

    def _completion_events(
        self, req: dict[str, Any], model: str, b: Behaviour, include_usage: bool
    ) -> Iterator[dict[str, Any]]:
        cid = f"cmpl-fake{next(self._ids)}"
        n = self._n(req) * self._prompts(req)

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            c: dict[str, Any] = {
                "id": cid,
                "object": "text_completion",
                "created": CREATED,
                "model": model,
                "system_fingerprint": FINGERPRINT,
                "choices": choices,
            }
            if include_usage:
                c["usage"] = None
            return c

        texts = [reply_for(i, b, req) for i in range(n)]
        per_choice = []
        for i, text in enumerate(texts):
            events = [
                {"text": p, "index": i, "logprobs": None, "finish_reason": None}
                for p in _split_pieces(text, b.stream_chunks)
            ]
            events.append({"text": "", "index": i, "logprobs": None, "finish_reason": "stop"})
            per_choice.append(events)
        for group in itertools.zip_longest(*per_choice):
            for ev in group:
                if ev is not None:
                    yield chunk([ev])
        if include_usage:
            last = chunk([])
            last["usage"] = self._usage(req, texts)
            yield last

    async def _stream(
        self,
        request: web.Request,
        rec: RecordedRequest,
        b: Behaviour,
        req: dict[str, Any],
        model: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        opts = req.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        events = (
            self._chat_events(req, model, b, include_usage)
            if rec.endpoint == "chat"
            else self._completion_events(req, model, b, include_usage)
        )
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        rec.status = 200
        try:
            await resp.prepare(request)
            for ev in events:
                if await self._scripted_stop(request, rec, b, resp):
                    return resp
                if rec.events_sent > 0 and b.chunk_delay_s > 0:
                    await asyncio.sleep(b.chunk_delay_s)
                await _send(resp, _sse(ev), b)
                rec.events_sent += 1
            if await self._scripted_stop(request, rec, b, resp):
                return resp
            if b.send_done:
                await _send(resp, b"data: [DONE]\n\n", b)
                rec.done_sent = True
            await resp.write_eof()
        except _CutStream:
            return resp
        except ConnectionResetError:
            rec.disconnected = True
            rec.disconnected_at = time.monotonic()
        return resp

    async def _scripted_stop(
        self, request: web.Request, rec: RecordedRequest, b: Behaviour, resp: web.StreamResponse
    ) -> bool:
        """Apply cut/hang/error scripting before the next event; True when the stream ended."""
        sent = rec.events_sent
        if b.cut_after is not None and sent >= b.cut_after:
            rec.cut = True
            if request.transport is not None:
                request.transport.abort()
            # handler_cancellation cancels us as soon as aiohttp sees the connection lost.
            await asyncio.sleep(HANG_LIMIT_S)
            raise _CutStream
        if b.hang_after is not None and sent >= b.hang_after:
            await asyncio.sleep(HANG_LIMIT_S)
            raise _CutStream
        if b.error_after is not None and sent >= b.error_after:
            err = (
                b.body
                if isinstance(b.body, dict) and "error" in b.body
                else {
                    "error": {
                        "message": "The fake upstream failed mid-stream.",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
            )
            await _send(resp, _sse(err), b)
            await resp.write_eof()
            return True
        return False


async def _send(resp: web.StreamResponse, event: bytes, b: Behaviour) -> None:
    """Write one SSE event as the behaviour says (framing, split writes)."""
    if b.crlf:
        event = event.replace(b"\n", b"\r\n")
    if not b.write_size or b.write_size <= 0:
        await resp.write(event)
        return
    for i in range(0, len(event), b.write_size):
        await resp.write(event[i : i + b.write_size])
        await asyncio.sleep(0.001)


def _fragments(s: str, k: int | None) -> list[str]:
    """Split a JSON arguments string into fragments, deliberately not on token boundaries."""
    if k is not None and k > 0:
        return [p for p in _split_pieces_chars(s, k) if p]
    size = 5
    return [s[i : i + size] for i in range(0, len(s), size)] or [""]


def _split_pieces_chars(s: str, k: int) -> list[str]:
    k = min(k, max(1, len(s)))
    size, extra = divmod(len(s), k)
    out, pos = [], 0
    for i in range(k):
        n = size + (1 if i < extra else 0)
        out.append(s[pos : pos + n])
        pos += n
    return out


def _args_for(fn: dict[str, Any]) -> dict[str, Any]:
    """Plausible arguments for a function from its JSON-schema parameters."""
    params = fn.get("parameters")
    props = params.get("properties") if isinstance(params, dict) else None
    if not isinstance(props, dict):
        return {}
    out: dict[str, Any] = {}
    for name, schema in props.items():
        kind = schema.get("type") if isinstance(schema, dict) else None
        enum = schema.get("enum") if isinstance(schema, dict) else None
        if isinstance(enum, list) and enum:
            out[name] = enum[0]
        elif kind == "integer":
            out[name] = 42
        elif kind == "number":
            out[name] = 1.5
        elif kind == "boolean":
            out[name] = True
        elif kind == "array":
            out[name] = []
        elif kind == "object":
            out[name] = {}
        else:
            out[name] = f'{name} value "quoted" é'
    return out
