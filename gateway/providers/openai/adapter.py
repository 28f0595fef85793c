"""HTTP adapter for OpenAI, Azure OpenAI and OpenAI-compatible upstreams (aiohttp client)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import orjson

from gateway import __version__
from gateway.errors import BadGateway, GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.providers.base import Provider, Reply, UpstreamRequest, UpstreamStream
from gateway.providers.openai import translate
from gateway.settings import ProviderSettings, Timeouts

log = logging.getLogger("tollway.providers.openai")


def _transport_error(provider: str, e: BaseException, stage: str) -> GatewayError:
    """The client learns what failed, not where: addresses and exception text stay in our log."""
    log.warning("provider %s: %s %s: %s: %s", provider, "failed", stage, type(e).__name__, e)
    if isinstance(e, TimeoutError):
        return UpstreamTimeout(f"The upstream provider {provider} timed out {stage}.")
    if isinstance(e, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"The upstream provider {provider} could not be reached.")
    return BadGateway(f"The connection to the upstream provider {provider} broke {stage}.")


def client_timeouts(t: Timeouts) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
    """aiohttp timeouts (non-streaming, streaming): connect; idle read (which also bounds the time
    to the first byte); total for a whole non-streaming call only."""
    return (
        aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.read_s),
        aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.read_s),
    )


class _Stream:
    """Upstream SSE bytes as they arrive; maps transport failures to GatewayErrors."""

    __slots__ = ("_provider", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse, provider: str) -> None:
        self._resp = resp
        self._provider = provider

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._resp.content.readany()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _transport_error(self._provider, e, "mid-stream") from e
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        if self._resp.content.is_eof():
            self._resp.release()
        else:
            self._resp.close()  # abandoned or broken: drop the connection, stop the generation


class OpenAIAdapter(Provider):
    """kinds openai, openai_compatible and azure: same wire format, different URL and auth."""

    def __init__(self, name: str, settings: ProviderSettings) -> None:
        super().__init__(name)
        self.settings = settings
        self.kind = settings.kind
        assert settings.api_base is not None
        self._base = settings.api_base
        headers: dict[str, str] = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"tollway/{__version__}",
        }
        key = settings.api_key.get_secret_value() if settings.api_key else None
        if key:
            if settings.kind == "azure":
                headers["api-key"] = key
            elif settings.kind == "openai":
                headers["Authorization"] = f"Bearer {key}"
            else:
                scheme = settings.auth_scheme
                headers[settings.auth_header] = f"{scheme} {key}" if scheme else key
        headers.update(settings.headers)
        self._headers = headers
        self._timeout, self._stream_timeout = client_timeouts(settings.timeouts)
        self._dep_timeouts: dict[int, tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], str] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            auto_decompress=True,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _url(self, req: UpstreamRequest) -> str:
        k = (req.endpoint, req.upstream_model)
        url = self._urls.get(k)
        if url is None:
            if self.kind == "azure":
                assert self.settings.api_version is not None
                url = translate.azure_url(
                    self._base, req.upstream_model, req.endpoint, self.settings.api_version
                )
            else:
                url = translate.openai_url(self._base, req.endpoint)
            if len(self._urls) < 4096:
                self._urls[k] = url
        return url

    def _prepare(self, req: UpstreamRequest) -> tuple[bytes, bool]:
        """The body to send, and whether the gateway must encode base64 embeddings itself."""
        body = req.body
        encode_b64 = False
        if (
            req.endpoint == "embeddings"
            and not self.settings.supports_base64_embeddings
            and body.get("encoding_format") == "base64"
        ):
            body = {**body, "encoding_format": "float"}
            encode_b64 = True
        return orjson.dumps(body), encode_b64

    async def _post(self, req: UpstreamRequest, data: bytes) -> aiohttp.ClientResponse:
        session = self._session
        if session is None:
            raise UpstreamUnavailable(f"provider {self.name} is not started")
        headers = dict(self._headers)
        headers["X-Request-Id"] = req.request_id
        if req.timeouts is None:
            timeout = self._stream_timeout if req.stream else self._timeout
        else:
            pair = self._dep_timeouts.get(id(req.timeouts))
            if pair is None:
                pair = self._dep_timeouts[id(req.timeouts)] = client_timeouts(req.timeouts)
            timeout = pair[1] if req.stream else pair[0]
        try:
            return await session.post(self._url(req), data=data, headers=headers, timeout=timeout)
        except (TimeoutError, aiohttp.ClientError) as e:
            raise _transport_error(self.name, e, "before responding") from e

    async def _error_from(self, resp: aiohttp.ClientResponse) -> GatewayError:
        try:
            raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            raw = b""
        finally:
            resp.release()
        passed = {h: resp.headers[h] for h in translate.PASSED_ERROR_HEADERS if h in resp.headers}
        return translate.upstream_error(self.name, resp.status, raw, passed)

    async def complete(self, req: UpstreamRequest) -> Reply:
        data, encode_b64 = self._prepare(req)
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
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise translate.invalid_json_reply(self.name, resp.status) from None
        if not isinstance(parsed, dict):
            raise translate.invalid_json_reply(self.name, resp.status)
        if encode_b64:
            raw = translate.floats_to_base64(parsed)
        return Reply(status=resp.status, body=raw, parsed=parsed)

    async def open_stream(self, req: UpstreamRequest) -> UpstreamStream:
        data, _ = self._prepare(req)
        resp = await self._post(req, data)
        if resp.status >= 400:
            raise await self._error_from(resp)
        ctype = resp.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            # Some servers ignore `stream` and answer with plain JSON: a protocol error here.
            resp.close()
            raise BadGateway(
                f"provider {self.name} answered a streaming request with {ctype or 'no type'}",
                code="upstream_invalid_response",
            )
        return _Stream(resp, self.name)

