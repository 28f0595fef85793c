"""The Plugin protocol every feature (built-in or external) implements, and ShortCircuit."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from aiohttp import web

from gateway.pipeline.context import RequestContext

if TYPE_CHECKING:
    from gateway.providers.base import UpstreamStream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class ShortCircuit:
    """An answer produced by a plugin (e.g. a cache hit): no provider is called."""

    status: int = 200
    body: bytes | None = None
    stream: UpstreamStream | None = None
    """OpenAI SSE bytes, for a streaming request."""
    headers: dict[str, str] = field(default_factory=dict)


class Plugin:
    """Base class of pipeline plugins.

    Hooks, all optional:
    - `on_headers(ctx)`: before the body is read (auth belongs here). Called in order.
    - `on_lookup(ctx)`: after the body is parsed and the model resolved, before any
      `on_request`: a cheap lookup that can answer the request (the exact cache). Return a
      ShortCircuit (with `ctx.usage` set to the answer's usage) to answer; the pipeline keeps it
      in `ctx.answer`, still runs every `on_request` hook (auth, limits and billing see the
      answer and its known cost) and serves it if none rejected the request. Called in order
      until one answers.
    - `on_request(ctx)`: after the lookups. Called in order. Return None to continue, a
      ShortCircuit to answer without a provider, or raise a GatewayError to reject.
    - `on_chunk(ctx, chunk)`: each parsed stream chunk, in reverse order; return the chunk (or
      a changed one), or None to drop it. Declaring it turns off raw byte pass-through.
    - `on_response(ctx)`: once per request after it finished, however it finished (success,
      error, client gone); in reverse order. Its failures are logged, never the client's.
    The four request hooks may be plain methods or coroutines (`async def`): a hook that never
    waits is cheaper as a plain method (no coroutine per request).
    A failure in on_headers/on_lookup/on_request that is not a GatewayError fails the request unless the
    plugin sets `fail_open = True`.
    """

    name: ClassVar[str] = "plugin"
    fail_open: ClassVar[bool] = False

    async def on_startup(self, app: web.Application) -> None:
        return None

    async def on_shutdown(self) -> None:
        return None

    def on_headers(self, ctx: RequestContext) -> Awaitable[None] | None:
        return None

    def on_lookup(self, ctx: RequestContext) -> Awaitable[ShortCircuit | None] | ShortCircuit | None:
        return None

    def on_request(self, ctx: RequestContext) -> Awaitable[ShortCircuit | None] | ShortCircuit | None:
        return None

    def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> dict[str, Any] | None:
        return chunk

    def on_response(self, ctx: RequestContext) -> Awaitable[None] | None:
        return None

    def routes(self) -> list[tuple[str, str, Handler]]:
        """Extra HTTP routes the plugin serves: (method, path, handler)."""
        return []

    def health(self) -> dict[str, Any] | None:
        """Details for /ready; a dict with `ok: False` makes the gateway not ready."""
        return None
