"""create_app(settings): the only composition root. Builds store, providers, plugins and routes."""

from __future__ import annotations

import gc
import importlib
import inspect
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.api import ops_routes
from gateway.api.admin_routes import AdminRoutes, SemanticCacheAdmin
from gateway.api.errors import error_middleware
from gateway.api.keys import LOOPMON, PIPELINE, READY, ROUTER, SETTINGS, STORE
from gateway.api.openai_routes import OpenAIRoutes
from gateway.loopmon import LoopLagMonitor
from gateway.pipeline import Pipeline, Plugin
from gateway.plugins.access import AccessPlugin
from gateway.plugins.exact_cache import ExactCachePlugin
from gateway.plugins.metrics import MetricsPlugin
from gateway.pricing import ModelPrice, build_price_table
from gateway.providers.base import Provider
from gateway.providers.mock import MockProvider
from gateway.providers.openai import OpenAIAdapter
from gateway.routing import Router
from gateway.settings import ConfigError, PluginRef, ProviderSettings, Settings
from gateway.store import Store, create_store


def build_provider(name: str, settings: ProviderSettings) -> Provider:
    if settings.kind == "mock":
        return MockProvider(name, settings.mock)
    if settings.kind == "anthropic":
        from gateway.providers.anthropic import AnthropicAdapter

        return AnthropicAdapter(name, settings)
    return OpenAIAdapter(name, settings)


_BUILT_IN_PLUGINS = frozenset({"access", "auth", "exact_cache", "semantic_cache", "metrics"})


def _load_external(ref: PluginRef) -> Any:
    """The class (or factory) an external plugin's `path` names."""
    assert ref.path is not None
    module_name, _, cls_name = ref.path.partition(":")
    if not cls_name:
        raise ConfigError(f"plugins: {ref.path!r} must look like 'package.module:Class'")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"plugins: cannot load {ref.path!r}: {e}") from None


def check_config(settings: Settings) -> dict[str, ModelPrice]:
    """Every check create_app makes beyond the settings' own validation, without building
    anything that does I/O (no store, no providers, no server): model prices, the plugin list
    and its order, external plugins importable with options their constructor accepts.
    Returns the price table. `tollway check-config` runs it; create_app runs it first."""
    prices = build_price_table(settings)
    names: list[str] = []
    for i, ref in enumerate(settings.plugins):
        if ref.name is not None:
            if ref.name not in _BUILT_IN_PLUGINS:
                raise ConfigError(f"plugins: unknown built-in plugin {ref.name!r}")
            name = "access" if ref.name == "auth" else ref.name
            if name == "semantic_cache" and "exact_cache" not in names:
                raise ConfigError("plugins: semantic_cache must come after exact_cache")
            names.append(name)
            continue
        cls = _load_external(ref)
        if not callable(cls) or (isinstance(cls, type) and not issubclass(cls, Plugin)):
            raise ConfigError(f"plugins: {ref.path!r} is not a gateway.pipeline.Plugin")
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):
            continue  # no signature to check the options against
        try:
            sig.bind(**ref.options)
        except TypeError as e:
            raise ConfigError(f"plugins.{i}.options: {ref.path!r} does not accept them: {e}") from None
    if "access" not in names:
        raise ConfigError("plugins: the access plugin (keys, limits, budgets) must be in the list")
    if "exact_cache" in names and names.index("exact_cache") < names.index("access"):
        raise ConfigError("plugins: exact_cache must come after access (hits pass limits and budgets)")
    return prices


def build_plugin(
    ref: PluginRef,
    settings: Settings,
    store: Store,
    prices: dict[str, ModelPrice],
    registry: CollectorRegistry,
) -> Plugin | None:
    if ref.name in ("access", "auth"):
        return AccessPlugin(settings, store, prices, registry)
    if ref.name == "exact_cache":
        return ExactCachePlugin(settings, store, registry)
    if ref.name == "semantic_cache":
        raise ConfigError("plugins: semantic_cache must come after exact_cache")
    if ref.name == "metrics":
        return MetricsPlugin(registry) if settings.metrics.enabled else None
    if ref.name is not None:
        raise ConfigError(f"plugins: unknown built-in plugin {ref.name!r}")
    plugin = _load_external(ref)(**ref.options)
    if not isinstance(plugin, Plugin):
        raise ConfigError(f"plugins: {ref.path!r} is not a gateway.pipeline.Plugin")
    return plugin


_GC_GEN0_THRESHOLD = 5_000


def create_app(settings: Settings) -> web.Application:
    prices = check_config(settings)
    store = create_store(settings.store)
    registry = CollectorRegistry(auto_describe=True)
    providers = {name: build_provider(name, p) for name, p in settings.providers.items()}
    router = Router(settings, providers, store, registry)
    plugins: list[Plugin] = []
    semantic: SemanticCacheAdmin | None = None
    for ref in settings.plugins:
        if ref.name == "semantic_cache":
            exact = next((p for p in plugins if isinstance(p, ExactCachePlugin)), None)
            assert exact is not None  # check_config: semantic_cache comes after exact_cache
            from gateway.plugins.semantic_cache import SemanticCachePlugin  # late: numpy, faiss

            semantic_plugin = SemanticCachePlugin(settings, store, registry, exact)
            plugins.append(semantic_plugin)
            semantic = semantic_plugin
        elif (p := build_plugin(ref, settings, store, prices, registry)) is not None:
            plugins.append(p)
    pipeline = Pipeline(plugins)

    app = web.Application(
        client_max_size=settings.server.max_body_bytes, middlewares=[error_middleware]
    )
    app[SETTINGS] = settings
    app[ROUTER] = router
    app[PIPELINE] = pipeline
    app[STORE] = store
    app[READY] = {"started": False, "stopping": False}
    loopmon = app[LOOPMON] = LoopLagMonitor(registry, settings.server.loop_lag_interval_s)

    openai_routes = OpenAIRoutes(app)
    openai_routes.add_to(app.router)
    AdminRoutes(app, semantic).add_to(app.router)
    ops_routes.add_to(app.router)
    for plugin in plugins:
        for method, path, handler in plugin.routes():
            app.router.add_route(method, path, handler)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await store.start()
        for p in providers.values():
            await p.start()
        await router.start()
        await pipeline.startup(app)
        openai_routes.bind()
        # Everything built so far lives as long as the process: keep it out of GC passes.
        gc.collect()
        gc.freeze()
        # Requests allocate many short-lived containers that reference counting frees at once;
        # with the default threshold (700 allocations) the young generation is collected every
        # few requests for almost nothing. 5000 collects ~7x less often (a few µs per request
        # less); larger makes each collection longer (every collection holds the GIL: at 20000 a
        # middle-generation pass took up to ~17 ms under semantic-cache load, at 5000 up to ~10).
        _, g1, g2 = gc.get_threshold()
        gc.set_threshold(_GC_GEN0_THRESHOLD, g1, g2)
        app[READY]["started"] = True
        loopmon.start()
        yield
        await loopmon.stop()
        app[READY]["stopping"] = True
        await pipeline.shutdown()
        await router.close()
        for p in providers.values():
            await p.close()
        await store.close()

    async def mark_stopping(app: web.Application) -> None:
        app[READY]["stopping"] = True

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(mark_stopping)
    return app
