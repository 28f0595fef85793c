"""HTTP adapter for OpenAI, Azure OpenAI and OpenAI-compatible upstreams (aiohttp client)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from gateway.errors import BadGateway, GatewayError
from gateway.providers.base import Reply, UpstreamRequest, UpstreamStream
from gateway.providers.http import HttpProvider, finish, read_chunk
from gateway.providers.openai import translate
from gateway.settings import ProviderSettings


class _Stream:
    """Upstream SSE bytes as they arrive, unchanged; transport failures as GatewayErrors."""

    __slots__ = ("_provider", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse, provider: str) -> None:
        self._resp = resp
        self._provider = provider

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> bytes:
        data = await read_chunk(self._resp, self._provider)
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        finish(self._resp)


class OpenAIAdapter(HttpProvider):
    """kinds openai, openai_compatible and azure: same wire format, different URL and auth."""

    def __init__(self, name: str, settings: ProviderSettings) -> None:
        headers: dict[str, str] = {"Content-Type": "application/json", "Accept": "application/json"}
        key = settings.api_key.get_secret_value() if settings.api_key else None
        if key:
            if settings.kind == "azure":
                headers["api-key"] = key
            elif settings.kind == "openai":
                headers["Authorization"] = f"Bearer {key}"
            else:
                scheme = settings.auth_scheme
                headers[settings.auth_header] = f"{scheme} {key}" if scheme else key
        super().__init__(name, settings, headers)
        self.kind = settings.kind
        assert settings.api_base is not None
        self._base = settings.api_base
        self._urls: dict[tuple[str, str], str] = {}

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

    async def _error_from(self, resp: aiohttp.ClientResponse) -> GatewayError:
        raw = await self._read_error_body(resp)
        passed = {h: resp.headers[h] for h in translate.PASSED_ERROR_HEADERS if h in resp.headers}
        return translate.upstream_error(self.name, resp.status, raw, passed)

    async def complete(self, req: UpstreamRequest) -> Reply:
        data, encode_b64 = self._prepare(req)
        resp = await self._post(self._url(req), req, data, {"X-Request-Id": req.request_id})
        if resp.status >= 400:
            raise await self._error_from(resp)
        raw = await self._read_body(resp)
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
        resp = await self._post(self._url(req), req, data, {"X-Request-Id": req.request_id})
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

