"""OpenAI-compatible routes: chat, completions, embeddings and models."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import orjson
from aiohttp import web

from gateway.api.errors import incoming_request_id, overhead_header
from gateway.api.keys import CTX, PIPELINE, ROUTER, SETTINGS
from gateway.api.streaming import CAPTURE, relay_stream
from gateway.errors import GatewayError, ModelNotFound
from gateway.pipeline import Pipeline, RequestContext, ShortCircuit, Usage
from gateway.pipeline.context import Endpoint
from gateway.routing import ModelRoute, Router
from gateway.wire import requests as wire

_JSON = "application/json"


class OpenAIRoutes:
    """Handlers bound once to the app's components (no per-request lookups)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def bind(self) -> None:
        """Called at startup, when every AppKey is set."""
        app = self.app
        self.router: Router = app[ROUTER]
        self.pipeline: Pipeline = app[PIPELINE]
        settings = app[SETTINGS]
        self.max_body = settings.server.max_body_bytes
        self.keepalive_s = settings.server.stream_keepalive_s

    def add_to(self, routes: web.UrlDispatcher) -> None:
        for prefix in ("/v1", ""):
            routes.add_post(prefix + "/chat/completions", self.chat)
            routes.add_post(prefix + "/completions", self.completions)
            routes.add_post(prefix + "/embeddings", self.embeddings)
            routes.add_get(prefix + "/models", self.list_models)
            routes.add_get(prefix + "/models/{model:.+}", self.get_model)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "completions")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "embeddings")

    def _new_ctx(self, request: web.Request, endpoint: Endpoint) -> RequestContext:
        ctx = RequestContext(
            incoming_request_id(request.headers.get("x-request-id")), endpoint, request.headers
        )
        request[CTX] = ctx
        return ctx

    async def _proxy(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        ctx = self._new_ctx(request, endpoint)
        pipeline = self.pipeline
        try:
            await pipeline.run_headers(ctx)
            wire.check_length(request.content_length, self.max_body)
            wire.check_content_type(request.content_type)
            body = wire.parse_body(await request.read())
            model = wire.validate(endpoint, body)
            route = self.router.resolve(model, endpoint)
            ctx.body = body
            ctx.public_model = model
            if body.get("stream") is True:
                ctx.stream = True
                so = body.get("stream_options")
                ctx.client_wants_usage = isinstance(so, dict) and so.get("include_usage") is True
                if not ctx.client_wants_usage:
                    body["stream_options"] = {**(so or {}), "include_usage": True}
            sc = await pipeline.run_request(ctx)
            if sc is not None:
                return await self._short_circuit(request, ctx, sc)
            if ctx.stream:
                return await self._stream(request, ctx, route)
            return await self._complete(ctx, route)
        except GatewayError as e:
            ctx.error = e
            ctx.status = e.status
            raise
        except asyncio.CancelledError:
            ctx.status = 499  # client went away; the upstream call was cancelled with us
            raise
        except BaseException:
            ctx.status = 500
            raise
        finally:
            await pipeline.run_response(ctx)

    async def _complete(self, ctx: RequestContext, route: ModelRoute) -> web.Response:
        t0 = time.perf_counter()
        try:
            reply = await self.router.complete(ctx, route)
        finally:
            ctx.upstream_s = time.perf_counter() - t0
        ctx.usage = Usage.from_openai(reply.parsed.get("usage"))
        if reply.cache_write_tokens and ctx.usage is not None:
            ctx.usage = dataclasses.replace(ctx.usage, cache_write_tokens=reply.cache_write_tokens)
        ctx.status = reply.status
        capture = ctx.state.get(CAPTURE)
        if capture is not None:
            capture.append(reply.body)
        overhead = ctx.elapsed() - ctx.upstream_s
        ctx.overhead_s = overhead
        headers = {
            "Content-Type": _JSON,
            "x-request-id": ctx.request_id,
            "x-tollway-overhead-ms": overhead_header(overhead),
        }
        if reply.headers:
            headers.update(reply.headers)
        if ctx.response_headers:
            headers.update(ctx.response_headers)
        return web.Response(body=reply.body, status=reply.status, headers=headers)

    async def _stream(
        self, request: web.Request, ctx: RequestContext, route: ModelRoute
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            upstream = await self.router.open_stream(ctx, route)
        except BaseException:
            ctx.upstream_s = time.perf_counter() - t0
            raise
        return await relay_stream(
            request, ctx, upstream, self.pipeline, t_upstream=t0, keepalive_s=self.keepalive_s
        )

    async def _short_circuit(
        self, request: web.Request, ctx: RequestContext, sc: ShortCircuit
    ) -> web.StreamResponse:
        ctx.status = sc.status
        if sc.stream is not None:
            return await relay_stream(
                request, ctx, sc.stream, self.pipeline, t_upstream=None,
                keepalive_s=self.keepalive_s,
            )
        ctx.overhead_s = ctx.elapsed()
        headers = {
            "Content-Type": _JSON,
            "x-request-id": ctx.request_id,
            "x-tollway-overhead-ms": overhead_header(ctx.overhead_s),
            **sc.headers,
            **(ctx.response_headers or {}),
        }
        return web.Response(body=sc.body or b"", status=sc.status, headers=headers)

    # ---- models -------------------------------------------------------------------------------

    def _model_obj(self, route: ModelRoute) -> dict[str, Any]:
        return {
            "id": route.public_name,
            "object": "model",
            "created": route.created,
            "owned_by": route.owned_by,
        }

    async def _models(self, request: web.Request, model: str | None) -> web.Response:
        ctx = self._new_ctx(request, "models")
        try:
            await self.pipeline.run_headers(ctx)
            if model is None:
                obj: dict[str, Any] = {
                    "object": "list",
                    "data": [self._model_obj(r) for r in self.router.routes.values()],
                }
            else:
                ctx.public_model = model if model in self.router.routes else None
                route = self.router.routes.get(model)
                if route is None:
                    raise ModelNotFound(
                        f"The model '{model}' does not exist", param="model"
                    )
                obj = self._model_obj(route)
            ctx.status = 200
            body = orjson.dumps(obj)
            ctx.overhead_s = ctx.elapsed()  # no upstream: all of it is the gateway's own time
            return web.Response(
                body=body,
                headers={
                    "Content-Type": _JSON,
                    "x-request-id": ctx.request_id,
                    "x-tollway-overhead-ms": overhead_header(ctx.overhead_s),
                },
            )
        except GatewayError as e:
            ctx.error = e
            ctx.status = e.status
            raise
        finally:
            await self.pipeline.run_response(ctx)

    async def list_models(self, request: web.Request) -> web.Response:
        return await self._models(request, None)

    async def get_model(self, request: web.Request) -> web.Response:
        return await self._models(request, request.match_info["model"])
