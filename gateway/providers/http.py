"""HttpProvider: the aiohttp plumbing every HTTP upstream shares (pool, timeouts, error mapping)."""

from __future__ import annotations

import asyncio
import logging
import weakref

import aiohttp

from gateway import __version__
from gateway.errors import BadGateway, GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.providers.base import Provider, UpstreamRequest
from gateway.settings import ProviderSettings, Timeouts

log = logging.getLogger("tollway.providers")

USER_AGENT = f"tollway/{__version__}"


def transport_error(provider: str, e: BaseException, stage: str) -> GatewayError:
    """The client learns what failed, not where: addresses and exception text stay in our log."""
    log.warning("provider %s: failed %s: %s: %s", provider, stage, type(e).__name__, e)
    if isinstance(e, TimeoutError):
        return UpstreamTimeout(f"The upstream provider {provider} timed out {stage}.")
    if isinstance(e, aiohttp.ClientConnectorError):
        return UpstreamUnavailable(f"The upstream provider {provider} could not be reached.")
    return BadGateway(f"The connection to the upstream provider {provider} broke {stage}.")


def client_timeouts(t: Timeouts) -> tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]:
    """aiohttp timeouts (non-streaming, streaming): connect; idle read; a total only for a whole
    non-streaming call (a stream may last minutes). The time to first byte is not aiohttp's: see
    `HttpProvider._post` (non-streaming) and the router (streams, up to their first content)."""
    return (
        aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.read_s),
        aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.read_s),
    )


def first_byte_timeout(provider: str, seconds: float) -> GatewayError:
    """The upstream sent nothing useful within its time-to-first-byte limit (a retryable 504)."""
    log.warning("provider %s: no first byte within %.3gs", provider, seconds)
    return UpstreamTimeout(
        f"The upstream provider {provider} sent no first byte within {seconds:g}s.",
        code="upstream_first_byte_timeout",
    )


async def read_chunk(resp: aiohttp.ClientResponse, provider: str) -> bytes:
    """The next bytes of a streaming body (b"" at its end); transport failures as GatewayErrors."""
    try:
        return await resp.content.readany()
    except (TimeoutError, aiohttp.ClientError) as e:
        raise transport_error(provider, e, "mid-stream") from e


def finish(resp: aiohttp.ClientResponse) -> None:
    """Return a fully read connection to the pool; drop one that was abandoned or broke, so the
    upstream stops generating and no later request inherits a dirty connection."""
    if resp.content.is_eof():
        resp.release()
    else:
        resp.close()


class HttpProvider(Provider):
    """A provider reached over HTTP with one pooled aiohttp session. Subclasses translate."""

    def __init__(self, name: str, settings: ProviderSettings, headers: dict[str, str]) -> None:
        super().__init__(name)
        self.settings = settings
        self._headers = {"User-Agent": USER_AGENT, **headers, **settings.headers}
        self._timeouts = client_timeouts(settings.timeouts)
        self._dep_timeouts: dict[int, tuple[aiohttp.ClientTimeout, aiohttp.ClientTimeout]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._body_deadlines: weakref.WeakKeyDictionary[aiohttp.ClientResponse, tuple[float, float]] = (
            weakref.WeakKeyDictionary()
        )
        """Non-streaming answers whose body must begin by a loop time: (that time, first_byte_s)."""

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

    def _timeout(self, req: UpstreamRequest) -> aiohttp.ClientTimeout:
        pair = self._timeouts
        if req.timeouts is not None:  # the deployment's own
            key = id(req.timeouts)
            found = self._dep_timeouts.get(key)
            if found is None:
                found = self._dep_timeouts[key] = client_timeouts(req.timeouts)
            pair = found
        return pair[1] if req.stream else pair[0]

    async def _post(
        self, url: str, req: UpstreamRequest, data: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST with the provider's headers plus `headers`; connection failures → GatewayErrors.

        A non-streaming request with an explicit `first_byte_s` must get its headers, then the
        start of its body (see `_read_body`), within that time. (Without one, aiohttp's idle read
        timeout already bounds the wait for the headers; streams: the router times their first
        content.)"""
        session = self._session
        if session is None:
            raise UpstreamUnavailable(f"provider {self.name} is not started")
        first_byte_s = None if req.stream else (req.timeouts or self.settings.timeouts).first_byte_s
        try:
            if first_byte_s is None:
                return await session.post(
                    url, data=data, headers={**self._headers, **headers}, timeout=self._timeout(req)
                )
            deadline = asyncio.get_running_loop().time() + first_byte_s
            cm = asyncio.timeout_at(deadline)
            try:
                async with cm:
                    resp = await session.post(
                        url, data=data, headers={**self._headers, **headers}, timeout=self._timeout(req)
                    )
            except TimeoutError:
                if cm.expired():
                    raise first_byte_timeout(self.name, first_byte_s) from None
                raise  # aiohttp's own (connect or total) timeout
            if resp.status < 400:
                self._body_deadlines[resp] = (deadline, first_byte_s)
            return resp
        except (TimeoutError, aiohttp.ClientError) as e:
            raise transport_error(self.name, e, "before responding") from e

    async def _read_error_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body of an error answer (empty if it cannot be read); the connection is released."""
        try:
            return await resp.read()
        except (TimeoutError, aiohttp.ClientError):
            return b""
        finally:
            resp.release()

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body of a 2xx answer; on any failure the connection is dropped, not reused."""
        first_byte = self._body_deadlines.pop(resp, None) if self._body_deadlines else None
        try:
            if first_byte is not None and not resp.content.is_eof():
                deadline, first_byte_s = first_byte
                cm = asyncio.timeout_at(deadline)
                try:
                    async with cm:
                        start = await resp.content.readany()  # the body has begun
                except TimeoutError:
                    if not cm.expired():
                        raise
                    resp.close()
                    raise first_byte_timeout(self.name, first_byte_s) from None
                raw = start + await resp.read()
            else:
                raw = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            resp.close()
            raise transport_error(self.name, e, "while sending its answer") from e
        except BaseException:
            resp.close()
            raise
        resp.release()
        return raw
