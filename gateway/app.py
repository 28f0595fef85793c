"""create_app(settings): the only composition root. Builds providers, plugins and routes."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.api import ops_routes
from gateway.api.errors import error_middleware
from gateway.api.keys import PIPELINE, READY, ROUTER, SETTINGS
from gateway.api.openai_routes import OpenAIRoutes
from gateway.pipeline import Pipeline, Plugin
from gateway.plugins.auth import AuthPlugin
from gateway.plugins.metrics import MetricsPlugin
from gateway.providers.base import Provider
from gateway.providers.mock import MockProvider
from gateway.providers.openai import OpenAIAdapter
from gateway.routing import Router
from gateway.settings import ConfigError, PluginRef, Settings


def build_provider(name: str, settings: Any) -> Provider:
    if settings.kind == "mock":
        return MockProvider(name, settings.mock)
    return OpenAIAdapter(name, settings)


def build_plugin(ref: PluginRef, settings: Settings) -> Plugin | None:
    if ref.name == "auth":
        return AuthPlugin(settings.auth)
    if ref.name == "metrics":
        return MetricsPlugin() if settings.metrics.enabled else None
    if ref.name is not None:
        raise ConfigError(f"plugins: unknown built-in plugin {ref.name!r}")
    assert ref.path is not None
    module_name, _, cls_name = ref.path.partition(":")
    if not cls_name:
        raise ConfigError(f"plugins: {ref.path!r} must look like 'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"plugins: cannot load {ref.path!r}: {e}") from None
    plugin = cls(**ref.options)
    if not isinstance(plugin, Plugin):
        raise ConfigError(f"plugins: {ref.path!r} is not a gateway.pipeline.Plugin")
    return plugin


def create_app(settings: Settings) -> web.Application:
    providers = {name: build_provider(name, p) for name, p in settings.providers.items()}
    router = Router(settings.models, providers)
    plugins = [p for ref in settings.plugins if (p := build_plugin(ref, settings)) is not None]
    if settings.auth.mode == "keys" and not any(isinstance(p, AuthPlugin) for p in plugins):
        raise ConfigError("plugins: auth.mode is 'keys' but the auth plugin is not in the list")
    pipeline = Pipeline(plugins)

    app = web.Application(
        client_max_size=settings.server.max_body_bytes, middlewares=[error_middleware]
    )
    app[SETTINGS] = settings
    app[ROUTER] = router
    app[PIPELINE] = pipeline
    app[READY] = {"started": False, "stopping": False}

    openai_routes = OpenAIRoutes(app)
    openai_routes.add_to(app.router)
    ops_routes.add_to(app.router)
    for plugin in plugins:
        for method, path, handler in plugin.routes():
            app.router.add_route(method, path, handler)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        for p in providers.values():
            await p.start()
        await pipeline.startup(app)
        openai_routes.bind()
        app[READY]["started"] = True
        yield
        app[READY]["stopping"] = True
        await pipeline.shutdown()
        for p in providers.values():
            await p.close()

    async def mark_stopping(app: web.Application) -> None:
        app[READY]["stopping"] = True

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(mark_stopping)
    return app
