"""HTTP adapter for the Anthropic Messages API: OpenAI chat in, OpenAI chat out (aiohttp client)."""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import orjson

from gateway import __version__
from gateway.errors import (
    BadGateway,
    GatewayError,
    InvalidRequest,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.anthropic import translate
from gateway.providers.anthropic.stream import StreamTranslator
from gateway.providers.base import Provider, Reply, UpstreamRequest, UpstreamStream
from gateway.settings import ProviderSettings, Timeouts

log = logging.getLogger("tollway.providers.anthropic")


def _transport_error(provider: str, e: BaseException, stage: str) -> GatewayError:
    """The client learns what failed, not where: addresses and exception text stay in our log."""
    log.warning("provider %s: failed %s: %s: %s", provider, stage, type(e).__name__, e)
    if isinstance(e, TimeoutError):
        return UpstreamTimeout(f"The upstream provider {provider} timed out {stage}.")
    if isinstance(e, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"The upstream provider {provider} could not be reached.")
    return BadGateway(f"The connection to the upstream provider {provider} broke {stage}.")


def _client_timeouts(t: Timeouts) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
    """(non-streaming, streaming): connect; idle read, which also bounds the time to the first byte;
    a total only for a whole non-streaming call (a healthy stream may last many minutes)."""
    return (
        aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.read_s),
        aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.read_s),
    )


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
            try:
                data = await self._resp.content.readany()
            except (TimeoutError, aiohttp.ClientError) as e:
                raise _transport_error(self._provider, e, "mid-stream") from e
            out = tr.feed(data) if data else tr.end()
            if out:
                return out
            if not data:
                break
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if self._resp.content.is_eof():
            self._resp.release()
        else:
            self._resp.close()  # abandoned, failed or finished early: drop the connection


class AnthropicAdapter(Provider):
    """kind anthropic: POST {api_base}/v1/messages with the gateway's x-api-key."""

    def __init__(self, name: str, settings: ProviderSettings) -> None:
        super().__init__(name)
        self.settings = settings
        assert settings.api_base is not None
        self._url = settings.api_base + translate.MESSAGES_PATH
        headers: dict[str, str] = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"tollway/{__version__}",
            "anthropic-version": settings.anthropic_version,
        }
        key = settings.api_key.get_secret_value() if settings.api_key else None
        if key:
            headers["x-api-key"] = key
        headers.update(settings.headers)  # e.g. anthropic-beta
        self._headers = headers
        self._timeouts = _client_timeouts(settings.timeouts)
        self._dep_timeouts: dict[int, tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeouts[0], auto_decompress=True
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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

    async def _post(self, req: UpstreamRequest, data: bytes) -> aiohttp.ClientResponse:
        session = self._session
        if session is None:
            raise UpstreamUnavailable(f"provider {self.name} is not started")
        headers = dict(self._headers)
        if req.stream:
            headers["Accept"] = "text/event-stream"
        pair = self._timeouts
        if req.timeouts is not None:  # the deployment's own timeouts
            pair = self._dep_timeouts.get(id(req.timeouts)) or self._dep_timeouts.setdefault(
                id(req.timeouts), _client_timeouts(req.timeouts)
            )
        try:
            return await session.post(
                self._url, data=data, headers=headers, timeout=pair[1] if req.stream else pair[0]
            )
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _transport_error(self.name, e, "before responding") from e

    async def _error_from(self, resp: aiohttp.ClientResponse) -> GatewayError:
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        finally:
            resp.release()
        log.info(
            "provider %s: HTTP %s (request-id %s)", self.name, resp.status, resp.headers.get("request-id")
        )
        return translate.upstream_error(self.name, resp.status, raw, resp.headers)

    async def complete(self, req: UpstreamRequest) -> Reply:
        data = self._body(req)
        resp = await self._post(req, data)
        try:
            if resp.status >= 400:
                raise await self._error_from(resp)
            try:
                raw = await resp.read()
            except (TimeoutError, aiohttp.ClientError) as e:
                raise _transport_error(self.name, e, "while sending its answer") from e
        except BaseException:
            resp.close()
            raise
        resp.release()
        try:
            msg: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise translate.invalid_reply(self.name, f"HTTP {resp.status}, not JSON") from None
        parsed = translate.to_openai_response(
            msg, created=int(time.time()), model=req.upstream_model, provider=self.name
        )
        return Reply(status=200, body=orjson.dumps(parsed), parsed=parsed)

    async def open_stream(self, req: UpstreamRequest) -> UpstreamStream:
        """Returns once the first OpenAI chunk is ready, so an `error` event that arrives before any
        output (an overload right after the 200) is raised here, where the router can still retry."""
        data = self._body(req)
        resp = await self._post(req, data)
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
        tr = StreamTranslator(
            provider=self.name,
            model=req.upstream_model,
            created=int(time.time()),
            include_usage=isinstance(so, dict) and so.get("include_usage") is True,
        )
        try:
            first = b""
            while not first and not tr.finished:
                try:
                    chunk = await resp.content.readany()
                except (TimeoutError, aiohttp.ClientError) as e:
                    raise _transport_error(self.name, e, "before its first event") from e
                first = tr.feed(chunk) if chunk else tr.end()
                if tr.error is not None and tr.chunks == 0:
                    raise tr.error
        except BaseException:
            resp.close()
            raise
        return _Stream(resp, tr, self.name, first)
