"""HTTP adapter for the Anthropic Messages API: OpenAI chat in, OpenAI chat out (aiohttp client)."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import orjson

from gateway.errors import (
    BadGateway,
    GatewayError,
    InvalidRequest,
)
from gateway.providers.anthropic import translate
from gateway.providers.anthropic.stream import StreamTranslator
from gateway.providers.base import Reply, UpstreamRequest, UpstreamStream
from gateway.providers.http import HttpProvider, finish, read_chunk
from gateway.settings import ProviderSettings

log = logging.getLogger("tollway.providers.anthropic")


class _Stream:
    """Translated OpenAI SSE bytes as Anthropic events arrive; transport failures → GatewayErrors."""

    __slots__ = ("_pending", "_provider", "_resp", "_tr")

    def __init__(
        self, resp: aiohttp.ClientResponse, tr: StreamTranslator, provider: str, first: bytes
    ) -> None:
        self._resp = resp
        self._tr = tr
        self._provider = provider
        self._pending = first

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        if self._pending:
            out, self._pending = self._pending, b""
            return out
        tr = self._tr
        while not tr.finished:
            data = await read_chunk(self._resp, self._provider)
            out = tr.feed(data) if data else tr.end()
            if out:
                return out
            if not data:
                break
        raise StopAsyncIteration

    @property
    def cache_write_tokens(self) -> int:
        """Prompt tokens written to Anthropic's prompt cache (from the latest usage counts)."""
        return translate.cache_write_tokens(self._tr.usage)

    async def aclose(self) -> None:
        finish(self._resp)


class AnthropicAdapter(HttpProvider):
    """kind anthropic: POST {api_base}/v1/messages with the gateway's x-api-key."""

    def __init__(self, name: str, settings: ProviderSettings) -> None:
        headers: dict[str, str] = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "anthropic-version": settings.anthropic_version,
        }
        key = settings.api_key.get_secret_value() if settings.api_key else None
        if key:
            headers["x-api-key"] = key
        super().__init__(name, settings, headers)  # settings.headers: e.g. anthropic-beta
        assert settings.api_base is not None
        self._url = settings.api_base + translate.MESSAGES_PATH

    def _body(self, req: UpstreamRequest) -> bytes:
        if req.endpoint != "chat":
            what = {"completions": "legacy completions", "embeddings": "embeddings"}.get(
                req.endpoint, req.endpoint
            )
            raise InvalidRequest(
                f"The model {req.upstream_model} is served by Anthropic, which has no {what} endpoint; "
                "use /v1/chat/completions.",
                param="model",
                code="model_not_supported",
            )
        body = translate.to_anthropic_request(
            req.body,
            model=req.upstream_model,
            default_max_tokens=self.settings.default_max_tokens,
            anthropic_version=self.settings.anthropic_version,
            stream=req.stream,
        )
        return orjson.dumps(body)

    async def _error_from(self, resp: aiohttp.ClientResponse) -> GatewayError:
        raw = await self._read_error_body(resp)
        log.info(
            "provider %s: HTTP %s (request-id %s)", self.name, resp.status, resp.headers.get("request-id")
        )
        return translate.upstream_error(self.name, resp.status, raw, resp.headers)

    async def complete(self, req: UpstreamRequest) -> Reply:
        data = self._body(req)
        resp = await self._post(self._url, req, data, {})
        if resp.status >= 400:
            raise await self._error_from(resp)
        raw = await self._read_body(resp)
        try:
            msg: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise translate.invalid_reply(self.name, f"HTTP {resp.status}, not JSON") from None
        parsed = translate.to_openai_response(
            msg, created=int(time.time()), model=req.upstream_model, provider=self.name
        )
        usage = msg.get("usage") if isinstance(msg, dict) else None
        return Reply(
            status=200, body=orjson.dumps(parsed), parsed=parsed,
            cache_write_tokens=translate.cache_write_tokens(usage),
        )

    async def open_stream(self, req: UpstreamRequest) -> UpstreamStream:
        """Returns once the answer has begun (a content block started, or the message ended):
        `message_start` and `ping` alone do not count, so an `error` event that arrives before
        any content (an overload right after the 200) is raised here, where the router can still
        retry, and the router's time-to-first-byte limit covers a stream that only pings."""
        data = self._body(req)
        resp = await self._post(self._url, req, data, {"Accept": "text/event-stream"})
        if resp.status >= 400:
            raise await self._error_from(resp)
        ctype = resp.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            resp.close()
            raise BadGateway(
                f"provider {self.name} answered a streaming request with {ctype or 'no type'}",
                code="upstream_invalid_response",
            )
        so = req.body.get("stream_options")
        # The gateway asks every upstream for usage (its own accounting); whether the client did
        # decides the `"usage": null` fields (the router says so; its relay drops the usage chunk).
        usage = isinstance(so, dict) and so.get("include_usage") is True
        client_usage = getattr(req, "client_wants_usage", None)
        tr = StreamTranslator(
            provider=self.name,
            model=req.upstream_model,
            created=int(time.time()),
            include_usage=usage if not isinstance(client_usage, bool) else client_usage,
            usage_chunk=usage,
        )
        try:
            first = b""
            while not tr.started and not tr.finished:
                chunk = await read_chunk(resp, self.name)
                first += tr.feed(chunk) if chunk else tr.end()
                if tr.error is not None and not tr.started:
                    raise tr.error
        except BaseException:
            resp.close()
            raise
        return _Stream(resp, tr, self.name, first)
