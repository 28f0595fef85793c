"""Pipeline: runs the plugins' hooks in order (pre) and reverse order (post)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from gateway.errors import GatewayError, InternalError
from gateway.pipeline.context import RequestContext
from gateway.pipeline.plugin import Plugin, ShortCircuit

log = logging.getLogger("tollway.pipeline")


def _overrides(plugin: Plugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


class Pipeline:
    """Ordered plugins; hook lists are precomputed so an unused hook costs nothing per request."""

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.plugins = list(plugins)
        self._headers = [p for p in self.plugins if _overrides(p, "on_headers")]
        self._lookup = [p for p in self.plugins if _overrides(p, "on_lookup")]
        self._request = [p for p in self.plugins if _overrides(p, "on_request")]
        self._chunk = [p for p in reversed(self.plugins) if _overrides(p, "on_chunk")]
        self._response = [p for p in reversed(self.plugins) if _overrides(p, "on_response")]

    @property
    def rewrites_chunks(self) -> bool:
        return bool(self._chunk)

    async def run_headers(self, ctx: RequestContext) -> None:
        for p in self._headers:
            try:
                r = p.on_headers(ctx)
                if r is not None:
                    await r
            except GatewayError:
                raise
            except Exception as e:
                self._plugin_failed(p, "on_headers", e)

    async def run_request(self, ctx: RequestContext) -> ShortCircuit | None:
        """The lookups, then every on_request hook; the answer to serve, if any."""
        for p in self._lookup:
            try:
                sc = p.on_lookup(ctx)
                if sc is not None and not isinstance(sc, ShortCircuit):
                    sc = await sc
            except GatewayError:
                raise
            except Exception as e:
                self._plugin_failed(p, "on_lookup", e)
                continue
            if sc is not None:
                ctx.answer = sc
                break
        for p in self._request:
            try:
                sc = p.on_request(ctx)
                if sc is not None and not isinstance(sc, ShortCircuit):
                    sc = await sc
            except GatewayError:
                raise
            except Exception as e:
                self._plugin_failed(p, "on_request", e)
                continue
            if sc is not None:
                return sc
        return ctx.answer

    def run_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> dict[str, Any] | None:
        for p in self._chunk:
            try:
                new = p.on_chunk(ctx, chunk)
            except Exception:
                log.exception("plugin %s on_chunk failed; chunk passed unchanged", p.name)
                continue
            if new is None:
                return None
            chunk = new
        return chunk

    async def run_response(self, ctx: RequestContext) -> None:
        for p in self._response:
            try:
                r = p.on_response(ctx)
                if r is not None:
                    await r
            except Exception:
                log.exception("plugin %s on_response failed (request %s)", p.name, ctx.request_id)

    def _plugin_failed(self, p: Plugin, hook: str, e: Exception) -> None:
        if p.fail_open:
            log.exception("plugin %s %s failed; continuing (fail_open)", p.name, hook)
            return
        log.exception("plugin %s %s failed", p.name, hook)
        raise InternalError(f"internal error in plugin {p.name}") from e

    async def startup(self, app: Any) -> None:
        for p in self.plugins:
            await p.on_startup(app)

    async def shutdown(self) -> None:
        for p in reversed(self.plugins):
            try:
                await p.on_shutdown()
            except Exception:
                log.exception("plugin %s on_shutdown failed", p.name)
